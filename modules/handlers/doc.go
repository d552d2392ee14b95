// Package handlers holds the layer4 handlers that carry a matched connection
// to its destination: wa_proxy, a raw TCP relay through a wa.dialers dialer.
package handlers
