package integration

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/caddypki"
	_ "github.com/caddyserver/caddy/v2/modules/caddytls"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	_ "github.com/mholt/caddy-l4/modules/l4subroute"
	_ "github.com/mholt/caddy-l4/modules/l4tls"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

// ---- a test-only dialer: name resolution for WhatsApp's names, locally ----

func init() {
	caddy.RegisterModule(new(testResolveDialer))
}

// testResolveDialer (wa.dialers.test_resolve) stands in for DNS: it
// connects to the loopback address its Hosts map gives for a destination
// ("mmg.whatsapp.net:443" → "127.0.0.1:40123") and fails for any other.
// Everything else, the allowlist first, is the real wa_proxy. It records
// every destination it was asked for under Log.
type testResolveDialer struct {
	Hosts map[string]string `json:"hosts"`
	Log   string            `json:"log"`
}

var (
	testDials   sync.Map // Log → *dialLog
	testDialSeq atomic.Int64
)

// newDialLog returns a Log name no other test (or -count run) uses.
func newDialLog(t *testing.T) string { return fmt.Sprintf("%s#%d", t.Name(), testDialSeq.Add(1)) }

type dialLog struct {
	mu    sync.Mutex
	dests []string
}

func (l *dialLog) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.dests...)
}

// dialsFor returns the destinations the test_resolve dialers logging under
// name were asked to dial.
func dialsFor(name string) *dialLog {
	l, _ := testDials.LoadOrStore(name, new(dialLog))
	return l.(*dialLog)
}

func (*testResolveDialer) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "wa.dialers.test_resolve",
		New: func() caddy.Module { return new(testResolveDialer) },
	}
}

func (d *testResolveDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	l := dialsFor(d.Log)
	l.mu.Lock()
	l.dests = append(l.dests, address)
	l.mu.Unlock()
	target, ok := d.Hosts[strings.ToLower(address)]
	if !ok {
		return nil, &upstreams.DialError{Kind: metrics.KindDial, Err: fmt.Errorf("test_resolve: no address for %s", address)}
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, target)
}

var _ upstreams.Dialer = (*testResolveDialer)(nil)

// ---- certificates the tests make for their own TLS servers ----

// testCA is a CA generated for one test, with its PEM file on disk.
type testCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	pemFile string
	pool    *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "waproxy test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	file := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pemFile: file, pool: pool}
}

// issue returns a server certificate for names (DNS names or IPs).
func (ca *testCA) issue(t *testing.T, names ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: names[0]},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// tlsEchoServer is a local TLS server standing in for a WhatsApp host: it
// echoes, and records the server name and first bytes of each connection.
type tlsEchoServer struct {
	Addr string
	Cert tls.Certificate
	mu   sync.Mutex
	seen []tlsSeen
}

type tlsSeen struct {
	serverName string
	first      []byte
}

func startTLSEcho(t *testing.T, cert tls.Certificate) *tlsEchoServer {
	t.Helper()
	s := &tlsEchoServer{Cert: cert}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = ln.Addr().String()
	var wg sync.WaitGroup
	conns := make(map[net.Conn]struct{})
	var connsMu sync.Mutex
	t.Cleanup(func() {
		ln.Close()
		connsMu.Lock()
		for c := range conns {
			c.Close()
		}
		connsMu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			connsMu.Lock()
			conns[c] = struct{}{}
			connsMu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				tc := c.(*tls.Conn)
				_ = tc.SetDeadline(time.Now().Add(20 * time.Second))
				if tc.Handshake() != nil {
					return
				}
				buf := make([]byte, 32*1024)
				var first []byte
				for {
					n, err := tc.Read(buf)
					if n > 0 {
						if len(first) < 4096 {
							first = append(first, buf[:min(n, 4096-len(first))]...)
						}
						if _, werr := tc.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				s.mu.Lock()
				s.seen = append(s.seen, tlsSeen{serverName: tc.ConnectionState().ServerName, first: first})
				s.mu.Unlock()
			}()
		}
	}()
	return s
}

func (s *tlsEchoServer) Seen() []tlsSeen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]tlsSeen(nil), s.seen...)
}

// ---- TLS clients ----

// splitHelloConn is a client connection that sends the ClientHello as two
// TLS records, in two TCP writes, the first of them a few bytes long.
type splitHelloConn struct {
	net.Conn
	done bool
}

func (c *splitHelloConn) Write(p []byte) (int, error) {
	if c.done || len(p) < 5 || p[0] != 0x16 {
		return c.Conn.Write(p)
	}
	c.done = true
	n := int(p[3])<<8 | int(p[4])
	if len(p) != 5+n {
		return 0, fmt.Errorf("splitHelloConn: want one record, got %d bytes for a %d-byte record", len(p), n)
	}
	hs := p[5:]
	cut := 40 // inside the ClientHello, before the server name
	first := append([]byte{0x16, p[1], p[2], 0, byte(cut)}, hs[:cut]...)
	second := append([]byte{0x16, p[1], p[2], byte((n - cut) >> 8), byte(n - cut)}, hs[cut:]...)
	if _, err := c.Conn.Write(first); err != nil {
		return 0, err
	}
	if _, err := c.Conn.Write(second); err != nil {
		return 0, err
	}
	return len(p), nil
}

// tlsDial connects to addr and performs a TLS handshake with cfg,
// splitting the ClientHello if split is set.
// dialMedia opens media TLS (SNI mmg.whatsapp.net, verified against ca) to
// listen, the ClientHello split across segments when split is set, and
// fails the test unless the certificate is media's own: the proxy passed
// the TLS through instead of terminating it.
func dialMedia(t *testing.T, listen string, ca *testCA, media *tlsEchoServer, split bool) *tls.Conn {
	t.Helper()
	conn, err := tlsDial(t, listen, &tls.Config{ServerName: "mmg.whatsapp.net", RootCAs: ca.pool}, split)
	if err != nil {
		t.Fatalf("handshake for mmg.whatsapp.net: %v", err)
	}
	if !bytes.Equal(conn.ConnectionState().PeerCertificates[0].Raw, media.Cert.Certificate[0]) {
		t.Fatal("media TLS was terminated; want the media server's own certificate")
	}
	return conn
}

func tlsDial(t *testing.T, addr string, cfg *tls.Config, split bool) (*tls.Conn, error) {
	t.Helper()
	raw := dial(t, addr)
	var c net.Conn = raw
	if split {
		c = &splitHelloConn{Conn: raw}
	}
	tc := tls.Client(c, cfg)
	t.Cleanup(func() { tc.Close() })
	return tc, tc.Handshake()
}

// ---- configs ----

// withTLSApps adds to a config from proxyConfig Caddy's TLS app managing a
// certificate for name from its internal CA (the PKI app's, not installed
// in any trust store), kept in storage (a test's temp dir), plus extra
// settings for the TLS app's automation policy.
func withTLSApps(t *testing.T, cfg, storage, name string, policy obj) string {
	t.Helper()
	var m obj
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		t.Fatal(err)
	}
	m["storage"] = obj{"module": "file_system", "root": storage}
	issuer := obj{"module": "internal"}
	if lifetime, ok := policy["lifetime"]; ok {
		issuer["lifetime"] = lifetime
		delete(policy, "lifetime")
	}
	pol := obj{"subjects": []string{name}, "issuers": []obj{issuer}}
	automation := obj{"policies": []obj{pol}}
	if ri, ok := policy["renew_interval"]; ok {
		automation["renew_interval"] = ri
	}
	apps := m["apps"].(obj)
	apps["tls"] = obj{"certificates": obj{"automate": []string{name}}, "automation": automation}
	apps["pki"] = obj{"certificate_authorities": obj{"local": obj{"install_trust": false}}}
	b, _ := json.Marshal(m)
	return string(b)
}

// terminate is caddy-l4's tls handler serving the certificate for name to
// clients that send no server name or one Caddy has no certificate for.
func terminate(name string) obj {
	return obj{"handler": "tls", "connection_policies": []obj{{"default_sni": name, "fallback_sni": name}}}
}

// passthroughVia is wa_proxy carrying TLS to the server name's port 443,
// resolved by test_resolve.
func passthroughVia(hosts map[string]string, log string) obj {
	return obj{"handler": "wa_proxy", "destination": "{l4.wa_tls.server_name}:443",
		"via": obj{"dialer": "test_resolve", "hosts": hosts, "log": log}}
}

// ---- passthrough by SNI ----

// TestTLSPassthrough: TLS to an allowed WhatsApp name is carried untouched
// to that name's port 443 (here a local TLS server, reached through the
// test_resolve dialer): the client completes its handshake with the local
// server's certificate, not one of Caddy's. A name outside the allowlist is
// refused without being dialled, so the port is no open TLS relay.
func TestTLSPassthrough(t *testing.T) {
	ca := newTestCA(t)
	media := startTLSEcho(t, ca.issue(t, "mmg.whatsapp.net", "media-ams2-1.cdn.whatsapp.net"))
	other := startTLSEcho(t, ca.issue(t, "example.com"))
	hosts := map[string]string{
		"mmg.whatsapp.net:443":              media.Addr,
		"media-ams2-1.cdn.whatsapp.net:443": media.Addr,
		"example.com:443":                   other.Addr, // dialled only if the allowlist failed
	}
	log := newDialLog(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		{"match": []obj{{"wa_tls": obj{}}}, "handle": []obj{passthroughVia(hosts, log)}},
	}, "", nil))

	for _, tc := range []struct {
		name, sni string
		version   uint16
		split     bool
	}{
		{"tls13", "mmg.whatsapp.net", tls.VersionTLS13, false},
		{"tls12", "media-ams2-1.cdn.whatsapp.net", tls.VersionTLS12, false},
		{"split_hello", "mmg.whatsapp.net", tls.VersionTLS13, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := tlsDial(t, listen, &tls.Config{ServerName: tc.sni, RootCAs: ca.pool,
				MinVersion: tc.version, MaxVersion: tc.version, NextProtos: []string{"h2"}}, tc.split)
			if err != nil {
				t.Fatalf("handshake through the proxy: %v", err)
			}
			st := conn.ConnectionState()
			if !bytes.Equal(st.PeerCertificates[0].Raw, media.Cert.Certificate[0]) {
				t.Fatalf("served certificate %q; want the media server's own", st.PeerCertificates[0].Subject)
			}
			if st.Version != tc.version || st.NegotiatedProtocol != "h2" {
				t.Errorf("version %x, ALPN %q; want %x, h2", st.Version, st.NegotiatedProtocol, tc.version)
			}
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="tls"}`, 1)
			msg := randomBytes(100_000)
			exchange(t, conn, msg)
			conn.Close()
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="tls"}`, 0)
			testutil.WaitFor(t, 5*time.Second, "the media server saw the connection end", func() bool {
				seen := media.Seen()
				return len(seen) > 0 && seen[len(seen)-1].serverName == tc.sni && bytes.HasPrefix(msg, seen[len(seen)-1].first)
			})
		})
	}

	t.Run("not_allowed_sni_refused", func(t *testing.T) {
		before := metric(t, c, `whatsapp_proxy_errors_total{kind="not_allowed"}`)
		_, err := tlsDial(t, listen, &tls.Config{ServerName: "example.com", RootCAs: ca.pool}, false)
		if err == nil {
			t.Fatal("a handshake for example.com succeeded through the proxy")
		}
		waitMetric(t, c, `whatsapp_proxy_errors_total{kind="not_allowed"}`, before+1)
		for _, d := range dialsFor(log).all() {
			if strings.HasPrefix(d, "example.com") {
				t.Fatalf("the dialer was asked for %s", d)
			}
		}
		if len(other.Seen()) > 0 {
			t.Fatal("the example.com server was reached")
		}
	})
	t.Run("no_sni_refused", func(t *testing.T) {
		before := metric(t, c, `whatsapp_proxy_errors_total{kind="destination"}`)
		if _, err := tlsDial(t, listen, &tls.Config{InsecureSkipVerify: true}, false); err == nil {
			t.Fatal("a handshake without SNI succeeded through a passthrough route")
		}
		waitMetric(t, c, `whatsapp_proxy_errors_total{kind="destination"}`, before+1)
	})
	if got := dialsFor(log).all(); len(got) != 3 || got[0] != "mmg.whatsapp.net:443" || got[1] != "media-ams2-1.cdn.whatsapp.net:443" {
		t.Errorf("dialled %q; want the three allowed handshakes only", got)
	}
}

// ---- termination with Caddy's certificates, chat inside TLS ----

// sharedPort is the single-port layout of examples/tls.Caddyfile: a client
// that stays silent goes to silent; the byte matchers sit in one route (two
// matcher sets, OR'ed, so it waits while either needs bytes) whose subroute
// passes WhatsApp TLS through by SNI, terminates other TLS with Caddy's
// certificate for name and routes the decrypted stream again (WhatsApp
// chat to chat, anything else to tlsFallback), and sends plain chat to
// chat; anything else goes to fallback.
func sharedPort(name string, media, chat, tlsFallback, fallback, silent obj) []obj {
	return []obj{
		{"match": []obj{{"wa_silent": obj{"wait": "500ms"}}}, "handle": []obj{silent}},
		{"match": []obj{{"wa_tls": obj{}}, {"wa_xmpp": obj{}}}, "handle": []obj{{"handler": "subroute", "routes": []obj{
			{"match": []obj{{"wa_tls": obj{"sni": []string{"whatsapp.net", "*.whatsapp.net"}}}}, "handle": []obj{media}},
			{"match": []obj{{"wa_tls": obj{}}}, "handle": []obj{terminate(name)}},
			{"match": []obj{{"wa_xmpp": obj{}}}, "handle": []obj{chat}},
			{"handle": []obj{tlsFallback}},
		}}}},
		{"handle": []obj{fallback}},
	}
}

// localRoot returns the root certificate of Caddy's local CA, as the PKI
// app wrote it into storage.
func localRoot(t *testing.T, storage string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(storage, "pki", "authorities", "local", "root.crt"))
	if err != nil {
		t.Fatalf("Caddy's local CA root: %v", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatal("Caddy's local CA root is not PEM")
	}
	root, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// handshakeWhenReady retries a TLS handshake until Caddy has its
// certificate (the TLS app obtains it in the background at start).
func handshakeWhenReady(t *testing.T, addr string, cfg *tls.Config) *tls.Conn {
	t.Helper()
	var conn *tls.Conn
	var last error
	testutil.WaitFor(t, 15*time.Second, "a TLS handshake with Caddy's certificate", func() bool {
		conn, last = tlsDial(t, addr, cfg, false)
		if last != nil {
			conn.Close()
			return false
		}
		return true
	})
	if last != nil {
		t.Fatal(last)
	}
	return conn
}

// verifyLocalCA checks that the certificate served is Caddy's, issued by
// its local CA for name: it chains to the root in Caddy's storage, which
// Caddy generated during this test.
func verifyLocalCA(t *testing.T, st tls.ConnectionState, storage, name string, since time.Time) *x509.Certificate {
	t.Helper()
	root := localRoot(t, storage)
	if root.NotBefore.Before(since.Add(-2 * time.Minute)) {
		t.Errorf("the local CA root dates from %v; want one generated by this test's Caddy", root.NotBefore)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range st.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := st.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, Intermediates: inter}); err != nil {
		t.Fatalf("the served certificate (issuer %q) does not chain to Caddy's local CA for %s: %v", leaf.Issuer, name, err)
	}
	if !strings.Contains(leaf.Issuer.CommonName, "Caddy Local Authority") {
		t.Errorf("issuer %q; want Caddy's local authority", leaf.Issuer)
	}
	return leaf
}

// TestTLSTerminateSharedPort runs the one-port layout: TLS terminated with
// a certificate Caddy's internal CA issues (no file shipped), WhatsApp chat
// inside it carried through SOCKS5 to a local edge, non-chat inside TLS to
// its fallback, WhatsApp media TLS passed through by SNI, plain chat and
// anything else, all on one listener.
func TestTLSTerminateSharedPort(t *testing.T) {
	start := time.Now()
	storage := t.TempDir()
	const name = "proxy.waproxy.test"
	ca := newTestCA(t)
	media := startTLSEcho(t, ca.issue(t, "mmg.whatsapp.net"))
	chatEdge := testutil.StartEcho(t)
	_, chatPort, _ := net.SplitHostPort(chatEdge.Addr)
	tlsFallback, fallback := testutil.StartEcho(t), testutil.StartEcho(t)
	local := []string{"127.0.0.1"}
	listen, socks := testutil.FreeAddr(t), testutil.FreeAddr(t)
	routes := sharedPort(name,
		passthroughVia(map[string]string{"mmg.whatsapp.net:443": media.Addr}, newDialLog(t)),
		obj{"handler": "wa_proxy", "destination": "localhost:" + chatPort, "via": socksVia(socks), "allow": []string{"localhost"}},
		obj{"handler": "wa_proxy", "destination": tlsFallback.Addr, "allow": local},
		obj{"handler": "wa_proxy", "destination": fallback.Addr, "allow": local},
		obj{"handler": "close"},
	)
	c := testutil.StartCaddy(t, withTLSApps(t, proxyConfig(listen, routes, socks, nil), storage, name, obj{}))

	received := func(s *testutil.EchoServer, prefix []byte) func() bool {
		return func() bool {
			for _, r := range s.Received() {
				if bytes.HasPrefix(r, prefix) {
					return true
				}
			}
			return false
		}
	}

	for _, tc := range []struct {
		name    string
		version uint16
		sni     string
		split   bool
	}{
		{"tls13_no_sni", tls.VersionTLS13, "", false},
		{"tls12_no_sni", tls.VersionTLS12, "", false},
		{"tls13_own_name_split_hello", tls.VersionTLS13, name, true},
		{"tls13_unknown_name", tls.VersionTLS13, "unknown.example", false},
	} {
		t.Run("chat_in_"+tc.name, func(t *testing.T) {
			cfg := &tls.Config{InsecureSkipVerify: true, ServerName: tc.sni, MinVersion: tc.version, MaxVersion: tc.version}
			conn := handshakeWhenReady(t, listen, cfg)
			if tc.split { // the first handshake only waited for the certificate
				conn.Close()
				var err error
				if conn, err = tlsDial(t, listen, cfg, true); err != nil {
					t.Fatalf("handshake with a split ClientHello: %v", err)
				}
			}
			st := conn.ConnectionState()
			if st.Version != tc.version {
				t.Errorf("version %x; want %x", st.Version, tc.version)
			}
			verifyLocalCA(t, st, storage, name, start)
			hello := waHello()
			exchange(t, conn, hello)
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 1)
			for i := range 10 {
				exchange(t, conn, frame(randomBytes(100+i*1000)))
			}
			exchange(t, conn, frame(randomBytes(300_000)))
			conn.Close()
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 0)
			// the edge saw the decrypted hello, unmodified, first
			testutil.WaitFor(t, 5*time.Second, "the chat edge saw the decrypted hello", received(chatEdge, hello))
		})
	}

	t.Run("other_bytes_in_tls_to_tls_fallback", func(t *testing.T) {
		conn := handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true})
		msg := []byte("GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
		exchange(t, conn, msg)
		conn.Close()
		testutil.WaitFor(t, 5*time.Second, "the TLS fallback saw the decrypted bytes", received(tlsFallback, msg))
	})

	t.Run("media_sni_passed_through", func(t *testing.T) {
		conn := dialMedia(t, listen, ca, media, true)
		exchange(t, conn, []byte("media request"))
	})

	t.Run("plain_chat_byte_by_byte", func(t *testing.T) {
		conn := dial(t, listen)
		hello := waHello()
		for _, b := range hello[:8] { // one segment per byte (Nagle is off)
			if _, err := conn.Write([]byte{b}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := conn.Write(hello[8:]); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(hello))
		if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, hello) {
			t.Fatalf("echo of the hello: %x, %v", got, err)
		}
		conn.Close()
		testutil.WaitFor(t, 5*time.Second, "the chat edge saw the plain hello", received(chatEdge, hello))
	})

	t.Run("other_plain_bytes_to_fallback", func(t *testing.T) {
		conn := dial(t, listen)
		msg := []byte("SSH-2.0-OpenSSH_9.2p1\r\n")
		exchange(t, conn, msg)
		conn.Close()
		testutil.WaitFor(t, 5*time.Second, "the fallback saw the bytes", received(fallback, msg))
	})

	t.Run("silent_client_to_silent_route", func(t *testing.T) {
		conn := dial(t, listen)
		expectClosed(t, conn, 8*time.Second) // the silent route closes
	})
}

// TestTLSCertificateRenewed: the certificate Caddy's TLS app manages is
// renewed by certmagic before it expires, with no action: with a 6s
// lifetime and a 1s renewal check, a later handshake is served a new
// certificate from the same local CA.
func TestTLSCertificateRenewed(t *testing.T) {
	start := time.Now()
	storage := t.TempDir()
	const name = "proxy.waproxy.test"
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	routes := []obj{
		{"match": []obj{{"wa_tls": obj{}}}, "handle": []obj{terminate(name)}},
		chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}}),
	}
	testutil.StartCaddy(t, withTLSApps(t, proxyConfig(listen, routes, "", nil), storage, name,
		obj{"lifetime": "6s", "renew_interval": "1s"}))
	cfg := &tls.Config{InsecureSkipVerify: true}
	conn := handshakeWhenReady(t, listen, cfg)
	first := verifyLocalCA(t, conn.ConnectionState(), storage, name, start)
	exchange(t, conn, waHello())
	conn.Close()
	if life := first.NotAfter.Sub(first.NotBefore); life > 10*time.Second {
		t.Fatalf("certificate lifetime %v; want the configured 6s", life)
	}
	var renewed *x509.Certificate
	testutil.WaitFor(t, 20*time.Second, "a renewed certificate", func() bool {
		conn, err := tlsDial(t, listen, cfg, false)
		if err != nil {
			return false
		}
		defer conn.Close()
		leaf := conn.ConnectionState().PeerCertificates[0]
		if leaf.SerialNumber.Cmp(first.SerialNumber) != 0 {
			renewed = verifyLocalCA(t, conn.ConnectionState(), storage, name, start)
			return true
		}
		return false
	})
	if !renewed.NotAfter.After(first.NotAfter) {
		t.Errorf("renewed certificate expires %v, not after the first's %v", renewed.NotAfter, first.NotAfter)
	}
}

// ---- re-encryption: wa_proxy's tls option ----

// TestTLSUpstream: wa_proxy wraps the upstream leg in TLS, verifying the
// destination's certificate against the given CA file by default.
func TestTLSUpstream(t *testing.T) {
	ca := newTestCA(t)
	other := newTestCA(t)
	edge := startTLSEcho(t, ca.issue(t, "edge.waproxy.test", "127.0.0.1"))
	local := []string{"127.0.0.1"}
	cases := []struct {
		name    string
		tls     obj
		wantErr string // "" = the chat is carried
	}{
		{"verified_by_ip", obj{"ca_file": ca.pemFile}, ""},
		{"verified_server_name", obj{"ca_file": ca.pemFile, "server_name": "edge.waproxy.test"}, ""},
		{"wrong_ca", obj{"ca_file": other.pemFile}, "upstream_tls"},
		{"wrong_server_name", obj{"ca_file": ca.pemFile, "server_name": "other.waproxy.test"}, "upstream_tls"},
		{"system_roots", obj{}, "upstream_tls"},
		{"insecure_skip_verify", obj{"insecure_skip_verify": true}, ""},
	}
	servers := obj{}
	listens := make([]string, len(cases))
	for i, tc := range cases {
		listens[i] = testutil.FreeAddr(t)
		servers[tc.name] = obj{"listen": []string{listens[i]}, "routes": []obj{
			chatRoute(obj{"destination": edge.Addr, "allow": local, "tls": tc.tls}),
		}}
	}
	cfg, _ := json.Marshal(obj{
		"logging": obj{"logs": obj{"default": obj{"level": "ERROR"}}},
		"apps":    obj{"layer4": obj{"servers": servers}},
	})
	c := testutil.StartCaddy(t, string(cfg))
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			conn := dial(t, listens[i])
			hello := waHello()
			if tc.wantErr != "" {
				series := `whatsapp_proxy_errors_total{kind="` + tc.wantErr + `"}`
				before := metric(t, c, series)
				if _, err := conn.Write(hello); err != nil {
					t.Fatal(err)
				}
				expectClosed(t, conn, 8*time.Second)
				waitMetric(t, c, series, before+1)
				return
			}
			exchange(t, conn, hello)
			exchange(t, conn, frame(randomBytes(200_000)))
			conn.Close()
			testutil.WaitFor(t, 5*time.Second, "the TLS edge saw the hello first", func() bool {
				for _, s := range edge.Seen() {
					if bytes.HasPrefix(s.first, hello) {
						return true
					}
				}
				return false
			})
		})
	}
}

// TestTLSUpstreamProxyProtocol: with proxy_protocol, the PROXY header goes
// in clear before the upstream TLS handshake.
func TestTLSUpstreamProxyProtocol(t *testing.T) {
	ca := newTestCA(t)
	cert := ca.issue(t, "127.0.0.1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	type result struct {
		header string
		first  []byte
		err    error
	}
	results := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			results <- result{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		// the PROXY v1 header, byte by byte up to its CRLF, then TLS
		var hdr []byte
		b := make([]byte, 1)
		for !bytes.HasSuffix(hdr, []byte("\r\n")) && len(hdr) < 108 {
			if _, err := c.Read(b); err != nil {
				results <- result{err: err}
				return
			}
			hdr = append(hdr, b[0])
		}
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		first := make([]byte, 43)
		_, err = io.ReadFull(tc, first)
		if err == nil {
			_, err = tc.Write(first)
		}
		results <- result{header: string(hdr), first: first, err: err}
	}()
	listen := testutil.FreeAddr(t)
	testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": ln.Addr().String(), "allow": []string{"127.0.0.1"}, "proxy_protocol": "v1", "tls": obj{"ca_file": ca.pemFile}}),
	}, "", nil))
	conn := dial(t, listen)
	hello := waHello()
	exchange(t, conn, hello)
	r := <-results
	if r.err != nil {
		t.Fatal(r.err)
	}
	want := fmt.Sprintf("PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n", conn.LocalAddr().(*net.TCPAddr).Port, conn.RemoteAddr().(*net.TCPAddr).Port)
	if r.header != want || !bytes.Equal(r.first, hello) {
		t.Fatalf("upstream got header %q then %x; want %q then the hello", r.header, r.first, want)
	}
}

// ---- the shipped example ----

// rewriteExample adapts examples/tls.json to the test machine: it listens
// on listen, every wa_proxy to g.whatsapp.net:5222 goes to chat (allowed
// as 127.0.0.1) instead, the passthrough resolves WhatsApp names with
// test_resolve, and Caddy's storage is a temp dir. Routes and matchers stay
// as shipped.
func rewriteExample(t *testing.T, listen, chat, storage string, hosts map[string]string) string {
	t.Helper()
	raw, err := os.ReadFile("../examples/tls.json")
	if err != nil {
		t.Fatal(err)
	}
	var cfg obj
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	delete(cfg, "admin") // StartCaddy sets it
	cfg["storage"] = obj{"module": "file_system", "root": storage}
	servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
	if len(servers) != 1 {
		t.Fatalf("examples/tls.json has %d servers; want 1", len(servers))
	}
	for _, srv := range servers {
		srv.(obj)["listen"] = []string{listen}
	}
	counts := localHandlers(t, servers, chat, []string{"127.0.0.1"}, hosts, "")
	if counts["chat"] != 5 || counts["media"] != 1 {
		t.Fatalf("examples/tls.json has %v handlers; the test expects 5 chat and 1 media (update it)", counts)
	}
	out, _ := json.Marshal(cfg)
	return string(out)
}

// TestTLSExample runs examples/tls.json as shipped (but for its addresses):
// on one listener, chat inside TLS terminated with Caddy's internal-CA
// certificate, media TLS passed through by SNI, plain chat a byte at a
// time, and other bytes, each reach the right route.
func TestTLSExample(t *testing.T) {
	start := time.Now()
	storage := t.TempDir()
	ca := newTestCA(t)
	media := startTLSEcho(t, ca.issue(t, "mmg.whatsapp.net"))
	chat := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, rewriteExample(t, listen, chat.Addr, storage,
		map[string]string{"mmg.whatsapp.net:443": media.Addr}))

	// live waits until a connection of protocol is being proxied.
	live := func(t *testing.T, protocol string) {
		waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="`+protocol+`"}`, 1)
	}

	t.Run("chat_in_tls", func(t *testing.T) {
		conn := handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true})
		verifyLocalCA(t, conn.ConnectionState(), storage, "proxy.waproxy.internal", start)
		exchange(t, conn, waHello())
		live(t, "whatsapp")
		exchange(t, conn, frame(randomBytes(50_000)))
	})
	t.Run("chat_in_tls_split_hello", func(t *testing.T) {
		conn, err := tlsDial(t, listen, &tls.Config{InsecureSkipVerify: true, ServerName: "proxy.example"}, true)
		if err != nil {
			t.Fatal(err)
		}
		verifyLocalCA(t, conn.ConnectionState(), storage, "proxy.waproxy.internal", start)
		exchange(t, conn, cat(edPrologue(), waHello()))
	})
	t.Run("media_passthrough", func(t *testing.T) {
		conn := dialMedia(t, listen, ca, media, true)
		exchange(t, conn, []byte("GET /v/t62 HTTP/1.1\r\nHost: mmg.whatsapp.net\r\n\r\n"))
		live(t, "tls")
	})
	t.Run("plain_chat_byte_by_byte", func(t *testing.T) {
		conn := dial(t, listen)
		hello := waHello()
		for _, b := range hello[:6] {
			if _, err := conn.Write([]byte{b}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := conn.Write(hello[6:]); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(hello))
		if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, hello) {
			t.Fatalf("echo of the hello: %x, %v", got, err)
		}
	})
	t.Run("other_bytes_to_fallback", func(t *testing.T) {
		conn := dial(t, listen)
		exchange(t, conn, []byte("SSH-2.0-OpenSSH_9.2p1\r\n"))
		live(t, "raw")
	})
}

// cat joins byte slices.
func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestTLSConfigRejected: bad wa_tls and upstream tls settings fail at load
// with a clear error.
func TestTLSConfigRejected(t *testing.T) {
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	proxy := func(tlsOpts obj) obj {
		return obj{"handler": "wa_proxy", "destination": "g.whatsapp.net:443", "tls": tlsOpts}
	}
	for _, tc := range []struct {
		name  string
		route obj
		want  string
	}{
		{"ca_file missing", obj{"handle": []obj{proxy(obj{"ca_file": filepath.Join(t.TempDir(), "none.pem")})}}, "tls: reading ca_file"},
		{"ca_file not PEM", obj{"handle": []obj{proxy(obj{"ca_file": notPEM})}}, "holds no PEM certificate"},
		{"ca_file with insecure_skip_verify", obj{"handle": []obj{proxy(obj{"ca_file": newTestCA(t).pemFile, "insecure_skip_verify": true})}}, "ca_file has no effect"},
		{"sni star", obj{"match": []obj{{"wa_tls": obj{"sni": []string{"*"}}}}, "handle": []obj{{"handler": "close"}}}, "leave out sni"},
		{"sni with port", obj{"match": []obj{{"wa_tls": obj{"sni": []string{"mmg.whatsapp.net:443"}}}}, "handle": []obj{{"handler": "close"}}}, "invalid character ':'"},
		{"empty alpn", obj{"match": []obj{{"wa_tls": obj{"alpn": []string{""}}}}, "handle": []obj{{"handler": "close"}}}, "must be 1-255 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw, _ := json.Marshal(obj{"apps": obj{"layer4": obj{"servers": obj{"s": obj{
				"listen": []string{"127.0.0.1:0"},
				"routes": []obj{tc.route},
			}}}}})
			var cfg caddy.Config
			if err := json.Unmarshal(raw, &cfg); err != nil {
				t.Fatal(err)
			}
			err := caddy.Validate(&cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want one containing %q", err, tc.want)
			}
		})
	}
}
