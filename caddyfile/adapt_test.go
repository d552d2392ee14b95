package caddyfile_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4/modules/l4close"
	_ "github.com/mholt/caddy-l4/modules/l4echo"
	_ "github.com/mholt/caddy-l4/modules/l4proxy"
	_ "github.com/mholt/caddy-l4/modules/l4socks"
	_ "github.com/mholt/caddy-l4/modules/l4subroute"

	_ "github.com/waproxy/caddy-waproxy"
)

var update = flag.Bool("update", false, "rewrite the expected JSON of the adapt tests that pass adaptation")

// TestAdapt pins the Caddyfile→JSON mapping. Each testdata/*.caddyfiletest
// holds a Caddyfile, a line of ten dashes, and either the expected JSON
// (tab-indented) or `error: <text>`: adaptation must then fail with an error
// that contains <text>.
func TestAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/*.caddyfiletest")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no adapt tests found in testdata/")
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".caddyfiletest"), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			input, expected, ok := strings.Cut(string(data), "\n----------\n")
			if !ok {
				t.Fatalf("%s: no ---------- separator line", f)
			}
			expected = strings.TrimSpace(expected)
			if want, isErr := strings.CutPrefix(expected, "error:"); isErr {
				_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
				if err == nil {
					t.Fatalf("adapting %s succeeded; want an error containing %q", f, strings.TrimSpace(want))
				}
				if !strings.Contains(err.Error(), strings.TrimSpace(want)) {
					t.Fatalf("adapting %s: error %q does not contain %q", f, err, strings.TrimSpace(want))
				}
				return
			}
			if *update {
				out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
				if err != nil {
					t.Fatal(err)
				}
				var buf bytes.Buffer
				if err := json.Indent(&buf, out, "", "\t"); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(f, []byte(input+"\n----------\n"+buf.String()+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if !caddytest.CompareAdapt(t, f, input, "caddyfile", expected) {
				t.Errorf("%s: adapted JSON differs from the expected half (see the diff above)", f)
			}
		})
	}
}
