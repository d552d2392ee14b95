package registry

import (
	"context"
	"slices"
	"strings"
	"sync"
)

// Dialer is a dialer the running config uses (GET /waproxy/upstreams): its
// module ID, its servers (for socks5) and the handler and destination that
// use it. It never holds credentials.
type Dialer struct {
	Dialer      string   `json:"dialer"`
	Servers     []string `json:"servers,omitempty"`
	Handler     string   `json:"handler"`
	Destination string   `json:"destination,omitempty"`
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
	return slices.CompactFunc(list, func(a, b Dialer) bool { return key(a) == key(b) })
}
