package registry

import (
	"context"
	"slices"
	"strings"
	"sync"
	"time"
)

// Dialer is a dialer the running config uses (GET /waproxy/upstreams): its
// module ID, its servers (for socks5), the handler and destination that use
// it, and, when it has a health check, each upstream's health. It never
// holds credentials.
type Dialer struct {
	Dialer      string         `json:"dialer"`
	Servers     []string       `json:"servers,omitempty"`
	Handler     string         `json:"handler"`
	Destination string         `json:"destination,omitempty"`
	Health      []ServerHealth `json:"health,omitempty"`

	// HealthFunc, when set, reports the dialer's health; Dialers calls it
	// to fill Health.
	HealthFunc func() []ServerHealth `json:"-"`
}

// ServerHealth is the state of one upstream's active health check.
type ServerHealth struct {
	// Upstream names the upstream the way the whatsapp_proxy_upstream_healthy
	// gauge labels it: "socks5 127.0.0.1:1080" or "direct".
	Upstream string `json:"upstream"`
	// Healthy is whether the failover order uses it; true until a check fails.
	Healthy bool `json:"healthy"`
	// Destination is what the checks connect to.
	Destination string `json:"destination"`
	// LastCheck is when the last check ended; zero (omitted) before the first.
	LastCheck time.Time `json:"last_check,omitzero"`
	// Error is the last check's error, empty when it succeeded.
	Error string `json:"error,omitempty"`
}

var (
	dialerMu sync.Mutex
	dialers  = make(map[*Dialer]struct{})
)

// AddDialer records d for as long as ctx lives: a handler calls it from
// Provision with its config's context, which ends when that config is
// unloaded, so the list follows reloads.
func AddDialer(ctx context.Context, d Dialer) {
	e := &d
	e.Servers = slices.Clone(d.Servers)
	dialerMu.Lock()
	dialers[e] = struct{}{}
	dialerMu.Unlock()
	context.AfterFunc(ctx, func() {
		dialerMu.Lock()
		delete(dialers, e)
		dialerMu.Unlock()
	})
}

// Dialers returns the recorded dialers, without duplicates, in a stable order.
func Dialers() []Dialer {
	dialerMu.Lock()
	list := make([]Dialer, 0, len(dialers))
	for d := range dialers {
		list = append(list, *d)
	}
	dialerMu.Unlock()
	key := func(d Dialer) string {
		return d.Dialer + "\x00" + strings.Join(d.Servers, ",") + "\x00" + d.Handler + "\x00" + d.Destination
	}
	slices.SortFunc(list, func(a, b Dialer) int { return strings.Compare(key(a), key(b)) })
	list = slices.CompactFunc(list, func(a, b Dialer) bool { return key(a) == key(b) })
	for i := range list {
		if f := list[i].HealthFunc; f != nil {
			list[i].Health = f()
		}
	}
	return list
}
