package upstreams

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// The SOCKS5 dialer against third-party servers run as subprocesses:
// microsocks and dante (Debian packages microsocks and dante-server). When a
// binary is missing the test is skipped, unless WAPROXY_INTEROP=1 (as in CI),
// where it fails.

func TestInteropMicrosocks(t *testing.T) {
	testutil.RequireBinary(t, "microsocks", "microsocks") // skip (or fail) as a whole
	echo := testutil.StartEcho(t)
	_, echoPort := splitPort(t, echo.Addr)

	t.Run("no authentication", func(t *testing.T) {
		server := testutil.StartMicrosocks(t, "", "")
		d := newSOCKS5Dialer(t, "", "", server)

		conn := mustDial(t, d, echo.Addr)
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "hello microsocks")

		conn = mustDial(t, d, net.JoinHostPort("localhost", echoPort))
		assertEchoes(t, conn, "by name through microsocks")

		_, err := dialTimeout(d, 5*time.Second, closedAddr(t))
		assertDialError(t, err, metrics.KindSOCKS5Refused, "socks5 "+server+": destination refused the connection (reply 5)")
	})

	t.Run("username/password", func(t *testing.T) {
		server := testutil.StartMicrosocks(t, "user", "pass")

		conn := mustDial(t, newSOCKS5Dialer(t, "user", "pass", server), echo.Addr)
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "authenticated to microsocks")

		_, err := dialTimeout(newSOCKS5Dialer(t, "user", "wrong-pass", server), 5*time.Second, echo.Addr)
		de := assertDialErrorKind(t, err, metrics.KindSOCKS5Auth)
		if want := "socks5 " + server + ": username/password rejected"; !strings.HasPrefix(de.Error(), want) {
			t.Fatalf("error %q does not start with %q", de.Error(), want)
		}
		if strings.Contains(de.Error(), "wrong-pass") {
			t.Fatalf("error reveals the password: %v", de)
		}

		_, err = dialTimeout(newSOCKS5Dialer(t, "", "", server), 5*time.Second, echo.Addr)
		assertDialErrorKind(t, err, metrics.KindSOCKS5Auth)
	})
}

func TestInteropDante(t *testing.T) {
	echo := testutil.StartEcho(t)
	_, echoPort := splitPort(t, echo.Addr)
	server := testutil.StartDante(t)
	d := newSOCKS5Dialer(t, "", "", server)

	conn := mustDial(t, d, echo.Addr)
	assertTCPConn(t, conn)
	assertEchoes(t, conn, "hello dante")
	assertEchoes(t, conn, strings.Repeat("d", 100_000))

	conn = mustDial(t, d, net.JoinHostPort("localhost", echoPort))
	assertEchoes(t, conn, "by name through dante")

	_, err := dialTimeout(d, 5*time.Second, closedAddr(t))
	assertDialError(t, err, metrics.KindSOCKS5Refused, "socks5 "+server+": destination refused the connection (reply 5)")

	// Failover: the first server is down.
	conn = mustDial(t, newSOCKS5Dialer(t, "", "", closedAddr(t), server), echo.Addr)
	assertEchoes(t, conn, "dante after a dead server")

	// Dante offers no username/password here; credentials are offered
	// alongside "no authentication", which it picks.
	conn = mustDial(t, newSOCKS5Dialer(t, "user", "pass", server), echo.Addr)
	assertEchoes(t, conn, "credentials not needed")
}

// splitPort splits a host:port.
func splitPort(t *testing.T, addr string) (host, port string) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return host, port
}
