// Package admin holds the `admin.api.waproxy` module: the proxy's live view
// in Caddy's admin API.
package admin

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

func init() {
	caddy.RegisterModule(&API{})
}

// EventBuffer is how many events a /waproxy/events subscriber may fall
// behind before it is dropped.
const EventBuffer = 256

// keepaliveInterval is how often an idle event stream gets an SSE comment,
// so proxies and clients see it alive and a departed client is noticed.
const keepaliveInterval = 15 * time.Second

// API (module `admin.api.waproxy`) serves the live connections, the
// configured dialers, the direct dialer's resolved names and a stream of
// connection events on Caddy's admin endpoint. Caddy mounts every registered `admin.api.*` module; it takes
// no configuration.
type API struct{}

// CaddyModule returns the Caddy module information.
func (*API) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.waproxy",
		New: func() caddy.Module { return new(API) },
	}
}

// Provision registers the proxy's collectors in the metrics registry of the
// admin endpoint's context. Caddy swaps in a new admin server (and registry)
// for every config it loads, before it provisions the apps, and keeps it
// when the config is then rejected; without this, /metrics would lose every
// whatsapp_proxy_* series until the next good config.
func (a *API) Provision(ctx caddy.Context) error {
	return metrics.Register(ctx.GetMetricsRegistry())
}

// Routes returns the /waproxy/ routes.
func (a *API) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/waproxy/connections", Handler: caddy.AdminHandlerFunc(a.connections)},
		{Pattern: "/waproxy/upstreams", Handler: caddy.AdminHandlerFunc(a.upstreams)},
		{Pattern: "/waproxy/names", Handler: caddy.AdminHandlerFunc(a.names)},
		{Pattern: "/waproxy/events", Handler: caddy.AdminHandlerFunc(a.events)},
	}
}

func onlyGET(r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed (use GET)", r.Method)}
	}
	return nil
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// connections answers GET /waproxy/connections with the live connections.
func (a *API) connections(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGET(r); err != nil {
		return err
	}
	return writeJSON(w, registry.List())
}

// upstreams answers GET /waproxy/upstreams with the configured dialers and
// the health of their upstreams.
func (a *API) upstreams(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGET(r); err != nil {
		return err
	}
	return writeJSON(w, registry.Dialers())
}

// namesReply is GET /waproxy/names's answer.
type namesReply struct {
	// Names are the direct dialer's resolve cache.
	Names []upstreams.Name `json:"names"`
	// Unreachable are the addresses tried last after a connect timed out.
	Unreachable []upstreams.UnreachableAddress `json:"unreachable"`
}

// names answers GET /waproxy/names with the direct dialer's resolve cache
// and the addresses it tries last.
func (a *API) names(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGET(r); err != nil {
		return err
	}
	return writeJSON(w, namesReply{Names: upstreams.Names(), Unreachable: upstreams.UnreachableAddresses()})
}

// events streams connection events as Server-Sent Events until the client
// leaves or falls too far behind, or the admin server stops (at exit, and
// when a config change replaces it: clients reconnect, as SSE clients do).
func (a *API) events(w http.ResponseWriter, r *http.Request) error {
	if err := onlyGET(r); err != nil {
		return err
	}
	// before the first byte: a client that has read the stream's opening
	// line knows that a shutdown from then on ends the stream
	shutdown := shutdownOf(r)
	rc := http.NewResponseController(w)
	sub := registry.Subscribe(EventBuffer)
	defer sub.Unsubscribe()

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if _, err := fmt.Fprint(w, ": waproxy events\n\n"); err != nil {
		return nil
	}
	if err := rc.Flush(); err != nil {
		return nil // the client is gone, or the writer cannot stream
	}
	// the admin server's read timeout (10s) would end a long-lived stream:
	// its expiry cancels the request's context
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})

	tick := time.NewTicker(keepaliveInterval)
	defer tick.Stop()
	for {
		var err error
		select {
		case <-r.Context().Done():
			return nil
		case <-shutdown:
			return nil // the admin server is stopping (reload or exit)
		case <-sub.Dropped():
			_, _ = fmt.Fprint(w, "event: dropped\ndata: {\"reason\":\"subscriber too slow\"}\n\n")
			_ = rc.Flush()
			return nil
		case <-tick.C:
			_, err = fmt.Fprint(w, ": keepalive\n\n")
		case ev := <-sub.Events():
			var b []byte
			b, err = json.Marshal(ev)
			if err == nil {
				_, err = fmt.Fprintf(w, "event: %s\nid: %d\ndata: %s\n\n", ev.Type, ev.Connection.ID, b)
			}
		}
		if err == nil {
			err = rc.Flush()
		}
		if err != nil {
			return nil // the client went away: end quietly
		}
	}
}

// shutdowns maps each admin server that has served an event stream to a
// channel closed when the server begins to shut down.
var shutdowns sync.Map // *http.Server → chan struct{}

// shutdownOf returns a channel closed when the server serving r begins to
// shut down (nil, never closed, when r carries no server). Caddy shuts its
// admin server down (with a 10 s timeout) at exit and whenever a config
// change replaces it; http.Server.Shutdown waits for active requests and
// never cancels their contexts, so a stream left open would hold the exit
// for those 10 s and end it with an unclean-shutdown status. The config's
// context cannot serve instead: after a rejected config, Caddy keeps the
// admin server that was provisioned with that config's (cancelled) context.
// A stream whose request arrives while the shutdown is beginning, before it
// registers, is left to the shutdown's timeout, as before.
func shutdownOf(r *http.Request) <-chan struct{} {
	srv, _ := r.Context().Value(http.ServerContextKey).(*http.Server)
	if srv == nil {
		return nil
	}
	ch := make(chan struct{})
	if v, loaded := shutdowns.LoadOrStore(srv, ch); loaded {
		return v.(chan struct{})
	}
	srv.RegisterOnShutdown(func() {
		shutdowns.Delete(srv)
		close(ch)
	})
	return ch
}

// Interface guards
var (
	_ caddy.AdminRouter = (*API)(nil)
	_ caddy.Provisioner = (*API)(nil)
)
