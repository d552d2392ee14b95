// Package app is the waproxy app (module `waproxy`): the proxy's
// process-wide settings, today the graceful shutdown's grace period.
//
// The wa_proxy and wa_http handlers load the app in their Provision, so it
// runs even when the config does not mention it (with its defaults).
package app

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

func init() {
	caddy.RegisterModule(new(App))
}

// DefaultGracePeriod is how long a shutdown waits for live connections
// when grace_period is not set.
const DefaultGracePeriod = 30 * time.Second

// cutWait bounds how long a shutdown waits, after cutting the connections
// left at the deadline, for them to be gone before the process exits.
const cutWait = 2 * time.Second

// App (module `waproxy`) holds the proxy's process-wide settings.
//
// Graceful shutdown: when the process exits (`caddy stop`, SIGTERM, SIGINT),
// Caddy first stops every app, so the listeners close and no connection is
// accepted any more. The connections that are live then keep flowing for up
// to GracePeriod; the ones still open at the deadline are closed ("cut"). A
// config reload never drains or cuts anything: connections outlive configs.
type App struct {
	// GracePeriod is how long a shutdown lets live connections finish on
	// their own before it closes the rest. Zero means the default; a
	// negative value is an error.
	//
	// Unlike Caddy's http app, whose grace period is unbounded unless set,
	// this one is bounded by default: WhatsApp chat sessions last hours and
	// never end on their own (clients send keepalives every 20–30 s), so an
	// unbounded wait would hang `caddy stop` and every service manager's
	// stop until it kills the process. Clients reconnect at once to another
	// proxy or to this one restarted. Default: `30s`.
	GracePeriod caddy.Duration `json:"grace_period,omitempty"`

	logger *zap.Logger
	ctx    caddy.Context
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "waproxy",
		New: func() caddy.Module { return new(App) },
	}
}

var (
	// current is the app of the running config (or, when the running
	// config has none, of the last one that had): its grace period and
	// logger serve the shutdown. Caddy stops the apps before it runs the
	// exit functions, so the Stop at exit leaves it in place.
	current  atomic.Pointer[App]
	exitOnce sync.Once
)

// Provision sets the default and registers the shutdown drain.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.GracePeriod == 0 {
		a.GracePeriod = caddy.Duration(DefaultGracePeriod)
	}
	// Caddy runs process exit functions after it has stopped every app
	// (the listeners are closed) and only when the process exits, never on
	// a reload. The per-config (caddy.Context).OnExit cannot be used from
	// Provision: it appends to the Provision's copy of the context, which
	// Caddy never sees again. So the drain is registered once per process
	// and uses the current app (see current).
	exitOnce.Do(func() { caddy.OnExit(drainAtExit) })
	a.ctx = ctx
	return nil
}

// Cleanup runs when a's config is unloaded or fails to start; in the second
// case it closes the listeners the layer4 app left open (stopFailedLayer4).
// Caddy calls it synchronously, after cancelling the config's context and
// before the admin API answers, so no new connection reaches the rejected
// config after the error is reported.
func (a *App) Cleanup() error {
	stopFailedLayer4(a.ctx)
	return nil
}

// stopFailedLayer4 closes the listeners of a layer4 app whose Start failed.
// caddy-l4 (at the pinned version) returns the bind error of one listener
// without closing the ones it already opened, and Caddy does not stop the
// app that failed; since Caddy's listeners share their port with the running
// config's (SO_REUSEPORT), the rejected config would go on taking about half
// of the new connections until the process exits. (Caddy fixed the same
// flaw in its http app: caddyserver/caddy#7175.) It runs in Cleanup, after
// the config's context ended; the context's cause says whether the config
// failed to start.
func stopFailedLayer4(ctx caddy.Context) {
	cause := context.Cause(ctx)
	if cause == nil {
		return
	}
	msg := cause.Error()
	if !strings.Contains(msg, "configuration start error") || !strings.Contains(msg, "layer4 app module: start:") {
		return // unloaded after running, or failed elsewhere (Caddy stopped layer4 then)
	}
	l4, err := ctx.AppIfConfigured("layer4")
	if err != nil {
		return
	}
	if app, ok := l4.(caddy.App); ok {
		_ = app.Stop()
	}
}

// Validate rejects a negative grace period.
func (a *App) Validate() error {
	if a.GracePeriod < 0 {
		return fmt.Errorf("grace_period must not be negative: %v", time.Duration(a.GracePeriod))
	}
	return nil
}

// Start makes a the app whose settings the shutdown uses.
func (a *App) Start() error {
	current.Store(a)
	return nil
}

// Stop drains nothing: connections outlive configs, and the drain runs only
// when the process exits. When a is still current but its config is not the
// running one — the config failed to start (another app's Start failed after
// a's) — the running config's app is current again. (A reload stops the old
// config after the new one started, so its app is no longer current.)
// Caddy serialises config changes, so Start and Stop do not race.
func (a *App) Stop() error {
	if caddy.Exiting() || current.Load() != a {
		return nil // at exit, the drain uses a
	}
	if running, err := caddy.ActiveContext().AppIfConfigured("waproxy"); err == nil {
		if r, ok := running.(*App); ok {
			current.Store(r)
		}
	}
	// else the running config has no waproxy app (no wa_* handler): the
	// connections of earlier configs still drain with a's settings
	return nil
}

// drainAtExit is the process exit function.
func drainAtExit(ctx context.Context) {
	a := current.Load()
	if a == nil {
		return // no config with the app ever ran: no handler opened a connection
	}
	drain(ctx, time.Duration(a.GracePeriod), cutWait, a.logger)
}

// drainResult is what a drain did.
type drainResult struct {
	ended  int           // connections that ended on their own within the grace period
	cut    int           // connections cut at the deadline
	left   int           // connections still tracked when the drain gave up
	waited time.Duration // how long the drain took
}

// drain waits until the registry is empty or grace has passed (or ctx is
// done), then cuts the connections left and waits up to cutWait for them to
// be gone. It logs the outcome and counts each cut connection in
// errors_total{kind="shutdown_cut"}. With no live connection it returns at
// once, silently.
func drain(ctx context.Context, grace, cutWait time.Duration, logger *zap.Logger) drainResult {
	start := time.Now()
	opened0 := registry.Opened()
	live := registry.Len()
	if live == 0 {
		return drainResult{}
	}
	logger.Info("graceful shutdown: waiting for live connections",
		zap.Int("connections", live), zap.Duration("grace_period", grace))

	deadline := time.NewTimer(grace)
	defer deadline.Stop()
	waitEmpty(ctx, deadline.C)
	atDeadline := registry.Len()
	// connections may still arrive from caddy-l4's matching phase after
	// the listeners closed: count them in
	seen := live + int(registry.Opened()-opened0)
	res := drainResult{ended: max(seen-atDeadline, 0)}

	if atDeadline > 0 {
		res.cut = registry.CutAll()
		for range res.cut {
			metrics.CountError(metrics.KindShutdownCut)
		}
		t := time.NewTimer(cutWait)
		waitEmpty(context.Background(), t.C)
		t.Stop()
		if res.left = registry.Len(); res.left > 0 {
			logger.Warn("graceful shutdown: connections still open after the cut",
				zap.Int("connections", res.left), zap.Duration("cut_wait", cutWait))
		}
	}
	res.waited = time.Since(start)
	logger.Info(fmt.Sprintf("graceful shutdown: %d connections ended within the grace period, %d cut at the deadline", res.ended, res.cut),
		zap.Int("ended", res.ended), zap.Int("cut", res.cut),
		zap.Duration("grace_period", grace), zap.Duration("waited", res.waited))
	return res
}

// waitEmpty returns when the registry is empty, ctx is done or stop fires.
func waitEmpty(ctx context.Context, stop <-chan time.Time) {
	for registry.Len() > 0 {
		select {
		case <-registry.Empty():
		case <-ctx.Done():
			return
		case <-stop:
			return
		}
	}
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
)
