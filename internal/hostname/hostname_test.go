package hostname

import (
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"g.whatsapp.net", ""},
		{"_srv._tcp.example.com", ""},
		{"xn--bcher-kva.example", ""},
		{"localhost", ""},
		{strings.Repeat("a", 63) + ".net", ""},
		{strings.Repeat("abcdefgh.", 27) + "abcdefghi", ""}, // 252 bytes
		{"", "is empty or longer than 253 bytes"},
		{strings.Repeat("abcdefgh.", 28) + "ab", "is empty or longer than 253 bytes"},
		{strings.Repeat("a", 64) + ".net", "has a label longer than 63 bytes"},
		{"a..net", "has an empty label"},
		{".net", "has an empty label"},
		{"whatsapp.net.", "has an empty label"},
		{"b\u00fccher.example", "is not an ASCII host name"},
		{"\uff11\uff12\uff17.0.0.1", "is not an ASCII host name"},
		{"a b.net", "is not an ASCII host name"},
		{"[::1]", "is not an ASCII host name"},
	} {
		if got := Check(tc.name); got != tc.want {
			t.Errorf("Check(%q) = %q, want %q", tc.name, got, tc.want)
		}
		if got := Check([]byte(tc.name)); got != tc.want {
			t.Errorf("Check([]byte(%q)) = %q, want %q", tc.name, got, tc.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = Check([]byte("media-ams4-1.cdn.whatsapp.net")) }); n != 0 {
		t.Errorf("Check allocates %v times per call, want 0", n)
	}
}
