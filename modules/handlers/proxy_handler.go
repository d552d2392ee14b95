package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// Defaults of the wa_proxy handler.
const (
	DefaultDestination    = "g.whatsapp.net:5222"
	DefaultConnectTimeout = 5 * time.Second
	DefaultIdleTimeout    = 200 * time.Second
)

// Handler (module `layer4.handlers.wa_proxy`) carries a connection to one
// destination through a dialer, byte for byte: the bytes the matchers looked
// at are sent first, then both directions are relayed until they end. The
// destination must be in the allowlist; anything else is refused without
// being dialled, so the proxy is never an open relay.
type Handler struct {
	// Destination is the host:port to connect to. Placeholders are expanded
	// per connection, e.g. `{l4.wa_tls.server_name}:443`. A host name is
	// passed to the dialer as a name (a SOCKS5 exit resolves it).
	// Default: `g.whatsapp.net:5222`.
	Destination string `json:"destination,omitempty"`

	// Via is the dialer that reaches the destination: a module in the
	// `wa.dialers` namespace, named by its `dialer` key, e.g.
	// `{"dialer": "socks5", "servers": ["127.0.0.1:9050"]}`.
	// Default: `{"dialer": "direct"}`.
	ViaRaw json.RawMessage `json:"via,omitempty" caddy:"namespace=wa.dialers inline_key=dialer"`

	// ProxyProtocol sends a PROXY protocol header (`v1` or `v2`) with the
	// client's address to the destination before any client byte, like the
	// official proxy's `send-proxy`. Default: none.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// ConnectTimeout bounds connecting to the destination, including every
	// SOCKS5 handshake. Default: `5s`.
	ConnectTimeout caddy.Duration `json:"connect_timeout,omitempty"`

	// IdleTimeout closes the connection when no byte has moved in either
	// direction for this long. WhatsApp clients send keepalives every
	// 20–30 s, so a live session never reaches it. Default: `200s`.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// Allow lists the destinations that may be dialled: host names
	// (`whatsapp.net`), subdomain wildcards (`*.whatsapp.net`), IP
	// literals and CIDR ranges, or `*` for any (an open relay). A
	// destination outside the list is refused and never dialled.
	// Default: `whatsapp.net *.whatsapp.net whatsapp.com *.whatsapp.com`.
	Allow []string `json:"allow,omitempty"`

	// TLS wraps the connection to the destination in TLS (the client's
	// bytes are encrypted on the way out), verifying the destination's
	// certificate unless told otherwise. See UpstreamTLS. Default: none,
	// the bytes leave as they came.
	TLS *UpstreamTLS `json:"tls,omitempty"`

	dialer    upstreams.Dialer
	dialerID  string
	allow     *upstreams.Allowlist
	ppVersion byte
	logger    *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.wa_proxy",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults, loads the dialer and registers the metrics.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Destination == "" {
		h.Destination = DefaultDestination
	}
	if h.ConnectTimeout == 0 {
		h.ConnectTimeout = caddy.Duration(DefaultConnectTimeout)
	}
	if h.IdleTimeout == 0 {
		h.IdleTimeout = caddy.Duration(DefaultIdleTimeout)
	}
	switch strings.ToLower(h.ProxyProtocol) {
	case "":
	case "v1":
		h.ppVersion = 1
	case "v2":
		h.ppVersion = 2
	default:
		return fmt.Errorf("proxy_protocol: unknown version %q (want v1 or v2)", h.ProxyProtocol)
	}

	allow, err := loadAllowlist(h.Allow, h.logger)
	if err != nil {
		return err
	}
	h.allow = allow
	h.dialer, h.dialerID, err = loadDialer(ctx, h, &h.ViaRaw)
	if err != nil {
		return err
	}
	if h.TLS != nil {
		if err := h.TLS.provision(); err != nil {
			return err
		}
	}

	return finishProvision(ctx, "layer4.handlers.wa_proxy", h.Destination, h.dialer, h.dialerID)
}

// Validate checks the configuration. A destination without placeholders is
// checked against the allowlist here, so a config that could never work is
// rejected when it is loaded.
func (h *Handler) Validate() error {
	if h.ConnectTimeout < 0 {
		return fmt.Errorf("connect_timeout must not be negative: %v", time.Duration(h.ConnectTimeout))
	}
	if h.IdleTimeout < 0 {
		return fmt.Errorf("idle_timeout must not be negative: %v", time.Duration(h.IdleTimeout))
	}
	if h.TLS != nil {
		if err := h.TLS.validate(); err != nil {
			return err
		}
	}
	if !strings.Contains(h.Destination, "{") {
		host, _, err := splitDestination(h.Destination)
		if err != nil {
			return err
		}
		if !h.allow.AllowsHost(host) {
			return fmt.Errorf("destination %s is not in the allowlist (%s); add it with `allow`", h.Destination, strings.Join(h.allowPatterns(), " "))
		}
	}
	return nil
}

func (h *Handler) allowPatterns() []string {
	if len(h.Allow) > 0 {
		return h.Allow
	}
	return upstreams.DefaultAllow
}

// Handle proxies cx to the destination. It is a terminal handler: next is
// never called. Failures are logged once here and counted in
// whatsapp_proxy_errors_total; Handle then returns nil so caddy-l4 does not
// log them again, and the client's connection is closed.
//
// The common path (a plain client, the direct dialer, the event loop
// connecting) stays in Handle and its callees with small stack frames; the
// rest (Go's dialers, upstream TLS, failures and their log fields) is in
// methods of its own, so a connection's goroutine does not have to grow its
// stack for code it does not run.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	c := h.open(cx)
	defer func() {
		if !c.offloaded {
			c.release()
		}
	}()

	host, _, err := splitDestination(c.dest)
	if err != nil {
		c.badDestination(err)
		return nil
	}
	if !h.allow.AllowsHost(host) {
		c.refuse()
		return nil
	}

	// The allowlist travels in the context, so the direct dialer refuses a
	// name that resolves to an internal address (loopback, private, ...).
	ctx, cancel := context.WithTimeout(upstreams.WithAllowlist(cx.Context, h.allow), time.Duration(h.ConnectTimeout))
	defer cancel() // connect_timeout covers the dial and the upstream TLS handshake

	if resolver, ok := h.dialer.(upstreams.Resolver); ok && h.TLS == nil && connectsInLoop(cx.Conn) {
		// The event loop connects (no dial goroutine, no Go connection):
		// see offloadConnect. Anything it cannot take goes the usual way.
		addrs, err := resolver.Resolve(ctx, "tcp", c.dest)
		if err != nil {
			c.dialFailed(err)
			return nil
		}
		first, ok := h.firstBytes(cx, c.remote, c.dest)
		if !ok {
			return nil
		}
		prefetched := cx.MatchingBytes()
		if len(prefetched) > 0 {
			first = append(first, prefetched)
		}
		c.offloaded, err = carryConnecting(cx.Conn, c.dest, addrs, first, len(prefetched),
			time.Until(deadlineOf(ctx)), time.Duration(h.IdleTimeout), c.rc, c.end, c.release)
		if err != nil {
			c.dialFailed(err)
			return nil
		}
		if c.offloaded {
			return nil
		}
	}
	return c.dialAndCarry(ctx, cx, cancel, host)
}

// proxyConn is one connection's state while wa_proxy handles it, and after,
// while the event loop relays it. It must not hold caddy-l4's Connection
// (its context, replacer and variables): the relay keeps it as long as the
// connection lives, and an idle chat connection costs under 2 KB in all.
type proxyConn struct {
	h                      *Handler
	rc                     *registry.Conn
	start                  time.Time
	protocol, remote, dest string
	failure                error // why the connection ended before it was relayed
	relayErr               error // how the relay ended
	offloaded              bool  // the event loop owns the connection and ends it
}

// open counts and registers a new connection.
func (h *Handler) open(cx *layer4.Connection) *proxyConn {
	protocol := metrics.Protocol(cx)
	metrics.ConnectionsTotal.Inc()
	metrics.ConnectionsActive.Inc()
	metrics.ProtocolGauge(protocol).Inc()
	repl := cx.Context.Value(layer4.ReplacerCtxKey).(*caddy.Replacer)
	c := &proxyConn{h: h, start: time.Now(), protocol: protocol,
		dest: repl.ReplaceAll(h.Destination, ""), remote: cx.RemoteAddr().String()}
	c.rc = &registry.Conn{Remote: c.remote, Listener: cx.LocalAddr().String(), Protocol: protocol,
		Handler: "layer4.handlers.wa_proxy", Dialer: h.dialerID}
	c.rc.SetDestination(c.dest)
	registry.Open(c.rc)
	holdLimit(cx, c.rc)
	// a shutdown's deadline ends the connection before the relay takes over
	// (the relay replaces this cut with its own)
	client := cx.Conn
	c.rc.SetCut(func() { _ = client.Close() })
	return c
}

// release uncounts the connection and unregisters it; it runs once, when
// the handler returns or, for a relay the event loop took, when it ends.
func (c *proxyConn) release() {
	metrics.ConnectionsActive.Dec()
	metrics.ProtocolGauge(c.protocol).Dec()
	if c.failure == nil {
		c.failure = c.relayErr
	}
	registry.Close(c.rc, c.failure)
}

// end logs and counts how the connection ended; it runs once, on the
// event loop's goroutine or on the handler's.
func (c *proxyConn) end(st pairStats, err error) {
	c.relayErr = err
	var de *upstreams.DialError
	if errors.As(err, &de) { // the event loop's connect failed
		c.h.dialFailed(c.remote, c.dest, err)
		return
	}
	logEnd(c.h.logger, "connection", err, func() []zap.Field {
		return []zap.Field{
			zap.String("remote", c.remote), zap.String("destination", c.dest), zap.String("via", c.h.dialerID),
			zap.String("protocol", c.protocol),
			zap.Int64("bytes_from_client", st.toUpstream), zap.Int64("bytes_to_client", st.toClient),
			zap.Duration("duration", time.Since(c.start)),
		}
	})
}

func (c *proxyConn) badDestination(err error) {
	c.failure = err
	metrics.CountError(metrics.KindDestination)
	c.h.logger.Error("bad destination", zap.String("remote", c.remote), zap.String("destination", c.dest), zap.Error(err))
}

func (c *proxyConn) refuse() {
	c.failure = errors.New("destination not in the allowlist")
	metrics.CountError(metrics.KindNotAllowed)
	c.h.logger.Warn("refuse destination outside the allowlist",
		zap.String("remote", c.remote), zap.String("destination", c.dest), zap.String("protocol", c.protocol))
}

func (c *proxyConn) dialFailed(err error) {
	c.failure = err
	c.h.dialFailed(c.remote, c.dest, err)
}

// dialAndCarry is the path for what the event loop does not connect
// itself: the dialer connects (Go's net package, or a SOCKS5 exit), the
// PROXY header, upstream TLS and the bytes the matchers read go first, then
// carry relays. cancel ends ctx's connect_timeout once the upstream is
// ready. Its error is one for caddy-l4 to log (the others are logged here).
func (c *proxyConn) dialAndCarry(ctx context.Context, cx *layer4.Connection, cancel context.CancelFunc, host string) error {
	h := c.h
	up, err := h.dialer.DialContext(ctx, "tcp", c.dest)
	if err != nil {
		c.dialFailed(err)
		return nil
	}
	carried := false // from carry on, the relay owns up and closes it
	defer func() {
		if !carried {
			_ = up.Close()
		}
	}()

	// The first write carries the PROXY header (if any) and the bytes the
	// matchers have already read, in one writev.
	first, ok := h.firstBytes(cx, c.remote, c.dest)
	if !ok {
		return nil
	}
	if h.TLS != nil {
		// The PROXY header goes in clear, before the handshake.
		if len(first) > 0 {
			if _, err := first.WriteTo(up); err != nil {
				metrics.CountError(metrics.KindRelay)
				h.logger.Error("write PROXY header upstream", zap.String("remote", c.remote), zap.String("destination", c.dest), zap.Error(err))
				return nil
			}
			first = nil
		}
		repl := cx.Context.Value(layer4.ReplacerCtxKey).(*caddy.Replacer)
		tc, err := h.TLS.client(ctx, up, repl.ReplaceAll(h.TLS.ServerName, ""), host)
		if err != nil {
			c.failure = err
			metrics.CountError(upstreams.ErrorKind(err))
			h.logger.Error("tls handshake with upstream",
				zap.String("remote", c.remote), zap.String("destination", c.dest), zap.String("via", h.dialerID),
				zap.String("kind", upstreams.ErrorKind(err)), zap.Error(err))
			return nil
		}
		up = tc // the relay below uses the goroutine copy loop for it
	}
	cancel()
	prefetched := cx.MatchingBytes()
	if len(prefetched) > 0 {
		first = append(first, prefetched)
	}
	if len(first) > 0 {
		if _, err := first.WriteTo(up); err != nil {
			metrics.CountError(metrics.KindRelay)
			h.logger.Error("write first bytes upstream", zap.String("remote", c.remote), zap.String("destination", c.dest), zap.Error(err))
			return nil
		}
		metrics.BytesReceived.Add(float64(len(prefetched)))
		c.rc.FromClient.Add(int64(len(prefetched)))
		// consume what was just sent from the connection's buffer
		if _, err := cx.Read(prefetched); err != nil {
			return fmt.Errorf("draining prefetched bytes: %w", err)
		}
	}

	carried = true
	if carry(cx.Conn, up, time.Duration(h.IdleTimeout), c.rc, c.end, c.release) {
		c.offloaded = true
	}
	return nil
}

// dialFailed logs and counts a failure to reach the destination.
func (h *Handler) dialFailed(remote, dest string, err error) {
	kind := upstreams.ErrorKind(err)
	metrics.CountError(kind)
	h.logger.Error("dial upstream",
		zap.String("remote", remote), zap.String("destination", dest), zap.String("via", h.dialerID),
		zap.String("kind", kind), zap.Error(err))
}

// firstBytes returns the PROXY header to send upstream first, if the
// handler sends one; ok is false (logged and counted) when it cannot be
// built.
func (h *Handler) firstBytes(cx *layer4.Connection, remote, dest string) (first net.Buffers, ok bool) {
	if h.ppVersion == 0 {
		return nil, true
	}
	return h.proxyHeader(cx, remote, dest)
}

// proxyHeader is firstBytes when the handler sends a PROXY header.
func (h *Handler) proxyHeader(cx *layer4.Connection, remote, dest string) (first net.Buffers, ok bool) {
	raw := l4proxyprotocol.GetConn(cx)
	header := proxyproto.HeaderProxyFromAddrs(h.ppVersion, raw.RemoteAddr(), raw.LocalAddr())
	b, err := header.Format()
	if err != nil {
		metrics.CountError(metrics.KindProxyProtocol)
		h.logger.Error("build PROXY header", zap.String("remote", remote), zap.String("destination", dest), zap.Error(err))
		return nil, false
	}
	return net.Buffers{b}, true
}

// deadlineOf is ctx's deadline (connect_timeout from now).
func deadlineOf(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

// isClosedByPeer reports errors that are a peer's normal way of leaving:
// a reset or a broken pipe after the other side closed.
func isClosedByPeer(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// splitDestination checks that dest is host:port with a valid port.
func splitDestination(dest string) (host string, port int, err error) {
	host, portStr, err := net.SplitHostPort(dest)
	if err != nil {
		return "", 0, fmt.Errorf("destination %q: %v", dest, err)
	}
	if host == "" {
		return "", 0, fmt.Errorf("destination %q: missing host", dest)
	}
	port, err = strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("destination %q: port must be 1-65535", dest)
	}
	return host, port, nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	wa_proxy [<destination>] {
//		via <dialer> [<args...>] [{ ... }]
//		proxy_protocol v1|v2
//		connect_timeout <duration>
//		idle_timeout <duration>
//		allow <patterns...>
//		tls [{
//			server_name <name>
//			insecure_skip_verify
//			ca <file>
//		}]
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume handler name
	if d.NextArg() {
		h.Destination = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && opt != "allow" {
			return d.Errf("duplicate subdirective '%s'", opt)
		}
		seen[opt] = true
		switch opt {
		case "via":
			via, err := unmarshalVia(d)
			if err != nil {
				return err
			}
			h.ViaRaw = via
		case "proxy_protocol":
			if !d.NextArg() {
				return d.ArgErr()
			}
			v := d.Val()
			if v != "v1" && v != "v2" {
				return d.Errf("proxy_protocol: unknown version '%s' (want v1 or v2)", v)
			}
			h.ProxyProtocol = v
			if d.NextArg() {
				return d.ArgErr()
			}
		case "connect_timeout", "idle_timeout":
			dur, err := unmarshalTimeout(d, opt)
			if err != nil {
				return err
			}
			if opt == "connect_timeout" {
				h.ConnectTimeout = dur
			} else {
				h.IdleTimeout = dur
			}
		case "allow":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if _, err := upstreams.NewAllowlist(args); err != nil {
				return d.Errf("allow: %v", err)
			}
			h.Allow = append(h.Allow, args...)
		case "tls":
			h.TLS = new(UpstreamTLS)
			if err := h.TLS.unmarshalCaddyfile(d); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Handler)(nil)
	_ caddy.Validator       = (*Handler)(nil)
	_ layer4.NextHandler    = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
