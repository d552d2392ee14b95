package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// The graceful shutdown tests run Caddy as a real process (this test binary
// re-executed as `caddy run`, see TestMain), because a shutdown ends with
// the process exiting.

// shutdownGrace is the grace period of the shutdown tests' config.
const shutdownGrace = 2 * time.Second

// shutdownSummary is TestGracefulShutdown's expected summary line.
const shutdownSummary = "graceful shutdown: 1 connections ended within the grace period, 2 cut at the deadline"

// caddyProcess is a `caddy run` child process.
type caddyProcess struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	exited chan struct{} // closed when the process has exited
	err    error         // cmd.Wait's result, once exited is closed
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startCaddyProcess runs `caddy run --config <cfg>` as a child process and
// waits until listen accepts connections. The process is killed when the
// test ends if it is still running; its log is shown if the test failed.
func startCaddyProcess(t *testing.T, cfg []byte, listen string) *caddyProcess {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(path, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	p := &caddyProcess{stderr: new(lockedBuffer), exited: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], "run", "--config", path)
	p.cmd.Env = append(os.Environ(), caddyMainEnv+"=1",
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"), "XDG_DATA_HOME="+filepath.Join(dir, "data"))
	p.cmd.Stdout, p.cmd.Stderr = p.stderr, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting caddy: %v", err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("caddy's log:\n%s", p.stderr)
		}
	})
	testutil.WaitFor(t, 20*time.Second, "caddy listening on "+listen, func() bool {
		select {
		case <-p.exited:
			t.Fatalf("caddy exited at startup: %v", p.err)
		default:
		}
		c, err := net.Dial("tcp", listen)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	return p
}

// logEntry returns the fields of the first JSON log line whose message is
// msg, or nil.
func (p *caddyProcess) logEntry(msg string) map[string]any {
	sc := bufio.NewScanner(strings.NewReader(p.stderr.String()))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) == nil && e["msg"] == msg {
			return e
		}
	}
	return nil
}

// waitLog waits until the process has logged msg and returns its fields.
func (p *caddyProcess) waitLog(t *testing.T, msg string) map[string]any {
	t.Helper()
	var e map[string]any
	testutil.WaitFor(t, 20*time.Second, "caddy to log "+msg, func() bool {
		e = p.logEntry(msg)
		return e != nil
	})
	return e
}

// waitExit waits (with a hang guard) for the process to exit and asserts it
// exited cleanly.
func (p *caddyProcess) waitExit(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("caddy did not exit")
	}
	if p.err != nil {
		t.Fatalf("caddy exited with %v, want exit code 0", p.err)
	}
}

// shutdownConfig is a chat proxy to edge and an HTTP proxy to loopback on
// listen, with its admin endpoint on admin, Info logs, and the waproxy app's
// grace period.
func shutdownConfig(t *testing.T, listen, admin, edge string) []byte {
	t.Helper()
	var cfg obj
	if err := json.Unmarshal([]byte(proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge, "allow": []string{"127.0.0.1"}}),
		httpRoute(obj{"allow": []string{"127.0.0.1"}}),
	}, "", nil)), &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["admin"] = obj{"listen": admin, "config": obj{"persist": false}}
	cfg["logging"] = obj{"logs": obj{"default": obj{"level": "INFO"}}}
	cfg["apps"].(obj)["waproxy"] = obj{"grace_period": shutdownGrace.String()}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGracefulShutdown stops a real Caddy process with two live chat
// connections and a keep-alive HTTP proxy connection, by SIGTERM, SIGINT and
// `caddy stop` (POST /stop on the admin API): the listener stops accepting
// at once; chat connection A, still relayed during the grace period,
// finishes on its own and is not cut; idle chat connection B (in the relay)
// and the HTTP connection (between two requests, in wa_http) are closed at
// the deadline; the process exits, having logged 1 ended, 2 cut.
func TestGracefulShutdown(t *testing.T) {
	for _, tc := range []struct {
		name string
		stop func(t *testing.T, p *caddyProcess, admin string) (done func())
	}{
		{"SIGTERM", signalStop(syscall.SIGTERM)},
		{"SIGINT", signalStop(syscall.SIGINT)},
		{"caddy_stop", func(t *testing.T, p *caddyProcess, admin string) func() {
			// the request returns once the drain is over
			type reply struct {
				status int
				err    error
			}
			ch := make(chan reply, 1)
			go func() {
				resp, err := http.Post("http://"+admin+"/stop", "", nil)
				r := reply{err: err}
				if err == nil {
					r.status = resp.StatusCode
					resp.Body.Close()
				}
				ch <- r
			}()
			return func() {
				r := <-ch
				if r.err != nil || r.status != http.StatusOK {
					t.Fatalf("POST /stop: status %d, %v", r.status, r.err)
				}
				if p.logEntry(shutdownSummary) == nil {
					t.Fatal("POST /stop returned before the drain logged its summary")
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			edge := testutil.StartEcho(t)
			origin := startOrigin(t, false, nil)
			listen, admin := testutil.FreeAddr(t), testutil.FreeAddr(t)
			p := startCaddyProcess(t, shutdownConfig(t, listen, admin, edge.Addr), listen)

			a, b := dial(t, listen), dial(t, listen)
			exchange(t, a, waHello())
			exchange(t, b, waHello())
			h := dial(t, listen)
			proxyGet(t, h, origin.Listener.Addr().String())

			stopped := tc.stop(t, p, admin)
			start := p.waitLog(t, "graceful shutdown: waiting for live connections")
			if start["connections"] != 3.0 {
				t.Fatalf("the drain started with %v connections, want 3", start["connections"])
			}
			// the apps are stopped: the listener no longer accepts
			if c, err := net.DialTimeout("tcp", listen, 5*time.Second); err == nil {
				c.Close()
				t.Fatal("the listener still accepts connections during the shutdown")
			} else if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("dialling the stopped listener: %v, want connection refused", err)
			}
			// A is still relayed during the grace period, then ends on its own
			exchange(t, a, frame(randomBytes(1000)))
			a.Close()
			// B and the HTTP connection, idle, are closed at the deadline
			expectClosed(t, b, 20*time.Second)
			expectClosed(t, h, 20*time.Second)

			p.waitExit(t)
			stopped()
			sum := p.logEntry(shutdownSummary)
			if sum == nil {
				t.Fatal("no summary line with 1 ended and 2 cut")
			}
			if sum["level"] != "info" || sum["ended"] != 1.0 || sum["cut"] != 2.0 || sum["grace_period"] != shutdownGrace.Seconds() {
				t.Fatalf("summary %v, want info, ended 1, cut 2, grace_period %v", sum, shutdownGrace.Seconds())
			}
			if w, ok := sum["waited"].(float64); !ok || w < shutdownGrace.Seconds() {
				t.Fatalf("waited %v, want at least the grace period", sum["waited"])
			}
			// both chat connections' upstream legs were closed too
			testutil.WaitFor(t, 10*time.Second, "the edge to see both chat connections end", func() bool {
				return len(edge.Received()) == 2
			})
		})
	}
}

// proxyGet sends an absolute-form GET for origin's /echo on c, a wa_http
// connection, and reads the whole response, leaving the connection open
// (keep-alive) between requests.
func proxyGet(t *testing.T, c net.Conn, origin string) {
	t.Helper()
	if _, err := fmt.Fprintf(c, "GET http://%s/echo HTTP/1.1\r\nHost: %s\r\n\r\n", origin, origin); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the proxied response: %v", err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != http.StatusOK || resp.Close {
		t.Fatalf("proxied response: status %d, close %v, %v", resp.StatusCode, resp.Close, err)
	}
}

func signalStop(sig syscall.Signal) func(t *testing.T, p *caddyProcess, admin string) func() {
	return func(t *testing.T, p *caddyProcess, _ string) func() {
		if err := p.cmd.Process.Signal(sig); err != nil {
			t.Fatalf("sending %v: %v", sig, err)
		}
		return func() {}
	}
}

// TestGracefulShutdownIdle: with no live connection the process exits at
// once (no grace period to sit out) and logs no drain.
func TestGracefulShutdownIdle(t *testing.T) {
	t.Parallel()
	edge := testutil.StartEcho(t)
	listen, admin := testutil.FreeAddr(t), testutil.FreeAddr(t)
	p := startCaddyProcess(t, shutdownConfig(t, listen, admin, edge.Addr), listen)
	a := dial(t, listen)
	exchange(t, a, waHello())
	a.Close()
	testutil.WaitFor(t, 10*time.Second, "the connection to end", func() bool { return len(edge.Received()) == 1 })
	// the proxy's side may close a moment after the edge's: wait for the
	// registry through the admin API
	testutil.WaitFor(t, 10*time.Second, "no live connection", func() bool {
		resp, err := http.Get("http://" + admin + "/waproxy/connections")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var list []any
		return json.NewDecoder(resp.Body).Decode(&list) == nil && len(list) == 0
	})
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	p.waitExit(t)
	if e := p.logEntry("graceful shutdown: waiting for live connections"); e != nil {
		t.Fatalf("a drain ran with no live connection: %v", e)
	}
}

// TestReloadDoesNotDrain: reloading the config (the waproxy app of the old
// config stops, a new one starts) neither drains nor cuts a live
// connection, whatever the new grace period.
func TestReloadDoesNotDrain(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	cfg := func(grace string) string {
		var m obj
		_ = json.Unmarshal([]byte(proxyConfig(listen, []obj{
			chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}}),
		}, "", nil)), &m)
		m["apps"].(obj)["waproxy"] = obj{"grace_period": grace}
		b, _ := json.Marshal(m)
		return string(b)
	}
	c := testutil.StartCaddy(t, cfg("1ns"))
	cut0 := metric(t, c, `whatsapp_proxy_errors_total{kind="shutdown_cut"}`)
	conn := dial(t, listen)
	exchange(t, conn, waHello())
	for i, grace := range []string{"1ns", "2s", "30s"} {
		c.Load(t, cfg(grace))
		exchange(t, conn, frame(randomBytes(100+i)))
	}
	waitMetric(t, c, "whatsapp_proxy_connections_active", 1)
	if got := metric(t, c, `whatsapp_proxy_errors_total{kind="shutdown_cut"}`) - cut0; got != 0 {
		t.Fatalf("shutdown_cut grew by %v across reloads", got)
	}
	conn.Close()
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
}
