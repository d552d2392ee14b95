package matchers

import (
	"slices"
	"testing"
)

// FuzzMatchXMPP checks the wa_xmpp byte classifier: it never panics, its
// answer does not depend on how the bytes were split (the first prefix on
// which it decides gives the same answer as the whole input, and every
// longer prefix agrees), and it never asks for more bytes past its caps.
func FuzzMatchXMPP(f *testing.F) {
	for _, c := range xmppCases() {
		f.Add(cat(c.in, c.extra))
	}
	f.Add([]byte{})
	f.Add([]byte("\xEF\xBB\xBF <?xml ?> <stream:stream a='b' xmlns:x=\"jabber:server\">"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > xmppMaxBytes+64 {
			data = data[:xmppMaxBytes+64] // every decision is made before this
		}
		kind, decided := classifyXMPP(data)
		if len(data) >= xmppMaxBytes && !decided {
			t.Fatalf("undecided on %d bytes, past the %d-byte cap", len(data), xmppMaxBytes)
		}
		if kind != "" && (!decided || !slices.Contains(xmppKinds, kind)) {
			t.Fatalf("kind %q decided %v", kind, decided)
		}
		if kind != "" && xmppCandidate(data[0]) != kind {
			t.Fatalf("kind %q for a stream starting %q", kind, data[0])
		}
		first := -1
		for i := 0; i <= len(data); i++ {
			k, d := classifyXMPP(data[:i])
			if first < 0 && d {
				first = i
			}
			if first >= 0 && (!d || k != kind || !decided) {
				t.Fatalf("decided on %d bytes, but %d bytes give kind %q decided %v; all %d give kind %q decided %v",
					first, i, k, d, len(data), kind, decided)
			}
		}
	})
}
