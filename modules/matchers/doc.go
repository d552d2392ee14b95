// Package matchers holds the layer4 connection matchers that recognise
// WhatsApp's protocols on a shared port: wa_tls (a TLS ClientHello, its SNI
// and ALPN), wa_xmpp (WhatsApp chat, the ED edge-routing prologue, XMPP
// streams), wa_http (HTTP proxy requests) and wa_silent (a client that sends
// nothing).
package matchers
