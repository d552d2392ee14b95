package integration

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4/modules/l4http"
	_ "github.com/mholt/caddy-l4/modules/l4proxy"
	_ "github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	"github.com/pires/go-proxyproto"

	_ "github.com/waproxy/caddy-waproxy"
	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// adaptPreset adapts a waproxy preset Caddyfile and changes its addresses
// only, the way rewriteMainExample does: the listener, the chat destination
// (`localhost`, allowed), the HTTP proxy's allowlist, the media
// passthrough's name resolution (test_resolve) and Caddy's storage.
func adaptPreset(t *testing.T, caddyfile, listen, chat, storage string, hosts map[string]string) string {
	t.Helper()
	return adaptPresetServers(t, caddyfile, map[string]string{"waproxy": listen}, chat, storage, hosts)
}

// adaptPresetServers is adaptPreset for a preset with several layer4
// servers: listen maps each server's name to its one test address.
func adaptPresetServers(t *testing.T, caddyfile string, listen map[string]string, chat, storage string, hosts map[string]string) string {
	t.Helper()
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting the preset: %v", err)
	}
	for _, w := range warnings {
		if !strings.Contains(w.Message, "not formatted") {
			t.Errorf("adapter warning: %s", w.Message)
		}
	}
	var cfg obj
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "admin")
	cfg["storage"] = obj{"module": "file_system", "root": storage}
	_, chatPort, _ := net.SplitHostPort(chat)
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	if len(servers) != len(listen) {
		t.Fatalf("preset: %d layer4 servers, want %d", len(servers), len(listen))
	}
	for name, addr := range listen {
		s, ok := servers[name].(obj)
		if !ok {
			t.Fatalf("preset: no layer4 server %q", name)
		}
		s["listen"] = []string{addr}
	}
	counts := localHandlers(t, servers, "localhost:"+chatPort, []string{"localhost", "127.0.0.1"}, hosts, "")
	if counts["chat"] != 5*len(listen) || counts["media"] != len(listen) || counts["http"] != 2*len(listen) {
		t.Fatalf("preset has %v handlers; the test expects 5 chat, 1 media, 2 http per server", counts)
	}
	out, _ := json.Marshal(cfg)
	return string(out)
}

// readProxied reads what the echoing chat destination sent back: the PROXY
// header that wa_proxy put in front of the stream, then msg.
func readProxied(t *testing.T, r io.Reader, msg []byte) *proxyproto.Header {
	t.Helper()
	br := bufio.NewReader(r)
	hdr, err := proxyproto.Read(br)
	if err != nil {
		t.Fatalf("reading the PROXY header the destination saw: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("after the header want the message, got %x, %v", got, err)
	}
	return hdr
}

// TestPresetSinglePort runs the adapted `waproxy` preset (addresses aside,
// as adapted): plain chat, chat in TLS terminated with the certificate the
// preset names, media passthrough and the HTTP proxy on one port; with
// send_proxy_protocol, chat (never media) gets a PROXY header naming the
// client.
func TestPresetSinglePort(t *testing.T) {
	start := time.Now()
	storage := t.TempDir()
	ca := newTestCA(t)
	media := startTLSEcho(t, ca.issue(t, "mmg.whatsapp.net"))
	chat := testutil.StartEcho(t)
	origin := startOrigin(t, false, nil)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, adaptPreset(t, `{
	tls_automate_names proxy.waproxy.internal
	skip_install_trust
	waproxy {
		listen :443
		via direct
		send_proxy_protocol v2
	}
}`, listen, chat.Addr, storage, map[string]string{"mmg.whatsapp.net:443": media.Addr}))

	t.Run("plain_chat", func(t *testing.T) {
		conn := dial(t, listen)
		hello := cat(edPrologue(), waHello())
		if _, err := conn.Write(hello); err != nil {
			t.Fatal(err)
		}
		hdr := readProxied(t, conn, hello)
		if hdr.Version != 2 || hdr.SourceAddr.String() != conn.LocalAddr().String() {
			t.Fatalf("PROXY v%d from %v; want v2 from the client %v", hdr.Version, hdr.SourceAddr, conn.LocalAddr())
		}
		waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp_edge"}`, 1)
	})
	t.Run("chat_in_tls", func(t *testing.T) {
		conn := handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true})
		defer conn.Close()
		verifyLocalCA(t, conn.ConnectionState(), storage, "proxy.waproxy.internal", start)
		_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
		hello := waHello()
		if _, err := conn.Write(hello); err != nil {
			t.Fatal(err)
		}
		readProxied(t, conn, hello)
	})
	t.Run("media_passthrough", func(t *testing.T) {
		conn := dialMedia(t, listen, ca, media, true)
		// no PROXY header in front of media: the echo is the request alone
		exchange(t, conn, []byte("GET /v/t62 HTTP/1.1\r\nHost: mmg.whatsapp.net\r\n\r\n"))
	})
	t.Run("browser_over_tls", func(t *testing.T) { browserOverTLS(t, listen) })
	t.Run("http_proxy", func(t *testing.T) {
		_, originPort, _ := net.SplitHostPort(strings.TrimPrefix(origin.URL, "http://"))
		seen, resp := getSeen(t, proxyClient(t, listen, nil), "http://localhost:"+originPort+"/echo", nil)
		if resp.StatusCode != http.StatusOK || seen.URI != "/echo" {
			t.Fatalf("through the proxy: status %d, origin saw %q", resp.StatusCode, seen.URI)
		}
	})
}

// TestPresetProxyHeaderAllowed: behind a load balancer (proxy_protocol_from
// naming its address), the client address in the balancer's PROXY header is
// what the chat destination is told (send_proxy_protocol).
func TestPresetProxyHeaderAllowed(t *testing.T) {
	chat := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, adaptPreset(t, `{
	waproxy {
		proxy_protocol_from 127.0.0.1
		send_proxy_protocol v2
	}
}`, listen, chat.Addr, t.TempDir(), nil))
	conn := dial(t, listen)
	claimed := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4242}
	in := proxyproto.HeaderProxyFromAddrs(1, claimed, conn.RemoteAddr())
	if _, err := in.WriteTo(conn); err != nil {
		t.Fatal(err)
	}
	hello := waHello()
	if _, err := conn.Write(hello); err != nil {
		t.Fatal(err)
	}
	hdr := readProxied(t, conn, hello)
	if hdr.Version != 2 || hdr.SourceAddr.String() != claimed.String() {
		t.Fatalf("the destination saw the client as %v (PROXY v%d); want the address in the load balancer's header, %v, in v2", hdr.SourceAddr, hdr.Version, claimed)
	}
}

// TestPresetProxyHeaderNotAllowed: a PROXY header from an address outside
// proxy_protocol_from is not trusted: it is not read as a header, its
// claimed address is never used, and the destination sees the connection's
// own address (then the header's bytes, as data, on the fallback route).
func TestPresetProxyHeaderNotAllowed(t *testing.T) {
	chat := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, adaptPreset(t, `{
	waproxy {
		proxy_protocol_from 10.0.0.0/8
		send_proxy_protocol v1
	}
}`, listen, chat.Addr, t.TempDir(), nil))
	conn := dial(t, listen)
	claimed := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4242}
	var sent bytes.Buffer
	if _, err := proxyproto.HeaderProxyFromAddrs(1, claimed, conn.RemoteAddr()).WriteTo(&sent); err != nil {
		t.Fatal(err)
	}
	sent.Write(waHello())
	if _, err := conn.Write(sent.Bytes()); err != nil {
		t.Fatal(err)
	}
	hdr := readProxied(t, conn, sent.Bytes())
	if hdr.Version != 1 || hdr.SourceAddr.String() != conn.LocalAddr().String() {
		t.Fatalf("PROXY v%d from %v; want v1 from the connection's own address %v", hdr.Version, hdr.SourceAddr, conn.LocalAddr())
	}
}

// TestPresetOfficialPorts: with official_ports, the plain ports detect like
// the single port, and the PROXY ports (8080 8443 8222) require a header
// from every peer when no proxy_protocol_from is given, as the official
// proxy's accept-proxy does.
func TestPresetOfficialPorts(t *testing.T) {
	chat := testutil.StartEcho(t)
	plain, pp := testutil.FreeAddr(t), testutil.FreeAddr(t)
	testutil.StartCaddy(t, adaptPresetServers(t, `{
	waproxy {
		official_ports
		send_proxy_protocol v1
	}
}`, map[string]string{"waproxy": plain, "waproxy_proxy_protocol": pp}, chat.Addr, t.TempDir(), nil))

	t.Run("plain_port", func(t *testing.T) {
		conn := dial(t, plain)
		hello := waHello()
		if _, err := conn.Write(hello); err != nil {
			t.Fatal(err)
		}
		if hdr := readProxied(t, conn, hello); hdr.SourceAddr.String() != conn.LocalAddr().String() {
			t.Fatalf("the destination saw the client as %v, want %v", hdr.SourceAddr, conn.LocalAddr())
		}
	})
	t.Run("proxy_port_with_header", func(t *testing.T) {
		conn := dial(t, pp)
		claimed := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4343}
		if _, err := proxyproto.HeaderProxyFromAddrs(2, claimed, conn.RemoteAddr()).WriteTo(conn); err != nil {
			t.Fatal(err)
		}
		hello := waHello()
		if _, err := conn.Write(hello); err != nil {
			t.Fatal(err)
		}
		if hdr := readProxied(t, conn, hello); hdr.SourceAddr.String() != claimed.String() {
			t.Fatalf("the destination saw the client as %v, want the header's %v", hdr.SourceAddr, claimed)
		}
	})
	t.Run("proxy_port_without_header", func(t *testing.T) {
		conn := dial(t, pp)
		if _, err := conn.Write(waHello()); err != nil {
			t.Fatal(err)
		}
		expectClosed(t, conn, 10*time.Second)
	})
}

// websitePage is the index.html of the website in TestPresetWebsite.
const websitePage = "<!doctype html><title>Bakery</title><h1>Fresh bread daily</h1>\n"

// TestPresetWebsite: with `website`, visitors who are neither WhatsApp nor
// proxy clients — a browser over HTTPS (offering h2, as browsers do), a
// plain `GET /` — get the site block's website, over TLS with the preset's
// certificate, and the site sees the visitor's address (PROXY v2 on the
// hop); WhatsApp chat (plain, in TLS, unknown bytes), media passthrough and
// HTTP proxy requests (CONNECT, absolute-form) are proxied as before.
func TestPresetWebsite(t *testing.T) {
	start := time.Now()
	storage := t.TempDir()
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(websitePage), 0o644); err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	media := startTLSEcho(t, ca.issue(t, "mmg.whatsapp.net"))
	chat := testutil.StartEcho(t)
	origin := startOrigin(t, false, nil)
	tlsOrigin := startOrigin(t, true, nil)
	listen, site := testutil.FreeAddr(t), testutil.FreeAddr(t)
	_, sitePort, _ := net.SplitHostPort(site)
	testutil.StartCaddy(t, adaptPreset(t, `{
	tls_automate_names proxy.waproxy.internal
	skip_install_trust
	servers `+site+` {
		listener_wrappers {
			proxy_protocol {
				allow 127.0.0.1/32
			}
		}
	}
	waproxy {
		listen :443
		website `+site+` {
			send_proxy_protocol v2
		}
	}
}

http://:`+sitePort+` {
	bind 127.0.0.1
	header -Server
	respond /whoami "{http.request.remote}"
	root * `+root+`
	file_server
}`, listen, chat.Addr, storage, map[string]string{"mmg.whatsapp.net:443": media.Addr}))

	checkPage := func(t *testing.T, resp *http.Response) {
		t.Helper()
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK || string(body) != websitePage {
			t.Fatalf("status %d, body %q; want 200 and the website's index.html", resp.StatusCode, body)
		}
		if srv := resp.Header.Get("Server"); srv != "" {
			t.Errorf("Server header %q; want none", srv)
		}
	}

	t.Run("browser_https", func(t *testing.T) {
		handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true}).Close()
		tr := &http.Transport{
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
			ForceAttemptHTTP2: true, // offer h2 in ALPN, as browsers do
		}
		t.Cleanup(tr.CloseIdleConnections)
		resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Get("https://" + listen + "/")
		if err != nil {
			t.Fatalf("HTTPS GET: %v", err)
		}
		if resp.TLS == nil || resp.Proto != "HTTP/1.1" {
			t.Fatalf("protocol %s; want HTTP/1.1 over TLS", resp.Proto)
		}
		leaf := verifyLocalCA(t, *resp.TLS, storage, "proxy.waproxy.internal", start)
		if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "proxy.waproxy.internal" {
			t.Errorf("certificate names %v; want the preset's hostname", leaf.DNSNames)
		}
		checkPage(t, resp)
	})
	t.Run("plain_get", func(t *testing.T) {
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
		resp, err := client.Get("http://" + listen + "/")
		if err != nil {
			t.Fatalf("GET: %v", err)
		}
		checkPage(t, resp)
	})
	t.Run("http10_without_host", func(t *testing.T) {
		conn := dial(t, listen)
		if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		checkPage(t, resp)
	})
	t.Run("site_sees_visitor", func(t *testing.T) {
		conn := dial(t, listen)
		if _, err := io.WriteString(conn, "GET /whoami HTTP/1.1\r\nHost: proxy.waproxy.internal\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if string(body) != conn.LocalAddr().String() {
			t.Fatalf("the website saw the visitor as %q; want %v", body, conn.LocalAddr())
		}
	})
	t.Run("plain_chat", func(t *testing.T) {
		conn := dial(t, listen)
		exchange(t, conn, cat(edPrologue(), waHello()))
	})
	t.Run("chat_in_tls", func(t *testing.T) {
		conn := handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true})
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
		exchange(t, conn, waHello())
	})
	t.Run("unknown_bytes", func(t *testing.T) {
		conn := dial(t, listen)
		exchange(t, conn, []byte("\x00\xff not a protocol\n\x01\x02"))
	})
	t.Run("media_passthrough", func(t *testing.T) {
		conn := dialMedia(t, listen, ca, media, false)
		exchange(t, conn, []byte("GET / HTTP/1.1\r\nHost: mmg.whatsapp.net\r\n\r\n"))
	})
	t.Run("http_proxy", func(t *testing.T) {
		_, originPort, _ := net.SplitHostPort(strings.TrimPrefix(origin.URL, "http://"))
		seen, resp := getSeen(t, proxyClient(t, listen, nil), "http://localhost:"+originPort+"/echo", nil)
		if resp.StatusCode != http.StatusOK || seen.URI != "/echo" {
			t.Fatalf("absolute-form through the proxy: status %d, origin saw %q", resp.StatusCode, seen.URI)
		}
	})
	t.Run("connect", func(t *testing.T) {
		seen, resp := getSeen(t, proxyClient(t, listen, tlsOrigin), tlsOrigin.URL+"/echo", nil)
		if resp.StatusCode != http.StatusOK || seen.URI != "/echo" {
			t.Fatalf("CONNECT through the proxy: status %d, origin saw %q", resp.StatusCode, seen.URI)
		}
	})
}

// TestPresetLimits: max_connections_per_ip behind a load balancer counts
// the client named in the PROXY header (the header is read before wa_limit
// runs): a second connection for the same client is refused at once, one
// for another client is not, and the client gets its slot back when its
// connection closes.
func TestPresetLimits(t *testing.T) {
	chat := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, adaptPreset(t, `{
	waproxy {
		proxy_protocol_from 127.0.0.1
		max_connections 27500
		max_connections_per_ip 1
	}
}`, listen, chat.Addr, t.TempDir(), nil))
	// from connects as the client ip (documentation addresses, which no
	// other test uses: the per-IP counts are process-wide).
	from := func(ip string, port int) *net.TCPConn {
		conn := dial(t, listen)
		claimed := &net.TCPAddr{IP: net.ParseIP(ip), Port: port}
		if _, err := proxyproto.HeaderProxyFromAddrs(2, claimed, conn.RemoteAddr()).WriteTo(conn); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	const refused = `whatsapp_proxy_errors_total{kind="max_connections_per_ip"}`
	before := metric(t, c, refused)

	first := from("192.0.2.1", 1001)
	exchange(t, first, waHello())

	second := from("192.0.2.1", 1002)
	if _, err := second.Write(waHello()); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, second, 10*time.Second)
	waitMetric(t, c, refused, before+1) // one refusal

	other := from("192.0.2.2", 1003)
	exchange(t, other, waHello())

	first.Close()
	testutil.WaitFor(t, 15*time.Second, "192.0.2.1 let in again after its connection closed", func() bool {
		conn := from("192.0.2.1", 1004)
		hello := waHello()
		if _, err := conn.Write(hello); err != nil {
			return false
		}
		got := make([]byte, len(hello))
		_, err := io.ReadFull(conn, got)
		return err == nil && bytes.Equal(got, hello)
	})
}

// TestPresetLimitsSilent: with a connection limit in front of the routes, a
// client that sends nothing still reaches the chat destination after the
// preset's 2s wait (wa_silent stays the first route, behind wa_limit).
func TestPresetLimitsSilent(t *testing.T) {
	banner := bannerServer(t, "220 server speaks first\r\n")
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, adaptPreset(t, `{
	waproxy {
		max_connections 27500
	}
}`, listen, banner, t.TempDir(), nil))
	conn := dial(t, listen)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "220 server speaks first\r\n" {
		t.Fatalf("a silent client read %q, %v; want the chat destination's banner", line, err)
	}
}

// TestPresetWebsiteUnix: the website may listen on a Unix socket (no port
// to pick, nothing reachable from the network).
func TestPresetWebsiteUnix(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(websitePage), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "www.sock")
	chat := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, adaptPreset(t, `{
	waproxy {
		website unix/`+sock+`
	}
}

http:// {
	bind unix/`+sock+`
	root * `+root+`
	file_server
}`, listen, chat.Addr, t.TempDir(), nil))
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
	resp, err := client.Get("http://" + listen + "/")
	if err != nil {
		t.Fatalf("GET: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != websitePage {
		t.Fatalf("status %d, body %q; want 200 and the website's index.html", resp.StatusCode, body)
	}
	conn := dial(t, listen)
	exchange(t, conn, waHello())
}

// TestPresetSilentBehindProxyHeader: behind a load balancer that sends a
// PROXY header, a client that then says nothing (server-speaks-first) goes
// to the chat destination after the silent wait, as without a header, for
// both header versions; a client whose first bytes came in the same segment
// as the header (go-proxyproto holds them in its buffer, where a peek at
// the socket cannot see them) is sorted by those bytes, not taken for
// silent.
func TestPresetSilentBehindProxyHeader(t *testing.T) {
	const banner = "220 server speaks first\r\n"
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, adaptPreset(t, `{
	waproxy {
		proxy_protocol_from 127.0.0.1
	}
}`, listen, bannerServer(t, banner), t.TempDir(), nil))
	claimed := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 4242}

	for _, version := range []byte{1, 2} {
		t.Run(fmt.Sprintf("silent_after_v%d_header", version), func(t *testing.T) {
			conn := dial(t, listen)
			if _, err := proxyproto.HeaderProxyFromAddrs(version, claimed, conn.RemoteAddr()).WriteTo(conn); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(conn).ReadString('\n')
			if err != nil || line != banner {
				t.Fatalf("a silent client behind a v%d header read %q, %v; want the chat destination's banner", version, line, err)
			}
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="raw"}`, 1)
			conn.Close()
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="raw"}`, 0)
		})
	}

	t.Run("hello_in_the_header's_segment", func(t *testing.T) {
		conn := dial(t, listen)
		hdr, err := proxyproto.HeaderProxyFromAddrs(2, claimed, conn.RemoteAddr()).Format()
		if err != nil {
			t.Fatal(err)
		}
		hello := waHello()
		if _, err := conn.Write(append(hdr, hello...)); err != nil { // one write, one segment
			t.Fatal(err)
		}
		br := bufio.NewReader(conn)
		if line, err := br.ReadString('\n'); err != nil || line != banner {
			t.Fatalf("read %q, %v; want the chat destination's banner", line, err)
		}
		got := make([]byte, len(hello))
		if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, hello) {
			t.Fatalf("echo of the hello: %x, %v", got, err)
		}
		waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 1)
		conn.Close()
		waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 0)
	})
}
