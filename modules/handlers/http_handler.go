package handlers

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

func init() {
	caddy.RegisterModule(&HandleHTTP{})
}

// Defaults of the wa_http handler (connect_timeout and idle_timeout are
// wa_proxy's).
const (
	DefaultResponseTimeout = 60 * time.Second
)

// The values of wa_http's origin_form option.
const (
	// OriginFormPage answers origin-form requests like a plain web server,
	// with a small default page.
	OriginFormPage = "page"
	// OriginFormReject answers origin-form requests `400 not a proxy
	// request`.
	OriginFormReject = "reject"
)

// HandleHTTP (module `layer4.handlers.wa_http`) is an HTTP/1.x forward
// proxy on a layer4 connection, the kind browsers, curl and other apps are
// configured with. It answers `CONNECT host:port` with `200 Connection
// Established` and then carries the raw bytes both ways, like wa_proxy; it
// forwards absolute-form requests (`GET http://host/path HTTP/1.1`) and
// streams the responses back, keeping the client's connection alive across
// requests, to the same or different hosts. Every destination is reached
// through the dialer in `via` and must be in the allowlist: the proxy is
// never an open relay.
//
// Requests are parsed and forwarded by Go's net/http (http.ReadRequest and
// an http.Transport that dials through the dialer). Forwarded messages
// follow RFC 9110's rules for proxies: hop-by-hop fields, the fields named
// in Connection, Proxy-Connection and Proxy-Authorization are not
// forwarded, and a Via field is added, in both directions.
type HandleHTTP struct {
	// Via is the dialer that reaches destinations: a module in the
	// `wa.dialers` namespace, named by its `dialer` key, e.g.
	// `{"dialer": "socks5", "servers": ["127.0.0.1:9050"]}`.
	// Default: `{"dialer": "direct"}`.
	ViaRaw json.RawMessage `json:"via,omitempty" caddy:"namespace=wa.dialers inline_key=dialer"`

	// Allow lists the destinations that may be reached, as in wa_proxy:
	// host names (`whatsapp.net`), subdomain wildcards (`*.whatsapp.net`),
	// IP literals and CIDR ranges, or `*` for any public destination. A
	// request for a destination outside the list is answered `403` and
	// never dialled. Internal addresses (loopback, link-local such as
	// 169.254.169.254, private, unspecified) are reached only when an IP or
	// CIDR pattern names them, whether they are requested as IP literals or
	// are what an allowed name resolves to (with the direct dialer).
	// Default: `whatsapp.net *.whatsapp.net whatsapp.com *.whatsapp.com`.
	Allow []string `json:"allow,omitempty"`

	// Auth requires clients to authenticate to the proxy. Requests without
	// the right credentials are answered `407` with a
	// `Proxy-Authenticate` challenge. Default: none.
	Auth *HTTPAuth `json:"auth,omitempty"`

	// Headers changes the header fields of forwarded requests (`request`)
	// and of the responses relayed back (`response`): add, set, delete or
	// replace, with placeholders, as Caddy's `headers` handler does. They
	// apply after the proxy's own changes (hop-by-hop removal, Via). They do
	// not apply to CONNECT, whose bytes are carried as they are.
	// Default: none.
	Headers *HTTPHeaders `json:"headers,omitempty"`

	// ConnectTimeout bounds connecting to a destination, including every
	// SOCKS5 handshake; when it passes the client gets `504`.
	// Default: `5s`.
	ConnectTimeout caddy.Duration `json:"connect_timeout,omitempty"`

	// ResponseTimeout bounds the wait for a destination's response
	// header once the request is sent; when it passes the client gets
	// `504`. Default: `60s`.
	ResponseTimeout caddy.Duration `json:"response_timeout,omitempty"`

	// IdleTimeout closes a client connection when no byte has moved for
	// this long: while waiting for the next request on a kept-alive
	// connection, while receiving a request's header (which must arrive
	// within it), in a request or response body, and in a CONNECT tunnel
	// (in either direction). Default: `200s`.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// OriginForm says how origin-form requests are answered
	// (`GET /path HTTP/1.1`: what a browser, or a censor probing the port,
	// sends to a web server; not a proxy request). `page` answers like a
	// plain web server, so the port does not give the proxy away: `200`
	// with a small default HTML page for `GET` or `HEAD` of `/`, `404` for
	// other paths, `405` for other methods, without proxy authentication
	// and without `Server` or `Via` fields. `reject` answers
	// `400 not a proxy request` (after proxy authentication, when `auth` is
	// set). CONNECT and absolute-form requests are not affected.
	// Default: `page`.
	OriginForm string `json:"origin_form,omitempty"`

	dialer    upstreams.Dialer
	dialerID  string
	allow     *upstreams.Allowlist
	userHash  *[sha256.Size]byte // nil: no authentication
	passHash  *[sha256.Size]byte
	transport *http.Transport
	logger    *zap.Logger
}

// HTTPAuth is the authentication wa_http requires of its clients.
type HTTPAuth struct {
	// Basic is HTTP Basic authentication (RFC 7617) in
	// `Proxy-Authorization`, with one user name and password.
	Basic *HTTPBasicAuth `json:"basic,omitempty"`
}

// HTTPBasicAuth holds the one user name and password clients must send.
type HTTPBasicAuth struct {
	// Username the clients must send. Placeholders such as
	// `{env.PROXY_USER}` are expanded at provision, so secrets stay out of
	// the adapted JSON. It must not contain `:`.
	Username string `json:"username,omitempty"`

	// Password the clients must send. Placeholders such as
	// `{env.PROXY_PASSWORD}` are expanded at provision. It never appears in
	// logs.
	Password string `json:"password,omitempty"`
}

// HTTPHeaders are the header rules of wa_http.
type HTTPHeaders struct {
	// Request changes the fields of requests forwarded to destinations.
	Request *headers.HeaderOps `json:"request,omitempty"`
	// Response changes the fields of responses relayed to clients.
	Response *headers.HeaderOps `json:"response,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*HandleHTTP) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.wa_http",
		New: func() caddy.Module { return new(HandleHTTP) },
	}
}

// Provision sets defaults, expands the credentials, loads the dialer, sets
// up the transport and registers the metrics.
func (h *HandleHTTP) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.ConnectTimeout == 0 {
		h.ConnectTimeout = caddy.Duration(DefaultConnectTimeout)
	}
	if h.ResponseTimeout == 0 {
		h.ResponseTimeout = caddy.Duration(DefaultResponseTimeout)
	}
	if h.IdleTimeout == 0 {
		h.IdleTimeout = caddy.Duration(DefaultIdleTimeout)
	}
	if h.OriginForm == "" {
		h.OriginForm = OriginFormPage
	}

	allow, err := loadAllowlist(h.Allow, h.logger)
	if err != nil {
		return err
	}
	h.allow = allow

	if h.Auth != nil && h.Auth.Basic != nil {
		repl := caddy.NewReplacer()
		user := repl.ReplaceKnown(h.Auth.Basic.Username, "")
		pass := repl.ReplaceKnown(h.Auth.Basic.Password, "")
		switch {
		case user == "":
			return errors.New("auth basic: the username is empty (is its environment variable set?)")
		case strings.Contains(user, ":"):
			return errors.New("auth basic: the username must not contain ':'")
		case pass == "":
			return errors.New("auth basic: the password is empty (is its environment variable set?)")
		}
		uh, ph := sha256.Sum256([]byte(user)), sha256.Sum256([]byte(pass))
		h.userHash, h.passHash = &uh, &ph
	}

	if h.Headers != nil {
		for _, ops := range []*headers.HeaderOps{h.Headers.Request, h.Headers.Response} {
			if err := ops.Provision(ctx); err != nil {
				return fmt.Errorf("headers: %w", err)
			}
		}
	}

	h.dialer, h.dialerID, err = loadDialer(ctx, h, &h.ViaRaw)
	if err != nil {
		return err
	}
	h.transport = &http.Transport{
		Proxy:                  nil, // never the environment's proxy
		DialContext:            h.dialTransport,
		TLSHandshakeTimeout:    time.Duration(h.ConnectTimeout),
		ResponseHeaderTimeout:  time.Duration(h.ResponseTimeout),
		ExpectContinueTimeout:  time.Second,
		DisableCompression:     true, // the client's Accept-Encoding goes through unchanged
		MaxIdleConns:           100,
		MaxIdleConnsPerHost:    4,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 1 << 20,
	}
	return finishProvision(ctx, "layer4.handlers.wa_http", "", h.dialer, h.dialerID)
}

// Validate checks the configuration.
func (h *HandleHTTP) Validate() error {
	for _, t := range []struct {
		name string
		d    caddy.Duration
	}{{"connect_timeout", h.ConnectTimeout}, {"response_timeout", h.ResponseTimeout}, {"idle_timeout", h.IdleTimeout}} {
		if t.d < 0 {
			return fmt.Errorf("%s must not be negative: %v", t.name, time.Duration(t.d))
		}
	}
	if h.Auth != nil && h.Auth.Basic == nil {
		return errors.New("auth: no scheme configured (want basic)")
	}
	switch h.OriginForm {
	case "", OriginFormPage, OriginFormReject:
	default:
		return fmt.Errorf("origin_form: unknown value %q (want %s or %s)", h.OriginForm, OriginFormPage, OriginFormReject)
	}
	return nil
}

// Cleanup closes the transport's idle connections to destinations.
func (h *HandleHTTP) Cleanup() error {
	if h.transport != nil {
		h.transport.CloseIdleConnections()
	}
	return nil
}

// dial connects to addr ("host:port") through the dialer, within
// connect_timeout. The allowlist travels in the context, so that the direct
// dialer refuses a name that resolves to an internal address.
func (h *HandleHTTP) dial(ctx context.Context, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(upstreams.WithAllowlist(ctx, h.allow), time.Duration(h.ConnectTimeout))
	defer cancel()
	return h.dialer.DialContext(ctx, "tcp", addr)
}

// dialTransport is the transport's DialContext. Connections to destinations
// time out when idle like client connections do, so a destination that
// stops sending mid-response cannot hold a client forever.
func (h *HandleHTTP) dialTransport(ctx context.Context, _, addr string) (net.Conn, error) {
	c, err := h.dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	return &idleConn{Conn: c, idle: time.Duration(h.IdleTimeout)}, nil
}

// idleConn moves a connection's deadlines forward on every read and write.
type idleConn struct {
	net.Conn
	idle time.Duration
}

func (c *idleConn) Read(p []byte) (int, error) {
	if err := c.SetReadDeadline(time.Now().Add(c.idle)); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

func (c *idleConn) Write(p []byte) (int, error) {
	if err := c.SetWriteDeadline(time.Now().Add(c.idle)); err != nil {
		return 0, err
	}
	return c.Conn.Write(p)
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	wa_http {
//		via <dialer> [<args...>] [{ ... }]
//		allow <patterns...>
//		auth basic <username> <password>
//		header request|response [+|-]<field> [<value>|<find>] [<replace>]
//		connect_timeout <duration>
//		response_timeout <duration>
//		idle_timeout <duration>
//		origin_form page|reject
//	}
//
// `allow` and `header` may be repeated; the others may be given once.
func (h *HandleHTTP) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume handler name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] && opt != "allow" && opt != "header" {
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
		case "allow":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if _, err := upstreams.NewAllowlist(args); err != nil {
				return d.Errf("allow: %v", err)
			}
			h.Allow = append(h.Allow, args...)
		case "auth":
			args := d.RemainingArgs()
			if len(args) == 0 || args[0] != "basic" {
				return d.Errf("auth: unknown scheme (want: auth basic <username> <password>)")
			}
			if len(args) != 3 {
				return d.Errf("auth basic: want a username and a password (auth basic <username> <password>)")
			}
			h.Auth = &HTTPAuth{Basic: &HTTPBasicAuth{Username: args[1], Password: args[2]}}
		case "header":
			if err := h.unmarshalHeader(d); err != nil {
				return err
			}
		case "connect_timeout", "response_timeout", "idle_timeout":
			dur, err := unmarshalTimeout(d, opt)
			if err != nil {
				return err
			}
			switch opt {
			case "connect_timeout":
				h.ConnectTimeout = dur
			case "response_timeout":
				h.ResponseTimeout = dur
			default:
				h.IdleTimeout = dur
			}
		case "origin_form":
			if !d.NextArg() {
				return d.Errf("origin_form: want page or reject")
			}
			switch v := d.Val(); v {
			case OriginFormPage, OriginFormReject:
				h.OriginForm = v
			default:
				return d.Errf("origin_form: unknown value '%s' (want page or reject)", v)
			}
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", opt)
		}
	}
	return nil
}

// unmarshalHeader reads `header request|response <field> [<value>] [<replace>]`.
func (h *HandleHTTP) unmarshalHeader(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 2 || len(args) > 4 {
		return d.Errf("header: want header request|response [+|-]<field> [<value>|<find>] [<replace>]")
	}
	if h.Headers == nil {
		h.Headers = new(HTTPHeaders)
	}
	var ops **headers.HeaderOps
	switch args[0] {
	case "request":
		ops = &h.Headers.Request
	case "response":
		ops = &h.Headers.Response
	default:
		return d.Errf("header: unknown direction '%s' (want request or response)", args[0])
	}
	if *ops == nil {
		*ops = new(headers.HeaderOps)
	}
	field, rest := args[1], args[2:]
	if strings.TrimLeft(field, "+-") == "" {
		return d.Errf("header: missing field name")
	}
	var err error
	switch {
	case len(rest) == 0 && !strings.HasPrefix(field, "-"):
		return d.Errf("header: '%s' needs a value (or write -%s to delete it)", field, strings.TrimLeft(field, "+"))
	case len(rest) == 0:
		err = headers.CaddyfileHeaderOp(*ops, field, "", nil)
	case strings.HasPrefix(field, "-"):
		return d.Errf("header: deleting '%s' takes no value", field[1:])
	case len(rest) == 1:
		err = headers.CaddyfileHeaderOp(*ops, field, rest[0], nil)
	default:
		err = headers.CaddyfileHeaderOp(*ops, field, rest[0], &rest[1])
	}
	if err != nil {
		return d.Errf("header: %v", err)
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*HandleHTTP)(nil)
	_ caddy.Validator       = (*HandleHTTP)(nil)
	_ caddy.CleanerUpper    = (*HandleHTTP)(nil)
	_ layer4.NextHandler    = (*HandleHTTP)(nil)
	_ caddyfile.Unmarshaler = (*HandleHTTP)(nil)
)
