package upstreams

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// dnsServer is a DNS server on a loopback UDP port: it answers A and AAAA
// queries from a table, counts them, and can be told to fail (SERVFAIL) or
// to answer late.
type dnsServer struct {
	addr    string
	queries atomic.Int64
	mu      sync.Mutex
	table   map[string][]netip.Addr // fully qualified name ("chat.test.") → addresses
	fail    bool
	delay   time.Duration
}

func startDNS(t *testing.T, table map[string][]netip.Addr) *dnsServer {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &dnsServer{addr: pc.LocalAddr().String(), table: table}
	var wg sync.WaitGroup
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var q dnsmessage.Message
			if err := q.Unpack(buf[:n]); err != nil || len(q.Questions) != 1 {
				continue
			}
			s.queries.Add(1)
			s.mu.Lock()
			fail, delay, addrs := s.fail, s.delay, s.table[q.Questions[0].Name.String()]
			s.mu.Unlock()
			reply := dnsmessage.Message{
				Header:    dnsmessage.Header{ID: q.ID, Response: true, Authoritative: true, RCode: dnsmessage.RCodeSuccess},
				Questions: q.Questions,
			}
			switch {
			case fail:
				reply.RCode = dnsmessage.RCodeServerFailure
			case addrs == nil:
				reply.RCode = dnsmessage.RCodeNameError
			}
			qq := q.Questions[0]
			for _, a := range addrs {
				h := dnsmessage.ResourceHeader{Name: qq.Name, Class: dnsmessage.ClassINET, TTL: 60}
				switch {
				case qq.Type == dnsmessage.TypeA && a.Is4():
					h.Type = dnsmessage.TypeA
					reply.Answers = append(reply.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AResource{A: a.As4()}})
				case qq.Type == dnsmessage.TypeAAAA && a.Is6():
					h.Type = dnsmessage.TypeAAAA
					reply.Answers = append(reply.Answers, dnsmessage.Resource{Header: h, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}})
				}
			}
			out, err := reply.Pack()
			if err != nil {
				continue
			}
			if delay > 0 {
				wg.Go(func() {
					time.Sleep(delay)
					_, _ = pc.WriteTo(out, from)
				})
				continue
			}
			_, _ = pc.WriteTo(out, from)
		}
	})
	return s
}

func (s *dnsServer) set(f func(s *dnsServer)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

// resolver is a Go resolver that asks s (and only s).
func (s *dnsServer) resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", s.addr)
	}}
}

// cachingDirect is a provisioned direct dialer resolving with s.
func cachingDirect(t *testing.T, s *dnsServer, cache time.Duration) *Direct {
	t.Helper()
	d := &Direct{ResolveCache: caddy.Duration(cache), resolver: s.resolver()}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := d.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	return d
}

var (
	chatAddrs = []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	ctxTODO   = context.Background()
)

// TestResolveCache: a name is looked up once for all the connections
// within resolve_cache; after it, the old answer serves at once while one
// lookup in the background refreshes it.
func TestResolveCache(t *testing.T) {
	dns := startDNS(t, map[string][]netip.Addr{"chat.test.": chatAddrs})
	d := cachingDirect(t, dns, 300*time.Millisecond)
	for range 20 {
		addrs, err := d.Resolve(ctxTODO, "tcp4", "chat.test:5222")
		if err != nil || len(addrs) != 1 || addrs[0].String() != "127.0.0.1:5222" {
			t.Fatalf("Resolve: %v, %v", addrs, err)
		}
	}
	if n := dns.queries.Load(); n != 1 {
		t.Fatalf("%d queries for 20 resolves within resolve_cache, want 1", n)
	}
	// the answer changes; after resolve_cache the old one still serves
	// (no wait), and the refresh brings the new one
	dns.set(func(s *dnsServer) { s.table["chat.test."] = []netip.Addr{netip.MustParseAddr("127.0.0.2")} })
	time.Sleep(350 * time.Millisecond)
	if addrs, err := d.Resolve(ctxTODO, "tcp4", "chat.test:5222"); err != nil || addrs[0].Addr().String() != "127.0.0.1" {
		t.Fatalf("after resolve_cache: %v, %v; want the old answer while the refresh runs", addrs, err)
	}
	testutil.WaitFor(t, 5*time.Second, "the refresh to bring the new address", func() bool {
		addrs, err := d.Resolve(ctxTODO, "tcp4", "chat.test:5222")
		return err == nil && addrs[0].Addr().String() == "127.0.0.2"
	})
	if n := dns.queries.Load(); n != 2 {
		t.Fatalf("%d queries, want 2 (one refresh)", n)
	}
}

// TestResolveCacheShared: connections that ask for a name nobody resolved
// yet, all at once, share one lookup.
func TestResolveCacheShared(t *testing.T) {
	dns := startDNS(t, map[string][]netip.Addr{"shared.test.": chatAddrs})
	dns.set(func(s *dnsServer) { s.delay = 200 * time.Millisecond })
	d := cachingDirect(t, dns, time.Minute)
	var wg sync.WaitGroup
	errs := make(chan error, 30)
	for range 30 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctxTODO, 5*time.Second)
			defer cancel()
			if _, err := d.Resolve(ctx, "tcp4", "shared.test:443"); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := dns.queries.Load(); n != 1 {
		t.Fatalf("%d queries for 30 simultaneous resolves, want 1", n)
	}
}

// TestResolveCacheOutage: when the resolver fails, a name that resolved
// before keeps its addresses; one that never did gets the failure.
func TestResolveCacheOutage(t *testing.T) {
	dns := startDNS(t, map[string][]netip.Addr{"up.test.": chatAddrs, "new.test.": chatAddrs})
	d := cachingDirect(t, dns, 100*time.Millisecond)
	core, logs := observer.New(zap.InfoLevel)
	names.logger.Store(zap.New(core))
	if _, err := d.Resolve(ctxTODO, "tcp4", "up.test:5222"); err != nil {
		t.Fatal(err)
	}
	dns.set(func(s *dnsServer) { s.fail = true })
	time.Sleep(150 * time.Millisecond)
	resolveUp := func(what string) {
		t.Helper()
		addrs, err := d.Resolve(ctxTODO, "tcp4", "up.test:5222")
		if err != nil || len(addrs) != 1 || addrs[0].Addr() != chatAddrs[0] {
			t.Fatalf("%s: %v, %v; want the last good answer", what, addrs, err)
		}
	}
	resolveUp("expired, the resolver failing") // starts a refresh, which fails
	refreshDone := func() bool {
		names.mu.Lock()
		defer names.mu.Unlock()
		e := names.entries[resolveKey{d.resolver, "ip4", "up.test"}]
		return e != nil && e.flight == nil && !e.retryAt.IsZero()
	}
	testutil.WaitFor(t, 5*time.Second, "the refresh to fail", refreshDone)
	queries := dns.queries.Load()
	if queries < 2 {
		t.Fatalf("%d queries: the expired answer was never refreshed", queries)
	}
	for range 3 { // within refreshRetry of the failure: no new query
		resolveUp("during the outage")
		time.Sleep(20 * time.Millisecond)
	}
	testutil.WaitFor(t, 5*time.Second, "no refresh in flight", refreshDone)
	if n := dns.queries.Load(); n != queries {
		t.Fatalf("%d queries after the failed refresh, want none before refreshRetry (%v)", n-queries, refreshRetry)
	}
	if warns := logs.FilterMessage("resolve failed; connecting to the addresses resolved before").FilterField(zap.String("host", "up.test")).Len(); warns != 1 {
		t.Fatalf("%d warnings for the failed refresh, want 1", warns)
	}

	_, err := d.Resolve(ctxTODO, "tcp4", "new.test:5222")
	var de *DialError
	if !errors.As(err, &de) || !strings.HasPrefix(err.Error(), "dial new.test:5222: ") {
		t.Fatalf("a name never resolved, during the outage: %v; want a DialError naming it", err)
	}

	// more failed refreshes: no more warnings; then the resolver is back
	names.mu.Lock()
	refreshRetry = 0
	names.entries[resolveKey{d.resolver, "ip4", "up.test"}].retryAt = time.Now()
	names.mu.Unlock()
	t.Cleanup(func() {
		names.mu.Lock()
		refreshRetry = 5 * time.Second
		names.mu.Unlock()
	})
	for range 2 {
		before := dns.queries.Load()
		resolveUp("the resolver still failing")
		testutil.WaitFor(t, 5*time.Second, "another failed refresh", func() bool { return dns.queries.Load() > before && refreshDone() })
		time.Sleep(time.Millisecond) // past retryAt (now + 0)
	}
	if warns := logs.FilterMessage("resolve failed; connecting to the addresses resolved before").Len(); warns != 1 {
		t.Fatalf("%d warnings after three failed refreshes, want 1 (one per outage)", warns)
	}
	dns.set(func(s *dnsServer) {
		s.fail = false
		s.table["up.test."] = []netip.Addr{netip.MustParseAddr("127.0.0.9")}
	})
	testutil.WaitFor(t, 5*time.Second, "the refresh after the outage to bring the new address", func() bool {
		addrs, err := d.Resolve(ctxTODO, "tcp4", "up.test:5222")
		return err == nil && addrs[0].Addr().String() == "127.0.0.9"
	})
	testutil.WaitFor(t, 5*time.Second, "the recovery logged", func() bool {
		return logs.FilterMessage("resolve works again").FilterField(zap.String("host", "up.test")).Len() == 1
	})
}

// TestResolveCacheOff: resolve_cache off looks the name up every time.
func TestResolveCacheOff(t *testing.T) {
	dns := startDNS(t, map[string][]netip.Addr{"off.test.": chatAddrs})
	d := cachingDirect(t, dns, -1)
	for range 3 {
		if _, err := d.Resolve(ctxTODO, "tcp4", "off.test:5222"); err != nil {
			t.Fatal(err)
		}
	}
	if n := dns.queries.Load(); n != 3 {
		t.Fatalf("%d queries for 3 resolves with the cache off, want 3", n)
	}
}

// TestDirectDialCachedName: DialContext to a name uses the cache too (the
// path of TLS-terminated clients and wa_http) and connects to its address.
func TestDirectDialCachedName(t *testing.T) {
	echo := testutil.StartEcho(t)
	port := strconv.Itoa(int(netip.MustParseAddrPort(echo.Addr).Port()))
	dns := startDNS(t, map[string][]netip.Addr{"edge.test.": chatAddrs})
	d := cachingDirect(t, dns, time.Minute)
	for range 3 {
		c, err := d.DialContext(ctxTODO, "tcp", net.JoinHostPort("edge.test", port))
		if err != nil {
			t.Fatal(err)
		}
		if got := c.RemoteAddr().String(); got != echo.Addr {
			t.Fatalf("connected to %s, want %s", got, echo.Addr)
		}
		c.Close()
	}
	if n := dns.queries.Load(); n != 2 { // "tcp": one A and one AAAA query, once
		t.Fatalf("%d queries for 3 dials, want 2 (one A and one AAAA lookup)", n)
	}
	// a refused address is reported as DialContext always did
	_, err := d.DialContext(ctxTODO, "tcp", net.JoinHostPort("edge.test", strconv.Itoa(testutil.FreePort(t))))
	if err == nil || !strings.HasPrefix(err.Error(), "dial edge.test:") || !strings.HasSuffix(err.Error(), "connect: connection refused") {
		t.Fatalf("dial of a closed port: %v", err)
	}
}

// TestResolveCacheBounded: the cache keeps what clients cannot grow
// without bound: a name whose lookup failed is not kept, and past
// resolveCacheMax names a new one is resolved for its connection alone.
func TestResolveCacheBounded(t *testing.T) {
	table := map[string][]netip.Addr{}
	for i := range 5 {
		table[fmt.Sprintf("kept%d.test.", i)] = chatAddrs
	}
	dns := startDNS(t, table)
	d := cachingDirect(t, dns, time.Hour)
	kept := func() int {
		names.mu.Lock()
		defer names.mu.Unlock()
		n := 0
		for k := range names.entries {
			if k.resolver == d.resolver {
				n++
			}
		}
		return n
	}
	for i := range 20 { // names that do not exist, as a client may ask for
		if _, err := d.Resolve(ctxTODO, "tcp4", fmt.Sprintf("nx%d.test:443", i)); err == nil {
			t.Fatalf("nx%d.test resolved", i)
		}
	}
	if n := kept(); n != 0 {
		t.Fatalf("%d names kept after 20 failed lookups, want 0", n)
	}

	names.mu.Lock()
	saved := resolveCacheMax
	resolveCacheMax = len(names.entries) + 2 // room for two more
	names.mu.Unlock()
	t.Cleanup(func() {
		names.mu.Lock()
		resolveCacheMax = saved
		names.mu.Unlock()
	})
	resolveAll := func() {
		for i := range 5 {
			if _, err := d.Resolve(ctxTODO, "tcp4", fmt.Sprintf("kept%d.test:443", i)); err != nil {
				t.Fatalf("kept%d.test: %v", i, err)
			}
		}
	}
	resolveAll()
	if n := kept(); n != 2 {
		t.Fatalf("%d names kept with room for 2, want 2", n)
	}
	before := dns.queries.Load()
	resolveAll()
	if n := dns.queries.Load() - before; n != 3 {
		t.Fatalf("%d queries for the second round of 5 names, 2 of them kept; want 3", n)
	}
}

// TestResolveCacheWaiterNotBoundToLeader: a connection that joins another
// connection's lookup of a new name does not fail because that other
// connection's context ended (its shorter connect_timeout, or a cancel):
// the waiter still has time, and the answer comes within it.
func TestResolveCacheWaiterNotBoundToLeader(t *testing.T) {
	dns := startDNS(t, map[string][]netip.Addr{"slowleader.test.": chatAddrs})
	dns.set(func(s *dnsServer) { s.delay = time.Second })
	d := cachingDirect(t, dns, time.Minute)

	// the first caller: a connection with little time left
	leaderCtx, leaderCancel := context.WithTimeout(ctxTODO, 100*time.Millisecond)
	defer leaderCancel()
	leaderDone := make(chan error, 1)
	go func() {
		_, err := d.Resolve(leaderCtx, "tcp4", "slowleader.test:443")
		leaderDone <- err
	}()
	testutil.WaitFor(t, 5*time.Second, "the first caller's lookup in flight", func() bool {
		names.mu.Lock()
		defer names.mu.Unlock()
		e := names.entries[resolveKey{d.resolver, "ip4", "slowleader.test"}]
		return e != nil && e.flight != nil
	})

	// the waiter: plenty of time (the answer comes after 1 s)
	ctx, cancel := context.WithTimeout(ctxTODO, 5*time.Second)
	defer cancel()
	addrs, err := d.Resolve(ctx, "tcp4", "slowleader.test:443")
	if lerr := <-leaderDone; !errors.Is(lerr, context.DeadlineExceeded) {
		t.Errorf("the first caller, whose context ended before the answer: %v, want its deadline", lerr)
	}
	if err != nil {
		t.Fatalf("a waiter with 5 s left failed when the first caller's 100 ms ran out: %v", err)
	}
	if len(addrs) != 1 || addrs[0].Addr() != chatAddrs[0] {
		t.Fatalf("addrs %v, want %v", addrs, chatAddrs[:1])
	}
	if n := dns.queries.Load(); n != 1 {
		t.Errorf("%d lookups, want the one both callers shared", n)
	}
}

// TestResolveCacheNameCase: names are case-insensitive (the allowlist
// matches "G.WhatsApp.NET" as g.whatsapp.net), so the cache keeps one entry
// and makes one lookup per name however clients spell it.
func TestResolveCacheNameCase(t *testing.T) {
	addrs := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	dns := startDNS(t, map[string][]netip.Addr{
		"case.test.": addrs, "CASE.test.": addrs, "Case.Test.": addrs,
	})
	d := cachingDirect(t, dns, time.Minute)
	for _, host := range []string{"case.test", "CASE.test", "Case.Test"} {
		if _, err := d.Resolve(ctxTODO, "tcp4", host+":443"); err != nil {
			t.Fatalf("%s: %v", host, err)
		}
	}
	if n := dns.queries.Load(); n != 1 {
		t.Fatalf("%d lookups for one name spelt 3 ways, want 1", n)
	}
	var hosts []string
	for _, n := range Names() {
		if strings.EqualFold(n.Host, "case.test") {
			hosts = append(hosts, n.Host)
		}
	}
	if len(hosts) != 1 || hosts[0] != "case.test" {
		t.Fatalf("names in the cache %q, want one, lower case", hosts)
	}
}
