package integration

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"testing"
	"time"

	_ "github.com/mholt/caddy-l4/modules/l4subroute"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// limitConfig is the recommended layout: wa_limit first in the route, the
// matching and proxying in a subroute after it. Chat goes to edge. The
// subroute's matching timeout is long (30s), so a connection closed within
// the tests' hang guards was refused by wa_limit, not timed out while
// matching. matching is the server's matching timeout; changing it makes a
// different config for a reload.
func limitConfig(listen, edge string, limits obj, matching string) string {
	lim := obj{"handler": "wa_limit"}
	for k, v := range limits {
		lim[k] = v
	}
	sub := obj{"handler": "subroute", "matching_timeout": "30s", "routes": []obj{
		chatRoute(obj{"destination": edge, "allow": []string{"127.0.0.1"}}),
	}}
	cfg := proxyConfig(listen, []obj{{"handle": []obj{lim, sub}}}, "", nil)
	var m obj
	_ = json.Unmarshal([]byte(cfg), &m)
	m["apps"].(obj)["layer4"].(obj)["servers"].(obj)["proxy"].(obj)["matching_timeout"] = matching
	b, _ := json.Marshal(m)
	return string(b)
}

// dialFrom connects to addr from the loopback address from (127.0.0.x:
// on Linux all of 127/8 is loopback).
func dialFrom(t *testing.T, from, addr string) (*net.TCPConn, error) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c.(*net.TCPConn), nil
}

// openChat opens a chat connection from from and checks the edge echoes its
// hello: the connection is live and relayed.
func openChat(t *testing.T, from, addr string) *net.TCPConn {
	t.Helper()
	c, err := dialFrom(t, from, addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, from, err)
	}
	exchange(t, c, waHello())
	return c
}

// expectRefused dials addr from from, sends nothing, and asserts the proxy
// closes the connection at once; errors_total{kind} must grow by one.
func expectRefused(t *testing.T, c *testutil.Caddy, from, addr, kind string) {
	t.Helper()
	series := `whatsapp_proxy_errors_total{kind="` + kind + `"}`
	before := metric(t, c, series)
	conn, err := dialFrom(t, from, addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, from, err)
	}
	expectClosed(t, conn, 10*time.Second)
	waitMetric(t, c, series, before+1)
}

// reopenChat waits until a new chat connection from from is let in again
// (a closed connection's place is freed just after the proxy sees it end)
// and returns it.
func reopenChat(t *testing.T, from, addr string) *net.TCPConn {
	t.Helper()
	var live *net.TCPConn
	testutil.WaitFor(t, 5*time.Second, "a new connection let in", func() bool {
		c, err := dialFrom(t, from, addr)
		if err != nil {
			return false
		}
		hello := waHello()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		got := make([]byte, len(hello))
		if _, err := c.Write(hello); err != nil {
			return false
		}
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, hello) {
			c.Close()
			return false
		}
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		live = c
		return true
	})
	return live
}

// waitNoConnections waits until no proxied connection is left (from this
// or an earlier test): the limits count process-wide.
func waitNoConnections(t *testing.T) {
	t.Helper()
	testutil.WaitFor(t, 5*time.Second, "no proxied connection left", func() bool { return registry.Len() == 0 })
}

// TestLimitMaxConnections: with max_connections N, N chat connections are
// relayed (by the event loop, after their handlers returned, unless
// WAPROXY_RELAY=goroutine) and still count: connection N+1 is closed at
// once without a byte read, and counted. When one of the N closes, a new
// one is let in, and then the limit holds again. A reload keeps the count:
// the old config's connections still count under the new config, and
// are released once when they close.
func TestLimitMaxConnections(t *testing.T) {
	const n = 3
	waitNoConnections(t)
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	limits := obj{"max_connections": n}
	c := testutil.StartCaddy(t, limitConfig(listen, edge.Addr, limits, "10s"))

	conns := make([]*net.TCPConn, n)
	for i := range conns {
		conns[i] = openChat(t, "127.0.0.1", listen)
	}
	waitMetric(t, c, "whatsapp_proxy_connections_active", n)
	expectRefused(t, c, "127.0.0.1", listen, "max_connections")
	for _, conn := range conns { // the refusal left the live ones alone
		exchange(t, conn, frame(randomBytes(100)))
	}

	// one leaves, one more gets in, and the limit holds again
	conns[0].Close()
	conns[0] = reopenChat(t, "127.0.0.1", listen)
	expectRefused(t, c, "127.0.0.1", listen, "max_connections")

	// a reload (a changed config) neither resets nor doubles the count
	c.Load(t, limitConfig(listen, edge.Addr, limits, "11s"))
	expectRefused(t, c, "127.0.0.1", listen, "max_connections")
	for _, conn := range conns {
		exchange(t, conn, frame(randomBytes(100)))
	}
	conns[1].Close()
	conns[1] = reopenChat(t, "127.0.0.1", listen)
	expectRefused(t, c, "127.0.0.1", listen, "max_connections")

	// when all close, exactly N fit again
	for _, conn := range conns {
		conn.Close()
	}
	waitNoConnections(t)
	for i := range conns {
		conns[i] = reopenChat(t, "127.0.0.1", listen)
	}
	expectRefused(t, c, "127.0.0.1", listen, "max_connections")
}

// TestLimitPerIP: max_connections_per_ip caps one client address while
// another still gets through.
func TestLimitPerIP(t *testing.T) {
	waitNoConnections(t)
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, limitConfig(listen, edge.Addr, obj{"max_connections": 100, "max_connections_per_ip": 2}, "10s"))

	a1 := openChat(t, "127.0.0.1", listen)
	openChat(t, "127.0.0.1", listen)
	total := metric(t, c, `whatsapp_proxy_errors_total{kind="max_connections"}`)
	expectRefused(t, c, "127.0.0.1", listen, "max_connections_per_ip")
	if got := metric(t, c, `whatsapp_proxy_errors_total{kind="max_connections"}`); got != total {
		t.Errorf("a per-IP refusal was counted as max_connections (%v → %v)", total, got)
	}

	// another client address is not affected, up to its own cap
	b1 := openChat(t, "127.0.0.2", listen)
	openChat(t, "127.0.0.2", listen)
	expectRefused(t, c, "127.0.0.2", listen, "max_connections_per_ip")
	exchange(t, a1, frame(randomBytes(100)))
	exchange(t, b1, frame(randomBytes(100)))

	a1.Close()
	reopenChat(t, "127.0.0.1", listen)
	expectRefused(t, c, "127.0.0.1", listen, "max_connections_per_ip")
}

// TestLimitPerListener: max_connections_per_listener counts per local
// address, across wa_limit handlers on different listeners.
func TestLimitPerListener(t *testing.T) {
	waitNoConnections(t)
	edge := testutil.StartEcho(t)
	listen, listen2 := testutil.FreeAddr(t), testutil.FreeAddr(t)
	cfg := limitConfig(listen, edge.Addr, obj{"max_connections_per_listener": 1}, "10s")
	var m obj
	_ = json.Unmarshal([]byte(cfg), &m)
	srv := m["apps"].(obj)["layer4"].(obj)["servers"].(obj)["proxy"].(obj)
	srv["listen"] = []string{listen, listen2}
	b, _ := json.Marshal(m)
	c := testutil.StartCaddy(t, string(b))

	openChat(t, "127.0.0.1", listen)
	expectRefused(t, c, "127.0.0.1", listen, "max_connections")
	openChat(t, "127.0.0.1", listen2)
	expectRefused(t, c, "127.0.0.2", listen2, "max_connections")
}

// TestLimitPerIPBehindProxyProtocol: behind caddy-l4's proxy_protocol
// handler the per-IP limit counts the client the PROXY header names, not
// the load balancer's address (all three connections come from 127.0.0.1).
func TestLimitPerIPBehindProxyProtocol(t *testing.T) {
	waitNoConnections(t)
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	cfg := limitConfig(listen, edge.Addr, obj{"max_connections_per_ip": 1}, "10s")
	var m obj
	_ = json.Unmarshal([]byte(cfg), &m)
	route := m["apps"].(obj)["layer4"].(obj)["servers"].(obj)["proxy"].(obj)["routes"].([]any)[0].(obj)
	pp := obj{"handler": "proxy_protocol", "allow": []string{"127.0.0.1/32"}}
	route["handle"] = append([]any{pp}, route["handle"].([]any)...)
	b, _ := json.Marshal(m)
	c := testutil.StartCaddy(t, string(b))

	_, port, _ := net.SplitHostPort(listen)
	header := func(client string) []byte {
		return []byte("PROXY TCP4 " + client + " 127.0.0.1 40000 " + port + "\r\n")
	}
	open := func(client string) *net.TCPConn {
		conn := dial(t, listen)
		if _, err := conn.Write(header(client)); err != nil {
			t.Fatal(err)
		}
		exchange(t, conn, waHello())
		return conn
	}
	open("127.0.0.2")
	open("127.0.0.3") // another client behind the same balancer

	before := metric(t, c, `whatsapp_proxy_errors_total{kind="max_connections_per_ip"}`)
	conn := dial(t, listen)
	if _, err := conn.Write(header("127.0.0.2")); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, conn, 10*time.Second)
	waitMetric(t, c, `whatsapp_proxy_errors_total{kind="max_connections_per_ip"}`, before+1)
}
