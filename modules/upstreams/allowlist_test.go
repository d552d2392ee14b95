package upstreams

import (
	"net/netip"
	"testing"
)

func TestAllowlist(t *testing.T) {
	def, err := NewAllowlist(DefaultAllow)
	if err != nil {
		t.Fatal(err)
	}
	custom, err := NewAllowlist([]string{"localhost", "*.example.org", "127.0.0.1", "10.1.0.0/16", "2001:db8::/32", "[::1]"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		list *Allowlist
		host string
		want bool
	}{
		{def, "g.whatsapp.net", true},
		{def, "G.WhatsApp.NET.", true},
		{def, "whatsapp.net", true},
		{def, "media-ams4-1.cdn.whatsapp.net", true},
		{def, "web.whatsapp.com", true},
		{def, "whatsapp.net.evil.com", false},
		{def, "evilwhatsapp.net", false},
		{def, "example.com", false},
		{def, "127.0.0.1", false},
		{def, "169.254.169.254", false},
		{def, "::1", false},
		{def, "", false},
		{custom, "localhost", true},
		{custom, "a.b.example.org", true},
		{custom, "example.org", false},
		{custom, "127.0.0.1", true},
		{custom, "127.0.0.2", false},
		{custom, "10.1.200.3", true},
		{custom, "10.2.0.1", false},
		{custom, "2001:db8::5", true},
		{custom, "[::1]", true},
		{custom, "::ffff:127.0.0.1", true},
	} {
		if got := tc.list.AllowsHost(tc.host); got != tc.want {
			t.Errorf("AllowsHost(%q) = %v, want %v", tc.host, got, tc.want)
		}
	}
	star, _ := NewAllowlist([]string{"*"})
	if !star.Any() || !star.AllowsHost("anything.example") || !star.AllowsIP(netip.MustParseAddr("10.0.0.1")) {
		t.Error("* must allow everything")
	}
	var nilList *Allowlist
	if nilList.AllowsHost("g.whatsapp.net") {
		t.Error("a nil allowlist must allow nothing")
	}
}

func TestAllowlistErrors(t *testing.T) {
	for _, bad := range []string{"", "10.0.0.0/33", "*.", "a b", "exa*mple.com", "host:80"} {
		if _, err := NewAllowlist([]string{bad}); err == nil {
			t.Errorf("NewAllowlist(%q) succeeded, want an error", bad)
		}
	}
}
