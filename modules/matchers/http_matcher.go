package matchers

import (
	"bytes"
	"fmt"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(&MatchHTTP{})
}

// httpMaxBytes is how far into a connection the wa_http classifier looks:
// the request line must end within it (else no match), and an origin-form
// request's Host header is looked for within it (else the match has no
// host). It is half of caddy-l4's matching buffer (layer4.MaxMatchingBytes,
// 16 KiB), so the matcher always decides before the router gives up, and as
// long as the request lines nginx accepts by default.
const httpMaxBytes = 8 * 1024

// httpMaxMethod is the longest method `methods` accepts.
const httpMaxMethod = 32

// DefaultHTTPMethods are the methods wa_http matches by default: those of
// RFC 9110 and PATCH (RFC 5789).
var DefaultHTTPMethods = []string{"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

// MatchHTTP matches a connection that starts with an HTTP/1.x request line,
// `METHOD SP request-target SP HTTP/1.x`, in any of its forms: CONNECT's
// `host:port`, absolute-form (`GET http://host/path HTTP/1.1`, what clients
// send to a forward proxy), origin-form (`GET /path HTTP/1.1`) and `*`.
//
// It decides on the fewest bytes that settle the question: a first byte that
// cannot start one of the methods (a WhatsApp `W`, a TLS `0x16`) is a
// non-match at once, as is any later byte that cannot continue a request
// line; it never looks for a newline to decide what a connection is (the
// WhatsApp hello has 0x0A at index 9). A request is matched at the end of its
// request line, or, for origin-form, once its Host header (or the end of its
// header) has arrived. It looks at no more than 8 KiB.
//
// On a match it sets the placeholders `{l4.wa_http.method}` and
// `{l4.wa_http.host}` (the destination host without port: from CONNECT's
// authority, the absolute-form URL, or the Host header; empty if there is
// none), and records the connection's protocol as `http` for the `protocol`
// label of whatsapp_proxy_protocol_connections.
type MatchHTTP struct {
	// Methods limits the match to requests with these methods (exact,
	// case-sensitive tokens such as `CONNECT` or `PROPFIND`). A request with
	// another method is not matched, decided on the first byte that rules
	// every listed method out.
	// Default: `GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH`.
	Methods []string `json:"methods,omitempty"`

	methods []string // Methods or DefaultHTTPMethods
	boxed   []any    // methods[i] boxed once, for the placeholder
}

// CaddyModule returns the Caddy module information.
func (*MatchHTTP) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.matchers.wa_http",
		New: func() caddy.Module { return new(MatchHTTP) },
	}
}

// Provision sets the default methods.
func (m *MatchHTTP) Provision(_ caddy.Context) error {
	m.methods = m.Methods
	if len(m.methods) == 0 {
		m.methods = DefaultHTTPMethods
	}
	m.boxed = make([]any, len(m.methods))
	for i, method := range m.methods {
		m.boxed[i] = method
	}
	return nil
}

// Validate checks that every method is a valid method token, given once.
func (m *MatchHTTP) Validate() error {
	for i, method := range m.Methods {
		if err := checkMethod(method); err != nil {
			return fmt.Errorf("wa_http: %v", err)
		}
		if slices.Contains(m.Methods[:i], method) {
			return fmt.Errorf("wa_http: method '%s' is listed twice", method)
		}
	}
	return nil
}

// checkMethod reports whether method is an HTTP method token (RFC 9110
// tchar) the matcher accepts: upper case, at most httpMaxMethod bytes.
func checkMethod(method string) error {
	if method == "" || len(method) > httpMaxMethod {
		return fmt.Errorf("method '%s' must be 1 to %d characters", method, httpMaxMethod)
	}
	for i := range len(method) {
		c := method[i]
		if c >= 'a' && c <= 'z' {
			return fmt.Errorf("method '%s' has lower-case letters; methods are case-sensitive (write '%s')", method, strings.ToUpper(method))
		}
		if !isTchar(c) {
			return fmt.Errorf("method '%s' is not an HTTP token", method)
		}
	}
	return nil
}

// isTchar reports whether c may appear in an HTTP token (RFC 9110 5.6.2).
func isTchar(c byte) bool {
	switch {
	case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// Match returns true if the connection starts with an HTTP/1.x request line
// with one of the methods. While the bytes prefetched so far may still
// become one, it returns layer4.ErrConsumedAllPrefetchedBytes so that the
// router reads more.
func (m *MatchHTTP) Match(cx *layer4.Connection) (bool, error) {
	b := cx.MatchingBytes()
	req, decided := classifyHTTP(b, m.methods)
	if !decided {
		return false, layer4.ErrConsumedAllPrefetchedBytes
	}
	if req.method < 0 {
		return false, nil
	}
	if repl, ok := cx.Context.Value(replacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("l4.wa_http.method", m.boxed[req.method])
		repl.Set("l4.wa_http.host", string(b[req.hostStart:req.hostEnd]))
	}
	metrics.SetProtocol(cx, metrics.ProtocolHTTP)
	return true, nil
}

// httpRequest is what classifyHTTP found: the index of the method in the
// method list (-1 for no match) and where the host is in the bytes.
type httpRequest struct {
	method             int
	hostStart, hostEnd int
}

var noHTTP = httpRequest{method: -1}

// classifyHTTP decides whether b, the first bytes of a connection, start an
// HTTP/1.x request with one of methods. It returns decided == false while b
// is a proper prefix of something that may still match; once decided for b,
// the answer (match or not, method and host) is the same for every
// extension of b. It never allocates and looks at no more than httpMaxBytes.
//
// The byte rules: a method from the list, one space, a request-target of
// bytes other than controls, space and DEL, one space, `HTTP/1.`, a digit,
// then CR or LF. For origin-form (`/...`) and asterisk-form (`*`) targets,
// header lines are then read up to the first `Host:` line (its value gives
// the host) or the empty line that ends the header.
func classifyHTTP(b []byte, methods []string) (req httpRequest, decided bool) {
	capped := len(b) >= httpMaxBytes
	if capped {
		b = b[:httpMaxBytes]
	}
	req, decided = scanHTTP(b, methods)
	if !decided && capped {
		if req.method >= 0 {
			return httpRequest{method: req.method}, true // a request line without Host within the cap
		}
		return noHTTP, true
	}
	return req, decided
}

// scanHTTP is classifyHTTP without the cap. While undecided, the method of
// the result is set once the request line is complete.
func scanHTTP(b []byte, methods []string) (httpRequest, bool) {
	// The method and the space after it.
	method, more := -1, false
	for i, m := range methods {
		switch hasLiteral(b, 0, m) {
		case scanNo:
			continue
		case scanMore:
			more = true
			continue
		}
		if len(b) == len(m) {
			more = true
			continue
		}
		if b[len(m)] == ' ' {
			method = i
			break
		}
	}
	if method < 0 {
		return noHTTP, !more
	}

	// The request-target.
	start := len(methods[method]) + 1
	i := start
	for i < len(b) && b[i] != ' ' {
		if b[i] < 0x21 || b[i] == 0x7F {
			return noHTTP, true
		}
		i++
	}
	if i == len(b) {
		return noHTTP, false
	}
	if i == start {
		return noHTTP, true // an empty target: two spaces
	}
	target := b[start:i]

	// The version and the end of the line.
	i++
	switch hasLiteral(b, i, "HTTP/1.") {
	case scanNo:
		return noHTTP, true
	case scanMore:
		return noHTTP, false
	}
	i += len("HTTP/1.")
	if i == len(b) {
		return noHTTP, false
	}
	if b[i] < '0' || b[i] > '9' {
		return noHTTP, true
	}
	i++
	if i == len(b) {
		return noHTTP, false
	}
	if b[i] != '\r' && b[i] != '\n' {
		return noHTTP, true
	}

	req := httpRequest{method: method}
	if target[0] != '/' && string(target) != "*" {
		// CONNECT's authority-form, or absolute-form: the host is in the target.
		as, ae := start, start+len(target)
		if k := bytes.Index(target, schemeSep); k >= 0 {
			as += k + len(schemeSep)
			if end := bytes.IndexAny(b[as:ae], "/?#"); end >= 0 {
				ae = as + end
			}
		}
		req.hostStart, req.hostEnd = hostBounds(b, as, ae)
		return req, true
	}

	// Origin-form: the host is in the Host header.
	if b[i] == '\r' {
		i++
		if i == len(b) {
			return req, false
		}
		if b[i] != '\n' {
			return req, true // a malformed line end: the handler answers it
		}
	}
	i++
	for {
		if i == len(b) {
			return req, false
		}
		if b[i] == '\n' {
			return req, true // the end of the header, without Host
		}
		if b[i] == '\r' {
			if i+1 == len(b) {
				return req, false
			}
			if b[i+1] == '\n' {
				return req, true
			}
		}
		end := bytes.IndexByte(b[i:], '\n')
		if end < 0 {
			return req, false
		}
		line := b[i : i+end]
		if len(line) >= len(hostField) && bytes.EqualFold(line[:len(hostField)], hostField) {
			vs, ve := i+len(hostField), i+len(line)
			for vs < ve && (b[vs] == ' ' || b[vs] == '\t') {
				vs++
			}
			for ve > vs && (b[ve-1] == ' ' || b[ve-1] == '\t' || b[ve-1] == '\r') {
				ve--
			}
			req.hostStart, req.hostEnd = hostBounds(b, vs, ve)
			return req, true
		}
		i += end + 1
	}
}

var (
	schemeSep = []byte("://")
	hostField = []byte("host:")
)

// hostBounds returns where the host is in the authority b[s:e]
// (`[userinfo@]host[:port]`): without userinfo, port and IPv6 brackets. An
// authority with control bytes (a malformed Host header) has no host.
func hostBounds(b []byte, s, e int) (int, int) {
	for _, c := range b[s:e] {
		if c < 0x20 || c == 0x7F {
			return s, s
		}
	}
	if at := bytes.LastIndexByte(b[s:e], '@'); at >= 0 {
		s += at + 1
	}
	if s < e && b[s] == '[' {
		if end := bytes.IndexByte(b[s:e], ']'); end >= 0 {
			return s + 1, s + end
		}
		return s, e
	}
	if bytes.Count(b[s:e], colon) == 1 {
		e = s + bytes.IndexByte(b[s:e], ':')
	}
	return s, e
}

var colon = []byte(":")

// UnmarshalCaddyfile sets up the MatchHTTP from Caddyfile tokens. Syntax:
//
//	wa_http [methods <method...>]
//	wa_http [connect]
//
//	wa_http {
//		methods <method...>
//		connect
//	}
//
// `connect` matches CONNECT requests only: it is short for `methods CONNECT`,
// and the two cannot be combined.
func (m *MatchHTTP) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	_, wrapper := d.Next(), d.Val() // consume wrapper name

	if d.NextArg() {
		if err := m.unmarshalOption(d, wrapper); err != nil {
			return err
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "methods", "connect":
			if err := m.unmarshalOption(d, wrapper); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
	}
	return nil
}

// unmarshalOption reads a `methods` or `connect` token and its arguments.
func (m *MatchHTTP) unmarshalOption(d *caddyfile.Dispenser, wrapper string) error {
	opt := d.Val()
	if m.Methods != nil {
		return d.Errf("%s: methods given twice (connect is short for methods CONNECT)", wrapper)
	}
	switch opt {
	case "connect":
		m.Methods = []string{"CONNECT"}
		if d.NextArg() {
			return d.ArgErr()
		}
		return nil
	case "methods":
		m.Methods = d.RemainingArgs()
		if len(m.Methods) == 0 {
			return d.ArgErr()
		}
		for i, method := range m.Methods {
			if err := checkMethod(method); err != nil {
				return d.Errf("%s: %v", wrapper, err)
			}
			if slices.Contains(m.Methods[:i], method) {
				return d.Errf("%s: method '%s' is listed twice", wrapper, method)
			}
		}
		return nil
	}
	return d.ArgErr()
}

// Interface guards
var (
	_ layer4.ConnMatcher    = (*MatchHTTP)(nil)
	_ caddy.Provisioner     = (*MatchHTTP)(nil)
	_ caddy.Validator       = (*MatchHTTP)(nil)
	_ caddyfile.Unmarshaler = (*MatchHTTP)(nil)
)
