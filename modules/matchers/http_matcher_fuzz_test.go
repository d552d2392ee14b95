package matchers

import (
	"bytes"
	"testing"
)

// FuzzMatchHTTP checks the wa_http byte classifier with the default methods
// and with a custom list: it never panics, its answer does not depend on
// how the bytes were split (the first prefix on which it decides gives the
// same answer as the whole input, and every longer prefix agrees), it
// decides by httpMaxBytes, and a match starts with a listed method and a
// space, with the host inside the bytes looked at and free of line breaks.
func FuzzMatchHTTP(f *testing.F) {
	for _, c := range httpCases() {
		f.Add([]byte(c.in))
	}
	f.Add([]byte{})
	f.Add([]byte("CONNECT [::1]:443 HTTP/1.1\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nX: y\r\nHOST:\t[fe80::1%25eth0]:80\t\r\n\r\n"))
	f.Add([]byte("M-SEARCH * HTTP/1.1\nhost:239.255.255.250:1900\n\n"))
	lists := [][]string{DefaultHTTPMethods, {"M-SEARCH", "CONNECT", "CON"}}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > httpMaxBytes+64 {
			data = data[:httpMaxBytes+64] // every decision is made before this
		}
		for _, methods := range lists {
			req, decided := classifyHTTP(data, methods)
			if len(data) >= httpMaxBytes && !decided {
				t.Fatalf("undecided on %d bytes, past the %d-byte cap", len(data), httpMaxBytes)
			}
			if decided && req.method >= 0 {
				m := methods[req.method]
				if !bytes.HasPrefix(data, []byte(m+" ")) {
					t.Fatalf("matched method %q on %q", m, data[:min(len(data), 40)])
				}
				if req.hostStart > req.hostEnd || req.hostEnd > min(len(data), httpMaxBytes) {
					t.Fatalf("host bounds [%d:%d] outside the %d bytes looked at", req.hostStart, req.hostEnd, min(len(data), httpMaxBytes))
				}
				if bytes.ContainsAny(data[req.hostStart:req.hostEnd], "\r\n") {
					t.Fatalf("host %q holds a line break", data[req.hostStart:req.hostEnd])
				}
			}
			first := -1
			for i := 0; i <= len(data); i++ {
				r, d := classifyHTTP(data[:i], methods)
				if first < 0 && d {
					first = i
				}
				if first >= 0 && (!d || !decided || (d && r != req)) {
					t.Fatalf("methods %v: decided on %d bytes, but %d bytes give %+v decided %v; all %d give %+v decided %v",
						methods, first, i, r, d, len(data), req, decided)
				}
			}
		}
	})
}
