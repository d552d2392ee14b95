package upstreams

import (
	"cmp"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// unreachableFor is how long an address whose connect timed out goes after
// the others in Resolve's answer.
const unreachableFor = 5 * time.Minute

// unreachableMax bounds the table (WhatsApp has many media addresses).
const unreachableMax = 4096

// Addresses whose last connect timed out. A name with IPv6 and IPv4
// addresses on a host whose IPv6 route is a black hole would otherwise make
// every connection wait out the IPv6 address's share of connect_timeout (at
// least 2 s) before trying IPv4: the event loop tries a name's addresses
// one after the other, without Happy Eyeballs' race. With the table only
// the first connections after a time-out wait; the next ones try the other
// addresses first, and the address gets its turn again after
// unreachableFor or once a connect to it succeeds.
var unreachable = struct {
	mu    sync.Mutex
	since map[netip.AddrPort]time.Time
	n     atomic.Int32 // len(since), read without the lock
}{since: make(map[netip.AddrPort]time.Time)}

// NoteTimeout records that a connect to ap timed out.
func NoteTimeout(ap netip.AddrPort) {
	now := time.Now()
	unreachable.mu.Lock()
	defer unreachable.mu.Unlock()
	if len(unreachable.since) >= unreachableMax {
		for k, t := range unreachable.since {
			if now.Sub(t) >= unreachableFor {
				delete(unreachable.since, k)
			}
		}
		if len(unreachable.since) >= unreachableMax {
			return
		}
	}
	unreachable.since[ap] = now
	unreachable.n.Store(int32(len(unreachable.since)))
}

// NoteConnected records that a connect to ap succeeded.
func NoteConnected(ap netip.AddrPort) {
	if unreachable.n.Load() == 0 {
		return // the usual case: no lock
	}
	unreachable.mu.Lock()
	defer unreachable.mu.Unlock()
	if _, ok := unreachable.since[ap]; ok {
		delete(unreachable.since, ap)
		unreachable.n.Store(int32(len(unreachable.since)))
	}
}

// reachableFirst moves the addresses whose connect timed out within
// unreachableFor after the others, keeping each group's order.
func reachableFirst(addrs []netip.AddrPort) []netip.AddrPort {
	if unreachable.n.Load() == 0 || len(addrs) < 2 {
		return addrs
	}
	now := time.Now()
	unreachable.mu.Lock()
	defer unreachable.mu.Unlock()
	late := func(ap netip.AddrPort) bool { // unreachable.mu held
		t, ok := unreachable.since[ap]
		return ok && now.Sub(t) < unreachableFor
	}
	slices.SortStableFunc(addrs, func(a, b netip.AddrPort) int {
		la, lb := late(a), late(b)
		switch {
		case la == lb:
			return 0
		case lb:
			return -1
		default:
			return 1
		}
	})
	return addrs
}

// UnreachableAddress is an address Resolve puts last, as GET /waproxy/names
// shows it.
type UnreachableAddress struct {
	// Address is the address and port whose connect timed out.
	Address netip.AddrPort `json:"address"`
	// Since is when; it goes back to its place unreachableFor later.
	Since time.Time `json:"since"`
}

// UnreachableAddresses returns the addresses whose connect timed out within
// unreachableFor, oldest first.
func UnreachableAddresses() []UnreachableAddress {
	now := time.Now()
	unreachable.mu.Lock()
	out := make([]UnreachableAddress, 0, len(unreachable.since))
	for ap, t := range unreachable.since {
		if now.Sub(t) < unreachableFor {
			out = append(out, UnreachableAddress{Address: ap, Since: t})
		}
	}
	unreachable.mu.Unlock()
	slices.SortFunc(out, func(a, b UnreachableAddress) int {
		return cmp.Or(a.Since.Compare(b.Since), a.Address.Compare(b.Address))
	})
	return out
}
