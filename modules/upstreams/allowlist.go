package upstreams

import (
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
//   - `*` matches everything (an open relay: only for closed, trusted setups).
//
// Names and IPs are separate worlds: a name pattern never matches an IP
// literal destination, and an IP pattern never matches a name.
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
	if a.any {
		return true
	}
	if addr, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return a.AllowsIP(addr)
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

// AllowsIP reports whether an IP pattern (or `*`) permits addr.
func (a *Allowlist) AllowsIP(addr netip.Addr) bool {
	if a == nil {
		return false
	}
	if a.any {
		return true
	}
	addr = addr.Unmap().WithZone("")
	for _, p := range a.prefixes {
		if p.Contains(addr) {
			return true
		}
	}
	return false
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
