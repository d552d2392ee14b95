package upstreams

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// gaugeValue reads whatsapp_proxy_upstream_healthy{upstream} without
// creating the series; ok is false when it does not exist.
func gaugeValue(t testing.TB, upstream string) (v float64, ok bool) {
	t.Helper()
	reg := prometheus.NewRegistry()
	if err := reg.Register(metrics.UpstreamHealthy); err != nil {
		t.Fatal(err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "upstream" && l.GetValue() == upstream {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

// waitGauge waits until the upstream's gauge is want.
func waitGauge(t testing.TB, upstream string, want float64) {
	t.Helper()
	testutil.WaitFor(t, 5*time.Second, fmt.Sprintf("upstream_healthy{%s} == %v", upstream, want), func() bool {
		v, ok := gaugeValue(t, upstream)
		return ok && v == want
	})
}

// provisionCtx provisions m with a fresh Caddy context; the returned
// function cleans it up, as Caddy does when the config is unloaded. It is
// also called when the test ends.
func provisionCtx(t testing.TB, m interface {
	caddy.Provisioner
	caddy.CleanerUpper
}) (cleanup func()) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	var once sync.Once
	cleanup = func() {
		once.Do(func() {
			if err := m.Cleanup(); err != nil {
				t.Errorf("cleanup: %v", err)
			}
			cancel()
		})
	}
	t.Cleanup(cleanup)
	if err := m.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	if v, ok := m.(caddy.Validator); ok {
		if err := v.Validate(); err != nil {
			t.Fatalf("validate: %v", err)
		}
	}
	return cleanup
}

// gate is a TCP relay in front of a SOCKS5 server that can be taken down:
// while down it accepts and closes at once, as a dead server would (after
// the TCP handshake). It counts accepted connections.
type gate struct {
	Addr     string
	down     atomic.Bool
	accepted atomic.Int64
}

func startGate(t testing.TB, target string) *gate {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{Addr: ln.Addr().String()}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			g.accepted.Add(1)
			if g.down.Load() {
				c.Close()
				continue
			}
			wg.Go(func() {
				defer c.Close()
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				done := make(chan struct{})
				go func() { _, _ = io.Copy(up, c); up.(*net.TCPConn).CloseWrite(); close(done) }()
				_, _ = io.Copy(c, up)
				c.(*net.TCPConn).CloseWrite()
				<-done
			})
		}
	})
	return g
}

func TestHealthCheckProvision(t *testing.T) {
	got, err := (&HealthCheck{}).provision()
	if err != nil {
		t.Fatal(err)
	}
	want := healthSettings{destination: DefaultHealthDestination, interval: DefaultHealthInterval,
		timeout: DefaultHealthTimeout, unhealthyAfter: 1, healthyAfter: 1}
	if got != want {
		t.Fatalf("defaults: got %+v, want %+v", got, want)
	}
	t.Setenv("WAPROXY_TEST_HEALTH_DEST", "127.0.0.1:5222")
	got, err = (&HealthCheck{Destination: "{env.WAPROXY_TEST_HEALTH_DEST}", Interval: caddy.Duration(time.Second),
		Timeout: caddy.Duration(2 * time.Second), UnhealthyAfter: 3, HealthyAfter: 2}).provision()
	if err != nil {
		t.Fatal(err)
	}
	want = healthSettings{destination: "127.0.0.1:5222", interval: time.Second, timeout: 2 * time.Second,
		unhealthyAfter: 3, healthyAfter: 2}
	if got != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}

	for _, tc := range []struct {
		hc   HealthCheck
		want string
	}{
		{HealthCheck{Destination: "g.whatsapp.net"}, `health_check: destination "g.whatsapp.net": address g.whatsapp.net: missing port in address`},
		{HealthCheck{Destination: ":5222"}, `health_check: destination ":5222": missing host`},
		{HealthCheck{Destination: "{env.WAPROXY_TEST_UNSET_VAR}"}, `health_check: destination "{env.WAPROXY_TEST_UNSET_VAR}": missing port in address`},
		{HealthCheck{Interval: -1}, "health_check: interval -1ns is too short: at least 10ms"},
		{HealthCheck{Interval: caddy.Duration(time.Millisecond)}, "health_check: interval 1ms is too short: at least 10ms"},
		{HealthCheck{Timeout: caddy.Duration(-time.Second)}, "health_check: timeout -1s is too short: at least 10ms"},
		{HealthCheck{UnhealthyAfter: -1}, "health_check: unhealthy_after must not be negative: -1"},
		{HealthCheck{HealthyAfter: -2}, "health_check: healthy_after must not be negative: -2"},
	} {
		_, err := tc.hc.provision()
		if err == nil || err.Error() != tc.want {
			t.Errorf("%+v: error %v, want %q", tc.hc, err, tc.want)
		}
	}

	// the dialers report it, with their name, when the config loads
	for _, m := range []caddy.Provisioner{
		&SOCKS5{Servers: []string{"127.0.0.1:1080"}, HealthCheck: &HealthCheck{Interval: -1}},
		&Direct{HealthCheck: &HealthCheck{Destination: "nope"}},
	} {
		err := provisionErr(t, m)
		if err == nil || !strings.Contains(err.Error(), ": health_check: ") {
			t.Errorf("%T: error %v, want a health_check error", m, err)
		}
		_ = m.(caddy.CleanerUpper).Cleanup()
	}
}

func TestHealthCheckUnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		input string
		want  string // JSON
	}{
		{"via socks5 127.0.0.1:1080 {\n\thealth_check\n}", `{"servers":["127.0.0.1:1080"],"health_check":{}}`},
		{"via socks5 127.0.0.1:1080 {\n\thealth_check g.whatsapp.net:5222\n\tusername u\n\tpassword p\n}",
			`{"servers":["127.0.0.1:1080"],"username":"u","password":"p","health_check":{"destination":"g.whatsapp.net:5222"}}`},
		{"via socks5 a:1 b:2 {\n\thealth_check {\n\t\tinterval 10s\n\t\ttimeout 2s\n\t\tunhealthy_after 3\n\t\thealthy_after 2\n\t}\n\tusername u\n\tpassword p\n}",
			`{"servers":["a:1","b:2"],"username":"u","password":"p","health_check":{"interval":10000000000,"timeout":2000000000,"unhealthy_after":3,"healthy_after":2}}`},
		{"via direct", `{}`},
		{"via direct {\n}", `{}`},
		{"via direct {\n\thealth_check {env.DEST} {\n\t\tinterval 1m\n\t}\n}", `{"health_check":{"destination":"{env.DEST}","interval":60000000000}}`},
		{"via direct {\n\tresolve_cache 2m\n}", `{"resolve_cache":120000000000}`},
		{"via direct {\n\tresolve_cache off\n}", `{"resolve_cache":-1}`},
	} {
		t.Run(tc.input, func(t *testing.T) {
			unm, err := unmarshalVia(t, tc.input)
			if err != nil {
				t.Fatal(err)
			}
			js, _ := json.Marshal(unm)
			if string(js) != tc.want {
				t.Fatalf("JSON:\n got %s\nwant %s", js, tc.want)
			}
		})
	}
}

func TestHealthCheckUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ input, want string }{
		{"via socks5 a:1 {\n\thealth_check a:1 b:2\n}", "socks5: health_check: unexpected argument 'b:2': it takes one destination"},
		{"via socks5 a:1 {\n\thealth_check\n\thealth_check\n}", "socks5: duplicate subdirective 'health_check'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\tinterval\n\t}\n}", "socks5: health_check: subdirective 'interval' takes exactly one argument"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\tinterval soon\n\t}\n}", "socks5: health_check: interval: bad duration 'soon'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\ttimeout 0s\n\t}\n}", "socks5: health_check: timeout must be positive: '0s'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\tinterval 1s\n\t\tinterval 2s\n\t}\n}", "socks5: health_check: duplicate subdirective 'interval'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\tunhealthy_after 0\n\t}\n}", "socks5: health_check: unhealthy_after: want a whole number of checks, at least 1, got '0'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\thealthy_after 2x\n\t}\n}", "socks5: health_check: healthy_after: want a whole number of checks, at least 1, got '2x'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\tport 80\n\t}\n}", "socks5: health_check: unrecognized subdirective 'port'"},
		{"via socks5 a:1 {\n\thealth_check {\n\t\tinterval 1s {\n\t\t\tx\n\t\t}\n\t}\n}", "socks5: health_check: malformed subdirective 'interval': blocks are not supported"},
		{"via direct {\n\ttimeout 5s\n}", "direct: unrecognized subdirective 'timeout'"},
		{"via direct {\n\thealth_check\n\thealth_check\n}", "direct: duplicate subdirective 'health_check'"},
		{"via direct {\n\thealth_check {\n\t\tjitter 1s\n\t}\n}", "direct: health_check: unrecognized subdirective 'jitter'"},
	} {
		t.Run(tc.input, func(t *testing.T) {
			_, err := unmarshalVia(t, tc.input)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

// failingServers starts n listeners that accept and close at once (a
// broken SOCKS5 server) and returns their addresses and accept counters.
func failingServers(t *testing.T, n int) ([]string, []*atomic.Int64) {
	t.Helper()
	addrs := make([]string, n)
	counts := make([]*atomic.Int64, n)
	for i := range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		addrs[i], counts[i] = ln.Addr().String(), new(atomic.Int64)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				counts[i].Add(1)
				c.Close()
			}
		}()
	}
	return addrs, counts
}

// withHealth gives s checkers that are not running, with the given health,
// so a test sets the failover order's input directly.
func withHealth(s *SOCKS5, healthy ...bool) []*checker {
	s.health.checkers = nil
	for _, h := range healthy {
		c := &checker{}
		c.healthy.Store(h)
		s.health.checkers = append(s.health.checkers, c)
	}
	return s.health.checkers
}

// TestSOCKS5FailoverSkipsUnhealthy: the failover order skips unhealthy
// servers, and tries all of them in order when none is healthy. Each server
// is a real listener that fails the handshake, so each dial tries every
// server it does not skip; the error lists them in the order tried.
func TestSOCKS5FailoverSkipsUnhealthy(t *testing.T) {
	addrs, counts := failingServers(t, 3)
	s := newSOCKS5Dialer(t, "", "", addrs...)
	for _, tc := range []struct {
		name    string
		healthy []bool // nil: no health check
		tried   []int
	}{
		{"no health check", nil, []int{0, 1, 2}},
		{"all healthy", []bool{true, true, true}, []int{0, 1, 2}},
		{"first unhealthy", []bool{false, true, true}, []int{1, 2}},
		{"middle unhealthy", []bool{true, false, true}, []int{0, 2}},
		{"only the last healthy", []bool{false, false, true}, []int{2}},
		{"all unhealthy", []bool{false, false, false}, []int{0, 1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withHealth(s, tc.healthy...)
			before := make([]int64, len(counts))
			for i, c := range counts {
				before[i] = c.Load()
			}
			_, err := dialTimeout(s, 5*time.Second, "127.0.0.1:5222")
			if err == nil {
				t.Fatal("dial succeeded through servers that close at once")
			}
			var got []int
			for _, part := range strings.Split(err.Error(), "; ") {
				for i, a := range addrs {
					if strings.HasPrefix(part, "socks5 "+a+": ") {
						got = append(got, i)
					}
				}
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.tried) {
				t.Fatalf("tried servers %v, want %v (error: %v)", got, tc.tried, err)
			}
			for i, c := range counts {
				want := int64(0)
				for _, j := range tc.tried {
					if i == j {
						want = 1
					}
				}
				if n := c.Load() - before[i]; n != want {
					t.Errorf("server %d accepted %d connections, want %d", i, n, want)
				}
			}
		})
	}
	s.health.checkers = nil
}

// TestSOCKS5SkippedNoAllocs: choosing the servers to skip allocates nothing
// (up to 64 servers).
func TestSOCKS5SkippedNoAllocs(t *testing.T) {
	servers := make([]string, 64)
	healthy := make([]bool, 64)
	for i := range servers {
		servers[i] = fmt.Sprintf("127.0.0.1:%d", 1000+i)
		healthy[i] = i%3 != 0
	}
	s := newSOCKS5Dialer(t, "", "", servers...)
	withHealth(s, healthy...)
	var n int
	allocs := testing.AllocsPerRun(1000, func() {
		var buf [1]uint64
		skip, tried := s.skipped(buf[:])
		n = tried
		if !skip.has(0) || skip.has(1) {
			panic("wrong set")
		}
	})
	if allocs != 0 {
		t.Fatalf("skipped allocates %v times per call, want 0", allocs)
	}
	if n != 42 {
		t.Fatalf("tried %d servers, want 42", n)
	}
}

// TestHealthCheckerTransitions drives one checker's checks against a real
// SOCKS5 server behind a gate: thresholds, the gauge, the admin view's
// error, and one log line per transition.
func TestHealthCheckerTransitions(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, _ := startCaddySOCKS5(t)
	g := startGate(t, open)
	s := newSOCKS5Dialer(t, "", "", g.Addr)

	core, logs := observer.New(zap.InfoLevel)
	c := &checker{
		upstream: "socks5 " + g.Addr,
		settings: healthSettings{destination: echo.Addr, timeout: 5 * time.Second, unhealthyAfter: 2, healthyAfter: 2},
		probe:    s.probe(g.Addr, echo.Addr),
	}
	c.healthy.Store(true)
	c.logger.Store(zap.New(core))
	t.Cleanup(func() { metrics.UpstreamHealthy.DeleteLabelValues(c.upstream) })
	ctx := context.Background()

	if st := c.status(); !st.Healthy || !st.LastCheck.IsZero() {
		t.Fatalf("before any check: %+v, want healthy and no last check", st)
	}
	c.check(ctx)
	if v, ok := gaugeValue(t, c.upstream); !ok || v != 1 || !c.healthy.Load() {
		t.Fatalf("after a successful check: gauge %v (present %v), healthy %v", v, ok, c.healthy.Load())
	}
	if st := c.status(); st.LastCheck.IsZero() || st.Error != "" || st.Destination != echo.Addr {
		t.Fatalf("status %+v", st)
	}
	// the check went all the way: the destination saw a connection
	testutil.WaitFor(t, 5*time.Second, "the destination saw the check", func() bool { return len(echo.Received()) == 1 })

	g.down.Store(true)
	c.check(ctx)
	if !c.healthy.Load() {
		t.Fatal("one failed check marked it unhealthy; unhealthy_after is 2")
	}
	for range 3 {
		c.check(ctx)
	}
	if v, _ := gaugeValue(t, c.upstream); v != 0 || c.healthy.Load() {
		t.Fatalf("after failed checks: gauge %v, healthy %v", v, c.healthy.Load())
	}
	st := c.status()
	if st.Healthy || !strings.Contains(st.Error, "socks5 "+g.Addr+": greeting: server closed the connection") {
		t.Fatalf("status %+v, want unhealthy with the handshake error", st)
	}

	g.down.Store(false)
	c.check(ctx)
	if c.healthy.Load() {
		t.Fatal("one successful check marked it healthy; healthy_after is 2")
	}
	c.check(ctx)
	c.check(ctx)
	if v, _ := gaugeValue(t, c.upstream); v != 1 || !c.healthy.Load() || c.status().Error != "" {
		t.Fatalf("after successful checks: gauge %v, healthy %v, status %+v", v, c.healthy.Load(), c.status())
	}

	var msgs []string
	for _, e := range logs.All() {
		msgs = append(msgs, e.Level.String()+" "+e.Message)
	}
	if want := "[warn upstream unhealthy info upstream healthy again]"; fmt.Sprint(msgs) != want {
		t.Fatalf("logs %v, want %s", msgs, want)
	}
	if e := logs.All()[0]; e.ContextMap()["upstream"] != c.upstream || e.ContextMap()["error"] == nil {
		t.Fatalf("unhealthy log fields %v, want upstream and error", e.ContextMap())
	}
}

// TestHealthCheckRunning: provisioned dialers run their checks on the
// interval; a dead server turns unhealthy, recovers, and dials skip it
// meanwhile.
func TestHealthCheckRunning(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, _ := startCaddySOCKS5(t)
	a, b := startGate(t, open), startGate(t, open)
	s := &SOCKS5{Servers: []string{a.Addr, b.Addr},
		HealthCheck: &HealthCheck{Destination: echo.Addr, Interval: caddy.Duration(20 * time.Millisecond)}}
	provisionCtx(t, s)
	waitGauge(t, "socks5 "+a.Addr, 1)
	waitGauge(t, "socks5 "+b.Addr, 1)

	a.down.Store(true)
	waitGauge(t, "socks5 "+a.Addr, 0)
	// the dial goes through B (TestSOCKS5FailoverSkipsUnhealthy proves A is
	// not tried: here A's own checks reach it too)
	bBefore := b.accepted.Load()
	received := len(echo.Received())
	conn := mustDial(t, s, echo.Addr)
	assertEchoes(t, conn, "via B")
	conn.Close()
	if b.accepted.Load() == bBefore {
		t.Fatal("the dial did not go through B")
	}
	testutil.WaitFor(t, 5*time.Second, "the echo saw the connection end", func() bool {
		return len(echo.Received()) > received
	})

	a.down.Store(false)
	waitGauge(t, "socks5 "+a.Addr, 1)
}

// TestHealthCheckLifecycle: dialers with the same settings share one
// checker; it stops (goroutine gone, gauge series deleted) when the last of
// them is cleaned up, and a checker with other settings for the same
// upstream keeps the series alive meanwhile.
func TestHealthCheckLifecycle(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, _ := startCaddySOCKS5(t)
	upstream := "socks5 " + open
	newDialer := func(interval time.Duration) *SOCKS5 {
		return &SOCKS5{Servers: []string{open},
			HealthCheck: &HealthCheck{Destination: echo.Addr, Interval: caddy.Duration(interval)}}
	}
	d1, d2, d3 := newDialer(time.Hour), newDialer(time.Hour), newDialer(2*time.Hour)
	clean1 := provisionCtx(t, d1)
	clean2 := provisionCtx(t, d2)
	if d1.health.checkers[0] != d2.health.checkers[0] {
		t.Fatal("two dialers with the same settings run two checkers")
	}
	c := d1.health.checkers[0]
	waitGauge(t, upstream, 1)
	if refs, _ := healthCheckers.References(d1.health.keys[0]); refs != 2 {
		t.Fatalf("references %d, want 2", refs)
	}

	clean1()
	select {
	case <-c.done:
		t.Fatal("the checker stopped while another dialer uses it")
	default:
	}
	clean3 := provisionCtx(t, d3) // a reload with another interval
	if d3.health.checkers[0] == c {
		t.Fatal("other settings share the checker")
	}
	clean2()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the checker's goroutine is still running after the last dialer's cleanup")
	}
	if _, ok := gaugeValue(t, upstream); !ok {
		t.Fatal("the series vanished while a checker with other settings still reports it")
	}
	c3 := d3.health.checkers[0]
	clean3()
	<-c3.done
	if _, ok := gaugeValue(t, upstream); ok {
		t.Fatal("the series is still exported after every checker stopped")
	}
	healthCheckers.Range(func(key, _ any) bool {
		if key.(healthKey).upstream == upstream {
			t.Errorf("checker %v still in the pool", key)
		}
		return true
	})
	if HealthView(d1) != nil {
		t.Error("a cleaned-up dialer still has a health view")
	}
}

// TestDirectHealthCheck: the direct dialer checks its destination as
// configured (a loopback address the default allowlist refuses for
// proxied connections) and reports it under "direct".
func TestDirectHealthCheck(t *testing.T) {
	echo := testutil.StartEcho(t)
	dd := &Direct{HealthCheck: &HealthCheck{Destination: echo.Addr, Interval: caddy.Duration(20 * time.Millisecond)}}
	cleanup := provisionCtx(t, dd)
	waitGauge(t, "direct", 1)
	view := HealthView(dd)
	if view == nil {
		t.Fatal("no health view")
	}
	h := view()
	if len(h) != 1 || h[0].Upstream != "direct" || !h[0].Healthy || h[0].Destination != echo.Addr || h[0].LastCheck.IsZero() {
		t.Fatalf("view %+v", h)
	}
	// a proxied connection with the allowlist in its context is still refused
	allow, err := NewAllowlist([]string{"localhost"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(WithAllowlist(context.Background(), allow), 5*time.Second)
	defer cancel()
	_, err = dd.DialContext(ctx, "tcp", echo.Addr)
	assertDialErrorKind(t, err, metrics.KindNotAllowed)
	cleanup()
	if _, ok := gaugeValue(t, "direct"); ok {
		t.Fatal("the direct series outlived the dialer")
	}

	// a destination nothing listens on
	dead := &Direct{HealthCheck: &HealthCheck{Destination: closedAddr(t), Interval: caddy.Duration(time.Hour)}}
	provisionCtx(t, dead)
	waitGauge(t, "direct", 0)
	if h := HealthView(dead)(); h[0].Healthy || !strings.Contains(h[0].Error, "connection refused") {
		t.Fatalf("view %+v, want unhealthy, connection refused", h)
	}
	if HealthView(new(Direct)) != nil {
		t.Fatal("a dialer without health check has a health view")
	}
}

// TestHealthCheckSOCKS5Credentials: the check authenticates like a dial, and
// a rejected password marks the server unhealthy without revealing it.
func TestHealthCheckSOCKS5Credentials(t *testing.T) {
	echo := testutil.StartEcho(t)
	_, authed := startCaddySOCKS5(t)
	good := &SOCKS5{Servers: []string{authed}, Username: "user", Password: "pass",
		HealthCheck: &HealthCheck{Destination: echo.Addr, Interval: caddy.Duration(time.Hour)}}
	provisionCtx(t, good)
	waitGauge(t, "socks5 "+authed, 1)
	bad := &SOCKS5{Servers: []string{authed}, Username: "user", Password: "hunter2",
		HealthCheck: &HealthCheck{Destination: echo.Addr, Interval: caddy.Duration(time.Hour)}}
	provisionCtx(t, bad)
	if bad.health.checkers[0] == good.health.checkers[0] {
		t.Fatal("other credentials share the checker")
	}
	testutil.WaitFor(t, 5*time.Second, "the bad password's check", func() bool {
		return HealthView(bad)()[0].Error != ""
	})
	if h := HealthView(bad)()[0]; h.Healthy || strings.Contains(h.Error, "hunter2") {
		t.Fatalf("view %+v, want unhealthy and no password", h)
	}
	for key := range map[healthKey]bool{bad.health.keys[0]: true} {
		if strings.Contains(fmt.Sprint(key), "hunter2") {
			t.Fatal("the pool key holds the password")
		}
	}
}

// BenchmarkSOCKS5DialHealth is BenchmarkSOCKS5Dial with a health check whose
// first server is unhealthy, so every dial skips it: the allocations must
// be the same as without health checks.
func BenchmarkSOCKS5DialHealth(b *testing.B) {
	echo := testutil.StartEcho(b)
	open, _ := startCaddySOCKS5(b)
	d := newSOCKS5Dialer(b, "", "", closedAddr(b), open)
	d.health.checkers = []*checker{{}, {}}
	d.health.checkers[1].healthy.Store(true)
	benchmarkDialEcho(b, d, echo.Addr)
}

// BenchmarkSOCKS5Skipped measures choosing the servers to skip.
func BenchmarkSOCKS5Skipped(b *testing.B) {
	d := newSOCKS5Dialer(b, "", "", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
	d.health.checkers = []*checker{{}, {}, {}}
	d.health.checkers[2].healthy.Store(true)
	b.ReportAllocs()
	for b.Loop() {
		var buf [1]uint64
		if _, n := d.skipped(buf[:]); n != 1 {
			b.Fatal(n)
		}
	}
}
