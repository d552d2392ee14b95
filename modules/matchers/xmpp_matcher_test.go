package matchers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// ---- test harness: caddy-l4's real route compiler over real loopback TCP ----

func init() {
	caddy.RegisterModule(&waTestRecord{})
}

// waTestRecord is a test-only handler. It records which route ran, how many
// bytes the router had prefetched, the wa_xmpp placeholder and protocol, then
// reads Read bytes from the connection (what the matchers left on it),
// writes Reply, and reports all that to the channel registered as Sink.
type waTestRecord struct {
	Sink  string `json:"sink"`
	Route string `json:"route"`
	Read  int    `json:"read,omitempty"`
	Reply string `json:"reply,omitempty"`
}

func (*waTestRecord) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.wa_test_record",
		New: func() caddy.Module { return new(waTestRecord) },
	}
}

type waTestResult struct {
	route      string
	prefetched int    // bytes the router had prefetched when the route ran
	kind       string // {l4.wa_xmpp.kind}
	protocol   string // metrics.Protocol(cx)
	data       []byte // the bytes the handler read
	err        error  // from reading or replying
}

var (
	waTestSinks   sync.Map // sink name → chan waTestResult
	waTestSinkSeq atomic.Int64
)

func (h *waTestRecord) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	res := waTestResult{route: h.Route, prefetched: len(cx.MatchingBytes()), protocol: metrics.Protocol(cx)}
	if repl, ok := cx.Context.Value(layer4.ReplacerCtxKey).(*caddy.Replacer); ok {
		if v, ok := repl.Get("l4.wa_xmpp.kind"); ok {
			res.kind = fmt.Sprint(v)
		}
	}
	if h.Read > 0 {
		_ = cx.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, h.Read)
		n, err := io.ReadFull(cx, buf)
		res.data, res.err = buf[:n], err
	}
	if h.Reply != "" {
		if _, err := cx.Write([]byte(h.Reply)); err != nil && res.err == nil {
			res.err = err
		}
	}
	if ch, ok := waTestSinks.Load(h.Sink); ok {
		ch.(chan waTestResult) <- res
	}
	return nil
}

// waRoute describes one route of a test route list.
type waRoute struct {
	match string // one matcher set as JSON, e.g. `{"wa_xmpp":{}}`; "" matches everything
	name  string
	read  int
	reply string
}

// waServer is one connection handled by a compiled route list.
type waServer struct {
	client  net.Conn          // the client's end of the loopback connection
	results chan waTestResult // what the route that ran recorded
	done    chan error        // the compiled handler returned
	logs    *observer.ObservedLogs
}

type waServeOpts struct {
	routes          []waRoute
	next            waRoute       // what the route list's `next` handler does (name "next" if empty)
	matchingTimeout time.Duration // default 1 minute: far beyond any test's wait
	wrap            func(net.Conn) net.Conn
	send            []byte // written by the client before the server starts matching
}

// waServe provisions and compiles o.routes with caddy-l4's route compiler,
// accepts one real loopback TCP connection and hands it to the compiled
// routes, as layer4.Server does. The client end stays open until the test
// ends.
func waServe(t *testing.T, o waServeOpts) *waServer {
	t.Helper()
	sink := fmt.Sprintf("%s#%d", t.Name(), waTestSinkSeq.Add(1))
	s := &waServer{results: make(chan waTestResult, 4), done: make(chan error, 1)}
	waTestSinks.Store(sink, s.results)
	t.Cleanup(func() { waTestSinks.Delete(sink) })

	var routes layer4.RouteList
	for _, r := range o.routes {
		route := new(layer4.Route)
		if r.match != "" {
			var set caddy.ModuleMap
			if err := json.Unmarshal([]byte(r.match), &set); err != nil {
				t.Fatalf("route %s: bad matcher JSON: %v", r.name, err)
			}
			route.MatcherSetsRaw = []caddy.ModuleMap{set}
		}
		h, _ := json.Marshal(map[string]any{
			"handler": "wa_test_record", "sink": sink, "route": r.name, "read": r.read, "reply": r.reply,
		})
		route.HandlersRaw = []json.RawMessage{h}
		routes = append(routes, route)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := routes.Provision(ctx); err != nil {
		t.Fatalf("provisioning routes: %v", err)
	}
	if o.matchingTimeout == 0 {
		o.matchingTimeout = time.Minute
	}
	if o.next.name == "" {
		o.next.name = "next"
	}
	next := &waTestRecord{Sink: sink, Route: o.next.name, Read: o.next.read, Reply: o.next.reply}
	core, logs := observer.New(zapcore.WarnLevel)
	s.logs = logs
	compiled := routes.Compile(zap.New(core), o.matchingTimeout,
		layer4.HandlerFunc(func(cx *layer4.Connection) error { return next.Handle(cx, nil) }))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s.client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if len(o.send) > 0 {
		if _, err := s.client.Write(o.send); err != nil {
			t.Fatal(err)
		}
	}
	var server net.Conn = conn
	if o.wrap != nil {
		server = o.wrap(conn)
	}
	go func() {
		cx := layer4.WrapConnection(server, make([]byte, 0, 2048), zap.NewNop())
		err := compiled.Handle(cx)
		_ = conn.Close()
		s.done <- err
	}()
	t.Cleanup(func() {
		_ = s.client.Close()
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			t.Error("the compiled routes did not return after the client closed")
		}
	})
	return s
}

// result waits for the route that ran. It fails the test if the router
// returned without running one, or if none ran within 10 s (the router's
// matching timeout is longer, so a matcher that waits for bytes the client
// never sends shows up here).
func (s *waServer) result(t *testing.T) waTestResult {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case err := <-s.done:
		s.done <- err // for the cleanup
		select {
		case r := <-s.results: // a route ran, then the router returned
			return r
		default:
		}
		t.Fatalf("the router returned (%v) without running a route; logs: %v", err, s.logs.All())
	case <-time.After(10 * time.Second):
		t.Fatal("no route ran within 10s while the client kept the connection open")
	}
	return waTestResult{}
}

// waOneByteConn delivers at most one byte per Read, so the matchers see
// expectEOFWithoutRoute asserts that, after the client closed having sent
// what (described for failure messages), no route ran and the router
// returned having logged the EOF: a read error is passed on, never turned
// into a silent non-match.
func (s *waServer) expectEOFWithoutRoute(t *testing.T, what string) {
	t.Helper()
	select {
	case r := <-s.results:
		t.Fatalf("route %q ran for a client that sent %s", r.route, what)
	case err := <-s.done:
		s.done <- err
		if len(s.results) > 0 {
			t.Fatalf("route %q ran for a client that sent %s", (<-s.results).route, what)
		}
		var logged error
		for _, e := range s.logs.All() {
			for _, f := range e.Context {
				if f.Key == "error" {
					logged, _ = f.Interface.(error)
				}
			}
		}
		if !errors.Is(logged, io.EOF) {
			t.Fatalf("router returned %v with logs %v; want it to log the EOF", err, s.logs.All())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the router did not return after the client closed")
	}
}

// benchmarkMatch measures m.Match on a connection whose prefetched bytes
// are in, with b.ReportAllocs.
func benchmarkMatch(b *testing.B, m interface {
	layer4.ConnMatcher
	Provision(caddy.Context) error
}, in []byte) {
	pipeIn, pipeOut := net.Pipe()
	defer pipeIn.Close()
	defer pipeOut.Close()
	cx := layer4.WrapConnection(pipeIn, in, zap.NewNop())
	if err := m.Provision(caddy.Context{}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		if _, err := m.Match(cx); err != nil {
			b.Fatal(err)
		}
	}
}

// every prefix of what the client sent.
type waOneByteConn struct{ net.Conn }

func (c waOneByteConn) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return c.Conn.Read(p)
}

func waOneByte(c net.Conn) net.Conn { return waOneByteConn{c} }

// ---- test vectors ----

func waHello(magic, dict byte) []byte {
	b := []byte{'W', 'A', magic, dict, 0x00, 0x00, 0x24, 0x12, 0x22, 0x0A, 0x20}
	for i := range 32 {
		b = append(b, byte(i*37+11)) // the client's ephemeral key
	}
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

const (
	xmppClient  = `<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>`
	xmppNoDecl  = `<stream:stream xmlns="jabber:client" xmlns:stream="http://etherx.jabber.org/streams" to="example.com" version="1.0">`
	xmppServer  = "<?xml version='1.0'?>\n<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' from='a.example' to='b.example' version='1.0'>"
	xmppPidgin  = "<?xml version='1.0' ?><stream:stream to='jabber.org' xmlns='jabber:client'\n xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
	xmppSpaced  = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n  <stream:stream\n\tversion = \"1.0\"\n\tto='example.com'\n\txmlns:stream='http://etherx.jabber.org/streams'\n\txmlns=\"jabber:client\" >"
	xmppPrefix  = `<stream:stream to='example.com' xmlns:stream='http://etherx.jabber.org/streams' xmlns:c='jabber:client' version='1.0'>`
	xmppCompont = `<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='c.example'>`
	xmppNoNS    = `<stream:stream to='example.com' version='1.0'>`
)

type xmppCase struct {
	name  string
	in    []byte
	kind  string // "" = no match
	need  int    // the decision is made on exactly this many bytes
	extra []byte // sent after in (the first frame and later data); part of what the route must read
}

var (
	tlsHello = []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x9a, 0x41, 0x22}
	edRoute4 = []byte{0x45, 0x44, 0x00, 0x01, 0x00, 0x00, 0x04, 0x08, 0x01, 0x10, 0x02}
	edRoute2 = []byte{0x45, 0x44, 0x00, 0x01, 0x00, 0x00, 0x02, 0x08, 0x00}
)

func xmppCases() []xmppCase {
	bom := []byte("\xEF\xBB\xBF")
	return []xmppCase{
		// WhatsApp: decided on the 4 header bytes.
		{name: "wa_hello_43", in: waHello(6, 3), kind: metrics.ProtocolWhatsApp, need: 4},
		{name: "wa_header_only", in: []byte{0x57, 0x41, 0x06, 0x03}, kind: metrics.ProtocolWhatsApp, need: 4},
		{name: "wa_old_0105", in: waHello(1, 5), kind: metrics.ProtocolWhatsApp, need: 4},
		{name: "wa_old_0200", in: []byte{0x57, 0x41, 0x02, 0x00}, kind: metrics.ProtocolWhatsApp, need: 4},
		{name: "wa_mobile_0502", in: waHello(5, 2), kind: metrics.ProtocolWhatsApp, need: 4},
		// ED prologue: decided on the WA header after the routing bytes.
		{name: "ed_L4_hello", in: cat(edRoute4, waHello(6, 3)), kind: metrics.ProtocolWhatsAppEdge, need: 15},
		{name: "ed_L2_0200", in: cat(edRoute2, []byte{0x57, 0x41, 0x02, 0x00}), kind: metrics.ProtocolWhatsAppEdge, need: 13},
		{name: "ed_L0", in: cat([]byte{0x45, 0x44, 0x00, 0x01, 0x00, 0x00, 0x00}, waHello(6, 3)), kind: metrics.ProtocolWhatsAppEdge, need: 11},
		{name: "ed_L1024", in: cat([]byte{0x45, 0x44, 0x00, 0x01, 0x00, 0x04, 0x00}, bytes.Repeat([]byte{0x08}, 1024), waHello(6, 3)), kind: metrics.ProtocolWhatsAppEdge, need: 1035},
		// XMPP: decided at the `>` closing the stream's start tag.
		{name: "xmpp_client", in: []byte(xmppClient), kind: metrics.ProtocolXMPP, need: len(xmppClient)},
		{name: "xmpp_no_decl_double_quotes", in: []byte(xmppNoDecl), kind: metrics.ProtocolXMPP, need: len(xmppNoDecl)},
		{name: "xmpp_server", in: []byte(xmppServer), kind: metrics.ProtocolXMPP, need: len(xmppServer)},
		{name: "xmpp_pidgin_newline", in: []byte(xmppPidgin), kind: metrics.ProtocolXMPP, need: len(xmppPidgin)},
		{name: "xmpp_whitespace_everywhere", in: []byte(xmppSpaced), kind: metrics.ProtocolXMPP, need: len(xmppSpaced)},
		{name: "xmpp_prefixed_namespace", in: []byte(xmppPrefix), kind: metrics.ProtocolXMPP, need: len(xmppPrefix)},
		{name: "xmpp_bom", in: cat(bom, []byte(xmppClient)), kind: metrics.ProtocolXMPP, need: 3 + len(xmppClient)},
		{name: "xmpp_then_stanza", in: []byte(xmppNoDecl), kind: metrics.ProtocolXMPP, need: len(xmppNoDecl), extra: []byte("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")},
		// Not matched, decided as early as the bytes allow.
		{name: "tls_client_hello", in: tlsHello, need: 1},
		{name: "http_get", in: []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"), need: 1},
		{name: "http_connect", in: []byte("CONNECT g.whatsapp.net:5222 HTTP/1.1\r\n\r\n"), need: 1},
		{name: "ssh_banner", in: []byte("SSH-2.0-OpenSSH_9.2\r\n"), need: 1},
		{name: "proxy_protocol_v1", in: []byte("PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n"), need: 1},
		{name: "random", in: []byte{0x9c, 0x41, 0x06, 0x03, 0xd2, 0x11, 0x7f}, need: 1},
		{name: "text_WAIT", in: []byte("WAIT FOR IT\r\n"), need: 3},
		{name: "text_WA_crlf", in: []byte("WA\r\n"), need: 3},
		{name: "wa_dict_too_big", in: []byte{0x57, 0x41, 0x06, 0x20}, need: 4},
		{name: "text_EHLO", in: []byte("EHLO mail.example\r\n"), need: 2},
		{name: "ed_wrong_version", in: []byte{0x45, 0x44, 0x00, 0x02, 0x00, 0x00, 0x02}, need: 4},
		{name: "ed_routing_too_long", in: []byte{0x45, 0x44, 0x00, 0x01, 0x00, 0x04, 0x01, 0x08}, need: 7},
		{name: "ed_then_tls", in: cat(edRoute2, tlsHello), need: 10},
		{name: "html", in: []byte("<html><body>"), need: 2},
		{name: "xml_then_html", in: []byte("<?xml version='1.0'?><html>"), need: 23},
		{name: "xmlstylesheet", in: []byte("<?xml-stylesheet href='a'?>"), need: 6},
		{name: "stream_other_element", in: []byte("<stream:streams xmlns='jabber:client'>"), need: 15},
		{name: "xmpp_component", in: []byte(xmppCompont), need: len(xmppCompont)},
		{name: "xmpp_no_namespace", in: []byte(xmppNoNS), need: len(xmppNoNS)},
		{name: "xmpp_unquoted_value", in: []byte("<stream:stream xmlns=jabber:client>"), need: 22},
	}
}

// ---- the pure classifier ----

// TestClassifyXMPP checks every prefix of every vector: undecided below
// need bytes, and the final answer from need bytes on.
func TestClassifyXMPP(t *testing.T) {
	for _, c := range xmppCases() {
		t.Run(c.name, func(t *testing.T) {
			in := cat(c.in, c.extra)
			for i := 0; i <= len(in); i++ {
				kind, decided := classifyXMPP(in[:i])
				if i < c.need {
					if decided {
						t.Fatalf("decided (%q) on %d bytes %q; want undecided below %d bytes", kind, i, in[:i], c.need)
					}
					continue
				}
				if !decided || kind != c.kind {
					t.Fatalf("on %d bytes: kind %q decided %v; want %q decided", i, kind, decided, c.kind)
				}
			}
		})
	}
}

// TestClassifyXMPPCaps checks that the classifier answers no past its caps
// instead of asking for more.
func TestClassifyXMPPCaps(t *testing.T) {
	longAttr := []byte("<stream:stream xmlns='jabber:client' x='" + strings.Repeat("a", 3000))
	if _, decided := classifyXMPP(longAttr[:xmppMaxBytes-1]); decided {
		t.Fatal("decided below the cap on a start tag that is still open")
	}
	if kind, decided := classifyXMPP(longAttr[:xmppMaxBytes]); !decided || kind != "" {
		t.Fatalf("at the cap: kind %q decided %v; want no match", kind, decided)
	}
	spaces := bytes.Repeat([]byte(" "), xmppMaxBytes)
	if kind, decided := classifyXMPP(spaces); !decided || kind != "" {
		t.Fatalf("%d spaces: kind %q decided %v; want no match", len(spaces), kind, decided)
	}
	decl := []byte("<?xml version='1.0' " + strings.Repeat("x", 3000))
	if kind, decided := classifyXMPP(decl); !decided || kind != "" {
		t.Fatalf("an unterminated declaration: kind %q decided %v; want no match", kind, decided)
	}
	// An ED length at the cap is waited for; one above is refused at once.
	ed := []byte{0x45, 0x44, 0x00, 0x01, 0x00, 0x04, 0x00}
	if _, decided := classifyXMPP(append(ed, 0x08)); decided {
		t.Fatal("decided on an ED prologue whose routing info is incomplete")
	}
}

// ---- the module ----

func TestMatchXMPPProvisionValidate(t *testing.T) {
	for _, c := range []struct {
		kinds   []string
		wantErr string
	}{
		{kinds: nil},
		{kinds: []string{"whatsapp"}},
		{kinds: []string{"whatsapp", "whatsapp_edge", "xmpp"}},
		{kinds: []string{"jabber"}, wantErr: "unknown kind 'jabber'"},
		{kinds: []string{"xmpp", "xmpp"}, wantErr: "kind 'xmpp' is listed twice"},
	} {
		m := &MatchXMPP{Kinds: c.kinds}
		err := m.Provision(caddy.Context{})
		if err == nil {
			err = m.Validate()
		}
		if c.wantErr == "" && err != nil {
			t.Errorf("kinds %v: %v", c.kinds, err)
		}
		if c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)) {
			t.Errorf("kinds %v: error %v; want one containing %q", c.kinds, err, c.wantErr)
		}
	}
}

func TestMatchXMPPUnmarshalCaddyfile(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    []string
		wantErr string
	}{
		{in: "wa_xmpp"},
		{in: "wa_xmpp kinds whatsapp whatsapp_edge", want: []string{"whatsapp", "whatsapp_edge"}},
		{in: "wa_xmpp {\n\tkinds xmpp\n}", want: []string{"xmpp"}},
		{in: "wa_xmpp whatsapp", wantErr: "wrong argument count"},
		{in: "wa_xmpp kinds", wantErr: "wrong argument count"},
		{in: "wa_xmpp kinds smtp", wantErr: "unknown kind 'smtp'"},
		{in: "wa_xmpp kinds xmpp xmpp", wantErr: "kind 'xmpp' is listed twice"},
		{in: "wa_xmpp kinds xmpp {\n\tkinds whatsapp\n}", wantErr: "kinds given twice"},
		{in: "wa_xmpp {\n\tnamespace jabber:client\n}", wantErr: "unrecognized subdirective 'namespace'"},
	} {
		m := new(MatchXMPP)
		err := m.UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.in))
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%q: error %v; want one containing %q", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if fmt.Sprint(m.Kinds) != fmt.Sprint(c.want) {
			t.Errorf("%q: kinds %v; want %v", c.in, m.Kinds, c.want)
		}
	}
}

// TestMatchXMPPRoutes drives every vector through the real route compiler
// over loopback TCP, delivered all at once and one byte per read. The
// client never closes its side and the matching timeout is a minute, so a
// route can only run if the matcher decided on the bytes the client sent.
func TestMatchXMPPRoutes(t *testing.T) {
	for _, mode := range []struct {
		name string
		wrap func(net.Conn) net.Conn
	}{{"at_once", nil}, {"byte_by_byte", waOneByte}} {
		for _, c := range xmppCases() {
			t.Run(mode.name+"/"+c.name, func(t *testing.T) {
				sent := cat(c.in, c.extra)
				s := waServe(t, waServeOpts{
					routes: []waRoute{{match: `{"wa_xmpp":{}}`, name: "chat", read: len(sent)}},
					next:   waRoute{read: len(sent)},
					wrap:   mode.wrap,
					send:   sent,
				})
				r := s.result(t)
				wantRoute, wantProto := "chat", c.kind
				if c.kind == "" {
					wantRoute, wantProto = "next", metrics.ProtocolRaw
				}
				if r.route != wantRoute {
					t.Fatalf("route %q ran; want %q", r.route, wantRoute)
				}
				if r.kind != c.kind {
					t.Errorf("{l4.wa_xmpp.kind} = %q; want %q", r.kind, c.kind)
				}
				if r.protocol != wantProto {
					t.Errorf("protocol %q; want %q", r.protocol, wantProto)
				}
				if r.err != nil || !bytes.Equal(r.data, sent) {
					t.Errorf("the route read %q (%v); want every byte sent, %q", r.data, r.err, sent)
				}
				if mode.wrap != nil && r.prefetched != c.need {
					t.Errorf("decided after %d bytes; want %d", r.prefetched, c.need)
				}
				if mode.wrap == nil && r.prefetched < c.need {
					t.Errorf("decided after %d bytes; want at least %d", r.prefetched, c.need)
				}
			})
		}
	}
}

// TestMatchXMPPHelloThenSilence: a client that sends the 43-byte hello and
// then waits for the server must be matched on those bytes alone.
func TestMatchXMPPHelloThenSilence(t *testing.T) {
	hello := waHello(6, 3)
	for _, wrap := range []func(net.Conn) net.Conn{nil, waOneByte} {
		s := waServe(t, waServeOpts{
			routes: []waRoute{{match: `{"wa_xmpp":{}}`, name: "chat", read: len(hello), reply: "server hello"}},
			send:   hello,
			wrap:   wrap,
		})
		r := s.result(t)
		if r.route != "chat" || !bytes.Equal(r.data, hello) {
			t.Fatalf("route %q read %q; want chat to read the hello", r.route, r.data)
		}
		buf := make([]byte, len("server hello"))
		_ = s.client.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(s.client, buf); err != nil || string(buf) != "server hello" {
			t.Fatalf("client read %q, %v; want the route's reply", buf, err)
		}
	}
}

// TestMatchXMPPKinds checks the kinds filter. A refused kind is refused
// once the classifier has decided (see Match for why not on the first byte).
func TestMatchXMPPKinds(t *testing.T) {
	ed := cat(edRoute4, waHello(6, 3))
	for _, c := range []struct {
		name  string
		kinds string
		in    []byte
		want  string // "" = not matched
		need  int    // bytes the decision takes
	}{
		{"xmpp_only_refuses_wa", `["xmpp"]`, waHello(6, 3), "", 4},
		{"whatsapp_only_refuses_ed", `["whatsapp"]`, ed, "", 15},
		{"edge_only_matches_ed", `["whatsapp_edge"]`, ed, metrics.ProtocolWhatsAppEdge, 15},
		{"edge_only_refuses_wa", `["whatsapp_edge"]`, waHello(6, 3), "", 4},
		{"wa_and_xmpp_match_xmpp", `["whatsapp","xmpp"]`, []byte(xmppClient), metrics.ProtocolXMPP, len(xmppClient)},
		{"whatsapp_only_refuses_xmpp", `["whatsapp"]`, []byte(xmppClient), "", len(xmppClient)},
		{"all_refuse_tls", `["whatsapp","whatsapp_edge","xmpp"]`, tlsHello, "", 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := waServe(t, waServeOpts{
				routes: []waRoute{{match: `{"wa_xmpp":{"kinds":` + c.kinds + `}}`, name: "chat", read: len(c.in)}},
				next:   waRoute{read: len(c.in)},
				wrap:   waOneByte,
				send:   c.in,
			})
			r := s.result(t)
			if (c.want != "") != (r.route == "chat") || r.kind != c.want {
				t.Fatalf("route %q kind %q; want kind %q", r.route, r.kind, c.want)
			}
			if r.prefetched != c.need {
				t.Errorf("decided after %d bytes; want %d", r.prefetched, c.need)
			}
			if !bytes.Equal(r.data, c.in) {
				t.Errorf("the route read %q; want %q", r.data, c.in)
			}
		})
	}
}

// TestMatchXMPPSeveralRoutes routes each kind to its own route, with a
// catch-all last, as a one-port proxy does; one byte per read, so the first
// route still needs bytes while the second sees the first byte.
func TestMatchXMPPSeveralRoutes(t *testing.T) {
	routes := []waRoute{
		{match: `{"wa_xmpp":{"kinds":["whatsapp","whatsapp_edge"]}}`, name: "wa"},
		{match: `{"wa_xmpp":{"kinds":["xmpp"]}}`, name: "xmpp"},
		{name: "raw"},
	}
	for _, c := range []struct {
		in   []byte
		want string
	}{
		{waHello(6, 3), "wa"},
		{cat(edRoute2, waHello(2, 0)), "wa"},
		{[]byte(xmppServer), "xmpp"},
		{tlsHello, "raw"},
		{[]byte("WAIT"), "raw"},
	} {
		s := waServe(t, waServeOpts{routes: routes, send: c.in, wrap: waOneByte})
		if r := s.result(t); r.route != c.want {
			t.Errorf("%q went to route %q; want %q", c.in, r.route, c.want)
		}
	}
}

// TestCaddyL4RouterOrdering pins a bug of the pinned caddy-l4 route
// compiler (mholt/caddy-l4 PR #455, open): when a route that still needs
// bytes is followed by a route that conclusively does not match, a later
// catch-all route runs on the partial bytes. So routes whose matchers decide
// without bytes (remote_ip...) must come before the byte matchers. If the
// first subtest fails, caddy-l4 has fixed the bug: update this test and the
// note in docs/matchers/wa_xmpp.md.
func TestCaddyL4RouterOrdering(t *testing.T) {
	hello := waHello(6, 3)
	other := waRoute{match: `{"remote_ip":{"ranges":["192.0.2.0/24"]}}`, name: "other"}
	chat := waRoute{match: `{"wa_xmpp":{}}`, name: "chat"}
	t.Run("known_issue_byte_matcher_first", func(t *testing.T) {
		s := waServe(t, waServeOpts{routes: []waRoute{chat, other, {name: "raw"}}, send: hello, wrap: waOneByte})
		if r := s.result(t); r.route != "raw" || r.prefetched != 1 {
			t.Fatalf("route %q ran after %d bytes; the known caddy-l4 bug runs raw after 1 byte (fixed upstream?)", r.route, r.prefetched)
		}
	})
	t.Run("decisive_routes_first", func(t *testing.T) {
		s := waServe(t, waServeOpts{routes: []waRoute{other, chat, {name: "raw"}}, send: hello, wrap: waOneByte})
		if r := s.result(t); r.route != "chat" || r.prefetched != 4 {
			t.Fatalf("route %q ran after %d bytes; want chat after 4", r.route, r.prefetched)
		}
	})
}

// TestMatchXMPPReadError: a client that closes mid-header makes the router
// see EOF, not a silent non-match.
func TestMatchXMPPReadError(t *testing.T) {
	s := waServe(t, waServeOpts{
		routes: []waRoute{{match: `{"wa_xmpp":{}}`, name: "chat"}, {name: "raw"}},
		send:   []byte("WA"),
	})
	if err := s.client.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	s.expectEOFWithoutRoute(t, `only "WA"`)
}

// ---- benchmarks ----

// BenchmarkMatchXMPP measures the decision on whole first segments:
// classify is the byte classifier alone, match is the matcher's Match with
// a match's bookkeeping (the placeholder and metrics.SetProtocol).
func BenchmarkMatchXMPP(b *testing.B) {
	for _, c := range []struct {
		name string
		in   []byte
	}{
		{"whatsapp_hello", waHello(6, 3)},
		{"whatsapp_edge", cat(edRoute4, waHello(6, 3))},
		{"tls_hello", tlsHello},
		{"xmpp", []byte(xmppClient)},
	} {
		b.Run("classify/"+c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(c.in)))
			for b.Loop() {
				if _, decided := classifyXMPP(c.in); !decided {
					b.Fatal("undecided")
				}
			}
		})
		b.Run("match/"+c.name, func(b *testing.B) { benchmarkMatch(b, new(MatchXMPP), c.in) })
	}
}
