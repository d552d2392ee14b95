package handlers

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

// UpstreamTLS wraps wa_proxy's connection to its destination in TLS, so a
// stream that arrived in clear (or was decrypted by caddy-l4's `tls`
// handler) leaves encrypted. The destination's certificate is verified
// against the system's roots, or the `ca_file` ones, unless
// `insecure_skip_verify` is set.
//
// A PROXY protocol header (`proxy_protocol`) is sent in clear before the
// TLS handshake, as HAProxy's `send-proxy` does on an `ssl` server line.
type UpstreamTLS struct {
	// ServerName is the name sent in the ClientHello (SNI) and that the
	// destination's certificate must be valid for. Placeholders are expanded
	// per connection (e.g. `{l4.wa_tls.server_name}` to keep the client's
	// SNI). An IP address is checked against the certificate's IP addresses
	// and is not sent as SNI. Default: the destination's host.
	ServerName string `json:"server_name,omitempty"`

	// InsecureSkipVerify accepts any certificate from the destination: the
	// connection is encrypted but not authenticated, so anyone on the path
	// can intercept it. Only for testing, or a destination authenticated
	// otherwise (WhatsApp's own Noise handshake inside). Default: `false`.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`

	// CAFile is a PEM file holding the CA certificates that the
	// destination's certificate must chain to, instead of the system's
	// roots. Global placeholders such as `{env.X}` are expanded when the
	// config loads. Default: the system's roots.
	CAFile string `json:"ca_file,omitempty"`

	config *tls.Config // shared by every connection; ServerName unset
}

// provision loads the CA file and builds the TLS client config.
func (u *UpstreamTLS) provision() error {
	u.config = &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: u.InsecureSkipVerify, //nolint:gosec // an explicit, documented option
		// Resumption makes repeated connections to the destination cheap.
		ClientSessionCache: tls.NewLRUClientSessionCache(0),
	}
	if u.CAFile != "" {
		path := caddy.NewReplacer().ReplaceAll(u.CAFile, "")
		pem, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("tls: reading ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("tls: ca_file %s holds no PEM certificate", path)
		}
		u.config.RootCAs = pool
	}
	return nil
}

// validate checks the options.
func (u *UpstreamTLS) validate() error {
	if u.InsecureSkipVerify && u.CAFile != "" {
		return errors.New("tls: ca_file has no effect with insecure_skip_verify; remove one of them")
	}
	return nil
}

// client performs the TLS handshake over up, within ctx's deadline, sending
// serverName (placeholders already expanded; the destination's host when
// empty). On failure it returns a *upstreams.DialError of kind
// metrics.KindUpstreamTLS (metrics.KindTimeout for the deadline); the caller
// closes up.
func (u *UpstreamTLS) client(ctx context.Context, up net.Conn, serverName, host string) (*tls.Conn, error) {
	if serverName == "" {
		serverName = strings.Trim(host, "[]")
	}
	cfg := u.config.Clone()
	cfg.ServerName = serverName
	tc := tls.Client(up, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		kind := metrics.KindUpstreamTLS
		if ctx.Err() != nil {
			kind = metrics.KindTimeout
		}
		return nil, &upstreams.DialError{Kind: kind, Err: fmt.Errorf("tls handshake with %s (server name %q): %w", up.RemoteAddr(), serverName, err)}
	}
	return tc, nil
}

// unmarshalCaddyfile sets up the UpstreamTLS from the tokens of wa_proxy's
// `tls` subdirective. Syntax:
//
//	tls [{
//		server_name <name>
//		insecure_skip_verify
//		ca <file>
//	}]
func (u *UpstreamTLS) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("tls: duplicate subdirective '%s'", opt)
		}
		seen[opt] = true
		switch opt {
		case "server_name":
			if !d.NextArg() {
				return d.ArgErr()
			}
			u.ServerName = d.Val()
		case "insecure_skip_verify":
			u.InsecureSkipVerify = true
		case "ca":
			if !d.NextArg() {
				return d.ArgErr()
			}
			u.CAFile = d.Val()
		default:
			return d.Errf("tls: unrecognized subdirective '%s'", opt)
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	if err := u.validate(); err != nil {
		return d.Err(err.Error())
	}
	return nil
}
