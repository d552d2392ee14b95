package integration

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// decoyPage is the page wa_http serves for `GET /` with `origin_form page`:
// the placeholder site of examples/single-port.Caddyfile, word for word.
const decoyPage = `<!doctype html><html><head><title>Welcome</title></head><body><h1>It works!</h1><p>This site is under construction.</p></body></html>`

// decoyAuth is `alice:secret`, the proxy credentials of the decoy test.
const decoyAuth = "Proxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n"

// assertDecoy checks a response of origin_form page: status, an HTML body
// (empty for HEAD) containing want, a correct Content-Length, and no field
// that tells a proxy or a server product.
func assertDecoy(t *testing.T, resp *http.Response, body string, status int, want string, head bool) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d (%q), want %d", resp.StatusCode, body, status)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/html; charset=utf-8" {
		t.Errorf("Content-Type %q, want text/html; charset=utf-8", ct)
	}
	if resp.Header.Get("Date") == "" {
		t.Errorf("no Date field, which every web server sends")
	}
	for _, f := range []string{"Server", "Via", "Proxy-Authenticate", "Proxy-Connection", "X-Content-Type-Options"} {
		if v, ok := resp.Header[f]; ok {
			t.Errorf("the page has %s: %q", f, v)
		}
	}
	if head {
		if body != "" {
			t.Errorf("HEAD got a body: %q", body)
		}
	} else if !strings.Contains(body, want) || !strings.HasPrefix(body, "<!doctype html>") {
		t.Errorf("body %q, want an HTML page containing %q", body, want)
	}
	if head && resp.StatusCode == http.StatusOK {
		body = decoyPage // HEAD announces the length of the page GET gets
	}
	if got := resp.Header.Get("Content-Length"); got != strconv.Itoa(len(body)) {
		t.Errorf("Content-Length %q, want %d", got, len(body))
	}
}

// TestHTTPDecoyPage: with origin_form page (the default), wa_http answers
// requests to a web server — a browser's, a censor's probe — like a plain
// web server: the default page for `/`, 404 elsewhere, HEAD without a body,
// keep-alive honoured, without proxy authentication, not counted as errors.
// CONNECT keeps working on the same connection afterwards and on others;
// origin_form reject answers the old 400.
func TestHTTPDecoyPage(t *testing.T) {
	edge := testutil.StartEcho(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	page, reject := testutil.FreeAddr(t), testutil.FreeAddr(t)
	local := []string{"127.0.0.1"}
	cfg, _ := json.Marshal(obj{
		"logging": obj{"logs": obj{"default": obj{"level": "DEBUG", "writer": obj{"output": "file", "filename": logFile}}}},
		"apps": obj{"layer4": obj{"servers": obj{
			"page": obj{"listen": []string{page}, "routes": []obj{httpRoute(obj{
				"allow": local, "auth": obj{"basic": obj{"username": "alice", "password": "secret"}},
			})}},
			"reject": obj{"listen": []string{reject}, "routes": []obj{httpRoute(obj{"allow": local, "origin_form": "reject"})}},
		}}},
	})
	c := testutil.StartCaddy(t, string(cfg))
	errorsSeries := `whatsapp_proxy_errors_total{kind="http_request"}`
	errorsBefore := metric(t, c, errorsSeries)

	t.Run("raw_keepalive_then_connect", func(t *testing.T) {
		resp, body, br, conn := rawExchange(t, page, "GET / HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: Mozilla/5.0\r\n\r\n")
		assertDecoy(t, resp, body, http.StatusOK, decoyPage, false)
		if body != decoyPage {
			t.Fatalf("body %q, want the default page", body)
		}
		if resp.Close {
			t.Fatal("Connection: close after the page; want keep-alive")
		}
		// the next requests on the same connection
		if _, err := io.WriteString(conn, "GET /nope HTTP/1.1\r\nHost: www.example.com\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, body = readResponse(t, br, http.MethodGet)
		assertDecoy(t, resp, body, http.StatusNotFound, "Not Found", false)
		if strings.Contains(strings.ToLower(body), "proxy") {
			t.Errorf("the 404 mentions a proxy: %q", body)
		}
		// HEAD then GET written at once: a body after the HEAD's header
		// would be read as the next response
		if _, err := io.WriteString(conn, "HEAD / HTTP/1.1\r\nHost: www.example.com\r\n\r\n"+
			"GET /?q=1 HTTP/1.1\r\nHost: www.example.com\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, body = readResponse(t, br, http.MethodHead)
		assertDecoy(t, resp, body, http.StatusOK, "", true)
		resp, body = readResponse(t, br, http.MethodGet)
		assertDecoy(t, resp, body, http.StatusOK, "It works!", false)
		// proxy requests keep their behaviour: 407 without credentials,
		// then a tunnel with them
		if _, err := io.WriteString(conn, "CONNECT "+edge.Addr+" HTTP/1.1\r\nHost: "+edge.Addr+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, _ = readResponse(t, br, http.MethodConnect)
		if resp.StatusCode != http.StatusProxyAuthRequired || resp.Close {
			t.Fatalf("CONNECT without credentials: status %d, close %v; want 407 and keep-alive", resp.StatusCode, resp.Close)
		}
		if _, err := io.WriteString(conn, "CONNECT "+edge.Addr+" HTTP/1.1\r\nHost: "+edge.Addr+"\r\n"+decoyAuth+"\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, _ = readResponse(t, br, http.MethodConnect)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT after the pages: status %d", resp.StatusCode)
		}
		exchangeBuffered(t, conn, br, []byte("through the tunnel after the page"))
	})

	t.Run("go_web_client", func(t *testing.T) {
		tr := &http.Transport{Proxy: nil}
		t.Cleanup(tr.CloseIdleConnections)
		client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
		reused := 0
		get := func(method, path string) (*http.Response, string) {
			t.Helper()
			trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
				if info.Reused {
					reused++
				}
			}}
			req, _ := http.NewRequest(method, "http://"+page+path, nil)
			req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", method, path, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatalf("%s %s: reading the body: %v", method, path, err)
			}
			return resp, string(body)
		}
		resp, body := get(http.MethodGet, "/")
		assertDecoy(t, resp, body, http.StatusOK, decoyPage, false)
		if body != decoyPage {
			t.Fatalf("body %q, want the default page", body)
		}
		resp, body = get(http.MethodGet, "/nope")
		assertDecoy(t, resp, body, http.StatusNotFound, "Not Found", false)
		resp, body = get(http.MethodHead, "/")
		assertDecoy(t, resp, body, http.StatusOK, "", true)
		if resp.ContentLength != int64(len(decoyPage)) {
			t.Errorf("HEAD: ContentLength %d, want %d", resp.ContentLength, len(decoyPage))
		}
		if reused != 2 {
			t.Errorf("the client reused its connection %d times in 3 requests, want 2 (keep-alive)", reused)
		}
	})

	t.Run("http10_closes", func(t *testing.T) {
		resp, body, _, conn := rawExchange(t, page, "GET / HTTP/1.0\r\n\r\n")
		assertDecoy(t, resp, body, http.StatusOK, decoyPage, false)
		if !resp.Close {
			t.Error("HTTP/1.0 without keep-alive: no Connection: close")
		}
		expectClosed(t, conn, 5*time.Second)
	})

	t.Run("other_method", func(t *testing.T) {
		resp, body, _, conn := rawExchange(t, page, "POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
		assertDecoy(t, resp, body, http.StatusMethodNotAllowed, "Method Not Allowed", false)
		if got := resp.Header.Get("Allow"); got != "GET, HEAD" {
			t.Errorf("Allow %q, want GET, HEAD", got)
		}
		if !resp.Close {
			t.Error("a request body that was not read: no Connection: close")
		}
		expectClosed(t, conn, 5*time.Second)
	})

	t.Run("not_errors", func(t *testing.T) {
		if got := metric(t, c, errorsSeries); got != errorsBefore {
			t.Errorf("serving pages grew %s by %v", errorsSeries, got-errorsBefore)
		}
		testutil.WaitFor(t, 5*time.Second, "the page logged at debug level", func() bool {
			return countLines(t, logFile, `"msg":"serve default page"`) > 0
		})
		data, err := os.ReadFile(logFile)
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.SplitSeq(string(data), "\n") {
			if strings.Contains(line, `"msg":"serve default page"`) && !strings.Contains(line, `"level":"debug"`) {
				t.Errorf("the page is logged above debug level: %s", line)
			}
		}
	})

	t.Run("reject", func(t *testing.T) {
		resp, body, _, conn := rawExchange(t, reject, "GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
		assertReply(t, resp, body, http.StatusBadRequest, "not a proxy request")
		expectClosed(t, conn, 5*time.Second)
		waitMetric(t, c, errorsSeries, errorsBefore+1)
		// CONNECT on another connection still goes through
		resp, _, br, conn := rawExchange(t, reject, "CONNECT "+edge.Addr+" HTTP/1.1\r\nHost: "+edge.Addr+"\r\n\r\n")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT: status %d", resp.StatusCode)
		}
		exchangeBuffered(t, conn, br, []byte("through the tunnel"))
	})

	t.Run("connect_on_another_connection", func(t *testing.T) {
		resp, _, br, conn := rawExchange(t, page, "CONNECT "+edge.Addr+" HTTP/1.1\r\nHost: "+edge.Addr+"\r\n"+decoyAuth+"\r\n")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT: status %d", resp.StatusCode)
		}
		exchangeBuffered(t, conn, br, []byte("through the tunnel"))
	})
}
