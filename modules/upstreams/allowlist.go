package upstreams

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
)

// DefaultAllow is the allowlist used when a handler configures none:
// WhatsApp's own domains and their subdomains.
var DefaultAllow = []string{"whatsapp.net", "*.whatsapp.net", "whatsapp.com", "*.whatsapp.com"}

// Allowlist decides which destinations a handler may dial. It is built from
// patterns:
//
//   - `example.com` matches that name exactly (case-insensitive, a trailing dot ignored);
//   - `*.example.com` matches every subdomain of example.com, at any depth, but not example.com;
//   - `192.0.2.7`, `2001:db8::1` match that IP literal;
//   - `192.0.2.0/24`, `2001:db8::/32` match IP literals in that range;
//   - `*` matches every name and every public IP (an open relay: only for
//     closed, trusted setups).
//
// Names and IPs are separate worlds: a name pattern never matches an IP
// literal destination, and an IP pattern never matches a name.
//
// Internal addresses (loopback, link-local including the cloud metadata
// address 169.254.169.254, private, shared (CGNAT) and unspecified; see
// InternalRange) are reached only through an IP or CIDR pattern that
// contains them: `*` does not reach them, and neither does a name pattern
// whose name resolves to one (see AllowsResolved).
type Allowlist struct {
	exact    map[string]struct{}
	suffixes []string // ".example.com"
	prefixes []netip.Prefix
	any      bool
}

// NewAllowlist parses patterns. It returns an error naming the first bad pattern.
func NewAllowlist(patterns []string) (*Allowlist, error) {
	a := &Allowlist{exact: make(map[string]struct{})}
	for _, p := range patterns {
		p = strings.TrimSpace(p)
		switch {
		case p == "":
			return nil, fmt.Errorf("empty allow pattern")
		case p == "*":
			a.any = true
		case strings.Contains(p, "/"):
			prefix, err := netip.ParsePrefix(p)
			if err != nil {
				return nil, fmt.Errorf("allow pattern %q: bad CIDR: %v", p, err)
			}
			if prefix.Addr().Is4In6() && prefix.Bits() >= 96 {
				// ::ffff:10.0.0.0/104 is 10.0.0.0/8: addresses are
				// matched unmapped (see explicitlyAllows)
				prefix = netip.PrefixFrom(prefix.Addr().Unmap(), prefix.Bits()-96)
			}
			a.prefixes = append(a.prefixes, prefix.Masked())
		case isIP(p):
			addr, _ := netip.ParseAddr(strings.Trim(p, "[]"))
			a.prefixes = append(a.prefixes, netip.PrefixFrom(addr.Unmap(), addr.Unmap().BitLen()))
		case strings.HasPrefix(p, "*."):
			name := normalizeName(p[2:])
			if err := checkName(name); err != nil {
				return nil, fmt.Errorf("allow pattern %q: %v", p, err)
			}
			a.suffixes = append(a.suffixes, "."+name)
		default:
			name := normalizeName(p)
			if err := checkName(name); err != nil {
				return nil, fmt.Errorf("allow pattern %q: %v", p, err)
			}
			a.exact[name] = struct{}{}
		}
	}
	return a, nil
}

// AllowsHost reports whether host (a name or an IP literal, without port)
// may be dialled.
func (a *Allowlist) AllowsHost(host string) bool {
	if a == nil {
		return false
	}
	if addr, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return a.AllowsIP(addr)
	}
	if a.any {
		return true
	}
	name := normalizeName(host)
	if _, ok := a.exact[name]; ok {
		return true
	}
	for _, s := range a.suffixes {
		if strings.HasSuffix(name, s) {
			return true
		}
	}
	return false
}

// AllowsIP reports whether addr, an IP literal destination, may be dialled:
// an IP or CIDR pattern contains it, or `*` is in the list and addr is not
// internal (InternalRange).
func (a *Allowlist) AllowsIP(addr netip.Addr) bool {
	if a == nil {
		return false
	}
	if a.explicitlyAllows(addr) {
		return true
	}
	_, internal := InternalRange(addr)
	return a.any && !internal
}

// AllowsResolved reports whether addr, an address that an allowed host name
// resolved to, may be dialled: it is not internal (InternalRange), or an IP
// or CIDR pattern contains it. So `allow localhost` alone cannot reach
// 127.0.0.1; `allow localhost 127.0.0.1` can.
func (a *Allowlist) AllowsResolved(addr netip.Addr) bool {
	if a == nil {
		return false
	}
	if _, internal := InternalRange(addr); !internal {
		return true
	}
	return a.explicitlyAllows(addr)
}

// explicitlyAllows reports whether an IP or CIDR pattern contains addr.
func (a *Allowlist) explicitlyAllows(addr netip.Addr) bool {
	addr = addr.Unmap().WithZone("")
	for _, p := range a.prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// internalRanges are the ranges InternalRange reports, besides those netip
// classifies itself (loopback, link-local, private, unspecified).
var internalRanges = []struct {
	prefix netip.Prefix
	name   string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "unspecified"}, // "this network"; Linux connects 0.0.0.0 to the host itself
	{netip.MustParsePrefix("100.64.0.0/10"), "shared"},  // RFC 6598 carrier-grade NAT; Alibaba Cloud's metadata service
	{netip.MustParsePrefix("fec0::/10"), "private"},     // deprecated IPv6 site-local
}

// InternalRange reports whether addr belongs to a range that reaches the
// proxy host itself or the network it sits in rather than the internet, and
// names the range: "loopback", "link-local" (including the cloud metadata
// address 169.254.169.254), "private", "shared" (carrier-grade NAT) or
// "unspecified". IPv4-mapped IPv6 addresses are judged by their IPv4 address,
// and so are NAT64 addresses (see nat64Prefixes; their range's name then
// ends in " (NAT64)").
func InternalRange(addr netip.Addr) (name string, internal bool) {
	addr = addr.Unmap().WithZone("")
	switch {
	case !addr.IsValid():
		return "", false
	case addr.IsLoopback():
		return "loopback", true
	case addr.IsLinkLocalUnicast():
		return "link-local", true
	case addr.IsPrivate():
		return "private", true
	case addr.IsUnspecified():
		return "unspecified", true
	}
	for _, r := range internalRanges {
		if r.prefix.Contains(addr) {
			return r.name, true
		}
	}
	for _, p := range nat64Prefixes {
		if p.Contains(addr) {
			b := addr.As16()
			if name, internal := InternalRange(netip.AddrFrom4([4]byte(b[12:16]))); internal {
				return name + " (NAT64)", true
			}
		}
	}
	return "", false
}

// nat64Prefixes are the NAT64 prefixes: RFC 6052's well-known 64:ff9b::/96
// and RFC 8215's local-use 64:ff9b:1::/48. On an IPv6-only host behind a
// NAT64 gateway (DNS64 synthesises such addresses for IPv4-only names), an
// address under one reaches the IPv4 address in its last 32 bits (the /96
// form, the one in use), so it is as internal as that address.
var nat64Prefixes = []netip.Prefix{
	netip.MustParsePrefix("64:ff9b::/96"),
	netip.MustParsePrefix("64:ff9b:1::/48"),
}

// allowlistKey is the context key of WithAllowlist.
type allowlistKey struct{}

// WithAllowlist returns a context that carries a, for the dialers that
// resolve names themselves (direct): they refuse to connect to an address
// that a.AllowsResolved refuses. Handlers pass their allowlist this way so
// that an allowed name resolving to an internal address is not dialled.
func WithAllowlist(ctx context.Context, a *Allowlist) context.Context {
	return context.WithValue(ctx, allowlistKey{}, a)
}

// allowlistFrom returns the allowlist WithAllowlist put in ctx, or nil.
func allowlistFrom(ctx context.Context) *Allowlist {
	a, _ := ctx.Value(allowlistKey{}).(*Allowlist)
	return a
}

// Any reports whether the list allows every destination.
func (a *Allowlist) Any() bool { return a != nil && a.any }

func isIP(s string) bool {
	_, err := netip.ParseAddr(strings.Trim(s, "[]"))
	return err == nil
}

func normalizeName(s string) string { return strings.ToLower(strings.TrimSuffix(s, ".")) }

func checkName(name string) error {
	if name == "" || len(name) > 253 || strings.ContainsAny(name, "*/ :[]") {
		return fmt.Errorf("not a host name")
	}
	return nil
}
