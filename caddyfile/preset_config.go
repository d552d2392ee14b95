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
// in a subroute (see docs/matchers/wa_tls.md for why), behind the PROXY
// header reader pp (nil for none) and the connection limit (see guard).
func (p *Preset) server(listen []string, pp object) object {
	routes := []any{
		object{
			"match":  []any{object{"wa_silent": object{"wait": int64(SilentWait)}}},
			"handle": []any{p.chat()},
		},
		object{
			"match": []any{object{"wa_tls": object{}}, object{"wa_xmpp": object{}}, object{"wa_http": object{}}},
			"handle": []any{object{
				"handler": "subroute",
				"routes": append([]any{
					object{
						"match":  []any{object{"wa_tls": object{"sni": mediaNames}}},
						"handle": []any{p.media()},
					},
					object{
						"match": []any{object{"wa_tls": object{}}},
						"handle": []any{
							object{
								"handler":             "wa_tls_terminate",
								"connection_policies": []any{p.tlsPolicy()},
							},
							// the decrypted bytes, sorted in a subroute of their
							// own: its matching timeout starts after the handshake;
							// what is neither goes to chat raw
							object{"handler": "subroute", "routes": append(p.sorted(), object{"handle": []any{p.chat()}})},
						},
					},
				}, p.sorted()...), // plain: wa_http or wa_xmpp matched, so no catch-all
			}},
		},
		object{"handle": []any{p.chat()}},
	}
	return object{"listen": listen, "routes": p.guard(routes, pp)}
}

// sorted returns the routes that sort plain bytes and the bytes that TLS
// termination decrypted: HTTP proxy requests to wa_http, WhatsApp chat and
// XMPP to chat.
func (p *Preset) sorted() []any {
	return []any{
		object{
			"match":  []any{object{"wa_http": object{}}},
			"handle": []any{p.httpHandler()},
		},
		object{
			"match":  []any{object{"wa_xmpp": object{}}},
			"handle": []any{p.chat()},
		},
	}
}

// guard puts the handlers that run before any matcher in front of a
// server's routes: the PROXY header reader pp (if any), then the connection
// limit. Without a limit, pp is a route of its own, as in a hand-written
// layer4 block. With one, both run in one handler chain with the routes in
// a subroute after them, so that wa_limit holds the connection's place while
// the subroute matches and proxies it (docs/handlers/wa_limit.md), and its
// per-IP count sees the client named in the PROXY header.
func (p *Preset) guard(routes []any, pp object) []any {
	limit := p.limit()
	switch {
	case limit == nil && pp == nil:
		return routes
	case limit == nil:
		return append([]any{object{"handle": []any{pp}}}, routes...)
	}
	var chain []any
	if pp != nil {
		chain = append(chain, pp)
	}
	chain = append(chain, limit, object{"handler": "subroute", "routes": routes})
	return []any{object{"handle": chain}}
}

// limit returns the wa_limit handler of max_connections and
// max_connections_per_ip, or nil when neither is set.
func (p *Preset) limit() object {
	if p.MaxConnections == 0 && p.MaxConnectionsPerIP == 0 {
		return nil
	}
	h := object{"handler": "wa_limit"}
	if p.MaxConnections > 0 {
		h["max_connections"] = p.MaxConnections
	}
	if p.MaxConnectionsPerIP > 0 {
		h["max_connections_per_ip"] = p.MaxConnectionsPerIP
	}
	return h
}

// tlsPolicy is the connection policy of TLS termination: the preset's
// certificate for every name, and HTTP/1.1 only in ALPN (Caddy's default is
// h2 then http/1.1). The routes inside the TLS recognise an HTTP/1.x request
// (for the website, or wa_http's page and proxy); a browser that got h2
// would send the HTTP/2 preface instead, which no route takes for HTTP, so
// it would go raw to WhatsApp's chat port. WhatsApp's chat offers no ALPN.
func (p *Preset) tlsPolicy() object {
	return object{
		"default_sni":  p.Hostname,
		"fallback_sni": p.Hostname,
		"alpn":         []string{"http/1.1"},
	}
}

// httpHandler handles a connection that starts with an HTTP request (in the
// clear, or inside the terminated TLS). Without a website that is wa_http.
// With one, an origin-form request (`GET / HTTP/1.1`: a browser or a probe,
// not a proxy client) goes to the website over a loopback hop (caddy-l4's
// proxy handler), and every other request — CONNECT, absolute-form — to
// wa_http. The origin-form test uses caddy-l4's http matcher, which parses
// the whole request header; it runs only after wa_http has matched, so it
// never waits on bytes that are not HTTP.
func (p *Preset) httpHandler() object {
	proxy := p.withVia(object{"handler": "wa_http"})
	if p.Website == "" {
		return proxy
	}
	website := object{
		"handler":   "proxy",
		"upstreams": []any{object{"dial": []string{p.Website}}},
	}
	if p.WebsiteProxyProtocol != "" {
		website["proxy_protocol"] = p.WebsiteProxyProtocol
	}
	return object{
		"handler": "subroute",
		"routes": []any{
			object{
				"match": []any{object{"http": []any{object{
					"vars_regexp": object{"{http.request.orig_uri}": object{"pattern": "^/"}},
				}}}},
				"handle": []any{website},
			},
			object{"handle": []any{proxy}},
		},
	}
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

// withVia adds the settings that every wa_proxy and wa_http handler of the
// preset shares: the dialer and the connect timeout.
func (p *Preset) withVia(h object) object {
	if p.Via != nil {
		h["via"] = json.RawMessage(p.Via)
	}
	if p.ConnectTimeout > 0 {
		h["connect_timeout"] = int64(p.ConnectTimeout)
	}
	return h
}
