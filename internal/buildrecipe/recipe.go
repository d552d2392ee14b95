package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/mod/semver"
)

// Recipe is the build recipe in xcaddy.json: which Caddy, which plugins at
// which versions, and where the binary goes.
type Recipe struct {
	// CaddyVersion is the Caddy release to build, e.g. "v2.11.9".
	CaddyVersion string `json:"caddy_version"`
	// Output is the path of the built binary, relative to the repository root.
	Output string `json:"output"`
	// Plugins are the modules compiled in, each at a pinned version.
	Plugins []Plugin `json:"plugins"`
}

// Plugin is one `xcaddy build --with` argument.
type Plugin struct {
	// Module is the Go module path.
	Module string `json:"module"`
	// Version is a pinned semantic or pseudo-version. The module proxy refuses
	// unpinned look-ups here, so it is required even with Replace (use v0.0.0).
	Version string `json:"version"`
	// Replace, if set, is a local directory (relative to the repository root)
	// that replaces the module, as `--with module@version=dir`.
	Replace string `json:"replace,omitempty"`
}

// Load reads and checks the recipe at path.
func Load(path string) (*Recipe, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading build recipe: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var r Recipe
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("parsing build recipe %s: %w", path, err)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("build recipe %s: %w", path, err)
	}
	return &r, nil
}

// Validate checks that every version is pinned and that no field would break
// the xcaddy command line.
func (r *Recipe) Validate() error {
	if !pinned(r.CaddyVersion) {
		return fmt.Errorf("caddy_version %q is not a pinned version like v2.11.9", r.CaddyVersion)
	}
	if r.Output == "" || hasSpace(r.Output) {
		return fmt.Errorf("output %q must be a path without spaces", r.Output)
	}
	if len(r.Plugins) == 0 {
		return errors.New("no plugins")
	}
	seen := make(map[string]bool)
	for i, p := range r.Plugins {
		if p.Module == "" || hasSpace(p.Module) || strings.ContainsAny(p.Module, "@=") {
			return fmt.Errorf("plugin %d: module %q is not a module path", i, p.Module)
		}
		if seen[p.Module] {
			return fmt.Errorf("plugin %s listed twice", p.Module)
		}
		seen[p.Module] = true
		if !pinned(p.Version) {
			return fmt.Errorf("plugin %s: version %q is not pinned (the module proxy refuses unpinned look-ups; use v0.0.0 with replace for a local directory)", p.Module, p.Version)
		}
		if hasSpace(p.Replace) {
			return fmt.Errorf("plugin %s: replace %q contains spaces", p.Module, p.Replace)
		}
	}
	return nil
}

// Args returns the arguments of `go tool xcaddy` that build the recipe.
func (r *Recipe) Args() []string {
	args := []string{"build", r.CaddyVersion, "--output", r.Output}
	for _, p := range r.Plugins {
		with := p.Module + "@" + p.Version
		if p.Replace != "" {
			with += "=" + p.Replace
		}
		args = append(args, "--with", with)
	}
	return args
}

// Version returns the pinned version of module in the recipe: the Caddy
// version for Caddy itself, otherwise the plugin's.
func (r *Recipe) Version(module string) (string, bool) {
	if module == CaddyModule {
		return r.CaddyVersion, true
	}
	for _, p := range r.Plugins {
		if p.Module == module {
			return p.Version, true
		}
	}
	return "", false
}

// CaddyModule is Caddy's module path.
const CaddyModule = "github.com/caddyserver/caddy/v2"

func pinned(v string) bool { return semver.IsValid(v) && semver.Canonical(v) == v }

func hasSpace(s string) bool { return strings.ContainsAny(s, " \t\r\n") }
