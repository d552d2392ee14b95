// Command sockmap measures in-kernel forwarding with a BPF sockmap against
// a copying relay and a direct connection, on loopback, side by side in one
// run. It is an experiment kept to reproduce docs/performance.md
// ("In-kernel forwarding: BPF sockmap"); the proxy does not use a sockmap.
//
// An edge streams 32 KiB writes to each of -streams clients, either
// directly (direct), through a relay that copies with two goroutines per
// connection (copy), or through a relay that puts both sockets of each
// connection into a BPF SOCKHASH whose stream verdict program redirects
// every received skb to the other socket's send side (sockmap). Each mode
// gets fresh sockets in each round; the modes alternate. Per mode it
// reports MB/s received by the clients, machine CPU per GB (every CPU's
// busy time from /proc/stat) and how fast MemAvailable fell during the
// measured window: memory the kernel takes for queued data, which a
// relay's flow control bounds. (Memory freed by an earlier mode comes back
// slowly, so a steady relay can read a little below zero.)
//
// It needs Linux with CONFIG_BPF_STREAM_PARSER and, for sockmap, CAP_BPF
// and CAP_NET_ADMIN (root):
//
//	cd bench/sockmap && go run . -rounds 3
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

const chunk = 32 << 10

// result is one mode's measurement in one round.
type result struct {
	mbps     float64 // MB/s the clients received
	msPerGB  float64 // machine CPU per GB received
	memGrowM float64 // MemAvailable's fall over the window, MB per second
}

func main() {
	streams := flag.Int("streams", 16, "concurrent streams, edge→client")
	duration := flag.Duration("duration", 5*time.Second, "measured window per mode and round")
	rounds := flag.Int("rounds", 3, "rounds; the modes alternate within each")
	modes := flag.String("modes", "direct,copy,sockmap", "modes to measure, comma-separated")
	flag.Parse()

	list := strings.Split(*modes, ",")
	var redirect *sockmap
	if slices.Contains(list, "sockmap") {
		var err error
		if redirect, err = newSockmap(); err != nil {
			fmt.Fprintln(os.Stderr, "sockmap:", err)
			os.Exit(1)
		}
		defer redirect.Close()
	}
	results := map[string][]result{}
	for r := range *rounds {
		for _, mode := range list {
			res, err := measure(mode, redirect, *streams, *duration)
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", mode, err)
				os.Exit(1)
			}
			fmt.Printf("round %d %-8s %6.0f MB/s  %5.0f ms machine CPU/GB  MemAvailable fell %.0f MB\n",
				r+1, mode, res.mbps, res.msPerGB, res.memGrowM)
			results[mode] = append(results[mode], res)
			settle()
		}
	}
	fmt.Printf("\nmedians over %d rounds (%d streams, %s each)\n\n", *rounds, *streams, *duration)
	fmt.Println("| mode | MB/s | machine CPU per GB, ms | MemAvailable fall, MB per second |")
	fmt.Println("| --- | --- | --- | --- |")
	for _, mode := range list {
		rs := results[mode]
		fmt.Printf("| %s | %.0f | %.0f | %.0f |\n", mode,
			median(rs, func(r result) float64 { return r.mbps }),
			median(rs, func(r result) float64 { return r.msPerGB }),
			median(rs, func(r result) float64 { return r.memGrowM }))
	}
	if len(results["copy"]) > 0 && len(results["sockmap"]) > 0 {
		var mb, cpu []float64
		for i := range results["copy"] {
			c, s := results["copy"][i], results["sockmap"][i]
			mb = append(mb, s.mbps/c.mbps)
			cpu = append(cpu, s.msPerGB/c.msPerGB)
		}
		fmt.Printf("\nsockmap/copy, same-round ratios, median: MB/s %.2f×, machine CPU per GB %.2f×\n",
			medianOf(mb), medianOf(cpu))
	}
}

// sockmap is a SOCKHASH with a stream verdict program attached. Each socket
// is stored under its peer's socket cookie, so the program redirects an skb
// received on a socket to the socket stored under that socket's own cookie:
// its peer, on the send side (flags 0).
type sockmap struct {
	hash *ebpf.Map
	prog *ebpf.Program
}

func newSockmap() (*sockmap, error) {
	hash, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 8, ValueSize: 4, MaxEntries: 4096})
	if err != nil {
		return nil, fmt.Errorf("create SOCKHASH (needs CAP_BPF and CAP_NET_ADMIN): %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.SkSKB,
		AttachType: ebpf.AttachSkSKBVerdict,
		License:    "GPL",
		Instructions: asm.Instructions{
			// return bpf_sk_redirect_hash(skb, &hash, &(u64){bpf_get_socket_cookie(skb)}, 0)
			asm.Mov.Reg(asm.R6, asm.R1),
			asm.FnGetSocketCookie.Call(),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.LoadMapPtr(asm.R2, hash.FD()),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkRedirectHash.Call(),
			asm.Return(),
		},
	})
	if err != nil {
		hash.Close()
		return nil, fmt.Errorf("load the verdict program: %w", err)
	}
	err = link.RawAttachProgram(link.RawAttachProgramOptions{Target: hash.FD(), Program: prog, Attach: ebpf.AttachSkSKBVerdict})
	if err != nil {
		prog.Close()
		hash.Close()
		return nil, fmt.Errorf("attach the verdict program: %w", err)
	}
	return &sockmap{hash: hash, prog: prog}, nil
}

func (s *sockmap) Close() {
	s.prog.Close()
	s.hash.Close()
}

// splice puts a and b into the map, each under the other's cookie.
func (s *sockmap) splice(a, b *net.TCPConn) error {
	ca, fa, err := cookieAndFD(a)
	if err != nil {
		return err
	}
	cb, fb, err := cookieAndFD(b)
	if err != nil {
		return err
	}
	if err := s.hash.Update(cb, fa, ebpf.UpdateAny); err != nil {
		return err
	}
	return s.hash.Update(ca, fb, ebpf.UpdateAny)
}

func cookieAndFD(c *net.TCPConn) (cookie uint64, fd uint32, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	cerr := rc.Control(func(f uintptr) {
		fd = uint32(f)
		cookie, err = unix.GetsockoptUint64(int(f), unix.SOL_SOCKET, unix.SO_COOKIE)
	})
	return cookie, fd, errors.Join(cerr, err)
}

// measure runs one mode once: streams connections set up (and, with a
// relay, spliced or copying) before any byte moves, then the clients ask
// and read for duration after a warm-up.
func measure(mode string, redirect *sockmap, streams int, duration time.Duration) (result, error) {
	var closers []io.Closer
	var mu sync.Mutex
	keep := func(c io.Closer) {
		mu.Lock()
		closers = append(closers, c)
		mu.Unlock()
	}
	defer func() {
		mu.Lock()
		for _, c := range closers {
			c.Close()
		}
		mu.Unlock()
	}()

	edge, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return result{}, err
	}
	keep(edge)
	go serveEdge(edge, keep)
	target := edge.Addr().String()
	ready := make(chan error, streams)
	if mode != "direct" {
		relay, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return result{}, err
		}
		keep(relay)
		go serveRelay(relay, target, mode, redirect, keep, ready)
		target = relay.Addr().String()
	}
	conns := make([]net.Conn, streams)
	for i := range conns {
		c, err := net.Dial("tcp", target)
		if err != nil {
			return result{}, err
		}
		keep(c)
		conns[i] = c
	}
	if mode != "direct" {
		for range streams {
			if err := <-ready; err != nil {
				return result{}, err
			}
		}
	}

	var received atomic.Int64
	for _, c := range conns {
		go func() {
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
			buf := make([]byte, chunk)
			for {
				n, err := c.Read(buf)
				received.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(500 * time.Millisecond) // warm-up
	busy0, memBefore := machineBusy(), memAvailable()
	n0, t0 := received.Load(), time.Now()
	time.Sleep(duration)
	n1, elapsed := received.Load(), time.Since(t0)
	busy1 := machineBusy()
	memAfter := memAvailable()
	if n1 == n0 {
		return result{}, errors.New("no bytes received")
	}
	gb := float64(n1-n0) / 1e9
	return result{
		mbps:     float64(n1-n0) / 1e6 / elapsed.Seconds(),
		msPerGB:  (busy1 - busy0).Seconds() * 1000 / gb,
		memGrowM: float64(memBefore-memAfter) / 1e6 / elapsed.Seconds(),
	}, nil
}

// serveEdge answers each connection's first byte with an endless stream.
func serveEdge(l net.Listener, keep func(io.Closer)) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		keep(c)
		go func() {
			buf := make([]byte, chunk)
			if _, err := io.ReadFull(c, buf[:1]); err != nil {
				return
			}
			for {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
	}
}

// serveRelay connects each accepted connection to target and relays it,
// reporting on ready once it is set up.
func serveRelay(l net.Listener, target, mode string, redirect *sockmap, keep func(io.Closer), ready chan<- error) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		keep(c)
		u, err := net.Dial("tcp", target)
		if err != nil {
			ready <- err
			return
		}
		keep(u)
		if mode == "sockmap" {
			ready <- redirect.splice(c.(*net.TCPConn), u.(*net.TCPConn))
			continue
		}
		go func() { _, _ = io.Copy(u, c) }()
		go func() { _, _ = io.Copy(c, u) }()
		ready <- nil
	}
}

// settle waits, up to 20 s, for the memory a mode's closed sockets held to
// come back (MemAvailable steady within 16 MB over 500 ms), so that the next
// mode's reading starts from it.
func settle() {
	prev := memAvailable()
	for range 40 {
		time.Sleep(500 * time.Millisecond)
		now := memAvailable()
		if d := now - prev; d < 16e6 && d > -16e6 {
			return
		}
		prev = now
	}
}

// machineBusy is every CPU's busy time so far (/proc/stat's first line,
// all but idle and iowait).
func machineBusy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var ticks uint64
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		if i != 3 && i != 4 { // idle, iowait
			ticks += v
		}
	}
	return time.Duration(ticks) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

// memAvailable is /proc/meminfo's MemAvailable in bytes.
func memAvailable() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

func median(rs []result, f func(result) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	return medianOf(v)
}

func medianOf(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
