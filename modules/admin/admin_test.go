package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/waproxy/caddy-waproxy/modules/registry"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

// blockingWriter is a ResponseWriter whose writes wait until release is
// closed, like a client that stopped reading.
type blockingWriter struct {
	header  http.Header
	release chan struct{}
	mu      sync.Mutex
	body    strings.Builder
	writes  int
}

func (w *blockingWriter) Header() http.Header { return w.header }
func (w *blockingWriter) WriteHeader(int)     {}
func (w *blockingWriter) Flush()              {}
func (w *blockingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.writes++
	first := w.writes == 1
	w.mu.Unlock()
	if !first { // the stream's opening comment goes through
		<-w.release
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.body.Write(p)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestSlowEventClientDropped: a client that stops reading is dropped once
// its buffer is full; the proxy's side (publishing) never blocks, and the
// stream ends with a `dropped` event.
func TestSlowEventClientDropped(t *testing.T) {
	a := new(API)
	w := &blockingWriter{header: make(http.Header), release: make(chan struct{})}
	req := httptest.NewRequest(http.MethodGet, "/waproxy/events", nil)
	done := make(chan error, 1)
	before := registry.Subscribers()
	go func() { done <- a.events(w, req) }()
	waitFor(t, "subscription", func() bool { return registry.Subscribers() == before+1 })

	// one event blocks the writer; EventBuffer more fill the buffer; the
	// next drops the subscriber. None of this may block.
	published := make(chan struct{})
	go func() {
		defer close(published)
		for range EventBuffer + 2 {
			registry.Open(&registry.Conn{Protocol: "raw"}) // each publishes `opened`
		}
	}()
	select {
	case <-published:
	case <-time.After(5 * time.Second):
		t.Fatal("publishing blocked on a slow subscriber")
	}
	waitFor(t, "slow subscriber dropped", func() bool { return registry.Subscribers() == before })
	close(w.release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("events returned %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end after the subscriber was dropped")
	}
	w.mu.Lock()
	body := w.body.String()
	w.mu.Unlock()
	if !strings.HasSuffix(body, "event: dropped\ndata: {\"reason\":\"subscriber too slow\"}\n\n") {
		t.Fatalf("stream does not end with a dropped event: ...%q", body[max(0, len(body)-200):])
	}
	if w.header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("Content-Type %q", w.header.Get("Content-Type"))
	}
}

// TestEventStreamEndsWithClient: the handler returns, releasing its
// subscription, when the client's request context ends.
func TestEventStreamEndsWithClient(t *testing.T) {
	a := new(API)
	ctx, cancel := context.WithCancel(context.Background())
	req := httptest.NewRequest(http.MethodGet, "/waproxy/events", nil).WithContext(ctx)
	rec := httptest.NewRecorder()
	before := registry.Subscribers()
	done := make(chan error, 1)
	go func() { done <- a.events(rec, req) }()
	waitFor(t, "subscription", func() bool { return registry.Subscribers() == before+1 })
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("events returned %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stream did not end with the client")
	}
	if registry.Subscribers() != before {
		t.Fatal("subscription not released")
	}
}

func TestOnlyGET(t *testing.T) {
	a := new(API)
	for _, route := range a.Routes() {
		req := httptest.NewRequest(http.MethodPost, route.Pattern, nil)
		err := route.Handler.ServeHTTP(httptest.NewRecorder(), req)
		apiErr, ok := err.(caddy.APIError)
		if !ok || apiErr.HTTPStatus != http.StatusMethodNotAllowed {
			t.Errorf("POST %s: %v, want a 405 APIError", route.Pattern, err)
		}
	}
	if _, err := caddy.GetModule("admin.api.waproxy"); err != nil {
		t.Fatalf("module not registered: %v", err)
	}
}

// TestUpstreamsHealth pins the JSON of GET /waproxy/upstreams for a dialer
// with a health check: the health is read at each request.
func TestUpstreamsHealth(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	checked := time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC)
	var aHealthy atomic.Bool
	registry.AddDialer(ctx, registry.Dialer{Dialer: "wa.dialers.socks5", Servers: []string{"127.0.0.1:1080", "127.0.0.1:1081"},
		Handler: "layer4.handlers.wa_proxy", Destination: "g.whatsapp.net:5222",
		HealthFunc: func() []registry.ServerHealth {
			a := registry.ServerHealth{Upstream: "socks5 127.0.0.1:1080", Healthy: true, Destination: "g.whatsapp.net:5222", LastCheck: checked}
			if !aHealthy.Load() {
				a.Healthy, a.Error = false, "socks5 127.0.0.1:1080: dial: connect: connection refused"
			}
			return []registry.ServerHealth{a, {Upstream: "socks5 127.0.0.1:1081", Healthy: true, Destination: "g.whatsapp.net:5222"}}
		}})
	get := func() string {
		rec := httptest.NewRecorder()
		if err := new(API).upstreams(rec, httptest.NewRequest(http.MethodGet, "/waproxy/upstreams", nil)); err != nil {
			t.Fatal(err)
		}
		return rec.Body.String()
	}
	const head = `[{"dialer":"wa.dialers.socks5","servers":["127.0.0.1:1080","127.0.0.1:1081"],"handler":"layer4.handlers.wa_proxy","destination":"g.whatsapp.net:5222","health":[`
	const b = `{"upstream":"socks5 127.0.0.1:1081","healthy":true,"destination":"g.whatsapp.net:5222"}]}]` + "\n"
	if got, want := get(), head+`{"upstream":"socks5 127.0.0.1:1080","healthy":false,"destination":"g.whatsapp.net:5222","last_check":"2026-11-22T03:00:00Z","error":"socks5 127.0.0.1:1080: dial: connect: connection refused"},`+b; got != want {
		t.Fatalf("GET /waproxy/upstreams:\n got %s\nwant %s", got, want)
	}
	aHealthy.Store(true)
	if got, want := get(), head+`{"upstream":"socks5 127.0.0.1:1080","healthy":true,"destination":"g.whatsapp.net:5222","last_check":"2026-11-22T03:00:00Z"},`+b; got != want {
		t.Fatalf("GET /waproxy/upstreams after recovery:\n got %s\nwant %s", got, want)
	}
}

// TestNamesUnreachable pins the unreachable part of GET /waproxy/names: an
// address noted as timed out is listed with when, and leaves the list
// once a connect to it succeeds. (The names part is tested end to end in
// integration: it needs a dialer that resolved something.)
func TestNamesUnreachable(t *testing.T) {
	ap := netip.MustParseAddrPort("[2001:db8::53]:5222")
	t.Cleanup(func() { upstreams.NoteConnected(ap) })
	get := func() string {
		rec := httptest.NewRecorder()
		if err := new(API).names(rec, httptest.NewRequest(http.MethodGet, "/waproxy/names", nil)); err != nil {
			t.Fatal(err)
		}
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("Content-Type %q", ct)
		}
		return rec.Body.String()
	}
	if got := get(); !strings.Contains(got, `"unreachable":[]`) {
		t.Fatalf("nothing noted: %s", got)
	}
	upstreams.NoteTimeout(ap)
	got := get()
	var reply struct {
		Unreachable []struct {
			Address string    `json:"address"`
			Since   time.Time `json:"since"`
		} `json:"unreachable"`
	}
	if err := json.Unmarshal([]byte(got), &reply); err != nil || len(reply.Unreachable) != 1 ||
		reply.Unreachable[0].Address != "[2001:db8::53]:5222" || time.Since(reply.Unreachable[0].Since) > time.Minute {
		t.Fatalf("after a time-out of %v: %s (%v)", ap, got, err)
	}
	upstreams.NoteConnected(ap)
	if got := get(); !strings.Contains(got, `"unreachable":[]`) {
		t.Fatalf("after a connect succeeded: %s", got)
	}
}

// TestEventStreamEndsAtShutdown: an open event stream does not hold the
// admin server's shutdown (Caddy's, at exit and when a config change
// replaces the server, waits 10 s and then reports an unclean exit): the
// stream ends when the shutdown begins, and the client sees its end.
func TestEventStreamEndsAtShutdown(t *testing.T) {
	a := new(API)
	mux := http.NewServeMux()
	for _, rt := range a.Routes() {
		mux.Handle(rt.Pattern, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_ = rt.Handler.ServeHTTP(w, r)
		}))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	streams := make([]*http.Response, 2) // two streams share the server's shutdown signal
	for i := range streams {
		resp, err := http.Get("http://" + ln.Addr().String() + "/waproxy/events")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if line, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil || line != ": waproxy events\n" {
			t.Fatalf("stream %d opened with %q, %v", i, line, err)
		}
		streams[i] = resp
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("the admin server's shutdown with open event streams: %v", err)
	}
	for i, resp := range streams {
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			t.Errorf("stream %d ended with %v, want its clean end", i, err)
		}
	}
}
