package handlers

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// serveHTTP provisions a wa_http handler from config and serves it on a
// loopback listener, closing each connection when Handle returns, as
// caddy-l4 does. It returns the listener's address.
func serveHTTP(t *testing.T, config string) string {
	t.Helper()
	h, err := provisionHTTP(t, config)
	if err != nil {
		t.Fatal(err)
	}
	return testutil.ServeLoopback(t, func(c net.Conn) {
		_ = h.Handle(layer4.WrapConnection(c, nil, zap.NewNop()), nil)
	})
}

// dialClient connects to addr, with a deadline that bounds the test.
func dialClient(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c, bufio.NewReader(c)
}

// TestTunnelEndReported: a CONNECT tunnel that ends on idle_timeout reports
// how it ended to the registry (an error event, and the closed event's
// error) with every relay, as wa_proxy's connections do.
func TestTunnelEndReported(t *testing.T) {
	for _, mode := range []string{"", "goroutine"} {
		t.Run("relay="+mode, func(t *testing.T) {
			saved := relayMode
			relayMode = mode
			defer func() { relayMode = saved }()
			echo := testutil.ServeLoopback(t, func(c net.Conn) { _, _ = io.Copy(c, c) })
			addr := serveHTTP(t, `{"allow":["127.0.0.1"],"idle_timeout":"300ms"}`)
			sub := registry.Subscribe(64)
			defer sub.Unsubscribe()
			conn, br := dialClient(t, addr)
			local := conn.LocalAddr().String()
			if _, err := io.WriteString(conn, "CONNECT "+echo+" HTTP/1.1\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("CONNECT: %v %v", resp, err)
			}
			_, _ = io.ReadAll(br) // the idle timeout ends the tunnel
			var sawError bool
			deadline := time.After(10 * time.Second)
			for {
				select {
				case ev := <-sub.Events():
					if ev.Connection.Remote != local {
						continue
					}
					if ev.Type == registry.EventError {
						sawError = true
					}
					if ev.Type == registry.EventClosed {
						if !sawError || !strings.Contains(ev.Error, "idle") {
							t.Fatalf("closed event with error %q (an error event before it: %v); want the idle timeout", ev.Error, sawError)
						}
						return
					}
				case <-deadline:
					t.Fatal("no closed event")
				}
			}
		})
	}
}

// TestNo100ForHTTP10: an HTTP/1.0 client that sends Expect: 100-continue
// gets no 100 (RFC 9110 §15.2: a server must not send a 1xx to HTTP/1.0),
// only the final response.
func TestNo100ForHTTP10(t *testing.T) {
	origin := testutil.ServeLoopback(t, func(c net.Conn) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		_, _ = io.WriteString(c, "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	addr := serveHTTP(t, `{"allow":["127.0.0.1"]}`)
	conn, br := dialClient(t, addr)
	if _, err := io.WriteString(conn, "POST http://"+origin+"/ HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"); err != nil {
		t.Fatal(err)
	}
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(line, " 200 ") {
		t.Fatalf("an HTTP/1.0 client got %q first, want the 200", line)
	}
}

// TestLingerBytesCounted: the bytes read from a client while its
// connection lingers (a request refused before its body was read) count in
// bytes_received_total, with every other byte read from clients.
func TestLingerBytesCounted(t *testing.T) {
	addr := serveHTTP(t, `{}`)
	before := promtest.ToFloat64(metrics.BytesReceived)
	conn, br := dialClient(t, addr)
	body := strings.Repeat("x", 100_000)
	req := "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusMethodNotAllowed || !resp.Close {
		t.Fatalf("status %d, close %v; want 405 and a close", resp.StatusCode, resp.Close)
	}
	_, _ = io.ReadAll(br)
	// the client sees the end when the linger begins: wait for it to read
	// the rest
	received := func() float64 { return promtest.ToFloat64(metrics.BytesReceived) - before }
	testutil.WaitFor(t, 5*time.Second, "the lingering connection's bytes counted", func() bool { return received() >= float64(len(req)) })
	if got := received(); got != float64(len(req)) {
		t.Fatalf("bytes_received_total grew by %v, the client sent %d", got, len(req))
	}
}

// TestRefusedConnectEarlyData: a CONNECT that is refused, from a client
// that sent its ClientHello right after the request head, gets its 403 and
// the connection's end; the ClientHello is not read as another request (no
// 400, nothing more counted). A refused CONNECT with nothing after it keeps
// the connection for the next request.
func TestRefusedConnectEarlyData(t *testing.T) {
	addr := serveHTTP(t, `{}`)
	kinds := []string{metrics.KindNotAllowed, metrics.KindHTTPRequest}
	count := func() map[string]float64 {
		m := map[string]float64{}
		for _, k := range kinds {
			m[k] = promtest.ToFloat64(metrics.Errors.WithLabelValues(k))
		}
		return m
	}
	before := count()
	conn, br := dialClient(t, addr)
	clientHello := "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + string(make([]byte, 40)) + "\n" + string(make([]byte, 119))
	if _, err := io.WriteString(conn, "CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n"+clientHello); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusForbidden || !resp.Close {
		t.Fatalf("status %d, close %v; want 403 and the connection's end", resp.StatusCode, resp.Close)
	}
	if rest, _ := io.ReadAll(br); len(rest) > 0 {
		t.Errorf("after the 403, the proxy answered the ClientHello: %q", rest)
	}
	after := count()
	if after[metrics.KindNotAllowed]-before[metrics.KindNotAllowed] != 1 || after[metrics.KindHTTPRequest] != before[metrics.KindHTTPRequest] {
		t.Errorf("errors_total grew by %v not_allowed, %v http_request; want 1 and 0",
			after[metrics.KindNotAllowed]-before[metrics.KindNotAllowed], after[metrics.KindHTTPRequest]-before[metrics.KindHTTPRequest])
	}

	// nothing after the head: the connection serves the next request
	conn, br = dialClient(t, addr)
	for i := range 2 {
		if _, err := io.WriteString(conn, "CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatalf("request %d on one connection: %v", i, err)
		}
		_, _ = io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusForbidden || resp.Close {
			t.Fatalf("request %d: status %d, close %v; want 403 keeping the connection", i, resp.StatusCode, resp.Close)
		}
	}
}

// TestTLSHandshakeTimeoutKind: an https:// destination that accepts the
// connection but never answers the TLS handshake is a connect that took
// longer than connect_timeout: 504, counted as kind timeout (not
// response_timeout, which is for a response header that is late).
func TestTLSHandshakeTimeoutKind(t *testing.T) {
	silent := testutil.ServeLoopback(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	addr := serveHTTP(t, `{"allow":["127.0.0.1"],"connect_timeout":"300ms","response_timeout":"30s"}`)
	timeout := metrics.Errors.WithLabelValues(metrics.KindTimeout)
	respTimeout := metrics.Errors.WithLabelValues(metrics.KindResponseTimeout)
	beforeT, beforeR := promtest.ToFloat64(timeout), promtest.ToFloat64(respTimeout)
	conn, br := dialClient(t, addr)
	if _, err := io.WriteString(conn, "GET https://"+silent+"/ HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("status %d %q, want 504", resp.StatusCode, body)
	}
	// the error is counted after the answer is written
	grew := func() (float64, float64) {
		return promtest.ToFloat64(timeout) - beforeT, promtest.ToFloat64(respTimeout) - beforeR
	}
	testutil.WaitFor(t, 5*time.Second, "the error counted", func() bool { dt, dr := grew(); return dt+dr > 0 })
	if dt, dr := grew(); dt != 1 || dr != 0 {
		t.Fatalf("errors_total: timeout +%v, response_timeout +%v; want timeout +1", dt, dr)
	}
}

// TestEarlyResponseKeepAlive: when the destination answers before it read
// the request body, the response head tells the truth about the
// connection. A client that expected 100 Continue and never got it is told
// the connection closes (it may still send the body, or not: what follows is
// unknown). A client that sent its body at once keeps its connection for the
// next request (the body went out with the head, into the destination's
// socket; a body the transport gives up on halfway is read to its end by
// the proxy, up to maxBodyDiscard, which this test cannot force). A client
// that expected 100 Continue but sent its body at once gets the same
// closing 401.
func TestEarlyResponseKeepAlive(t *testing.T) {
	origin := testutil.ServeLoopback(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			if req.URL.Path == "/upload" {
				// refused at once, without reading the body
				_, _ = io.WriteString(c, "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
				return
			}
			_, _ = io.Copy(io.Discard, req.Body)
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	addr := serveHTTP(t, `{"allow":["127.0.0.1"]}`)
	body := strings.Repeat("x", 1000)
	for _, tc := range []struct {
		name          string
		expect, hasty bool // Expect: 100-continue; the body sent at once all the same
	}{{"expect", true, false}, {"expect_hasty", true, true}, {"no_expect", false, true}} {
		expect := tc.expect
		t.Run(tc.name, func(t *testing.T) {
			conn, br := dialClient(t, addr)
			head := "POST http://" + origin + "/upload HTTP/1.1\r\nHost: " + origin + "\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n"
			if expect {
				head += "Expect: 100-continue\r\n"
			}
			msg := head + "\r\n"
			if tc.hasty {
				msg += body
			}
			if _, err := io.WriteString(conn, msg); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodPost})
			if err != nil {
				t.Fatal(err) // a close with the body unread would reset the connection under the 401
			}
			_, _ = io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d, want the destination's 401", resp.StatusCode)
			}
			if expect {
				if !resp.Close {
					t.Fatal("a 401 to a request whose body never went keeps the connection: what the client sends next is unknown")
				}
				return
			}
			if resp.Close {
				t.Fatal("the proxy closes a connection whose body it could read")
			}
			if _, err := io.WriteString(conn, "GET http://"+origin+"/next HTTP/1.1\r\nHost: "+origin+"\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			resp, err = http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("the next request on the connection the 401 kept: %v", err)
			}
			_, _ = io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("the next request: status %d", resp.StatusCode)
			}
		})
	}
}
