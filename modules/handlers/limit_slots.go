package handlers

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/mholt/caddy-l4/layer4"

	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// The live-connection counters of wa_limit. They are package-level state,
// so they outlive config reloads: a connection counted under one config is
// released into the same counters when it closes under the next one.
//
// A connection that a wa_limit handler lets in gets a limitSlot: it counts
// once in the process-wide total, once for its listener (local address)
// and once for its client IP, whatever limits the handler sets, so every
// wa_limit instance sees the same numbers. The slot is reference-counted:
// the wa_limit handler holds a reference while the rest of its route runs,
// and a wa_proxy / wa_http handler that takes the connection holds another
// (holdLimit) until the connection is closed, which may be long after the
// handler returned when the event loop relays it. The counts drop when the
// last reference goes.

const (
	// limitVar is the connection variable that carries the slot of the
	// wa_limit handler that let the connection in.
	limitVar = "wa.limit.slot"

	ipShards       = 64 // per-IP counters: many keys, spread the locks
	listenerShards = 8  // per-listener counters: few keys
)

// limitSlot is one connection's place in the counters.
type limitSlot struct {
	refs atomic.Int32
	ip   netip.Addr // invalid when the client address is not an IP address
	lis  listenerKey
}

// listenerKey identifies the local address a client connected to: an
// IP:port, or the address's text for other networks (unix sockets).
type listenerKey struct {
	addr netip.AddrPort
	name string
}

// varsKey is layer4.VarsCtxKey boxed once: cx.GetVar and cx.SetVar box
// it on every call, an allocation each.
var varsKey any = layer4.VarsCtxKey

// connVars returns cx's variable table (what cx.GetVar and cx.SetVar
// use), or nil.
func connVars(cx *layer4.Connection) map[string]any {
	m, _ := cx.Context.Value(varsKey).(map[string]any)
	return m
}

// releasedSlot marks a connection whose wa_limit handler has returned
// while the connection went on to other routes (wa_limit in a route of its
// own): a wa handler that takes it later counts it again (holdLimit).
var releasedSlot = new(limitSlot)

// counterShard is a mutex-protected map of live counts. Entries are deleted
// when they reach zero, so the maps hold only keys with live connections.
type counterShard[K comparable] struct {
	mu sync.Mutex
	n  map[K]int32
	_  [40]byte // keep shards on separate cache lines
}

// inc adds one to k's count unless limit > 0 and the count is already limit;
// it reports whether it did.
func (sh *counterShard[K]) inc(k K, limit int32) bool {
	sh.mu.Lock()
	n := sh.n[k]
	if limit > 0 && n >= limit {
		sh.mu.Unlock()
		return false
	}
	sh.n[k] = n + 1
	sh.mu.Unlock()
	return true
}

// dec takes one from k's count, deleting the entry at zero.
func (sh *counterShard[K]) dec(k K) {
	sh.mu.Lock()
	if n := sh.n[k] - 1; n > 0 {
		sh.n[k] = n
	} else {
		delete(sh.n, k)
	}
	sh.mu.Unlock()
}

// get returns k's count.
func (sh *counterShard[K]) get(k K) int32 {
	sh.mu.Lock()
	n := sh.n[k]
	sh.mu.Unlock()
	return n
}

// len returns how many keys have live connections.
func (sh *counterShard[K]) len() int {
	sh.mu.Lock()
	n := len(sh.n)
	sh.mu.Unlock()
	return n
}

var counters = func() *struct {
	total     atomic.Int64
	ips       [ipShards]counterShard[netip.Addr]
	listeners [listenerShards]counterShard[listenerKey]
} {
	c := new(struct {
		total     atomic.Int64
		ips       [ipShards]counterShard[netip.Addr]
		listeners [listenerShards]counterShard[listenerKey]
	})
	for i := range c.ips {
		c.ips[i].n = make(map[netip.Addr]int32)
	}
	for i := range c.listeners {
		c.listeners[i].n = make(map[listenerKey]int32)
	}
	return c
}()

var slotPool = sync.Pool{New: func() any { return new(limitSlot) }}

// mix spreads a 16-byte address (and a port) over a shard index.
func mix(a [16]byte, port uint16) uint64 {
	h := binary.LittleEndian.Uint64(a[:8]) ^ binary.LittleEndian.Uint64(a[8:])*0x9E3779B97F4A7C15 ^ uint64(port)
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return h
}

func ipShard(ip netip.Addr) *counterShard[netip.Addr] {
	return &counters.ips[mix(ip.As16(), 0)%ipShards]
}

func listenerShard(k listenerKey) *counterShard[listenerKey] {
	if !k.addr.IsValid() {
		return &counters.listeners[0]
	}
	return &counters.listeners[mix(k.addr.Addr().As16(), k.addr.Port())%listenerShards]
}

// clientIP returns the IP address of a client address, IPv4-mapped IPv6
// addresses as IPv4 and without a zone; an invalid Addr when addr is not
// an IP address.
func clientIP(addr net.Addr) netip.Addr {
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	case *net.UDPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	case *net.IPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		if addr == nil {
			return netip.Addr{}
		}
		ap, err := netip.ParseAddrPort(addr.String())
		if err != nil {
			return netip.Addr{}
		}
		ip = ap.Addr()
	}
	return ip.Unmap().WithZone("")
}

// listenerOf returns the key of a local address.
func listenerOf(addr net.Addr) listenerKey {
	var ap netip.AddrPort
	switch a := addr.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	case nil:
		return listenerKey{}
	default:
		return listenerKey{name: addr.Network() + ":" + addr.String()}
	}
	return listenerKey{addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
}

// connLimits are the limits of one wa_limit handler; 0 means none.
type connLimits struct {
	total, perListener, perIP int64
}

// limitRefusal says which limit refused a connection.
type limitRefusal uint8

const (
	refusedNone limitRefusal = iota
	refusedTotal
	refusedListener
	refusedIP
)

// acquireSlot counts a new connection from client ip on listener lis
// unless that would break one of lim; it returns the slot (holding one
// reference) or which limit refused it. The per-IP limit is checked first,
// so a refusal names the narrowest limit that was reached.
func acquireSlot(ip netip.Addr, lis listenerKey, lim connLimits) (*limitSlot, limitRefusal) {
	var ipSh *counterShard[netip.Addr]
	if ip.IsValid() {
		ipSh = ipShard(ip)
		if !ipSh.inc(ip, clamp32(lim.perIP)) {
			return nil, refusedIP
		}
	}
	lisSh := listenerShard(lis)
	if !lisSh.inc(lis, clamp32(lim.perListener)) {
		if ipSh != nil {
			ipSh.dec(ip)
		}
		return nil, refusedListener
	}
	if !incTotal(lim.total) {
		lisSh.dec(lis)
		if ipSh != nil {
			ipSh.dec(ip)
		}
		return nil, refusedTotal
	}
	s := slotPool.Get().(*limitSlot)
	s.ip, s.lis = ip, lis
	s.refs.Store(1)
	return s, refusedNone
}

// incTotal adds one to the total unless limit > 0 and it is already limit.
func incTotal(limit int64) bool {
	if limit <= 0 {
		counters.total.Add(1)
		return true
	}
	for {
		n := counters.total.Load()
		if n >= limit {
			return false
		}
		if counters.total.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func clamp32(n int64) int32 {
	if n > 1<<31-1 {
		return 1<<31 - 1
	}
	return int32(n)
}

// check reports which of lim the already-counted connection s is over,
// for a second wa_limit handler on the same connection: s counts itself,
// so a count equal to the limit is still within it.
func (s *limitSlot) check(lim connLimits) limitRefusal {
	if lim.perIP > 0 && s.ip.IsValid() && int64(ipShard(s.ip).get(s.ip)) > lim.perIP {
		return refusedIP
	}
	if lim.perListener > 0 && int64(listenerShard(s.lis).get(s.lis)) > lim.perListener {
		return refusedListener
	}
	if lim.total > 0 && counters.total.Load() > lim.total {
		return refusedTotal
	}
	return refusedNone
}

// hold takes another reference to s.
func (s *limitSlot) hold() { s.refs.Add(1) }

// release drops a reference; the last one uncounts the connection.
func (s *limitSlot) release() {
	switch n := s.refs.Add(-1); {
	case n > 0:
		return
	case n < 0:
		panic("wa_limit: connection slot released more often than held")
	}
	if s.ip.IsValid() {
		ipShard(s.ip).dec(s.ip)
	}
	listenerShard(s.lis).dec(s.lis)
	counters.total.Add(-1)
	s.ip, s.lis = netip.Addr{}, listenerKey{}
	slotPool.Put(s)
}

// holdLimit keeps the connection-limit slot that a wa_limit handler took for
// cx (if any) until rc is closed, so a connection relayed by the event loop
// after its handler returned still counts against the limits.
//
// When the wa_limit handler has already returned (it sat in a route of its
// own, before the route that reached this handler), its slot is gone; the
// connection is then counted again, without a limit check (it was let in),
// for as long as rc lives.
func holdLimit(cx *layer4.Connection, rc *registry.Conn) {
	s, _ := connVars(cx)[limitVar].(*limitSlot)
	switch {
	case s == nil:
		return
	case s == releasedSlot:
		s, _ = acquireSlot(clientIP(cx.RemoteAddr()), listenerOf(cx.LocalAddr()), connLimits{})
		// cx keeps pointing at releasedSlot: this slot is rc's alone.
	default:
		s.hold()
	}
	rc.OnClose(s.release)
}

// limitCounts returns the live counts: the total, the given client IP's and
// listener's, and how many IPs and listeners have entries (for tests and
// diagnostics).
func limitCounts(ip netip.Addr, lis listenerKey) (total int64, perIP, perListener int32, ips, listeners int) {
	total = counters.total.Load()
	if ip.IsValid() {
		perIP = ipShard(ip).get(ip)
	}
	perListener = listenerShard(lis).get(lis)
	for i := range counters.ips {
		ips += counters.ips[i].len()
	}
	for i := range counters.listeners {
		listeners += counters.listeners[i].len()
	}
	return
}
