//go:build linux

package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The tls figure: every target terminates TLS, as the official proxy's port
// 443 does (HAProxy `bind ... ssl crt`), and sends the decrypted chat stream
// to the echo edge. The client behaves like WhatsApp's on port 443: no server
// name (it connects to an IP address), no certificate check, and here no
// session resumption, so every connection is a full handshake.

// tlsServerName is the name the Caddy targets' certificates are for (the
// examples' `tls_automate_names`); the client sends no server name, and
// `default_sni`/`fallback_sni` make Caddy pick this one.
const tlsServerName = "proxy.waproxy.internal"

// certKinds are the key types of the certificates the bench generates.
var certKinds = map[string]string{
	"rsa2048": "RSA-2048",
	"rsa4096": "RSA-4096",
	"p256":    "ECDSA P-256",
}

// tlsRowNames are the rows -tls-certs accepts: a certificate every target
// serves, or "default", each target's own default certificate.
var tlsRowNames = []string{"rsa2048", "rsa4096", "p256", "default"}

// tlsBulkRow is the certificate row of the tlsbulk figure (TLS MB/s): the
// certificate only costs at the handshake, so one row is enough, and P-256
// is what the Caddy targets serve by default.
const tlsBulkRow = "p256"

// tlsRowLabel describes a row of the tls figure for the table.
func tlsRowLabel(row string) string {
	if row == "default" {
		return "each one's default certificate (HAProxy: official RSA-4096; Caddy: internal CA, P-256)"
	}
	return "same " + certKinds[row] + " certificate"
}

// certFiles is a generated certificate, shaped like the one the official
// proxy's generate-certs.sh makes at start: a CA and a leaf of the same key
// type, the leaf signed by the CA, CN=<random>.net.
type certFiles struct {
	kind string // rsa2048, rsa4096, p256
	cert string // the leaf, PEM
	key  string // its key, PKCS#8 PEM
	pem  string // key + leaf in one file, no CA (as the official proxy's PEM; for HAProxy)
}

// genCert writes a CA and a leaf of kind into dir. The leaf also names
// tlsServerName (a SAN, as the official script adds with SSL_DNS) so that
// Caddy can select it.
func genCert(dir, kind string) (*certFiles, error) {
	newKey := func() (crypto.Signer, error) {
		switch kind {
		case "rsa2048":
			return rsa.GenerateKey(rand.Reader, 2048)
		case "rsa4096":
			return rsa.GenerateKey(rand.Reader, 4096)
		case "p256":
			return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		}
		return nil, fmt.Errorf("unknown certificate key type %q", kind)
	}
	caKey, err := newKey()
	if err != nil {
		return nil, err
	}
	leafKey, err := newKey()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: randomName(20)},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(100, 0, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	if ca, err = x509.ParseCertificate(caDER); err != nil {
		return nil, err
	}
	usage := x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment
	if _, ok := leafKey.(*rsa.PrivateKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: randomName(12) + ".net"},
		DNSNames:  []string{tlsServerName},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0),
		BasicConstraintsValid: true, KeyUsage: usage,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, leafKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(leafKey)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	f := &certFiles{kind: kind, cert: filepath.Join(dir, kind+".crt"), key: filepath.Join(dir, kind+".key"),
		pem: filepath.Join(dir, kind+".pem")}
	for path, data := range map[string][]byte{f.cert: certPEM, f.key: keyPEM, f.pem: append(keyPEM, certPEM...)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// randomName returns n random lower-case letters and digits.
func randomName(n int) string {
	const alnum = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	for i := range b {
		b[i] = alnum[mrand.IntN(len(alnum))]
	}
	return string(b)
}

// clientTLS is the client's TLS configuration: like WhatsApp's chat client on
// port 443, no server name and no certificate check; no session cache, so
// every handshake is full. With groups "x25519" the client offers only X25519
// for the key exchange, so that every target does the same exchange (HAProxy
// 2.6 on OpenSSL 3.0 has no post-quantum group; a Go server would pick
// X25519MLKEM768 if it were offered); "default" keeps Go's own list.
func clientTLS(groups string) *tls.Config {
	c := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // as WhatsApp's client: the proxy's certificate is not checked
	if groups == "x25519" {
		c.CurvePreferences = []tls.CurveID{tls.X25519}
	}
	return c
}

// tlsServe is what a target serves in one run of the tls figure, and how
// the client connects to it.
type tlsServe struct {
	files  *certFiles  // the certificate; nil: Caddy's internal CA issues one at start
	want   string      // the leaf key type the client must be shown, e.g. "RSA-2048"
	client *tls.Config // the client's configuration

	mu   sync.Mutex
	seen string // what the readiness probe negotiated, for the report
}

// serve returns what target t serves in row, or nil when t has no such row
// (direct has no default certificate).
func (b *bench) serve(row string, t *target) *tlsServe {
	ts := &tlsServe{client: b.tlsClient}
	switch {
	case row != "default":
		ts.files, ts.want = b.certs[row], certKinds[row]
	case t.kind == kindHAProxy:
		ts.files, ts.want = b.certs["rsa4096"], certKinds["rsa4096"]
	case t.kind == kindCaddy:
		ts.want = certKinds["p256"] // certmagic's default key type
	default:
		return nil
	}
	return ts
}

// certsNeeded returns the certificate kinds the rows need (withDefault: the
// default row's, when HAProxy is in the run).
func certsNeeded(rows []string, withDefault bool) []string {
	var kinds []string
	add := func(k string) {
		for _, have := range kinds {
			if have == k {
				return
			}
		}
		kinds = append(kinds, k)
	}
	for _, r := range rows {
		if r == "default" {
			if withDefault {
				add("rsa4096") // HAProxy's default: the official proxy's certificate
			}
			continue
		}
		add(r)
	}
	return kinds
}

// haproxyPEM is the key + certificate file for `bind ... ssl crt`.
func (ts *tlsServe) haproxyPEM() string { return ts.files.pem }

// caddyApps returns the tls app (and, for the internal CA, the pki app) of a
// Caddy target: the generated certificate loaded from files, or, as in
// examples/tls.Caddyfile, one for tlsServerName from Caddy's internal CA,
// created at start, with the local CA kept out of the system trust store.
func (ts *tlsServe) caddyApps() map[string]any {
	if ts.files != nil {
		return map[string]any{"tls": map[string]any{"certificates": map[string]any{
			"load_files": []any{map[string]any{"certificate": ts.files.cert, "key": ts.files.key}},
		}}}
	}
	return map[string]any{
		"tls": map[string]any{
			"certificates": map[string]any{"automate": []string{tlsServerName}},
			"automation": map[string]any{"policies": []any{map[string]any{
				"subjects": []string{tlsServerName},
				"issuers":  []any{map[string]any{"module": "internal"}},
			}}},
		},
		"pki": map[string]any{"certificate_authorities": map[string]any{"local": map[string]any{"install_trust": false}}},
	}
}

// dial is the TLS connector: TCP connect, then a full handshake, bounded by
// opTimeout.
func (ts *tlsServe) dial(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	raw.SetDeadline(time.Now().Add(opTimeout))
	c := tls.Client(raw, ts.client)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	raw.SetDeadline(time.Time{})
	return c, nil
}

// probe is the readiness check of a TLS target: one exchange with edge e
// over TLS, as edge.probe makes it (for an echo edge the hello comes back,
// for a bulk edge the start of its stream arrives). Its connection also
// checks that the target presents the certificate type the row is about,
// and records what was negotiated.
func (ts *tlsServe) probe(ctx context.Context, e *edge, addr string) error {
	return e.probe(ctx, ts.dialChecked, addr)
}

// dialChecked is dial, then the certificate check of probe.
func (ts *tlsServe) dialChecked(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	c, err := ts.dial(ctx, d, addr)
	if err != nil {
		return nil, err
	}
	st := c.(*tls.Conn).ConnectionState()
	if len(st.PeerCertificates) == 0 {
		c.Close()
		return nil, errors.New("no certificate presented")
	}
	got := keyType(st.PeerCertificates[0].PublicKey)
	if ts.want != "" && got != ts.want {
		c.Close()
		return nil, fmt.Errorf("certificate key %s, want %s", got, ts.want)
	}
	ts.mu.Lock()
	ts.seen = fmt.Sprintf("%s, %s, %s, %s leaf, %d certificate(s) sent", tls.VersionName(st.Version),
		tls.CipherSuiteName(st.CipherSuite), st.CurveID, got, len(st.PeerCertificates))
	ts.mu.Unlock()
	return c, nil
}

// negotiated is what the last successful probe saw.
func (ts *tlsServe) negotiated() string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return ts.seen
}

// keyType names a certificate's public key: "RSA-2048", "ECDSA P-256".
func keyType(k any) string {
	switch k := k.(type) {
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA-%d", k.N.BitLen())
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	}
	return fmt.Sprintf("%T", k)
}

// tlsEdge is the direct target of the TLS figures: a TLS server in the
// bench process (Go's crypto/tls) serving the row's certificate, each
// connection served as the edge it stands for serves its own (an echo, or
// the bulk stream of the tlsbulk figure).
type tlsEdge struct {
	net.Listener
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func startTLSEdge(f *certFiles, handle func(net.Conn)) (*tlsEdge, error) {
	if f == nil {
		return nil, errors.New("no certificate for a direct TLS edge")
	}
	cert, err := tls.LoadX509KeyPair(f.cert, f.key)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	e := &tlsEdge{Listener: tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}}),
		conns: map[net.Conn]struct{}{}}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := e.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(5 * time.Millisecond)
				continue
			}
			e.mu.Lock()
			if e.conns == nil {
				e.mu.Unlock()
				c.Close()
				return
			}
			e.conns[c] = struct{}{}
			e.mu.Unlock()
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				handle(c)
				c.Close()
				e.mu.Lock()
				delete(e.conns, c)
				e.mu.Unlock()
			}()
		}
	}()
	return e, nil
}

// Close stops the listener, closes every connection and waits for them.
func (e *tlsEdge) Close() error {
	err := e.Listener.Close()
	e.mu.Lock()
	for c := range e.conns {
		c.Close()
	}
	e.conns = nil
	e.mu.Unlock()
	e.wg.Wait()
	return err
}

// goMem is a Caddy process's view of its own memory, from its admin
// endpoint, right after a garbage collection.
type goMem struct {
	stack      int64 // StackInuse: goroutine stacks
	heap       int64 // HeapAlloc after the collection: live heap objects
	goroutines int
}

// readGoMem asks a Caddy process (admin endpoint admin) to collect garbage
// (/debug/pprof/heap?gc=1), then reads its memory statistics (/debug/vars)
// and goroutine count (/debug/pprof/goroutine). With profile set, the heap
// profile is saved there (inspect with `go tool pprof -sample_index=inuse_space`).
func readGoMem(ctx context.Context, admin, profile string) (goMem, error) {
	get := func(path string) ([]byte, error) {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(cctx, http.MethodGet, "http://"+admin+path, nil)
		if err != nil {
			return nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("GET %s: %s", path, resp.Status)
		}
		return body, err
	}
	var m goMem
	heap, err := get("/debug/pprof/heap?gc=1")
	if err != nil {
		return m, err
	}
	if profile != "" {
		if err := os.WriteFile(profile, heap, 0o644); err != nil {
			return m, err
		}
	}
	vars, err := get("/debug/vars")
	if err != nil {
		return m, err
	}
	var v struct {
		Memstats struct{ StackInuse, HeapAlloc int64 } `json:"memstats"`
	}
	if err := json.Unmarshal(vars, &v); err != nil {
		return m, fmt.Errorf("/debug/vars: %w", err)
	}
	m.stack, m.heap = v.Memstats.StackInuse, v.Memstats.HeapAlloc
	g, err := get("/debug/pprof/goroutine?debug=1")
	if err != nil {
		return m, err
	}
	m.goroutines, err = goroutineTotal(string(g))
	return m, err
}

// goroutineTotal reads N from the first line of a debug=1 goroutine
// profile, "goroutine profile: total N".
func goroutineTotal(profile string) (int, error) {
	line, _, _ := strings.Cut(profile, "\n")
	n, ok := strings.CutPrefix(line, "goroutine profile: total ")
	if !ok {
		return 0, fmt.Errorf("goroutine profile starts %q", line)
	}
	return strconv.Atoi(strings.TrimSpace(n))
}

// Routes of the Caddy targets when they terminate TLS.

func tlsPolicies() []any {
	return []any{map[string]any{"default_sni": tlsServerName, "fallback_sni": tlsServerName}}
}

// caddyL4TLSRoutes is stock caddy-l4: its tls matcher, its tls handler, its
// proxy to the edge.
func caddyL4TLSRoutes(edge, _ string) any {
	return []any{map[string]any{
		"match": []any{map[string]any{"tls": map[string]any{}}},
		"handle": []any{
			map[string]any{"handler": "tls", "connection_policies": tlsPolicies()},
			map[string]any{"handler": "proxy", "upstreams": []any{map[string]any{"dial": []string{edge}}}},
		},
	}}
}

// waproxyTLSRoutes are the routes of examples/tls.Caddyfile (the single-port
// proxy as shipped) with every chat destination replaced by the edge:
// wa_silent first; then wa_tls or wa_xmpp into a subroute that passes
// WhatsApp's media through by server name, terminates any other TLS with
// wa_tls_terminate (caddy-l4's tls handler within a handshake timeout) and
// sorts the decrypted bytes in a subroute of their own, and sends chat
// (plain or decrypted) and anything else to the edge with wa_proxy; a last
// catch-all route. With socks, every wa_proxy dials through that SOCKS5
// server.
func waproxyTLSRoutes(edge, socks string) any { return waproxyTLSLayout(edge, socks, true) }

// waproxyTLSRoutesBefore are those routes as shipped before wa_tls_terminate
// (7533808), for a build without it (just ab against an older revision):
// caddy-l4's tls handler, the decrypted bytes sorted by the routes after it.
func waproxyTLSRoutesBefore(edge, socks string) any { return waproxyTLSLayout(edge, socks, false) }

func waproxyTLSLayout(edge, socks string, withTerminate bool) any {
	toEdge := func() []any { return []any{waProxy(edge, socks, "127.0.0.1")} }
	chat := map[string]any{"match": []any{map[string]any{"wa_xmpp": map[string]any{}}}, "handle": toEdge()}
	terminate := map[string]any{
		"match":  []any{map[string]any{"wa_tls": map[string]any{}}},
		"handle": []any{map[string]any{"handler": "tls", "connection_policies": tlsPolicies()}},
	}
	after := []any{chat, map[string]any{"handle": toEdge()}} // chat, plain or decrypted; other decrypted bytes
	if withTerminate {
		terminate["handle"] = []any{
			map[string]any{"handler": "wa_tls_terminate", "connection_policies": tlsPolicies()},
			map[string]any{"handler": "subroute", "routes": []any{
				map[string]any{"match": []any{map[string]any{"wa_xmpp": map[string]any{}}}, "handle": toEdge()},
				map[string]any{"handle": toEdge()},
			}},
		}
		after = []any{chat} // plain chat
	}
	return []any{
		map[string]any{
			"match":  []any{map[string]any{"wa_silent": map[string]any{"wait": int64(2 * time.Second)}}},
			"handle": toEdge(),
		},
		map[string]any{
			"match": []any{map[string]any{"wa_tls": map[string]any{}}, map[string]any{"wa_xmpp": map[string]any{}}},
			"handle": []any{map[string]any{"handler": "subroute", "routes": append([]any{
				map[string]any{
					"match": []any{map[string]any{"wa_tls": map[string]any{
						"sni": []string{"whatsapp.net", "*.whatsapp.net", "whatsapp.com", "*.whatsapp.com"}}}},
					"handle": []any{waProxy("{l4.wa_tls.server_name}:443", socks)},
				},
				terminate,
			}, after...)}},
		},
		map[string]any{"handle": toEdge()},
	}
}
