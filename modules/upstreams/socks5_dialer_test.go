package upstreams

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/mholt/caddy-l4/modules/l4socks"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// provisionDialer provisions and validates m the way Caddy does, failing the
// test on error.
func provisionDialer[M interface {
	caddy.Provisioner
	Dialer
}](t testing.TB, m M) M {
	t.Helper()
	if err := provisionErr(t, m); err != nil {
		t.Fatalf("provision/validate: %v", err)
	}
	return m
}

// provisionErr provisions m and, if it is a caddy.Validator, validates it.
func provisionErr(t testing.TB, m caddy.Provisioner) error {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := m.Provision(ctx); err != nil {
		return err
	}
	if v, ok := m.(caddy.Validator); ok {
		return v.Validate()
	}
	return nil
}

// newSOCKS5Dialer returns a provisioned SOCKS5 dialer.
func newSOCKS5Dialer(t testing.TB, user, pass string, servers ...string) *SOCKS5 {
	t.Helper()
	return provisionDialer(t, &SOCKS5{Servers: servers, Username: user, Password: pass})
}

// dialTimeout dials address with d under a context with timeout.
func dialTimeout(d Dialer, timeout time.Duration, address string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return d.DialContext(ctx, "tcp", address)
}

// mustDial dials address with d and closes the connection when the test ends.
func mustDial(t testing.TB, d Dialer, address string) net.Conn {
	t.Helper()
	conn, err := dialTimeout(d, 5*time.Second, address)
	if err != nil {
		t.Fatalf("dial %s via %v: %v", address, d, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// assertEchoes writes msg to conn and expects exactly msg back.
func assertEchoes(t testing.TB, conn net.Conn, msg string) {
	t.Helper()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	defer conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(conn, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("read echo: %v (got %q)", err, got)
	}
	if string(got) != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// assertTCPConn fails unless conn is the raw *net.TCPConn.
func assertTCPConn(t testing.TB, conn net.Conn) {
	t.Helper()
	if _, ok := conn.(*net.TCPConn); !ok {
		t.Fatalf("conn is %T, want *net.TCPConn", conn)
	}
}

// assertDialError fails unless err is a *DialError of kind whose message is
// exactly msg.
func assertDialError(t testing.TB, err error, kind, msg string) {
	t.Helper()
	de := assertDialErrorKind(t, err, kind)
	if de.Error() != msg {
		t.Fatalf("error message:\n got %q\nwant %q", de.Error(), msg)
	}
}

// assertDialErrorKind fails unless err is a *DialError of kind, and returns it.
func assertDialErrorKind(t testing.TB, err error, kind string) *DialError {
	t.Helper()
	if err == nil {
		t.Fatalf("dial succeeded, want a %s error", kind)
	}
	var de *DialError
	if !errors.As(err, &de) {
		t.Fatalf("error %v (%T) is not a *DialError", err, err)
	}
	if de.Kind != kind {
		t.Fatalf("error kind %q, want %q (error: %v)", de.Kind, kind, err)
	}
	if got := ErrorKind(err); got != kind {
		t.Fatalf("ErrorKind = %q, want %q", got, kind)
	}
	return de
}

// startCaddySOCKS5 runs caddy-l4's socks5 handler in-process: one server
// without authentication and one that requires user/pass. It returns their
// addresses.
func startCaddySOCKS5(t testing.TB) (open, authed string) {
	t.Helper()
	open, authed = testutil.FreeAddr(t), testutil.FreeAddr(t)
	testutil.StartCaddy(t, fmt.Sprintf(`{"apps":{"layer4":{"servers":{
		"open":{"listen":[%q],"routes":[{"handle":[{"handler":"socks5"}]}]},
		"authed":{"listen":[%q],"routes":[{"handle":[{"handler":"socks5","credentials":{"user":"pass"}}]}]}
	}}}}`, open, authed))
	return open, authed
}

// startSilentServer listens on loopback and accepts connections without ever
// answering. accepted receives each accepted connection.
func startSilentServer(t testing.TB) (addr string, accepted <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan net.Conn, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ch <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(ch)
		for c := range ch {
			c.Close()
		}
	})
	return ln.Addr().String(), ch
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t testing.TB) string { return testutil.FreeAddr(t) }

func TestSOCKS5AgainstCaddyL4(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, authed := startCaddySOCKS5(t)
	_, echoPort, _ := net.SplitHostPort(echo.Addr)

	t.Run("by IP", func(t *testing.T) {
		conn := mustDial(t, newSOCKS5Dialer(t, "", "", open), echo.Addr)
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "hello through socks5")
		assertEchoes(t, conn, strings.Repeat("x", 100_000))
	})

	t.Run("by name resolved at the exit", func(t *testing.T) {
		conn := mustDial(t, newSOCKS5Dialer(t, "", "", open), net.JoinHostPort("localhost", echoPort))
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "hello by name")
	})

	t.Run("credentials", func(t *testing.T) {
		conn := mustDial(t, newSOCKS5Dialer(t, "user", "pass", authed), echo.Addr)
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "authenticated")
	})

	t.Run("credentials offered to a server without authentication", func(t *testing.T) {
		conn := mustDial(t, newSOCKS5Dialer(t, "user", "pass", open), echo.Addr)
		assertEchoes(t, conn, "no auth needed")
	})

	t.Run("wrong password", func(t *testing.T) {
		_, err := dialTimeout(newSOCKS5Dialer(t, "user", "s3cr3t-wrong", authed), 5*time.Second, echo.Addr)
		assertDialError(t, err, metrics.KindSOCKS5Auth, "socks5 "+authed+": username/password rejected (status 1)")
		if strings.Contains(err.Error(), "s3cr3t-wrong") {
			t.Fatalf("error reveals the password: %v", err)
		}
	})

	t.Run("no credentials for a server that requires them", func(t *testing.T) {
		_, err := dialTimeout(newSOCKS5Dialer(t, "", "", authed), 5*time.Second, echo.Addr)
		assertDialError(t, err, metrics.KindSOCKS5Auth,
			"socks5 "+authed+": no acceptable authentication method (server requires authentication; none configured)")
	})

	t.Run("server not listening", func(t *testing.T) {
		down := closedAddr(t)
		_, err := dialTimeout(newSOCKS5Dialer(t, "", "", down), 5*time.Second, echo.Addr)
		assertDialError(t, err, metrics.KindDial, "socks5 "+down+": dial: connect: connection refused")
	})

	t.Run("destination refused", func(t *testing.T) {
		_, err := dialTimeout(newSOCKS5Dialer(t, "", "", open), 5*time.Second, closedAddr(t))
		assertDialError(t, err, metrics.KindSOCKS5Refused, "socks5 "+open+": destination refused the connection (reply 5)")
	})

	t.Run("failover to the second server", func(t *testing.T) {
		conn := mustDial(t, newSOCKS5Dialer(t, "", "", closedAddr(t), open), echo.Addr)
		assertTCPConn(t, conn)
		assertEchoes(t, conn, "second server")
	})

	t.Run("failover past a rejecting server", func(t *testing.T) {
		// authed rejects us (no credentials), open accepts.
		conn := mustDial(t, newSOCKS5Dialer(t, "", "", authed, open), echo.Addr)
		assertEchoes(t, conn, "past the rejecting server")
	})

	t.Run("all servers fail", func(t *testing.T) {
		down := closedAddr(t)
		_, err := dialTimeout(newSOCKS5Dialer(t, "", "", down, authed), 5*time.Second, echo.Addr)
		// The kind is the last attempt's; the message names every attempt.
		assertDialError(t, err, metrics.KindSOCKS5Auth,
			"socks5 "+down+": dial: connect: connection refused; "+
				"socks5 "+authed+": no acceptable authentication method (server requires authentication; none configured)")
		attempts, ok := errors.Unwrap(err).(interface{ Unwrap() []error })
		if !ok {
			t.Fatalf("the per-server errors are not in the chain: %v", err)
		}
		var kinds []string
		for _, e := range attempts.Unwrap() {
			kinds = append(kinds, ErrorKind(e))
		}
		if got := strings.Join(kinds, ","); got != "dial,socks5_auth" {
			t.Fatalf("per-server kinds = %s, want dial,socks5_auth", got)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		silent, _ := startSilentServer(t)
		start := time.Now()
		_, err := dialTimeout(newSOCKS5Dialer(t, "", "", silent), 300*time.Millisecond, echo.Addr)
		if elapsed := time.Since(start); elapsed > 10*time.Second {
			t.Fatalf("dial returned after %v", elapsed)
		}
		de := assertDialErrorKind(t, err, metrics.KindTimeout)
		if want := "socks5 " + silent + ": greeting: "; !strings.HasPrefix(de.Error(), want) {
			t.Fatalf("error %q does not start with %q", de.Error(), want)
		}
	})

	t.Run("failover past a hung server", func(t *testing.T) {
		// The hung server accepts but never answers; it gets half of the
		// deadline, the working one the rest.
		silent, accepted := startSilentServer(t)
		conn, err := dialTimeout(newSOCKS5Dialer(t, "", "", silent, open), 2*time.Second, echo.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		assertEchoes(t, conn, "past the hung server")
		select {
		case <-accepted:
		default:
			t.Fatal("the hung server was never tried")
		}
	})
}

// TestSOCKS5DialCancel: cancelling the context mid-handshake ends the dial
// at once, with the context's error.
func TestSOCKS5DialCancel(t *testing.T) {
	silent, accepted := startSilentServer(t)
	d := newSOCKS5Dialer(t, "", "", silent)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Cancel once the greeting has arrived: the dialer is mid-handshake.
		c := <-accepted
		_, _ = io.ReadFull(c, make([]byte, 3))
		cancel()
	}()
	_, err := d.DialContext(ctx, "tcp", "g.whatsapp.net:443")
	assertDialError(t, err, metrics.KindDial, "socks5 "+silent+": greeting: context canceled")
}

// TestSOCKS5DialDoneContext: a context that is already done tries nothing
// and names the servers it skipped.
func TestSOCKS5DialDoneContext(t *testing.T) {
	silent, accepted := startSilentServer(t)
	d := newSOCKS5Dialer(t, "", "", silent, "127.0.0.1:9")
	ctx, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	_, err := d.DialContext(ctx, "tcp", "g.whatsapp.net:443")
	assertDialError(t, err, metrics.KindTimeout,
		"socks5 "+silent+": not tried: context deadline exceeded; socks5 127.0.0.1:9: not tried: context deadline exceeded")
	_, err = newSOCKS5Dialer(t, "", "", silent).DialContext(ctx, "tcp", "g.whatsapp.net:443")
	assertDialError(t, err, metrics.KindTimeout, "socks5 "+silent+": not tried: context deadline exceeded")
	select {
	case <-accepted:
		t.Fatal("a server was contacted with a done context")
	default:
	}
}

func TestSOCKS5DestinationErrors(t *testing.T) {
	silent, accepted := startSilentServer(t)
	d := newSOCKS5Dialer(t, "", "", silent)
	long := strings.Repeat("a", 256)
	for _, tc := range []struct{ network, address, msg string }{
		{"tcp", long + ":443", "socks5: destination host name is 256 bytes long; SOCKS5 allows at most 255"},
		{"tcp", "g.whatsapp.net", `socks5: destination "g.whatsapp.net": address g.whatsapp.net: missing port in address`},
		{"tcp", "g.whatsapp.net:0", `socks5: destination "g.whatsapp.net:0": invalid port "0"`},
		{"tcp", "g.whatsapp.net:https", `socks5: destination "g.whatsapp.net:https": invalid port "https"`},
		{"tcp", ":443", `socks5: destination ":443": empty host`},
		{"tcp", "[fe80::1%eth0]:443", `socks5: destination "[fe80::1%eth0]:443": an IPv6 zone cannot be sent to a SOCKS5 server`},
		{"udp", "g.whatsapp.net:443", `unsupported network "udp": only tcp can be dialled`},
	} {
		_, err := d.DialContext(context.Background(), tc.network, tc.address)
		assertDialError(t, err, metrics.KindDestination, tc.msg)
	}
	select {
	case <-accepted:
		t.Fatal("the server was contacted for a bad destination")
	default:
	}
}

func TestSOCKS5Provision(t *testing.T) {
	t.Setenv("WAPROXY_TEST_S5_SERVER", "127.0.0.1:9050")
	t.Setenv("WAPROXY_TEST_S5_USER", "alice")
	t.Setenv("WAPROXY_TEST_S5_PASS", "s3cr3t")
	s := newSOCKS5Dialer(t, "{env.WAPROXY_TEST_S5_USER}", "{env.WAPROXY_TEST_S5_PASS}", "{env.WAPROXY_TEST_S5_SERVER}", "[::1]:1080")
	if got, want := fmt.Sprint(s.servers), "[127.0.0.1:9050 [::1]:1080]"; got != want {
		t.Errorf("servers = %s, want %s", got, want)
	}
	if s.username != "alice" || s.password != "s3cr3t" {
		t.Errorf("credentials not expanded: %q", s.username)
	}
	if s.Password != "{env.WAPROXY_TEST_S5_PASS}" {
		t.Errorf("the configured field changed: %q", s.Password)
	}
	if want := []byte("\x01\x05alice\x06s3cr3t"); !bytes.Equal(s.auth, want) {
		t.Errorf("auth request = %q, want %q", s.auth, want)
	}
	str := s.String()
	if str != "socks5 127.0.0.1:9050,[::1]:1080 with username/password" || strings.Contains(str, "s3cr3t") {
		t.Errorf("String() = %q", str)
	}
	// The JSON keeps the placeholders, not the secrets.
	js, _ := json.Marshal(s)
	if string(js) != `{"servers":["{env.WAPROXY_TEST_S5_SERVER}","[::1]:1080"],"username":"{env.WAPROXY_TEST_S5_USER}","password":"{env.WAPROXY_TEST_S5_PASS}"}` {
		t.Errorf("JSON = %s", js)
	}
	// A password that looks like an unknown placeholder is kept as written.
	s = newSOCKS5Dialer(t, "u", "{not-a-placeholder}", "127.0.0.1:1080")
	if s.password != "{not-a-placeholder}" {
		t.Errorf("password = %q", s.password)
	}
}

func TestSOCKS5ProvisionErrors(t *testing.T) {
	long := strings.Repeat("p", 256)
	for _, tc := range []struct {
		name string
		s    SOCKS5
		want string
	}{
		{"no servers", SOCKS5{}, "socks5: at least one server is required"},
		{"missing port", SOCKS5{Servers: []string{"127.0.0.1"}}, `socks5: server "127.0.0.1": address 127.0.0.1: missing port in address`},
		{"port 0", SOCKS5{Servers: []string{"127.0.0.1:0"}}, `socks5: server "127.0.0.1:0": invalid port "0": want a number from 1 to 65535`},
		{"port too big", SOCKS5{Servers: []string{"127.0.0.1:65536"}}, `socks5: server "127.0.0.1:65536": invalid port "65536": want a number from 1 to 65535`},
		{"named port", SOCKS5{Servers: []string{"127.0.0.1:socks"}}, `socks5: server "127.0.0.1:socks": invalid port "socks": want a number from 1 to 65535`},
		{"missing host", SOCKS5{Servers: []string{":1080"}}, `socks5: server ":1080": missing host`},
		{"unset env", SOCKS5{Servers: []string{"{env.WAPROXY_TEST_UNSET_S5}"}}, `socks5: server "{env.WAPROXY_TEST_UNSET_S5}": missing port in address`},
		{"username only", SOCKS5{Servers: []string{"127.0.0.1:1080"}, Username: "u"}, "socks5: a username is set but the password is empty: set both or neither"},
		{"password only", SOCKS5{Servers: []string{"127.0.0.1:1080"}, Password: "hunter2"}, "socks5: a password is set but the username is empty: set both or neither"},
		{"password from unset env", SOCKS5{Servers: []string{"127.0.0.1:1080"}, Username: "u", Password: "{env.WAPROXY_TEST_UNSET_S5}"}, "socks5: a username is set but the password is empty: set both or neither"},
		{"long username", SOCKS5{Servers: []string{"127.0.0.1:1080"}, Username: long, Password: "p"}, "socks5: the username is 256 bytes long; RFC 1929 allows at most 255"},
		{"long password", SOCKS5{Servers: []string{"127.0.0.1:1080"}, Username: "u", Password: long}, "socks5: the password is longer than 255 bytes, the most RFC 1929 allows"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := provisionErr(t, &tc.s)
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want it to contain %q", err, tc.want)
			}
			if tc.s.Password != "" && strings.Contains(err.Error(), tc.s.Password) {
				t.Fatalf("error reveals the password: %v", err)
			}
		})
	}
}

// unmarshalVia parses input the way the wa_proxy handler does: its `via`
// subdirective hands the rest of the line (and block) to
// caddyfile.UnmarshalModule.
func unmarshalVia(t *testing.T, input string) (caddyfile.Unmarshaler, error) {
	t.Helper()
	d := caddyfile.NewTestDispenser(input)
	if !d.Next() || d.Val() != "via" || !d.NextArg() {
		t.Fatalf("bad test input %q", input)
	}
	return caddyfile.UnmarshalModule(d, "wa.dialers."+d.Val())
}

func TestSOCKS5UnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		input string
		want  string // JSON
	}{
		{"via socks5 127.0.0.1:9050", `{"servers":["127.0.0.1:9050"]}`},
		{"via socks5 127.0.0.1:9050 [::1]:9050 tor:9050", `{"servers":["127.0.0.1:9050","[::1]:9050","tor:9050"]}`},
		{"via socks5 127.0.0.1:1080 {\n\tusername alice\n\tpassword \"s3 cr3t\"\n}",
			`{"servers":["127.0.0.1:1080"],"username":"alice","password":"s3 cr3t"}`},
		{"via socks5 {env.S5} {\n\tusername {env.S5_USER}\n\tpassword {env.S5_PASS}\n}",
			`{"servers":["{env.S5}"],"username":"{env.S5_USER}","password":"{env.S5_PASS}"}`},
		{"via socks5 127.0.0.1:1080 {\n}", `{"servers":["127.0.0.1:1080"]}`},
	} {
		t.Run(tc.input, func(t *testing.T) {
			unm, err := unmarshalVia(t, tc.input)
			if err != nil {
				t.Fatal(err)
			}
			s, ok := unm.(*SOCKS5)
			if !ok {
				t.Fatalf("got %T", unm)
			}
			js, _ := json.Marshal(s)
			if string(js) != tc.want {
				t.Fatalf("JSON:\n got %s\nwant %s", js, tc.want)
			}
		})
	}
}

func TestSOCKS5UnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ input, want string }{
		{"via socks5", "socks5: at least one server address (host:port) is required"},
		{"via socks5 {\n\tusername u\n}", "socks5: at least one server address (host:port) is required"},
		{"via socks5 127.0.0.1:1080 {\n\tusername\n}", "socks5: subdirective 'username' takes exactly one argument"},
		{"via socks5 127.0.0.1:1080 {\n\tusername a b\n}", "socks5: subdirective 'username' takes exactly one argument"},
		{"via socks5 127.0.0.1:1080 {\n\tpassword hunter2 extra\n}", "socks5: subdirective 'password' takes exactly one argument"},
		{"via socks5 127.0.0.1:1080 {\n\tusername a\n\tusername b\n}", "socks5: duplicate subdirective 'username'"},
		{"via socks5 127.0.0.1:1080 {\n\tpassword a\n\tpassword hunter2\n}", "socks5: duplicate subdirective 'password'"},
		{"via socks5 127.0.0.1:1080 {\n\ttimeout 5s\n}", "socks5: unrecognized subdirective 'timeout'"},
		{"via socks5 127.0.0.1:1080 {\n\tusername u {\n\t\tx\n\t}\n}", "socks5: malformed subdirective 'username': blocks are not supported"},
	} {
		t.Run(tc.input, func(t *testing.T) {
			_, err := unmarshalVia(t, tc.input)
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want it to contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("error reveals the password: %v", err)
			}
		})
	}
}

func BenchmarkSOCKS5Dial(b *testing.B) {
	echo := testutil.StartEcho(b)
	open, _ := startCaddySOCKS5(b)
	d := newSOCKS5Dialer(b, "", "", open)
	benchmarkDialEcho(b, d, echo.Addr)
}

// TestSOCKS5ServerByName: a server given by host name is resolved through
// the shared resolve cache, once for many connections, as the direct
// dialer's destinations are; a name that does not resolve fails the dial
// with the lookup's error.
func TestSOCKS5ServerByName(t *testing.T) {
	echo := testutil.StartEcho(t)
	open, _ := startCaddySOCKS5(t)
	_, port, _ := net.SplitHostPort(open)
	dns := startDNS(t, map[string][]netip.Addr{"socks-exit.test.": {netip.MustParseAddr("127.0.0.1")}})

	d := newSOCKS5Dialer(t, "", "", net.JoinHostPort("socks-exit.test", port))
	d.toServer.resolver = dns.resolver()
	assertEchoes(t, mustDial(t, d, echo.Addr), "by the server's name")
	first := dns.queries.Load() // A and AAAA
	if first == 0 {
		t.Fatal("the server's name was not looked up with the test's resolver")
	}
	for i := range 10 {
		assertEchoes(t, mustDial(t, d, echo.Addr), fmt.Sprintf("by the server's name, %d", i))
	}
	if n := dns.queries.Load() - first; n != 0 {
		t.Fatalf("%d DNS queries for 10 more connections through a named server, want none", n)
	}
	if !slices.ContainsFunc(Names(), func(n Name) bool { return n.Host == "socks-exit.test" }) {
		t.Fatalf("the server's name is not in the listing of GET /waproxy/names: %+v", Names())
	}

	missing := net.JoinHostPort("no-such-exit.test", port)
	d = newSOCKS5Dialer(t, "", "", missing)
	d.toServer.resolver = dns.resolver()
	_, err := dialTimeout(d, 5*time.Second, echo.Addr)
	de := assertDialErrorKind(t, err, metrics.KindDial)
	if want := "socks5 " + missing + ": dial: lookup no-such-exit.test"; !strings.HasPrefix(de.Error(), want) {
		t.Fatalf("error %q does not start with %q", de.Error(), want)
	}
}
