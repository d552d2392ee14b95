package handlers

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// provisionHTTP provisions a wa_http handler from its JSON, as Caddy does.
func provisionHTTP(t *testing.T, config string) (*HandleHTTP, error) {
	t.Helper()
	h := new(HandleHTTP)
	err := provisionJSON(t, config, h)
	t.Cleanup(func() { _ = h.Cleanup() })
	return h, err
}

func TestHandleHTTPProvision(t *testing.T) {
	t.Setenv("WAPROXY_TEST_USER", "alice")
	t.Setenv("WAPROXY_TEST_PASS", "secret")
	t.Setenv("WAPROXY_TEST_EMPTY", "")
	h, err := provisionHTTP(t, `{"auth":{"basic":{"username":"{env.WAPROXY_TEST_USER}","password":"{env.WAPROXY_TEST_PASS}"}}}`)
	if err != nil {
		t.Fatal(err)
	}
	if h.dialerID != "wa.dialers.direct" || h.transport == nil || h.transport.Proxy != nil {
		t.Fatalf("dialer %q, transport %v", h.dialerID, h.transport)
	}
	if !h.allow.AllowsHost("g.whatsapp.net") || h.allow.AllowsHost("example.com") {
		t.Fatal("the default allowlist is not WhatsApp's domains")
	}
	if h.OriginForm != OriginFormPage {
		t.Fatalf("origin_form defaults to %q, want %q", h.OriginForm, OriginFormPage)
	}
	for _, c := range []struct {
		header string
		want   bool
	}{
		{"Basic YWxpY2U6c2VjcmV0", true},  // alice:secret
		{"basic  YWxpY2U6c2VjcmV0", true}, // scheme is case-insensitive
		{"Basic YWxpY2U6c2VjcmV1", false}, // alice:secreu
		{"Basic Ym9iOnNlY3JldA==", false}, // bob:secret
		{"Basic YWxpY2Vfc2VjcmV0", false}, // no colon
		{"Bearer YWxpY2U6c2VjcmV0", false},
		{"Basic !!!", false},
		{"", false},
	} {
		req := &http.Request{Header: http.Header{}}
		if c.header != "" {
			req.Header.Set("Proxy-Authorization", c.header)
		}
		if got := h.authorized(req); got != c.want {
			t.Errorf("authorized(%q) = %v, want %v", c.header, got, c.want)
		}
	}

	for _, c := range []struct{ config, want string }{
		{`{"auth":{"basic":{"username":"{env.WAPROXY_TEST_EMPTY}","password":"x"}}}`, "auth basic: the username is empty"},
		{`{"auth":{"basic":{"username":"a:b","password":"x"}}}`, "the username must not contain ':'"},
		{`{"auth":{"basic":{"username":"a","password":"{env.WAPROXY_TEST_UNSET}"}}}`, "auth basic: the password is empty"},
		{`{"auth":{}}`, "auth: no scheme configured"},
		{`{"allow":["10.0.0.0/99"]}`, "bad CIDR"},
		{`{"via":{"dialer":"pigeon"}}`, "wa.dialers.pigeon"},
		{`{"idle_timeout":-1}`, "idle_timeout must not be negative"},
		{`{"origin_form":"serve"}`, `origin_form: unknown value "serve" (want page or reject)`},
		{`{"headers":{"request":{"replace":{"X":[{"search_regexp":"("}]}}}}`, "headers: replacement 0 for header field 'X'"},
	} {
		if _, err := provisionHTTP(t, c.config); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.config, err, c.want)
		}
	}
}

func TestDestination(t *testing.T) {
	for _, c := range []struct {
		request, dest, reason string
	}{
		{"CONNECT g.whatsapp.net:443 HTTP/1.1", "g.whatsapp.net:443", ""},
		{"CONNECT [2001:db8::1]:443 HTTP/1.1", "[2001:db8::1]:443", ""},
		{"CONNECT g.whatsapp.net HTTP/1.1", "", "CONNECT needs a host:port target"},
		{"CONNECT g.whatsapp.net:0 HTTP/1.1", "", "CONNECT needs a host:port target"},
		{"CONNECT /path HTTP/1.1", "", "CONNECT needs a host:port target"},
		{"GET http://example.com/x HTTP/1.1", "example.com:80", ""},
		{"GET http://user:pw@example.com:8080/x HTTP/1.1", "example.com:8080", ""},
		{"GET https://example.com/x HTTP/1.1", "example.com:443", ""},
		{"GET http://[::1]:81/ HTTP/1.1", "[::1]:81", ""},
		{"GET /x HTTP/1.1", "", "the target must be an absolute URL"},
		{"OPTIONS * HTTP/1.1", "", "the target must be an absolute URL"},
		{"GET ftp://example.com/ HTTP/1.1", "", `unsupported URL scheme "ftp"`},
		{"GET http://example.com:99999/ HTTP/1.1", "", "bad host or port"},
		{"GET http://g.whatsapp.net./ HTTP/1.1", "g.whatsapp.net.:80", ""},
		{"GET http://_srv.example.com/ HTTP/1.1", "_srv.example.com:80", ""},
		// Go's transport would dial full-width digits as 127.0.0.1
		{"GET http://\uff11\uff12\uff17.0.0.1:2019/ HTTP/1.1", "", "not an ASCII host name"},
		{"CONNECT b\u00fccher.example:443 HTTP/1.1", "", "not an ASCII host name"},
		{"GET http://xn--bcher-kva.example/ HTTP/1.1", "xn--bcher-kva.example:80", ""},
		{"CONNECT [fe80::1%25eth0]:443 HTTP/1.1", "", "zone"},
		{"CONNECT " + strings.Repeat("a", 64) + ".whatsapp.net:443 HTTP/1.1", "", "longer than 63"},
		{"CONNECT " + strings.Repeat("abcdefgh.", 29) + "whatsapp.net:443 HTTP/1.1", "", "longer than 253"},
		{"CONNECT a..whatsapp.net:443 HTTP/1.1", "", "empty label"},
	} {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(c.request + "\r\nHost: h\r\n\r\n")))
		if err != nil {
			t.Fatalf("%q: %v", c.request, err)
		}
		dest, status, reason := destination(req)
		if dest != c.dest || !strings.Contains(reason, c.reason) || (c.reason != "") != (status == http.StatusBadRequest) {
			t.Errorf("%q: %q %d %q; want %q %q", c.request, dest, status, reason, c.dest, c.reason)
		}
	}
}

// TestIsOriginForm: requests to a web server (a path or `*` as target)
// are told apart from proxy requests (CONNECT, absolute URLs), which keep
// their own handling whatever origin_form says.
func TestIsOriginForm(t *testing.T) {
	for _, c := range []struct {
		request string
		want    bool
	}{
		{"GET / HTTP/1.1", true},
		{"HEAD /index.html?x=1 HTTP/1.1", true},
		{"POST /form HTTP/1.0", true},
		{"OPTIONS * HTTP/1.1", true},
		{"GET //host/path HTTP/1.1", true},
		{"GET http://example.com/ HTTP/1.1", false},
		{"GET https://example.com/ HTTP/1.1", false},
		{"GET ftp://example.com/ HTTP/1.1", false},
		{"CONNECT g.whatsapp.net:443 HTTP/1.1", false},
		{"CONNECT /path HTTP/1.1", false},
	} {
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(c.request + "\r\nHost: h\r\n\r\n")))
		if err != nil {
			t.Fatalf("%q: %v", c.request, err)
		}
		if got := isOriginForm(req); got != c.want {
			t.Errorf("isOriginForm(%q) = %v, want %v", c.request, got, c.want)
		}
	}
}

func TestRemoveHopByHop(t *testing.T) {
	hdr := http.Header{
		"Connection":          {"keep-alive, X-Hop", "Upgrade, x-other"},
		"X-Hop":               {"1"},
		"X-Other":             {"2"},
		"Keep-Alive":          {"timeout=5"},
		"Proxy-Connection":    {"keep-alive"},
		"Proxy-Authorization": {"Basic eA=="},
		"Proxy-Authenticate":  {"Basic"},
		"Te":                  {"gzip, trailers;q=1"},
		"Trailer":             {"X-Sum"},
		"Transfer-Encoding":   {"chunked"},
		"Upgrade":             {"websocket"},
		"X-Kept":              {"3"},
		"Via":                 {"1.0 other"},
	}
	removeHopByHop(hdr)
	addVia(hdr, 1, 0)
	want := http.Header{"X-Kept": {"3"}, "Te": {"trailers"}, "Via": {"1.0 other", "1.0 waproxy"}}
	if !reflect.DeepEqual(hdr, want) {
		t.Fatalf("got %v, want %v", hdr, want)
	}
	hdr = http.Header{"Te": {"deflate"}}
	removeHopByHop(hdr)
	if len(hdr) != 0 {
		t.Fatalf("TE without trailers kept: %v", hdr)
	}
}

// TestLogEndCut: how logEnd (shared by wa_proxy's connections and wa_http's
// tunnels) logs and counts each ending. A cut at shutdown is logged at info
// level and counted by the shutdown, not as relay (errCut matches
// net.ErrClosed, which alone would log it as a plain close). With the
// logger at info (Caddy's default), the endings logged at debug build no
// fields, and still count.
func TestLogEndCut(t *testing.T) {
	for _, c := range []struct {
		err   error
		level zapcore.Level
		msg   string
		kind  string // the errors_total kind that grows, if any
	}{
		{errCut, zapcore.InfoLevel, "tunnel cut at shutdown", ""},
		{fmt.Errorf("relay: %w", errCut), zapcore.InfoLevel, "tunnel cut at shutdown", ""},
		{nil, zapcore.DebugLevel, "tunnel closed", ""},
		{net.ErrClosed, zapcore.DebugLevel, "tunnel closed", ""},
		{errIdle, zapcore.DebugLevel, "close idle tunnel", metrics.KindIdleTimeout},
		{errors.New("boom"), zapcore.WarnLevel, "relay", metrics.KindRelay},
	} {
		core, logs := observer.New(zapcore.DebugLevel)
		kinds := []string{metrics.KindIdleTimeout, metrics.KindRelay}
		before := make(map[string]float64)
		for _, k := range kinds {
			before[k] = testutil.ToFloat64(metrics.Errors.WithLabelValues(k))
		}
		logEnd(zap.New(core), "tunnel", c.err, func() []zap.Field { return []zap.Field{zap.String("remote", "127.0.0.1:1")} })
		entries := logs.All()
		if len(entries) != 1 || entries[0].Level != c.level || entries[0].Message != c.msg {
			t.Errorf("%v: logged %v, want one %v %q", c.err, entries, c.level, c.msg)
		}
		if len(entries) == 1 && (len(entries[0].Context) != 1 || entries[0].Context[0].Key != "remote") && c.level != zapcore.WarnLevel {
			t.Errorf("%v: fields %v, want the remote only", c.err, entries[0].Context)
		}

		infoCore, infoLogs := observer.New(zapcore.InfoLevel)
		built := false
		logEnd(zap.New(infoCore), "tunnel", c.err, func() []zap.Field { built = true; return nil })
		if c.level == zapcore.DebugLevel && (built || infoLogs.Len() != 0) {
			t.Errorf("%v: with the logger at info, fields built %v and %d entries; want neither", c.err, built, infoLogs.Len())
		}
		if c.level != zapcore.DebugLevel && (!built || infoLogs.Len() != 1) {
			t.Errorf("%v: with the logger at info, fields built %v and %d entries; want both", c.err, built, infoLogs.Len())
		}
		for _, k := range kinds {
			want := before[k]
			if k == c.kind {
				want += 2 // once per logger
			}
			if got := testutil.ToFloat64(metrics.Errors.WithLabelValues(k)); got != want {
				t.Errorf("%v: errors_total{kind=%q} %v, want %v", c.err, k, got, want)
			}
		}
	}
}
