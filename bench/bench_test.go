//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	nan := math.NaN()
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{nan, 7, nan}, 7},
		{[]float64{9, nan, 1}, 5},
	} {
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if got := median(nil); !math.IsNaN(got) {
		t.Errorf("median(nil) = %v, want NaN", got)
	}
	if got := median([]float64{nan, nan}); !math.IsNaN(got) {
		t.Errorf("median(all NaN) = %v, want NaN", got)
	}
}

func TestSameRoundRatios(t *testing.T) {
	nan := math.NaN()
	a := []float64{10, 20, nan, 30}
	b := []float64{5, 0, 4, 10}
	got := sameRoundRatios(a, b)
	want := []float64{2, 3} // round 2 divides by zero, round 3 has no a
	if len(got) != len(want) {
		t.Fatalf("sameRoundRatios = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("sameRoundRatios = %v, want %v", got, want)
		}
	}
}

func TestRatioIsMedianOfSameRoundRatios(t *testing.T) {
	ts := []*target{{name: "waproxy", kind: kindCaddy}, {name: baseline, kind: kindHAProxy}}
	r := newResults(ts, []metric{{key: "chat", format: formatCount}}, 3, nil)
	// Same-round ratios are 2, 2 and 1: their median is 2, while the ratio
	// of the medians (20/19) would hide that waproxy was twice as fast in
	// two rounds out of three.
	for i, v := range [][2]float64{{40, 20}, {20, 10}, {19, 19}} {
		r.set("chat", "waproxy", i, v[0])
		r.set("chat", baseline, i, v[1])
	}
	if got := r.ratio("chat", "waproxy", baseline); got != 2 {
		t.Errorf("ratio = %v, want 2", got)
	}
}

func TestFormatRatio(t *testing.T) {
	for _, tc := range []struct {
		in   float64
		want string
	}{
		{1, "1.00×"},
		{0.456, "0.46×"},
		{10.675, "10.68×"},
		{math.NaN(), "–"},
		{math.Inf(1), "–"},
	} {
		if got := formatRatio(tc.in); got != tc.want {
			t.Errorf("formatRatio(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestFormatCount(t *testing.T) {
	for _, tc := range []struct {
		in   float64
		want string
	}{
		{0, "0"},
		{999, "999"},
		{1000, "1,000"},
		{36486.4, "36,486"},
		{1234567.5, "1,234,568"},
		{-3418, "-3,418"},
		{-0.2, "0"},
		{math.NaN(), "–"},
	} {
		if got := formatCount(tc.in); got != tc.want {
			t.Errorf("formatCount(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

const statusSample = `Name:	haproxy
Umask:	0022
State:	S (sleeping)
VmPeak:	  120044 kB
VmSize:	  119020 kB
VmHWM:	   21000 kB
VmRSS:	   18432 kB
RssAnon:	    6144 kB
Threads:	2
`

func TestProcField(t *testing.T) {
	got, err := procField(statusSample, "VmRSS")
	if err != nil || got != 18432*1024 {
		t.Errorf("VmRSS = %d, %v; want %d", got, err, 18432*1024)
	}
	// A key that is a prefix of another (VmRSS vs RssAnon) must not match.
	if got, err := procField(statusSample, "Rss"); err == nil {
		t.Errorf("Rss = %d, want an error", got)
	}
	if got, err := procField(statusSample, "Threads"); err != nil || got != 2 {
		t.Errorf("Threads = %d, %v; want 2 (no unit)", got, err)
	}
	for _, bad := range []string{"VmRSS:\n", "VmRSS: x kB\n", "VmRSS: 12 MB\n", ""} {
		if got, err := procField(bad, "VmRSS"); err == nil {
			t.Errorf("procField(%q) = %d, want an error", bad, got)
		}
	}
}

func TestParseSmapsRollup(t *testing.T) {
	text := `55d0c0a00000-7ffd5c9f3000 ---p 00000000 00:00 0                          [rollup]
Rss:               20480 kB
Pss:               16896 kB
Pss_Anon:           6144 kB
Shared_Clean:       4096 kB
Private_Clean:      2048 kB
Private_Dirty:      6144 kB
`
	pss, private := parseSmapsRollup(text)
	if pss != 16896*1024 || private != (2048+6144)*1024 {
		t.Errorf("pss, private = %d, %d; want %d, %d", pss, private, 16896*1024, (2048+6144)*1024)
	}
	if pss, private := parseSmapsRollup(""); pss != 0 || private != 0 {
		t.Errorf("empty rollup = %d, %d; want 0, 0", pss, private)
	}
}

func TestReadMemOfSelf(t *testing.T) {
	s, err := readMem(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.RSS <= 0 {
		t.Errorf("RSS of this test = %d, want > 0", s.RSS)
	}
}

func TestStatCPUTicks(t *testing.T) {
	// The command name holds a space and a ')' to show fields are counted
	// from the last one.
	text := "4242 (my prog) x) S 1 4242 4242 0 -1 4194304 103 0 0 0 57 13 0 0 20 0 2 0 80973 3133440 408\n"
	got, err := statCPUTicks(text)
	if err != nil || got != 70 {
		t.Errorf("statCPUTicks = %d, %v; want 70", got, err)
	}
	if _, err := statCPUTicks("4242 (short) S 1 2"); err == nil {
		t.Error("short stat line: want an error")
	}
	if _, err := readCPU(os.Getpid()); err != nil {
		t.Errorf("readCPU(self): %v", err)
	}
}

func TestMachineBusyTicks(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice:
	// idle and iowait are not busy; guest is already in user.
	text := "cpu  100 2 30 5000 7 1 4 3 50 0\ncpu0 50 1 15 2500 3 0 2 1 25 0\n"
	got, err := machineBusyTicks(text)
	if err != nil || got != 140 {
		t.Errorf("machineBusyTicks = %d, %v; want 140", got, err)
	}
	for _, bad := range []string{"cpu0 1 2 3 4 5 6 7 8\n", "cpu 1 2 3\n", "cpu 1 x 3 4 5 6 7 8\n"} {
		if _, err := machineBusyTicks(bad); err == nil {
			t.Errorf("machineBusyTicks(%q): want an error", bad)
		}
	}
	c0, err := readMachineCPU()
	if err != nil {
		t.Fatalf("readMachineCPU: %v", err)
	}
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
		// busy for a while, so that the machine's counters move
	}
	if c1, err := readMachineCPU(); err != nil || c1 <= c0 {
		t.Errorf("readMachineCPU after 300 ms of spinning = %v (before: %v), %v; want more", c1, c0, err)
	}
}

func TestIsStable(t *testing.T) {
	const mb = 1 << 20
	for _, tc := range []struct {
		name string
		hist []int64
		want bool
	}{
		{"too few readings", []int64{10 * mb, 10 * mb}, false},
		{"flat", []int64{50 * mb, 10 * mb, 10 * mb, 10 * mb, 10 * mb, 10 * mb}, true},
		{"within 128 KiB", []int64{10 * mb, 10*mb + 100<<10, 10 * mb, 10*mb + 50<<10, 10 * mb}, true},
		{"still growing", []int64{10 * mb, 11 * mb, 12 * mb, 13 * mb, 14 * mb}, false},
		{"within 0.2% of a large RSS", []int64{1000 * mb, 1001 * mb, 1000 * mb, 1001 * mb, 1001 * mb}, true},
	} {
		if got := isStable(tc.hist, stableWindow); got != tc.want {
			t.Errorf("%s: isStable = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestPercentile(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	for _, tc := range []struct {
		p    float64
		want time.Duration
	}{{50, 50 * time.Millisecond}, {99, 99 * time.Millisecond}, {100, 100 * time.Millisecond}, {1, time.Millisecond}} {
		if got := percentile(ds, tc.p); got != tc.want {
			t.Errorf("p%v = %v, want %v", tc.p, got, tc.want)
		}
	}
	if got := percentile(nil, 99); got != 0 {
		t.Errorf("p99 of nothing = %v, want 0", got)
	}
}

func TestHelloAndFrame(t *testing.T) {
	b := make([]byte, helloLen)
	putHello(b, rand.New(rand.NewPCG(1, 2)))
	want := []byte{0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24, 0x12, 0x22, 0x0A, 0x20}
	if !bytes.Equal(b[:11], want) {
		t.Errorf("hello starts % x, want % x", b[:11], want)
	}
	// The frame length in the hello covers the rest of it: 3 + 4 + 32 = 43.
	if n := int(b[4])<<16 | int(b[5])<<8 | int(b[6]); 7+n != helloLen {
		t.Errorf("hello frame length %d does not cover the %d-byte hello", n, helloLen)
	}
	f := appendFrame([]byte{0xff}, bytes.Repeat([]byte{1}, 0x010203))
	if len(f) != 1+3+0x010203 || f[1] != 1 || f[2] != 2 || f[3] != 3 {
		t.Errorf("frame header % x, want ff 01 02 03", f[:4])
	}
}

func TestHAProxyConfig(t *testing.T) {
	cfg := haproxyConfig(4096, "127.0.0.1:4000", "127.0.0.1:5000", "")
	for _, line := range []string{
		"maxconn 27500", "tune.bufsize 4096", "mode tcp", "timeout connect 5s",
		"timeout client 200s", "timeout server 200s", "timeout client-fin 1s",
		"timeout server-fin 1s", "bind 127.0.0.1:4000", "server edge 127.0.0.1:5000",
	} {
		if !strings.Contains(cfg, "    "+line+"\n") {
			t.Errorf("HAProxy config lacks %q:\n%s", line, cfg)
		}
	}
	for _, absent := range []string{"send-proxy", "check", "nbproc", "master-worker", "ssl"} {
		if strings.Contains(cfg, absent) {
			t.Errorf("HAProxy config has %q:\n%s", absent, cfg)
		}
	}
	// With a PEM file the frontend terminates TLS, as the official port 443.
	tlsCfg := haproxyConfig(4096, "127.0.0.1:4000", "127.0.0.1:5000", "/tmp/x/p256.pem")
	if !strings.Contains(tlsCfg, "    bind 127.0.0.1:4000 ssl crt /tmp/x/p256.pem\n") ||
		!strings.Contains(tlsCfg, "    tune.bufsize 4096\n") || !strings.Contains(tlsCfg, "    mode tcp\n") {
		t.Errorf("HAProxy TLS config:\n%s", tlsCfg)
	}
}

func TestCaddyConfig(t *testing.T) {
	for _, tgt := range allTargets() {
		if tgt.kind != kindCaddy {
			continue
		}
		socks := ""
		if tgt.socks {
			socks = "127.0.0.1:1080"
		}
		raw, err := caddyConfig("127.0.0.1:2019", "127.0.0.1:4000", "/tmp/x", tgt.routes("127.0.0.1:5000", socks), nil)
		if err != nil {
			t.Fatal(err)
		}
		var cfg struct {
			Admin struct {
				Listen string `json:"listen"`
			} `json:"admin"`
			Logging struct {
				Logs map[string]struct {
					Level string `json:"level"`
				} `json:"logs"`
			} `json:"logging"`
			Apps struct {
				Layer4 struct {
					Servers map[string]struct {
						Listen []string          `json:"listen"`
						Routes []json.RawMessage `json:"routes"`
					} `json:"servers"`
				} `json:"layer4"`
			} `json:"apps"`
		}
		if err := json.Unmarshal(raw, &cfg); err != nil {
			t.Fatalf("%s: %v", tgt.name, err)
		}
		srv := cfg.Apps.Layer4.Servers["bench"]
		if cfg.Admin.Listen != "127.0.0.1:2019" || cfg.Logging.Logs["default"].Level != "WARN" ||
			len(srv.Listen) != 1 || srv.Listen[0] != "127.0.0.1:4000" || len(srv.Routes) != 1 {
			t.Errorf("%s: unexpected config:\n%s", tgt.name, raw)
		}
		route := string(srv.Routes[0])
		var want []string
		switch tgt.name {
		case "caddy-l4":
			want = []string{`"handler":"proxy"`, `"dial":["127.0.0.1:5000"]`}
		case "waproxy":
			want = []string{`"wa_xmpp":{}`, `"handler":"wa_proxy"`, `"destination":"127.0.0.1:5000"`, `"allow":["127.0.0.1"]`}
		case "waproxy-socks5":
			want = []string{`"wa_xmpp":{}`, `"handler":"wa_proxy"`, `"destination":"127.0.0.1:5000"`, `"allow":["127.0.0.1"]`,
				`"via":{"dialer":"socks5","servers":["127.0.0.1:1080"]}`}
		}
		compact := &bytes.Buffer{}
		json.Compact(compact, []byte(route))
		for _, w := range want {
			if !strings.Contains(compact.String(), w) {
				t.Errorf("%s route lacks %s: %s", tgt.name, w, compact)
			}
		}
		if !tgt.socks && strings.Contains(compact.String(), `"via"`) {
			t.Errorf("%s dials through a SOCKS5 server: %s", tgt.name, compact)
		}
	}
}

func TestParseFlagsQuick(t *testing.T) {
	cfg, err := parseFlags([]string{"-quick", "-rounds", "2"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.rounds != 2 || cfg.duration != time.Second || cfg.idleConns != 500 {
		t.Errorf("-quick -rounds 2: rounds %d, duration %s, idle %d; want 2, 1s, 500", cfg.rounds, cfg.duration, cfg.idleConns)
	}
	if !slices.Equal(cfg.tlsCerts, []string{"p256"}) || cfg.tlsIdleConns != 300 {
		t.Errorf("-quick: tls certs %v, idle TLS %d; want [p256], 300", cfg.tlsCerts, cfg.tlsIdleConns)
	}
	if !cfg.scaling || !slices.Equal(levels(cfg.idleConns), []int{55, 277, 500}) {
		t.Errorf("-quick: scaling %v at %v; want true at [55 277 500]", cfg.scaling, levels(cfg.idleConns))
	}
	full, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(full.targets, []string{"direct", "haproxy-official", "haproxy-16k", "caddy-l4", "waproxy", "waproxy-socks5", "microsocks"}) ||
		!full.scaling || !slices.Equal(levels(full.idleConns), []int{1000, 5000, 9000}) || full.microsocks != "/usr/bin/microsocks" {
		t.Errorf("defaults: targets %v, scaling %v at %v, microsocks %s", full.targets, full.scaling, levels(full.idleConns), full.microsocks)
	}
	if !slices.Equal(full.figures, []string{"chat", "idle", "bulk", "tls", "tlsbulk"}) ||
		!slices.Equal(full.tlsCerts, []string{"rsa2048", "p256", "default"}) || full.tlsGroups != "x25519" {
		t.Errorf("defaults: figures %v, tls certs %v, groups %s", full.figures, full.tlsCerts, full.tlsGroups)
	}
	for _, bad := range [][]string{{"-targets", "nginx"}, {"-figures", "splice"}, {"-rounds", "0"}, {"stray"},
		{"-tls-certs", "dsa"}, {"-tls-certs", ","}, {"-tls-idle-cert", "ed25519"}, {"-tls-groups", "p384"}, {"-tls-workers", "0"}, {"-idle-frame", "-1"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q): want an error", bad)
		}
	}
}

func TestGenCert(t *testing.T) {
	dir := t.TempDir()
	for kind, want := range map[string]string{"p256": "ECDSA P-256", "rsa2048": "RSA-2048"} {
		f, err := genCert(dir, kind)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			t.Fatalf("%s: load cert and key: %v", kind, err)
		}
		leaf, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		if got := keyType(leaf.PublicKey); got != want {
			t.Errorf("%s: leaf key %s, want %s", kind, got, want)
		}
		if leaf.Issuer.CommonName == leaf.Subject.CommonName || !strings.HasSuffix(leaf.Subject.CommonName, ".net") ||
			!slices.Contains(leaf.DNSNames, tlsServerName) || leaf.IsCA {
			t.Errorf("%s: leaf subject %q issuer %q SANs %v CA %v; want a <random>.net leaf signed by a CA, naming %s",
				kind, leaf.Subject.CommonName, leaf.Issuer.CommonName, leaf.DNSNames, leaf.IsCA, tlsServerName)
		}
		// HAProxy's file: the key, then the leaf, and no CA.
		pemData, err := os.ReadFile(f.pem)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(pemData, []byte("-----BEGIN PRIVATE KEY-----")) || bytes.Count(pemData, []byte("BEGIN CERTIFICATE")) != 1 {
			t.Errorf("%s: PEM is not key + leaf:\n%s", kind, pemData)
		}
		if _, err := tls.X509KeyPair(pemData, pemData); err != nil {
			t.Errorf("%s: PEM does not load as a key pair: %v", kind, err)
		}
	}
	if _, err := genCert(dir, "dsa"); err == nil {
		t.Error("genCert(dsa): want an error")
	}
}

// A TLS exchange through real sockets: the direct target's TLS edge, the
// client's configuration and the readiness probe's certificate check.
func TestTLSEdgeProbe(t *testing.T) {
	f, err := genCert(t.TempDir(), "p256")
	if err != nil {
		t.Fatal(err)
	}
	echoEdge := &edge{}
	e, err := startTLSEdge(f, echoEdge.handle)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx := context.Background()
	ts := &tlsServe{files: f, want: "ECDSA P-256", client: clientTLS("x25519")}
	if err := ts.probe(ctx, echoEdge, e.Addr().String()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"TLS 1.3", "X25519", "ECDSA P-256 leaf", "1 certificate(s)"} {
		if !strings.Contains(ts.negotiated(), want) {
			t.Errorf("negotiated %q lacks %q", ts.negotiated(), want)
		}
	}
	wrong := &tlsServe{files: f, want: "RSA-2048", client: clientTLS("x25519")}
	if err := wrong.probe(ctx, echoEdge, e.Addr().String()); err == nil || !strings.Contains(err.Error(), "want RSA-2048") {
		t.Errorf("probe of a P-256 edge wanting RSA-2048: %v, want a key type error", err)
	}
	// The load loop over TLS: every exchange is a full handshake.
	res := runChat(ctx, ts.dial, e.Addr().String(), 2, 200*time.Millisecond)
	if res.Conns == 0 || res.Errors > 0 {
		t.Errorf("TLS exchanges: %d done, %d failed (%s)", res.Conns, res.Errors, res.FirstErr)
	}
}

// The tlsbulk figure's path through real sockets: the direct target's TLS
// edge serving the bulk stream, checked by the readiness probe, then the
// bulk loop over TLS; and, when HAProxy is installed, haproxy-16k
// terminating TLS in front of the plain bulk edge.
func TestTLSBulk(t *testing.T) {
	dir := t.TempDir()
	f, err := genCert(dir, "p256")
	if err != nil {
		t.Fatal(err)
	}
	bulkEdge, err := startEdge(true, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer bulkEdge.close()
	ctx := context.Background()
	ts := &tlsServe{files: f, want: "ECDSA P-256", client: clientTLS("x25519")}
	run := func(tg *target, bin *binaries) {
		t.Helper()
		p, err := tg.start(ctx, dir, 1, bin, bulkEdge, ts)
		if err != nil {
			t.Fatalf("%s: %v", tg.name, err)
		}
		defer p.stop()
		if p.addr == bulkEdge.addr() || !strings.Contains(ts.negotiated(), "ECDSA P-256 leaf") {
			t.Errorf("%s: address %s (the plain edge is %s), negotiated %q", tg.name, p.addr, bulkEdge.addr(), ts.negotiated())
		}
		// A plain hello gets no bulk stream from a TLS listener.
		if err := bulkEdge.probe(ctx, dialTCP, p.addr); err == nil {
			t.Errorf("%s: a plain hello to the TLS listener got the bulk stream", tg.name)
		}
		res := runBulk(ctx, ts.dial, p.addr, 2, 50*time.Millisecond, 200*time.Millisecond)
		if res.Streams != 2 || res.Errors > 0 || res.MBps <= 0 || res.Total <= 0 {
			t.Errorf("%s: TLS bulk: %d streams, %d errors (%s), %.1f MB/s, %d bytes", tg.name, res.Streams, res.Errors, res.FirstErr, res.MBps, res.Total)
		}
	}
	run(&target{name: "direct", kind: kindDirect}, &binaries{})
	// The probe sees a bulk edge's stream, not an echo, and checks the key type.
	if _, err := (&target{name: "direct", kind: kindDirect}).start(ctx, dir, 2, &binaries{}, bulkEdge,
		&tlsServe{files: f, want: "RSA-2048", client: clientTLS("x25519")}); err == nil || !strings.Contains(err.Error(), "want RSA-2048") {
		t.Errorf("direct TLS bulk edge wanting RSA-2048: %v, want a key type error", err)
	}
	haproxy := "/usr/sbin/haproxy"
	if _, err := os.Stat(haproxy); err != nil {
		if os.Getenv("WAPROXY_INTEROP") == "1" {
			t.Fatalf("%s not found (WAPROXY_INTEROP=1): apt-get install haproxy", haproxy)
		}
		t.Skipf("%s not found: apt-get install haproxy", haproxy)
	}
	run(&target{name: "haproxy-16k", kind: kindHAProxy, bufsize: 16384}, &binaries{haproxy: haproxy})
}

func TestCaddyTLSConfig(t *testing.T) {
	files := &certFiles{kind: "p256", cert: "/tmp/x/p256.crt", key: "/tmp/x/p256.key"}
	for _, tc := range []struct {
		ts   *tlsServe
		want []string
	}{
		{&tlsServe{files: files}, []string{`"load_files":[{"certificate":"/tmp/x/p256.crt","key":"/tmp/x/p256.key"}]`}},
		{&tlsServe{}, []string{`"automate":["proxy.waproxy.internal"]`, `"module":"internal"`, `"install_trust":false`}},
	} {
		for _, tgt := range allTargets() {
			if tgt.kind != kindCaddy {
				continue
			}
			socks := ""
			if tgt.socks {
				socks = "127.0.0.1:1080"
			}
			raw, err := caddyConfig("127.0.0.1:2019", "127.0.0.1:4000", "/tmp/x", tgt.tlsRoutes("127.0.0.1:5000", socks), tc.ts.caddyApps())
			if err != nil {
				t.Fatal(err)
			}
			compact := &bytes.Buffer{}
			if err := json.Compact(compact, raw); err != nil {
				t.Fatal(err)
			}
			want := append([]string{`"layer4":`, `"default_sni":"proxy.waproxy.internal"`}, tc.want...)
			switch tgt.name {
			case "caddy-l4":
				want = append(want, `"tls":{}`, `"handler":"tls"`, `"handler":"proxy"`, `"dial":["127.0.0.1:5000"]`)
			case "waproxy", "waproxy-socks5":
				want = append(want, `"wa_silent":`, `"wa_tls":{}`, `"handler":"wa_tls_terminate"`, `"handler":"subroute"`, `"wa_xmpp":{}`,
					`"destination":"127.0.0.1:5000"`, `"destination":"{l4.wa_tls.server_name}:443"`)
			}
			// With the exit hop every wa_proxy dials through it: the
			// silent, media passthrough, chat decrypted and plain, the two catch-alls (6 handlers).
			via := `"via":{"dialer":"socks5","servers":["127.0.0.1:1080"]}`
			if n, want := strings.Count(compact.String(), via), map[bool]int{true: 6}[tgt.socks]; n != want {
				t.Errorf("%s TLS config: %d handlers dial through SOCKS5, want %d: %s", tgt.name, n, want, compact)
			}
			for _, w := range want {
				if !strings.Contains(compact.String(), w) {
					t.Errorf("%s TLS config lacks %s: %s", tgt.name, w, compact)
				}
			}
		}
	}
}

func TestSteps(t *testing.T) {
	direct := &target{name: "direct", kind: kindDirect}
	ha := &target{name: baseline, kind: kindHAProxy}
	wa := &target{name: "waproxy", kind: kindCaddy}
	via := &target{name: viaSOCKS, kind: kindCaddy, socks: true}
	ms := &target{name: socksOnly, kind: kindSOCKS}
	steps := func(args ...string) []string {
		t.Helper()
		cfg, err := parseFlags(append([]string{"-figures", "idle,tls", "-tls-certs", "p256,default"}, args...))
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, s := range (&bench{cfg: cfg}).steps([]*target{wa, direct, ha, via, ms}) {
			name := s.fig
			if s.row != "" {
				name += " " + s.row
			}
			if s.held != 0 {
				name += fmt.Sprintf(" %d", s.held)
			}
			got = append(got, name+" "+s.t.name)
		}
		return got
	}
	tlsSteps := []string{
		"tls p256 waproxy", "tls p256 direct", "tls p256 haproxy-official", "tls p256 waproxy-socks5",
		"tls default waproxy", "tls default haproxy-official",
		"tls-idle p256 waproxy", "tls-idle p256 haproxy-official",
	}
	if via.tlsRuns("rsa2048", false) || via.tlsRuns("p256", true) || ms.tlsRuns("p256", false) || !wa.tlsRuns("rsa2048", false) {
		t.Error("tlsRuns: waproxy-socks5 runs the P-256 conn/s row alone, microsocks none, waproxy every row")
	}
	// -scaling (the default): one idle run per count, the smallest first,
	// every target but direct.
	var want []string
	for _, n := range []int{1000, 5000, 9000} {
		for _, name := range []string{"waproxy", "haproxy-official", "waproxy-socks5", "microsocks"} {
			want = append(want, fmt.Sprintf("idle %d %s", n, name))
		}
	}
	want = append(want, tlsSteps...)
	if got := steps(); !slices.Equal(got, want) {
		t.Errorf("steps:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	want = append([]string{"idle waproxy", "idle haproxy-official", "idle waproxy-socks5", "idle microsocks"}, tlsSteps...)
	if got := steps("-scaling=false"); !slices.Equal(got, want) {
		t.Errorf("steps, -scaling=false:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if got := certsNeeded([]string{"p256", "default", "p256"}, true); !slices.Equal(got, []string{"p256", "rsa4096"}) {
		t.Errorf("certsNeeded = %v, want [p256 rsa4096]", got)
	}
	if got := certsNeeded([]string{"default", "rsa2048"}, false); !slices.Equal(got, []string{"rsa2048"}) {
		t.Errorf("certsNeeded without HAProxy = %v, want [rsa2048]", got)
	}
	// The tlsbulk figure alone needs its P-256 certificate only.
	cfg, err := parseFlags([]string{"-figures", "tlsbulk"})
	if err != nil {
		t.Fatal(err)
	}
	b := &bench{cfg: cfg}
	if got := certsNeeded(b.tlsRows(), true); !b.hasTLS() || !slices.Equal(got, []string{"p256"}) {
		t.Errorf("-figures tlsbulk: TLS %v, certificates %v; want true, [p256]", b.hasTLS(), got)
	}
}

// The tlsbulk figure: one run per target that terminates TLS, in round
// order, after the figures before it; waproxy-socks5 and microsocks none.
func TestTLSBulkSteps(t *testing.T) {
	direct := &target{name: "direct", kind: kindDirect}
	ha := &target{name: baseline, kind: kindHAProxy}
	wa := &target{name: "waproxy", kind: kindCaddy}
	via := &target{name: viaSOCKS, kind: kindCaddy, socks: true}
	ms := &target{name: socksOnly, kind: kindSOCKS}
	cfg, err := parseFlags([]string{"-figures", "bulk,tlsbulk"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range (&bench{cfg: cfg}).steps([]*target{wa, direct, ha, via, ms}) {
		got = append(got, s.fig+" "+s.t.name)
	}
	want := []string{"bulk waproxy", "bulk direct", "bulk haproxy-official", "bulk waproxy-socks5", "bulk microsocks",
		"tlsbulk waproxy", "tlsbulk direct", "tlsbulk haproxy-official"}
	if !slices.Equal(got, want) {
		t.Errorf("steps:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// The rows: in the TLS table, the CPU row without direct.
	ms2 := (&bench{cfg: cfg}).metrics()
	var tlsbulk, cpu metric
	for _, m := range ms2 {
		switch m.key {
		case "tlsbulk":
			tlsbulk = m
		case "tlsbulk-cpu":
			cpu = m
		}
	}
	if !tlsbulk.tls || !tlsbulk.vsDirect || tlsbulk.label != "TLS MB/s, 16 streams, edge→client, same ECDSA P-256 certificate" ||
		!cpu.tls || !strings.Contains(cpu.label, "P-256") {
		t.Errorf("tlsbulk rows: %+v, %+v", tlsbulk, cpu)
	}
	if !tlsbulk.appliesTo(direct) || cpu.appliesTo(direct) || !cpu.appliesTo(wa) || tlsbulk.appliesTo(via) || tlsbulk.appliesTo(ms) {
		t.Error("tlsbulk rows apply to: direct (MB/s only), waproxy; not waproxy-socks5 or microsocks")
	}
}

func TestTablesSplitPlainAndTLS(t *testing.T) {
	ts := []*target{{name: baseline, kind: kindHAProxy}, {name: "waproxy", kind: kindCaddy}}
	r := newResults(ts, []metric{
		{key: "chat", label: "chat conn/s", format: formatCount},
		{key: "tls:p256", label: "TLS conn/s", tls: true, format: formatCount},
		{key: "tls-idle-heap", label: "Go live heap", tls: true, goOnly: true, format: formatCount},
		{key: "tlsbulk", label: "TLS MB/s", tls: true, tlsBulk: true, row: "p256", vsDirect: true, format: formatCount},
		{key: "tlsbulk-cpu", label: "TLS CPU per GB", tls: true, tlsBulk: true, row: "p256", proxyOnly: true, format: formatCount},
	}, 1, nil)
	r.set("tlsbulk", baseline, 0, 400)
	r.set("tlsbulk", "waproxy", 0, 600)
	r.set("tlsbulk-cpu", baseline, 0, 900)
	r.set("tlsbulk-cpu", "waproxy", 0, 450)
	r.set("chat", baseline, 0, 100)
	r.set("chat", "waproxy", 0, 50)
	r.set("tls:p256", baseline, 0, 10)
	r.set("tls:p256", "waproxy", 0, 20)
	r.set("tls-idle-heap", "waproxy", 0, 28000)
	var out bytes.Buffer
	r.writeTables(&out)
	tables := strings.Split(strings.TrimSpace(out.String()), "\n\n")
	if len(tables) != 2 || !strings.Contains(tables[0], "| chat conn/s | 100 | 50 | 0.50× |") ||
		strings.Contains(tables[0], "TLS") || !strings.Contains(tables[1], "| TLS conn/s | 10 | 20 | 2.00× |") ||
		!strings.Contains(tables[1], "| Go live heap | – | 28,000 | – |") ||
		!strings.Contains(tables[1], "| TLS MB/s | 400 | 600 | 1.50× |") || !strings.Contains(tables[1], "| TLS CPU per GB | 900 | 450 | 0.50× |") ||
		strings.Contains(tables[0], "MB/s") {
		t.Errorf("tables:\n%s", out.String())
	}
	out.Reset()
	r.writeRatios(&out)
	if strings.Contains(out.String(), "Go live heap") || !strings.Contains(out.String(), "| TLS MB/s | 1.50× |") ||
		!strings.Contains(out.String(), "| TLS CPU per GB | 0.50× |") {
		t.Errorf("ratios:\n%s", out.String())
	}
}

func TestGoroutineTotal(t *testing.T) {
	if n, err := goroutineTotal("goroutine profile: total 6012\n3000 @ 0x1 0x2\n"); err != nil || n != 6012 {
		t.Errorf("goroutineTotal = %d, %v; want 6012", n, err)
	}
	if _, err := goroutineTotal("<html>"); err == nil {
		t.Error("goroutineTotal of something else: want an error")
	}
}

func TestGrowthAndMarginal(t *testing.T) {
	ts := []*target{{name: "direct", kind: kindDirect}, {name: baseline, kind: kindHAProxy}, {name: "waproxy", kind: kindCaddy},
		{name: socksOnly, kind: kindSOCKS, notRun: "no microsocks"}}
	r := newResults(ts, nil, 2, []int{1000, 5000, 9000})
	// haproxy: linear, 3,400 B each. waproxy: a fixed 2.5 MB plus 1,300 B
	// each in round 1; round 2 lacks the 5,000 figure.
	for i, n := range []int{1000, 5000, 9000} {
		for round := range 2 {
			r.set(growthKey(n), baseline, round, 3400)
			if round == 0 || n != 5000 {
				r.set(growthKey(n), "waproxy", round, (2_500_000+1300*float64(n))/float64(n))
			}
		}
		_ = i
	}
	if got := r.marginal("waproxy", 1000, 5000); math.Abs(got-1300) > 1e-6 {
		t.Errorf("marginal 1,000 → 5,000 = %v, want 1300 (round 2 has no figure)", got)
	}
	if got := r.marginal(baseline, 5000, 9000); got != 3400 {
		t.Errorf("linear marginal = %v, want 3400", got)
	}
	var out bytes.Buffer
	r.writeGrowth(&out)
	for _, line := range []string{
		"| connections held | haproxy-official | waproxy | microsocks |",
		"| 1,000 | 3,400 | 3,800 | not run |",
		"| 5,000 | 3,400 | 1,800 | not run |",
		"| 9,000 | 3,400 | 1,578 | not run |",
		"| marginal, 1,000 → 5,000 | 3,400 | 1,300 | not run |",
		"| marginal, 5,000 → 9,000 | 3,400 | 1,300 | not run |",
	} {
		if !strings.Contains(out.String(), line+"\n") {
			t.Errorf("growth table lacks %q:\n%s", line, out.String())
		}
	}
}

func TestExitHopTable(t *testing.T) {
	ts := []*target{{name: "direct", kind: kindDirect}, {name: baseline, kind: kindHAProxy}, {name: "waproxy", kind: kindCaddy},
		{name: viaSOCKS, kind: kindCaddy, socks: true}, {name: socksOnly, kind: kindSOCKS}}
	r := newResults(ts, []metric{
		{key: "chat", label: "chat conn/s", vsDirect: true, format: formatCount},
		{key: "idle", label: "bytes per idle chat connection", proxyOnly: true, format: formatCount},
		{key: "tls:p256", label: "TLS conn/s, P-256", tls: true, row: "p256", vsDirect: true, format: formatCount},
		{key: "tls:default", label: "TLS conn/s, default", tls: true, row: "default", proxyOnly: true, format: formatCount},
		{key: "tls-idle", label: "bytes per idle TLS connection", tls: true, row: "p256", tlsIdle: true, proxyOnly: true, format: formatCount},
	}, 1, nil)
	for name, v := range map[string][3]float64{"waproxy": {1000, 1800, 2000}, viaSOCKS: {800, 2000, 1600}, socksOnly: {1600, 12000, 0}} {
		r.set("chat", name, 0, v[0])
		r.set("idle", name, 0, v[1])
		if name != socksOnly {
			r.set("tls:p256", name, 0, v[2])
		}
	}
	r.set("tls:default", "waproxy", 0, 2100)
	r.set("tls-idle", "waproxy", 0, 50000)
	var out bytes.Buffer
	r.writeExitHop(&out)
	for _, line := range []string{
		"| figure | waproxy | waproxy-socks5 | microsocks | waproxy-socks5/waproxy | waproxy-socks5/microsocks |",
		"| chat conn/s | 1,000 | 800 | 1,600 | 0.80× | 0.50× |",
		"| bytes per idle chat connection | 1,800 | 2,000 | 12,000 | 1.11× | 0.17× |",
		// microsocks terminates no TLS: a dash, not "failed".
		"| TLS conn/s, P-256 | 2,000 | 1,600 | – | 0.80× | – |",
	} {
		if !strings.Contains(out.String(), line+"\n") {
			t.Errorf("exit hop table lacks %q:\n%s", line, out.String())
		}
	}
	// Rows that neither SOCKS5 target has are left out.
	for _, absent := range []string{"TLS conn/s, default", "idle TLS"} {
		if strings.Contains(out.String(), absent) {
			t.Errorf("exit hop table has a %q row:\n%s", absent, out.String())
		}
	}
	// The main TLS table shows the runs that do not exist as dashes.
	out.Reset()
	r.writeTables(&out)
	for _, line := range []string{
		"| TLS conn/s, default | – | failed | 2,100 | – | – | – | – |",
		"| bytes per idle TLS connection | – | failed | 50,000 | – | – | – | – |",
	} {
		if !strings.Contains(out.String(), line+"\n") {
			t.Errorf("tables lack %q:\n%s", line, out.String())
		}
	}
	// Without either SOCKS5 target there is no such table.
	out.Reset()
	newResults(ts[:3], nil, 1, nil).writeExitHop(&out)
	if out.Len() != 0 {
		t.Errorf("exit hop table without SOCKS5 targets:\n%s", out.String())
	}
}

// scriptedSOCKS serves one connection with script and returns its address.
func scriptedSOCKS(t *testing.T, script func(c net.Conn) error) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		done <- script(c)
	}()
	t.Cleanup(func() {
		ln.Close()
		if err := <-done; err != nil {
			t.Errorf("scripted SOCKS5 server: %v", err)
		}
	})
	return ln.Addr().String()
}

// expect reads len(want) bytes from c and compares them.
func expect(c net.Conn, want ...byte) error {
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("got % x, want % x", got, want)
	}
	return nil
}

// The bench's SOCKS5 client: the exact bytes, each reply address type, and
// a clear error for a refusal, a method it did not offer and a bad
// destination.
func TestSOCKSConnect(t *testing.T) {
	ctx := context.Background()
	d := &net.Dialer{Timeout: time.Second}
	for _, tc := range []struct {
		name  string
		reply []byte
		err   string
	}{
		{"ipv4 reply", []byte{5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38}, ""},
		{"ipv6 reply", append(append([]byte{5, 0, 0, 4}, net.IPv6loopback...), 0x04, 0x38), ""},
		{"name reply", append([]byte{5, 0, 0, 3, 9}, "localhost\x04\x38"...), ""},
		{"refused", []byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0}, "code 5"},
		{"bad address type", []byte{5, 0, 0, 9, 0, 0}, "address type 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := scriptedSOCKS(t, func(c net.Conn) error {
				if err := expect(c, 5, 1, 0); err != nil {
					return fmt.Errorf("greeting: %w", err)
				}
				c.Write([]byte{5, 0})
				if err := expect(c, 5, 1, 0, 1, 127, 0, 0, 1, 0x13, 0x88); err != nil {
					return fmt.Errorf("request: %w", err)
				}
				c.Write(tc.reply)
				if tc.err == "" {
					c.Write([]byte("after"))
				}
				return nil
			})
			c, err := socksConnector("127.0.0.1:5000")(ctx, d, addr)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// The reply was consumed to its end: the next bytes are the
			// destination's.
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := expect(c, []byte("after")...); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("method not offered", func(t *testing.T) {
		addr := scriptedSOCKS(t, func(c net.Conn) error {
			if err := expect(c, 5, 1, 0); err != nil {
				return err
			}
			_, err := c.Write([]byte{5, 0xff})
			return err
		})
		if _, err := socksConnector("127.0.0.1:5000")(ctx, d, addr); err == nil || !strings.Contains(err.Error(), "want 5 0") {
			t.Fatalf("err = %v, want a method error", err)
		}
	})
	if _, err := socksConnector("localhost:5000")(ctx, d, "127.0.0.1:1"); err == nil || !strings.Contains(err.Error(), "not an IPv4 address") {
		t.Errorf("a host name: err = %v, want a destination error", err)
	}
}

// The microsocks target against Debian's microsocks: started fresh, an
// exchange with the echo edge through it, and the bulk stream.
func TestMicrosocks(t *testing.T) {
	bin := "/usr/bin/microsocks"
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("WAPROXY_INTEROP") == "1" {
			t.Fatalf("%s not found (WAPROXY_INTEROP=1): apt-get install microsocks", bin)
		}
		t.Skipf("%s not found: apt-get install microsocks", bin)
	}
	ctx := context.Background()
	echoEdge, err := startEdge(false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer echoEdge.close()
	bulkEdge, err := startEdge(true, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer bulkEdge.close()
	ms := &target{name: socksOnly, kind: kindSOCKS}
	bin2 := &binaries{microsocks: bin}
	for _, e := range []*edge{echoEdge, bulkEdge} {
		p, err := ms.start(ctx, t.TempDir(), 1, bin2, e, nil)
		if err != nil {
			t.Fatal(err)
		}
		if p.pid == 0 || p.addr == e.addr() {
			t.Errorf("microsocks target: pid %d, address %s (the edge is %s)", p.pid, p.addr, e.addr())
		}
		if err := e.probe(ctx, p.connector(), p.addr); err != nil {
			t.Errorf("through microsocks: %v", err)
		}
		// Without the SOCKS5 handshake nothing comes back.
		if err := e.probe(ctx, dialTCP, p.addr); err == nil {
			t.Error("a plain hello to microsocks came back")
		}
		p.stop()
		if p.alive() {
			t.Error("microsocks still runs after stop")
		}
	}
	if _, err := ms.start(ctx, t.TempDir(), 1, bin2, echoEdge, &tlsServe{}); err == nil {
		t.Error("microsocks started for a TLS run")
	}
	res := runChat(ctx, socksConnector(echoEdge.addr()), "127.0.0.1:1", 1, 100*time.Millisecond)
	if res.Conns != 0 || res.Errors == 0 {
		t.Errorf("exchanges to a closed port: %d done, %d failed", res.Conns, res.Errors)
	}
}

// The whole report, from recorded numbers: the SOCKS5 exit hop section,
// the growth table with its marginal rows and the method's lines for both.
func TestDocumentSections(t *testing.T) {
	cfg, err := parseFlags([]string{"-figures", "chat,idle", "-targets", "haproxy-official,waproxy,waproxy-socks5,microsocks"})
	if err != nil {
		t.Fatal(err)
	}
	b := &bench{cfg: cfg}
	ts := selectTargets(cfg.targets)
	b.res = newResults(ts, b.metrics(), cfg.rounds, b.checkpoints())
	for _, tg := range ts {
		for round := range cfg.rounds {
			b.res.set("chat", tg.name, round, 1000)
			for _, n := range b.checkpoints() {
				b.res.set(growthKey(n), tg.name, round, 2000)
			}
		}
	}
	var out bytes.Buffer
	b.writeDocument(&out)
	doc := out.String()
	for _, want := range []string{
		"## The SOCKS5 exit hop",
		"| figure | waproxy | waproxy-socks5 | microsocks | waproxy-socks5/waproxy | waproxy-socks5/microsocks |",
		"| chat conn/s, 32 workers, 5s | 1,000 | 1,000 | 1,000 | 1.00× | 1.00× |",
		"by connections held (median; a fresh process for each count)",
		"| marginal, 5,000 → 9,000 | 2,000 | 2,000 | 2,000 | 2,000 |",
		"N is 1,000, 5,000, 9,000, each on a fresh process",
		"**microsocks**: that exit hop alone",
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	b.cfg.scaling = false
	out.Reset()
	b.writeDocument(&out)
	if !strings.Contains(out.String(), "one process, read as it fills") || !strings.Contains(out.String(), "memory is read again once stable at 1,000, 5,000, 9,000 held") {
		t.Errorf("-scaling=false report does not say memory was read in one process")
	}
}

// The report of an A/B run (just ab): the two builds side by side with
// B/A ratios, the builds named in the method, and no baseline section
// (HAProxy is not in the run).
func TestDocumentAB(t *testing.T) {
	cfg, err := parseFlags([]string{"-figures", "chat", "-targets", "waproxy,waproxy-b", "-caddy", "/builds/a", "-caddy-b", "/builds/b", "-rounds", "3"})
	if err != nil {
		t.Fatal(err)
	}
	b := &bench{cfg: cfg}
	ts := selectTargets(cfg.targets)
	b.res = newResults(ts, b.metrics(), cfg.rounds, b.checkpoints())
	// B is 10 % faster in every round; the rounds' levels differ.
	for round, a := range []float64{1000, 1200, 900} {
		b.res.set("chat", buildA, round, a)
		b.res.set("chat", buildB, round, a*1.1)
	}
	var out bytes.Buffer
	b.writeDocument(&out)
	doc := out.String()
	for _, want := range []string{
		"## Build B against build A",
		"waproxy runs `/builds/a` (A), waproxy-b runs `/builds/b` (B)",
		"| figure | waproxy | waproxy-b | waproxy-b/waproxy |",
		"| chat conn/s, 32 workers, 5s | 1,000 | 1,100 | 1.10× |",
		"**waproxy-b**: waproxy's config run by a second build, `/builds/b` (`-caddy-b`)",
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("report lacks %q:\n%s", want, doc)
		}
	}
	if strings.Contains(doc, "Every target against") {
		t.Errorf("report has a section against %s, which did not run", baseline)
	}
	// without -caddy-b the target does not run, and says why
	ts = []*target{{name: buildB, kind: kindCaddy, buildB: true, modules: []string{"layer4"}}}
	resolveTargets(context.Background(), ts, &binaries{caddy: "/nonexistent/caddy"}, false)
	if ts[0].notRun != "no -caddy-b build given" {
		t.Errorf("waproxy-b without -caddy-b: notRun %q", ts[0].notRun)
	}
}

// The report of a tlsbulk-only run: the TLS table with both rows and a
// ratio against the baseline, the same-round ratios, the certificate and
// the method's line for it, and none of the tls figure's.
func TestDocumentTLSBulk(t *testing.T) {
	cfg, err := parseFlags([]string{"-figures", "tlsbulk", "-targets", "direct,haproxy-official,haproxy-16k,waproxy,waproxy-socks5"})
	if err != nil {
		t.Fatal(err)
	}
	b := &bench{cfg: cfg, certs: map[string]*certFiles{"p256": {kind: "p256"}}}
	ts := selectTargets(cfg.targets)
	b.res = newResults(ts, b.metrics(), cfg.rounds, b.checkpoints())
	for round := range cfg.rounds {
		for name, v := range map[string]float64{"direct": 2000, baseline: 500, "haproxy-16k": 600, "waproxy": 900} {
			b.res.set("tlsbulk", name, round, v)
			if name != "direct" {
				b.res.set("tlsbulk-cpu", name, round, v)
			}
		}
	}
	var out bytes.Buffer
	b.writeDocument(&out)
	doc := out.String()
	label := "TLS MB/s, 16 streams, edge→client, same ECDSA P-256 certificate"
	for _, want := range []string{
		"| " + label + " | 2,000 | 500 | 600 | 900 | – | 1.80× | 0.45× |",
		"| proxy CPU per GB relayed over TLS, ms, same ECDSA P-256 certificate | – | 500 | 600 | 900 | – | 1.80× | – |",
		"| " + label + " | 4.00× | 1.20× | 1.80× | – |",
		"## TLS certificates", "generated at the start of the run: ECDSA P-256.",
		"**TLS MB/s**: as plain MB/s (16 connections", "waproxy-socks5 is left out",
		"**TLS targets**", "**TLS client**",
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	for _, unwanted := range []string{"**TLS conn/s**", "**Bytes per idle TLS connection**", "**Plain MB/s**", "each one's default: HAProxy serves",
		"## The SOCKS5 exit hop"} {
		if strings.Contains(doc, unwanted) {
			t.Errorf("a tlsbulk-only report has %q", unwanted)
		}
	}
}

// TestWaproxyTLSRoutesBefore: a build without wa_tls_terminate (just ab
// against an older revision) gets the layout it shipped with: caddy-l4's
// tls handler, no nested subroute, the same wa_proxy handlers but one.
func TestWaproxyTLSRoutesBefore(t *testing.T) {
	for _, tc := range []struct {
		routes      any
		want, not   string
		subroutes   int
		destsToEdge int
	}{
		{waproxyTLSRoutes("127.0.0.1:5000", ""), `"handler":"wa_tls_terminate"`, `"handler":"tls"`, 2, 5},
		{waproxyTLSRoutesBefore("127.0.0.1:5000", ""), `"handler":"tls"`, `"handler":"wa_tls_terminate"`, 1, 4},
	} {
		b, err := json.Marshal(tc.routes)
		if err != nil {
			t.Fatal(err)
		}
		s := string(b)
		if !strings.Contains(s, tc.want) || strings.Contains(s, tc.not) {
			t.Errorf("routes %s: want %s and not %s", s, tc.want, tc.not)
		}
		if n := strings.Count(s, `"handler":"subroute"`); n != tc.subroutes {
			t.Errorf("routes %s: %d subroutes, want %d", s, n, tc.subroutes)
		}
		if n := strings.Count(s, `"destination":"127.0.0.1:5000"`); n != tc.destsToEdge {
			t.Errorf("routes %s: %d wa_proxy to the edge, want %d", s, n, tc.destsToEdge)
		}
	}
}
