package matchers

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(&MatchSilent{})
}

// defaultSilentWait is how long wa_silent waits by default.
const defaultSilentWait = 2 * time.Second

// MatchSilent matches a client that sends nothing for a while after it
// connects, as clients of server-speaks-first protocols (SMTP, IMAP, FTP, a
// MySQL client...) do. It lets such a client reach a fallback route after a
// short wait instead of being closed at caddy-l4's matching timeout.
//
// It must be the matcher of the FIRST route: caddy-l4's router stops at the
// first matcher that asks for more bytes and then blocks reading from the
// client until the matching timeout, after which it closes the connection,
// so a silent client never reaches a later route. wa_silent never asks for
// more bytes: it waits by peeking at the socket (MSG_PEEK), so it consumes
// nothing, and returns as soon as the client sends a byte (no match) or the
// wait ends in silence (match).
//
// It waits only on a plain TCP or Unix socket (*net.TCPConn, *net.UnixConn)
// that has no bytes prefetched: after a handler that wraps the connection
// and may buffer bytes (tls, proxy_protocol), on UDP, and on platforms other
// than Linux, macOS, the BSDs and Solaris, it does not match.
//
// On a match it records the connection's protocol as `raw` for the
// `protocol` label of whatsapp_proxy_protocol_connections.
type MatchSilent struct {
	// Wait is how long the client may stay silent before it is matched.
	// Keep it below the server's matching_timeout (3s by default), and above
	// the time your slowest clients take to send their first bytes, or they
	// will be routed as silent. Default: `2s`.
	Wait caddy.Duration `json:"wait,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*MatchSilent) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.matchers.wa_silent",
		New: func() caddy.Module { return new(MatchSilent) },
	}
}

// Provision sets the default wait.
func (m *MatchSilent) Provision(_ caddy.Context) error {
	if m.Wait == 0 {
		m.Wait = caddy.Duration(defaultSilentWait)
	}
	return nil
}

// Validate checks that the wait is positive.
func (m *MatchSilent) Validate() error {
	if m.Wait <= 0 {
		return fmt.Errorf("wa_silent: wait must be positive, got %v", time.Duration(m.Wait))
	}
	return nil
}

// Match returns true if the client has sent nothing for Wait. It returns
// false as soon as the client sends a byte, closes its side or fails, and
// at once when there are already prefetched bytes or the connection is not
// a socket it can peek at.
func (m *MatchSilent) Match(cx *layer4.Connection) (bool, error) {
	if len(cx.MatchingBytes()) > 0 {
		return false, nil // the client has spoken
	}
	silent, err := peekSilent(cx.Conn, time.Duration(m.Wait))
	if err != nil || !silent {
		return false, err
	}
	metrics.SetProtocol(cx, metrics.ProtocolRaw)
	return true, nil
}

// UnmarshalCaddyfile sets up the MatchSilent from Caddyfile tokens. Syntax:
//
//	wa_silent [<wait>]
func (m *MatchSilent) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	_, wrapper := d.Next(), d.Val() // consume wrapper name

	if d.NextArg() {
		dur, err := caddy.ParseDuration(d.Val())
		if err != nil {
			return d.Errf("%s: bad wait '%s': %v", wrapper, d.Val(), err)
		}
		if dur <= 0 {
			return d.Errf("%s: wait must be positive, got '%s'", wrapper, d.Val())
		}
		m.Wait = caddy.Duration(dur)
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		return d.Errf("unrecognized subdirective '%s'", d.Val())
	}
	return nil
}

// Interface guards
var (
	_ layer4.ConnMatcher    = (*MatchSilent)(nil)
	_ caddy.Provisioner     = (*MatchSilent)(nil)
	_ caddy.Validator       = (*MatchSilent)(nil)
	_ caddyfile.Unmarshaler = (*MatchSilent)(nil)
)
