package upstreams

import (
	"cmp"
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// DefaultResolveCache is how long the direct dialer reuses the addresses a
// name resolved to.
const DefaultResolveCache = 30 * time.Second

// resolveCacheMax bounds the names kept: a new one first drops the
// entries nobody asked for in resolveCacheForget, and is not kept (it is
// resolved for the connection alone) while the cache is still full. The
// proxy is open to anyone: wa_http's CONNECT may name any allowed host
// (*.whatsapp.net), so the names are the clients' choice. A name whose
// first lookup failed is not kept either. (A var for the tests.)
var resolveCacheMax = 4096

const resolveCacheForget = 10 * time.Minute

// The addresses names resolved to, shared by every direct dialer of the
// process (so they survive config reloads): a chat connection then does
// not wait for a DNS round trip, and a reconnect storm does not become a
// storm of queries. HAProxy's official config resolves its server names
// once, at start.
var names = resolveCache{entries: make(map[resolveKey]*resolveEntry)}

type resolveCache struct {
	mu      sync.Mutex
	entries map[resolveKey]*resolveEntry
	logger  atomic.Pointer[zap.Logger] // the newest direct dialer's; nil: no logs
}

type resolveKey struct {
	resolver      *net.Resolver
	network, host string
}

type resolveEntry struct {
	key     resolveKey
	addrs   []netip.Addr // the last good answer; nil before the first
	at      time.Time    // when addrs were looked up
	used    time.Time    // when the entry was last asked for
	retryAt time.Time    // no refresh before this, after a failed one
	failing bool         // the last refresh failed (logged once per streak)
	flight  *lookupFlight
}

// lookupFlight is a lookup in progress: callers asking for the same name
// meanwhile wait for it rather than send their own query.
type lookupFlight struct {
	done  chan struct{}
	addrs []netip.Addr
	err   error
}

// refreshTimeout bounds a refresh made in the background.
const refreshTimeout = 10 * time.Second

// refreshRetry is the wait before another refresh after one failed (read
// under the cache's lock; tests shorten it).
var refreshRetry = 5 * time.Second

// lookup returns host's addresses ("ip", "ip4" or "ip6" ones as network
// says), resolving them with r only when it must: an answer younger than
// maxAge is returned as it is; an older one is returned too, while one
// lookup in the background refreshes it, so a connection never waits for
// DNS once its name has resolved. When the
// refresh fails the old answer stays in use (a resolver outage does not
// stop connections to hosts whose addresses are known), and the next
// refresh waits refreshRetry. A name not resolved yet is resolved at once;
// callers asking for it meanwhile share that lookup, each waiting as long
// as its own ctx allows. maxAge 0 turns the cache off: every call resolves.
func (c *resolveCache) lookup(ctx context.Context, r *net.Resolver, network, host string, maxAge time.Duration) ([]netip.Addr, error) {
	if maxAge <= 0 {
		return r.LookupNetIP(ctx, network, host)
	}
	// Names are case-insensitive (the allowlist matches them so): one
	// entry and one lookup per name however a client spells it.
	host = strings.ToLower(host)
	k := resolveKey{r, network, host}
	now := time.Now()
	c.mu.Lock()
	e := c.entries[k]
	if e == nil {
		if len(c.entries) >= resolveCacheMax {
			c.forget(now)
		}
		if len(c.entries) >= resolveCacheMax {
			c.mu.Unlock()
			return r.LookupNetIP(ctx, network, host) // full: resolved, not kept
		}
		e = &resolveEntry{key: k}
		c.entries[k] = e
	}
	e.used = now
	if e.addrs != nil {
		addrs := e.addrs
		if now.Sub(e.at) >= maxAge && e.flight == nil && !now.Before(e.retryAt) {
			f := &lookupFlight{done: make(chan struct{})}
			e.flight = f
			go func() {
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refreshTimeout)
				defer cancel()
				addrs, err := r.LookupNetIP(rctx, network, host)
				c.finish(e, f, addrs, err)
				c.logRefresh(e, host, err)
			}()
		}
		c.mu.Unlock()
		return addrs, nil
	}
	if f := e.flight; f != nil {
		c.mu.Unlock()
		select {
		case <-f.done:
			return f.addrs, f.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	// The lookup is the name's, not this caller's: it runs under its own
	// deadline (refreshTimeout), so that a caller whose time runs out, or
	// whose connection ends, does not fail the others waiting for it (a
	// resolver that answers just after one connect_timeout would otherwise
	// fail every connection to a new name, one after the other).
	f := &lookupFlight{done: make(chan struct{})}
	e.flight = f
	c.mu.Unlock()
	go func() {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), refreshTimeout)
		defer cancel()
		addrs, err := r.LookupNetIP(lctx, network, host)
		c.finish(e, f, addrs, err)
	}()
	select {
	case <-f.done:
		return f.addrs, f.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// finish records a lookup's outcome in e and hands it to f's waiters.
func (c *resolveCache) finish(e *resolveEntry, f *lookupFlight, addrs []netip.Addr, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e.flight = nil
	switch {
	case err == nil:
		for i, a := range addrs { // LookupNetIP gives IPv4 as ::ffff:a.b.c.d
			addrs[i] = a.Unmap()
		}
		e.addrs, e.at = addrs, time.Now()
	case e.addrs == nil: // a name that never resolved is not kept
		if c.entries[e.key] == e {
			delete(c.entries, e.key)
		}
	default:
		e.retryAt = time.Now().Add(refreshRetry) // e.addrs stay
	}
	f.addrs, f.err = addrs, err
	close(f.done)
}

// logRefresh logs a background refresh that failed after one that did not
// (a warning: the old addresses are in use) and one that worked after one
// that failed; nothing while nothing changes.
func (c *resolveCache) logRefresh(e *resolveEntry, host string, err error) {
	c.mu.Lock()
	was := e.failing
	e.failing = err != nil
	at, retry := e.at, refreshRetry
	c.mu.Unlock()
	logger := c.logger.Load()
	switch {
	case logger == nil || was == (err != nil):
	case err != nil:
		logger.Warn("resolve failed; connecting to the addresses resolved before",
			zap.String("host", host), zap.Duration("addresses_age", time.Since(at).Round(time.Second)),
			zap.Duration("retry_in", retry), zap.Error(err))
	default:
		logger.Info("resolve works again", zap.String("host", host))
	}
}

// forget drops the entries not asked for in resolveCacheForget (c.mu held).
func (c *resolveCache) forget(now time.Time) {
	for k, e := range c.entries {
		if e.flight == nil && now.Sub(e.used) >= resolveCacheForget {
			delete(c.entries, k)
		}
	}
}

// Name is a name in the resolve cache, as GET /waproxy/names shows it.
type Name struct {
	// Host is the name.
	Host string `json:"host"`
	// Network is what was looked up: "ip" (IPv4 and IPv6), "ip4" or "ip6".
	Network string `json:"network"`
	// Addresses are the addresses connections use, in the resolver's order.
	Addresses []netip.Addr `json:"addresses"`
	// Resolved is when they were looked up.
	Resolved time.Time `json:"resolved"`
	// Failing is whether the last refresh failed (the addresses are older
	// than the resolve_cache period, and in use).
	Failing bool `json:"failing,omitempty"`
}

// Names returns the names in the resolve cache that have addresses, sorted
// by host and network.
func Names() []Name {
	names.mu.Lock()
	out := make([]Name, 0, len(names.entries))
	for k, e := range names.entries {
		if e.addrs != nil {
			out = append(out, Name{Host: k.host, Network: k.network, Addresses: slices.Clone(e.addrs), Resolved: e.at, Failing: e.failing})
		}
	}
	names.mu.Unlock()
	slices.SortFunc(out, func(a, b Name) int {
		return cmp.Or(strings.Compare(a.Host, b.Host), strings.Compare(a.Network, b.Network))
	})
	return out
}
