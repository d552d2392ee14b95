package matchers

import (
	"crypto/tls"
	"net"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// Allocation pins for the matchers' decisions (the benchmarks in the
// *_matcher_test.go files report the same figures with b.ReportAllocs).
// Deciding on a connection's first bytes allocates nothing: the byte
// classifiers never allocate, and neither does Match when it says no. A
// match sets its placeholders (boxed strings in caddy's replacer) and the
// protocol; those few allocations are pinned as upper bounds, so that a
// change that adds one fails here.

// allocCase is one input to a matcher and the most allocations a decision
// on it may make.
type allocCase struct {
	name  string
	m     layer4.ConnMatcher
	in    []byte
	match bool // the expected decision
	max   float64
}

func TestMatchAllocs(t *testing.T) {
	hello := goHello(t, &tls.Config{ServerName: "mmg.whatsapp.net", NextProtos: []string{"h2", "http/1.1"}})
	connect := []byte("CONNECT g.whatsapp.net:443 HTTP/1.1\r\nHost: g.whatsapp.net:443\r\n\r\n")
	cases := []allocCase{
		// wa_xmpp: a match sets the kind placeholder and the protocol.
		{"wa_xmpp/whatsapp_hello", new(MatchXMPP), waHello(6, 3), true, 1},
		{"wa_xmpp/whatsapp_edge", new(MatchXMPP), cat(edRoute4, waHello(6, 3)), true, 1},
		{"wa_xmpp/xmpp", new(MatchXMPP), []byte(xmppClient), true, 1},
		{"wa_xmpp/tls_hello", new(MatchXMPP), tlsHello, false, 0},
		{"wa_xmpp/http", new(MatchXMPP), connect, false, 0},
		// wa_http: method (pre-boxed) and host (a copy) placeholders.
		{"wa_http/connect", new(MatchHTTP), connect, true, 3},
		{"wa_http/whatsapp_hello", new(MatchHTTP), waHello(6, 3), false, 0},
		{"wa_http/tls_hello", new(MatchHTTP), tlsHello, false, 0},
		// wa_tls: server name and ALPN placeholders (copies).
		{"wa_tls/go_hello_1_record", new(MatchTLS), hello, true, 5},
		{"wa_tls/go_hello_2_records", new(MatchTLS), fragment(t, hello, 200), true, 5},
		{"wa_tls/whatsapp_hello", new(MatchTLS), waHello(6, 3), false, 0},
		{"wa_tls/http", new(MatchTLS), connect, false, 0},
		// wa_silent: a client that has spoken is decided at once.
		{"wa_silent/spoke", new(MatchSilent), waHello(6, 3), false, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if p, ok := c.m.(caddy.Provisioner); ok {
				if err := p.Provision(caddy.Context{}); err != nil {
					t.Fatal(err)
				}
			}
			pipeIn, pipeOut := net.Pipe()
			defer pipeIn.Close()
			defer pipeOut.Close()
			cx := layer4.WrapConnection(pipeIn, c.in, zap.NewNop())
			var (
				got bool
				err error
			)
			allocs := testing.AllocsPerRun(200, func() { got, err = c.m.Match(cx) })
			if err != nil || got != c.match {
				t.Fatalf("Match = %v, %v; want %v, nil", got, err, c.match)
			}
			t.Logf("%.1f allocations per decision (at most %.0f)", allocs, c.max)
			switch {
			case testutil.RaceEnabled:
				t.Log("race detector on: not checked")
			case allocs > c.max:
				t.Errorf("%.1f allocations per decision, want at most %.0f", allocs, c.max)
			}
		})
	}
}

// The byte classifiers, the decision itself, allocate nothing at all.
func TestClassifyAllocs(t *testing.T) {
	hello := goHello(t, &tls.Config{ServerName: "mmg.whatsapp.net", NextProtos: []string{"h2", "http/1.1"}})
	inputs := map[string][]byte{
		"whatsapp_hello": waHello(6, 3),
		"whatsapp_edge":  cat(edRoute4, waHello(6, 3)),
		"xmpp":           []byte(xmppClient),
		"tls_1_record":   hello,
		"tls_2_records":  fragment(t, hello, 200),
		"connect":        []byte("CONNECT g.whatsapp.net:443 HTTP/1.1\r\nHost: g.whatsapp.net:443\r\n\r\n"),
		"absolute_form":  []byte("GET http://media.example/v HTTP/1.1\r\nHost: media.example\r\n\r\n"),
	}
	scratch := make([]byte, tlsMaxHelloBytes)
	for name, in := range inputs {
		for _, cl := range []struct {
			name string
			f    func()
		}{
			{"xmpp", func() { classifyXMPP(in) }},
			{"http", func() { classifyHTTP(in, DefaultHTTPMethods) }},
			{"tls", func() { classifyTLS(in, func() []byte { return scratch }) }},
		} {
			if allocs := testing.AllocsPerRun(200, cl.f); allocs != 0 && !testutil.RaceEnabled {
				t.Errorf("classify%s(%s): %.1f allocations, want 0", cl.name, name, allocs)
			}
		}
	}
}
