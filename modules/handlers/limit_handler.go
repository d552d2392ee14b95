package handlers

import (
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(&HandleLimit{})
}

// limitWarnEvery is how often at most a refusal is logged at Warn; the
// ones in between are logged at Debug and summed up in the next Warn.
const limitWarnEvery = 10 * time.Second

// HandleLimit (module `layer4.handlers.wa_limit`) caps the number of live
// connections: process-wide, per listener and per client IP. A connection
// over a limit is closed at once, before any byte is read from it, and
// counted in whatsapp_proxy_errors_total{kind="max_connections"} or
// {kind="max_connections_per_ip"}; the official proxy does the same past
// its maxconn (27500), so clients move on to another host.
//
// The counts are shared by every wa_limit handler and survive config
// reloads. A connection counts from the moment wa_limit lets it in until
// the rest of its route is done, and, when a wa_proxy or wa_http handler
// takes it, until it is closed (also when the event loop relays it after
// the handler returned). Put wa_limit first in the same route as the
// handlers it guards: `route { wa_limit ...; subroute { ... } }`. In a
// route of its own followed by other routes, a connection counts only
// while wa_limit runs (not while later matchers read its first bytes) and
// again once a wa handler takes it.
type HandleLimit struct {
	// MaxConnections is the most live connections in the whole process,
	// across every listener and every wa_limit handler. Default: `0`, no
	// limit.
	MaxConnections int `json:"max_connections,omitempty"`

	// MaxConnectionsPerListener is the most live connections per local
	// address that clients connect to (e.g. `0.0.0.0:443`), across every
	// wa_limit handler. Default: `0`, no limit.
	MaxConnectionsPerListener int `json:"max_connections_per_listener,omitempty"`

	// MaxConnectionsPerIP is the most live connections from one client IP
	// address in the whole process. Behind a PROXY-protocol handler
	// earlier in the route, that is the address the header names.
	// IPv4-mapped IPv6 addresses count as IPv4. Default: `0`, no limit.
	MaxConnectionsPerIP int `json:"max_connections_per_ip,omitempty"`

	lim    connLimits
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*HandleLimit) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.wa_limit",
		New: func() caddy.Module { return new(HandleLimit) },
	}
}

// Provision sets up the logger and registers the metrics.
func (h *HandleLimit) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.lim = connLimits{
		total:       int64(h.MaxConnections),
		perListener: int64(h.MaxConnectionsPerListener),
		perIP:       int64(h.MaxConnectionsPerIP),
	}
	return metrics.Register(ctx.GetMetricsRegistry())
}

// Validate checks that the limits are not negative and that at least one
// is set.
func (h *HandleLimit) Validate() error {
	for _, l := range []struct {
		name string
		n    int
	}{
		{"max_connections", h.MaxConnections},
		{"max_connections_per_listener", h.MaxConnectionsPerListener},
		{"max_connections_per_ip", h.MaxConnectionsPerIP},
	} {
		if l.n < 0 {
			return fmt.Errorf("%s must not be negative: %d", l.name, l.n)
		}
	}
	if h.MaxConnections == 0 && h.MaxConnectionsPerListener == 0 && h.MaxConnectionsPerIP == 0 {
		return fmt.Errorf("no limit set: give at least one of max_connections, max_connections_per_listener, max_connections_per_ip")
	}
	return nil
}

// Handle lets cx through to next when it is within the limits, holding its
// place in the counts until next returns (and a wa handler that takes cx
// holds it until cx is closed). Over a limit, cx is closed, the refusal
// counted, and next is not called.
func (h *HandleLimit) Handle(cx *layer4.Connection, next layer4.Handler) error {
	vars := connVars(cx)
	if held, _ := vars[limitVar].(*limitSlot); held != nil && held != releasedSlot {
		// an earlier wa_limit on this connection counted it already
		if r := held.check(h.lim); r != refusedNone {
			h.refuse(cx, r)
			return nil
		}
		return next.Handle(cx)
	}
	s, r := acquireSlot(clientIP(cx.RemoteAddr()), listenerOf(cx.LocalAddr()), h.lim)
	if r != refusedNone {
		h.refuse(cx, r)
		return nil
	}
	if vars == nil { // not a caddy-l4 connection: nothing can hold the slot
		defer s.release()
		return next.Handle(cx)
	}
	vars[limitVar] = s
	defer func() {
		// the slot may be recycled once released: unhook it first
		vars[limitVar] = releasedSlot
		s.release()
	}()
	return next.Handle(cx)
}

var (
	limitLastWarn atomic.Int64 // unix nanoseconds of the last Warn
	limitRefused  atomic.Int64 // refusals since the last Warn
)

// refuse counts, logs and closes a connection over a limit.
func (h *HandleLimit) refuse(cx *layer4.Connection, r limitRefusal) {
	kind, name, limit := metrics.KindMaxConnections, "max_connections", h.lim.total
	switch r {
	case refusedListener:
		name, limit = "max_connections_per_listener", h.lim.perListener
	case refusedIP:
		kind, name, limit = metrics.KindMaxConnectionsPerIP, "max_connections_per_ip", h.lim.perIP
	}
	metrics.CountError(kind) // counted before the client can see the close
	_ = cx.Close()
	n := limitRefused.Add(1)
	now := time.Now().UnixNano()
	last := limitLastWarn.Load()
	if now-last >= int64(limitWarnEvery) && limitLastWarn.CompareAndSwap(last, now) {
		limitRefused.Add(-n)
		h.logger.Warn("refuse connections over the limit",
			zap.String("remote", cx.RemoteAddr().String()), zap.String("local", cx.LocalAddr().String()),
			zap.String("limit", name), zap.Int64("max", limit),
			zap.Int64("refused_since_last_warning", n))
		return
	}
	if ce := h.logger.Check(zapcore.DebugLevel, "refuse connection over the limit"); ce != nil {
		ce.Write(zap.String("remote", cx.RemoteAddr().String()), zap.String("local", cx.LocalAddr().String()),
			zap.String("limit", name), zap.Int64("max", limit))
	}
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	wa_limit [<max_connections>] {
//		max_connections <n>
//		max_connections_per_listener <n>
//		max_connections_per_ip <n>
//	}
func (h *HandleLimit) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume handler name
	seen := make(map[string]bool)
	if d.NextArg() {
		n, err := limitArg(d, "max_connections")
		if err != nil {
			return err
		}
		h.MaxConnections = n
		seen["max_connections"] = true
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		var field *int
		switch opt {
		case "max_connections":
			field = &h.MaxConnections
		case "max_connections_per_listener":
			field = &h.MaxConnectionsPerListener
		case "max_connections_per_ip":
			field = &h.MaxConnectionsPerIP
		default:
			return d.Errf("unrecognized subdirective '%s'", opt)
		}
		if seen[opt] {
			return d.Errf("duplicate subdirective '%s'", opt)
		}
		seen[opt] = true
		if !d.NextArg() {
			return d.ArgErr()
		}
		n, err := limitArg(d, opt)
		if err != nil {
			return err
		}
		*field = n
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	if len(seen) == 0 {
		return d.Err("wa_limit: no limit set: give at least one of max_connections, max_connections_per_listener, max_connections_per_ip")
	}
	return nil
}

// limitArg parses the current token as the positive count of opt.
func limitArg(d *caddyfile.Dispenser, opt string) (int, error) {
	n, err := strconv.ParseInt(d.Val(), 10, 32)
	if err != nil || n <= 0 {
		return 0, d.Errf("%s: want a positive whole number of connections (omit it for no limit), got '%s'", opt, d.Val())
	}
	return int(n), nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*HandleLimit)(nil)
	_ caddy.Validator       = (*HandleLimit)(nil)
	_ layer4.NextHandler    = (*HandleLimit)(nil)
	_ caddyfile.Unmarshaler = (*HandleLimit)(nil)
)
