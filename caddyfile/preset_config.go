package caddyfile

import (
	"encoding/json"
)

// The layer4 configuration that a Preset expands into, written as plain
// JSON objects so that `caddy adapt` prints exactly what a hand-written
// layer4 block with the same routes would.

type object = map[string]any

// layer4 returns the layer4 app: one server for the listeners, and with
// official_ports a second one for the ports that read PROXY headers.
func (p *Preset) layer4() object {
	servers := object{}
	switch {
	case p.OfficialPorts:
		servers["waproxy"] = p.server(ports(OfficialPorts), p.ppHandler(false))
		servers["waproxy_proxy_protocol"] = p.server(ports(OfficialProxyProtocolPorts), p.ppHandler(true))
	default:
		listen := p.Listen
		if len(listen) == 0 {
			listen = []string{":443"}
		}
		servers["waproxy"] = p.server(listen, p.ppHandler(false))
	}
	return object{"servers": servers}
}

func ports(ps []string) []string {
	out := make([]string, len(ps))
	for i, port := range ps {
		out[i] = ":" + port
	}
	return out
}

// ppHandler returns caddy-l4's proxy_protocol handler for a server, or nil
// when it reads no PROXY headers. A server always reads them when required
// (the official PROXY ports); otherwise only when proxy_protocol_from is
// given and official_ports is not.
//
// Peers that may send a header must send one (go-proxyproto's default
// policy, REQUIRE, as HAProxy's accept-proxy). With proxy_protocol_from,
// connections from other addresses are not read for a header at all
// (fallback_policy REJECT): caddy-l4's handler, as pinned, would otherwise
// use the address in any peer's header, allowed or not. Without it (only on
// the official PROXY ports), every peer must send one.
func (p *Preset) ppHandler(required bool) object {
	if !required && (p.OfficialPorts || len(p.ProxyProtocolFrom) == 0) {
		return nil
	}
	h := object{"handler": "proxy_protocol"}
	if len(p.ProxyProtocolFrom) > 0 {
		h["allow"] = p.ProxyProtocolFrom
		h["fallback_policy"] = "REJECT"
	}
	return h
}

// server returns a layer4 server with the single-port routes of
// examples/Caddyfile: every byte matcher in one OR'ed route that dispatches
// in a subroute (see docs/matchers/wa_tls.md for why).
func (p *Preset) server(listen []string, pp object) object {
	var routes []any
	if pp != nil {
		routes = append(routes, object{"handle": []any{pp}})
	}
	routes = append(routes,
		object{
			"match":  []any{object{"wa_silent": object{"wait": int64(SilentWait)}}},
			"handle": []any{p.chat()},
		},
		object{
			"match": []any{object{"wa_tls": object{}}, object{"wa_xmpp": object{}}, object{"wa_http": object{}}},
			"handle": []any{object{
				"handler": "subroute",
				"routes": []any{
					object{
						"match":  []any{object{"wa_tls": object{"sni": mediaNames}}},
						"handle": []any{p.media()},
					},
					object{
						"match": []any{object{"wa_tls": object{}}},
						"handle": []any{object{
							"handler": "tls",
							"connection_policies": []any{object{
								"default_sni":  p.Hostname,
								"fallback_sni": p.Hostname,
							}},
						}},
					},
					object{
						"match":  []any{object{"wa_http": object{}}},
						"handle": []any{p.withVia(object{"handler": "wa_http"})},
					},
					object{
						"match":  []any{object{"wa_xmpp": object{}}},
						"handle": []any{p.chat()},
					},
					object{"handle": []any{p.chat()}},
				},
			}},
		},
		object{"handle": []any{p.chat()}},
	)
	return object{"listen": listen, "routes": routes}
}

// chat is the handler that carries a connection to WhatsApp's chat port,
// with the PROXY header when send_proxy_protocol is set.
func (p *Preset) chat() object {
	h := p.withVia(object{"handler": "wa_proxy", "destination": ChatDestination})
	if p.SendProxyProtocol != "" {
		h["proxy_protocol"] = p.SendProxyProtocol
	}
	return h
}

// media is the handler that passes media TLS through to the name the client
// asked for. It never sends a PROXY header: WhatsApp's media servers speak
// TLS first.
func (p *Preset) media() object {
	return p.withVia(object{"handler": "wa_proxy", "destination": MediaDestination})
}

func (p *Preset) withVia(h object) object {
	if p.Via != nil {
		h["via"] = json.RawMessage(p.Via)
	}
	return h
}
