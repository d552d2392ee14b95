package handlers

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// The relay's hot path, measured and pinned: a chunk written by the client
// is forwarded to the upstream through real loopback TCP sockets, by the
// epoll event loop (plain TCP pairs on Linux) and by the goroutine relay
// (raw sockets, and wrapped connections such as TLS). Forwarding borrows a
// pooled buffer and gives it back, so a chunk allocates nothing.

// tcpPair returns both ends of a fresh loopback TCP connection.
func tcpPair(tb testing.TB) (dialed, accepted *net.TCPConn) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	d, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		tb.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		d.Close()
		tb.Fatal(r.err)
	}
	tb.Cleanup(func() { d.Close(); r.c.Close() })
	return d.(*net.TCPConn), r.c.(*net.TCPConn)
}

// wrappedConn hides the *net.TCPConn, as a TLS or PROXY-protocol wrapper
// does, so the goroutine relay takes its blocking copy loop. Like a
// tls.Conn it can shut down its write half.
type wrappedConn struct{ net.Conn }

func (w wrappedConn) CloseWrite() error { return w.Conn.(*net.TCPConn).CloseWrite() }

// relayPath is one way of relaying a pair.
type relayPath struct {
	name  string
	start func(tb testing.TB, proxyClient, proxyUpstream *net.TCPConn) (stop func())
}

// relayPaths are the relay's paths: the event loop (read/write, and splice
// with WAPROXY_RELAY=splice), the goroutine relay on raw sockets (waiting in
// the netpoller without a buffer), and the goroutine relay's copy loop for a
// wrapped client connection.
var relayPaths = []relayPath{
	{"eventloop", func(tb testing.TB, c, u *net.TCPConn) func() { return startEventLoop(tb, "", c, u) }},
	{"eventloop_splice", func(tb testing.TB, c, u *net.TCPConn) func() { return startEventLoop(tb, "splice", c, u) }},
	{"goroutine", func(tb testing.TB, c, u *net.TCPConn) func() { return startGoroutineRelay(tb, c, c, u) }},
	{"goroutine_wrapped", func(tb testing.TB, c, u *net.TCPConn) func() {
		return startGoroutineRelay(tb, wrappedConn{c}, wrappedConn{c}, u)
	}},
}

// newCounters returns two unregistered counters, so the benchmarks leave the
// package's metrics alone.
func newCounters() (a, b prometheus.Counter) {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: "bench_a"}),
		prometheus.NewCounter(prometheus.CounterOpts{Name: "bench_b"})
}

// startEventLoop hands the proxy's two sockets to the event loop, as
// wa_proxy does after dialling (SOCKS5). The stop function waits until the loop has
// closed the pair.
func startEventLoop(tb testing.TB, mode string, proxyClient, proxyUpstream *net.TCPConn) func() {
	tb.Helper()
	saved := relayMode
	relayMode = mode // WAPROXY_RELAY=goroutine (a CI pass) must not skip this path
	defer func() { relayMode = saved }()
	sent, received := newCounters()
	ended := make(chan error, 1)
	if !offload(proxyClient, proxyUpstream, time.Minute, [2]*atomic.Int64{new(atomic.Int64), new(atomic.Int64)},
		received, sent, func(_ pairStats, err error) { ended <- err }) {
		if runtime.GOOS != "linux" {
			tb.Skip("no event loop on " + runtime.GOOS)
		}
		tb.Fatal("offload refused a plain TCP pair")
	}
	proxyClient.Close() // as caddy-l4 does when the handler returns; the loop holds a duplicate
	return func() { waitEnded(tb, ended) }
}

// startGoroutineRelay runs the goroutine relay between the client (read
// from clientR, written to clientW) and the upstream.
func startGoroutineRelay(tb testing.TB, clientR, clientW net.Conn, upstream *net.TCPConn) func() {
	tb.Helper()
	sent, received := newCounters()
	r := &relay{idle: time.Minute, up: new(atomic.Int64), down: new(atomic.Int64)}
	ended := make(chan error, 1)
	go func() { ended <- r.run(clientR, clientW, upstream, sent, received) }()
	return func() { waitEnded(tb, ended) }
}

func waitEnded(tb testing.TB, ended <-chan error) {
	tb.Helper()
	select {
	case err := <-ended:
		if err != nil {
			tb.Errorf("relay ended with %v, want a clean end", err)
		}
	case <-time.After(10 * time.Second):
		tb.Error("the relay did not end 10 s after both ends closed")
	}
}

// relayed is a client and an upstream with a relay between them.
type relayed struct {
	client, upstream *net.TCPConn
	stop             func()
}

func newRelayed(tb testing.TB, p relayPath) *relayed {
	tb.Helper()
	client, proxyClient := tcpPair(tb)
	proxyUpstream, upstream := tcpPair(tb)
	return &relayed{client: client, upstream: upstream, stop: p.start(tb, proxyClient, proxyUpstream)}
}

// forward writes chunk from the client and reads it whole at the upstream
// into buf: one forwarded chunk. It allocates nothing itself.
func (r *relayed) forward(chunk, buf []byte) error {
	if _, err := r.client.Write(chunk); err != nil {
		return err
	}
	_, err := io.ReadFull(r.upstream, buf[:len(chunk)])
	return err
}

// close ends both directions with a FIN each and waits for the relay to end.
func (r *relayed) close(tb testing.TB) {
	tb.Helper()
	r.client.CloseWrite()
	r.upstream.CloseWrite()
	// Both see the other's FIN passed on.
	for _, c := range []*net.TCPConn{r.client, r.upstream} {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			tb.Errorf("after both FINs: read %d, %v; want EOF", n, err)
		}
	}
	r.stop()
}

// BenchmarkRelayChunk measures forwarding one chunk client→upstream through
// each relay path: B/op and allocs/op are per forwarded chunk, and should
// both be 0.
func BenchmarkRelayChunk(b *testing.B) {
	for _, p := range relayPaths {
		for _, size := range []int{128, 4 << 10, 16 << 10} {
			b.Run(fmt.Sprintf("%s/%dB", p.name, size), func(b *testing.B) {
				r := newRelayed(b, p)
				chunk := bytes.Repeat([]byte{0x5a}, size)
				buf := make([]byte, size)
				for range 16 { // warm the pools and the sockets
					if err := r.forward(chunk, buf); err != nil {
						b.Fatal(err)
					}
				}
				b.SetBytes(int64(size))
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					if err := r.forward(chunk, buf); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				r.close(b)
			})
		}
	}
}

// TestRelayChunkAllocs pins that forwarding a chunk allocates nothing,
// amortised, on every relay path: the relay borrows a pooled buffer per
// chunk and gives it back. It counts the process's allocations (the relay's
// goroutines or event loop included) over many chunks; a garbage collection
// emptying the pool in between may cost a buffer or two, hence the small
// allowance, far below one allocation per chunk. It checks the bytes too.
func TestRelayChunkAllocs(t *testing.T) {
	const (
		chunks = 2000
		allow  = 20 // allocations over all chunks: 1 %, for the runtime and a GC emptying the pool
	)
	for _, p := range relayPaths {
		t.Run(p.name, func(t *testing.T) {
			r := newRelayed(t, p)
			chunk := make([]byte, 1024)
			for i := range chunk {
				chunk[i] = byte(i * 7)
			}
			buf := make([]byte, len(chunk))
			for range 64 { // warm up: pools, socket buffers, deadline timers
				if err := r.forward(chunk, buf); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(buf, chunk) {
				t.Fatal("the upstream received other bytes than the client sent")
			}
			var m0, m1 runtime.MemStats
			runtime.ReadMemStats(&m0)
			for i := range chunks {
				if err := r.forward(chunk, buf); err != nil {
					t.Fatalf("chunk %d: %v", i, err)
				}
			}
			runtime.ReadMemStats(&m1)
			mallocs := m1.Mallocs - m0.Mallocs
			t.Logf("%d allocations (%d bytes) over %d chunks of %d B", mallocs, m1.TotalAlloc-m0.TotalAlloc, chunks, len(chunk))
			switch {
			case testutil.RaceEnabled:
				t.Log("race detector on: sync.Pool drops buffers at random; allocation count not checked")
			case mallocs > allow:
				t.Errorf("%d allocations over %d forwarded chunks (%.3f per chunk); want at most %d in all: forwarding must not allocate",
					mallocs, chunks, float64(mallocs)/chunks, allow)
			}
			// The other direction still works after the measured run.
			if _, err := r.upstream.Write([]byte("back")); err != nil {
				t.Fatal(err)
			}
			r.client.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(r.client, buf[:4]); err != nil || string(buf[:4]) != "back" {
				t.Fatalf("upstream→client: %q, %v", buf[:4], err)
			}
			r.close(t)
		})
	}
}
