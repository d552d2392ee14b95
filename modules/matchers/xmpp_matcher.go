package matchers

import (
	"fmt"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func init() {
	caddy.RegisterModule(&MatchXMPP{})
}

// Byte limits of the wa_xmpp classifier. Each is far below caddy-l4's
// prefetch chunk (2 KiB) and its matching buffer (layer4.MaxMatchingBytes,
// 16 KiB), so the matcher always decides before the router gives up.
const (
	// waMaxVersion is the largest value accepted for the WA header's magic
	// (protocol version) and dictionary version bytes. Known values are
	// magic 1, 2, 5, 6 and dict 0, 2, 3, 5; anything at or below 0x1F is a
	// non-printable byte, which no text protocol sends right after "WA".
	waMaxVersion = 0x1F
	// edMaxRoutingLen caps the length of the ED prologue's routing info.
	// Real routing info is a 2–4 byte protobuf.
	edMaxRoutingLen = 1024
	// xmppMaxBytes is how far into an XMPP stream header the matcher looks:
	// past it, a stream whose start tag has not closed is not matched.
	xmppMaxBytes = 2048
)

// The replacer's context key and the placeholder values, boxed once so that
// a match does not allocate for them.
var (
	replacerCtxKey  any = layer4.ReplacerCtxKey
	anyWhatsApp     any = metrics.ProtocolWhatsApp
	anyWhatsAppEdge any = metrics.ProtocolWhatsAppEdge
	anyXMPP         any = metrics.ProtocolXMPP
)

// xmppKinds lists the kinds wa_xmpp recognises, in the order of their bits
// in MatchXMPP.mask.
var xmppKinds = []string{metrics.ProtocolWhatsApp, metrics.ProtocolWhatsAppEdge, metrics.ProtocolXMPP}

// MatchXMPP matches the chat streams a WhatsApp proxy carries: WhatsApp's own
// chat protocol (the `WA` connection header), the same preceded by the `ED`
// edge-routing prologue, and XMPP client and server streams. It decides on
// the fewest bytes that settle the question and never waits for bytes a
// client may not send: a 4-byte `WA` header is enough to match, and a first
// byte that cannot start any of the three is a non-match at once.
//
// On a match it sets the placeholder `{l4.wa_xmpp.kind}` to `whatsapp`,
// `whatsapp_edge` or `xmpp`, and records the same value as the connection's
// protocol for the `protocol` label of whatsapp_proxy_protocol_connections.
type MatchXMPP struct {
	// Kinds limits the match to these kinds of stream: `whatsapp` (the WA
	// header), `whatsapp_edge` (the ED prologue followed by the WA header)
	// and `xmpp` (an XMPP client or server stream). A connection of another
	// kind is not matched. Default: all three.
	Kinds []string `json:"kinds,omitempty"`

	mask uint8 // bit i set: xmppKinds[i] is accepted; 0 means all
}

// CaddyModule returns the Caddy module information.
func (*MatchXMPP) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.matchers.wa_xmpp",
		New: func() caddy.Module { return new(MatchXMPP) },
	}
}

// Provision turns Kinds into the matcher's lookup mask.
func (m *MatchXMPP) Provision(_ caddy.Context) error {
	m.mask = 0
	for _, k := range m.Kinds {
		i := slices.Index(xmppKinds, k)
		if i < 0 {
			return unknownKindError(k)
		}
		m.mask |= 1 << i
	}
	return nil
}

// Validate checks that every kind is known and given once.
func (m *MatchXMPP) Validate() error {
	for i, k := range m.Kinds {
		if !slices.Contains(xmppKinds, k) {
			return unknownKindError(k)
		}
		if slices.Contains(m.Kinds[:i], k) {
			return fmt.Errorf("wa_xmpp: kind '%s' is listed twice", k)
		}
	}
	return nil
}

func unknownKindError(k string) error {
	return fmt.Errorf("wa_xmpp: unknown kind '%s' (want one of: %s)", k, strings.Join(xmppKinds, ", "))
}

// accepts reports whether kind passes the Kinds filter.
func (m *MatchXMPP) accepts(kind string) bool {
	if m.mask == 0 {
		return true
	}
	i := slices.Index(xmppKinds, kind)
	return i >= 0 && m.mask&(1<<i) != 0
}

// Match returns true if the connection starts a WhatsApp chat stream (with or
// without the ED prologue) or an XMPP stream. While the bytes prefetched so
// far are a prefix of one of these, it returns layer4.ErrConsumedAllPrefetchedBytes
// so that the router reads more.
func (m *MatchXMPP) Match(cx *layer4.Connection) (bool, error) {
	// The Kinds filter is applied to the classifier's decision, not to the
	// first byte (which already tells the kind): refusing early would make
	// this route "conclusively not matched" while an earlier route (say, a
	// wa_xmpp route for another kind) still waits for bytes, and caddy-l4's
	// route compiler then runs a catch-all route on the partial bytes
	// (mholt/caddy-l4 PR #455). Deciding on the classifier's answer costs
	// nothing a real client does not send in its first segment anyway.
	kind, decided := classifyXMPP(cx.MatchingBytes())
	if !decided {
		return false, layer4.ErrConsumedAllPrefetchedBytes
	}
	if kind == "" || !m.accepts(kind) {
		return false, nil
	}
	if repl, ok := cx.Context.Value(replacerCtxKey).(*caddy.Replacer); ok {
		repl.Set("l4.wa_xmpp.kind", boxedKind(kind))
	}
	metrics.SetProtocol(cx, kind)
	return true, nil
}

func boxedKind(kind string) any {
	switch kind {
	case metrics.ProtocolWhatsApp:
		return anyWhatsApp
	case metrics.ProtocolWhatsAppEdge:
		return anyWhatsAppEdge
	}
	return anyXMPP
}

// xmppCandidate returns the only kind a stream starting with c can be, or ""
// if c starts none of them.
func xmppCandidate(c byte) string {
	switch c {
	case 'W':
		return metrics.ProtocolWhatsApp
	case 'E':
		return metrics.ProtocolWhatsAppEdge
	case '<', 0xEF, ' ', '\t', '\r', '\n':
		return metrics.ProtocolXMPP
	}
	return ""
}

// classifyXMPP decides what the first bytes b of a connection are. It
// returns decided == false while b is a proper prefix of something that may
// still match; otherwise kind is the kind matched, or "" for no match. Once
// decided for b, the answer is the same for every extension of b. It never
// allocates and never asks for more than edMaxRoutingLen+11 bytes (ED) or
// xmppMaxBytes (XMPP).
//
// The byte rules:
//   - whatsapp: 'W' 'A' magic dict, with 0x01 <= magic <= 0x1F except TAB, LF
//     and CR, and dict <= 0x1F.
//   - whatsapp_edge: 'E' 'D' 0x00 0x01, a 3-byte big-endian length L <= 1024,
//     L bytes of routing info, then a WA header as above.
//   - xmpp: an optional UTF-8 BOM, optional whitespace, an optional
//     `<?xml` declaration closed by `?>`, optional whitespace, then
//     `<stream:stream` and whitespace, attributes (name = quoted value, in
//     any order, either quote) up to the `>` that closes the start tag, one
//     of which is `xmlns` or `xmlns:<prefix>` with the value `jabber:client`
//     or `jabber:server`.
func classifyXMPP(b []byte) (kind string, decided bool) {
	if len(b) == 0 {
		return "", false
	}
	switch xmppCandidate(b[0]) {
	case metrics.ProtocolWhatsApp:
		return classifyWAHeader(b, metrics.ProtocolWhatsApp)
	case metrics.ProtocolWhatsAppEdge:
		return classifyEdge(b)
	case metrics.ProtocolXMPP:
		return classifyStream(b)
	}
	return "", true
}

// classifyWAHeader checks the 4-byte WA connection header at the start of b
// and reports kind once it is complete.
func classifyWAHeader(b []byte, kind string) (string, bool) {
	if len(b) > 0 && b[0] != 'W' {
		return "", true
	}
	if len(b) > 1 && b[1] != 'A' {
		return "", true
	}
	if len(b) > 2 && (b[2] == 0 || b[2] > waMaxVersion || b[2] == '\t' || b[2] == '\n' || b[2] == '\r') {
		return "", true
	}
	if len(b) > 3 && b[3] > waMaxVersion {
		return "", true
	}
	if len(b) < 4 {
		return "", false
	}
	return kind, true
}

const edMagic = "ED\x00\x01"

// classifyEdge checks the ED edge-routing prologue and the WA header after it.
func classifyEdge(b []byte) (string, bool) {
	n := min(len(b), len(edMagic))
	if string(b[:n]) != edMagic[:n] {
		return "", true
	}
	if len(b) < 7 {
		return "", false
	}
	l := int(b[4])<<16 | int(b[5])<<8 | int(b[6])
	if l > edMaxRoutingLen {
		return "", true
	}
	rest := b[7:]
	if len(rest) < l {
		return "", false
	}
	return classifyWAHeader(rest[l:], metrics.ProtocolWhatsAppEdge)
}

// Results of the stream scanner.
const (
	scanMore = iota
	scanNo
	scanYes
)

// classifyStream checks an XMPP stream header, looking at no more than
// xmppMaxBytes.
func classifyStream(b []byte) (string, bool) {
	capped := len(b) >= xmppMaxBytes
	if capped {
		b = b[:xmppMaxBytes]
	}
	switch scanStream(b) {
	case scanYes:
		return metrics.ProtocolXMPP, true
	case scanNo:
		return "", true
	}
	return "", capped
}

func isXMLSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\r' || c == '\n' }

// hasLiteral reports whether b[i:] starts with lit (scanYes), is a proper
// prefix of it (scanMore), or differs from it (scanNo).
func hasLiteral(b []byte, i int, lit string) int {
	n := min(len(b)-i, len(lit))
	if string(b[i:i+n]) != lit[:n] {
		return scanNo
	}
	if n < len(lit) {
		return scanMore
	}
	return scanYes
}

func skipXMLSpace(b []byte, i int) int {
	for i < len(b) && isXMLSpace(b[i]) {
		i++
	}
	return i
}

// scanStream scans an XMPP stream header from the start of b.
func scanStream(b []byte) int {
	i := 0
	if b[0] == 0xEF {
		if r := hasLiteral(b, 0, "\xEF\xBB\xBF"); r != scanYes {
			return r
		}
		i = 3
	}
	i = skipXMLSpace(b, i)
	if i+1 < len(b) && b[i] == '<' && b[i+1] == '?' {
		// The XML declaration: `<?xml` and whitespace, then anything but
		// markup up to `?>`.
		if r := hasLiteral(b, i, "<?xml"); r != scanYes {
			return r
		}
		i += len("<?xml")
		if i == len(b) {
			return scanMore
		}
		if !isXMLSpace(b[i]) {
			return scanNo
		}
		for ; ; i++ {
			if i == len(b) {
				return scanMore
			}
			if b[i] == '<' || b[i] == '>' {
				return scanNo
			}
			if b[i] == '?' {
				if i+1 == len(b) {
					return scanMore
				}
				if b[i+1] == '>' {
					i += 2
					break
				}
			}
		}
		i = skipXMLSpace(b, i)
	}
	if i == len(b) {
		return scanMore
	}
	if r := hasLiteral(b, i, "<stream:stream"); r != scanYes {
		return r
	}
	i += len("<stream:stream")
	if i == len(b) {
		return scanMore
	}
	if !isXMLSpace(b[i]) {
		return scanNo // `<stream:stream>` declares no namespace; anything else is another element
	}

	// Attributes, up to the `>` that closes the start tag.
	found := false
	for {
		i = skipXMLSpace(b, i)
		if i == len(b) {
			return scanMore
		}
		if b[i] == '>' {
			if found {
				return scanYes
			}
			return scanNo
		}
		start := i
		for i < len(b) && isXMLNameByte(b[i]) {
			i++
		}
		if i == len(b) {
			return scanMore
		}
		if i == start {
			return scanNo // `/`, `<`, `=` or a quote where a name should be
		}
		name := b[start:i]
		i = skipXMLSpace(b, i)
		if i == len(b) {
			return scanMore
		}
		if b[i] != '=' {
			return scanNo
		}
		i = skipXMLSpace(b, i+1)
		if i == len(b) {
			return scanMore
		}
		quote := b[i]
		if quote != '\'' && quote != '"' {
			return scanNo
		}
		i++
		vstart := i
		for i < len(b) && b[i] != quote {
			if b[i] == '<' {
				return scanNo
			}
			i++
		}
		if i == len(b) {
			return scanMore
		}
		value := b[vstart:i]
		i++
		if isXMLNSName(name) && (string(value) == "jabber:client" || string(value) == "jabber:server") {
			found = true
		}
	}
}

// isXMLNameByte reports whether c may be part of an attribute name; it is
// lenient (any byte but whitespace and markup).
func isXMLNameByte(c byte) bool {
	switch c {
	case '=', '>', '<', '/', '"', '\'', ' ', '\t', '\r', '\n':
		return false
	}
	return true
}

// isXMLNSName reports whether an attribute name declares a namespace.
func isXMLNSName(name []byte) bool {
	return string(name) == "xmlns" || len(name) > len("xmlns:") && string(name[:len("xmlns:")]) == "xmlns:"
}

// UnmarshalCaddyfile sets up the MatchXMPP from Caddyfile tokens. Syntax:
//
//	wa_xmpp [kinds <kind...>]
//
//	wa_xmpp {
//		kinds <kind...>
//	}
//
// where each kind is `whatsapp`, `whatsapp_edge` or `xmpp`.
func (m *MatchXMPP) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	_, wrapper := d.Next(), d.Val() // consume wrapper name

	if d.NextArg() {
		if d.Val() != "kinds" {
			return d.ArgErr()
		}
		if err := m.unmarshalKinds(d, wrapper); err != nil {
			return err
		}
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "kinds":
			if err := m.unmarshalKinds(d, wrapper); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
	}
	return nil
}

// unmarshalKinds reads the arguments of a `kinds` token.
func (m *MatchXMPP) unmarshalKinds(d *caddyfile.Dispenser, wrapper string) error {
	if m.Kinds != nil {
		return d.Errf("%s: kinds given twice", wrapper)
	}
	m.Kinds = d.RemainingArgs()
	if len(m.Kinds) == 0 {
		return d.ArgErr()
	}
	for i, k := range m.Kinds {
		if !slices.Contains(xmppKinds, k) {
			return d.Errf("%s: unknown kind '%s' (want one of: %s)", wrapper, k, strings.Join(xmppKinds, ", "))
		}
		if slices.Contains(m.Kinds[:i], k) {
			return d.Errf("%s: kind '%s' is listed twice", wrapper, k)
		}
	}
	return nil
}

// Interface guards
var (
	_ layer4.ConnMatcher    = (*MatchXMPP)(nil)
	_ caddy.Provisioner     = (*MatchXMPP)(nil)
	_ caddy.Validator       = (*MatchXMPP)(nil)
	_ caddyfile.Unmarshaler = (*MatchXMPP)(nil)
)
