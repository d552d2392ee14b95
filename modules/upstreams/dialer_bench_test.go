package upstreams

import (
	"context"
	"io"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// The dialers' cost per connection: benchmarks (B/op, allocs/op per dial)
// and pinned upper bounds on the allocations of one dial. The pins count
// the whole process's allocations, so the peers they dial must not allocate
// in it: the destination is a listener that does not accept while the dials
// are counted (the kernel completes the handshakes into its backlog), and
// the SOCKS5 server is microsocks, a separate process. The benchmarks in
// direct_dialer_test.go and socks5_dialer_test.go measure dial + one round
// trip against in-process peers; these measure the dial alone.

// Upper bounds on the allocations of one dial with a context carrying a
// deadline and the handler's allowlist, as wa_proxy dials. Measured with Go
// 1.26 on linux/amd64: direct 18, direct with an allowlist 24 (the checked
// copy of the net.Dialer and its control function), SOCKS5 22.1 with or
// without username/password (its request/reply buffer included; the
// connection to the SOCKS5 server is not checked against the allowlist).
// Each bound is the measured count plus one: a new allocation per dial fails.
const (
	maxDirectDialAllocs     = 19
	maxDirectAllowAllocs    = 25
	maxSOCKS5DialAllocs     = 23
	maxSOCKS5AuthDialAllocs = 23
	// Resolve of an IP address (what wa_proxy's event loop connects to):
	// the returned slice, with or without an allowlist. Of a name in the
	// resolve cache: the same (the cache hands out its slice as it is).
	maxResolveAllocs = 1
)

// backlogListener is a loopback listener that does not accept until drain:
// connections to it complete in the kernel, and nothing in this process
// allocates for them.
func backlogListener(tb testing.TB) (addr string, drain func()) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	drain = func() {
		// Accept what queued and close it, so the backlog never fills.
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(50 * time.Millisecond))
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}
	tb.Cleanup(func() { ln.Close() })
	return ln.Addr().String(), drain
}

// dialAllowCtx is the context wa_proxy dials with: a connect deadline and
// its allowlist.
func dialAllowCtx(tb testing.TB, allow ...string) (context.Context, context.CancelFunc) {
	tb.Helper()
	a, err := NewAllowlist(allow)
	if err != nil {
		tb.Fatal(err)
	}
	return context.WithTimeout(WithAllowlist(context.Background(), a), 10*time.Second)
}

// allocsPerDial dials address n times with d and returns the process's
// allocations per dial (closing the connections is counted too: it is part
// of a connection's cost). A failed dial fails the test.
func allocsPerDial(tb testing.TB, d Dialer, ctx context.Context, address string, n int, drain func()) float64 {
	tb.Helper()
	conns := make([]net.Conn, 0, n)
	dial := func() {
		c, err := d.DialContext(ctx, "tcp", address)
		if err != nil {
			tb.Fatalf("dial %s: %v", address, err)
		}
		conns = append(conns, c)
	}
	for range 3 { // warm up: resolver state, the dialer's first use
		dial()
	}
	for _, c := range conns {
		c.Close()
	}
	conns = conns[:0]
	drain()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for range n {
		dial()
	}
	for _, c := range conns {
		c.Close()
	}
	runtime.ReadMemStats(&m1)
	drain()
	return float64(m1.Mallocs-m0.Mallocs) / float64(n)
}

func checkAllocs(t *testing.T, what string, got float64, limit int) {
	t.Helper()
	t.Logf("%s: %.1f allocations per dial (at most %d)", what, got, limit)
	if testutil.RaceEnabled {
		t.Log("race detector on: not checked")
		return
	}
	if got > float64(limit) {
		t.Errorf("%s: %.1f allocations per dial, want at most %d", what, got, limit)
	}
}

func TestDirectDialAllocs(t *testing.T) {
	addr, drain := backlogListener(t)
	d := provisionDialer(t, new(Direct))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	checkAllocs(t, "direct", allocsPerDial(t, d, ctx, addr, 50, drain), maxDirectDialAllocs)

	actx, cancel := dialAllowCtx(t, "127.0.0.1")
	defer cancel()
	checkAllocs(t, "direct, allowlist in the context", allocsPerDial(t, d, actx, addr, 50, drain), maxDirectAllowAllocs)
}

// TestDirectResolveAllocs pins Resolve for an IP address, the event loop's
// connect's only dialer call.
func TestDirectResolveAllocs(t *testing.T) {
	d := provisionDialer(t, new(Direct))
	actx, cancel := dialAllowCtx(t, "127.0.0.1")
	defer cancel()
	for _, tc := range []struct {
		what string
		ctx  context.Context
	}{{"resolve", context.Background()}, {"resolve, allowlist in the context", actx}} {
		got := testing.AllocsPerRun(200, func() {
			if addrs, err := d.Resolve(tc.ctx, "tcp", "127.0.0.1:5222"); err != nil || len(addrs) != 1 {
				t.Fatalf("resolve: %v, %v", addrs, err)
			}
		})
		t.Logf("%s: %.1f allocations per call (at most %d)", tc.what, got, maxResolveAllocs)
		if !testutil.RaceEnabled && got > maxResolveAllocs {
			t.Errorf("%s: %.1f allocations per call, want at most %d", tc.what, got, maxResolveAllocs)
		}
	}

	dns := startDNS(t, map[string][]netip.Addr{"allocs.test.": {netip.MustParseAddr("127.0.0.1")}})
	cached := cachingDirect(t, dns, time.Hour)
	got := testing.AllocsPerRun(200, func() {
		if addrs, err := cached.Resolve(context.Background(), "tcp4", "allocs.test:5222"); err != nil || len(addrs) != 1 {
			t.Fatalf("resolve: %v, %v", addrs, err)
		}
	})
	t.Logf("resolve of a cached name: %.1f allocations per call (at most %d)", got, maxResolveAllocs)
	if !testutil.RaceEnabled && got > maxResolveAllocs {
		t.Errorf("resolve of a cached name: %.1f allocations per call, want at most %d", got, maxResolveAllocs)
	}
}

// TestSOCKS5DialAllocs pins a SOCKS5 dial's allocations against microsocks
// (skipped without it, a failure with WAPROXY_INTEROP=1 as in CI). The dial
// is complete: greeting, (authentication,) CONNECT and its reply.
func TestSOCKS5DialAllocs(t *testing.T) {
	testutil.RequireBinary(t, "microsocks", "microsocks")
	addr, drain := backlogListener(t)
	ctx, cancel := dialAllowCtx(t, "127.0.0.1")
	defer cancel()

	open := newSOCKS5Dialer(t, "", "", testutil.StartMicrosocks(t, "", ""))
	checkAllocs(t, "socks5", allocsPerDial(t, open, ctx, addr, 50, drain), maxSOCKS5DialAllocs)

	authed := newSOCKS5Dialer(t, "user", "pass", testutil.StartMicrosocks(t, "user", "pass"))
	checkAllocs(t, "socks5, username/password", allocsPerDial(t, authed, ctx, addr, 50, drain), maxSOCKS5AuthDialAllocs)
}

// benchmarkDial measures d's dial to address alone (connect, handshake,
// close); the destination's accepts happen outside the timed part.
func benchmarkDial(b *testing.B, d Dialer, address string, drain func()) {
	ctx, cancel := dialAllowCtx(b, "127.0.0.1")
	defer cancel()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		c, err := d.DialContext(ctx, "tcp", address)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
		if i++; i%256 == 0 { // keep the backlog from filling
			b.StopTimer()
			drain()
			b.StartTimer()
		}
	}
	b.StopTimer()
	drain()
}

// BenchmarkDial measures one dial per op: direct, and SOCKS5 through
// microsocks (a separate process) and through caddy-l4's socks5 handler
// (in this process: its server-side allocations count too).
func BenchmarkDial(b *testing.B) {
	addr, drain := backlogListener(b)
	b.Run("direct", func(b *testing.B) {
		benchmarkDial(b, provisionDialer(b, new(Direct)), addr, drain)
	})
	b.Run("socks5_microsocks", func(b *testing.B) {
		testutil.RequireBinary(b, "microsocks", "microsocks")
		benchmarkDial(b, newSOCKS5Dialer(b, "", "", testutil.StartMicrosocks(b, "", "")), addr, drain)
	})
	b.Run("socks5_caddy_l4", func(b *testing.B) {
		open, _ := startCaddySOCKS5(b)
		benchmarkDial(b, newSOCKS5Dialer(b, "", "", open), addr, drain)
	})
}

// BenchmarkDialRoundTrip is a dial through microsocks plus one round trip
// with an echo server: the connection is really through.
func BenchmarkDialRoundTrip(b *testing.B) {
	testutil.RequireBinary(b, "microsocks", "microsocks")
	echo := testutil.StartEcho(b)
	benchmarkDialEcho(b, newSOCKS5Dialer(b, "", "", testutil.StartMicrosocks(b, "", "")), echo.Addr)
}

// benchmarkDialEcho dials addr (an echo server) through d once per
// iteration and makes one round trip on each connection, so every dial is
// really through.
func benchmarkDialEcho(b *testing.B, d Dialer, addr string) {
	b.Helper()
	msg, buf := []byte("ping"), make([]byte, 4)
	b.ReportAllocs()
	for b.Loop() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := d.DialContext(ctx, "tcp", addr)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
