// Package waproxy is the caddy-waproxy plugin: a WhatsApp proxy built on
// caddy-l4. Importing it (xcaddy build --with github.com/waproxy/caddy-waproxy)
// registers every module: the wa_* matchers and handlers, the wa.dialers
// dialers, the metrics they share, the admin.api.waproxy admin module and
// the `waproxy` Caddyfile global option.
package waproxy

import (
	_ "github.com/waproxy/caddy-waproxy/caddyfile"
	_ "github.com/waproxy/caddy-waproxy/modules/admin"
	_ "github.com/waproxy/caddy-waproxy/modules/app"
	_ "github.com/waproxy/caddy-waproxy/modules/handlers"
	_ "github.com/waproxy/caddy-waproxy/modules/matchers"
	_ "github.com/waproxy/caddy-waproxy/modules/upstreams"
)
