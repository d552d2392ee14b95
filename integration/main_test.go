package integration

import (
	"os"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// caddyMainEnv makes the test binary run Caddy's command line (`caddy run
// --config ...`) with every module this package imports, instead of the
// tests: a test starts its own binary with it to run Caddy as a real
// process, whose signals, `caddy stop` and exit it can observe.
const caddyMainEnv = "WAPROXY_TEST_CADDY_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(caddyMainEnv) == "1" {
		os.Args[0] = "caddy" // the command line reads os.Args[1:]
		caddycmd.Main()      // exits the process
		return
	}
	os.Exit(m.Run())
}
