package handlers

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// provisionJSON fills h from its JSON config, then provisions and validates
// it, as Caddy does with a module; a bad JSON fails the test.
func provisionJSON(t *testing.T, config string, h interface {
	caddy.Provisioner
	caddy.Validator
}) error {
	t.Helper()
	if err := json.Unmarshal([]byte(config), h); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		return err
	}
	return h.Validate()
}
