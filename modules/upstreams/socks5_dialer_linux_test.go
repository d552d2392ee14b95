package upstreams

import (
	"net"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// TestSOCKS5NoKeepAlive: the connection to the SOCKS5 server has no TCP
// keep-alive (see serverDialer), and still relays.
func TestSOCKS5NoKeepAlive(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, _ := startCaddySOCKS5(t)
	conn := mustDial(t, newSOCKS5Dialer(t, "", "", open), echo.Addr)
	rc, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	on, serr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { on, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	if on != 0 {
		t.Errorf("SO_KEEPALIVE %d on the connection to the SOCKS5 server, want 0 (the relay's idle timeout ends dead ones)", on)
	}
	assertEchoes(t, conn, "no keep-alive")
}
