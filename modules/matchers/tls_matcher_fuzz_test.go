package matchers

import (
	"bytes"
	"crypto/tls"
	"strings"
	"testing"

	"github.com/waproxy/caddy-waproxy/internal/hostname"
)

// FuzzMatchTLS checks the wa_tls classifier: it never panics; its answer
// does not depend on how the bytes were split into reads (the first prefix
// on which it decides gives the same answer, server name and protocols as
// the whole input, and every longer prefix agrees); what it extracts is
// well-formed; it reassembles a hello the same whatever its record
// boundaries; and whenever Go's crypto/tls server also accepts the hello,
// both read the same server name and protocols.
func FuzzMatchTLS(f *testing.F) {
	for _, c := range tlsCases(f) {
		f.Add(cat(c.in, c.extra), uint16(0))
	}
	f.Add([]byte{}, uint16(0))
	f.Add(goHello(f, &tls.Config{ServerName: "a.example", NextProtos: []string{"h2"}}), uint16(3))
	f.Fuzz(func(t *testing.T, data []byte, split uint16) {
		if len(data) > 2200 {
			data = data[:2200] // past the 2 KiB prefetch chunk; the cap is tested in TestClassifyTLSCap
		}
		h, st := classify(data)
		if st == scanYes {
			checkExtracted(t, h)
		}
		// Every prefix up to 512 bytes, then every 7th and the last 16 (this
		// check is quadratic; TestClassifyTLS checks every prefix of its vectors).
		first := -1
		for i := 0; i <= len(data); i = nextPrefix(i, len(data)) {
			hi, sti := classify(data[:i])
			if first < 0 && sti != scanMore {
				first = i
			}
			if first >= 0 && (sti != st || string(hi.serverName) != string(h.serverName) || !bytes.Equal(hi.alpn, h.alpn)) {
				t.Fatalf("decided on %d bytes, but %d bytes give state %d (%q %q); all %d give %d (%q %q)",
					first, i, sti, hi.serverName, hi.alpn, len(data), st, h.serverName, h.alpn)
			}
		}
		if st != scanYes {
			return
		}
		// The same hello in records of another size reads the same.
		msgLen, start, _, _ := scanTLSRecords(data, nil)
		msg := make([]byte, msgLen)
		scanTLSRecords(data, msg)
		size := int(split)%len(msg) + 1
		var recs []byte
		for m := msg; len(m) > 0; {
			n := min(size, len(m))
			recs = append(recs, 0x16, 0x03, 0x03, byte(n>>8), byte(n))
			recs = append(recs, m[:n]...)
			m = m[n:]
		}
		if len(recs) <= tlsMaxHelloBytes {
			h2, st2 := classify(recs)
			if st2 != scanYes || string(h2.serverName) != string(h.serverName) || !bytes.Equal(h2.alpn, h.alpn) {
				t.Fatalf("the hello at %d in records of %d bytes: state %d (%q %q); want %q %q",
					start, size, st2, h2.serverName, h2.alpn, h.serverName, h.alpn)
			}
		}
		if name, protos, ok := goServerHello(data); ok {
			if !strings.EqualFold(name, string(h.serverName)) || strings.Join(protos, ",") != joinALPN(h.alpn) {
				t.Fatalf("Go's server read %q %q; wa_tls read %q %q", name, protos, h.serverName, joinALPN(h.alpn))
			}
		}
	})
}

// nextPrefix returns the prefix length the fuzz target checks after i.
func nextPrefix(i, n int) int {
	if i < 512 || i >= n-16 {
		return i + 1
	}
	return min(i+7, n-16)
}

// checkExtracted checks what a match extracted: a host name, and a
// well-formed protocol list.
func checkExtracted(t *testing.T, h clientHelloInfo) {
	t.Helper()
	if h.serverName != nil && hostname.Check(h.serverName) != "" {
		t.Fatalf("server name %q is not a host name", h.serverName)
	}
	if h.hasALPN == (h.alpn == nil) {
		t.Fatalf("hasALPN %v with list %q", h.hasALPN, h.alpn)
	}
	for l := h.alpn; len(l) > 0; {
		if l[0] == 0 || int(l[0]) > len(l)-1 {
			t.Fatalf("bad protocol list %q", h.alpn)
		}
		l = l[1+int(l[0]):]
	}
}
