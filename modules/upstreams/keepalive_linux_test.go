package upstreams

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// keepAliveOf reads SO_KEEPALIVE of conn's socket.
func keepAliveOf(t *testing.T, conn net.Conn) int {
	t.Helper()
	rc, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	on, serr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { on, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	return on
}

// TestSOCKS5NoKeepAlive: the connection to the SOCKS5 server has no TCP
// keep-alive (see tcpDialer), and still relays.
func TestSOCKS5NoKeepAlive(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, _ := startCaddySOCKS5(t)
	conn := mustDial(t, newSOCKS5Dialer(t, "", "", open), echo.Addr)
	if on := keepAliveOf(t, conn); on != 0 {
		t.Errorf("SO_KEEPALIVE %d on the connection to the SOCKS5 server, want 0 (the relay's idle timeout ends dead ones)", on)
	}
	assertEchoes(t, conn, "no keep-alive")
}

// TestDirectNoKeepAlive: a connection the direct dialer's DialContext makes
// (TLS upstream, wa_http's tunnels) has no TCP keep-alive either, by IP and
// by name (through the resolve cache), and relays.
func TestDirectNoKeepAlive(t *testing.T) {
	echo := testutil.StartEcho(t)
	_, port, _ := net.SplitHostPort(echo.Addr)
	d := provisionDialer(t, new(Direct))
	for _, address := range []string{echo.Addr, net.JoinHostPort("localhost", port)} {
		conn := mustDial(t, d, address)
		if on := keepAliveOf(t, conn); on != 0 {
			t.Errorf("%s: SO_KEEPALIVE %d on a direct connection, want 0 (the relay's idle timeout ends dead ones)", address, on)
		}
		assertEchoes(t, conn, "no keep-alive")
	}
}
