package integration

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// socksTap is a TCP relay in front of a real SOCKS5 server (caddy-l4's
// socks5 handler) that reads the client's CONNECT request on its way and
// records the destination port. While down, it relays the method
// selection, records the CONNECT request and then closes instead of
// forwarding it: a server whose exit is broken, so health checks through it
// fail, and every dial attempt through it is still seen.
type socksTap struct {
	Addr string
	down atomic.Bool

	mu    sync.Mutex
	ports []int // the CONNECT requests' destination ports, in order
}

func startSOCKSTap(t *testing.T, target string) *socksTap {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tap := &socksTap{Addr: ln.Addr().String()}
	var wg sync.WaitGroup
	var connsMu sync.Mutex
	conns := map[net.Conn]struct{}{}
	t.Cleanup(func() {
		ln.Close()
		connsMu.Lock()
		for c := range conns {
			c.Close()
		}
		connsMu.Unlock()
		wg.Wait()
	})
	track := func(c net.Conn) {
		connsMu.Lock()
		conns[c] = struct{}{}
		connsMu.Unlock()
	}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			track(c)
			wg.Go(func() {
				defer c.Close()
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				track(up)
				defer up.Close()
				if !tap.handshake(c, up) {
					return
				}
				done := make(chan struct{})
				go func() {
					_, _ = io.Copy(up, c)
					_ = up.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				_, _ = io.Copy(c, up)
				_ = c.(*net.TCPConn).CloseWrite()
				<-done
			})
		}
	})
	return tap
}

// handshake relays the method selection and the CONNECT request, recording
// its port. It reports whether the connection goes on (the tap is up).
func (tap *socksTap) handshake(c, up net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	greeting := make([]byte, 2, 2+255)
	if _, err := io.ReadFull(c, greeting); err != nil {
		return false
	}
	greeting = greeting[:2+int(greeting[1])]
	if _, err := io.ReadFull(c, greeting[2:]); err != nil {
		return false
	}
	reply := make([]byte, 2)
	if _, err := up.Write(greeting); err != nil {
		return false
	}
	if _, err := io.ReadFull(up, reply); err != nil {
		return false
	}
	if _, err := c.Write(reply); err != nil || reply[1] != 0 { // no authentication in these tests
		return false
	}
	req := make([]byte, 4, 4+1+255+2)
	if _, err := io.ReadFull(c, req); err != nil {
		return false
	}
	switch req[3] {
	case 1:
		req = req[:4+4+2]
	case 4:
		req = req[:4+16+2]
	case 3:
		req = req[:5]
		if _, err := io.ReadFull(c, req[4:]); err != nil {
			return false
		}
		req = req[:5+int(req[4])+2]
	default:
		return false
	}
	return tap.finish(c, up, req)
}

// finish reads the rest of the CONNECT request (req's length is its full
// length; what was read so far is a prefix), records it and forwards it
// unless the tap is down.
func (tap *socksTap) finish(c, up net.Conn, req []byte) bool {
	have := 4
	if req[3] == 3 {
		have = 5
	}
	if _, err := io.ReadFull(c, req[have:]); err != nil {
		return false
	}
	tap.mu.Lock()
	tap.ports = append(tap.ports, int(binary.BigEndian.Uint16(req[len(req)-2:])))
	tap.mu.Unlock()
	if tap.down.Load() {
		return false
	}
	_, err := up.Write(req)
	return err == nil
}

// connects counts the CONNECT requests the tap saw for port.
func (tap *socksTap) connects(port int) int {
	tap.mu.Lock()
	defer tap.mu.Unlock()
	n := 0
	for _, p := range tap.ports {
		if p == port {
			n++
		}
	}
	return n
}

// seriesValue reads one series from /metrics; ok is false when it is absent.
// (The upstream label's value has a space: the value is after the last one.)
func seriesValue(t *testing.T, c *testutil.Caddy, series string) (v float64, ok bool) {
	t.Helper()
	for _, line := range strings.Split(c.Metrics(t), "\n") {
		if i := strings.LastIndexByte(line, ' '); i > 0 && line[:i] == series {
			val := line[i+1:]
			if _, err := fmt.Sscan(val, &v); err != nil {
				t.Fatalf("metric %s: bad value %q", series, val)
			}
			return v, true
		}
	}
	return 0, false
}

// addrPort returns the port of a "host:port", as text and as a number.
func addrPort(t *testing.T, addr string) (string, int) {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return port, n
}

func healthySeries(upstream string) string {
	return `whatsapp_proxy_upstream_healthy{upstream="` + upstream + `"}`
}

// waitHealthy waits until the upstream's gauge is want.
func waitHealthy(t *testing.T, c *testutil.Caddy, upstream string, want float64) {
	t.Helper()
	series := healthySeries(upstream)
	testutil.WaitFor(t, 5*time.Second, fmt.Sprintf("%s == %v", series, want), func() bool {
		v, ok := seriesValue(t, c, series)
		return ok && v == want
	})
}

// checkerGoroutines counts the running health checkers in this process.
func checkerGoroutines() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "upstreams.(*checker).run(")
		}
		buf = make([]byte, 2*len(buf))
	}
}

// upstreamsHealth returns the health GET /waproxy/upstreams shows for the
// dialer whose servers are servers.
func upstreamsHealth(t *testing.T, c *testutil.Caddy, servers []string) []registry.ServerHealth {
	t.Helper()
	resp, err := http.Get("http://" + c.Admin + "/waproxy/upstreams")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list []registry.Dialer
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatalf("decoding /waproxy/upstreams: %v", err)
	}
	for _, d := range list {
		if fmt.Sprint(d.Servers) == fmt.Sprint(servers) {
			return d.Health
		}
	}
	t.Fatalf("/waproxy/upstreams has no dialer with servers %v: %+v", servers, list)
	return nil
}

// TestHealthSOCKS5Failover: wa_proxy via socks5 [A, B] with a health check.
// Both start healthy and A carries the traffic; when A's exit breaks, its
// gauge turns 0, chat connections go through B without a dial attempt
// through A, and the admin API shows why; when A is back, it is healthy
// and first again. A reload keeps the gauge's series; a config without a
// health check removes them and stops the checkers.
func TestHealthSOCKS5Failover(t *testing.T) {
	before := checkerGoroutines()
	edge := testutil.StartEcho(t)
	edgePortStr, edgePort := addrPort(t, edge.Addr)
	healthDest := testutil.StartEcho(t) // the health checks' "g.whatsapp.net:5222"
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	a, b := startSOCKSTap(t, socks), startSOCKSTap(t, socks)
	servers := []string{a.Addr, b.Addr}
	upA, upB := "socks5 "+a.Addr, "socks5 "+b.Addr

	config := func(health obj) string {
		via := obj{"dialer": "socks5", "servers": servers}
		if health != nil {
			via["health_check"] = health
		}
		return proxyConfig(listen, []obj{
			chatRoute(obj{"destination": "localhost:" + edgePortStr, "via": via, "allow": []string{"localhost"}}),
		}, socks, nil)
	}
	c := testutil.StartCaddy(t, config(obj{"destination": healthDest.Addr, "interval": "200ms", "timeout": "2s"}))

	chat := func() {
		t.Helper()
		conn := dial(t, listen)
		exchange(t, conn, waHello())
		exchange(t, conn, frame(randomBytes(100)))
		conn.Close()
	}

	waitHealthy(t, c, upA, 1)
	waitHealthy(t, c, upB, 1)
	chat()
	if got := a.connects(edgePort); got != 1 {
		t.Fatalf("A saw %d CONNECTs to the edge while healthy, want 1 (it is first)", got)
	}
	if got := b.connects(edgePort); got != 0 {
		t.Fatalf("B saw %d CONNECTs to the edge while A is healthy, want 0", got)
	}

	// A's exit breaks: the next check marks it unhealthy
	a.down.Store(true)
	waitHealthy(t, c, upA, 0)
	if v, _ := seriesValue(t, c, healthySeries(upB)); v != 1 {
		t.Fatalf("B's gauge is %v, want 1", v)
	}
	chat()
	chat()
	if got := a.connects(edgePort); got != 1 {
		t.Fatalf("A saw %d CONNECTs to the edge in all, want 1: an unhealthy server was tried", got)
	}
	if got := b.connects(edgePort); got != 2 {
		t.Fatalf("B saw %d CONNECTs to the edge, want 2", got)
	}
	if _, hPort := addrPort(t, healthDest.Addr); a.connects(hPort) == 0 {
		t.Fatal("A saw no health check")
	}

	health := upstreamsHealth(t, c, servers)
	if len(health) != 2 || health[0].Upstream != upA || health[1].Upstream != upB {
		t.Fatalf("/waproxy/upstreams health %+v, want A then B", health)
	}
	if health[0].Healthy || !strings.Contains(health[0].Error, "socks5 "+a.Addr+": ") || health[0].LastCheck.IsZero() ||
		health[0].Destination != healthDest.Addr {
		t.Fatalf("A's health %+v, want unhealthy with the error, the last check and the destination", health[0])
	}
	if !health[1].Healthy || health[1].Error != "" {
		t.Fatalf("B's health %+v, want healthy", health[1])
	}

	// A is back: healthy, and first again
	a.down.Store(false)
	waitHealthy(t, c, upA, 1)
	chat()
	if got := a.connects(edgePort); got != 2 {
		t.Fatalf("A saw %d CONNECTs to the edge after it recovered, want 2", got)
	}
	if h := upstreamsHealth(t, c, servers); !h[0].Healthy {
		t.Fatalf("A's health %+v after recovery", h[0])
	}

	// reloads: the same health check, then other settings. The series must
	// be there at every scrape during and after each reload.
	for _, health := range []obj{
		{"destination": healthDest.Addr, "interval": "200ms", "timeout": "2s"},
		{"destination": healthDest.Addr, "interval": "300ms", "timeout": "2s"},
	} {
		stop := make(chan struct{})
		missing := make(chan string, 1)
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				for _, up := range []string{upA, upB} {
					if _, ok := seriesValue(t, c, healthySeries(up)); !ok {
						select {
						case missing <- up:
						default:
						}
					}
				}
			}
		})
		c.Load(t, config(health))
		for _, up := range []string{upA, upB} {
			if _, ok := seriesValue(t, c, healthySeries(up)); !ok {
				t.Errorf("%s has no series right after the reload", up)
			}
		}
		close(stop)
		wg.Wait()
		select {
		case up := <-missing:
			t.Fatalf("%s's series went missing during a reload", up)
		default:
		}
		// the old checkers stopped: one per server runs
		testutil.WaitFor(t, 5*time.Second, "two checkers running", func() bool { return checkerGoroutines() == before+2 })
	}
	chat()

	// without health_check: no series, no checkers, failover as before
	c.Load(t, config(nil))
	for _, up := range []string{upA, upB} {
		if _, ok := seriesValue(t, c, healthySeries(up)); ok {
			t.Errorf("%s still has a series without a health check", up)
		}
	}
	testutil.WaitFor(t, 5*time.Second, "the checkers stopped", func() bool { return checkerGoroutines() == before })
	if h := upstreamsHealth(t, c, servers); h != nil {
		t.Fatalf("health %+v without a health check", h)
	}
	a.down.Store(true)
	edgeA := a.connects(edgePort)
	chat()
	if got := a.connects(edgePort); got != edgeA+1 {
		t.Fatalf("without a health check A saw %d new CONNECTs to the edge, want 1 (tried first, failed)", got-edgeA)
	}
}

// TestHealthDirect: the direct dialer's health check connects to its
// destination as configured — [::1], which the handler's allowlist (only
// 127.0.0.1) refuses for clients — and reports it as "direct".
func TestHealthDirect(t *testing.T) {
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	var accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	defer ln.Close()
	edge := testutil.StartEcho(t)
	edgePort, _ := addrPort(t, edge.Addr)
	listen := testutil.FreeAddr(t)
	via := obj{"dialer": "direct", "health_check": obj{"destination": ln.Addr().String(), "interval": "100ms"}}
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": "127.0.0.1:" + edgePort, "via": via, "allow": []string{"127.0.0.1"}}),
	}, "", nil))
	waitHealthy(t, c, "direct", 1)
	if accepted.Load() == 0 {
		t.Fatal("the destination saw no check")
	}
	conn := dial(t, listen)
	exchange(t, conn, waHello())
	conn.Close()

	ln.Close() // the destination is gone
	waitHealthy(t, c, "direct", 0)
	h := upstreamsHealth(t, c, nil)
	if len(h) != 1 || h[0].Upstream != "direct" || h[0].Healthy || !strings.Contains(h[0].Error, "connection refused") {
		t.Fatalf("health %+v, want direct unhealthy, connection refused", h)
	}
	// the direct dialer has nothing to fail over to: it still dials
	conn = dial(t, listen)
	exchange(t, conn, waHello())

	// the same allowlist refuses [::1] as a handler's destination
	cfg := fmt.Sprintf(`{"admin":{"listen":%q,"config":{"persist":false}},"apps":{"layer4":{"servers":{"proxy":{"listen":[%q],"routes":[{"handle":[
		{"handler":"wa_proxy","destination":%q,"allow":["127.0.0.1"]}]}]}}}}}`, c.Admin, listen, ln.Addr().String())
	resp, err := http.Post("http://"+c.Admin+"/load", "application/json", strings.NewReader(cfg))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "is not in the allowlist") {
		t.Fatalf("POST /load with destination %s: %d %s, want 400, not in the allowlist", ln.Addr(), resp.StatusCode, body)
	}
}
