package caddyfile

import (
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/waproxy/caddy-waproxy/modules/app"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("waproxy_grace_period", parseGracePeriod)
}

// parseGracePeriod sets up the waproxy app (docs/app.md) from the
// waproxy_grace_period global option. It is an option of its own, not part
// of the waproxy preset's block, because a Caddyfile global option makes
// exactly one Caddy app and the preset's is layer4. Syntax:
//
//	waproxy_grace_period <duration>
func parseGracePeriod(d *caddyfile.Dispenser, existingVal any) (any, error) {
	d.Next() // consume option name
	if existingVal != nil {
		return nil, d.Err("waproxy_grace_period: duplicate option (give it once)")
	}
	if !d.NextArg() {
		return nil, d.Err("waproxy_grace_period: missing duration (e.g. waproxy_grace_period 30s)")
	}
	val := d.Val()
	dur, err := caddy.ParseDuration(val)
	if err != nil {
		return nil, d.Errf("waproxy_grace_period: bad duration '%s': %v", val, err)
	}
	if dur <= 0 {
		// The app takes 0 for its default (30s), so a zero written here
		// would not mean "cut at once": reject it with the negative ones.
		return nil, d.Errf("waproxy_grace_period: must be positive, got '%s' (the default is 30s; for an almost immediate cut give a short period such as 1s)", val)
	}
	if d.NextArg() {
		return nil, d.Errf("waproxy_grace_period: takes one duration, got an extra argument '%s'", d.Val())
	}
	if d.NextBlock(0) {
		return nil, d.Err("waproxy_grace_period: takes no block, only a duration (waproxy_grace_period 30s)")
	}
	a := app.App{GracePeriod: caddy.Duration(dur)}
	return httpcaddyfile.App{Name: "waproxy", Value: caddyconfig.JSON(a, nil)}, nil
}
