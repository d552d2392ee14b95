package caddyfile_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

var updateExamples = flag.Bool("update-examples", false, "rewrite the JSON twins of examples/*Caddyfile from the adapter's output")

// TestExamples keeps every examples/*Caddyfile in step with its JSON twin
// (examples/Caddyfile → examples/Caddyfile.json, examples/tor.Caddyfile →
// examples/tor.json): the twin must be exactly what `caddy adapt --pretty`
// prints. Each example must also adapt without warnings (so it is
// `caddy fmt`-clean) and provision, the way `caddy validate` checks it.
//
// After changing an example: go test ./caddyfile -run TestExamples -update-examples
func TestExamples(t *testing.T) {
	// Validating a config with TLS termination creates Caddy's local CA in
	// the default storage: keep it in this test's temporary directory, not in
	// the user's data directory.
	saved := caddy.DefaultStorage.Path
	caddy.DefaultStorage.Path = t.TempDir()
	t.Cleanup(func() { caddy.DefaultStorage.Path = saved })
	files, err := filepath.Glob("../examples/*Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no examples/*Caddyfile found")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			twin := jsonTwin(f)
			input, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			// named as `caddy adapt --config examples/...` run from the
			// repository's root names it (file_server hides the config file
			// by that name)
			name := strings.TrimPrefix(filepath.ToSlash(f), "../")
			adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, map[string]any{"filename": name})
			if err != nil {
				t.Fatalf("adapting %s: %v", f, err)
			}
			for _, w := range warnings {
				t.Errorf("%s:%d: adapter warning: %s %s", f, w.Line, w.Directive, w.Message)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, adapted, "", "\t"); err != nil {
				t.Fatal(err)
			}
			pretty.WriteByte('\n') // as `caddy adapt --pretty` prints it

			if *updateExamples {
				if err := os.WriteFile(twin, pretty.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			} else {
				want, err := os.ReadFile(twin)
				if err != nil {
					t.Fatalf("%s has no JSON twin: %v (run with -update-examples to write it)", f, err)
				}
				if !bytes.Equal(pretty.Bytes(), want) {
					// CompareAdapt prints a line diff.
					caddytest.CompareAdapt(t, f, string(input), "caddyfile", strings.TrimSuffix(string(want), "\n"))
					t.Errorf("%s differs from the adapted %s (run with -update-examples to rewrite it)", twin, f)
				}
			}

			var cfg caddy.Config
			if err := json.Unmarshal(adapted, &cfg); err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(&cfg); err != nil {
				t.Errorf("%s does not validate: %v", f, err)
			}
		})
	}
}

// jsonTwin names the JSON twin of a Caddyfile example: "Caddyfile" →
// "Caddyfile.json", "tor.Caddyfile" → "tor.json".
func jsonTwin(caddyfile string) string {
	dir, base := filepath.Split(caddyfile)
	if base == "Caddyfile" {
		return caddyfile + ".json"
	}
	return filepath.Join(dir, strings.TrimSuffix(base, ".Caddyfile")+".json")
}
