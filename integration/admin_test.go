package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// adminConn is one entry of GET /waproxy/connections, decoded with the
// field names the docs promise.
type adminConn struct {
	ID              uint64    `json:"id"`
	Remote          string    `json:"remote"`
	Listener        string    `json:"listener"`
	Protocol        string    `json:"protocol"`
	Handler         string    `json:"handler"`
	Destination     string    `json:"destination"`
	Dialer          string    `json:"dialer"`
	BytesFromClient int64     `json:"bytes_from_client"`
	BytesToClient   int64     `json:"bytes_to_client"`
	Start           time.Time `json:"start"`
	DurationSeconds float64   `json:"duration_seconds"`
}

// adminGet fetches path from the admin endpoint and returns the body.
func adminGet(t *testing.T, c *testutil.Caddy, path string) []byte {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + c.Admin + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d, %v: %s", path, resp.StatusCode, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("GET %s: Content-Type %q, want application/json", path, ct)
	}
	return body
}

// listedConn returns the listed connection whose remote is remote.
func listedConn(t *testing.T, c *testutil.Caddy, remote string) (adminConn, bool) {
	t.Helper()
	var list []adminConn
	body := adminGet(t, c, "/waproxy/connections")
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("connections JSON: %v: %s", err, body)
	}
	for _, ac := range list {
		if ac.Remote == remote {
			return ac, true
		}
	}
	return adminConn{}, false
}

// waitListed waits until the connection from remote is listed with the
// given byte counts, and returns it.
func waitListed(t *testing.T, c *testutil.Caddy, remote string, from, to int64) adminConn {
	t.Helper()
	var ac adminConn
	testutil.WaitFor(t, 5*time.Second, "connection listed with its bytes", func() bool {
		var ok bool
		ac, ok = listedConn(t, c, remote)
		return ok && ac.BytesFromClient == from && ac.BytesToClient == to
	})
	return ac
}

func TestAdminConnectionsAndUpstreams(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	creds := map[string]string{"alice": "s3cret-pass"}
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "via": socksVia(socks, "alice", "s3cret-pass"), "allow": []string{"127.0.0.1"}}),
	}, socks, creds))

	// upstreams: the socks5 dialer and its server, never its credentials
	body := adminGet(t, c, "/waproxy/upstreams")
	if strings.Contains(string(body), "s3cret") || strings.Contains(string(body), "alice") {
		t.Fatalf("upstreams leak credentials: %s", body)
	}
	var ups []map[string]any
	if err := json.Unmarshal(body, &ups); err != nil {
		t.Fatalf("upstreams JSON: %v: %s", err, body)
	}
	found := false
	for _, u := range ups {
		servers, _ := u["servers"].([]any)
		if u["dialer"] == "wa.dialers.socks5" && len(servers) == 1 && servers[0] == socks &&
			u["handler"] == "layer4.handlers.wa_proxy" && u["destination"] == edge.Addr {
			found = true
		}
	}
	if !found {
		t.Fatalf("upstreams %s do not list the socks5 dialer via %s", body, socks)
	}

	conn := dial(t, listen)
	hello := waHello()
	exchange(t, conn, hello)
	msg := frame(randomBytes(5000))
	exchange(t, conn, msg)
	n := int64(len(hello) + len(msg))
	ac := waitListed(t, c, conn.LocalAddr().String(), n, n)
	if ac.ID == 0 || ac.Listener != listen || ac.Protocol != "whatsapp" || ac.Destination != edge.Addr ||
		ac.Dialer != "wa.dialers.socks5" || ac.Handler != "layer4.handlers.wa_proxy" {
		t.Fatalf("listed %+v", ac)
	}
	if ac.Start.IsZero() || time.Since(ac.Start) > time.Minute || ac.DurationSeconds < 0 {
		t.Fatalf("start %v, duration %v", ac.Start, ac.DurationSeconds)
	}
	raw := string(adminGet(t, c, "/waproxy/connections"))
	if strings.Contains(raw, "s3cret") || strings.Contains(raw, "alice") {
		t.Fatalf("connections leak credentials: %s", raw)
	}

	conn.Close()
	testutil.WaitFor(t, 5*time.Second, "closed connection unlisted", func() bool {
		_, ok := listedConn(t, c, ac.Remote)
		return !ok
	})

	// only GET
	resp, err := http.Post("http://"+c.Admin+"/waproxy/connections", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /waproxy/connections: status %d, want 405", resp.StatusCode)
	}
}

// sseEvent is one Server-Sent Event of /waproxy/events.
type sseEvent struct {
	name string
	data struct {
		Type       string    `json:"type"`
		Connection adminConn `json:"connection"`
		Error      string    `json:"error"`
	}
}

// readEvent reads the next event (skipping comments) from r.
func readEvent(t *testing.T, r *bufio.Reader) sseEvent {
	t.Helper()
	var ev sseEvent
	var data string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading event stream: %v", err)
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "" && ev.name != "":
			if err := json.Unmarshal([]byte(data), &ev.data); err != nil {
				t.Fatalf("event %s data %q: %v", ev.name, data, err)
			}
			return ev
		case strings.HasPrefix(line, "event: "):
			ev.name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data = strings.TrimPrefix(line, "data: ")
		}
	}
}

func TestAdminEventStream(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}}),
	}, "", nil))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.Admin+"/waproxy/events", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /waproxy/events: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET /waproxy/events: status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	r := bufio.NewReader(resp.Body)
	// the stream opens with a comment once the subscription is in place
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, ":") {
		t.Fatalf("stream start %q, %v", line, err)
	}

	conn := dial(t, listen)
	remote := conn.LocalAddr().String()
	hello := waHello()
	exchange(t, conn, hello)
	msg := frame(randomBytes(1000))
	exchange(t, conn, msg)
	conn.Close()

	var opened, closed *sseEvent
	for closed == nil {
		ev := readEvent(t, r)
		if ev.data.Connection.Remote != remote {
			continue
		}
		if ev.name != ev.data.Type {
			t.Fatalf("event name %q, type %q", ev.name, ev.data.Type)
		}
		switch ev.name {
		case "opened":
			opened = &ev
		case "closed":
			if opened == nil {
				t.Fatal("closed before opened")
			}
			closed = &ev
		}
	}
	if o := opened.data.Connection; o.Listener != listen || o.Dialer != "wa.dialers.direct" || o.Destination != edge.Addr {
		t.Fatalf("opened event %+v", o)
	}
	n := int64(len(hello) + len(msg))
	if cc := closed.data.Connection; cc.ID != opened.data.Connection.ID || cc.BytesFromClient != n || cc.BytesToClient != n || cc.DurationSeconds <= 0 {
		t.Fatalf("closed event %+v, want id %d and %d bytes each way", cc, opened.data.Connection.ID, n)
	}

	// the client goes: the server ends the stream and releases the
	// subscription; the proxy keeps working
	if registry.Subscribers() != 1 {
		t.Fatalf("%d subscribers, want 1", registry.Subscribers())
	}
	cancel()
	testutil.WaitFor(t, 5*time.Second, "subscription released", func() bool { return registry.Subscribers() == 0 })
	conn2 := dial(t, listen)
	exchange(t, conn2, waHello())
	conn2.Close()
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
}

// TestAdminEventStreamEndsOnReload: a config change replaces Caddy's admin
// server; a stream open on the old one ends at once (it held the old
// server's shutdown for its 10 s timeout before), and a new stream on the
// new server works.
func TestAdminEventStreamEndsOnReload(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	cfg := func(idle string) string {
		return proxyConfig(listen, []obj{
			chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}, "idle_timeout": idle}),
		}, "", nil)
	}
	c := testutil.StartCaddy(t, cfg("100s"))
	client := &http.Client{Timeout: 20 * time.Second} // bounds every read below
	open := func() *bufio.Reader {
		resp, err := client.Get("http://" + c.Admin + "/waproxy/events")
		if err != nil {
			t.Fatalf("GET /waproxy/events: %v", err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		r := bufio.NewReader(resp.Body)
		if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, ":") {
			t.Fatalf("stream start %q, %v", line, err)
		}
		return r
	}
	old := open()
	start := time.Now()
	c.Load(t, cfg("90s"))
	ended := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, old); ended <- err }()
	select {
	case err := <-ended:
		if err != nil {
			t.Fatalf("the stream on the replaced admin server ended with %v, want its clean end", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the stream on the replaced admin server is still open 5 s after the reload (Caddy waits 10 s for it)")
	}
	t.Logf("the old stream ended %v after the reload began", time.Since(start).Round(time.Millisecond))

	r := open()
	conn := dial(t, listen)
	remote := conn.LocalAddr().String()
	exchange(t, conn, waHello())
	conn.Close()
	for {
		if ev := readEvent(t, r); ev.data.Connection.Remote == remote && ev.name == "opened" {
			return
		}
	}
}

func TestReloadKeepsConnectionListed(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	cfg := proxyConfig(listen, []obj{chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}})}, "", nil)
	c := testutil.StartCaddy(t, cfg)

	conn := dial(t, listen)
	hello := waHello()
	exchange(t, conn, hello)
	n := int64(len(hello))
	before := waitListed(t, c, conn.LocalAddr().String(), n, n)
	waitMetric(t, c, "whatsapp_proxy_connections_active", 1)

	// reload through the admin API with a changed config
	cfg2 := strings.Replace(cfg, `"allow":["127.0.0.1"]`, `"allow":["127.0.0.1"],"idle_timeout":"100s"`, 1)
	if cfg2 == cfg {
		t.Fatal("config did not change")
	}
	c.Load(t, cfg2)

	// still listed with the same id, still flowing, still counted
	msg := frame(randomBytes(3000))
	exchange(t, conn, msg)
	n += int64(len(msg))
	after := waitListed(t, c, conn.LocalAddr().String(), n, n)
	if after.ID != before.ID || !after.Start.Equal(before.Start) {
		t.Fatalf("after reload listed %+v, before %+v", after, before)
	}
	if got := metric(t, c, "whatsapp_proxy_connections_active"); got != 1 {
		t.Fatalf("connections_active %v after reload, want 1", got)
	}

	conn.Close()
	testutil.WaitFor(t, 5*time.Second, "connection unlisted", func() bool {
		_, ok := listedConn(t, c, after.Remote)
		return !ok
	})
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
}

// TestAdminTunnelAndErrors: a wa_http CONNECT tunnel is listed with its
// destination and bytes, and without the proxy credentials; a chat
// connection whose destination cannot be dialled yields an `error` event
// and a `closed` event that carries the error.
func TestAdminTunnelAndErrors(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen, dead := testutil.FreeAddr(t), testutil.FreeAddr(t) // nothing listens on dead
	local := []string{"127.0.0.1"}
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		httpRoute(obj{"allow": local, "auth": obj{"basic": obj{"username": "bob", "password": "hunter2-pw"}}}),
		chatRoute(obj{"destination": dead, "allow": local}),
	}, "", nil))

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.Admin+"/waproxy/events", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /waproxy/events: %v", err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, ":") {
		t.Fatalf("stream start %q, %v", line, err)
	}

	// the tunnel
	auth := "Proxy-Authorization: Basic Ym9iOmh1bnRlcjItcHc=\r\n" // bob:hunter2-pw
	tresp, _, br, conn := rawExchange(t, listen, "CONNECT "+edge.Addr+" HTTP/1.1\r\nHost: "+edge.Addr+"\r\n"+auth+"\r\n")
	if tresp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT: %s", tresp.Status)
	}
	msg := randomBytes(2000)
	exchangeBuffered(t, conn, br, msg)
	n := int64(len(msg))
	ac := waitListed(t, c, conn.LocalAddr().String(), n, n)
	if ac.Handler != "layer4.handlers.wa_http" || ac.Destination != edge.Addr || ac.Protocol != "http" ||
		ac.Dialer != "wa.dialers.direct" || ac.Listener != listen {
		t.Fatalf("tunnel listed as %+v", ac)
	}
	for _, path := range []string{"/waproxy/connections", "/waproxy/upstreams"} {
		if body := string(adminGet(t, c, path)); strings.Contains(body, "hunter2") || strings.Contains(body, "Ym9i") {
			t.Fatalf("%s leaks the proxy credentials: %s", path, body)
		}
	}
	conn.Close()
	for {
		ev := readEvent(t, r)
		if ev.data.Connection.ID == ac.ID && ev.name == "closed" {
			if ev.data.Connection.BytesFromClient != n || ev.data.Connection.BytesToClient != n {
				t.Fatalf("tunnel closed with %+v, want %d bytes each way", ev.data.Connection, n)
			}
			break
		}
	}

	// the failed dial
	chat := dial(t, listen)
	if _, err := chat.Write(waHello()); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, chat, 5*time.Second)
	remote := chat.LocalAddr().String()
	var sawError bool
	for {
		ev := readEvent(t, r)
		if ev.data.Connection.Remote != remote {
			continue
		}
		if ev.name == "error" {
			if ev.data.Error == "" || ev.data.Connection.Destination != dead {
				t.Fatalf("error event %+v", ev.data)
			}
			sawError = true
		}
		if ev.name == "closed" {
			if !sawError || ev.data.Error == "" {
				t.Fatalf("closed event %+v, error event seen: %v", ev.data, sawError)
			}
			break
		}
	}
}

// TestAdminNames: after wa_proxy reached its destination by name, GET
// /waproxy/names lists the name with the addresses it resolved to (here
// from /etc/hosts), and a second connection adds nothing.
func TestAdminNames(t *testing.T) {
	edge := testutil.StartEcho(t)
	_, edgePort, _ := net.SplitHostPort(edge.Addr)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": "localhost:" + edgePort, "allow": []string{"localhost", "127.0.0.0/8", "::1"}}),
	}, "", nil))
	for range 2 {
		conn := dial(t, listen)
		exchange(t, conn, waHello())
		conn.Close()
	}
	var reply struct {
		Names []struct {
			Host      string    `json:"host"`
			Network   string    `json:"network"`
			Addresses []string  `json:"addresses"`
			Resolved  time.Time `json:"resolved"`
		} `json:"names"`
		Unreachable []any `json:"unreachable"`
	}
	body := adminGet(t, c, "/waproxy/names")
	if err := json.Unmarshal(body, &reply); err != nil {
		t.Fatalf("names JSON: %v: %s", err, body)
	}
	listed := 0
	for _, n := range reply.Names {
		if n.Host != "localhost" {
			continue
		}
		listed++
		if n.Network != "ip" || !slices.Contains(n.Addresses, "127.0.0.1") || time.Since(n.Resolved) > time.Minute {
			t.Fatalf("localhost listed as %+v", n)
		}
	}
	if listed != 1 {
		t.Fatalf("localhost listed %d times, want once: %s", listed, body)
	}
	if reply.Unreachable == nil {
		t.Fatalf("no unreachable list (want [] when empty): %s", body)
	}
}
