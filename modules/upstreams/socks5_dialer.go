package upstreams

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(new(SOCKS5))
}

// SOCKS5 connects to destinations through SOCKS5 servers (RFC 1928), such as
// Tor or a chained exit, with optional username/password authentication
// (RFC 1929). Host names are sent to the server as names, so they are
// resolved at the exit, not here.
//
// The servers are tried in order: when one fails (unreachable, refused,
// authentication, a bad reply, or its share of the deadline passed), the next
// one is tried while the context's deadline allows. With a health check,
// servers that fail it are skipped until they pass again, unless every
// server fails it.
type SOCKS5 struct {
	// Servers are the SOCKS5 servers' addresses ("host:port"), in the order
	// they are tried. Placeholders such as `{env.SOCKS_SERVER}` are expanded
	// at provision. At least one is required.
	Servers []string `json:"servers,omitempty"`

	// Username for username/password authentication (RFC 1929), 1 to 255
	// bytes. Set with Password, or leave both empty for no authentication.
	// Placeholders such as `{env.SOCKS_USERNAME}` are expanded at provision,
	// so secrets stay out of the adapted JSON. Default: none.
	Username string `json:"username,omitempty"`

	// Password for username/password authentication (RFC 1929), 1 to 255
	// bytes. Placeholders such as `{env.SOCKS_PASSWORD}` are expanded at
	// provision, so the secret stays out of the adapted JSON. It never
	// appears in logs or errors. Default: none.
	Password string `json:"password,omitempty"`

	// HealthCheck, when set, checks each server on an interval by
	// connecting through it to a destination (see HealthCheck), and the
	// failover order skips the servers that fail it. Default: no checks.
	HealthCheck *HealthCheck `json:"health_check,omitempty"`

	servers  []string  // expanded Servers
	username string    // expanded Username
	password string    // expanded Password
	greeting []byte    // the method selection message
	auth     []byte    // the RFC 1929 request (holds the password), nil without credentials
	toServer Direct    // connects to the servers (see serverDialer)
	health   healthSet // one checker per server, or none
}

// CaddyModule returns the Caddy module information.
func (*SOCKS5) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "wa.dialers.socks5",
		New: func() caddy.Module { return new(SOCKS5) },
	}
}

// Provision expands placeholders, checks that each server is a host:port and
// starts the health checks.
func (s *SOCKS5) Provision(ctx caddy.Context) error {
	repl := caddy.NewReplacer()
	s.servers = make([]string, 0, len(s.Servers))
	for _, raw := range s.Servers {
		server := strings.TrimSpace(repl.ReplaceKnown(raw, ""))
		if err := checkHostPort(server); err != nil {
			return fmt.Errorf("socks5: server %q: %v", raw, err)
		}
		s.servers = append(s.servers, server)
	}
	s.username = repl.ReplaceKnown(s.Username, "")
	s.password = repl.ReplaceKnown(s.Password, "")
	s.greeting = socksGreeting(s.hasCredentials())
	s.auth = nil
	if s.hasCredentials() && len(s.username) <= maxSocksName && len(s.password) <= maxSocksName {
		s.auth = socksUserPass(s.username, s.password)
	} // else Validate reports the problem
	s.toServer = serverDialer()

	// no checks for a config that Validate rejects
	if s.HealthCheck == nil || s.Validate() != nil {
		return nil
	}
	settings, err := s.HealthCheck.provision()
	if err != nil {
		return fmt.Errorf("socks5: %w", err)
	}
	settings.credentialsHash = credentialsHash(s.username, s.password)
	for _, server := range s.servers {
		if err := s.health.add(ctx, "socks5 "+server, settings, s.probe(server, settings.destination)); err != nil {
			return fmt.Errorf("socks5: %w", err)
		}
	}
	return nil
}

// probe returns a health check of server: a CONNECT to destination through
// it, closed as soon as it succeeds.
func (s *SOCKS5) probe(server, destination string) func(context.Context) error {
	return func(ctx context.Context) error {
		buf := make([]byte, 2*socksMsgLen)
		req, err := appendSocksConnect(buf[:0:socksMsgLen], destination)
		if err != nil {
			return err
		}
		conn, err := s.dialServer(ctx, server, 1, req, buf[socksMsgLen:])
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

// Cleanup stops the health checks no other config uses.
func (s *SOCKS5) Cleanup() error { return s.health.release() }

// Validate checks the provisioned configuration.
func (s *SOCKS5) Validate() error {
	if len(s.servers) == 0 {
		return errors.New("socks5: at least one server is required")
	}
	switch {
	case s.username != "" && s.password == "":
		return errors.New("socks5: a username is set but the password is empty: set both or neither")
	case s.username == "" && s.password != "":
		return errors.New("socks5: a password is set but the username is empty: set both or neither")
	case len(s.username) > maxSocksName:
		return fmt.Errorf("socks5: the username is %d bytes long; RFC 1929 allows at most %d", len(s.username), maxSocksName)
	case len(s.password) > maxSocksName:
		return fmt.Errorf("socks5: the password is longer than %d bytes, the most RFC 1929 allows", maxSocksName)
	}
	return nil
}

func (s *SOCKS5) hasCredentials() bool { return s.username != "" && s.password != "" }

// DialContext connects to address ("host:port") through the first SOCKS5
// server that accepts, and returns the *net.TCPConn to that server, positioned
// right after the CONNECT reply. Errors are *DialError values; see the Kind
// constants of package metrics.
func (s *SOCKS5) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	if len(s.servers) == 0 {
		return nil, dialErrorf(metrics.KindDial, "socks5: no servers provisioned")
	}
	// One buffer for the request (first half) and the replies (second half).
	buf := make([]byte, 2*socksMsgLen)
	req, err := appendSocksConnect(buf[:0:socksMsgLen], address)
	if err != nil {
		return nil, err
	}
	scratch := buf[socksMsgLen:]

	var skipBuf [1]uint64
	skip, left := s.skipped(skipBuf[:])

	var errs []error
	lastKind := ""
	for i, server := range s.servers {
		if skip.has(i) {
			continue
		}
		if ctx.Err() != nil {
			for j := i; j < len(s.servers); j++ {
				if skip.has(j) {
					continue
				}
				errs = append(errs, &DialError{Kind: dialErrKind(ctx, ctx.Err()),
					Err: fmt.Errorf("socks5 %s: not tried: %w", s.servers[j], ctx.Err())})
			}
			if lastKind == "" {
				lastKind = dialErrKind(ctx, ctx.Err())
			}
			break
		}
		conn, err := s.dialServer(ctx, server, left, req, scratch)
		if err == nil {
			return conn, nil
		}
		left--
		errs = append(errs, err)
		lastKind = ErrorKind(err)
	}
	if len(errs) == 1 {
		return nil, errs[0]
	}
	return nil, &DialError{Kind: lastKind, Err: attemptErrors(errs)}
}

// serverSet is a set of server indexes, a bit each.
type serverSet []uint64

func (ss serverSet) has(i int) bool { return ss != nil && ss[i/64]&(1<<(i%64)) != 0 }

// skipped returns the servers the failover order skips now, the unhealthy
// ones, and how many it tries. It skips none when there is no health check,
// or when every server is unhealthy: then all are tried, in order, as
// without a health check. buf is the set's storage when it fits (64
// servers); the set is nil when none is skipped.
func (s *SOCKS5) skipped(buf []uint64) (skip serverSet, tried int) {
	checkers := s.health.checkers
	if len(checkers) != len(s.servers) {
		return nil, len(s.servers)
	}
	unhealthy := 0
	for i, c := range checkers {
		if c.healthy.Load() {
			continue
		}
		if skip == nil {
			if words := (len(checkers) + 63) / 64; words <= len(buf) {
				skip = buf[:words]
				clear(skip)
			} else {
				skip = make(serverSet, words)
			}
		}
		skip[i/64] |= 1 << (i % 64)
		unhealthy++
	}
	if unhealthy == len(s.servers) {
		return nil, len(s.servers)
	}
	return skip, len(s.servers) - unhealthy
}

// serverDialer is how the dialer reaches its servers: as wa.dialers.direct
// does (no TCP keep-alive, see tcpDialer), a server given by name resolved
// through the shared resolve cache (see ResolveCache: not once per
// connection) and Happy Eyeballs over its addresses. The allowlist does not
// apply: the servers are the operator's (Tor usually listens on loopback).
func serverDialer() Direct {
	return Direct{cacheFor: DefaultResolveCache, resolver: net.DefaultResolver, dialer: tcpDialer()}
}

// dialServer connects to server and runs the handshake. left is the number of
// servers not tried yet, this one included. When the context has a deadline,
// connecting to this server and negotiating the method (and authenticating)
// may take only its share of the time left, so that a server that is down or
// hung leaves time for the next ones; waiting for the CONNECT reply may take
// all the time left, since that is where the exit does its work (a slow exit
// is still an exit).
func (s *SOCKS5) dialServer(ctx context.Context, server string, left int, req, scratch []byte) (*net.TCPConn, error) {
	deadline, hasDeadline := ctx.Deadline()
	share := deadline
	dctx := ctx
	if hasDeadline && left > 1 {
		share = time.Now().Add(time.Until(deadline) / time.Duration(left))
		var cancel context.CancelFunc
		dctx, cancel = context.WithDeadline(ctx, share)
		defer cancel()
	}
	c, err := s.toServer.dial(dctx, "tcp", server, nil)
	if err != nil {
		return nil, &DialError{Kind: ErrorKind(err), Err: fmt.Errorf("socks5 %s: dial: %w", server, dialCause(err))}
	}
	conn := c.(*net.TCPConn)

	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	if hasDeadline {
		_ = conn.SetDeadline(share)
	}
	err = socksNegotiate(conn, s.greeting, s.auth, scratch)
	if err == nil {
		if hasDeadline {
			_ = conn.SetDeadline(deadline)
		}
		err = socksConnect(conn, req, scratch)
	}
	if !stop() && err == nil {
		err = &socksStepError{"connect", ctx.Err()} // cancelled as the handshake ended
	}
	if err == nil {
		err = conn.SetDeadline(time.Time{})
	}
	if err != nil {
		_ = conn.Close()
		return nil, socksDialError(ctx, server, err)
	}
	return conn, nil
}

// dialCause is the cause of a failed connect to a server, without the
// "dial <address>: " the direct dialer's messages start with (dialServer
// says "dial:" itself).
func dialCause(err error) error {
	var de *DialError
	if errors.As(err, &de) {
		if cause := errors.Unwrap(de.Err); cause != nil {
			return cause
		}
		return de.Err
	}
	return opCause(err)
}

// socksDialError turns a handshake error into a *DialError whose message
// starts with "socks5 <server>: ".
func socksDialError(ctx context.Context, server string, err error) error {
	var re *socksReplyError
	if errors.As(err, &re) {
		return &DialError{Kind: re.kind, Err: fmt.Errorf("socks5 %s: %s", server, re.msg)}
	}
	var se *socksStepError
	if !errors.As(err, &se) {
		return &DialError{Kind: metrics.KindDial, Err: fmt.Errorf("socks5 %s: %w", server, err)}
	}
	if cerr := ctx.Err(); cerr != nil {
		// The deadline passed or the dial was cancelled; the I/O error is
		// just its echo ("use of closed network connection", "i/o timeout").
		return &DialError{Kind: dialErrKind(ctx, cerr), Err: fmt.Errorf("socks5 %s: %s: %w", server, se.step, cerr)}
	}
	if kind := dialErrKind(ctx, se.err); kind == metrics.KindTimeout {
		return &DialError{Kind: kind, Err: fmt.Errorf("socks5 %s: %s: %w", server, se.step, opCause(se.err))}
	}
	if errors.Is(se.err, io.EOF) || errors.Is(se.err, io.ErrUnexpectedEOF) ||
		errors.Is(se.err, syscall.ECONNRESET) || errors.Is(se.err, syscall.EPIPE) {
		if se.step == "authentication" {
			// Servers that reject credentials without a status do this.
			return &DialError{Kind: metrics.KindSOCKS5Auth, Err: fmt.Errorf(
				"socks5 %s: username/password rejected (server closed the connection without a status)", server)}
		}
		return &DialError{Kind: metrics.KindSOCKS5Protocol, Err: fmt.Errorf(
			"socks5 %s: %s: server closed the connection (%w)", server, se.step, opCause(se.err))}
	}
	return &DialError{Kind: metrics.KindDial, Err: fmt.Errorf("socks5 %s: %s: %w", server, se.step, opCause(se.err))}
}

// attemptErrors are the errors of each server tried, in order. The message
// joins them with "; " (one line, for logs).
type attemptErrors []error

func (e attemptErrors) Error() string {
	var b strings.Builder
	for i, err := range e {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

func (e attemptErrors) Unwrap() []error { return e }

// checkHostPort reports whether address is a host:port with a non-empty host
// and a numeric port from 1 to 65535.
func checkHostPort(address string) error {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	if host == "" {
		return errors.New("missing host")
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("invalid port %q: want a number from 1 to 65535", port)
	}
	return nil
}

// String describes the dialer for logs: the servers, and whether it
// authenticates. It never includes the credentials.
func (s *SOCKS5) String() string {
	servers := s.servers
	if servers == nil {
		servers = s.Servers
	}
	str := "socks5 " + strings.Join(servers, ",")
	if s.Username != "" || s.Password != "" {
		str += " with username/password"
	}
	if s.HealthCheck != nil {
		str += " with health check"
	}
	return str
}

// UnmarshalCaddyfile sets up the dialer from Caddyfile tokens. Syntax:
//
//	via socks5 <host:port> [<host:port>...] {
//		username <username>
//		password <password>
//		health_check [<destination>] {
//			interval <duration>
//			timeout <duration>
//			unhealthy_after <n>
//			healthy_after <n>
//		}
//	}
//
// Values are taken as written; placeholders such as {env.SOCKS_PASSWORD} are
// expanded at provision.
func (s *SOCKS5) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the dialer name
	for d.NextArg() {
		// an address with a placeholder is checked once expanded, in
		// Provision; the others here, where the error can name the line
		if server := d.Val(); !strings.Contains(server, "{") {
			if err := checkHostPort(server); err != nil {
				return d.Errf("socks5: server %q: %v", server, err)
			}
		}
		s.Servers = append(s.Servers, d.Val())
	}
	if len(s.Servers) == 0 {
		return d.Errf("socks5: at least one server address (host:port) is required")
	}
	var hasUsername, hasPassword bool
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "username":
			if hasUsername {
				return d.Errf("socks5: duplicate subdirective '%s'", opt)
			}
			if d.CountRemainingArgs() != 1 {
				return d.Errf("socks5: subdirective '%s' takes exactly one argument", opt)
			}
			d.NextArg()
			s.Username, hasUsername = d.Val(), true
		case "password":
			if hasPassword {
				return d.Errf("socks5: duplicate subdirective '%s'", opt)
			}
			if d.CountRemainingArgs() != 1 { // never echo the tokens: one may be the password
				return d.Errf("socks5: subdirective '%s' takes exactly one argument", opt)
			}
			d.NextArg()
			s.Password, hasPassword = d.Val(), true
		case "health_check":
			if s.HealthCheck != nil {
				return d.Errf("socks5: duplicate subdirective '%s'", opt)
			}
			hc, err := unmarshalHealthCheck(d, "socks5")
			if err != nil {
				return err
			}
			s.HealthCheck = hc
			continue // unmarshalHealthCheck consumed its block
		default:
			return d.Errf("socks5: unrecognized subdirective '%s'", opt)
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("socks5: malformed subdirective '%s': blocks are not supported", opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ Dialer                = (*SOCKS5)(nil)
	_ caddy.Module          = (*SOCKS5)(nil)
	_ caddy.Provisioner     = (*SOCKS5)(nil)
	_ caddy.Validator       = (*SOCKS5)(nil)
	_ caddy.CleanerUpper    = (*SOCKS5)(nil)
	_ caddyfile.Unmarshaler = (*SOCKS5)(nil)
	_ fmt.Stringer          = (*SOCKS5)(nil)
)
