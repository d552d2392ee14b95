package upstreams

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(new(Direct))
}

// Direct connects to destinations directly, from this host. Host names are
// resolved here, with the system resolver.
//
// When the context carries the handler's allowlist (WithAllowlist), every
// address a name resolves to is checked just before the connect(2), and an
// internal address (loopback, link-local, private...; see InternalRange)
// that no IP or CIDR pattern allows is not connected to: `allow
// example.com` does not let a name that resolves to 127.0.0.1 reach this
// host's own services.
type Direct struct {
	// HealthCheck, when set, checks on an interval that this host can
	// connect to a destination (see HealthCheck). It only reports (the
	// whatsapp_proxy_upstream_healthy gauge, GET /waproxy/upstreams): there
	// is no other upstream to fail over to. Default: no checks.
	HealthCheck *HealthCheck `json:"health_check,omitempty"`

	// ResolveCache is how long the addresses a destination's name resolved
	// to are used before they are looked up again. A connection does not
	// wait for that lookup: the old addresses serve while it runs in the
	// background, and stay in use if it fails. A negative value turns the
	// cache off (every connection resolves its name). Default: 30s.
	ResolveCache caddy.Duration `json:"resolve_cache,omitempty"`

	dialer   net.Dialer
	resolver *net.Resolver // nil: net.DefaultResolver (tests set their own)
	cacheFor time.Duration // ResolveCache in effect; 0: off
	health   healthSet     // the one checker, or none
}

// CaddyModule returns the Caddy module information.
func (*Direct) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "wa.dialers.direct",
		New: func() caddy.Module { return new(Direct) },
	}
}

// Provision sets up the dialer and starts the health check.
func (dd *Direct) Provision(ctx caddy.Context) error {
	dd.dialer = tcpDialer()
	switch {
	case dd.ResolveCache == 0:
		dd.cacheFor = DefaultResolveCache
	case dd.ResolveCache > 0:
		dd.cacheFor = time.Duration(dd.ResolveCache)
	default:
		dd.cacheFor = 0
	}
	if dd.resolver == nil {
		dd.resolver = net.DefaultResolver
	}
	names.logger.Store(ctx.Logger())
	if dd.HealthCheck == nil {
		return nil
	}
	settings, err := dd.HealthCheck.provision()
	if err != nil {
		return fmt.Errorf("direct: %w", err)
	}
	if err := dd.health.add(ctx, "direct", settings, dd.probe(settings.destination)); err != nil {
		return fmt.Errorf("direct: %w", err)
	}
	return nil
}

// tcpDialer is the net.Dialer behind every connection the dialers make
// (DialContext's, the SOCKS5 dialer's to its servers): no TCP keep-alive,
// as on the connections wa_proxy's event loop makes itself and on the
// clients' side. Go's default would probe every idle connection after 15 s
// of silence, between the WhatsApp app's own keepalives (every 20–30 s),
// and costs four setsockopt calls per connection; the relays' idle timeout
// ends dead connections, as the official HAProxy config's timeouts do (it
// has no srvtcpka).
func tcpDialer() net.Dialer { return net.Dialer{KeepAlive: -1} }

// probe returns a health check: a TCP connection to destination, closed as
// soon as it is established. The allowlist does not apply: the destination
// is the operator's.
func (dd *Direct) probe(destination string) func(context.Context) error {
	return func(ctx context.Context) error {
		conn, err := dd.DialContext(ctx, "tcp", destination) // ctx carries no allowlist
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

// Cleanup stops the health check unless another config uses it.
func (dd *Direct) Cleanup() error { return dd.health.release() }

// DialContext connects to address ("host:port") over TCP and returns the
// *net.TCPConn. Errors are *DialError values of kind metrics.KindTimeout when
// ctx's deadline passed, metrics.KindNotAllowed when every address the name
// resolved to is internal and not allowed (see WithAllowlist), else
// metrics.KindDial; the message names address.
func (dd *Direct) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return dd.dial(ctx, network, address, allowlistFrom(ctx))
}

// dial is DialContext with the allowlist given (nil: none applies).
func (dd *Direct) dial(ctx context.Context, network, address string, allow *Allowlist) (net.Conn, error) {
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	if host, _, err := net.SplitHostPort(address); err == nil && dd.cacheFor > 0 {
		if _, err := parseIP(host); err != nil {
			// a name: its addresses come from the cache (see ResolveCache)
			addrs, err := dd.resolve(ctx, network, address, allow)
			if err != nil {
				return nil, err
			}
			return dd.dialAddrs(ctx, address, addrs)
		}
	}
	dialer := &dd.dialer
	if allow != nil {
		checked := dd.dialer
		checked.ControlContext = func(_ context.Context, _, addr string, _ syscall.RawConn) error {
			return checkResolved(allow, addr)
		}
		dialer = &checked
	}
	c, err := dialer.DialContext(ctx, network, address)
	if err != nil {
		var ie *internalAddrError
		if errors.As(err, &ie) {
			return nil, &DialError{Kind: metrics.KindNotAllowed, Err: fmt.Errorf("dial %s: %w", address, ie)}
		}
		return nil, &DialError{Kind: dialErrKind(ctx, err), Err: fmt.Errorf("dial %s: %w", address, opCause(err))}
	}
	return c, nil // a *net.TCPConn
}

// Resolve returns the addresses DialContext would try for address, in the
// same order: an IP address as it is, a name's addresses as the system
// resolver returns them (Go's net.Resolver, which sorts them per RFC 6724).
// With an allowlist in ctx, internal addresses it does not allow are left
// out, and an error of kind metrics.KindNotAllowed says so when none is
// left. Other errors are of kind metrics.KindDestination for a malformed
// address, metrics.KindTimeout when ctx's deadline passed, else
// metrics.KindDial; messages start "dial <address>: " as DialContext's.
func (dd *Direct) Resolve(ctx context.Context, network, address string) ([]netip.AddrPort, error) {
	return dd.resolve(ctx, network, address, allowlistFrom(ctx))
}

// resolve is Resolve with the allowlist given (nil: none applies).
func (dd *Direct) resolve(ctx context.Context, network, address string, allow *Allowlist) ([]netip.AddrPort, error) {
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, dialErrorf(metrics.KindDestination, "dial %s: %w", address, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return nil, dialErrorf(metrics.KindDestination, "dial %s: invalid port %q", address, portStr)
	}
	var ips []netip.Addr
	if ip, err := parseIP(host); err == nil {
		ips = []netip.Addr{ip}
	} else if ips, err = dd.lookup(ctx, network, address, host); err != nil {
		return nil, err
	}
	addrs := make([]netip.AddrPort, 0, len(ips))
	var refused error
	for _, ip := range ips {
		ip = ip.Unmap()
		if (network == "tcp4" && !ip.Is4()) || (network == "tcp6" && !ip.Is6()) {
			continue
		}
		ap := netip.AddrPortFrom(ip, uint16(port))
		if allow != nil {
			if err := checkResolvedAddr(allow, ip); err != nil {
				refused = cmp.Or(refused, err)
				continue
			}
		}
		addrs = append(addrs, ap)
	}
	if len(addrs) == 0 {
		if refused != nil {
			return nil, &DialError{Kind: metrics.KindNotAllowed, Err: fmt.Errorf("dial %s: %w", address, refused)}
		}
		return nil, dialErrorf(metrics.KindDial, "dial %s: no %s address", address, network)
	}
	return reachableFirst(addrs), nil
}

// internalAddrError reports a resolved address the allowlist does not reach.
type internalAddrError struct {
	addr      netip.Addr
	rangeName string
}

func (e *internalAddrError) Error() string {
	return fmt.Sprintf("resolved to %s (%s), an internal address the allowlist does not include; allow it, or a range containing it, to reach it", e.addr, e.rangeName)
}

// checkResolved is the dialer's Control hook: it runs for each address
// ("ip:port") right before connecting to it.
func checkResolved(allow *Allowlist, addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: %v", addr, err)
	}
	return checkResolvedAddr(allow, ap.Addr())
}

// errNotIP is parseIP's answer for a host that cannot be an IP address.
var errNotIP = errors.New("not an IP address")

// parseIP is netip.ParseAddr, without its error value (an allocation) for
// a host that starts as no IP address does (a name, usually).
func parseIP(host string) (netip.Addr, error) {
	if host == "" || !(host[0] >= '0' && host[0] <= '9' || strings.IndexByte(host, ':') >= 0) {
		return netip.Addr{}, errNotIP
	}
	return netip.ParseAddr(host)
}

// lookup resolves host for Resolve, through the cache (see ResolveCache).
// It is a function of its own so that Resolve's frame stays small for the
// common case of an IP address (the handler's goroutine then need not grow
// its stack).
func (dd *Direct) lookup(ctx context.Context, network, address, host string) ([]netip.Addr, error) {
	ipNetwork := "ip"
	switch network {
	case "tcp4":
		ipNetwork = "ip4"
	case "tcp6":
		ipNetwork = "ip6"
	}
	r := dd.resolver
	if r == nil { // not provisioned (tests)
		r = net.DefaultResolver
	}
	ips, err := names.lookup(ctx, r, ipNetwork, host, dd.cacheFor)
	if err != nil {
		return nil, &DialError{Kind: dialErrKind(ctx, err), Err: fmt.Errorf("dial %s: %w", address, err)}
	}
	return ips, nil
}

// checkResolvedAddr refuses an internal address the allowlist does not
// reach.
func checkResolvedAddr(allow *Allowlist, ip netip.Addr) error {
	if !allow.AllowsResolved(ip) {
		name, _ := InternalRange(ip)
		return &internalAddrError{addr: ip.Unmap(), rangeName: name}
	}
	return nil
}

// String describes the dialer for logs.
func (dd *Direct) String() string {
	if dd.HealthCheck != nil {
		return "direct with health check"
	}
	return "direct"
}

// UnmarshalCaddyfile sets up the dialer from Caddyfile tokens. Syntax:
//
//	via direct {
//		resolve_cache <duration>|off
//		health_check [<destination>] {
//			interval <duration>
//			timeout <duration>
//			unhealthy_after <n>
//			healthy_after <n>
//		}
//	}
//
// The dialer takes no arguments; the block is optional.
func (dd *Direct) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the dialer name
	if d.NextArg() {
		return d.Errf("direct: unexpected argument '%s': the direct dialer takes no arguments", d.Val())
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "health_check":
			if dd.HealthCheck != nil {
				return d.Errf("direct: duplicate subdirective '%s'", opt)
			}
			hc, err := unmarshalHealthCheck(d, "direct")
			if err != nil {
				return err
			}
			dd.HealthCheck = hc
		case "resolve_cache":
			if dd.ResolveCache != 0 {
				return d.Errf("direct: duplicate subdirective '%s'", opt)
			}
			if !d.NextArg() {
				return d.Errf("direct: resolve_cache needs a duration, or off")
			}
			if d.Val() == "off" {
				dd.ResolveCache = -1
			} else {
				dur, err := caddy.ParseDuration(d.Val())
				if err != nil || dur <= 0 {
					return d.Errf("direct: resolve_cache: '%s' is not a positive duration or off", d.Val())
				}
				dd.ResolveCache = caddy.Duration(dur)
			}
			if d.NextArg() {
				return d.Errf("direct: resolve_cache takes one argument, got '%s' too", d.Val())
			}
		default:
			return d.Errf("direct: unrecognized subdirective '%s'", opt)
		}
	}
	return nil
}

// checkNetwork rejects networks other than TCP.
func checkNetwork(network string) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
		return nil
	}
	return dialErrorf(metrics.KindDestination, "unsupported network %q: only tcp can be dialled", network)
}

// dialErrKind classifies an error from net.Dialer.DialContext (or a read or
// write during a handshake): a passed deadline is a timeout, anything else a
// dial failure.
func dialErrKind(ctx context.Context, err error) string {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return metrics.KindTimeout
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return metrics.KindTimeout
	}
	return metrics.KindDial
}

// opCause strips the "dial tcp <addr>" prefix of a *net.OpError, which the
// callers replace with their own context, and returns the cause
// ("connect: connection refused", "i/o timeout", "lookup x: no such host").
func opCause(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}

// Interface guards
var (
	_ Dialer                = (*Direct)(nil)
	_ Resolver              = (*Direct)(nil)
	_ caddy.Module          = (*Direct)(nil)
	_ caddy.Provisioner     = (*Direct)(nil)
	_ caddy.CleanerUpper    = (*Direct)(nil)
	_ caddyfile.Unmarshaler = (*Direct)(nil)
	_ fmt.Stringer          = (*Direct)(nil)
)

// fallbackDelay is how long the addresses of the first address's family
// have before those of the other family are tried alongside (Go's
// net.Dialer default, after RFC 6555).
const fallbackDelay = 300 * time.Millisecond

// dialAddrs connects to one of addrs (a name's, in Resolve's order) as
// net.Dialer does for a name: the addresses of the first one's family one
// after the other, and, when the other family has some, those the same way
// from fallbackDelay on (Happy Eyeballs); the first connection made wins.
// Errors are as DialContext's; the first family's failure is reported
// when both fail.
func (dd *Direct) dialAddrs(ctx context.Context, address string, addrs []netip.AddrPort) (net.Conn, error) {
	var primaries, fallbacks []netip.AddrPort
	for _, ap := range addrs {
		if ap.Addr().Is4() == addrs[0].Addr().Is4() {
			primaries = append(primaries, ap)
		} else {
			fallbacks = append(fallbacks, ap)
		}
	}
	if len(fallbacks) == 0 {
		c, err := dd.dialSerial(ctx, primaries)
		return c, dd.dialErr(ctx, address, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		c       net.Conn
		err     error
		primary bool
	}
	results := make(chan result, 2)
	start := func(list []netip.AddrPort, primary bool) {
		go func() {
			c, err := dd.dialSerial(ctx, list)
			results <- result{c, err, primary}
		}()
	}
	start(primaries, true)
	timer := time.NewTimer(fallbackDelay)
	defer timer.Stop()
	started, fallbackStarted := 1, false
	var primaryErr, fallbackErr error
	for got := 0; ; {
		select {
		case <-timer.C:
			if !fallbackStarted {
				fallbackStarted = true
				started++
				start(fallbacks, false)
			}
		case r := <-results:
			got++
			if r.err == nil {
				if left := started - got; left > 0 {
					go func() { // the other family's dial, cancelled: close it if it got through
						if r := <-results; r.c != nil {
							_ = r.c.Close()
						}
					}()
				}
				return r.c, nil
			}
			if r.primary {
				primaryErr = r.err
			} else {
				fallbackErr = r.err
			}
			if !fallbackStarted { // the first family failed early: no need to wait
				fallbackStarted = true
				started++
				start(fallbacks, false)
				continue
			}
			if got == started {
				return nil, dd.dialErr(ctx, address, cmp.Or(primaryErr, fallbackErr))
			}
		}
	}
}

// dialSerial connects to addrs one after the other, each with its
// AttemptShare of the time left, returning the first failure when all
// fail.
func (dd *Direct) dialSerial(ctx context.Context, addrs []netip.AddrPort) (net.Conn, error) {
	var first error
	for i, ap := range addrs {
		c, err := dd.dialOne(ctx, ap, len(addrs)-i)
		if err == nil {
			return c, nil
		}
		first = cmp.Or(first, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, first
}

// dialOne connects to ap within its AttemptShare of ctx's time, addrsLeft
// addresses (ap included) being left to try, and notes in the unreachable
// table how it went.
func (dd *Direct) dialOne(ctx context.Context, ap netip.AddrPort, addrsLeft int) (net.Conn, error) {
	if deadline, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, AttemptShare(time.Until(deadline), addrsLeft))
		defer cancel() // a connection made does not depend on ctx
	}
	c, err := dd.dialer.DialContext(ctx, "tcp", ap.String())
	switch {
	case err == nil:
		NoteConnected(ap)
	case dialErrKind(ctx, err) == metrics.KindTimeout: // not a cancel: Happy Eyeballs' loser
		NoteTimeout(ap) // the next connections try it last
	}
	return c, err
}

// dialErr is err, a failure to connect to address, as DialContext reports
// it (nil stays nil).
func (dd *Direct) dialErr(ctx context.Context, address string, err error) error {
	if err == nil {
		return nil
	}
	return &DialError{Kind: dialErrKind(ctx, err), Err: fmt.Errorf("dial %s: %w", address, opCause(err))}
}
