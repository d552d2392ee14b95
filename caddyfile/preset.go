// Package caddyfile holds caddy-waproxy's high-level Caddyfile support: the
// `waproxy` global option, a preset that expands into the layer4 app
// configuration of a complete WhatsApp proxy, and the
// `waproxy_grace_period` global option, which sets up the waproxy app.
package caddyfile

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	// The caddy-l4 modules that the preset's JSON names beyond ours, so
	// that any build with the preset can run what it writes: the website
	// route's http matcher and proxy handler, TLS termination, subroutes
	// and the PROXY header reader.
	_ "github.com/mholt/caddy-l4/modules/l4http"
	_ "github.com/mholt/caddy-l4/modules/l4proxy"
	_ "github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	_ "github.com/mholt/caddy-l4/modules/l4subroute"
	_ "github.com/mholt/caddy-l4/modules/l4tls"

	"github.com/waproxy/caddy-waproxy/modules/handlers"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("waproxy", parsePreset)
}

// Defaults of the waproxy preset.
const (
	// DefaultHostname is the name of the certificate that TLS termination
	// presents when no hostname is given.
	DefaultHostname = "proxy.waproxy.internal"
	// ChatDestination is where chat goes, as the official proxy sends it.
	ChatDestination = "g.whatsapp.net:5222"
	// MediaDestination is where media TLS is passed through to, by its SNI.
	MediaDestination = "{l4.wa_tls.server_name}:443"
	// SilentWait is how long a client may send nothing before it is taken
	// for a server-speaks-first client and sent to the chat destination.
	SilentWait = 2 * time.Second
)

// OfficialPorts are the ports of the official WhatsApp proxy. Every one of
// them detects every protocol; the ports in OfficialProxyProtocolPorts
// also read a PROXY header from the load balancer.
var (
	OfficialPorts              = []string{"80", "443", "5222", "587", "7777"}
	OfficialProxyProtocolPorts = []string{"8080", "8443", "8222"}
)

// mediaNames are the SNI patterns whose TLS is passed through untouched.
var mediaNames = []string{"whatsapp.net", "*.whatsapp.net", "whatsapp.com", "*.whatsapp.com"}

// Preset is the parsed `waproxy` global option.
type Preset struct {
	// Listen are the addresses of the proxy. Default: `:443`.
	Listen []string
	// Via is the JSON of the handlers' dialer; nil dials directly.
	Via json.RawMessage
	// Hostname names the certificate that TLS termination presents.
	// Default: `proxy.waproxy.internal`.
	Hostname string
	// OfficialPorts listens on the official proxy's ports instead of Listen.
	OfficialPorts bool
	// ProxyProtocolFrom are the CIDRs allowed to send PROXY headers.
	ProxyProtocolFrom []string
	// SendProxyProtocol is the PROXY header version sent to the chat
	// destination (`v1` or `v2`); empty sends none.
	SendProxyProtocol string
	// Website is the address of the HTTP server (a site block of the same
	// Caddyfile, on a loopback address or a Unix socket) that serves
	// visitors who are not WhatsApp clients nor proxy clients; empty keeps
	// them on the HTTP proxy handler.
	Website string
	// WebsiteProxyProtocol is the PROXY header version sent to the website
	// (`v1` or `v2`), so that its logs see the visitor's address; empty
	// sends none.
	WebsiteProxyProtocol string
	// MaxConnections caps the live connections of the whole proxy
	// (wa_limit); 0 sets no cap.
	MaxConnections int
	// MaxConnectionsPerIP caps the live connections of one client address
	// (wa_limit); 0 sets no cap.
	MaxConnectionsPerIP int
	// ConnectTimeout is the connect_timeout of every wa_proxy and wa_http
	// handler: how long connecting to a destination may take, SOCKS5
	// handshakes included; 0 keeps the handlers' default. Default: `5s`.
	ConnectTimeout caddy.Duration
}

// parsePreset sets up the layer4 app from the waproxy global option.
// Syntax:
//
//	waproxy {
//		listen <addresses...>
//		via direct | socks5 <servers...> [{ username <u>; password <p>; health_check [<destination>] [{ ... }] }]
//		hostname <name>
//		official_ports
//		proxy_protocol_from <cidrs...>
//		send_proxy_protocol v1|v2
//		website <address> [{ send_proxy_protocol v1|v2 }]
//		max_connections <n>
//		max_connections_per_ip <n>
//		connect_timeout <duration>
//	}
func parsePreset(d *caddyfile.Dispenser, existingVal any) (any, error) {
	d.Next() // consume option name
	if existingVal != nil {
		return nil, d.Err("waproxy: only one waproxy block is allowed")
	}
	p, err := unmarshalPreset(d)
	if err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "layer4", Value: caddyconfig.JSON(p.layer4(), nil)}, nil
}

// unmarshalPreset reads the waproxy block, d past the option's name.
func unmarshalPreset(d *caddyfile.Dispenser) (*Preset, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	p := &Preset{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return nil, d.Errf("waproxy: duplicate option '%s'", opt)
		}
		seen[opt] = true
		switch opt {
		case "listen":
			for d.NextArg() {
				addr, err := checkListen(d.Val())
				if err != nil {
					return nil, d.Errf("waproxy: listen: %v", err)
				}
				p.Listen = append(p.Listen, addr)
			}
			if len(p.Listen) == 0 {
				return nil, d.Err("waproxy: listen: missing address")
			}
		case "via":
			via, err := handlers.UnmarshalVia(d)
			if err != nil {
				return nil, err
			}
			p.Via = via
		case "hostname":
			if !d.NextArg() {
				return nil, d.Err("waproxy: hostname: missing name")
			}
			p.Hostname = d.Val()
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "official_ports":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			p.OfficialPorts = true
		case "proxy_protocol_from":
			for d.NextArg() {
				cidr, err := checkCIDR(d.Val())
				if err != nil {
					return nil, d.Errf("waproxy: proxy_protocol_from: %v", err)
				}
				p.ProxyProtocolFrom = append(p.ProxyProtocolFrom, cidr)
			}
			if len(p.ProxyProtocolFrom) == 0 {
				return nil, d.Err("waproxy: proxy_protocol_from: missing address range")
			}
		case "send_proxy_protocol":
			v, err := proxyProtocolVersion(d, "send_proxy_protocol")
			if err != nil {
				return nil, err
			}
			p.SendProxyProtocol = v
		case "website":
			if !d.NextArg() {
				return nil, d.Err("waproxy: website: missing address (the site block that serves visitors, e.g. 127.0.0.1:8081)")
			}
			addr, err := checkWebsite(d.Val())
			if err != nil {
				return nil, d.Errf("waproxy: website: %v", err)
			}
			p.Website = addr
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			for nesting := d.Nesting(); d.NextBlock(nesting); {
				switch d.Val() {
				case "send_proxy_protocol":
					if p.WebsiteProxyProtocol != "" {
						return nil, d.Err("waproxy: website: duplicate option 'send_proxy_protocol'")
					}
					v, err := proxyProtocolVersion(d, "website: send_proxy_protocol")
					if err != nil {
						return nil, err
					}
					p.WebsiteProxyProtocol = v
				default:
					return nil, d.Errf("waproxy: website: unrecognized option '%s'", d.Val())
				}
			}
		case "max_connections", "max_connections_per_ip":
			if !d.NextArg() {
				return nil, d.Errf("waproxy: %s: missing number", opt)
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n <= 0 {
				return nil, d.Errf("waproxy: %s: '%s' is not a positive whole number", opt, d.Val())
			}
			if opt == "max_connections" {
				p.MaxConnections = n
			} else {
				p.MaxConnectionsPerIP = n
			}
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "connect_timeout":
			if !d.NextArg() {
				return nil, d.Err("waproxy: connect_timeout: missing duration (e.g. connect_timeout 30s)")
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil {
				return nil, d.Errf("waproxy: connect_timeout: bad duration '%s': %v", d.Val(), err)
			}
			if dur <= 0 {
				return nil, d.Errf("waproxy: connect_timeout: must be positive, got '%s'", d.Val())
			}
			p.ConnectTimeout = caddy.Duration(dur)
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "grace_period":
			return nil, d.Err("waproxy: grace_period is a global option of its own: write `waproxy_grace_period 30s` next to `waproxy { ... }` (the grace period belongs to the waproxy app, and this block makes the layer4 app)")
		default:
			return nil, d.Errf("waproxy: unrecognized option '%s'", opt)
		}
	}
	if p.OfficialPorts && len(p.Listen) > 0 {
		return nil, d.Err("waproxy: listen and official_ports cannot be used together (official_ports listens on 80 443 5222 587 7777 8080 8443 8222)")
	}
	if p.Hostname == "" {
		p.Hostname = DefaultHostname
	}
	return p, nil
}

// checkListen checks a listener address and returns it normalised: a bare
// port gets a leading colon.
func checkListen(s string) (string, error) {
	if _, err := strconv.Atoi(s); err == nil {
		s = ":" + s
	}
	addr, err := caddy.ParseNetworkAddress(s)
	if err != nil {
		return "", err
	}
	switch addr.Network {
	case "tcp", "tcp4", "tcp6":
	case "unix", "fd":
		return s, nil
	default:
		// udp, unixgram, unixpacket, fdgram: the routes are for
		// streams, and over datagrams anyone could make the proxy
		// answer (or dial) for a forged source address
		return "", fmt.Errorf("address '%s': network '%s' is not a stream network (want tcp, tcp4, tcp6, unix or fd)", s, addr.Network)
	}
	if addr.StartPort == 0 {
		return "", fmt.Errorf("address '%s' has no port (or port 0)", s)
	}
	if addr.PortRangeSize() != 1 {
		return "", fmt.Errorf("address '%s' is a port range; give one port per address", s)
	}
	return s, nil
}

// proxyProtocolVersion reads the one argument of a send_proxy_protocol
// option: the PROXY header version, v1 or v2.
func proxyProtocolVersion(d *caddyfile.Dispenser, opt string) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if v != "v1" && v != "v2" {
		return "", d.Errf("waproxy: %s: unknown version '%s' (want v1 or v2)", opt, v)
	}
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// checkWebsite checks the address of the website's HTTP server and returns
// it normalised, the way caddy-l4's proxy handler dials it. The server must
// be on this machine: a loopback address with one port, or a Unix socket.
func checkWebsite(s string) (string, error) {
	if strings.HasPrefix(s, "/") || strings.HasPrefix(s, ".") || strings.HasPrefix(s, "~") {
		return "", fmt.Errorf("'%s' looks like a directory: give the address of the site block that serves the website (e.g. 127.0.0.1:8081 or unix//run/caddy/www.sock) and serve the directory there with file_server", s)
	}
	addr, err := caddy.ParseNetworkAddress(s)
	if err != nil {
		return "", err
	}
	if addr.IsUnixNetwork() {
		if addr.Network != "unix" {
			return "", fmt.Errorf("address '%s': only a stream Unix socket (unix/) can serve HTTP", s)
		}
		return addr.String(), nil
	}
	if addr.Network != "tcp" && addr.Network != "tcp4" && addr.Network != "tcp6" {
		return "", fmt.Errorf("address '%s': want a TCP address or a Unix socket", s)
	}
	if addr.StartPort == 0 || addr.PortRangeSize() != 1 {
		return "", fmt.Errorf("address '%s' must have exactly one port", s)
	}
	if addr.Host != "localhost" {
		ip, err := netip.ParseAddr(addr.Host)
		if err != nil || !ip.IsLoopback() {
			return "", fmt.Errorf("address '%s' is not on this machine: give a loopback address (127.0.0.1, [::1], localhost) or a Unix socket", s)
		}
	}
	return addr.String(), nil
}

// checkCIDR checks an address range; a bare IP address is taken as a range
// of one.
func checkCIDR(s string) (string, error) {
	if pfx, err := netip.ParsePrefix(s); err == nil {
		return pfx.String(), nil
	}
	if ip, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(ip, ip.BitLen()).String(), nil
	}
	return "", fmt.Errorf("'%s' is not an IP address or CIDR range", s)
}
