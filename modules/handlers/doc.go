// Package handlers holds the layer4 handlers that carry a matched connection
// to its destination through a wa.dialers dialer: wa_proxy (a raw TCP relay,
// optionally re-encrypted with TLS) and wa_http (a forward HTTP proxy). Both
// hand established plain-TCP pairs to the epoll event loop
// (eventloop_linux.go) or relay them on a goroutine (relay.go).
package handlers
