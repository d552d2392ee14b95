package integration

import (
	"net"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// TestInteropSOCKS5Servers: the whole path — a WhatsApp-shaped client → our
// listener → wa_xmpp → wa_proxy via socks5 → a SOCKS5 server that is not ours
// (Debian's microsocks, with and without credentials, and dante-server) → a
// local echo edge named `localhost`, resolved at the exit.
func TestInteropSOCKS5Servers(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start func(t *testing.T) (addr string, userPass []string)
	}{
		{"microsocks", func(t *testing.T) (string, []string) { return testutil.StartMicrosocks(t, "", ""), nil }},
		{"microsocks with credentials", func(t *testing.T) (string, []string) {
			return testutil.StartMicrosocks(t, "wa", "s3cret"), []string{"wa", "s3cret"}
		}},
		{"dante", func(t *testing.T) (string, []string) { return testutil.StartDante(t), nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			socks, creds := tc.start(t)
			edge := testutil.StartEcho(t)
			_, edgePort, _ := net.SplitHostPort(edge.Addr)
			listen := testutil.FreeAddr(t)
			c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
				chatRoute(obj{"destination": "localhost:" + edgePort, "via": socksVia(socks, creds...), "allow": []string{"localhost"}}),
			}, "", nil))
			conn := dial(t, listen)
			exchange(t, conn, waHello())
			for i := range 10 {
				exchange(t, conn, frame(randomBytes(1+i*1000)))
			}
			waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 1)
		})
	}
}

// TestInteropWrongPassword: microsocks rejects bad credentials; the client is
// closed and the failure is counted as socks5_auth.
func TestInteropWrongPassword(t *testing.T) {
	socks := testutil.StartMicrosocks(t, "wa", "s3cret")
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "via": socksVia(socks, "wa", "wrong"), "allow": []string{"127.0.0.1"}}),
	}, "", nil))
	before := metric(t, c, `whatsapp_proxy_errors_total{kind="socks5_auth"}`)
	conn := dial(t, listen)
	if _, err := conn.Write(waHello()); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, conn, 8*time.Second)
	waitMetric(t, c, `whatsapp_proxy_errors_total{kind="socks5_auth"}`, before+1)
}
