package integration

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// clientHello returns the first flight of a Go TLS client (its ClientHello
// record), as it would send it, without a server.
func clientHello(t *testing.T) []byte {
	t.Helper()
	rec := &firstWrite{}
	_ = tls.Client(rec, &tls.Config{InsecureSkipVerify: true}).Handshake() // fails once the hello is written
	if len(rec.b) < 5 || rec.b[0] != 0x16 {
		t.Fatalf("captured %x; want a TLS handshake record", rec.b)
	}
	return rec.b
}

// firstWrite keeps the first write and fails everything else.
type firstWrite struct {
	net.Conn
	b []byte
}

func (c *firstWrite) Write(p []byte) (int, error) {
	if c.b != nil {
		return 0, errors.New("firstWrite: one write only")
	}
	c.b = append([]byte(nil), p...)
	return len(p), nil
}

func (*firstWrite) Read([]byte) (int, error)         { return 0, io.EOF }
func (*firstWrite) Close() error                     { return nil }
func (*firstWrite) SetDeadline(time.Time) error      { return nil }
func (*firstWrite) SetReadDeadline(time.Time) error  { return nil }
func (*firstWrite) SetWriteDeadline(time.Time) error { return nil }

// slowSecondFlight delays every write after the first (the ClientHello)
// by delay, once: the client's second flight (its Finished) comes late.
type slowSecondFlight struct {
	net.Conn
	delay  time.Duration
	writes int
}

func (c *slowSecondFlight) Write(p []byte) (int, error) {
	c.writes++
	if c.writes == 2 {
		time.Sleep(c.delay)
	}
	return c.Conn.Write(p)
}

// withMatchingTimeout sets the matching_timeout of the proxy server of a
// config from proxyConfig.
func withMatchingTimeout(t *testing.T, cfg string, d time.Duration) string {
	t.Helper()
	var m obj
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		t.Fatal(err)
	}
	m["apps"].(obj)["layer4"].(obj)["servers"].(obj)["proxy"].(obj)["matching_timeout"] = d.String()
	b, _ := json.Marshal(m)
	return string(b)
}

// TestTLSHandshakeTimeout: wa_tls_terminate ends a handshake that does not
// complete within handshake_timeout, counts it, and otherwise leaves the
// connection as caddy-l4's tls handler would: no deadline after the
// handshake, and the decrypted bytes sorted by a subroute of their own,
// with a matching timeout that starts after the handshake (a slow
// handshake does not use up the decrypted stream's matching time).
func TestTLSHandshakeTimeout(t *testing.T) {
	storage := t.TempDir()
	const name = "proxy.waproxy.test"
	chat := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	local := []string{"127.0.0.1"}
	routes := []obj{
		{"match": []obj{{"wa_tls": obj{}}}, "handle": []obj{
			{"handler": "wa_tls_terminate", "handshake_timeout": "1s",
				"connection_policies": []obj{{"default_sni": name, "fallback_sni": name}}},
			{"handler": "subroute", "routes": []obj{
				chatRoute(obj{"destination": chat.Addr, "allow": local}),
			}},
		}},
	}
	cfg := withMatchingTimeout(t, proxyConfig(listen, routes, "", nil), 2*time.Second)
	c := testutil.StartCaddy(t, withTLSApps(t, cfg, storage, name, obj{}))
	handshakeWhenReady(t, listen, &tls.Config{InsecureSkipVerify: true}).Close()

	t.Run("stalled_after_client_hello", func(t *testing.T) {
		before := metric(t, c, `whatsapp_proxy_errors_total{kind="tls_handshake"}`)
		conn := dial(t, listen)
		if _, err := conn.Write(clientHello(t)); err != nil {
			t.Fatal(err)
		}
		// the server's flight, then the close: well before 8s
		_ = conn.SetReadDeadline(time.Now().Add(8 * time.Second))
		n, err := io.Copy(io.Discard, conn)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("a client silent after its ClientHello still connected after 8s (read %d bytes); want it closed after handshake_timeout (1s)", n)
		}
		if n == 0 {
			t.Errorf("read nothing before the close; want the server's handshake flight first")
		}
		waitMetric(t, c, `whatsapp_proxy_errors_total{kind="tls_handshake"}`, before+1)
	})

	t.Run("no_deadline_after_the_handshake", func(t *testing.T) {
		conn, err := tlsDial(t, listen, &tls.Config{InsecureSkipVerify: true}, false)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond) // past handshake_timeout, within the matching timeout
		exchange(t, conn, waHello())
		time.Sleep(1500 * time.Millisecond) // past it again, now relaying
		exchange(t, conn, frame(randomBytes(1000)))
	})

	t.Run("slow_handshake_keeps_its_matching_time", func(t *testing.T) {
		before := metric(t, c, `whatsapp_proxy_errors_total{kind="tls_handshake"}`)
		raw := dial(t, listen)
		conn := tls.Client(&slowSecondFlight{Conn: raw, delay: 900 * time.Millisecond}, &tls.Config{InsecureSkipVerify: true})
		t.Cleanup(func() { conn.Close() })
		if err := conn.Handshake(); err != nil {
			t.Fatal(err)
		}
		// 0.9s of handshake plus 1.5s: past the 2s matching timeout counted
		// from before the handshake, within one counted after it
		time.Sleep(1500 * time.Millisecond)
		exchange(t, conn, waHello())
		if got := metric(t, c, `whatsapp_proxy_errors_total{kind="tls_handshake"}`); got != before {
			t.Errorf("tls_handshake errors %v → %v for a handshake that completed", before, got)
		}
	})
}
