package caddyfile_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/waproxy/caddy-waproxy/modules/app"
)

// TestGracePeriodOptionLoads checks that the waproxy app written by the
// waproxy_grace_period global option, next to the waproxy preset, is one
// that Caddy provisions and validates, with the period as written.
func TestGracePeriodOptionLoads(t *testing.T) {
	saved := caddy.DefaultStorage.Path
	caddy.DefaultStorage.Path = t.TempDir()
	t.Cleanup(func() { caddy.DefaultStorage.Path = saved })

	// Validate provisions the apps without starting them: nothing binds.
	input := "{\n\twaproxy_grace_period 1m30s\n\twaproxy {\n\t\tlisten 127.0.0.1:5222\n\t}\n}\n"
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) > 0 {
		t.Errorf("adapter warnings: %v", warnings)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	var a app.App
	if err := json.Unmarshal(cfg.AppsRaw["waproxy"], &a); err != nil {
		t.Fatalf("apps.waproxy %s: %v", cfg.AppsRaw["waproxy"], err)
	}
	if got := time.Duration(a.GracePeriod); got != 90*time.Second {
		t.Errorf("grace_period = %v; want 1m30s", got)
	}
	if _, ok := cfg.AppsRaw["layer4"]; !ok {
		t.Errorf("the preset's layer4 app is missing next to the waproxy app: %s", adapted)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Errorf("the adapted config does not validate: %v", err)
	}
}
