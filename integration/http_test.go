package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/logging"
	_ "github.com/mholt/caddy-l4/modules/l4subroute"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// httpRoute is a route matching HTTP requests that proxies them with the
// given wa_http handler.
func httpRoute(handler obj) obj {
	handler["handler"] = "wa_http"
	return obj{"match": []obj{{"wa_http": obj{}}}, "handle": []obj{handler}}
}

// httpSeen is what the origin server saw of a request, as it reports it.
type httpSeen struct {
	Method, URI, Host string
	Header            http.Header
	BodyLen           int64
	BodySHA           string
}

// startOrigin starts a loopback HTTP server (TLS when tlsOn) whose /echo
// answers with what it saw of the request as JSON, plus hop-by-hop fields
// that the proxy must not relay. Other paths go to extra.
func startOrigin(t *testing.T, tlsOn bool, extra http.Handler) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		w.Header().Set("Connection", "X-Hop-Resp")
		w.Header().Set("X-Hop-Resp", "secret")
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(httpSeen{
			Method: r.Method, URI: r.RequestURI, Host: r.Host, Header: r.Header,
			BodyLen: n, BodySHA: hex.EncodeToString(h.Sum(nil)),
		})
	})
	if extra != nil {
		mux.Handle("/", extra)
	}
	var srv *httptest.Server
	if tlsOn {
		srv = httptest.NewTLSServer(mux)
	} else {
		srv = httptest.NewServer(mux)
	}
	t.Cleanup(srv.Close)
	return srv
}

// proxyClient returns an HTTP client that uses the proxy at listen (with
// credentials when userPass is given), trusting origin's certificate when
// it has one, and at most one connection to the proxy.
func proxyClient(t *testing.T, listen string, origin *httptest.Server, userPass ...string) *http.Client {
	t.Helper()
	u := &url.URL{Scheme: "http", Host: listen}
	if len(userPass) == 2 {
		u.User = url.UserPassword(userPass[0], userPass[1])
	}
	tr := &http.Transport{Proxy: http.ProxyURL(u), MaxConnsPerHost: 1, DisableCompression: true}
	if origin != nil && origin.TLS != nil {
		tr.TLSClientConfig = origin.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// getSeen GETs target through client and decodes what the origin saw.
func getSeen(t *testing.T, client *http.Client, target string, hdr http.Header) (httpSeen, *http.Response) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, target, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("GET %s through the proxy: %v", target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s through the proxy: status %d, %q, %v", target, resp.StatusCode, body, err)
	}
	var seen httpSeen
	if err := json.Unmarshal(body, &seen); err != nil {
		t.Fatalf("origin reply %q: %v", body, err)
	}
	return seen, resp
}

// rawExchange writes request on a new connection to listen and reads one
// response (to a request with method, for HEAD) and its body.
func rawExchange(t *testing.T, listen, request string) (*http.Response, string, *bufio.Reader, net.Conn) {
	t.Helper()
	conn := dial(t, listen)
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	method, _, _ := strings.Cut(request, " ")
	resp, body := readResponse(t, br, method)
	return resp, body, br, conn
}

// readResponse reads a response to a request with method from br.
func readResponse(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the proxy's response: %v", err)
	}
	if method == http.MethodConnect && resp.StatusCode/100 == 2 {
		return resp, "" // the tunnel follows
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the proxy's response body: %v", err)
	}
	return resp, string(body)
}

// assertReply checks a response the proxy generated: status, a one-line
// plain-text body containing reason.
func assertReply(t *testing.T, resp *http.Response, body string, status int, reason string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d (%q), want %d", resp.StatusCode, body, status)
	}
	if !strings.HasSuffix(body, "\n") || strings.Count(body, "\n") != 1 || !strings.Contains(body, reason) {
		t.Fatalf("body %q: want one line containing %q", body, reason)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; charset=utf-8" {
		t.Fatalf("Content-Type %q", ct)
	}
}

// TestHTTPProxy: absolute-form requests and CONNECT+TLS through wa_http,
// with Go's HTTP client, directly and through caddy-l4's SOCKS5 server (to
// a name the exit resolves).
func TestHTTPProxy(t *testing.T) {
	origin := startOrigin(t, false, nil)
	tlsOrigin := startOrigin(t, true, nil)
	_, port, _ := net.SplitHostPort(origin.Listener.Addr().String())
	_, tlsPort, _ := net.SplitHostPort(tlsOrigin.Listener.Addr().String())
	socks := testutil.FreeAddr(t)

	for _, tc := range []struct {
		name, host string
		handler    obj
	}{
		{"direct", "127.0.0.1", obj{"allow": []string{"127.0.0.1"}}},
		{"socks5", "localhost", obj{"allow": []string{"localhost"}, "via": socksVia(socks)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			listen := testutil.FreeAddr(t)
			c := testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(tc.handler)}, socks, nil))
			total0 := metric(t, c, "whatsapp_proxy_connections_total")

			t.Run("absolute-form", func(t *testing.T) {
				client := proxyClient(t, listen, nil)
				seen, resp := getSeen(t, client, "http://"+tc.host+":"+port+"/echo?q=1", nil)
				if seen.URI != "/echo?q=1" || seen.Host != tc.host+":"+port || seen.Method != "GET" {
					t.Errorf("origin saw %s %s Host %s", seen.Method, seen.URI, seen.Host)
				}
				if got := seen.Header.Get("Via"); got != "1.1 waproxy" {
					t.Errorf("origin saw Via %q, want 1.1 waproxy", got)
				}
				if got := resp.Header.Get("Via"); got != "1.1 waproxy" {
					t.Errorf("client saw Via %q, want 1.1 waproxy", got)
				}
				if got := resp.Header.Get("X-Hop-Resp"); got != "" {
					t.Errorf("a response field named in Connection reached the client: %q", got)
				}
				if got := resp.Header.Get("Keep-Alive"); got != "" {
					t.Errorf("Keep-Alive reached the client: %q", got)
				}
			})
			t.Run("CONNECT+TLS", func(t *testing.T) {
				client := proxyClient(t, listen, tlsOrigin)
				// httptest's certificate names example.com and 127.0.0.1
				client.Transport.(*http.Transport).TLSClientConfig.ServerName = "example.com"
				seen, resp := getSeen(t, client, "https://"+tc.host+":"+tlsPort+"/echo", nil)
				if resp.TLS == nil || seen.Method != "GET" || seen.URI != "/echo" {
					t.Errorf("origin saw %s %s, TLS %v", seen.Method, seen.URI, resp.TLS != nil)
				}
				if got := seen.Header.Get("Via"); got != "" {
					t.Errorf("a tunnelled request was changed: Via %q", got)
				}
			})
			waitMetric(t, c, "whatsapp_proxy_connections_total", total0+2)
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="http"}`, 0)
			waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
		})
	}
}

// TestHTTPHygiene: RFC 9110 forward-proxy rules, checked on the exact bytes
// a client sends: hop-by-hop fields, fields named in Connection,
// Proxy-Connection and Proxy-Authorization are not forwarded; Via is
// appended; TE: trailers is kept; the header rules apply.
func TestHTTPHygiene(t *testing.T) {
	origin := startOrigin(t, false, nil)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{
		"allow": []string{"127.0.0.1"},
		"headers": obj{
			"request":  obj{"set": obj{"X-Set": []string{"{l4.wa_http.method} via proxy"}}, "add": obj{"X-Added": []string{"1"}}, "delete": []string{"X-Private"}},
			"response": obj{"set": obj{"X-Proxy": []string{"waproxy"}}, "delete": []string{"Date"}},
		},
	})}, "", nil))
	target := "http://" + origin.Listener.Addr().String() + "/echo"
	resp, body, _, _ := rawExchange(t, listen, "GET "+target+" HTTP/1.1\r\n"+
		"Host: "+origin.Listener.Addr().String()+"\r\n"+
		"Connection: keep-alive, X-Hop\r\n"+
		"X-Hop: hop\r\n"+
		"Keep-Alive: timeout=5\r\n"+
		"Proxy-Connection: keep-alive\r\n"+
		"Proxy-Authorization: Basic dTpw\r\n"+
		"TE: trailers, deflate\r\n"+
		"Upgrade: websocket\r\n"+
		"Via: 1.0 upstream-proxy\r\n"+
		"X-Private: secret\r\n"+
		"X-Set: from client\r\n"+
		"X-End-To-End: kept\r\n\r\n")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var seen httpSeen
	if err := json.Unmarshal([]byte(body), &seen); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{"X-Hop", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "Upgrade", "X-Private"} {
		if v, ok := seen.Header[gone]; ok {
			t.Errorf("the origin received %s: %q", gone, v)
		}
	}
	for field, want := range map[string]string{
		"Via": "1.0 upstream-proxy, 1.1 waproxy", "Te": "trailers", "X-End-To-End": "kept",
		"X-Set": "GET via proxy", "X-Added": "1",
	} {
		if got := strings.Join(seen.Header.Values(field), ", "); got != want {
			t.Errorf("the origin received %s %q, want %q", field, got, want)
		}
	}
	if got := seen.Header.Get("User-Agent"); got != "" {
		t.Errorf("the proxy added User-Agent %q", got)
	}
	if resp.Header.Get("X-Proxy") != "waproxy" || resp.Header.Get("Date") != "" || resp.Header.Get("Via") != "1.1 waproxy" {
		t.Errorf("response rules not applied: %v", resp.Header)
	}
	if resp.Header.Get("X-Hop-Resp") != "" || resp.Header.Get("Keep-Alive") != "" {
		t.Errorf("hop-by-hop response fields reached the client: %v", resp.Header)
	}
}

// TestHTTPKeepAlive: one client connection carries requests to two origins
// (and CONNECT to a third at the end); the proxy keeps it open between
// them, and a pipelined request waits its turn.
func TestHTTPKeepAlive(t *testing.T) {
	a := startOrigin(t, false, nil)
	b := startOrigin(t, false, nil)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{"allow": []string{"127.0.0.1"}})}, "", nil))
	total0 := metric(t, c, "whatsapp_proxy_connections_total")

	client := proxyClient(t, listen, nil)
	var reused atomic.Int32
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		if info.Reused {
			reused.Add(1)
		}
	}}
	for i := range 6 {
		origin := a
		if i%2 == 1 {
			origin = b
		}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace),
			http.MethodPost, origin.URL+"/echo", strings.NewReader(strings.Repeat("x", i*1000)))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		var seen httpSeen
		if err := json.NewDecoder(resp.Body).Decode(&seen); err != nil || seen.BodyLen != int64(i*1000) {
			t.Fatalf("request %d: origin saw %d body bytes (%v)", i, seen.BodyLen, err)
		}
		resp.Body.Close()
	}
	if got := reused.Load(); got != 5 {
		t.Errorf("%d of 5 later requests reused the connection", got)
	}
	if got := metric(t, c, "whatsapp_proxy_connections_total") - total0; got != 1 {
		t.Errorf("the client opened %v connections to the proxy, want 1", got)
	}

	// Two requests to two origins written at once on one connection.
	conn := dial(t, listen)
	pipelined := ""
	for _, o := range []*httptest.Server{a, b} {
		host := o.Listener.Addr().String()
		pipelined += "GET http://" + host + "/echo HTTP/1.1\r\nHost: " + host + "\r\n\r\n"
	}
	if _, err := io.WriteString(conn, pipelined); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	for i, o := range []*httptest.Server{a, b} {
		resp, body := readResponse(t, br, "GET")
		var seen httpSeen
		if err := json.Unmarshal([]byte(body), &seen); err != nil || resp.StatusCode != 200 || seen.Host != o.Listener.Addr().String() {
			t.Fatalf("pipelined response %d: status %d host %q (%v)", i, resp.StatusCode, seen.Host, err)
		}
	}
}

// TestHTTPStreaming: bodies flow through the proxy as they come, in both
// directions: the origin gets the start of an upload before the client has
// sent the rest, and the client gets the start of a download before the
// origin has written the rest. Each test waits for the first part on the
// other side before sending more, so a proxy that buffered whole bodies
// would stall it. The bodies are 32 MiB, chunked or with a length.
func TestHTTPStreaming(t *testing.T) {
	const size = 32 << 20
	firstPart := []byte("first part\n")
	gotFirst := make(chan struct{}, 1)
	release := make(chan struct{}, 1)
	extra := http.NewServeMux()
	extra.HandleFunc("/upload", func(w http.ResponseWriter, r *http.Request) {
		first := make([]byte, len(firstPart))
		if _, err := io.ReadFull(r.Body, first); err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		gotFirst <- struct{}{}
		h := sha256.New()
		h.Write(first)
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		fmt.Fprintf(w, "%d %x %v", n+int64(len(first)), h.Sum(nil), r.TransferEncoding)
	})
	extra.HandleFunc("/download", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("length") != "" {
			w.Header().Set("Content-Length", strconv.Itoa(len(firstPart)+size))
		}
		_, _ = w.Write(firstPart)
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-time.After(20 * time.Second):
			return
		}
		_, _ = w.Write(pattern(size))
	})
	origin := startOrigin(t, false, extra)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{"allow": []string{"127.0.0.1"}})}, "", nil))
	client := proxyClient(t, listen, nil)

	// drain drops a signal a failed subtest may have left behind, so each
	// subtest waits for its own
	drain := func() {
		for _, ch := range []chan struct{}{gotFirst, release} {
			select {
			case <-ch:
			default:
			}
		}
	}
	for _, withLength := range []bool{false, true} {
		t.Run(fmt.Sprintf("upload/length=%v", withLength), func(t *testing.T) {
			drain()
			pr, pw := io.Pipe()
			req, _ := http.NewRequest(http.MethodPost, origin.URL+"/upload", pr)
			if withLength {
				req.ContentLength = int64(len(firstPart) + size)
			}
			go func() {
				if _, err := pw.Write(firstPart); err != nil {
					return
				}
				select {
				case <-gotFirst:
				case <-time.After(20 * time.Second):
					pw.CloseWithError(fmt.Errorf("the origin did not get the first part: the proxy buffers uploads"))
					return
				}
				_, _ = pw.Write(pattern(size))
				pw.Close()
			}()
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			want := sha256.Sum256(append(append([]byte{}, firstPart...), pattern(size)...))
			wantTE := "[chunked]"
			if withLength {
				wantTE = "[]"
			}
			if string(got) != fmt.Sprintf("%d %x %s", len(firstPart)+size, want, wantTE) {
				t.Fatalf("origin reported %q", got)
			}
		})
		t.Run(fmt.Sprintf("download/length=%v", withLength), func(t *testing.T) {
			drain()
			target := origin.URL + "/download"
			if withLength {
				target += "?length=1"
			}
			resp, err := client.Get(target)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			first := make([]byte, len(firstPart))
			if _, err := io.ReadFull(resp.Body, first); err != nil || !bytes.Equal(first, firstPart) {
				t.Fatalf("first part %q, %v", first, err)
			}
			release <- struct{}{}
			h := sha256.New()
			if n, err := io.Copy(h, resp.Body); err != nil || n != size {
				t.Fatalf("read %d bytes after the first part, %v; want %d", n, err, size)
			}
			if want := sha256.Sum256(pattern(size)); !bytes.Equal(h.Sum(nil), want[:]) {
				t.Fatal("the download differs from what the origin sent")
			}
			if withLength != (resp.ContentLength == int64(len(firstPart)+size)) {
				t.Errorf("Content-Length %d", resp.ContentLength)
			}
		})
	}
}

var patternCache atomic.Pointer[[]byte]

// pattern returns n deterministic bytes (cached for the largest n asked).
func pattern(n int) []byte {
	if p := patternCache.Load(); p != nil && len(*p) >= n {
		return (*p)[:n]
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	patternCache.Store(&b)
	return b
}

// TestHTTPClientLeaves: clients that vanish in the middle of a request body,
// of a response body or of a tunnel leave no socket or gauge behind.
func TestHTTPClientLeaves(t *testing.T) {
	extra := http.NewServeMux()
	extra.HandleFunc("/sink", func(w http.ResponseWriter, r *http.Request) { _, _ = io.Copy(io.Discard, r.Body) })
	extra.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		for range 64 {
			if _, err := w.Write(pattern(1 << 20)); err != nil {
				return
			}
		}
	})
	origin := startOrigin(t, false, extra)
	edge := testutil.StartEcho(t)
	host := origin.Listener.Addr().String()
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{"allow": []string{"127.0.0.1"}})}, "", nil))

	warm := proxyClient(t, listen, nil)
	getSeen(t, warm, origin.URL+"/echo", nil)
	warm.Transport.(*http.Transport).CloseIdleConnections()
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
	base := openFDs(t)

	for i := range 30 {
		conn, err := net.Dial("tcp", listen)
		if err != nil {
			t.Fatal(err)
		}
		tc := conn.(*net.TCPConn)
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		switch i % 3 {
		case 0: // gone in the middle of a 10 MB upload
			_, _ = io.WriteString(tc, "POST http://"+host+"/sink HTTP/1.1\r\nHost: "+host+"\r\nContent-Length: 10000000\r\n\r\n")
			_, _ = tc.Write(pattern(100_000))
		case 1: // gone in the middle of a 64 MiB download
			_, _ = io.WriteString(tc, "GET http://"+host+"/big HTTP/1.1\r\nHost: "+host+"\r\n\r\n")
			if _, err := io.ReadFull(tc, make([]byte, 200_000)); err != nil {
				t.Fatalf("download: %v", err)
			}
		case 2: // gone in the middle of a tunnel
			_, _ = io.WriteString(tc, "CONNECT "+edge.Addr+" HTTP/1.1\r\n\r\n")
			br := bufio.NewReader(tc)
			if resp, _ := readResponse(t, br, "CONNECT"); resp.StatusCode != 200 {
				t.Fatalf("CONNECT: %d", resp.StatusCode)
			}
			_, _ = tc.Write(pattern(100_000))
			if _, err := io.ReadFull(br, make([]byte, 50_000)); err != nil {
				t.Fatalf("tunnel: %v", err)
			}
		}
		_ = tc.SetLinger(0)
		tc.Close()
	}
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
	waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="http"}`, 0)
	testutil.WaitFor(t, 10*time.Second, "open file descriptors back to the baseline", func() bool {
		return openFDs(t) <= base
	})
	// and the proxy still works
	getSeen(t, proxyClient(t, listen, nil), origin.URL+"/echo", nil)
}

// TestHTTPNoOpenRelay: destinations outside the allowlist, the admin
// endpoint, the cloud metadata address and names that resolve to this host
// are refused with 403, and never dialled.
func TestHTTPNoOpenRelay(t *testing.T) {
	// watched counts connections: a refused request must never reach it
	var accepted atomic.Int32
	watched := testutil.ServeLoopback(t, func(c net.Conn) {
		accepted.Add(1)
		_, _ = io.Copy(c, c)
	})
	_, wport, _ := net.SplitHostPort(watched)

	defaults, star, byName, byNameAndIP := testutil.FreeAddr(t), testutil.FreeAddr(t), testutil.FreeAddr(t), testutil.FreeAddr(t)
	servers := obj{}
	for name, s := range map[string]struct {
		listen string
		allow  []string
	}{
		"defaults": {defaults, nil}, "star": {star, []string{"*"}},
		"name": {byName, []string{"localhost"}}, "nameip": {byNameAndIP, []string{"localhost", "127.0.0.1", "::1"}},
	} {
		h := obj{}
		if s.allow != nil {
			h["allow"] = s.allow
		}
		servers[name] = obj{"listen": []string{s.listen}, "routes": []obj{httpRoute(h)}}
	}
	cfg, _ := json.Marshal(obj{
		"logging": obj{"logs": obj{"default": obj{"level": "ERROR"}}},
		"apps":    obj{"layer4": obj{"servers": servers}},
	})
	c := testutil.StartCaddy(t, string(cfg))
	_, adminPort, _ := net.SplitHostPort(c.Admin)

	for _, tc := range []struct {
		name, listen, target, reason string
	}{
		{"not allowed", defaults, "example.org:443", "example.org is not allowed"},
		{"admin endpoint", defaults, "127.0.0.1:" + adminPort, "127.0.0.1 is a loopback address"},
		{"cloud metadata", defaults, "169.254.169.254:80", "169.254.169.254 is a link-local address"},
		{"watched, not allowed", defaults, "127.0.0.1:" + wport, "loopback"},
		{"star: loopback", star, "127.0.0.1:" + wport, "loopback"},
		{"star: admin endpoint", star, "127.0.0.1:" + adminPort, "loopback"},
		{"star: metadata", star, "169.254.169.254:80", "link-local"},
		{"star: IPv6 loopback", star, "[::1]:" + wport, "::1 is a loopback address"},
		{"star: private", star, "10.0.0.1:80", "10.0.0.1 is a private address"},
		{"star: unspecified", star, "0.0.0.0:" + wport, "unspecified"},
		{"name resolving to loopback", byName, "localhost:" + wport, "resolves to an internal address"},
		{"admin by name", byName, "localhost:" + adminPort, "resolves to an internal address"},
	} {
		for _, form := range []string{"CONNECT", "absolute-form"} {
			t.Run(tc.name+"/"+form, func(t *testing.T) {
				series := `whatsapp_proxy_errors_total{kind="not_allowed"}`
				before := metric(t, c, series)
				var request string
				if form == "CONNECT" {
					request = "CONNECT " + tc.target + " HTTP/1.1\r\nHost: " + tc.target + "\r\n\r\n"
				} else {
					request = "GET http://" + tc.target + "/config/ HTTP/1.1\r\nHost: " + tc.target + "\r\n\r\n"
				}
				resp, body, _, _ := rawExchange(t, tc.listen, request)
				assertReply(t, resp, body, http.StatusForbidden, tc.reason)
				waitMetric(t, c, series, before+1)
			})
		}
	}
	if n := accepted.Load(); n != 0 {
		t.Fatalf("refused requests reached the watched listener %d times", n)
	}

	// Allowed explicitly, the same name works.
	resp, _, br, conn := rawExchange(t, byNameAndIP, "CONNECT localhost:"+wport+" HTTP/1.1\r\n\r\n")
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT localhost with 127.0.0.1 allowed: %d", resp.StatusCode)
	}
	exchangeBuffered(t, conn, br, []byte("through the tunnel"))
}

// exchangeBuffered is exchange for a connection read through br.
func exchangeBuffered(t *testing.T, conn net.Conn, br *bufio.Reader, msg []byte) {
	t.Helper()
	if _, err := conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo %q, %v; want %q", got, err, msg)
	}
}

// TestHTTPAuth: with `auth basic`, requests without the credentials or with
// wrong ones get 407 and a challenge; with them they pass, and the
// credentials are not forwarded. The credentials come from the environment.
func TestHTTPAuth(t *testing.T) {
	t.Setenv("WAPROXY_TEST_PROXY_USER", "alice")
	t.Setenv("WAPROXY_TEST_PROXY_PASS", "s3cret:with colon")
	origin := startOrigin(t, false, nil)
	tlsOrigin := startOrigin(t, true, nil)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{
		"allow": []string{"127.0.0.1"},
		"auth":  obj{"basic": obj{"username": "{env.WAPROXY_TEST_PROXY_USER}", "password": "{env.WAPROXY_TEST_PROXY_PASS}"}},
	})}, "", nil))
	series := `whatsapp_proxy_errors_total{kind="proxy_auth"}`

	t.Run("challenge, then credentials on the same connection", func(t *testing.T) {
		// what browsers do: a first request without credentials, then the
		// same with them once challenged, on the connection kept open
		host := origin.Listener.Addr().String()
		request := "GET http://" + host + "/echo HTTP/1.1\r\nHost: " + host + "\r\n"
		resp, body, br, conn := rawExchange(t, listen, request+"\r\n")
		assertReply(t, resp, body, http.StatusProxyAuthRequired, "proxy authentication required")
		if resp.Close {
			t.Fatal("the 407 closes the connection")
		}
		creds := base64.StdEncoding.EncodeToString([]byte("alice:s3cret:with colon"))
		if _, err := io.WriteString(conn, request+"Proxy-Authorization: Basic "+creds+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if resp, body = readResponse(t, br, "GET"); resp.StatusCode != http.StatusOK {
			t.Fatalf("with credentials: %d %s", resp.StatusCode, body)
		}
	})

	for _, tc := range []struct {
		name     string
		userPass []string
		want     int
	}{
		{"no credentials", nil, http.StatusProxyAuthRequired},
		{"wrong password", []string{"alice", "guess"}, http.StatusProxyAuthRequired},
		{"wrong user", []string{"bob", "s3cret:with colon"}, http.StatusProxyAuthRequired},
		{"right credentials", []string{"alice", "s3cret:with colon"}, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := metric(t, c, series)
			client := proxyClient(t, listen, tlsOrigin, tc.userPass...)
			resp, err := client.Get(origin.URL + "/echo")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("plain: status %d (%s), want %d", resp.StatusCode, body, tc.want)
			}
			tlsResp, tlsErr := client.Get(tlsOrigin.URL + "/echo")
			if tlsErr == nil {
				tlsResp.Body.Close()
			}
			if tc.want == http.StatusOK {
				var seen httpSeen
				if err := json.Unmarshal(body, &seen); err != nil || seen.Header.Get("Proxy-Authorization") != "" {
					t.Fatalf("origin saw Proxy-Authorization %q (%v)", seen.Header.Get("Proxy-Authorization"), err)
				}
				if tlsErr != nil {
					t.Fatalf("CONNECT with credentials: %v", tlsErr)
				}
				if got := metric(t, c, series); got != before {
					t.Errorf("proxy_auth grew by %v", got-before)
				}
				return
			}
			if got := resp.Header.Get("Proxy-Authenticate"); got != `Basic realm="waproxy", charset="UTF-8"` {
				t.Errorf("Proxy-Authenticate %q", got)
			}
			if tlsErr == nil || !strings.Contains(tlsErr.Error(), "Proxy Authentication Required") {
				t.Errorf("CONNECT without valid credentials: %v; want a 407", tlsErr)
			}
			waitMetric(t, c, series, before+2)
		})
	}
}

// TestHTTPFailures: each failure is answered with its status and a one-line
// body, counted once in errors_total{kind} and logged once.
func TestHTTPFailures(t *testing.T) {
	closedPort := strconv.Itoa(testutil.FreePort(t))
	// silent accepts connections and never answers: no HTTP response, no SOCKS5 reply
	silent := testutil.ServeLoopback(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	// garbage answers any request with something that is not HTTP
	garbage := bannerServer(t, "SSH-2.0-not-http\r\n\r\n")
	origin := startOrigin(t, false, nil)

	logFile := filepath.Join(t.TempDir(), "caddy.log")
	listen, viaSilent := testutil.FreeAddr(t), testutil.FreeAddr(t)
	local := []string{"127.0.0.1"}
	cfg, _ := json.Marshal(obj{
		"logging": obj{"logs": obj{"default": obj{"level": "WARN", "writer": obj{"output": "file", "filename": logFile}}}},
		"apps": obj{"layer4": obj{"servers": obj{
			// origin_form reject: the origin-form case below wants the 400
			"proxy": obj{"listen": []string{listen}, "routes": []obj{httpRoute(obj{"allow": local, "response_timeout": "300ms", "idle_timeout": "1s", "origin_form": "reject"})}},
			"via": obj{"listen": []string{viaSilent}, "routes": []obj{httpRoute(obj{
				"allow": local, "connect_timeout": "300ms", "via": socksVia(silent),
			})}},
		}}},
	})
	c := testutil.StartCaddy(t, string(cfg))
	host := origin.Listener.Addr().String()

	for _, tc := range []struct {
		name, listen, request string
		status                int
		kind, reason, logged  string
	}{
		{"destination refused", listen, "GET http://127.0.0.1:" + closedPort + "/ HTTP/1.1\r\nHost: x\r\n\r\n",
			502, "dial", "could not be reached", "127.0.0.1:" + closedPort},
		{"CONNECT refused", listen, "CONNECT 127.0.0.1:" + closedPort + " HTTP/1.1\r\n\r\n",
			502, "dial", "could not be reached", "127.0.0.1:" + closedPort},
		{"no response in time", listen, "GET http://" + silent + "/ HTTP/1.1\r\nHost: x\r\n\r\n",
			504, "response_timeout", "did not answer in time", silent},
		{"connect timeout", viaSilent, "GET http://" + host + "/echo HTTP/1.1\r\nHost: x\r\n\r\n",
			504, "timeout", "did not answer in time", host},
		{"CONNECT connect timeout", viaSilent, "CONNECT " + host + " HTTP/1.1\r\n\r\n",
			504, "timeout", "did not answer in time", host},
		{"not an HTTP response", listen, "GET http://" + garbage + "/ HTTP/1.1\r\nHost: x\r\n\r\n",
			502, "upstream", "could not be reached", garbage},
		{"malformed header", listen, "GET http://" + host + "/ HTTP/1.1\r\nNo colon here\r\n\r\n",
			400, "http_request", "malformed request", `"status":400`},
		{"origin-form", listen, "GET /echo HTTP/1.1\r\nHost: " + host + "\r\n\r\n",
			400, "http_request", "the target must be an absolute URL", `"target":"/echo"`},
		{"unsupported scheme", listen, "GET ftp://anonymous:hunter2@" + host + "/ HTTP/1.1\r\nHost: x\r\n\r\n",
			400, "http_request", `unsupported URL scheme "ftp"`, `"target":"ftp://anonymous:xxxxx@`},
		{"CONNECT without port", listen, "CONNECT " + "example.com HTTP/1.1\r\n\r\n",
			400, "http_request", "CONNECT needs a host:port target", `"target":"example.com"`},
		{"header too slow", listen, "GET http://" + host + "/echo HTTP/1.1\r\nHost: " + host + "\r\n",
			408, "http_request", "request header not received in time", `"status":408`},
		{"not HTTP/1.x", listen, "GET http://" + host + "/echo HTTP/1.1\r\nHost: " + host + "\r\n\r\n" +
			"GET http://" + host + "/echo HTTP/2.0\r\nHost: " + host + "\r\n\r\n",
			505, "http_request", "only HTTP/1.x is supported", `"status":505`},
		{"header too large", listen, "GET http://" + host + "/ HTTP/1.1\r\nCookie: " + strings.Repeat("c", 70<<10) + "\r\n\r\n",
			431, "http_request", "request header larger than 65536 bytes", `"status":431`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			series := `whatsapp_proxy_errors_total{kind="` + tc.kind + `"}`
			before := metric(t, c, series)
			logsBefore := countLines(t, logFile, tc.logged)
			resp, body, br, conn := rawExchange(t, tc.listen, tc.request)
			if tc.status == 505 { // the answer to the first, valid, request comes first
				resp, body = readResponse(t, br, "GET")
			}
			assertReply(t, resp, body, tc.status, tc.reason)
			if !resp.Close {
				t.Errorf("no Connection: close after a failure")
			}
			expectClosed(t, conn, 5*time.Second)
			waitMetric(t, c, series, before+1)
			testutil.WaitFor(t, 5*time.Second, "the failure logged", func() bool { return countLines(t, logFile, tc.logged) > logsBefore })
			if n := countLines(t, logFile, tc.logged) - logsBefore; n != 1 {
				t.Errorf("logged %d times, want once", n)
			}
			if n := countLines(t, logFile, "hunter2"); n != 0 {
				t.Errorf("a password from a request target is in the log")
			}
		})
	}
}

// countLines counts the lines of file that contain s.
func countLines(t *testing.T, file, s string) int {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	n := 0
	for line := range strings.SplitSeq(string(data), "\n") {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

// TestHTTPSharedPort: WhatsApp chat, HTTP proxy requests and anything else
// on one port, arranged as examples/http-proxy.Caddyfile arranges them
// (each byte matcher followed by its negation, nested with subroute).
func TestHTTPSharedPort(t *testing.T) {
	chatEdge := testutil.StartEcho(t)
	fallback := testutil.StartEcho(t)
	origin := startOrigin(t, false, nil)
	listen := testutil.FreeAddr(t)
	local := []string{"127.0.0.1"}
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": chatEdge.Addr, "allow": local}),
		{"match": []obj{{"not": []obj{{"wa_xmpp": obj{}}}}}, "handle": []obj{{"handler": "subroute", "routes": []obj{
			httpRoute(obj{"allow": local}),
			{"match": []obj{{"not": []obj{{"wa_http": obj{}}}}}, "handle": []obj{{"handler": "wa_proxy", "destination": fallback.Addr, "allow": local}}},
		}}}},
	}, "", nil))

	chat := dial(t, listen)
	exchange(t, chat, waHello())
	waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 1)

	getSeen(t, proxyClient(t, listen, nil), origin.URL+"/echo", nil)

	raw := dial(t, listen)
	exchange(t, raw, []byte("SSH-2.0-OpenSSH_9.2\r\n"))
	waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="raw"}`, 1)
}

// TestInteropCurl: curl as the client, through the proxy: plain requests
// (-x), CONNECT (-p, and https), with --proxy-user, and the 407 without.
func TestInteropCurl(t *testing.T) {
	curl := testutil.RequireBinary(t, "curl", "curl")
	origin := startOrigin(t, false, nil)
	tlsOrigin := startOrigin(t, true, nil)
	caFile := filepath.Join(t.TempDir(), "origin.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsOrigin.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{
		"allow": []string{"127.0.0.1"},
		"auth":  obj{"basic": obj{"username": "curl", "password": "p4ss"}},
	})}, "", nil))

	run := func(t *testing.T, args ...string) (string, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, curl, append([]string{"-sS", "-x", "http://" + listen}, args...)...)
		cmd.Env = append(os.Environ(), "http_proxy=", "https_proxy=", "HTTPS_PROXY=", "ALL_PROXY=", "NO_PROXY=")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"plain", []string{origin.URL + "/echo"}},
		{"plain through a tunnel (-p)", []string{"-p", origin.URL + "/echo"}},
		{"https", []string{"--cacert", caFile, tlsOrigin.URL + "/echo"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := run(t, append([]string{"--proxy-user", "curl:p4ss"}, tc.args...)...)
			var seen httpSeen
			if err != nil || json.Unmarshal([]byte(out), &seen) != nil || seen.Method != "GET" || seen.URI != "/echo" {
				t.Fatalf("curl %v: %v\n%s", tc.args, err, out)
			}
			if seen.Header.Get("Proxy-Authorization") != "" {
				t.Fatal("the credentials reached the origin")
			}
			tunnelled := len(tc.args) > 1
			if via := seen.Header.Get("Via"); (via == "1.1 waproxy") == tunnelled {
				t.Errorf("Via %q (tunnelled %v)", via, tunnelled)
			}
		})
	}
	t.Run("no credentials", func(t *testing.T) {
		out, err := run(t, "-o", "/dev/null", "-w", "%{http_code}", origin.URL+"/echo")
		if err != nil || out != "407" {
			t.Fatalf("curl without --proxy-user: %v, %q; want 407", err, out)
		}
		out, err = run(t, "-p", "-o", "/dev/null", "-w", "%{http_connect}", origin.URL+"/echo")
		if err == nil || !strings.HasSuffix(out, "\n407") {
			t.Fatalf("curl -p without --proxy-user: %v, %q; want the CONNECT refused with 407", err, out)
		}
	})
}

// TestHTTPConnectEarlyData: bytes a client sends right behind its CONNECT
// request, without waiting for the 200, reach the destination first.
func TestHTTPConnectEarlyData(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{"allow": []string{"127.0.0.1"}})}, "", nil))
	early := pattern(3000)
	resp, _, br, conn := rawExchange(t, listen, "CONNECT "+edge.Addr+" HTTP/1.1\r\n\r\n"+string(early))
	if resp.StatusCode != 200 || resp.Status != "200 Connection Established" {
		t.Fatalf("CONNECT: %q", resp.Status)
	}
	got := make([]byte, len(early))
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, early) {
		t.Fatalf("the early bytes came back as %d bytes, %v", len(got), err)
	}
	exchangeBuffered(t, conn, br, []byte("and then the rest"))
	conn.Close()
	testutil.WaitFor(t, 5*time.Second, "the edge saw the tunnel end", func() bool { return len(edge.Received()) == 1 })
	if first := edge.Received()[0]; !bytes.HasPrefix(first, early) {
		t.Fatalf("the edge's first bytes are %q..., want the early bytes", first[:min(len(first), 16)])
	}
}

// TestHTTPExpectContinue: a client that sends `Expect: 100-continue` gets
// `100 Continue` once the origin wants the body, sends it, and gets the
// origin's answer; without waiting for any timeout.
func TestHTTPExpectContinue(t *testing.T) {
	origin := startOrigin(t, false, nil)
	host := origin.Listener.Addr().String()
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{"allow": []string{"127.0.0.1"}})}, "", nil))
	body := pattern(100_000)
	conn := dial(t, listen)
	if _, err := io.WriteString(conn, "POST http://"+host+"/echo HTTP/1.1\r\nHost: "+host+
		"\r\nExpect: 100-continue\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := br.ReadString('\n')
	if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("before sending the body: %q, %v; want 100 Continue", line, err)
	}
	if blank, _ := br.ReadString('\n'); blank != "\r\n" {
		t.Fatalf("100 Continue followed by %q", blank)
	}
	if _, err := conn.Write(body); err != nil {
		t.Fatal(err)
	}
	resp, got := readResponse(t, br, "POST")
	var seen httpSeen
	if err := json.Unmarshal([]byte(got), &seen); err != nil || resp.StatusCode != 200 || seen.BodyLen != int64(len(body)) {
		t.Fatalf("status %d, origin saw %d bytes (%v)", resp.StatusCode, seen.BodyLen, err)
	}
	if seen.Header.Get("Expect") != "100-continue" {
		t.Errorf("the origin saw Expect %q", seen.Header.Get("Expect"))
	}
}

// TestHTTPResponseFraming: a response that ends with the origin closing is
// re-chunked so the client's connection stays; trailers are relayed.
func TestHTTPResponseFraming(t *testing.T) {
	closing := closingServer(t, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
	extra := http.NewServeMux()
	extra.HandleFunc("/trailer", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		_, _ = io.WriteString(w, "body with a trailer")
		w.Header().Set("X-Checksum", "abc123")
	})
	origin := startOrigin(t, false, extra)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{httpRoute(obj{"allow": []string{"127.0.0.1"}})}, "", nil))

	conn := dial(t, listen)
	br := bufio.NewReader(conn)
	if _, err := io.WriteString(conn, "GET http://"+closing+"/ HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, body := readResponse(t, br, "GET")
	if body != "until the end" || resp.Close || len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("body %q, close %v, transfer-encoding %v; want the body chunked and the connection kept", body, resp.Close, resp.TransferEncoding)
	}
	host := origin.Listener.Addr().String()
	if _, err := io.WriteString(conn, "GET http://"+host+"/trailer HTTP/1.1\r\nHost: "+host+"\r\nTE: trailers\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, body = readResponse(t, br, "GET")
	if body != "body with a trailer" || resp.Trailer.Get("X-Checksum") != "abc123" {
		t.Fatalf("body %q, trailer %v", body, resp.Trailer)
	}

	// An HTTP/1.0 client gets no chunks: the body ends with the connection.
	resp, body, _, _ = rawExchange(t, listen, "GET http://"+closing+"/ HTTP/1.0\r\n\r\n")
	if body != "until the end" || !resp.Close || len(resp.TransferEncoding) != 0 || resp.ProtoMinor != 0 {
		t.Fatalf("HTTP/1.0: body %q, close %v, transfer-encoding %v, proto %s", body, resp.Close, resp.TransferEncoding, resp.Proto)
	}
}

// closingServer answers each request header with reply and closes the
// connection.
func closingServer(t *testing.T, reply string) string {
	t.Helper()
	return testutil.ServeLoopback(t, func(c net.Conn) {
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			_, _ = io.WriteString(c, reply)
		}
	})
}

// TestHTTPExample: examples/http-proxy.Caddyfile, adapted and run on
// loopback ports, sends HTTP proxy requests on its shared port to wa_http
// (which refuses destinations outside WhatsApp's domains).
func TestHTTPExample(t *testing.T) {
	src, err := os.ReadFile("../examples/http-proxy.Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(src, map[string]any{"filename": "http-proxy.Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	cfg := strings.ReplaceAll(string(adapted), `":5222"`, `"`+listen+`"`)
	cfg = strings.ReplaceAll(cfg, `"127.0.0.1:1080"`, `"`+socks+`"`)
	var m obj
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		t.Fatal(err)
	}
	m["logging"] = obj{"logs": obj{"default": obj{"level": "ERROR"}}}
	quiet, _ := json.Marshal(m)
	c := testutil.StartCaddy(t, string(quiet))

	before := metric(t, c, `whatsapp_proxy_errors_total{kind="not_allowed"}`)
	_, adminPort, _ := net.SplitHostPort(c.Admin)
	for _, request := range []string{
		"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
		"CONNECT 127.0.0.1:" + adminPort + " HTTP/1.1\r\n\r\n",
	} {
		resp, body, _, _ := rawExchange(t, listen, request)
		assertReply(t, resp, body, http.StatusForbidden, "not")
	}
	waitMetric(t, c, `whatsapp_proxy_errors_total{kind="not_allowed"}`, before+2)
}
