package integration

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// TestChatThroughSOCKS5 is the core path: a WhatsApp-shaped client → our
// listener → wa_xmpp → wa_proxy via socks5 → caddy-l4's SOCKS5 server → a
// local echo edge, reached by name (ATYP 3, resolved at the exit).
func TestChatThroughSOCKS5(t *testing.T) {
	edge := testutil.StartEcho(t)
	_, edgePort, _ := net.SplitHostPort(edge.Addr)
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": "localhost:" + edgePort, "via": socksVia(socks), "allow": []string{"localhost"}}),
	}, socks, nil))

	total0 := metric(t, c, "whatsapp_proxy_connections_total")
	recv0 := metric(t, c, "whatsapp_proxy_bytes_received_total")
	sent0 := metric(t, c, "whatsapp_proxy_bytes_sent_total")

	var carried float64 // bytes the client sent (and got back) over all subtests
	for _, tc := range []struct {
		name, protocol string
		prologue       []byte
	}{
		{"whatsapp", "whatsapp", nil},
		{"whatsapp_edge", "whatsapp_edge", edPrologue()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := dial(t, listen)
			hello := append(append([]byte{}, tc.prologue...), waHello()...)
			exchange(t, conn, hello)
			// the connection is live: the gauges show it
			waitMetric(t, c, `whatsapp_proxy_connections_active`, 1)
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="`+tc.protocol+`"}`, 1)
			for i := range 20 {
				exchange(t, conn, frame(randomBytes(10+i*50)))
			}
			exchange(t, conn, frame(randomBytes(200_000))) // a frame larger than any buffer
			carried += float64(len(hello) + 200_003)
			for i := range 20 {
				carried += float64(3 + 10 + i*50)
			}
			conn.Close()
			waitMetric(t, c, `whatsapp_proxy_connections_active`, 0)
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="`+tc.protocol+`"}`, 0)

			// the edge saw the client's bytes unmodified, from the first byte
			testutil.WaitFor(t, 5*time.Second, "edge saw the connection end", func() bool { return len(edge.Received()) > 0 })
			rcv := edge.Received()
			if got := rcv[len(rcv)-1]; !bytes.HasPrefix(got, hello) {
				t.Fatalf("edge received %x, want it to start with the client's hello %x", got[:min(len(got), 64)], hello)
			}
		})
	}

	if got := metric(t, c, "whatsapp_proxy_connections_total") - total0; got != 2 {
		t.Errorf("connections_total grew by %v, want 2", got)
	}
	// bytes: both directions carried the same bytes (an echo)
	wantBytes := carried
	if got := metric(t, c, "whatsapp_proxy_bytes_received_total") - recv0; got != wantBytes {
		t.Errorf("bytes_received_total grew by %v, want %v", got, wantBytes)
	}
	if got := metric(t, c, "whatsapp_proxy_bytes_sent_total") - sent0; got != wantBytes {
		t.Errorf("bytes_sent_total grew by %v, want %v", got, wantBytes)
	}
}

// TestXMPPStream: an XMPP client stream is recognised and proxied.
func TestXMPPStream(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}}),
	}, "", nil))
	conn := dial(t, listen)
	open := []byte(`<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>`)
	exchange(t, conn, open)
	waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="xmpp"}`, 1)
}

// TestProxyProtocolHeader: with proxy_protocol v1/v2 the destination first
// receives a PROXY header naming the client, then the client's bytes.
func TestProxyProtocolHeader(t *testing.T) {
	for _, version := range []string{"v1", "v2"} {
		t.Run(version, func(t *testing.T) {
			edge := testutil.StartEcho(t)
			listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
			testutil.StartCaddy(t, proxyConfig(listen, []obj{
				chatRoute(obj{"destination": edge.Addr, "via": socksVia(socks), "allow": []string{"127.0.0.1"}, "proxy_protocol": version}),
			}, socks, nil))
			conn := dial(t, listen)
			hello := waHello()
			if _, err := conn.Write(hello); err != nil {
				t.Fatal(err)
			}
			// the echo edge echoes the header too: parse it from what comes back
			br := bufio.NewReader(conn)
			hdr, err := proxyproto.Read(br)
			if err != nil {
				t.Fatalf("reading PROXY header: %v", err)
			}
			if int(hdr.Version) != int(version[1]-'0') {
				t.Errorf("PROXY version %d, want %s", hdr.Version, version)
			}
			src := hdr.SourceAddr.(*net.TCPAddr)
			if src.String() != conn.LocalAddr().String() {
				t.Errorf("PROXY source %v, want the client's address %v", src, conn.LocalAddr())
			}
			if dst := hdr.DestinationAddr.(*net.TCPAddr); dst.String() != listen {
				t.Errorf("PROXY destination %v, want the listener %v", dst, listen)
			}
			got := make([]byte, len(hello))
			if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, hello) {
				t.Fatalf("after the header want the hello, got %x, %v", got, err)
			}
		})
	}
}

// TestFallbackAndSilentClient: unrecognised bytes reach the fallback route;
// a client that sends nothing reaches the wa_silent route (a
// server-speaks-first edge) before the matching timeout would close it.
func TestFallbackAndSilentClient(t *testing.T) {
	chatEdge := testutil.StartEcho(t)
	fallback := testutil.StartEcho(t)
	banner := bannerServer(t, "220 edge ready\r\n")
	listen := testutil.FreeAddr(t)
	local := []string{"127.0.0.1"}
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		{"match": []obj{{"wa_silent": obj{"wait": "300ms"}}}, "handle": []obj{{"handler": "wa_proxy", "destination": banner, "allow": local}}},
		chatRoute(obj{"destination": chatEdge.Addr, "allow": local}),
		{"handle": []obj{{"handler": "wa_proxy", "destination": fallback.Addr, "allow": local}}},
	}, "", nil))

	t.Run("unrecognised bytes go to the fallback", func(t *testing.T) {
		raw0 := metric(t, c, `whatsapp_proxy_connections_total`)
		conn := dial(t, listen)
		msg := []byte("SSH-2.0-OpenSSH_9.2p1\r\n")
		exchange(t, conn, msg)
		waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="raw"}`, 1)
		conn.Close()
		testutil.WaitFor(t, 5*time.Second, "fallback edge saw the bytes", func() bool {
			for _, r := range fallback.Received() {
				if bytes.Equal(r, msg) {
					return true
				}
			}
			return false
		})
		if got := metric(t, c, `whatsapp_proxy_connections_total`) - raw0; got != 1 {
			t.Errorf("connections_total grew by %v, want 1", got)
		}
	})
	t.Run("a silent client reaches the server-speaks-first route", func(t *testing.T) {
		conn := dial(t, listen)
		// send nothing: the banner must arrive (matching timeout is 10s; the read deadline is 5s)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil || line != "220 edge ready\r\n" {
			t.Fatalf("want the edge's banner, got %q, %v", line, err)
		}
	})
	t.Run("chat is not delayed by the silence check", func(t *testing.T) {
		conn := dial(t, listen)
		exchange(t, conn, waHello())
	})
}

// TestHalfClose: when the client shuts down its write half, the edge sees
// EOF, and the edge's remaining bytes still reach the client.
func TestHalfClose(t *testing.T) {
	edge := testutil.StartEcho(t) // echoes, then closes its write half on EOF
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}}),
	}, "", nil))
	conn := dial(t, listen)
	payload := append(waHello(), frame(randomBytes(1<<20))...)
	go func() {
		_, _ = conn.Write(payload)
		_ = conn.CloseWrite()
	}()
	got, err := io.ReadAll(conn) // ends only when the edge's FIN is relayed back
	if err != nil {
		t.Fatalf("reading after half-close: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatalf("got %d bytes back, want the %d sent", len(got), len(payload))
	}
}

// TestLargeTransfer: 32 MiB each way through socks5, intact.
func TestLargeTransfer(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "via": socksVia(socks), "allow": []string{"127.0.0.1"}}),
	}, socks, nil))
	conn := dial(t, listen)
	payload := append(waHello(), randomBytes(32<<20)...)
	want := sha256.Sum256(payload)
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		errc <- err
	}()
	h := sha256.New()
	if _, err := io.CopyN(h, conn, int64(len(payload))); err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("the 32 MiB echo differs from what was sent")
	}
}

// TestIdleTimeout: a connection where nothing moves for idle_timeout is
// closed and counted.
func TestIdleTimeout(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}, "idle_timeout": "300ms"}),
	}, "", nil))
	before := metric(t, c, `whatsapp_proxy_errors_total{kind="idle_timeout"}`)
	conn := dial(t, listen)
	exchange(t, conn, waHello())
	expectClosed(t, conn, 10*time.Second)
	waitMetric(t, c, `whatsapp_proxy_errors_total{kind="idle_timeout"}`, before+1)
}

// TestFailures: each failure closes the client promptly, logs once and
// counts in errors_total{kind}.
func TestFailures(t *testing.T) {
	edge := testutil.StartEcho(t)
	_, edgePort, _ := net.SplitHostPort(edge.Addr)
	closedPort := strconv.Itoa(testutil.FreePort(t)) // nothing listens there
	down := testutil.FreeAddr(t)                     // no SOCKS5 server there
	socks := testutil.FreeAddr(t)
	local := []string{"127.0.0.1"}

	cases := []struct {
		name, kind string
		handler    obj
	}{
		{"socks5 server down", "dial", obj{"destination": edge.Addr, "via": socksVia(down), "allow": local}},
		{"wrong password", "socks5_auth", obj{"destination": edge.Addr, "via": socksVia(socks, "user", "wrong"), "allow": local}},
		{"destination refused", "socks5_refused", obj{"destination": "127.0.0.1:" + closedPort, "via": socksVia(socks, "user", "secret"), "allow": local}},
		{"destination not allowed", "not_allowed", obj{"destination": "{l4.conn.local_addr}", "via": socksVia(socks, "user", "secret")}},
		{"direct: destination refused", "dial", obj{"destination": "127.0.0.1:" + closedPort, "allow": local}},
		// an allowed name that resolves to an internal address is refused
		// unless that address is allowed too (the edge is listening there)
		{"direct: allowed name resolving to loopback", "not_allowed", obj{"destination": "localhost:" + edgePort, "allow": []string{"localhost"}}},
	}
	// one listener per case
	listens := make([]string, len(cases))
	for i := range cases {
		listens[i] = testutil.FreeAddr(t)
	}
	servers := obj{
		"socks": obj{"listen": []string{socks}, "routes": []obj{{"handle": []obj{{"handler": "socks5", "credentials": map[string]string{"user": "secret"}}}}}},
	}
	for i, tc := range cases {
		tc.handler["handler"] = "wa_proxy"
		servers["case"+strconv.Itoa(i)] = obj{"listen": []string{listens[i]}, "routes": []obj{{"match": []obj{{"wa_xmpp": obj{}}}, "handle": []obj{tc.handler}}}}
	}
	cfg, _ := json.Marshal(obj{
		"logging": obj{"logs": obj{"default": obj{"level": "ERROR"}}},
		"apps":    obj{"layer4": obj{"servers": servers}},
	})
	c := testutil.StartCaddy(t, string(cfg))
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			series := `whatsapp_proxy_errors_total{kind="` + tc.kind + `"}`
			before := metric(t, c, series)
			conn := dial(t, listens[i])
			if _, err := conn.Write(waHello()); err != nil {
				t.Fatal(err)
			}
			expectClosed(t, conn, 8*time.Second)
			waitMetric(t, c, series, before+1)
		})
	}
}

// TestDirectNameAllowedWithItsAddress: the same name works once its loopback
// address is allowed explicitly.
func TestDirectNameAllowedWithItsAddress(t *testing.T) {
	edge := testutil.StartEcho(t)
	_, edgePort, _ := net.SplitHostPort(edge.Addr)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": "localhost:" + edgePort, "allow": []string{"localhost", "127.0.0.0/8", "::1"}}),
	}, "", nil))
	conn := dial(t, listen)
	exchange(t, conn, waHello())
}

// TestReloadKeepsMetrics: collectors are registered in every config's
// registry; counters keep counting across a reload, and two handlers in one
// config do not collide.
func TestReloadKeepsMetrics(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	route := chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}})
	route2 := obj{"handle": []obj{{"handler": "wa_proxy", "destination": edge.Addr, "allow": []string{"127.0.0.1"}}}}
	cfg := proxyConfig(listen, []obj{route, route2}, "", nil)
	c := testutil.StartCaddy(t, cfg)
	conn := dial(t, listen)
	exchange(t, conn, waHello())
	conn.Close()
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
	total := metric(t, c, "whatsapp_proxy_connections_total")

	// reload through the admin API with a changed config (a new idle timeout)
	cfg2 := strings.Replace(cfg, `"allow":["127.0.0.1"]`, `"allow":["127.0.0.1"],"idle_timeout":"100s"`, 1)
	c.Load(t, cfg2)
	if got := metric(t, c, "whatsapp_proxy_connections_total"); got != total {
		t.Fatalf("after reload connections_total is %v, want %v (kept)", got, total)
	}
	conn = dial(t, listen)
	exchange(t, conn, waHello())
	conn.Close()
	waitMetric(t, c, "whatsapp_proxy_connections_total", total+1)
}
