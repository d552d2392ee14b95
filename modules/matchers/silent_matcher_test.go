package matchers

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

func skipWithoutPeek(t *testing.T) {
	t.Helper()
	if !silentPeekSupported {
		t.Skip("wa_silent cannot peek at sockets on this platform")
	}
}

// waSilentRoutes is the layout wa_silent is for: the silent route first,
// then the protocol routes, then a raw fallback.
func waSilentRoutes(wait string, read int) []waRoute {
	return []waRoute{
		{match: `{"wa_silent":{"wait":"` + wait + `"}}`, name: "silent", reply: "220 ready\r\n"},
		{match: `{"wa_xmpp":{}}`, name: "chat", read: read},
		{name: "raw", read: read},
	}
}

// TestMatchSilentRoutesSilentClient: a client that sends nothing reaches the
// wa_silent route after the wait, long before the matching timeout, and the
// route can talk to it.
func TestMatchSilentRoutesSilentClient(t *testing.T) {
	skipWithoutPeek(t)
	s := waServe(t, waServeOpts{routes: waSilentRoutes("200ms", 0), matchingTimeout: 10 * time.Second})
	r := s.result(t) // fails if nothing ran within 10s, which the matching timeout would also have ended
	if r.route != "silent" {
		t.Fatalf("route %q ran; want silent", r.route)
	}
	if r.protocol != metrics.ProtocolRaw || r.prefetched != 0 {
		t.Errorf("protocol %q, %d bytes prefetched; want raw and none", r.protocol, r.prefetched)
	}
	_ = s.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, len("220 ready\r\n"))
	if _, err := io.ReadFull(s.client, buf); err != nil || string(buf) != "220 ready\r\n" {
		t.Fatalf("client read %q, %v; want the silent route's greeting", buf, err)
	}
}

// TestSilentClientWithoutMatcher is the problem wa_silent solves: without
// it, a silent client never reaches the fallback route; the router closes
// it at the matching timeout.
func TestSilentClientWithoutMatcher(t *testing.T) {
	s := waServe(t, waServeOpts{
		routes:          []waRoute{{match: `{"wa_xmpp":{}}`, name: "chat"}, {name: "raw"}},
		matchingTimeout: 300 * time.Millisecond,
	})
	select {
	case r := <-s.results:
		t.Fatalf("route %q ran for a silent client", r.route)
	case err := <-s.done:
		s.done <- err
		if len(s.results) > 0 {
			t.Fatalf("route %q ran for a silent client", (<-s.results).route)
		}
		logs := s.logs.FilterMessage("matching connection").All()
		if len(logs) != 1 || !errors.Is(logs[0].Context[1].Interface.(error), layer4.ErrMatchingTimeout) {
			t.Fatalf("logs %v; want the matching timeout", s.logs.All())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the router did not give up at its matching timeout")
	}
	_ = s.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := s.client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("client read %d bytes, %v; want EOF (closed by the router)", n, err)
	}
}

// TestMatchSilentLetsSpeakersThrough: a client that sends anything, even one
// byte, is not matched by wa_silent, and the next routes see every byte.
func TestMatchSilentLetsSpeakersThrough(t *testing.T) {
	skipWithoutPeek(t)
	hello := waHello(6, 3)
	for _, c := range []struct {
		name string
		send []byte
		want string
	}{
		{"wa_hello", hello, "chat"},
		{"xmpp", []byte(xmppClient), "chat"},
		{"one_byte", []byte{0x16}, "raw"},
		{"http", []byte("GET / HTTP/1.1\r\n\r\n"), "raw"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// A wait far beyond the test's own deadline: if wa_silent waited
			// instead of seeing the bytes, no route would run in time.
			s := waServe(t, waServeOpts{routes: waSilentRoutes("1m", len(c.send)), send: c.send})
			r := s.result(t)
			if r.route != c.want {
				t.Fatalf("route %q ran; want %q", r.route, c.want)
			}
			if r.err != nil || !bytes.Equal(r.data, c.send) {
				t.Fatalf("the route read %q, %v; want every byte sent, %q", r.data, r.err, c.send)
			}
		})
	}
}

// TestMatchSilentClientSpeaksDuringWait: a client that speaks while
// wa_silent waits ends the wait at once.
func TestMatchSilentClientSpeaksDuringWait(t *testing.T) {
	skipWithoutPeek(t)
	hello := waHello(6, 3)
	s := waServe(t, waServeOpts{routes: waSilentRoutes("1m", len(hello))})
	if _, err := s.client.Write(hello); err != nil {
		t.Fatal(err)
	}
	r := s.result(t)
	if r.route != "chat" || !bytes.Equal(r.data, hello) {
		t.Fatalf("route %q read %q, %v; want chat to read the hello", r.route, r.data, r.err)
	}
}

// waTCPPair returns both ends of a loopback TCP connection.
func waTCPPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// waMatchWithin runs m.Match(cx) and fails the test if it takes 10s.
func waMatchWithin(t *testing.T, m layer4.ConnMatcher, cx *layer4.Connection) (bool, error) {
	t.Helper()
	type res struct {
		ok  bool
		err error
	}
	ch := make(chan res, 1)
	go func() {
		ok, err := m.Match(cx)
		ch <- res{ok, err}
	}()
	select {
	case r := <-ch:
		return r.ok, r.err
	case <-time.After(10 * time.Second):
		t.Fatal("Match did not return within 10s")
	}
	return false, nil
}

func waSilentMatcher(t *testing.T, wait time.Duration) *MatchSilent {
	t.Helper()
	m := &MatchSilent{Wait: caddy.Duration(wait)}
	if err := m.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if err := m.Validate(); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestMatchSilentDirect calls Match on connections in each state.
func TestMatchSilentDirect(t *testing.T) {
	t.Run("silent_then_speaks", func(t *testing.T) {
		skipWithoutPeek(t)
		client, server := waTCPPair(t)
		cx := layer4.WrapConnection(server, nil, zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, 50*time.Millisecond), cx); !ok || err != nil {
			t.Fatalf("Match = %v, %v; want true for a silent client", ok, err)
		}
		// The read deadline wa_silent set is cleared: a later read waits for data.
		if _, err := client.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1)
		if n, err := server.Read(buf); n != 1 || err != nil || buf[0] != 'x' {
			t.Fatalf("read %q, %v after the match; want x", buf[:n], err)
		}
	})
	t.Run("bytes_waiting_not_consumed", func(t *testing.T) {
		client, server := waTCPPair(t)
		if _, err := client.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		cx := layer4.WrapConnection(server, nil, zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Minute), cx); ok || err != nil {
			t.Fatalf("Match = %v, %v; want false for a client that spoke", ok, err)
		}
		buf := make([]byte, 5)
		_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "hello" {
			t.Fatalf("read %q, %v after Match; want hello", buf, err)
		}
	})
	t.Run("tiny_wait_bytes_waiting", func(t *testing.T) {
		// A wait that ends before the first peek must not hide bytes that
		// are already there.
		skipWithoutPeek(t)
		for i := range 20 {
			client, server := waTCPPair(t)
			if _, err := client.Write([]byte("hi")); err != nil {
				t.Fatal(err)
			}
			// Wait until the bytes have reached the server's socket.
			if silent, err := peekSilent(server, 5*time.Second); silent || err != nil {
				t.Fatalf("the client's bytes did not arrive: %v", err)
			}
			cx := layer4.WrapConnection(server, nil, zap.NewNop())
			if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Nanosecond), cx); ok || err != nil {
				t.Fatalf("try %d: Match = %v, %v; want false for a client whose bytes are waiting", i, ok, err)
			}
		}
	})
	t.Run("client_closed", func(t *testing.T) {
		client, server := waTCPPair(t)
		if err := client.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		cx := layer4.WrapConnection(server, nil, zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Minute), cx); ok || err != nil {
			t.Fatalf("Match = %v, %v; want false for a client that closed", ok, err)
		}
	})
	t.Run("bytes_prefetched", func(t *testing.T) {
		_, server := waTCPPair(t)
		cx := layer4.WrapConnection(server, []byte("W"), zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Minute), cx); ok || err != nil {
			t.Fatalf("Match = %v, %v; want false with bytes prefetched", ok, err)
		}
	})
	t.Run("wrapped_conn", func(t *testing.T) {
		_, server := waTCPPair(t)
		cx := layer4.WrapConnection(waOneByteConn{server}, nil, zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Minute), cx); ok || err != nil {
			t.Fatalf("Match = %v, %v; want false at once on a wrapped conn", ok, err)
		}
	})
	t.Run("pipe", func(t *testing.T) {
		in, out := net.Pipe()
		defer in.Close()
		defer out.Close()
		cx := layer4.WrapConnection(out, nil, zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Minute), cx); ok || err != nil {
			t.Fatalf("Match = %v, %v; want false at once on a pipe", ok, err)
		}
	})
	t.Run("closed_conn", func(t *testing.T) {
		skipWithoutPeek(t)
		_, server := waTCPPair(t)
		server.Close()
		cx := layer4.WrapConnection(server, nil, zap.NewNop())
		if ok, err := waMatchWithin(t, waSilentMatcher(t, time.Minute), cx); ok || !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Match = %v, %v; want the close error", ok, err)
		}
	})
}

func TestMatchSilentProvisionValidate(t *testing.T) {
	m := new(MatchSilent)
	if err := m.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if time.Duration(m.Wait) != 2*time.Second {
		t.Errorf("default wait %v; want 2s", time.Duration(m.Wait))
	}
	m = &MatchSilent{Wait: caddy.Duration(-time.Second)}
	if err := m.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if err := m.Validate(); err == nil || !strings.Contains(err.Error(), "wait must be positive") {
		t.Errorf("Validate with a negative wait: %v; want an error", err)
	}
}

func TestMatchSilentUnmarshalCaddyfile(t *testing.T) {
	for _, c := range []struct {
		in      string
		want    time.Duration
		wantErr string
	}{
		{in: "wa_silent"},
		{in: "wa_silent 500ms", want: 500 * time.Millisecond},
		{in: "wa_silent 1d", want: 24 * time.Hour},
		{in: "wa_silent soon", wantErr: "bad wait 'soon'"},
		{in: "wa_silent 0s", wantErr: "wait must be positive"},
		{in: "wa_silent -1s", wantErr: "wait must be positive"},
		{in: "wa_silent 1s 2s", wantErr: "wrong argument count"},
		{in: "wa_silent {\n\twait 1s\n}", wantErr: "unrecognized subdirective 'wait'"},
	} {
		m := new(MatchSilent)
		err := m.UnmarshalCaddyfile(caddyfile.NewTestDispenser(c.in))
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%q: error %v; want one containing %q", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil || time.Duration(m.Wait) != c.want {
			t.Errorf("%q: wait %v, %v; want %v", c.in, time.Duration(m.Wait), err, c.want)
		}
	}
}
