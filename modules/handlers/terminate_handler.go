package handlers

import (
	"errors"
	"os"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4tls"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(&TLSTerminate{})
}

// DefaultHandshakeTimeout is wa_tls_terminate's default HandshakeTimeout.
const DefaultHandshakeTimeout = 10 * time.Second

// TLSTerminate (module `layer4.handlers.wa_tls_terminate`) terminates TLS
// as caddy-l4's `tls` handler does (it runs that handler: the same
// connection policies, certificates from Caddy's automation, the same
// placeholders and variables for what follows), within a time limit: a
// client that has not completed its handshake HandshakeTimeout after the
// handler started is disconnected. caddy-l4's router clears its matching
// deadline when a route matches, and its `tls` handler sets none, so
// without a limit a client that sends a ClientHello and then nothing holds
// its connection (and its place under wa_limit) for as long as it likes.
//
// A failed or timed-out handshake is counted in
// whatsapp_proxy_errors_total{kind="tls_handshake"} and logged at Debug
// (scanners and probes fail handshakes all day). After the handshake the
// deadline is gone: the handlers after this one (usually a subroute that
// sorts the decrypted bytes) see the connection as after `tls`.
type TLSTerminate struct {
	// The TLS handler this one runs: `connection_policies` as in caddy-l4's
	// `tls` handler (caddytls connection policies). Default: one policy
	// that takes Caddy's certificates as they are.
	l4tls.Handler

	// HandshakeTimeout is how long a client may take, from the time the
	// handler starts, to complete its TLS handshake. It covers the
	// client's reads and writes. Default: `10s`.
	HandshakeTimeout caddy.Duration `json:"handshake_timeout,omitempty"`

	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*TLSTerminate) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.wa_tls_terminate",
		New: func() caddy.Module { return new(TLSTerminate) },
	}
}

// Provision provisions the TLS handler and sets the default timeout.
func (t *TLSTerminate) Provision(ctx caddy.Context) error {
	t.logger = ctx.Logger()
	if t.HandshakeTimeout == 0 {
		t.HandshakeTimeout = caddy.Duration(DefaultHandshakeTimeout)
	}
	if err := t.Handler.Provision(ctx); err != nil {
		return err
	}
	return metrics.Register(ctx.GetMetricsRegistry())
}

// Validate checks the timeout.
func (t *TLSTerminate) Validate() error {
	if t.HandshakeTimeout < 0 {
		return errors.New("wa_tls_terminate: handshake_timeout must not be negative")
	}
	return nil
}

// Handle runs the TLS handshake within the timeout, then the handlers
// after this one on the decrypted connection.
func (t *TLSTerminate) Handle(cx *layer4.Connection, next layer4.Handler) error {
	if err := cx.SetDeadline(time.Now().Add(time.Duration(t.HandshakeTimeout))); err != nil {
		return err
	}
	handshaken := false
	err := t.Handler.Handle(cx, layer4.HandlerFunc(func(tcx *layer4.Connection) error {
		handshaken = true
		if err := cx.SetDeadline(time.Time{}); err != nil {
			return err
		}
		return next.Handle(tcx)
	}))
	if handshaken || err == nil {
		return err
	}
	metrics.CountError(metrics.KindTLSHandshake)
	msg := "TLS handshake failed"
	if errors.Is(err, os.ErrDeadlineExceeded) {
		msg = "TLS handshake timed out"
	}
	t.logger.Debug(msg, zap.String("remote", cx.RemoteAddr().String()),
		zap.Duration("handshake_timeout", time.Duration(t.HandshakeTimeout)), zap.Error(err))
	return nil // counted and logged: caddy-l4 would log it again at Error
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	wa_tls_terminate {
//		handshake_timeout <duration>
//		connection_policy {
//			...
//		}
//	}
//
// connection_policy is caddy-l4's `tls` handler's (a caddytls connection
// policy), and may be repeated. The block is optional.
func (t *TLSTerminate) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the handler's name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "handshake_timeout":
			if t.HandshakeTimeout != 0 {
				return d.Errf("duplicate subdirective '%s'", opt)
			}
			dur, err := unmarshalTimeout(d, opt)
			if err != nil {
				return err
			}
			t.HandshakeTimeout = dur
		case "connection_policy":
			cp := &caddytls.ConnectionPolicy{}
			if err := cp.UnmarshalCaddyfile(d.NewFromNextSegment()); err != nil {
				return err
			}
			t.ConnectionPolicies = append(t.ConnectionPolicies, cp)
		default:
			return d.Errf("wa_tls_terminate: unknown option '%s' (want handshake_timeout or connection_policy)", opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*TLSTerminate)(nil)
	_ caddy.Validator       = (*TLSTerminate)(nil)
	_ layer4.NextHandler    = (*TLSTerminate)(nil)
	_ caddyfile.Unmarshaler = (*TLSTerminate)(nil)
)
