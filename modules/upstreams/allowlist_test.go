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
	if !star.Any() || !star.AllowsHost("anything.example") || !star.AllowsIP(netip.MustParseAddr("192.0.2.1")) {
		t.Error("* must allow every name and every public IP")
	}
	for _, internal := range []string{"10.0.0.1", "127.0.0.1", "169.254.169.254", "::1", "0.0.0.0", "[::ffff:127.0.0.1]"} {
		if star.AllowsHost(internal) {
			t.Errorf("* allows the internal address %s; only an IP or CIDR pattern may", internal)
		}
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

func TestInternalRange(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"127.0.0.1", "loopback"},
		{"127.255.0.9", "loopback"},
		{"::1", "loopback"},
		{"::ffff:127.0.0.1", "loopback"},
		{"169.254.169.254", "link-local"}, // cloud metadata
		{"fe80::1", "link-local"},
		{"fe80::1%eth0", "link-local"},
		{"10.1.2.3", "private"},
		{"172.16.0.1", "private"},
		{"172.31.255.255", "private"},
		{"192.168.1.1", "private"},
		{"fd00::1", "private"},
		{"fec0::1", "private"},
		{"100.100.100.200", "shared"}, // Alibaba Cloud metadata
		{"0.0.0.0", "unspecified"},
		{"0.1.2.3", "unspecified"},
		{"::", "unspecified"},
		{"172.32.0.1", ""},
		{"192.0.2.1", ""},
		{"8.8.8.8", ""},
		{"2001:db8::1", ""},
		{"157.240.0.53", ""},
		// NAT64 (RFC 6052, RFC 8215): judged by the IPv4 address embedded
		{"64:ff9b::a9fe:a9fe", "link-local (NAT64)"}, // 169.254.169.254
		{"64:ff9b::a00:1", "private (NAT64)"},        // 10.0.0.1
		{"64:ff9b::7f00:1", "loopback (NAT64)"},      // 127.0.0.1
		{"64:ff9b:1::a00:1", "private (NAT64)"},      // local-use prefix
		{"64:ff9b::9df0:35", ""},                     // 157.240.0.53
		{"64:ff9b:1::9df0:35", ""},
	} {
		name, internal := InternalRange(netip.MustParseAddr(tc.addr))
		if name != tc.want || internal != (tc.want != "") {
			t.Errorf("InternalRange(%s) = %q, %v; want %q", tc.addr, name, internal, tc.want)
		}
	}
}

// TestAllowsInternal pins the rule for internal addresses: an IP literal or
// a resolved address in an internal range is allowed only by an IP or CIDR
// pattern that contains it.
func TestAllowsInternal(t *testing.T) {
	list := func(p ...string) *Allowlist {
		a, err := NewAllowlist(p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	ip := netip.MustParseAddr
	for _, tc := range []struct {
		name           string
		list           *Allowlist
		addr           string
		literal, named bool // AllowsIP (an IP literal destination), AllowsResolved (what an allowed name resolved to)
	}{
		{"name only, loopback", list("localhost"), "127.0.0.1", false, false},
		{"name only, public", list("example.com"), "192.0.2.7", false, true},
		{"name and its IP", list("localhost", "127.0.0.1"), "127.0.0.1", true, true},
		{"CIDR", list("example.com", "10.0.0.0/8"), "10.9.8.7", true, true},
		{"CIDR elsewhere", list("example.com", "10.0.0.0/8"), "192.168.0.1", false, false},
		{"star, metadata", list("*"), "169.254.169.254", false, false},
		{"star, loopback v6", list("*"), "::1", false, false},
		{"star, public", list("*"), "192.0.2.7", true, true},
		{"star and loopback", list("*", "127.0.0.0/8"), "127.0.0.2", true, true},
		{"mapped", list("127.0.0.1"), "::ffff:127.0.0.1", true, true},
		{"default, metadata", list(DefaultAllow...), "169.254.169.254", false, false},
		{"default, public", list(DefaultAllow...), "157.240.0.53", false, true},
		{"star, NAT64 metadata", list("*"), "64:ff9b::a9fe:a9fe", false, false},
		{"star, NAT64 public", list("*"), "64:ff9b::9df0:35", true, true},
		{"default, NAT64 private", list(DefaultAllow...), "64:ff9b::a00:5", false, false},
		{"NAT64 prefix allowed", list("64:ff9b::/96"), "64:ff9b::a00:5", true, true},
		{"mapped CIDR", list("::ffff:10.0.0.0/104"), "10.1.2.3", true, true},
		{"mapped CIDR, mapped address", list("::ffff:10.0.0.0/104"), "::ffff:10.1.2.3", true, true},
		{"mapped CIDR elsewhere", list("::ffff:10.0.0.0/104"), "11.0.0.1", false, true},
	} {
		if got := tc.list.AllowsIP(ip(tc.addr)); got != tc.literal {
			t.Errorf("%s: AllowsIP(%s) = %v, want %v", tc.name, tc.addr, got, tc.literal)
		}
		if got := tc.list.AllowsResolved(ip(tc.addr)); got != tc.named {
			t.Errorf("%s: AllowsResolved(%s) = %v, want %v", tc.name, tc.addr, got, tc.named)
		}
	}
	var nilList *Allowlist
	if nilList.AllowsResolved(ip("192.0.2.1")) {
		t.Error("a nil allowlist must allow nothing")
	}
}
