package handlers

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// The limit tests share the package-level counters: they run one after the
// other (no t.Parallel) and each ends with every slot released, which
// requireNoLimitCounts checks.

func requireNoLimitCounts(t testing.TB) {
	t.Helper()
	if total, _, _, ips, listeners := limitCounts(netip.Addr{}, listenerKey{}); total != 0 || ips != 0 || listeners != 0 {
		t.Fatalf("counters not empty: total %d, %d IP entries, %d listener entries", total, ips, listeners)
	}
}

var (
	ipA  = netip.MustParseAddr("127.0.0.1")
	ipB  = netip.MustParseAddr("127.0.0.2")
	lis1 = listenerKey{addr: netip.MustParseAddrPort("127.0.0.1:5222")}
	lis2 = listenerKey{addr: netip.MustParseAddrPort("127.0.0.1:443")}
)

func mustAcquire(t *testing.T, ip netip.Addr, lis listenerKey, lim connLimits) *limitSlot {
	t.Helper()
	s, r := acquireSlot(ip, lis, lim)
	if r != refusedNone || s == nil {
		t.Fatalf("acquire %v on %v with %+v: refused (%d)", ip, lis, lim, r)
	}
	return s
}

func mustRefuse(t *testing.T, ip netip.Addr, lis listenerKey, lim connLimits, want limitRefusal) {
	t.Helper()
	total0, ip0, lis0, _, _ := limitCounts(ip, lis)
	s, r := acquireSlot(ip, lis, lim)
	if r != want || s != nil {
		t.Fatalf("acquire %v on %v with %+v: got slot %v refusal %d, want refusal %d", ip, lis, lim, s, r, want)
	}
	// a refusal leaves every count as it was
	if total, n, l, _, _ := limitCounts(ip, lis); total != total0 || n != ip0 || l != lis0 {
		t.Fatalf("refusal changed the counts: total %d→%d, ip %d→%d, listener %d→%d", total0, total, ip0, n, lis0, l)
	}
}

func TestLimitSlotRefcount(t *testing.T) {
	requireNoLimitCounts(t)
	lim := connLimits{total: 2}
	s1 := mustAcquire(t, ipA, lis1, lim)
	s2 := mustAcquire(t, ipB, lis2, lim)
	mustRefuse(t, ipA, lis1, lim, refusedTotal)

	// a second holder (a wa handler) keeps the slot after the first lets go
	s1.hold()
	s1.release()
	mustRefuse(t, ipA, lis1, lim, refusedTotal)
	if total, n, l, _, _ := limitCounts(ipA, lis1); total != 2 || n != 1 || l != 1 {
		t.Fatalf("counts with s1 held once: total %d, ip %d, listener %d; want 2 1 1", total, n, l)
	}
	s1.release() // the last reference frees the place
	s3 := mustAcquire(t, ipA, lis1, lim)

	s2.release()
	s3.release()
	requireNoLimitCounts(t) // the map entries are gone at zero
	defer func() {
		if recover() == nil {
			t.Error("releasing a free slot did not panic")
		}
	}()
	s := &limitSlot{}
	s.release()
}

func TestLimitPerIP(t *testing.T) {
	requireNoLimitCounts(t)
	lim := connLimits{perIP: 2}
	a1 := mustAcquire(t, ipA, lis1, lim)
	a2 := mustAcquire(t, ipA, lis2, lim) // per IP counts across listeners
	mustRefuse(t, ipA, lis1, lim, refusedIP)
	b1 := mustAcquire(t, ipB, lis1, lim)
	// IPv4-mapped IPv6 is the same client
	mapped := clientIP(&net.TCPAddr{IP: net.ParseIP("::ffff:127.0.0.1"), Port: 40000})
	if mapped != ipA {
		t.Fatalf("clientIP(::ffff:127.0.0.1) = %v, want %v", mapped, ipA)
	}
	mustRefuse(t, mapped, lis1, lim, refusedIP)
	// a limit of another handler does not stop what this one allows, but
	// the counts are shared
	a3 := mustAcquire(t, ipA, lis1, connLimits{perIP: 3})
	mustRefuse(t, ipA, lis1, connLimits{perIP: 3}, refusedIP)
	for _, s := range []*limitSlot{a1, a2, b1, a3} {
		s.release()
	}
	requireNoLimitCounts(t)

	// a client address that is not an IP has no per-IP count
	if ip := clientIP(&net.UnixAddr{Name: "/tmp/x.sock", Net: "unix"}); ip.IsValid() {
		t.Fatalf("clientIP(unix) = %v, want invalid", ip)
	}
	s := mustAcquire(t, netip.Addr{}, listenerOf(&net.UnixAddr{Name: "/tmp/x.sock", Net: "unix"}), connLimits{perIP: 1})
	s2 := mustAcquire(t, netip.Addr{}, listenerOf(&net.UnixAddr{Name: "/tmp/x.sock", Net: "unix"}), connLimits{perIP: 1})
	s.release()
	s2.release()
	requireNoLimitCounts(t)
}

func TestLimitPerListener(t *testing.T) {
	requireNoLimitCounts(t)
	lim := connLimits{perListener: 1, total: 3}
	s1 := mustAcquire(t, ipA, lis1, lim)
	mustRefuse(t, ipB, lis1, lim, refusedListener)
	s2 := mustAcquire(t, ipB, lis2, lim)
	if got := listenerOf(&net.TCPAddr{IP: net.ParseIP("::ffff:127.0.0.1"), Port: 5222}); got != lis1 {
		t.Fatalf("listenerOf(::ffff:127.0.0.1:5222) = %v, want %v", got, lis1)
	}
	s1.release()
	s3 := mustAcquire(t, ipB, lis1, lim)
	s2.release()
	s3.release()
	requireNoLimitCounts(t)
}

// TestLimitConcurrent: many goroutines racing for a small limit never get
// more places than the limit, and the counts end at zero.
func TestLimitConcurrent(t *testing.T) {
	requireNoLimitCounts(t)
	const limit = 5
	var live, peak, refused atomic.Int64
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ip := netip.AddrFrom4([4]byte{127, 0, 0, byte(1 + g%3)})
			for range 2000 {
				s, r := acquireSlot(ip, lis1, connLimits{total: limit, perIP: 3})
				if r != refusedNone {
					refused.Add(1)
					continue
				}
				n := live.Add(1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				s.hold()
				live.Add(-1)
				s.release()
				s.release()
			}
		}()
	}
	wg.Wait()
	if peak.Load() > limit {
		t.Errorf("%d slots held at once, limit %d", peak.Load(), limit)
	}
	requireNoLimitCounts(t)
}

// provisionLimit provisions a wa_limit handler from its JSON, as Caddy does.
func provisionLimit(t *testing.T, config string) (*HandleLimit, error) {
	t.Helper()
	h := new(HandleLimit)
	return h, provisionJSON(t, config, h)
}

func TestHandleLimitValidate(t *testing.T) {
	for _, tc := range []struct{ config, err string }{
		{`{"max_connections":27500}`, ""},
		{`{"max_connections_per_listener":10}`, ""},
		{`{"max_connections_per_ip":3}`, ""},
		{`{}`, "no limit set"},
		{`{"max_connections":0,"max_connections_per_ip":0}`, "no limit set"},
		{`{"max_connections":-1}`, "max_connections must not be negative: -1"},
		{`{"max_connections":5,"max_connections_per_listener":-2}`, "max_connections_per_listener must not be negative"},
		{`{"max_connections_per_ip":-3}`, "max_connections_per_ip must not be negative"},
	} {
		_, err := provisionLimit(t, tc.config)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.config, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want one containing %q", tc.config, err, tc.err)
		}
	}
}

func TestHandleLimitUnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		input string
		want  HandleLimit
		err   string
	}{
		{input: `wa_limit 27500`, want: HandleLimit{MaxConnections: 27500}},
		{input: "wa_limit {\n max_connections 100\n max_connections_per_listener 50\n max_connections_per_ip 4\n}",
			want: HandleLimit{MaxConnections: 100, MaxConnectionsPerListener: 50, MaxConnectionsPerIP: 4}},
		{input: "wa_limit 10 {\n max_connections_per_ip 2\n}", want: HandleLimit{MaxConnections: 10, MaxConnectionsPerIP: 2}},
		{input: `wa_limit`, err: "no limit set"},
		{input: "wa_limit {\n}", err: "no limit set"},
		{input: `wa_limit 0`, err: "max_connections: want a positive whole number"},
		{input: `wa_limit -5`, err: "max_connections: want a positive whole number"},
		{input: `wa_limit lots`, err: "got 'lots'"},
		{input: `wa_limit 99999999999`, err: "want a positive whole number"},
		{input: `wa_limit 1 2`, err: "wrong argument count"},
		{input: "wa_limit 10 {\n max_connections 20\n}", err: "duplicate subdirective 'max_connections'"},
		{input: "wa_limit {\n max_connections_per_ip 2\n max_connections_per_ip 3\n}", err: "duplicate subdirective 'max_connections_per_ip'"},
		{input: "wa_limit {\n max_connections_per_ip\n}", err: "wrong argument count"},
		{input: "wa_limit {\n max_connections_per_ip 2 3\n}", err: "wrong argument count"},
		{input: "wa_limit {\n max_connections_per_ip 1.5\n}", err: "max_connections_per_ip: want a positive whole number"},
		{input: "wa_limit {\n maxconn 2\n}", err: "unrecognized subdirective 'maxconn'"},
	} {
		var h HandleLimit
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v, want one containing %q", tc.input, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.input, err)
			continue
		}
		if h.MaxConnections != tc.want.MaxConnections || h.MaxConnectionsPerListener != tc.want.MaxConnectionsPerListener ||
			h.MaxConnectionsPerIP != tc.want.MaxConnectionsPerIP {
			t.Errorf("%q: got %+v, want %+v", tc.input, h, tc.want)
		}
	}
}

// limitPair returns both ends of a real loopback TCP connection: the
// server's side wrapped as caddy-l4 does, and the client's.
func limitPair(t testing.TB, ln net.Listener) (*layer4.Connection, net.Conn) {
	t.Helper()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return layer4.WrapConnection(server, nil, zap.NewNop()), client
}

func limitListen(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func limitErrors(kind string) float64 {
	return promtest.ToFloat64(metrics.Errors.WithLabelValues(kind))
}

// TestHandleLimitHandle drives the handler with real connections: within
// the limit next runs and the connection counts while next runs and while
// a wa handler holds it (the event loop relaying it after the handler
// returned); over the limit the connection is closed at once, counted,
// and next does not run.
func TestHandleLimitHandle(t *testing.T) {
	requireNoLimitCounts(t)
	h, err := provisionLimit(t, `{"max_connections":1}`)
	if err != nil {
		t.Fatal(err)
	}
	ln := limitListen(t)
	lk := listenerOf(ln.Addr())

	// the first connection goes through; a wa handler in the route holds it
	cx1, _ := limitPair(t, ln)
	var rc *registry.Conn
	err = h.Handle(cx1, layer4.HandlerFunc(func(cx *layer4.Connection) error {
		if total, n, _, _, _ := limitCounts(ipA, lk); total != 1 || n != 1 {
			t.Errorf("inside next: total %d, ip %d; want 1 1", total, n)
		}
		rc = registry.Open(&registry.Conn{Remote: cx.RemoteAddr().String()})
		holdLimit(cx, rc)
		return nil // the handler returned; the event loop owns the connection
	}))
	if err != nil {
		t.Fatal(err)
	}
	if total, n, l, _, _ := limitCounts(ipA, lk); total != 1 || n != 1 || l != 1 {
		t.Fatalf("after Handle returned with the connection held: total %d, ip %d, listener %d; want 1 1 1", total, n, l)
	}

	// the second is over the limit
	refused0 := limitErrors(metrics.KindMaxConnections)
	cx2, client2 := limitPair(t, ln)
	called := false
	if err := h.Handle(cx2, layer4.HandlerFunc(func(*layer4.Connection) error { called = true; return nil })); err != nil {
		t.Fatalf("a refusal returned %v, want nil", err)
	}
	if called {
		t.Fatal("next ran for a connection over the limit")
	}
	if got := limitErrors(metrics.KindMaxConnections) - refused0; got != 1 {
		t.Fatalf("errors_total{kind=max_connections} grew by %v, want 1", got)
	}
	_ = client2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := client2.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("refused client read %d, %v; want EOF", n, err)
	}

	// closing the held connection frees its place
	registry.Close(rc, nil)
	requireNoLimitCounts(t)
	cx3, _ := limitPair(t, ln)
	called = false
	_ = h.Handle(cx3, layer4.HandlerFunc(func(*layer4.Connection) error { called = true; return nil }))
	if !called {
		t.Fatal("next did not run after the held connection closed")
	}
	requireNoLimitCounts(t) // nothing held it beyond next
}

// TestHandleLimitReload: a connection let in by one config's handler and
// held by a wa handler still counts for the next config's handler, and is
// released once, into the same counters, when it closes.
func TestHandleLimitReload(t *testing.T) {
	requireNoLimitCounts(t)
	old, err := provisionLimit(t, `{"max_connections_per_ip":1}`)
	if err != nil {
		t.Fatal(err)
	}
	ln := limitListen(t)
	cx1, _ := limitPair(t, ln)
	var rc *registry.Conn
	_ = old.Handle(cx1, layer4.HandlerFunc(func(cx *layer4.Connection) error {
		rc = registry.Open(&registry.Conn{})
		holdLimit(cx, rc)
		return nil
	}))

	// the reload: a new handler with the same config
	cur, err := provisionLimit(t, `{"max_connections_per_ip":1}`)
	if err != nil {
		t.Fatal(err)
	}
	refused0 := limitErrors(metrics.KindMaxConnectionsPerIP)
	cx2, _ := limitPair(t, ln)
	called := false
	_ = cur.Handle(cx2, layer4.HandlerFunc(func(*layer4.Connection) error { called = true; return nil }))
	if called {
		t.Fatal("after a reload the new handler let in a second connection from the same IP")
	}
	if got := limitErrors(metrics.KindMaxConnectionsPerIP) - refused0; got != 1 {
		t.Fatalf("errors_total{kind=max_connections_per_ip} grew by %v, want 1", got)
	}
	registry.Close(rc, nil)
	registry.Close(rc, nil) // a second close releases nothing
	requireNoLimitCounts(t)
	cx3, _ := limitPair(t, ln)
	_ = cur.Handle(cx3, layer4.HandlerFunc(func(*layer4.Connection) error { called = true; return nil }))
	if !called {
		t.Fatal("the new handler refused a connection after the old one closed")
	}
	requireNoLimitCounts(t)
}

// TestHandleLimitLayouts: a second wa_limit on a connection checks the
// counts without counting it again; wa_limit in a route of its own lets
// go when it returns, and a wa handler taking the connection later counts
// it again until it closes.
func TestHandleLimitLayouts(t *testing.T) {
	requireNoLimitCounts(t)
	outer, err := provisionLimit(t, `{"max_connections":10}`)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := provisionLimit(t, `{"max_connections":1}`)
	if err != nil {
		t.Fatal(err)
	}
	ln := limitListen(t)

	t.Run("nested", func(t *testing.T) {
		cx, _ := limitPair(t, ln)
		ran := false
		_ = outer.Handle(cx, layer4.HandlerFunc(func(cx *layer4.Connection) error {
			return inner.Handle(cx, layer4.HandlerFunc(func(*layer4.Connection) error {
				ran = true
				if total, _, _, _, _ := limitCounts(ipA, lis1); total != 1 {
					t.Errorf("nested wa_limit counted the connection %d times", total)
				}
				return nil
			}))
		}))
		if !ran {
			t.Fatal("the inner wa_limit refused the only connection")
		}
		requireNoLimitCounts(t)

		// with another connection live, the inner limit of 1 is reached
		other := mustAcquire(t, ipB, lis2, connLimits{})
		defer other.release()
		cx2, _ := limitPair(t, ln)
		ran = false
		_ = outer.Handle(cx2, layer4.HandlerFunc(func(cx *layer4.Connection) error {
			return inner.Handle(cx, layer4.HandlerFunc(func(*layer4.Connection) error { ran = true; return nil }))
		}))
		if ran {
			t.Fatal("the inner wa_limit let in a connection over its limit")
		}
	})
	requireNoLimitCounts(t)

	t.Run("own route", func(t *testing.T) {
		cx, _ := limitPair(t, ln)
		_ = outer.Handle(cx, layer4.HandlerFunc(func(*layer4.Connection) error { return nil }))
		requireNoLimitCounts(t) // wa_limit returned: nothing holds it
		rc := registry.Open(&registry.Conn{})
		holdLimit(cx, rc) // a later route's wa handler takes it
		if total, n, _, _, _ := limitCounts(ipA, listenerOf(ln.Addr())); total != 1 || n != 1 {
			t.Fatalf("held by a wa handler: total %d, ip %d; want 1 1", total, n)
		}
		registry.Close(rc, nil)
		requireNoLimitCounts(t)
	})

	t.Run("no wa_limit", func(t *testing.T) {
		cx, _ := limitPair(t, ln)
		rc := registry.Open(&registry.Conn{})
		holdLimit(cx, rc)
		requireNoLimitCounts(t)
		registry.Close(rc, nil)
	})
}

// BenchmarkHandleLimit: letting a connection in and out, with every
// dimension counted.
func BenchmarkHandleLimit(b *testing.B) {
	h := &HandleLimit{MaxConnections: 1 << 20, MaxConnectionsPerListener: 1 << 20, MaxConnectionsPerIP: 1 << 20, logger: zap.NewNop()}
	h.lim = connLimits{total: 1 << 20, perListener: 1 << 20, perIP: 1 << 20}
	cx, _ := limitPair(b, limitListen(b))
	next := layer4.HandlerFunc(func(*layer4.Connection) error { return nil })
	b.ReportAllocs()
	for b.Loop() {
		if err := h.Handle(cx, next); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLimitSlotParallel: acquire and release from many clients at once.
func BenchmarkLimitSlotParallel(b *testing.B) {
	lim := connLimits{total: 1 << 20, perListener: 1 << 20, perIP: 1 << 20}
	var n atomic.Uint32
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := n.Add(1)
		ip := netip.AddrFrom4([4]byte{127, byte(i >> 16), byte(i >> 8), byte(i)})
		for pb.Next() {
			s, r := acquireSlot(ip, lis1, lim)
			if r != refusedNone {
				b.Fatal("refused")
			}
			s.release()
		}
	})
}
