package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// The reload tests: config swaps through the admin API (POST /load and
// PATCH /config/...) while WhatsApp chat connections are live. Live
// connections keep flowing on the legs they have and stay counted; new
// connections get the new config; a bad config is refused with an error that
// names the problem, and the old config keeps serving.

const (
	// reloadRounds is how many times TestReloadUnderLoad reloads.
	reloadRounds = 20
	// reloadJoiners is how many new connections TestReloadUnderLoad dials
	// while each reload is in progress; they stay live afterwards.
	reloadJoiners = 5
	// reloadWorkers is how many goroutines drive the clients at once.
	reloadWorkers = 64
	// reloadNewPerCase is how many new connections TestReloadBadConfigRejected
	// opens after each rejected config. Were the rejected config's socket
	// left listening beside the running one, the kernel would hand it about
	// half of them: all eight would miss it once in 256 runs.
	reloadNewPerCase = 8
	// reloadHandler is the admin API path of the wa_proxy handler in
	// reloadConfig.
	reloadHandler = "/config/apps/layer4/servers/proxy/routes/0/handle/0"
	// reloadBanner is what the second edge (a bannerServer) writes first on
	// each connection, so a client can tell which destination it reached.
	reloadBanner = "edge-b ready\r\n"
)

// reloadConns is how many live chat connections TestReloadUnderLoad keeps
// through its reloads: the 1,000, or 200 under the race detector
// (see race_on_test.go), where 200 already take longer (6-8 s on 2 cores)
// than 1,000 without it (3-5 s). The assertions are the same.
func reloadConns() int {
	if testutil.RaceEnabled {
		return 200
	}
	return 1000
}

// reloadConfig is the config the reload tests start from and change: one
// chat route on listen whose wa_proxy goes to dest with the idle timeout idle.
func reloadConfig(listen, dest, idle string) string {
	return proxyConfig(listen, []obj{
		chatRoute(obj{"destination": dest, "allow": []string{"127.0.0.1"}, "idle_timeout": idle}),
	}, "", nil)
}

// editConfig returns cfg with f applied to its decoded JSON.
func editConfig(t *testing.T, cfg string, f func(m obj)) string {
	t.Helper()
	var m obj
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		t.Fatal(err)
	}
	f(m)
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// proxyHandler returns the wa_proxy handler of a config from reloadConfig.
func proxyHandler(m obj) obj {
	server := m["apps"].(obj)["layer4"].(obj)["servers"].(obj)["proxy"].(obj)
	return server["routes"].([]any)[0].(obj)["handle"].([]any)[0].(obj)
}

// postLoad posts cfg to POST /load with the admin section StartCaddy set
// (as Caddy.Load does) and returns the status and body instead of failing.
func postLoad(c *testutil.Caddy, cfg string) (int, string, error) {
	var m obj
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		return 0, "", err
	}
	m["admin"] = obj{"listen": c.Admin, "config": obj{"persist": false}}
	b, _ := json.Marshal(m)
	return c.AdminDo(http.MethodPost, "/load", b)
}

// patchConfig replaces the value at path (/config/...) with v through
// PATCH, which reloads the config.
func patchConfig(c *testutil.Caddy, path string, v any) (int, string, error) {
	b, _ := json.Marshal(v)
	return c.AdminDo(http.MethodPatch, path, b)
}

// configValue returns the running config's value at path (/config/...).
func configValue(t *testing.T, c *testutil.Caddy, path string) any {
	t.Helper()
	status, body, err := c.AdminDo(http.MethodGet, path, nil)
	if err != nil || status != http.StatusOK {
		t.Fatalf("GET %s: status %d, %v: %s", path, status, err, body)
	}
	var v any
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("GET %s: %v: %s", path, err, body)
	}
	return v
}

// adminError returns the "error" member of an admin API error response.
func adminError(body string) string {
	var e struct {
		Error string `json:"error"`
	}
	_ = json.Unmarshal([]byte(body), &e)
	return e.Error
}

// waClient is one live chat connection of the reload tests.
type waClient struct {
	idx  int
	conn *net.TCPConn
	sent int64 // bytes written, and read back: the edges echo
}

// openWA dials listen and sends a WhatsApp chat hello; it expects banner
// (empty for the plain echo edge) and then the hello back. It returns an
// error instead of failing the test, so goroutines may call it.
func openWA(listen string, idx int, banner string) (*waClient, error) {
	w, _, err := openWARetry(listen, idx, banner, 0)
	return w, err
}

// openWARetry is openWA that starts over, up to retries times, when the
// connection is reset before anything came back (while connecting, or right
// after), as a client would, and reports how many times it was. That happens
// to a connection arriving while a reload swaps the listening socket, unless
// the kernel migrates it (see reloadMigrates).
func openWARetry(listen string, idx int, banner string, retries int) (*waClient, int, error) {
	for resets := 0; ; resets++ {
		c, err := net.DialTimeout("tcp", listen, 10*time.Second)
		if err != nil {
			if errors.Is(err, syscall.ECONNRESET) && resets < retries {
				continue
			}
			return nil, resets, fmt.Errorf("conn %d: dial (after %d resets): %w", idx, resets, err)
		}
		w := &waClient{idx: idx, conn: c.(*net.TCPConn)}
		n, err := w.echoN(waHello(), banner)
		if err == nil {
			return w, resets, nil
		}
		c.Close()
		if n > 0 || !errors.Is(err, syscall.ECONNRESET) || resets == retries {
			return nil, resets, fmt.Errorf("%w (after %d resets)", err, resets)
		}
	}
}

// reloadMigrates reports whether the kernel hands the connections queued on
// a closing listening socket to another socket of its SO_REUSEPORT group
// (net.ipv4.tcp_migrate_req, Linux 5.14+). Caddy binds a new SO_REUSEPORT
// socket for each config and closes the old one after the swap; without the
// migration, a connection that reaches the old socket in that moment is
// reset while connecting.
func reloadMigrates() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	return err == nil && strings.TrimSpace(string(b)) == "1"
}

// echo writes msg and reads back exactly banner followed by msg.
func (w *waClient) echo(msg []byte, banner string) error {
	_, err := w.echoN(msg, banner)
	return err
}

// echoN is echo that also returns how many bytes came back.
func (w *waClient) echoN(msg []byte, banner string) (int, error) {
	_ = w.conn.SetDeadline(time.Now().Add(30 * time.Second)) // a hang guard
	if _, err := w.conn.Write(msg); err != nil {
		return 0, fmt.Errorf("conn %d (%s): write: %w", w.idx, w.conn.LocalAddr(), err)
	}
	want := append([]byte(banner), msg...)
	got := make([]byte, len(want))
	if n, err := io.ReadFull(w.conn, got); err != nil {
		return n, fmt.Errorf("conn %d (%s): read %d of the %d bytes expected back: %w", w.idx, w.conn.LocalAddr(), n, len(want), err)
	}
	if !bytes.Equal(got, want) {
		return len(got), fmt.Errorf("conn %d (%s): got back %q..., want %q...", w.idx, w.conn.LocalAddr(), got[:min(48, len(got))], want[:min(48, len(want))])
	}
	w.sent += int64(len(msg))
	return len(got), nil
}

// roundFrame is the WhatsApp frame connection i sends in round r: its
// payload names the connection, the round and the phase, padded to a length
// that varies with i and r, so a frame delivered to the wrong connection or
// twice is noticed.
func roundFrame(i, r int, phase string) []byte {
	p := fmt.Appendf(nil, "conn=%04d round=%02d phase=%s;", i, r, phase)
	for j := range (i*31 + r*97) % 1500 {
		p = append(p, byte(i+r+j))
	}
	return frame(p)
}

// forEach runs f(0), ..., f(n-1) on reloadWorkers goroutines and returns an
// error that counts the failures and shows the first few.
func forEach(n int, f func(i int) error) error {
	var (
		mu     sync.Mutex
		errs   []error
		failed int
		next   atomic.Int64
		wg     sync.WaitGroup
	)
	for range min(n, reloadWorkers) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				if err := f(i); err != nil {
					mu.Lock()
					failed++
					if len(errs) < 5 {
						errs = append(errs, err)
					}
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if failed == 0 {
		return nil
	}
	return fmt.Errorf("%d of %d failed; first: %w", failed, n, errors.Join(errs...))
}

// openClients opens n chat connections (numbered from first) that expect
// banner first, closing them when the test ends.
func openClients(t *testing.T, listen string, first, n int, banner string) []*waClient {
	t.Helper()
	clients := make([]*waClient, n)
	t.Cleanup(func() {
		for _, w := range clients {
			if w != nil {
				w.conn.Close()
			}
		}
	})
	err := forEach(n, func(i int) error {
		w, err := openWA(listen, first+i, banner)
		clients[i] = w
		return err
	})
	if err != nil {
		t.Fatalf("opening %d chat connections: %v", n, err)
	}
	return clients
}

// echoAll has every client exchange one frame for round r and phase, with
// nothing before the echo (they are past their edge's banner).
func echoAll(clients []*waClient, r int, phase string) error {
	return forEach(len(clients), func(i int) error {
		return clients[i].echo(roundFrame(clients[i].idx, r, phase), "")
	})
}

// listed returns GET /waproxy/connections by remote address.
func listed(t *testing.T, c *testutil.Caddy) map[string]adminConn {
	t.Helper()
	var list []adminConn
	body := adminGet(t, c, "/waproxy/connections")
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("connections JSON: %v", err)
	}
	m := make(map[string]adminConn, len(list))
	for _, ac := range list {
		m[ac.Remote] = ac
	}
	if len(m) != len(list) {
		t.Fatalf("GET /waproxy/connections lists %d connections from %d remotes", len(list), len(m))
	}
	return m
}

// checkLive asserts that the proxy counts exactly the live clients: the
// connections_active gauge, the registry, and GET /waproxy/connections,
// which lists each of them on listen. Each client has had a frame echoed, so
// the proxy took its connection before this runs: the counts are exact
// without waiting.
func checkLive(t *testing.T, c *testutil.Caddy, listen string, live []*waClient, when string) {
	t.Helper()
	if got := metric(t, c, "whatsapp_proxy_connections_active"); got != float64(len(live)) {
		t.Fatalf("%s: whatsapp_proxy_connections_active is %v, want the %d live connections", when, got, len(live))
	}
	if got := metric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`); got != float64(len(live)) {
		t.Fatalf("%s: protocol_connections{whatsapp} is %v, want %d", when, got, len(live))
	}
	if got := registry.Len(); got != len(live) {
		t.Fatalf("%s: the registry tracks %d connections, want %d", when, got, len(live))
	}
	list := listed(t, c)
	if len(list) != len(live) {
		t.Fatalf("%s: GET /waproxy/connections lists %d connections, want %d", when, len(list), len(live))
	}
	for _, w := range live {
		ac, ok := list[w.conn.LocalAddr().String()]
		if !ok || ac.Listener != listen || ac.Protocol != "whatsapp" {
			t.Fatalf("%s: conn %d (%s) listed as %+v (%v), want it on %s as whatsapp", when, w.idx, w.conn.LocalAddr(), ac, ok, listen)
		}
	}
}

// waitIdle waits until no connection from an earlier test is left, so the
// gauges and the registry count only this test's connections.
func waitIdle(t *testing.T, c *testutil.Caddy) {
	t.Helper()
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
	testutil.WaitFor(t, 5*time.Second, "an empty connection registry", func() bool { return registry.Len() == 0 })
}

// TestReloadUnderLoad: 1,000 live chat connections (200 under -race) keep
// exchanging frames while the config is reloaded 20 times through the admin
// API, alternately POST /load with a whole config and PATCH of one field, and
// new connections arrive during each reload. No connection drops, every byte
// comes back, and after each reload the active gauge, the registry and
// GET /waproxy/connections all equal the live count; the byte counters count
// every byte across the reloads.
func TestReloadUnderLoad(t *testing.T) {
	n := reloadConns()
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, reloadConfig(listen, edge.Addr, "100s"))
	waitIdle(t, c)
	total0 := metric(t, c, "whatsapp_proxy_connections_total")
	recv0 := metric(t, c, "whatsapp_proxy_bytes_received_total")
	sent0 := metric(t, c, "whatsapp_proxy_bytes_sent_total")

	clients := openClients(t, listen, 0, n, "")
	checkLive(t, c, listen, clients, "before the first reload")

	// Connections dialled during a reload may be reset while connecting
	// (see reloadMigrates): a client sees a refused attempt and dials again,
	// so the joiners do too, unless the kernel migrates them. Once
	// connected, none may be lost.
	strict := reloadMigrates()
	retries := 20
	if strict {
		retries = 0
	}
	var resets atomic.Int64

	for r := range reloadRounds {
		// each reload changes the idle timeout, so Caddy really swaps the
		// config (an unchanged config is not reloaded)
		idle := fmt.Sprintf("%ds", 101+r)
		var (
			wg         sync.WaitGroup
			status     int
			body       string
			reloadErr  error
			joiners    []*waClient
			joinersErr error
		)
		wg.Go(func() {
			if r%2 == 0 {
				status, body, reloadErr = postLoad(c, reloadConfig(listen, edge.Addr, idle))
			} else {
				status, body, reloadErr = patchConfig(c, reloadHandler+"/idle_timeout", idle)
			}
		})
		first := len(clients)
		wg.Go(func() { // new connections arrive while the config is swapped
			joiners = make([]*waClient, reloadJoiners)
			joinersErr = forEach(reloadJoiners, func(i int) error {
				w, n, err := openWARetry(listen, first+i, "", retries)
				joiners[i] = w
				resets.Add(int64(n))
				return err
			})
		})
		during := echoAll(clients, r, "during")
		wg.Wait()
		for _, w := range joiners {
			if w != nil {
				clients = append(clients, w)
				t.Cleanup(func() { w.conn.Close() })
			}
		}
		if reloadErr != nil || status != http.StatusOK {
			t.Fatalf("reload %d: status %d, %v: %s", r+1, status, reloadErr, body)
		}
		if during != nil {
			t.Fatalf("reload %d: frames exchanged during the reload: %v", r+1, during)
		}
		if joinersErr != nil {
			t.Fatalf("reload %d: connections dialled during the reload: %v", r+1, joinersErr)
		}
		if got := configValue(t, c, reloadHandler+"/idle_timeout"); got != idle {
			t.Fatalf("reload %d: running idle_timeout is %v, want %s", r+1, got, idle)
		}
		// every connection, old and new, carries a frame between this reload
		// and the next
		if err := echoAll(clients, r, "after"); err != nil {
			t.Fatalf("after reload %d: %v", r+1, err)
		}
		checkLive(t, c, listen, clients, fmt.Sprintf("after reload %d", r+1))
	}

	// every byte was echoed (each frame was compared) and counted, per
	// connection and in the counters, across all the reloads
	var carried int64
	for _, w := range clients {
		carried += w.sent
	}
	testutil.WaitFor(t, 5*time.Second, "each connection listed with its bytes", func() bool {
		list := listed(t, c)
		for _, w := range clients {
			ac := list[w.conn.LocalAddr().String()]
			if ac.BytesFromClient != w.sent || ac.BytesToClient != w.sent {
				return false
			}
		}
		return true
	})
	waitMetric(t, c, "whatsapp_proxy_bytes_received_total", recv0+float64(carried))
	waitMetric(t, c, "whatsapp_proxy_bytes_sent_total", sent0+float64(carried))
	if got := metric(t, c, "whatsapp_proxy_connections_total") - total0; got != float64(len(clients)) {
		t.Errorf("connections_total grew by %v, want the %d connections opened", got, len(clients))
	}
	t.Logf("%d connections (%d opened during reloads, whose connect was reset %d times; tcp_migrate_req=1: %v), %d reloads, %d bytes each way",
		len(clients), len(clients)-n, resets.Load(), strict, reloadRounds, carried)

	for _, w := range clients {
		w.conn.Close()
	}
	waitIdle(t, c)
}

// TestReloadBadConfigRejected: bad configs sent to the admin API (POST
// /load and PATCH /config/...) are refused with an error status and a
// message that names the problem; the running config is unchanged, live
// connections keep echoing, the gauges stay right, and new connections
// still get the old config. The bad configs
// would send new connections to a second edge that writes a banner first, so
// a new connection served by them would be noticed; a good reload at the end
// shows that it is.
func TestReloadBadConfigRejected(t *testing.T) {
	edge := testutil.StartEcho(t)
	other := bannerServer(t, reloadBanner)
	busy, err := net.Listen("tcp", "127.0.0.1:0") // a port the new config cannot bind
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { busy.Close() })
	listen := testutil.FreeAddr(t)
	good := reloadConfig(listen, edge.Addr, "100s")
	c := testutil.StartCaddy(t, good)
	waitIdle(t, c)
	clients := openClients(t, listen, 0, 10, "")
	t.Cleanup(func() { // with the ones the subtests add
		for _, w := range clients {
			w.conn.Close()
		}
	})
	running := configValue(t, c, "/config/")

	// bad returns a config like good that sends new connections to the
	// banner edge, with f applied to its handler
	bad := func(f func(h obj)) []byte {
		return []byte(editConfig(t, good, func(m obj) {
			h := proxyHandler(m)
			h["destination"] = other
			f(h)
		}))
	}
	for i, tc := range []struct {
		name, method, path string
		body               []byte
		want               string // in the error message
	}{
		{"destination outside the allowlist", http.MethodPost, "/load",
			bad(func(h obj) { h["destination"] = "example.com:443" }),
			"destination example.com:443 is not in the allowlist (127.0.0.1)"},
		{"unknown proxy_protocol version", http.MethodPost, "/load",
			bad(func(h obj) { h["proxy_protocol"] = "v9" }), `proxy_protocol: unknown version "v9"`},
		{"negative idle_timeout", http.MethodPost, "/load",
			bad(func(h obj) { h["idle_timeout"] = "-1s" }), "idle_timeout must not be negative"},
		{"unknown dialer", http.MethodPost, "/load",
			bad(func(h obj) { h["via"] = obj{"dialer": "pigeon"} }), "wa.dialers.pigeon"},
		{"misspelt handler field", http.MethodPost, "/load",
			bad(func(h obj) { h["destinaton"] = h["destination"] }), `unknown field "destinaton"`},
		{"not JSON", http.MethodPost, "/load", []byte(`{"apps": {"layer4": `), "unexpected end of JSON input"},
		{"PATCH negative idle_timeout", http.MethodPatch, reloadHandler + "/idle_timeout",
			[]byte(`"-5s"`), "idle_timeout must not be negative"},
		{"PATCH destination outside the allowlist", http.MethodPatch, reloadHandler + "/destination",
			[]byte(`"example.com:443"`), "destination example.com:443 is not in the allowlist (127.0.0.1)"},
		{"PATCH bad duration", http.MethodPatch, reloadHandler + "/idle_timeout",
			[]byte(`"soon"`), `invalid duration "soon"`},
		// last: the new config binds its first address, next to the running
		// config's socket (SO_REUSEPORT), before it fails on the second
		{"listener address in use", http.MethodPost, "/load",
			[]byte(editConfig(t, string(bad(func(obj) {})), func(m obj) {
				m["apps"].(obj)["layer4"].(obj)["servers"].(obj)["proxy"].(obj)["listen"] = []string{listen, busy.Addr().String()}
			})),
			busy.Addr().String() + ": bind: address already in use"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := tc.body
			if tc.path == "/load" && json.Valid(body) {
				var m obj
				_ = json.Unmarshal(body, &m)
				m["admin"] = obj{"listen": c.Admin, "config": obj{"persist": false}}
				body, _ = json.Marshal(m)
			}
			// live traffic while the bad config is posted
			var traffic error
			var wg sync.WaitGroup
			wg.Go(func() { traffic = echoAll(clients, i, "during") })
			status, resp, err := c.AdminDo(tc.method, tc.path, body)
			wg.Wait()
			if err != nil {
				t.Fatal(err)
			}
			// Caddy 2.11 answers a config that fails to load with 400
			// under /load, and with 500 under /config/ (handleConfig
			// returns changeConfig's plain error)
			want := http.StatusBadRequest
			if tc.method == http.MethodPatch {
				want = http.StatusInternalServerError
			}
			if status != want {
				t.Fatalf("%s %s: status %d, want %d: %s", tc.method, tc.path, status, want, resp)
			}
			if msg := adminError(resp); !strings.Contains(msg, tc.want) {
				t.Fatalf("%s %s: error %q does not name the problem (want %q); body %s", tc.method, tc.path, msg, tc.want, resp)
			}
			if traffic != nil {
				t.Fatalf("traffic while the bad config was posted: %v", traffic)
			}
			// the rejected config's listener next to the running one is
			// closed before the answer (the last case binds one)
			if n, err := testutil.ListeningSockets(listen); err == nil && n != 1 {
				t.Fatalf("%d sockets listening on %s right after the rejected config's answer, want the running config's 1", n, listen)
			}
			if got := configValue(t, c, "/config/"); !jsonEqual(got, running) {
				t.Fatalf("the running config changed after a rejected one:\n%v\nwant\n%v", got, running)
			}
			// live connections keep flowing; new ones get the old config
			// (the plain echo edge: no banner). Several, so that a socket
			// of the rejected config left listening next to the running
			// one would get some of them.
			if err := echoAll(clients, i, "after"); err != nil {
				t.Fatalf("after the rejected config: %v", err)
			}
			for range reloadNewPerCase {
				w, err := openWA(listen, len(clients), "")
				if err != nil {
					t.Fatalf("a new connection after the rejected config: %v", err)
				}
				clients = append(clients, w) // closed when the parent test ends
			}
			checkLive(t, c, listen, clients, "after the rejected config")
		})
	}

	// the control: a good config that moves new connections to the banner
	// edge is taken, and the check above would have seen it
	status, resp, err := postLoad(c, reloadConfig(listen, other, "100s"))
	if err != nil || status != http.StatusOK {
		t.Fatalf("good reload: status %d, %v: %s", status, err, resp)
	}
	w, err := openWA(listen, len(clients), reloadBanner)
	if err != nil {
		t.Fatalf("a new connection after the good reload: %v", err)
	}
	t.Cleanup(func() { w.conn.Close() })
	if err := echoAll(clients, 99, "after good reload"); err != nil {
		t.Fatalf("after the good reload: %v", err)
	}
	checkLive(t, c, listen, append(clients, w), "after the good reload")
}

// jsonEqual reports whether two decoded JSON values are equal.
func jsonEqual(a, b any) bool {
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return bytes.Equal(ja, jb)
}

// TestReloadPatch: PATCH /config/... changes one field of the running
// handler. New connections get the new destination and the new idle timeout;
// connections made before keep the destination and the idle timeout they
// started with, and keep flowing.
func TestReloadPatch(t *testing.T) {
	edge := testutil.StartEcho(t)
	other := bannerServer(t, reloadBanner)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, reloadConfig(listen, edge.Addr, "100s"))
	waitIdle(t, c)
	old := openClients(t, listen, 0, 8, "")

	// the destination for new connections
	if status, body, err := patchConfig(c, reloadHandler+"/destination", other); err != nil || status != http.StatusOK {
		t.Fatalf("PATCH destination: status %d, %v: %s", status, err, body)
	}
	moved := openClients(t, listen, 100, 2, reloadBanner) // the new destination: banner first
	if err := echoAll(old, 1, "after the destination changed"); err != nil {
		t.Fatalf("connections made before the PATCH: %v", err) // still on the plain echo edge
	}
	if err := echoAll(moved, 1, "on the new destination"); err != nil {
		t.Fatal(err)
	}
	live := append(append([]*waClient{}, old...), moved...)
	checkLive(t, c, listen, live, "after PATCH destination")
	list := listed(t, c)
	for _, w := range old {
		if d := list[w.conn.LocalAddr().String()].Destination; d != edge.Addr {
			t.Fatalf("conn %d made before the PATCH listed with destination %q, want %q", w.idx, d, edge.Addr)
		}
	}
	for _, w := range moved {
		if d := list[w.conn.LocalAddr().String()].Destination; d != other {
			t.Fatalf("conn %d made after the PATCH listed with destination %q, want %q", w.idx, d, other)
		}
	}

	// the idle timeout for new connections. Every connection above has
	// moved its last byte already; the new ones below are opened after that,
	// so whenever the proxy closes one of them for idleness, the older ones
	// have been idle longer. There are four of them, one after another, so
	// they land on every relay event loop (round robin, at most four loops)
	// and every loop checks its connections with the old ones idle past the
	// new timeout.
	const idleKind = `whatsapp_proxy_errors_total{kind="idle_timeout"}`
	idle0 := metric(t, c, idleKind)
	if status, body, err := patchConfig(c, reloadHandler+"/idle_timeout", "300ms"); err != nil || status != http.StatusOK {
		t.Fatalf("PATCH idle_timeout: status %d, %v: %s", status, err, body)
	}
	var short []*waClient
	for i := range 4 {
		w, err := openWA(listen, 200+i, reloadBanner)
		if err != nil {
			t.Fatalf("a new connection after PATCH idle_timeout: %v", err)
		}
		t.Cleanup(func() { w.conn.Close() })
		short = append(short, w)
	}
	for _, w := range short {
		expectClosed(t, w.conn, 10*time.Second)
	}
	waitMetric(t, c, idleKind, idle0+float64(len(short)))

	// the connections made before the PATCH kept their 100s and still flow
	if err := echoAll(old, 2, "after the idle timeout changed"); err != nil {
		t.Fatalf("connections made before PATCH idle_timeout: %v", err)
	}
	if err := echoAll(moved, 2, "after the idle timeout changed"); err != nil {
		t.Fatalf("connections made before PATCH idle_timeout: %v", err)
	}
	checkLive(t, c, listen, live, "after PATCH idle_timeout")
}
