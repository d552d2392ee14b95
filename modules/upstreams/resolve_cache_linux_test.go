//go:build linux

package upstreams

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// TestDirectDialHappyEyeballs: of a name's addresses, an IPv6 one whose
// connect hangs and an IPv4 one that answers, DialContext's path for names
// ends up on the IPv4 one (tried alongside after 300 ms) rather than
// waiting out the IPv6 one's share of the time.
func TestDirectDialHappyEyeballs(t *testing.T) {
	echo := testutil.StartEcho(t)
	d := &Direct{}
	addrs := []netip.AddrPort{silentV6(t), netip.MustParseAddrPort(echo.Addr)}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := d.dialAddrs(ctx, "dual.test:1", addrs)
	if err != nil {
		t.Fatalf("dial with a silent IPv6 address first: %v", err)
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != echo.Addr {
		t.Fatalf("connected to %s, want the IPv4 address %s", got, echo.Addr)
	}

	// both families fail: the first family's error is the one reported
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	closed4 := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(testutil.FreePort(t)))
	_, err = d.dialAddrs(ctx, "dual.test:1", []netip.AddrPort{closed4, netip.AddrPortFrom(netip.IPv6Loopback(), closed4.Port())})
	if err == nil || err.Error() != "dial dual.test:1: connect: connection refused" {
		t.Fatalf("both refused: %v", err)
	}
}

// silentV6 is an address on ::1 whose connect hangs (see
// testutil.FullBacklog).
func silentV6(t *testing.T) netip.AddrPort {
	return testutil.FullBacklog(t, netip.IPv6Loopback())
}

// TestDirectDialSerialNotesTimeout: of one family's addresses, a silent
// one is given up after its share of the time, the next one answers, and
// the silent one is noted so the next connections try it last.
func TestDirectDialSerialNotesTimeout(t *testing.T) {
	silent := silentV6(t)
	echo := netip.MustParseAddrPort(testutil.StartEchoOn(t, "[::1]:0").Addr)
	t.Cleanup(func() { NoteConnected(silent) })
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second) // 2 s each
	defer cancel()
	c, err := (&Direct{}).dialAddrs(ctx, "v6.test:1", []netip.AddrPort{silent, echo})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.Close()
	if c.RemoteAddr().String() != echo.String() {
		t.Fatalf("connected to %v, want %v", c.RemoteAddr(), echo)
	}
	if !unreachableListed(silent) || unreachableListed(echo) {
		t.Fatalf("unreachable: silent %v, answering %v; want only the silent one", unreachableListed(silent), unreachableListed(echo))
	}
}
