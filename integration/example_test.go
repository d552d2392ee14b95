package integration

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// rewriteMainExample adapts examples/Caddyfile.json (the README's example)
// to the test machine, changing addresses only: the public listener, the
// port of its own SOCKS5 server (every `via socks5` follows it), the chat
// destination (the name `localhost`, resolved at the SOCKS5 exit, allowed),
// the HTTP proxy's allowlist (`localhost`), the media passthrough's name
// resolution (test_resolve: the SOCKS5 exit would ask the system's DNS) and
// Caddy's storage (a temp dir). Routes, matchers and handlers stay as shipped.
func rewriteMainExample(t *testing.T, listen, socks, chat, storage string, hosts map[string]string) string {
	t.Helper()
	raw, err := os.ReadFile("../examples/Caddyfile.json")
	if err != nil {
		t.Fatal(err)
	}
	var cfg obj
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "admin") // StartCaddy sets it
	cfg["storage"] = obj{"module": "file_system", "root": storage}
	_, chatPort, _ := net.SplitHostPort(chat)
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	for _, srv := range servers {
		s := srv.(obj)
		switch s["listen"].([]any)[0] {
		case ":5222":
			s["listen"] = []string{listen}
		case "127.0.0.1:1080":
			s["listen"] = []string{socks}
		default:
			t.Fatalf("examples/Caddyfile.json: unexpected listener %v", s["listen"])
		}
	}
	counts := localHandlers(t, servers, "localhost:"+chatPort, []string{"localhost"}, hosts, socks)
	if counts["chat"] != 5 || counts["media"] != 1 || counts["http"] != 2 {
		t.Fatalf("examples/Caddyfile.json has %v handlers; the test expects 5 chat, 1 media, 2 http (update it)", counts)
	}
	out, _ := json.Marshal(cfg)
	return string(out)
}

// TestMainExample runs examples/Caddyfile as shipped (but for its
// addresses): one port carries plain chat (a byte at a time), chat inside
// TLS terminated with Caddy's local-CA certificate, media TLS passed through
// by SNI, HTTP proxy requests (absolute-form and CONNECT), and anything else
// to the fallback — all through the SOCKS5 server the example runs itself.
func TestMainExample(t *testing.T) {
	start := time.Now()
	storage := t.TempDir()
	ca := newTestCA(t)
	media := startTLSEcho(t, ca.issue(t, "mmg.whatsapp.net"))
	chat := testutil.StartEcho(t)
	origin := startOrigin(t, false, nil)
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, rewriteMainExample(t, listen, socks, chat.Addr, storage,
		map[string]string{"mmg.whatsapp.net:443": media.Addr}))
	live := func(t *testing.T, protocol string) {
		waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="`+protocol+`"}`, 1)
	}

	t.Run("plain_chat_byte_by_byte", func(t *testing.T) {
		conn := dial(t, listen)
		hello := cat(edPrologue(), waHello())
		for _, b := range hello[:12] {
			if _, err := conn.Write([]byte{b}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := conn.Write(hello[12:]); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(hello))
		if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, hello) {
			t.Fatalf("echo of the hello: %x, %v", got, err)
		}
		live(t, "whatsapp_edge")
	})
	t.Run("chat_in_tls", func(t *testing.T) {
		conn := handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true})
		verifyLocalCA(t, conn.ConnectionState(), storage, "proxy.waproxy.internal", start)
		exchange(t, conn, waHello())
		live(t, "whatsapp")
	})
	t.Run("chat_in_tls_split_hello", func(t *testing.T) {
		conn, err := tlsDial(t, listen, &tls.Config{InsecureSkipVerify: true}, true)
		if err != nil {
			t.Fatal(err)
		}
		exchange(t, conn, waHello())
	})
	t.Run("browser_over_tls", func(t *testing.T) { browserOverTLS(t, listen) })
	t.Run("media_passthrough", func(t *testing.T) {
		conn := dialMedia(t, listen, ca, media, true)
		exchange(t, conn, []byte("GET /v/t62 HTTP/1.1\r\nHost: mmg.whatsapp.net\r\n\r\n"))
		live(t, "tls")
	})
	_, originPort, _ := net.SplitHostPort(strings.TrimPrefix(origin.URL, "http://"))
	t.Run("http_proxy_absolute_form", func(t *testing.T) {
		seen, resp := getSeen(t, proxyClient(t, listen, nil), "http://localhost:"+originPort+"/echo", nil)
		if resp.StatusCode != http.StatusOK || seen.URI != "/echo" {
			t.Fatalf("through the proxy: status %d, origin saw %q", resp.StatusCode, seen.URI)
		}
	})
	t.Run("http_proxy_connect", func(t *testing.T) {
		conn := dial(t, listen)
		if _, err := io.WriteString(conn, "CONNECT localhost:"+chatPort(chat)+" HTTP/1.1\r\nHost: localhost\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		want := "HTTP/1.1 200 "
		got := make([]byte, len(want))
		if _, err := io.ReadFull(conn, got); err != nil || string(got) != want {
			t.Fatalf("CONNECT answered %q, %v", got, err)
		}
		// skip the rest of the response head, then the tunnel echoes
		head := make([]byte, 0, 256)
		for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
			b := make([]byte, 1)
			if _, err := conn.Read(b); err != nil {
				t.Fatal(err)
			}
			head = append(head, b[0])
		}
		exchange(t, conn, []byte("through the tunnel"))
	})
	t.Run("http_proxy_refuses_other_hosts", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, "http://example.com/", nil)
		resp, err := proxyClient(t, listen, nil).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("a host outside the allowlist got %d, want 403", resp.StatusCode)
		}
	})
	t.Run("other_bytes_to_fallback", func(t *testing.T) {
		conn := dial(t, listen)
		exchange(t, conn, []byte("SSH-2.0-OpenSSH_9.2p1\r\n"))
		live(t, "raw")
	})
}

func chatPort(e *testutil.EchoServer) string {
	_, p, _ := net.SplitHostPort(e.Addr)
	return p
}
