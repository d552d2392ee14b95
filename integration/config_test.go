package integration

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestConfigRejected: configs that could never work fail at load with a
// clear error, before any connection is accepted.
func TestConfigRejected(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler obj
		want    string
	}{
		{"destination outside the default allowlist", obj{"destination": "example.com:443"},
			"destination example.com:443 is not in the allowlist (whatsapp.net *.whatsapp.net whatsapp.com *.whatsapp.com)"},
		{"IP destination with a name allowlist", obj{"destination": "127.0.0.1:5222", "allow": []string{"localhost"}},
			"destination 127.0.0.1:5222 is not in the allowlist (localhost)"},
		{"destination without port", obj{"destination": "g.whatsapp.net"}, "missing port"},
		{"bad proxy_protocol", obj{"proxy_protocol": "v9"}, `proxy_protocol: unknown version "v9"`},
		{"bad allow pattern", obj{"allow": []string{"10.0.0.0/99"}}, "bad CIDR"},
		{"unknown dialer", obj{"via": obj{"dialer": "pigeon"}}, "wa.dialers.pigeon"},
		{"socks5 without servers", obj{"via": obj{"dialer": "socks5"}}, "socks5"},
		{"socks5 bad server", obj{"via": obj{"dialer": "socks5", "servers": []string{"127.0.0.1"}}}, "127.0.0.1"},
		{"socks5 password without username", obj{"via": obj{"dialer": "socks5", "servers": []string{"127.0.0.1:1080"}, "password": "x"}}, "username"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.handler["handler"] = "wa_proxy"
			raw, _ := json.Marshal(obj{"apps": obj{"layer4": obj{"servers": obj{"s": obj{
				"listen": []string{"127.0.0.1:0"},
				"routes": []obj{{"handle": []obj{tc.handler}}},
			}}}}})
			var cfg caddy.Config
			if err := json.Unmarshal(raw, &cfg); err != nil {
				t.Fatal(err)
			}
			err := caddy.Validate(&cfg)
			if err == nil {
				t.Fatalf("config accepted; want an error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}
