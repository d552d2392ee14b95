package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/mod/modfile"
)

const (
	recipePath = "../../xcaddy.json"
	goModPath  = "../../go.mod"
	readmePath = "../../README.md"
)

// TestRecipeMatchesGoMod keeps xcaddy.json and go.mod from drifting apart: the
// binary that `just build` makes must carry the same Caddy and plugin versions
// that `go test ./...` tests.
func TestRecipeMatchesGoMod(t *testing.T) {
	r, err := Load(recipePath)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(goModPath)
	if err != nil {
		t.Fatal(err)
	}
	mf, err := modfile.Parse(goModPath, data, nil)
	if err != nil {
		t.Fatal(err)
	}
	required := make(map[string]string)
	for _, req := range mf.Require {
		required[req.Mod.Path] = req.Mod.Version
	}
	replaced := make(map[string]bool)
	for _, rep := range mf.Replace {
		replaced[rep.Old.Path] = true
	}

	modules := []string{CaddyModule}
	self := false
	for _, p := range r.Plugins {
		if p.Module == mf.Module.Mod.Path {
			self = true
			if p.Replace != "." {
				t.Errorf("xcaddy.json: plugin %s (this module) has replace %q; want \".\" (the repository root)", p.Module, p.Replace)
			}
			continue
		}
		modules = append(modules, p.Module)
	}
	if !self {
		t.Errorf("xcaddy.json does not build this module (%s)", mf.Module.Mod.Path)
	}
	for _, mod := range []string{CaddyModule, "github.com/mholt/caddy-l4"} {
		if !slices.Contains(modules, mod) {
			t.Errorf("xcaddy.json does not pin %s", mod)
		}
	}
	for _, mod := range modules {
		want, _ := r.Version(mod)
		got, ok := required[mod]
		switch {
		case !ok:
			t.Errorf("go.mod does not require %s (xcaddy.json pins %s)", mod, want)
		case got != want:
			t.Errorf("%s: xcaddy.json pins %s but go.mod requires %s; change both together", mod, want, got)
		}
		// xcaddy builds in a fresh module, where this go.mod's replace
		// directives do not apply: a replacement here would make the tests and
		// the binary use different code.
		if replaced[mod] {
			t.Errorf("go.mod replaces %s; xcaddy builds ignore that, so the binary would differ from what the tests use", mod)
		}
	}

	hasXcaddy := false
	for _, tool := range mf.Tool {
		hasXcaddy = hasXcaddy || tool.Path == "github.com/caddyserver/xcaddy/cmd/xcaddy"
	}
	if !hasXcaddy {
		t.Error("go.mod has no `tool github.com/caddyserver/xcaddy/cmd/xcaddy`; `go tool xcaddy` would not work")
	}
}

// TestREADMECommand checks that the build command the README opens with
// builds what the recipe says.
func TestREADMECommand(t *testing.T) {
	r, err := Load(recipePath)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(readmePath)
	if err != nil {
		t.Fatal(err)
	}
	var cmd string
	for line := range strings.Lines(string(data)) {
		if strings.HasPrefix(line, "go tool xcaddy build ") {
			cmd = strings.TrimSpace(line)
			break
		}
	}
	if cmd == "" {
		t.Fatal("README.md has no line starting with `go tool xcaddy build `")
	}
	// "go tool xcaddy build <version> ..."
	if v := strings.Fields(cmd)[4]; v != r.CaddyVersion {
		t.Errorf("README builds Caddy %s; xcaddy.json says %s", v, r.CaddyVersion)
	}
	args := r.Args()
	for i, a := range args {
		if a == "--with" && !strings.Contains(cmd, "--with "+args[i+1]+" ") && !strings.HasSuffix(cmd, "--with "+args[i+1]) {
			t.Errorf("README's build command lacks `--with %s` from xcaddy.json:\n%s", args[i+1], cmd)
		}
	}
}

func TestArgs(t *testing.T) {
	r := &Recipe{
		CaddyVersion: "v2.11.9",
		Output:       "./caddy",
		Plugins: []Plugin{
			{Module: "example.com/local", Version: "v0.0.0", Replace: "."},
			{Module: "example.com/remote", Version: "v0.0.0-20260216070754-eca560d759c9"},
		},
	}
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"build", "v2.11.9", "--output", "./caddy",
		"--with", "example.com/local@v0.0.0=.",
		"--with", "example.com/remote@v0.0.0-20260216070754-eca560d759c9",
	}
	if got := r.Args(); !slices.Equal(got, want) {
		t.Errorf("Args() = %q\nwant %q", got, want)
	}
}

func TestLoadRejects(t *testing.T) {
	for _, tc := range []struct {
		name, json, want string
	}{
		{"latest caddy", `{"caddy_version":"latest","output":"./caddy","plugins":[{"module":"a.b/c","version":"v1.0.0"}]}`, "caddy_version"},
		{"short caddy version", `{"caddy_version":"v2.11","output":"./caddy","plugins":[{"module":"a.b/c","version":"v1.0.0"}]}`, "caddy_version"},
		{"unpinned plugin", `{"caddy_version":"v2.11.9","output":"./caddy","plugins":[{"module":"a.b/c"}]}`, "not pinned"},
		{"branch plugin", `{"caddy_version":"v2.11.9","output":"./caddy","plugins":[{"module":"a.b/c","version":"master"}]}`, "not pinned"},
		{"replace without version", `{"caddy_version":"v2.11.9","output":"./caddy","plugins":[{"module":"a.b/c","replace":"."}]}`, "not pinned"},
		{"version in module", `{"caddy_version":"v2.11.9","output":"./caddy","plugins":[{"module":"a.b/c@v1.0.0","version":"v1.0.0"}]}`, "not a module path"},
		{"duplicate", `{"caddy_version":"v2.11.9","output":"./caddy","plugins":[{"module":"a.b/c","version":"v1.0.0"},{"module":"a.b/c","version":"v1.0.1"}]}`, "twice"},
		{"no plugins", `{"caddy_version":"v2.11.9","output":"./caddy"}`, "no plugins"},
		{"no output", `{"caddy_version":"v2.11.9","plugins":[{"module":"a.b/c","version":"v1.0.0"}]}`, "output"},
		{"space", `{"caddy_version":"v2.11.9","output":"./my caddy","plugins":[{"module":"a.b/c","version":"v1.0.0"}]}`, "output"},
		{"unknown field", `{"caddy_version":"v2.11.9","output":"./caddy","plugins":[],"plugin":[]}`, "unknown field"},
		{"not json", `caddy_version = v2.11.9`, "parsing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "xcaddy.json")
			if err := os.WriteFile(path, []byte(tc.json), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Load(path)
			if err == nil {
				t.Fatalf("Load accepted %s", tc.json)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}
