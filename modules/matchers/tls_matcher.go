package matchers

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/waproxy/caddy-waproxy/internal/hostname"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(&MatchTLS{})
}

// Wire constants and limits of the wa_tls classifier.
const (
	tlsRecordHeaderLen      = 5
	tlsRecordTypeHandshake  = 0x16
	tlsHandshakeHeaderLen   = 4
	tlsHandshakeClientHello = 0x01
	tlsMaxMinorVersion      = 0x04    // 3.4 is TLS 1.3; 3.0 is SSL 3.0
	tlsMaxRecordLen         = 1 << 14 // RFC 8446 §5.1: a plaintext fragment is at most 2^14 bytes
	tlsExtServerName        = 0
	tlsExtALPN              = 16
	tlsServerNameTypeHost   = 0
	// tlsMaxHelloBytes is how far into a connection the classifier looks:
	// caddy-l4's matching buffer. A ClientHello whose records do not end
	// within it is not matched (the router could not buffer more anyway).
	tlsMaxHelloBytes = layer4.MaxMatchingBytes
)

// tlsScratch holds the buffers a ClientHello split across several records is
// reassembled into. A hello in one record (nearly all of them) is parsed
// where it lies.
var tlsScratch = sync.Pool{New: func() any { b := make([]byte, tlsMaxHelloBytes); return &b }}

// MatchTLS matches a TLS ClientHello and, optionally, filters it by the
// server name (SNI) and the application protocols (ALPN) the client offers.
//
// It recognises TLS from the first byte on (a handshake record, 0x16, then
// the record version 3.0–3.4), and reads the whole ClientHello even when the
// client splits it across several TLS records (a DPI-evasion technique) or
// TCP segments, up to caddy-l4's 16 KiB matching buffer. A malformed hello,
// or one that does not fit in the buffer, is a non-match.
//
// On a match it sets the placeholders `{l4.wa_tls.server_name}` (the SNI,
// lowercased; empty without one) and `{l4.wa_tls.alpn}` (the offered
// protocols, comma-separated, in the client's order; empty without ALPN), and
// records the connection's protocol as `tls` for the `protocol` label of
// whatsapp_proxy_protocol_connections.
type MatchTLS struct {
	// SNI limits the match to ClientHellos whose server name matches one of
	// these patterns (case-insensitive): an exact name (`mmg.whatsapp.net`),
	// `*.` followed by a name for every subdomain of it at any depth
	// (`*.whatsapp.net`, not `whatsapp.net` itself), or names with `*` inside
	// a label, matching any run of characters within that label
	// (`media-*.cdn.whatsapp.net`). A hello without a server name does not
	// match unless NoSNI is set. Default: any server name, or none.
	SNI []string `json:"sni,omitempty"`

	// ALPN limits the match to ClientHellos that offer at least one of these
	// application protocols (`h2`, `http/1.1`, ...; compared exactly). A
	// hello without the ALPN extension does not match. Default: any, or none.
	ALPN []string `json:"alpn,omitempty"`

	// NoSNI matches ClientHellos that carry no server name (clients that
	// connect to an IP address send none). With SNI, a hello matches if it
	// has no server name or a matching one; alone, only hellos without a
	// server name match. Default: `false`.
	NoSNI bool `json:"no_sni,omitempty"`

	sni []string // normalized patterns
}

// CaddyModule returns the Caddy module information.
func (*MatchTLS) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.matchers.wa_tls",
		New: func() caddy.Module { return new(MatchTLS) },
	}
}

// Provision normalizes the server name patterns.
func (m *MatchTLS) Provision(_ caddy.Context) error {
	m.sni = make([]string, 0, len(m.SNI))
	for _, p := range m.SNI {
		p = normalizeSNIPattern(p)
		if err := checkSNIPattern(p); err != nil {
			return err
		}
		m.sni = append(m.sni, p)
	}
	return nil
}

// Validate checks the patterns and protocols.
func (m *MatchTLS) Validate() error {
	for _, p := range m.SNI {
		if err := checkSNIPattern(normalizeSNIPattern(p)); err != nil {
			return err
		}
	}
	for _, p := range m.ALPN {
		if err := checkALPNProtocol(p); err != nil {
			return err
		}
	}
	return nil
}

func normalizeSNIPattern(p string) string { return strings.ToLower(strings.TrimSuffix(p, ".")) }

// checkSNIPattern checks a normalized server name pattern.
func checkSNIPattern(p string) error {
	if p == "*" {
		return fmt.Errorf("wa_tls: sni pattern '*': leave out sni to match any server name")
	}
	if p == "" || len(p) > hostname.MaxLen {
		return fmt.Errorf("wa_tls: sni pattern '%s': not a host name", p)
	}
	for label := range strings.SplitSeq(p, ".") {
		if label == "" || len(label) > hostname.MaxLabelLen {
			return fmt.Errorf("wa_tls: sni pattern '%s': empty or overlong label", p)
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; c != '*' && !hostname.IsByte(c) {
				return fmt.Errorf("wa_tls: sni pattern '%s': invalid character %q", p, c)
			}
		}
	}
	return nil
}

// checkALPNProtocol checks an ALPN protocol name (RFC 7301: 1–255 bytes).
func checkALPNProtocol(p string) error {
	if p == "" || len(p) > 255 {
		return fmt.Errorf("wa_tls: alpn protocol '%s': must be 1-255 bytes", p)
	}
	return nil
}

// Match returns true if the connection starts with a TLS ClientHello that
// passes the filters. While the bytes prefetched so far are a prefix of a
// ClientHello that may still fit in caddy-l4's matching buffer, it returns
// layer4.ErrConsumedAllPrefetchedBytes so that the router reads more.
func (m *MatchTLS) Match(cx *layer4.Connection) (bool, error) {
	b := cx.MatchingBytes()
	var scratch *[]byte
	defer func() {
		if scratch != nil {
			tlsScratch.Put(scratch)
		}
	}()
	hello, st := classifyTLS(b, func() []byte {
		scratch = tlsScratch.Get().(*[]byte)
		return *scratch
	})
	switch st {
	case scanMore:
		return false, layer4.ErrConsumedAllPrefetchedBytes
	case scanNo:
		return false, nil
	}
	if !m.accepts(&hello) {
		return false, nil
	}
	if repl, ok := cx.Context.Value(replacerCtxKey).(*caddy.Replacer); ok {
		// The slices view b or the scratch buffer: copy them out.
		repl.Set("l4.wa_tls.server_name", strings.ToLower(string(hello.serverName)))
		repl.Set("l4.wa_tls.alpn", joinALPN(hello.alpn))
	}
	metrics.SetProtocol(cx, metrics.ProtocolTLS)
	return true, nil
}

// accepts reports whether a parsed hello passes the SNI, NoSNI and ALPN filters.
func (m *MatchTLS) accepts(h *clientHelloInfo) bool {
	if len(m.sni) > 0 || m.NoSNI {
		ok := false
		if h.serverName == nil {
			ok = m.NoSNI
		} else {
			for _, p := range m.sni {
				if matchSNIPattern(p, h.serverName) {
					ok = true
					break
				}
			}
		}
		if !ok {
			return false
		}
	}
	if len(m.ALPN) > 0 {
		if !h.hasALPN {
			return false
		}
		for list := h.alpn; len(list) > 0; {
			n := int(list[0])
			proto := list[1 : 1+n]
			list = list[1+n:]
			for _, want := range m.ALPN {
				if string(proto) == want {
					return true
				}
			}
		}
		return false
	}
	return true
}

// joinALPN returns the protocols of a ProtocolNameList body, comma-separated.
func joinALPN(list []byte) string {
	if len(list) == 0 {
		return ""
	}
	var sb strings.Builder
	sb.Grow(len(list))
	for len(list) > 0 {
		n := int(list[0])
		if sb.Len() > 0 {
			sb.WriteByte(',')
		}
		sb.Write(list[1 : 1+n])
		list = list[1+n:]
	}
	return sb.String()
}

// matchSNIPattern reports whether name (as sent, any case) matches the
// normalized pattern p, label by label from the right. A leading `*` label
// stands for one or more labels; `*` elsewhere matches any run of characters
// within its label.
func matchSNIPattern(p string, name []byte) bool {
	anyDepth := strings.HasPrefix(p, "*.")
	if anyDepth {
		p = p[2:]
	}
	for {
		pi := strings.LastIndexByte(p, '.')
		ni := lastIndexByte(name, '.')
		if !globLabel(p[pi+1:], name[ni+1:]) {
			return false
		}
		if pi < 0 {
			// The pattern is used up: the name must be too, or, for `*.`,
			// have at least one more label.
			if anyDepth {
				return ni >= 0
			}
			return ni < 0
		}
		if ni < 0 {
			return false
		}
		p, name = p[:pi], name[:ni]
	}
}

func lastIndexByte(b []byte, c byte) int {
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == c {
			return i
		}
	}
	return -1
}

// globLabel matches one label of a name against a pattern label in which
// `*` matches any run of characters, ASCII case-insensitively (the pattern
// is lowercase).
func globLabel(p string, s []byte) bool {
	// The classic linear wildcard match with one backtrack point.
	pi, si := 0, 0
	star, mark := -1, 0
	for si < len(s) {
		switch {
		case pi < len(p) && p[pi] == '*':
			star, mark = pi, si
			pi++
		case pi < len(p) && p[pi] == toLowerASCII(s[si]):
			pi++
			si++
		case star >= 0:
			pi = star + 1
			mark++
			si = mark
		default:
			return false
		}
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}

func toLowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// clientHelloInfo is what the classifier extracts from a ClientHello. The slices
// view the bytes the hello was parsed from.
type clientHelloInfo struct {
	// serverName is the host_name of the server_name extension; nil without one.
	serverName []byte
	// alpn is the body of the ALPN extension's ProtocolNameList: each
	// protocol as a length byte and that many bytes, all checked non-empty.
	alpn    []byte
	hasALPN bool
}

// classifyTLS decides whether b, the first bytes of a connection, start
// with a TLS ClientHello. It returns scanMore while b is a proper prefix of
// a well-formed ClientHello that may still end within tlsMaxHelloBytes,
// scanNo when it is not (or cannot fit), and scanYes with the parsed hello
// once the whole ClientHello is in b. Once decided for b, the answer is the
// same for every extension of b.
//
// The handshake message may be split across any number of records. When it
// is, scratch is called once for a tlsMaxHelloBytes buffer to reassemble it
// in, and the hello's slices view that buffer. classifyTLS allocates nothing
// and never sizes anything from a length it reads.
func classifyTLS(b []byte, scratch func() []byte) (clientHelloInfo, int) {
	if len(b) > tlsMaxHelloBytes {
		b = b[:tlsMaxHelloBytes]
	}
	msgLen, start, single, st := scanTLSRecords(b, nil)
	if st != scanYes {
		return clientHelloInfo{}, st
	}
	var msg []byte
	if single {
		msg = b[start : start+msgLen]
	} else {
		msg = scratch()[:msgLen]
		scanTLSRecords(b, msg)
	}
	h, ok := parseClientHello(msg[tlsHandshakeHeaderLen:])
	if !ok {
		return clientHelloInfo{}, scanNo
	}
	return h, scanYes
}

// scanTLSRecords walks the handshake records at the start of b until they
// hold a whole handshake message, a ClientHello. It returns the message's
// length (header included), where it starts in b and whether a single
// record holds it all, and the state: scanMore, scanNo or scanYes (the
// message is complete). With dst non-nil (len(dst) == msgLen of a complete
// message), it copies the message's bytes into dst.
func scanTLSRecords(b, dst []byte) (msgLen, start int, single bool, st int) {
	got := 0     // handshake bytes seen, header included
	need := 0    // the whole message's length, once its header is complete
	records := 0 // records the message has bytes in
	p := 0
	for {
		// The record header, byte by byte so that a bad one is refused at once.
		if p == len(b) {
			return 0, 0, false, tlsMore(b)
		}
		if b[p] != tlsRecordTypeHandshake {
			return 0, 0, false, scanNo
		}
		if p+1 < len(b) && b[p+1] != 3 {
			return 0, 0, false, scanNo
		}
		if p+2 < len(b) && b[p+2] > tlsMaxMinorVersion {
			return 0, 0, false, scanNo
		}
		if p+tlsRecordHeaderLen > len(b) {
			return 0, 0, false, tlsMore(b)
		}
		n := int(b[p+3])<<8 | int(b[p+4])
		if n == 0 || n > tlsMaxRecordLen {
			// RFC 8446 §5.1, RFC 5246 §6.2.1: no empty handshake fragments.
			return 0, 0, false, scanNo
		}
		p += tlsRecordHeaderLen
		recEnd := p + n            // where this record ends, in or beyond b
		end := min(recEnd, len(b)) // the part of it in b
		records++

		// The handshake header: type and 3-byte length.
		for p < end && got < tlsHandshakeHeaderLen {
			if got == 0 {
				start = p
				if b[p] != tlsHandshakeClientHello {
					return 0, 0, false, scanNo
				}
				need = 0
			} else {
				need = need<<8 | int(b[p]) // the 24-bit length, so far
			}
			if dst != nil {
				dst[got] = b[p]
			}
			got++
			p++
			if got == tlsHandshakeHeaderLen {
				need += tlsHandshakeHeaderLen
			}
		}
		if got < tlsHandshakeHeaderLen {
			if end < recEnd {
				return 0, 0, false, tlsMore(b)
			}
			p = recEnd
			continue
		}

		// The message body.
		take := min(end-p, need-got)
		if dst != nil {
			copy(dst[got:], b[p:p+take])
		}
		got += take
		p += take
		if got == need {
			return need, start, records == 1, scanYes
		}
		// Refuse at once a message that cannot end within the matching
		// buffer: the fewest bytes its rest takes is what is left of it in
		// this record, then, if that is not all, at least one more record.
		rest, left := need-got, recEnd-p
		least := p + rest
		if rest > left {
			least = recEnd + tlsRecordHeaderLen + rest - left
		}
		if least > tlsMaxHelloBytes {
			return 0, 0, false, scanNo
		}
		if end < recEnd {
			return 0, 0, false, tlsMore(b)
		}
		p = recEnd
	}
}

// tlsMore is the answer for a prefix of a ClientHello: more bytes, unless b
// already fills the matching buffer.
func tlsMore(b []byte) int {
	if len(b) >= tlsMaxHelloBytes {
		return scanNo
	}
	return scanMore
}

// parseClientHello parses the body of a ClientHello handshake message
// (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2) and extracts the server name (RFC 6066
// §3) and the ALPN protocols (RFC 7301 §3.1). It reports false for anything
// malformed: a field overrunning its enclosing vector, bytes left over, an
// empty cipher suite or compression list, a server_name or ALPN extension
// given twice or malformed, or a host name that is not one.
func parseClientHello(s []byte) (clientHelloInfo, bool) {
	var h clientHelloInfo
	// legacy_version and random
	if len(s) < 2+32 || s[0] != 3 || s[1] > tlsMaxMinorVersion {
		return h, false
	}
	s = s[2+32:]
	sessionID, s, ok := readVec8(s)
	if !ok || len(sessionID) > 32 {
		return h, false
	}
	suites, s, ok := readVec16(s)
	if !ok || len(suites) < 2 || len(suites)%2 != 0 {
		return h, false
	}
	compression, s, ok := readVec8(s)
	if !ok || len(compression) < 1 {
		return h, false
	}
	if len(s) == 0 {
		return h, true // no extensions (SSL 3.0 style)
	}
	exts, s, ok := readVec16(s)
	if !ok || len(s) != 0 {
		return h, false
	}
	for len(exts) > 0 {
		if len(exts) < 4 {
			return h, false
		}
		typ := int(exts[0])<<8 | int(exts[1])
		var data []byte
		data, exts, ok = readVec16(exts[2:])
		if !ok {
			return h, false
		}
		switch typ {
		case tlsExtServerName:
			if h.serverName != nil || !parseServerName(data, &h) {
				return h, false
			}
		case tlsExtALPN:
			if h.hasALPN || !parseALPN(data, &h) {
				return h, false
			}
		}
	}
	return h, true
}

// parseServerName parses the server_name extension's ServerNameList and
// sets h.serverName to its host_name, which must be a syntactically valid
// host name given once. Entries of other name types are skipped.
func parseServerName(data []byte, h *clientHelloInfo) bool {
	list, rest, ok := readVec16(data)
	if !ok || len(rest) != 0 || len(list) == 0 {
		return false
	}
	for len(list) > 0 {
		typ := list[0]
		var name []byte
		name, list, ok = readVec16(list[1:])
		if !ok {
			return false
		}
		if typ != tlsServerNameTypeHost {
			continue
		}
		if h.serverName != nil || hostname.Check(name) != "" {
			return false
		}
		h.serverName = name
	}
	return h.serverName != nil
}

// parseALPN parses the ALPN extension's ProtocolNameList: one or more
// non-empty names.
func parseALPN(data []byte, h *clientHelloInfo) bool {
	list, rest, ok := readVec16(data)
	if !ok || len(rest) != 0 || len(list) == 0 {
		return false
	}
	for l := list; len(l) > 0; {
		var proto []byte
		proto, l, ok = readVec8(l)
		if !ok || len(proto) == 0 {
			return false
		}
	}
	h.alpn, h.hasALPN = list, true
	return true
}

// readVec8 splits a vector with a 1-byte length off the front of s.
func readVec8(s []byte) (vec, rest []byte, ok bool) {
	if len(s) < 1 || len(s)-1 < int(s[0]) {
		return nil, nil, false
	}
	n := int(s[0])
	return s[1 : 1+n], s[1+n:], true
}

// readVec16 splits a vector with a 2-byte big-endian length off the front of s.
func readVec16(s []byte) (vec, rest []byte, ok bool) {
	if len(s) < 2 {
		return nil, nil, false
	}
	n := int(s[0])<<8 | int(s[1])
	if len(s)-2 < n {
		return nil, nil, false
	}
	return s[2 : 2+n], s[2+n:], true
}

// UnmarshalCaddyfile sets up the MatchTLS from Caddyfile tokens. Syntax:
//
//	wa_tls [sni <patterns...>] [alpn <protocols...>] [no_sni]
//
//	wa_tls {
//		sni <patterns...>
//		alpn <protocols...>
//		no_sni
//	}
//
// On the matcher's line, each of `sni`, `alpn` and `no_sni` starts a new
// option; the option names are therefore not usable as patterns or
// protocols there (they are in the block).
func (m *MatchTLS) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	_, wrapper := d.Next(), d.Val() // consume wrapper name

	seen := make(map[string]bool)
	option := func(name string) error {
		if seen[name] {
			return d.Errf("%s: %s given twice", wrapper, name)
		}
		seen[name] = true
		return nil
	}
	// the line: options, each followed by its arguments up to the next option
	for d.NextArg() {
		name := d.Val()
		if err := option(name); err != nil {
			return err
		}
		var args []string
		for d.NextArg() {
			if slices.Contains(tlsOptions, d.Val()) {
				d.Prev()
				break
			}
			args = append(args, d.Val())
		}
		if err := m.setOption(d, wrapper, name, args); err != nil {
			return err
		}
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if !slices.Contains(tlsOptions, name) {
			return d.Errf("unrecognized subdirective '%s'", name)
		}
		if err := option(name); err != nil {
			return err
		}
		if err := m.setOption(d, wrapper, name, d.RemainingArgs()); err != nil {
			return err
		}
	}
	return nil
}

// tlsOptions are the options of wa_tls.
var tlsOptions = []string{"sni", "alpn", "no_sni"}

// setOption sets the option name from its arguments.
func (m *MatchTLS) setOption(d *caddyfile.Dispenser, wrapper, name string, args []string) error {
	switch name {
	case "sni":
		if len(args) == 0 {
			return d.ArgErr()
		}
		for _, p := range args {
			if err := checkSNIPattern(normalizeSNIPattern(p)); err != nil {
				return d.Err(err.Error())
			}
		}
		m.SNI = args
	case "alpn":
		if len(args) == 0 {
			return d.ArgErr()
		}
		for _, p := range args {
			if err := checkALPNProtocol(p); err != nil {
				return d.Err(err.Error())
			}
		}
		m.ALPN = args
	case "no_sni":
		if len(args) > 0 {
			return d.ArgErr()
		}
		m.NoSNI = true
	default:
		return d.Errf("%s: unknown option '%s' (want sni, alpn or no_sni)", wrapper, name)
	}
	return nil
}

// Interface guards
var (
	_ layer4.ConnMatcher    = (*MatchTLS)(nil)
	_ caddy.Provisioner     = (*MatchTLS)(nil)
	_ caddy.Validator       = (*MatchTLS)(nil)
	_ caddyfile.Unmarshaler = (*MatchTLS)(nil)
)
