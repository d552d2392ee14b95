package handlers

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

// Configuration and logging helpers shared by the wa_proxy and wa_http
// handlers.

// loadAllowlist builds a handler's allowlist from its allow patterns (the
// default list when there are none) and warns when it allows any
// destination.
func loadAllowlist(patterns []string, logger *zap.Logger) (*upstreams.Allowlist, error) {
	if len(patterns) == 0 {
		patterns = upstreams.DefaultAllow
	}
	allow, err := upstreams.NewAllowlist(patterns)
	if err != nil {
		return nil, fmt.Errorf("allow: %w", err)
	}
	if allow.Any() {
		logger.Warn("allow * makes this handler an open relay: any public destination may be dialled")
	}
	return allow, nil
}

// loadDialer loads the wa.dialers module configured in *via, the field of
// mod tagged `caddy:"namespace=wa.dialers inline_key=dialer"` and named
// ViaRaw (the direct dialer when it is empty), and returns it with its
// module ID for logs.
func loadDialer(ctx caddy.Context, mod any, via *json.RawMessage) (upstreams.Dialer, string, error) {
	if *via == nil {
		*via = json.RawMessage(`{"dialer":"direct"}`)
	}
	loaded, err := ctx.LoadModule(mod, "ViaRaw")
	if err != nil {
		return nil, "", fmt.Errorf("loading dialer: %w", err)
	}
	dialer, ok := loaded.(upstreams.Dialer)
	if !ok {
		return nil, "", fmt.Errorf("module %T is not a dialer", loaded)
	}
	return dialer, string(loaded.(caddy.Module).CaddyModule().ID), nil
}

// finishProvision is how every proxying handler's Provision ends: it lists
// the handler's dialer for GET /waproxy/upstreams (for as long as ctx
// lives), loads the waproxy app, whose shutdown drain covers the handler's
// connections even when the config does not mention it, and registers the
// metrics. A handler provisioned by hand, as in a unit test, has no config
// to load the app into.
func finishProvision(ctx caddy.Context, handlerID, destination string, dialer upstreams.Dialer, dialerID string) error {
	registry.AddDialer(ctx, registry.Dialer{Dialer: dialerID, Servers: dialerServers(dialer),
		Handler: handlerID, Destination: destination, HealthFunc: upstreams.HealthView(dialer)})
	if ctx.Module() != nil {
		if _, err := ctx.App("waproxy"); err != nil {
			return err
		}
	}
	return metrics.Register(ctx.GetMetricsRegistry())
}

// dialerServers returns the servers a dialer goes through (socks5), for the
// registry; never its credentials.
func dialerServers(d upstreams.Dialer) []string {
	if s, ok := d.(*upstreams.SOCKS5); ok {
		return s.Servers
	}
	return nil
}

// unmarshalVia reads `via <dialer> [<args...>] [{ ... }]` into the JSON of
// a `via` field.
func unmarshalVia(d *caddyfile.Dispenser) (json.RawMessage, error) {
	if !d.NextArg() {
		return nil, d.Errf("via: missing dialer name (direct or socks5)")
	}
	name := d.Val()
	if _, err := caddy.GetModule("wa.dialers." + name); err != nil {
		return nil, d.Errf("via: unknown dialer '%s' (want direct or socks5)", name)
	}
	unm, err := caddyfile.UnmarshalModule(d, "wa.dialers."+name)
	if err != nil {
		return nil, err
	}
	return caddyconfig.JSONModuleObject(unm, "dialer", name, nil), nil
}

// unmarshalTimeout reads the one positive duration argument of opt.
func unmarshalTimeout(d *caddyfile.Dispenser, opt string) (caddy.Duration, error) {
	if !d.NextArg() {
		return 0, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil {
		return 0, d.Errf("%s: bad duration '%s': %v", opt, d.Val(), err)
	}
	if dur <= 0 {
		return 0, d.Errf("%s: must be positive, got '%s'", opt, d.Val())
	}
	if d.NextArg() {
		return 0, d.ArgErr()
	}
	return caddy.Duration(dur), nil
}

// logEnd logs how a relayed connection ended (what: "connection" or
// "tunnel") and counts the endings that are errors: a cut at the end of a
// graceful shutdown's grace period at Info (the shutdown counts it as
// shutdown_cut), a normal close or a peer's reset at Debug, the idle
// timeout at Debug counted as idle_timeout, anything else at Warn counted
// as relay. fields gives the entry's fields; it runs only when the entry's
// level is enabled, so a normal close with Debug off (the default) builds
// nothing (seven fields are 450 bytes of garbage per connection).
func logEnd(logger *zap.Logger, what string, err error, fields func() []zap.Field) {
	level, prefix, suffix := zapcore.DebugLevel, "", "" // the message: prefix + what + suffix
	switch {
	case errors.Is(err, errCut):
		// before the close case: errCut matches net.ErrClosed
		level, suffix = zapcore.InfoLevel, " cut at shutdown"
	case err == nil || isClosedByPeer(err):
		suffix = " closed"
	case errors.Is(err, errIdle):
		metrics.CountError(metrics.KindIdleTimeout)
		prefix = "close idle "
	default:
		metrics.CountError(metrics.KindRelay)
		level = zapcore.WarnLevel
	}
	if !logger.Core().Enabled(level) {
		return
	}
	msg := prefix + what + suffix
	if level == zapcore.WarnLevel {
		msg = "relay"
	}
	ce := logger.Check(level, msg)
	if ce == nil {
		return
	}
	f := fields()
	if level == zapcore.WarnLevel {
		f = append(f, zap.Error(err))
	}
	ce.Write(f...)
}

// UnmarshalVia reads `via <dialer> [<args...>] [{ ... }]`, with d on the
// `via` token, into the JSON of a handler's `via` field: the dialer's own
// Caddyfile syntax. The waproxy Caddyfile preset uses it.
func UnmarshalVia(d *caddyfile.Dispenser) (json.RawMessage, error) { return unmarshalVia(d) }
