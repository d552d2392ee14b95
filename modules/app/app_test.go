package app

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	_ "github.com/mholt/caddy-l4/layer4"
	_ "github.com/waproxy/caddy-waproxy/modules/handlers"
	_ "github.com/waproxy/caddy-waproxy/modules/matchers"

	tu "github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

var errTestCut = errors.New("test cut")

// openConn tracks a connection whose cut closes it (as the relay's does,
// from another goroutine), or that cannot be cut when cuttable is false.
func openConn(t *testing.T, cuttable bool) *registry.Conn {
	t.Helper()
	rc := registry.Open(&registry.Conn{Remote: "127.0.0.1:1", Handler: "test"})
	if cuttable {
		rc.SetCut(func() { go registry.Close(rc, errTestCut) })
	}
	t.Cleanup(func() { registry.Close(rc, nil) })
	return rc
}

// startDrain runs drain in the background, once the test's connections are
// open, and waits until it has logged that it is waiting.
func startDrain(t *testing.T, ctx context.Context, grace, cutWait time.Duration) (<-chan drainResult, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	res := make(chan drainResult, 1)
	go func() { res <- drain(ctx, grace, cutWait, zap.New(core)) }()
	tu.WaitFor(t, 10*time.Second, "the drain to start waiting", func() bool {
		return logs.FilterMessage("graceful shutdown: waiting for live connections").Len() == 1
	})
	return res, logs
}

func result(t *testing.T, res <-chan drainResult) drainResult {
	t.Helper()
	select {
	case r := <-res:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("the drain did not return")
		return drainResult{}
	}
}

// summary returns the fields of the drain's summary line, checking its
// message.
func summary(t *testing.T, logs *observer.ObservedLogs, ended, cut int) map[string]any {
	t.Helper()
	var found []observer.LoggedEntry
	for _, e := range logs.All() {
		if strings.HasPrefix(e.Message, "graceful shutdown: ") && strings.Contains(e.Message, "ended within") {
			found = append(found, e)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d summary lines, want 1: %v", len(found), logs.All())
	}
	e := found[0]
	want := "graceful shutdown: " + itoa(ended) + " connections ended within the grace period, " + itoa(cut) + " cut at the deadline"
	if e.Message != want || e.Level != zapcore.InfoLevel {
		t.Fatalf("summary %s %q, want info %q", e.Level, e.Message, want)
	}
	f := e.ContextMap()
	if f["ended"] != int64(ended) || f["cut"] != int64(cut) {
		t.Fatalf("summary fields %v, want ended=%d cut=%d", f, ended, cut)
	}
	return f
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func cutCount() float64 {
	return testutil.ToFloat64(metrics.Errors.WithLabelValues(metrics.KindShutdownCut))
}

// TestDrainCutsAtDeadline: one connection ends within the grace period, the
// other is cut at the deadline. The deadline is ctx's cancellation here (a
// long grace period that the test ends), so no timing decides the outcome.
func TestDrainCutsAtDeadline(t *testing.T) {
	a := openConn(t, true)
	openConn(t, true) // b stays open
	cuts0 := cutCount()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res, logs := startDrain(t, ctx, time.Hour, 10*time.Second)

	registry.Close(a, nil) // a ends on its own
	tu.WaitFor(t, 10*time.Second, "a to leave the registry", func() bool { return registry.Len() == 1 })
	select {
	case r := <-res:
		t.Fatalf("the drain returned %+v while b was open and the grace period running", r)
	default:
	}
	cancel() // the deadline
	r := result(t, res)
	if r.ended != 1 || r.cut != 1 || r.left != 0 {
		t.Fatalf("drain %+v, want ended 1, cut 1, left 0", r)
	}
	if registry.Len() != 0 {
		t.Fatalf("%d connections left", registry.Len())
	}
	f := summary(t, logs, 1, 1)
	if f["grace_period"] != time.Hour {
		t.Fatalf("grace_period field %v", f["grace_period"])
	}
	if got := cutCount() - cuts0; got != 1 {
		t.Fatalf(`errors_total{kind="shutdown_cut"} grew by %v, want 1`, got)
	}
}

// TestDrainAllEndInTime: when every connection ends within the grace
// period, the drain returns as soon as the last one is gone and cuts
// nothing.
func TestDrainAllEndInTime(t *testing.T) {
	a, b := openConn(t, true), openConn(t, true)
	cuts0 := cutCount()
	res, logs := startDrain(t, context.Background(), time.Hour, time.Hour)
	registry.Close(a, nil)
	registry.Close(b, nil)
	r := result(t, res)
	if r.ended != 2 || r.cut != 0 || r.left != 0 {
		t.Fatalf("drain %+v, want ended 2, cut 0", r)
	}
	summary(t, logs, 2, 0)
	if got := cutCount() - cuts0; got != 0 {
		t.Fatalf("shutdown_cut grew by %v", got)
	}
}

// TestDrainCountsLateArrivals: a connection that reaches a handler after
// the drain started (it was in caddy-l4's matching phase when the listener
// closed) is waited for and counted too.
func TestDrainCountsLateArrivals(t *testing.T) {
	a := openConn(t, true)
	res, logs := startDrain(t, context.Background(), time.Hour, time.Hour)
	late := openConn(t, true)
	registry.Close(a, nil)
	select {
	case r := <-res:
		t.Fatalf("the drain returned %+v while a late connection was open", r)
	case <-time.After(50 * time.Millisecond): // only a chance to return too early
	}
	registry.Close(late, nil)
	r := result(t, res)
	if r.ended != 2 || r.cut != 0 {
		t.Fatalf("drain %+v, want ended 2 (one late), cut 0", r)
	}
	summary(t, logs, 2, 0)
}

// TestDrainUncuttable: a connection without a cut function cannot be cut;
// the drain waits cutWait for it, then reports it and returns.
func TestDrainUncuttable(t *testing.T) {
	openConn(t, false)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the deadline has passed
	res, logs := startDrain(t, ctx, time.Hour, time.Millisecond)
	r := result(t, res)
	if r.ended != 0 || r.cut != 0 || r.left != 1 {
		t.Fatalf("drain %+v, want ended 0, cut 0, left 1", r)
	}
	if logs.FilterMessage("graceful shutdown: connections still open after the cut").Len() != 1 {
		t.Fatalf("no warning about the connection left: %v", logs.All())
	}
	summary(t, logs, 0, 0)
}

// TestDrainNothingLive: with no live connection the drain returns at once
// and logs nothing.
func TestDrainNothingLive(t *testing.T) {
	if registry.Len() != 0 {
		t.Fatalf("%d connections left by another test", registry.Len())
	}
	core, logs := observer.New(zapcore.DebugLevel)
	if r := drain(context.Background(), time.Hour, time.Hour, zap.New(core)); r != (drainResult{}) {
		t.Fatalf("drain %+v", r)
	}
	if logs.Len() != 0 {
		t.Fatalf("logged %v", logs.All())
	}
}

// TestReplaceCut: a later stage's cut replaces the first, and runs at once
// when the connection was already cut.
func TestReplaceCut(t *testing.T) {
	rc := openConn(t, false)
	var first, second, third int
	rc.SetCut(func() { first++ })
	rc.ReplaceCut(func() { second++ })
	if !rc.Cut() || first != 0 || second != 1 {
		t.Fatalf("cut ran first %d, second %d times; want the replacement once", first, second)
	}
	rc.ReplaceCut(func() { third++ })
	if third != 1 {
		t.Fatal("a cut set after the connection was cut did not run at once")
	}
}

func TestEmpty(t *testing.T) {
	select {
	case <-registry.Empty():
	default:
		t.Fatal("Empty is not closed with no connection")
	}
	a, b := openConn(t, false), openConn(t, false)
	ch := registry.Empty()
	registry.Close(a, nil)
	select {
	case <-ch:
		t.Fatal("Empty closed with a connection left")
	default:
	}
	registry.Close(b, nil)
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("Empty not closed after the last connection closed")
	}
}

func TestValidate(t *testing.T) {
	for _, c := range []struct {
		json string
		want time.Duration
		err  string
	}{
		{`{}`, DefaultGracePeriod, ""},
		{`{"grace_period":"0s"}`, DefaultGracePeriod, ""},
		{`{"grace_period":"2s"}`, 2 * time.Second, ""},
		{`{"grace_period":"-1s"}`, 0, "grace_period must not be negative: -1s"},
	} {
		var a App
		if err := json.Unmarshal([]byte(c.json), &a); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		err := a.Provision(ctx)
		if err == nil {
			err = a.Validate()
		}
		cancel()
		if c.err != "" {
			if err == nil || err.Error() != c.err {
				t.Errorf("%s: error %v, want %q", c.json, err, c.err)
			}
			continue
		}
		if err != nil || time.Duration(a.GracePeriod) != c.want {
			t.Errorf("%s: grace period %v, err %v; want %v", c.json, time.Duration(a.GracePeriod), err, c.want)
		}
	}
}

// TestHandlersLoadApp: a config with a wa_proxy or a wa_http handler runs
// the app even when it does not mention it; a config that sets it is used,
// and a config with a bad grace period is refused while the previous one
// keeps running.
func TestHandlersLoadApp(t *testing.T) {
	handler := map[string]any{"handler": "wa_proxy", "destination": "127.0.0.1:9", "allow": []string{"127.0.0.1"}}
	cfg := func(app any) string {
		apps := map[string]any{"layer4": map[string]any{"servers": map[string]any{"proxy": map[string]any{
			"listen": []string{tu.FreeAddr(t)},
			"routes": []any{map[string]any{"handle": []any{handler}}},
		}}}}
		if app != nil {
			apps["waproxy"] = app
		}
		b, _ := json.Marshal(map[string]any{"apps": apps, "logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}}})
		return string(b)
	}
	c := tu.StartCaddy(t, cfg(nil))
	if a := current.Load(); a == nil || time.Duration(a.GracePeriod) != DefaultGracePeriod {
		t.Fatalf("running app %+v, want the default grace period", a)
	}
	current.Store(nil)
	handler = map[string]any{"handler": "wa_http"}
	c.Load(t, cfg(nil))
	if a := current.Load(); a == nil || time.Duration(a.GracePeriod) != DefaultGracePeriod {
		t.Fatalf("running app %+v with a wa_http handler, want the default grace period", a)
	}
	c.Load(t, cfg(map[string]any{"grace_period": "2s"}))
	if a := current.Load(); a == nil || time.Duration(a.GracePeriod) != 2*time.Second {
		t.Fatalf("running app %+v, want grace_period 2s", a)
	}
	// POST /load as c.Load does, but expecting a refusal
	var bad map[string]any
	_ = json.Unmarshal([]byte(cfg(map[string]any{"grace_period": "-5s"})), &bad)
	bad["admin"] = map[string]any{"listen": c.Admin, "config": map[string]any{"persist": false}}
	body, _ := json.Marshal(bad)
	status, msg, err := c.AdminDo(http.MethodPost, "/load", body)
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusBadRequest || !strings.Contains(msg, "grace_period must not be negative: -5s") {
		t.Fatalf("a negative grace period: status %d, %s", status, msg)
	}
	if a := current.Load(); time.Duration(a.GracePeriod) != 2*time.Second {
		t.Fatalf("the refused config replaced the app: %v", time.Duration(a.GracePeriod))
	}

	// A config that fails when its apps start (its listener's address is
	// taken): Caddy starts the apps in random order and stops those it
	// started when one fails, so try a few times to have ours start first.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	var failing map[string]any
	_ = json.Unmarshal([]byte(cfg(map[string]any{"grace_period": "7s"})), &failing)
	failing["apps"].(map[string]any)["layer4"].(map[string]any)["servers"].(map[string]any)["proxy"].(map[string]any)["listen"] = []string{busy.Addr().String()}
	failing["admin"] = map[string]any{"listen": c.Admin, "config": map[string]any{"persist": false}}
	body, _ = json.Marshal(failing)
	for range 12 {
		status, _, err := c.AdminDo(http.MethodPost, "/load", body)
		if err != nil {
			t.Fatal(err)
		}
		if status == http.StatusOK {
			t.Fatal("a config whose listener address is taken loaded")
		}
		if a := current.Load(); time.Duration(a.GracePeriod) != 2*time.Second {
			t.Fatalf("a config that failed to start replaced the app: %v", time.Duration(a.GracePeriod))
		}
	}

	// A config without wa_* handlers (and so without the app): connections
	// of the earlier configs still drain with the last app's settings.
	c.Load(t, `{"apps": {"layer4": {}}}`)
	if a := current.Load(); a == nil || time.Duration(a.GracePeriod) != 2*time.Second {
		t.Fatalf("after a config without the app, running app %+v, want the last one (2s)", a)
	}
}

// TestFailedStartClosesListeners: a config whose layer4 app opens its first
// listener (next to the running config's, SO_REUSEPORT) and then fails on a
// taken address leaves no listener behind by the time the load returns;
// otherwise the rejected config would take some of the new connections. The
// load runs on one P, so that a close left to another goroutine has not
// run yet when it returns.
func TestFailedStartClosesListeners(t *testing.T) {
	listen := tu.FreeAddr(t)
	cfg := func(addrs ...string) map[string]any {
		return map[string]any{
			"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{"proxy": map[string]any{
				"listen": addrs,
				"routes": []any{map[string]any{"handle": []any{map[string]any{
					"handler": "wa_proxy", "destination": "127.0.0.1:9", "allow": []string{"127.0.0.1"}}}}},
			}}}},
			"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		}
	}
	b, _ := json.Marshal(cfg(listen))
	c := tu.StartCaddy(t, string(b))
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	failing := cfg(listen, busy.Addr().String())
	failing["admin"] = map[string]any{"listen": c.Admin, "config": map[string]any{"persist": false}}
	b, _ = json.Marshal(failing)

	for range 5 {
		n, err := tu.ListeningSockets(listen)
		if err != nil {
			t.Skip(err)
		}
		if n != 1 {
			t.Fatalf("%d sockets listening on %s before the load, want 1", n, listen)
		}
		procs := runtime.GOMAXPROCS(1)
		err = caddy.Load(b, true)
		n, lerr := tu.ListeningSockets(listen)
		runtime.GOMAXPROCS(procs)
		if err == nil || !strings.Contains(err.Error(), "address already in use") {
			t.Fatalf("load of a config whose second address is taken: %v", err)
		}
		if lerr != nil || n != 1 {
			t.Fatalf("%d sockets listening on %s when the failed load returned (%v), want the running config's 1", n, listen, lerr)
		}
	}
}
