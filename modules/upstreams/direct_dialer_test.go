package upstreams

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func TestDirectDial(t *testing.T) {
	echo := testutil.StartEcho(t)
	d := provisionDialer(t, new(Direct))

	t.Run("by IP", func(t *testing.T) {
		conn := mustDial(t, d, echo.Addr)
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "hello direct")
	})

	t.Run("by name", func(t *testing.T) {
		_, port, _ := net.SplitHostPort(echo.Addr)
		conn := mustDial(t, d, net.JoinHostPort("localhost", port))
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "hello by name")
	})

	t.Run("refused", func(t *testing.T) {
		addr := closedAddr(t)
		_, err := dialTimeout(d, 5*time.Second, addr)
		assertDialError(t, err, metrics.KindDial, "dial "+addr+": connect: connection refused")
	})

	t.Run("bad address", func(t *testing.T) {
		_, err := dialTimeout(d, 5*time.Second, "127.0.0.1")
		assertDialError(t, err, metrics.KindDial, "dial 127.0.0.1: address 127.0.0.1: missing port in address")
	})

	t.Run("deadline passed", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), -time.Second)
		defer cancel()
		_, err := d.DialContext(ctx, "tcp", echo.Addr)
		de := assertDialErrorKind(t, err, metrics.KindTimeout)
		if !strings.HasPrefix(de.Error(), "dial "+echo.Addr+": ") {
			t.Fatalf("error %q does not name the address", de.Error())
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := d.DialContext(ctx, "tcp", echo.Addr)
		assertDialError(t, err, metrics.KindDial, "dial "+echo.Addr+": operation was canceled")
	})

	t.Run("not tcp", func(t *testing.T) {
		_, err := d.DialContext(context.Background(), "udp", echo.Addr)
		assertDialError(t, err, metrics.KindDestination, `unsupported network "udp": only tcp can be dialled`)
	})

	t.Run("zero value", func(t *testing.T) {
		conn := mustDial(t, new(Direct), echo.Addr)
		assertEchoes(t, conn, "unprovisioned")
	})
}

// TestDirectAllowlist: with the handler's allowlist in the context, an
// allowed name that resolves to an internal address is refused before any
// connection is attempted, unless an IP pattern allows that address.
func TestDirectAllowlist(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{}, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	d := provisionDialer(t, new(Direct))
	dial := func(address string, patterns ...string) (net.Conn, error) {
		allow, err := NewAllowlist(patterns)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(WithAllowlist(context.Background(), allow), 5*time.Second)
		defer cancel()
		return d.DialContext(ctx, "tcp", address)
	}

	for _, tc := range []struct {
		name, address string
		allow         []string
	}{
		{"a name resolving to loopback", "localhost:" + port, []string{"localhost"}},
		{"a loopback literal under *", "127.0.0.1:" + port, []string{"*"}},
		{"a loopback literal under another range", "127.0.0.1:" + port, []string{"localhost", "10.0.0.0/8"}},
	} {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			_, err := dial(tc.address, tc.allow...)
			de := assertDialErrorKind(t, err, metrics.KindNotAllowed)
			if !strings.Contains(de.Error(), "(loopback), an internal address the allowlist does not include") {
				t.Errorf("error %q does not explain the refusal", de)
			}
		})
	}
	select {
	case <-accepted:
		t.Fatal("a refused dial reached the listener")
	default:
	}

	for _, tc := range []struct {
		name, address string
		allow         []string
	}{
		{"the name and its address", "localhost:" + port, []string{"localhost", "127.0.0.1", "::1"}},
		{"the name and a range", "localhost:" + port, []string{"localhost", "127.0.0.0/8", "::1/128"}},
		{"the literal", "127.0.0.1:" + port, []string{"127.0.0.1"}},
	} {
		t.Run("allowed/"+tc.name, func(t *testing.T) {
			conn, err := dial(tc.address, tc.allow...)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			conn.Close()
			select {
			case <-accepted:
			case <-time.After(5 * time.Second):
				t.Fatal("the listener saw no connection")
			}
		})
	}
}

func TestDirectUnmarshalCaddyfile(t *testing.T) {
	unm, err := unmarshalVia(t, "via direct")
	if err != nil {
		t.Fatal(err)
	}
	d, ok := unm.(*Direct)
	if !ok {
		t.Fatalf("got %T", unm)
	}
	if d.String() != "direct" {
		t.Fatalf("String() = %q", d.String())
	}

	for _, tc := range []struct {
		input string
		want  caddy.Duration
	}{
		{"via direct {\n\tresolve_cache 1m\n}", caddy.Duration(time.Minute)},
		{"via direct {\n\tresolve_cache off\n}", -1},
		{"via direct", 0},
	} {
		unm, err := unmarshalVia(t, tc.input)
		if err != nil {
			t.Fatalf("%q: %v", tc.input, err)
		}
		if got := unm.(*Direct).ResolveCache; got != tc.want {
			t.Errorf("%q: resolve_cache %v, want %v", tc.input, got, tc.want)
		}
	}

	for _, tc := range []struct{ input, want string }{
		{"via direct 127.0.0.1:1080", "direct: unexpected argument '127.0.0.1:1080': the direct dialer takes no arguments"},
		{"via direct {\n\ttimeout 5s\n}", "direct: unrecognized subdirective 'timeout'"},
		{"via direct {\n\tresolve_cache\n}", "direct: resolve_cache needs a duration, or off"},
		{"via direct {\n\tresolve_cache soon\n}", "direct: resolve_cache: 'soon' is not a positive duration or off"},
		{"via direct {\n\tresolve_cache 0s\n}", "direct: resolve_cache: '0s' is not a positive duration or off"},
		{"via direct {\n\tresolve_cache 1m 2m\n}", "direct: resolve_cache takes one argument, got '2m' too"},
		{"via direct {\n\tresolve_cache 1m\n\tresolve_cache off\n}", "direct: duplicate subdirective 'resolve_cache'"},
	} {
		_, err := unmarshalVia(t, tc.input)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.input, err, tc.want)
		}
	}
}

func BenchmarkDirectDial(b *testing.B) {
	echo := testutil.StartEcho(b)
	d := provisionDialer(b, new(Direct))
	benchmarkDialEcho(b, d, echo.Addr)
}

// TestDirectResolve: the addresses wa_proxy's event loop connects to, under
// the same checks as DialContext.
func TestDirectResolve(t *testing.T) {
	d := new(Direct)
	ctx := context.Background()
	resolve := func(t *testing.T, ctx context.Context, network, address string) []netip.AddrPort {
		t.Helper()
		addrs, err := d.Resolve(ctx, network, address)
		if err != nil {
			t.Fatal(err)
		}
		return addrs
	}
	t.Run("address", func(t *testing.T) {
		if got := resolve(t, ctx, "tcp", "127.0.0.1:5222"); len(got) != 1 || got[0] != netip.MustParseAddrPort("127.0.0.1:5222") {
			t.Fatalf("got %v", got)
		}
		if got := resolve(t, ctx, "tcp", "[::ffff:127.0.0.1]:443"); len(got) != 1 || got[0] != netip.MustParseAddrPort("127.0.0.1:443") {
			t.Fatalf("got %v, want the IPv4-mapped address unmapped", got)
		}
	})
	t.Run("name", func(t *testing.T) {
		got := resolve(t, ctx, "tcp4", "localhost:5222")
		if !slices.Contains(got, netip.MustParseAddrPort("127.0.0.1:5222")) {
			t.Fatalf("localhost resolved to %v", got)
		}
		for _, ap := range got {
			if !ap.Addr().Is4() {
				t.Fatalf("tcp4 gave %v", ap)
			}
		}
	})
	allow, err := NewAllowlist([]string{"localhost"})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, network, address, kind, msg string
		ctx                               context.Context
	}{
		{"no port", "tcp", "127.0.0.1", metrics.KindDestination, "dial 127.0.0.1: address 127.0.0.1: missing port in address", ctx},
		{"bad port", "tcp", "127.0.0.1:99999", metrics.KindDestination, `dial 127.0.0.1:99999: invalid port "99999"`, ctx},
		{"not tcp", "udp", "127.0.0.1:53", metrics.KindDestination, `unsupported network "udp": only tcp can be dialled`, ctx},
		{"no such family", "tcp6", "127.0.0.1:5222", metrics.KindDial, "dial 127.0.0.1:5222: no tcp6 address", ctx},
		{"internal address not allowed", "tcp4", "localhost:5222", metrics.KindNotAllowed,
			"dial localhost:5222: resolved to 127.0.0.1 (loopback), an internal address the allowlist does not include; allow it, or a range containing it, to reach it",
			WithAllowlist(ctx, allow)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.Resolve(tc.ctx, tc.network, tc.address)
			assertDialError(t, err, tc.kind, tc.msg)
		})
	}
}

// TestAttemptShare pins net.Dialer's rule for a name's addresses, which the
// direct dialer and wa_proxy's event loop follow: an equal share of the time
// left, at least 2 s while there is that much.
func TestAttemptShare(t *testing.T) {
	for _, tc := range []struct {
		left      time.Duration
		addrsLeft int
		want      time.Duration
	}{
		{5 * time.Second, 1, 5 * time.Second},
		{10 * time.Second, 2, 5 * time.Second},
		{10 * time.Second, 10, 2 * time.Second}, // at least 2 s
		{3 * time.Second, 4, 2 * time.Second},
		{time.Second, 3, time.Second}, // but no more than is left
		{0, 1, 0},
		{time.Second, 0, time.Second}, // no address count: the whole time
	} {
		if got := AttemptShare(tc.left, tc.addrsLeft); got != tc.want {
			t.Errorf("AttemptShare(%v, %d) = %v, want %v", tc.left, tc.addrsLeft, got, tc.want)
		}
	}
}
