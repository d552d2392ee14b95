package upstreams

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"

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

	dialer net.Dialer
	health healthSet // the one checker, or none
}

// CaddyModule returns the Caddy module information.
func (*Direct) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "wa.dialers.direct",
		New: func() caddy.Module { return new(Direct) },
	}
}

// Provision sets up the dialer and starts the health check. Connections
// DialContext makes have TCP keep-alive at Go's defaults (probes after 15s
// idle); wa_proxy's event loop connects to Resolve's addresses itself,
// without keep-alive (its idle timeout ends dead connections).
func (dd *Direct) Provision(ctx caddy.Context) error {
	dd.dialer = net.Dialer{}
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
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	dialer := &dd.dialer
	if allow := allowlistFrom(ctx); allow != nil {
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
	if ip, err := netip.ParseAddr(host); err == nil {
		ips = []netip.Addr{ip}
	} else if ips, err = lookup(ctx, network, address, host); err != nil {
		return nil, err
	}
	allow := allowlistFrom(ctx)
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
	return addrs, nil
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

// checkResolvedAddr refuses an internal address the allowlist does not
// reach.
// lookup resolves host for Resolve. It is a function of its own so that
// Resolve's frame stays small for the common case of an IP address (the
// handler's goroutine then need not grow its stack).
func lookup(ctx context.Context, network, address, host string) ([]netip.Addr, error) {
	ipNetwork := "ip"
	switch network {
	case "tcp4":
		ipNetwork = "ip4"
	case "tcp6":
		ipNetwork = "ip6"
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, ipNetwork, host)
	if err != nil {
		return nil, &DialError{Kind: dialErrKind(ctx, err), Err: fmt.Errorf("dial %s: %w", address, err)}
	}
	return ips, nil
}

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
