package upstreams

import (
	"net/netip"
	"slices"
	"testing"
	"time"
)

// unreachableListed reports whether UnreachableAddresses (what GET
// /waproxy/names shows) lists ap.
func unreachableListed(ap netip.AddrPort) bool {
	return slices.ContainsFunc(UnreachableAddresses(), func(u UnreachableAddress) bool { return u.Address == ap })
}

// TestReachableFirst: an address whose connect timed out goes after the
// others until a connect to it succeeds or unreachableFor has passed; the
// order within each group stays the resolver's.
func TestReachableFirst(t *testing.T) {
	v6 := netip.MustParseAddrPort("[2001:db8::1]:5222")
	a := netip.MustParseAddrPort("192.0.2.1:5222")
	b := netip.MustParseAddrPort("192.0.2.2:5222")
	t.Cleanup(func() { NoteConnected(v6); NoteConnected(a); NoteConnected(b) })
	order := func() []netip.AddrPort { return reachableFirst([]netip.AddrPort{v6, a, b}) }

	if got := order(); !slices.Equal(got, []netip.AddrPort{v6, a, b}) {
		t.Fatalf("nothing noted: %v", got)
	}
	NoteTimeout(v6)
	if got := order(); !slices.Equal(got, []netip.AddrPort{a, b, v6}) {
		t.Fatalf("after a time-out of %v: %v", v6, got)
	}
	NoteTimeout(a)
	if got := order(); !slices.Equal(got, []netip.AddrPort{b, v6, a}) {
		t.Fatalf("after time-outs of %v and %v: %v", v6, a, got)
	}
	NoteConnected(v6)
	if got := order(); !slices.Equal(got, []netip.AddrPort{v6, b, a}) {
		t.Fatalf("after %v connected again: %v", v6, got)
	}
	// a time-out older than unreachableFor no longer counts
	unreachable.mu.Lock()
	unreachable.since[a] = time.Now().Add(-unreachableFor - time.Second)
	unreachable.mu.Unlock()
	if got := order(); !slices.Equal(got, []netip.AddrPort{v6, a, b}) || unreachableListed(a) {
		t.Fatalf("after %v's time-out expired: %v", a, got)
	}
}

// TestResolveUnreachableLast: Resolve of a name puts an address whose
// connect timed out after the others.
func TestResolveUnreachableLast(t *testing.T) {
	dns := startDNS(t, map[string][]netip.Addr{"order.test.": {netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")}})
	d := cachingDirect(t, dns, time.Minute)
	first := netip.MustParseAddrPort("127.0.0.2:5222")
	t.Cleanup(func() { NoteConnected(first) })
	if addrs, err := d.Resolve(ctxTODO, "tcp4", "order.test:5222"); err != nil || len(addrs) != 2 || addrs[0] != first {
		t.Fatalf("Resolve: %v, %v; want the resolver's order, %v first", addrs, err, first)
	}
	NoteTimeout(first)
	addrs, err := d.Resolve(ctxTODO, "tcp4", "order.test:5222")
	if err != nil || len(addrs) != 2 || addrs[0].String() != "127.0.0.3:5222" {
		t.Fatalf("Resolve: %v, %v; want 127.0.0.3 first, 127.0.0.2 having timed out", addrs, err)
	}
}
