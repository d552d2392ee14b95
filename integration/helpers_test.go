// Package integration holds the end-to-end tests: Caddy in-process with a
// real config, our listener, a SOCKS5 server that is not ours (caddy-l4's
// socks5 handler; microsocks and dante in the interop tests), real clients and
// loopback echo edges.
package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/metrics"
	_ "github.com/mholt/caddy-l4/modules/l4close"
	_ "github.com/mholt/caddy-l4/modules/l4socks"

	_ "github.com/waproxy/caddy-waproxy"
	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// waHello returns a 43-byte WhatsApp chat hello: the WA header 57 41 06 03
// and the first frame (3-byte length 0x24, HandshakeMessage{clientHello{ephemeral: 32 bytes}}).
func waHello() []byte {
	b := []byte{0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24, 0x12, 0x22, 0x0A, 0x20}
	eph := make([]byte, 32)
	_, _ = rand.Read(eph)
	return append(b, eph...)
}

// edPrologue returns the edge-routing prologue ED 00 01 + 3-byte length + routing info.
func edPrologue() []byte {
	routing := []byte{0x08, 0x02, 0x10, 0x05} // RoutingInfo{regionID: 2, clusterID: 5}
	return append([]byte{'E', 'D', 0x00, 0x01, 0x00, 0x00, byte(len(routing))}, routing...)
}

// frame returns a WhatsApp frame: a 3-byte big-endian length and the payload.
func frame(payload []byte) []byte {
	n := len(payload)
	return append([]byte{byte(n >> 16), byte(n >> 8), byte(n)}, payload...)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// obj is a JSON object literal for building configs.
type obj = map[string]any

// proxyConfig returns a Caddy config with a layer4 server on listen whose
// routes are given, plus a SOCKS5 server (caddy-l4's socks5 handler) on
// socksAddr when it is not empty, with credentials when creds is not nil.
func proxyConfig(listen string, routes []obj, socksAddr string, creds map[string]string) string {
	servers := obj{
		"proxy": obj{"listen": []string{listen}, "routes": routes, "matching_timeout": "10s"},
	}
	if socksAddr != "" {
		h := obj{"handler": "socks5"}
		if creds != nil {
			h["credentials"] = creds
		}
		servers["socks"] = obj{"listen": []string{socksAddr}, "routes": []obj{{"handle": []obj{h}}}}
	}
	cfg := obj{
		"logging": obj{"logs": obj{"default": obj{"level": "ERROR"}}},
		"apps":    obj{"layer4": obj{"servers": servers}},
	}
	b, _ := json.Marshal(cfg)
	return string(b)
}

// chatRoute is a route matching WhatsApp chat and XMPP that proxies with
// the given wa_proxy handler.
func chatRoute(handler obj) obj {
	handler["handler"] = "wa_proxy"
	return obj{"match": []obj{{"wa_xmpp": obj{}}}, "handle": []obj{handler}}
}

// socksVia is the `via` object for caddy-l4's SOCKS5 server at addr.
func socksVia(addr string, userPass ...string) obj {
	v := obj{"dialer": "socks5", "servers": []string{addr}}
	if len(userPass) == 2 {
		v["username"], v["password"] = userPass[0], userPass[1]
	}
	return v
}

// dial connects to addr with a deadline for the whole test exchange.
func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	return c.(*net.TCPConn)
}

// exchange writes msg and reads back exactly len(msg) bytes, asserting they
// are msg (the edge echoes).
func exchange(t *testing.T, c net.Conn, msg []byte) {
	t.Helper()
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("reading echo of %d bytes: %v", len(msg), err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo differs: sent %x..., got %x...", msg[:min(16, len(msg))], got[:min(16, len(got))])
	}
}

// expectClosed asserts the proxy closes c promptly without sending anything.
func expectClosed(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	n, err := c.Read(make([]byte, 64))
	if n != 0 || err == nil {
		t.Fatalf("expected the proxy to close the connection, read %d bytes, err %v", n, err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the proxy did not close the connection within %v", within)
	}
}

// metric reads one series from the admin endpoint's /metrics.
func metric(t *testing.T, c *testutil.Caddy, series string) float64 {
	t.Helper()
	return c.Metric(t, series)
}

// waitMetric waits until series reaches want.
func waitMetric(t *testing.T, c *testutil.Caddy, series string, want float64) {
	t.Helper()
	testutil.WaitFor(t, 5*time.Second, fmt.Sprintf("%s == %v", series, want), func() bool {
		return c.Metric(t, series) == want
	})
}

// bannerServer is a server-speaks-first edge: it writes banner on accept,
// then echoes.
func bannerServer(t *testing.T, banner string) string {
	t.Helper()
	return testutil.ServeLoopback(t, func(c net.Conn) {
		_, _ = io.WriteString(c, banner)
		_, _ = io.Copy(c, c)
	})
}

// localHandlers points the handlers of a shipped or adapted config at this
// machine, changing addresses only: every wa_proxy to g.whatsapp.net:5222
// goes to chatDest (allowed by allow), the media passthrough
// ({l4.wa_tls.server_name}:443) resolves names through test_resolve with
// hosts, every wa_http allows allow, and, when socks is set, every
// `via socks5` uses the SOCKS5 server at socks. It returns how many chat, media and
// http handlers it changed, so a test notices when the config's shape moves.
func localHandlers(t *testing.T, cfg any, chatDest string, allow []string, hosts map[string]string, socks string) map[string]int {
	t.Helper()
	counts := map[string]int{}
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case obj:
			if via, ok := v["via"].(obj); ok && via["dialer"] == "socks5" && socks != "" {
				via["servers"] = []string{socks}
			}
			switch v["handler"] {
			case "wa_proxy":
				switch v["destination"] {
				case "g.whatsapp.net:5222":
					v["destination"], v["allow"] = chatDest, allow
					counts["chat"]++
				case "{l4.wa_tls.server_name}:443":
					v["via"] = obj{"dialer": "test_resolve", "hosts": hosts, "log": newDialLog(t)}
					counts["media"]++
				default:
					t.Fatalf("unexpected wa_proxy destination %v", v["destination"])
				}
			case "wa_http":
				v["allow"] = allow
				counts["http"]++
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(cfg)
	return counts
}

// browserOverTLS gets https://listen/ as a browser does, offering h2 first:
// the proxy must settle on HTTP/1.1, which the decrypted stream's routes
// recognise (the HTTP/2 preface would go raw to WhatsApp's chat port), and
// answer with its page.
func browserOverTLS(t *testing.T, listen string) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Get("https://" + listen + "/")
	if err != nil {
		t.Fatalf("a browser's GET over TLS: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/1.1" || resp.TLS.NegotiatedProtocol != "http/1.1" {
		t.Fatalf("a browser's GET over TLS: %s %s (ALPN %q): %q", resp.Proto, resp.Status, resp.TLS.NegotiatedProtocol, body)
	}
}
