// Package caddyfile holds caddy-waproxy's high-level Caddyfile support: the
// `waproxy` global option, a preset that expands into the layer4 app
// configuration of a complete WhatsApp proxy.
package caddyfile

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

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
}

// parsePreset sets up the layer4 app from the waproxy global option.
// Syntax:
//
//	waproxy {
//		listen <addresses...>
//		via direct | socks5 <servers...> [{ username <u>; password <p> }]
//		hostname <name>
//		official_ports
//		proxy_protocol_from <cidrs...>
//		send_proxy_protocol v1|v2
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
			if !d.NextArg() {
				return nil, d.ArgErr()
			}
			v := d.Val()
			if v != "v1" && v != "v2" {
				return nil, d.Errf("waproxy: send_proxy_protocol: unknown version '%s' (want v1 or v2)", v)
			}
			p.SendProxyProtocol = v
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "max_connections":
			return nil, d.Err("waproxy: max_connections is not supported yet (there is no connection-limit module)")
		case "website":
			return nil, d.Err("waproxy: website is not supported yet")
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
	if addr.IsUnixNetwork() || addr.IsFdNetwork() {
		return s, nil
	}
	if addr.StartPort == 0 {
		return "", fmt.Errorf("address '%s' has no port (or port 0)", s)
	}
	if addr.PortRangeSize() != 1 {
		return "", fmt.Errorf("address '%s' is a port range; give one port per address", s)
	}
	return s, nil
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
