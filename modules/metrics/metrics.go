// Package metrics holds the proxy's Prometheus collectors.
//
// The collectors are created once per process and registered into every
// config's registry (ctx.GetMetricsRegistry() is new on each config load), so
// counters keep counting across reloads and several handlers can share them.
// Label values are bounded: error kinds and protocols are the constants below.
package metrics

import (
	"errors"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "whatsapp_proxy"

// Error kinds: the values of the `kind` label of whatsapp_proxy_errors_total.
const (
	// KindNotAllowed: the destination is outside the allowlist; it was never dialled.
	KindNotAllowed = "not_allowed"
	// KindDial: the destination (direct) or the SOCKS5 server could not be reached.
	KindDial = "dial"
	// KindTimeout: connecting (including the SOCKS5 handshake) took longer than connect_timeout.
	KindTimeout = "timeout"
	// KindSOCKS5Auth: the SOCKS5 server rejected our credentials or offered no usable method.
	KindSOCKS5Auth = "socks5_auth"
	// KindSOCKS5Refused: the SOCKS5 server answered CONNECT with a non-zero reply code.
	KindSOCKS5Refused = "socks5_refused"
	// KindSOCKS5Protocol: the SOCKS5 server sent something that is not valid SOCKS5.
	KindSOCKS5Protocol = "socks5_protocol"
	// KindProxyProtocol: the PROXY protocol header could not be built or written.
	KindProxyProtocol = "proxy_protocol"
	// KindIdleTimeout: nothing moved in either direction for idle_timeout.
	KindIdleTimeout = "idle_timeout"
	// KindRelay: a read or write failed while relaying an established connection.
	KindRelay = "relay"
	// KindDestination: the destination address (after placeholders) is not a valid host:port.
	KindDestination = "destination"
	// KindHTTPRequest: a client sent a malformed HTTP request, or one the
	// proxy does not forward (answered 400, 408 or 431).
	KindHTTPRequest = "http_request"
	// KindProxyAuth: an HTTP proxy request came without the proxy credentials, or with wrong ones (answered 407).
	KindProxyAuth = "proxy_auth"
	// KindUpstream: the destination's HTTP response was missing, malformed or broke off (answered 502 when possible).
	KindUpstream = "upstream"
	// KindResponseTimeout: the destination sent no HTTP response headers within response_timeout (answered 504).
	KindResponseTimeout = "response_timeout"
	// KindUpstreamTLS: the TLS handshake with the destination (wa_proxy's
	// `tls` option) failed, e.g. its certificate did not verify.
	KindUpstreamTLS = "upstream_tls"
	// KindMaxConnections: a new connection was refused because a
	// max_connections limit (process-wide or per listener) was reached.
	KindMaxConnections = "max_connections"
	// KindMaxConnectionsPerIP: a new connection was refused because its
	// client address already had max_connections_per_ip live connections.
	KindMaxConnectionsPerIP = "max_connections_per_ip"
	// KindShutdownCut: a live connection was closed at the end of the
	// grace period of a graceful shutdown.
	KindShutdownCut = "shutdown_cut"
	// KindTLSHandshake: a client's TLS handshake with wa_tls_terminate
	// failed or did not complete within its handshake_timeout.
	KindTLSHandshake = "tls_handshake"
)

// ErrorKinds lists every value of the kind label, so each series exists from the start.
var ErrorKinds = []string{
	KindNotAllowed, KindDial, KindTimeout, KindSOCKS5Auth, KindSOCKS5Refused,
	KindSOCKS5Protocol, KindProxyProtocol, KindIdleTimeout, KindRelay, KindDestination,
	KindHTTPRequest, KindProxyAuth, KindUpstream, KindResponseTimeout,
	KindUpstreamTLS, KindMaxConnections, KindMaxConnectionsPerIP, KindShutdownCut,
	KindTLSHandshake,
}

// Protocols: the values of the `protocol` label of whatsapp_proxy_protocol_connections.
const (
	ProtocolWhatsApp     = "whatsapp"      // WA header (chat), see the wa_xmpp matcher
	ProtocolWhatsAppEdge = "whatsapp_edge" // ED edge-routing prologue followed by the WA header
	ProtocolXMPP         = "xmpp"          // an XMPP client or server stream
	ProtocolTLS          = "tls"           // a TLS stream carried without termination
	ProtocolHTTP         = "http"          // an HTTP proxy request
	ProtocolRaw          = "raw"           // anything else (fallback routes)
)

// Protocols lists every value of the protocol label.
var Protocols = []string{ProtocolWhatsApp, ProtocolWhatsAppEdge, ProtocolXMPP, ProtocolTLS, ProtocolHTTP, ProtocolRaw}

var (
	// ConnectionsTotal counts proxied connections (a destination was chosen).
	ConnectionsTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "connections_total",
		Help: "Connections handled by the WhatsApp proxy handlers.",
	})
	// ConnectionsActive is the number of connections being proxied now.
	ConnectionsActive = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Name: "connections_active",
		Help: "Connections being proxied now.",
	})
	// BytesSent counts bytes the proxy wrote to clients (destination → client).
	BytesSent = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "bytes_sent_total",
		Help: "Bytes sent to clients (destination to client).",
	})
	// BytesReceived counts bytes the proxy read from clients (client → destination).
	BytesReceived = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Name: "bytes_received_total",
		Help: "Bytes received from clients (client to destination).",
	})
	// Errors counts failures by kind (see the Kind constants).
	Errors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "errors_total",
		Help: "Failures by kind: not_allowed, dial, timeout, socks5_auth, socks5_refused, socks5_protocol, proxy_protocol, idle_timeout, relay, destination, http_request, proxy_auth, upstream, response_timeout, upstream_tls, max_connections, max_connections_per_ip, shutdown_cut.",
	}, []string{"kind"})
	// ProtocolConnections is the number of connections being proxied now, by detected protocol.
	ProtocolConnections = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "protocol_connections",
		Help: "Connections being proxied now, by detected protocol.",
	}, []string{"protocol"})
	// UpstreamHealthy is 1 while an upstream (a SOCKS5 server, or the
	// direct dialer) passes its active health check and 0 while it fails.
	// The upstream label is the dialer name and server, e.g.
	// "socks5 127.0.0.1:1080" or "direct". Only upstreams with a health
	// check have a series.
	UpstreamHealthy = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: namespace, Name: "upstream_healthy",
		Help: "1 while an upstream passes its active health check, 0 while it fails.",
	}, []string{"upstream"})
)

// The series of every known error kind and protocol, created up front (so
// they read 0 before the first event) and kept, so counting one on a
// connection's path is an atomic add, not a hash of the label and a lookup.
var (
	errorCounters  = make(map[string]prometheus.Counter, len(ErrorKinds))
	protocolGauges = make(map[string]prometheus.Gauge, len(Protocols))
)

func init() {
	for _, k := range ErrorKinds {
		errorCounters[k] = Errors.WithLabelValues(k)
	}
	for _, p := range Protocols {
		protocolGauges[p] = ProtocolConnections.WithLabelValues(p)
	}
}

// ProtocolGauge is protocol_connections' series for protocol.
func ProtocolGauge(protocol string) prometheus.Gauge {
	if g, ok := protocolGauges[protocol]; ok {
		return g
	}
	return ProtocolConnections.WithLabelValues(protocol)
}

// Register adds the collectors to reg. It is safe to call for every handler
// and every config load: a collector that is already registered is not an error.
func Register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		ConnectionsTotal, ConnectionsActive, BytesSent, BytesReceived, Errors, ProtocolConnections,
		UpstreamHealthy,
	} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) && are.ExistingCollector == c {
				continue
			}
			return err
		}
	}
	return nil
}

// CountError increments errors_total for kind.
func CountError(kind string) {
	if c, ok := errorCounters[kind]; ok {
		c.Inc()
		return
	}
	Errors.WithLabelValues(kind).Inc()
}

// protocolVar is the connection variable in which matchers record what they detected.
const protocolVar = "wa.protocol"

// SetProtocol records on the connection which protocol a matcher detected,
// for the protocol label. Matchers call it when they match.
func SetProtocol(cx *layer4.Connection, protocol string) {
	if boxed, ok := boxedProtocols[protocol]; ok {
		cx.SetVar(protocolVar, boxed) // no allocation per match for the known values
		return
	}
	cx.SetVar(protocolVar, protocol)
}

// boxedProtocols holds each protocol label already converted to an
// interface value, so recording it on a connection does not allocate.
var boxedProtocols = func() map[string]any {
	m := make(map[string]any, len(Protocols))
	for _, p := range Protocols {
		m[p] = p
	}
	return m
}()

// Protocol returns the protocol a matcher recorded on the connection, or
// ProtocolRaw when none did.
func Protocol(cx *layer4.Connection) string {
	if p, ok := cx.GetVar(protocolVar).(string); ok && p != "" {
		return p
	}
	return ProtocolRaw
}
