package handlers

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// cutSockets is a relayed connection's four sockets: the test's client and
// upstream peers, and the proxy's two ends that carry relays between.
type cutSockets struct {
	client, proxyClient, proxyUp, upstream net.Conn
}

func newCutSockets(t *testing.T) cutSockets {
	t.Helper()
	accept := func() (net.Conn, net.Conn) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		d, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		a, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close(); a.Close() })
		return d, a
	}
	var s cutSockets
	s.client, s.proxyClient = accept()
	s.proxyUp, s.upstream = accept()
	return s
}

// relayModes runs f with the event loop (read/write and splice) and with
// the goroutine relay.
func relayModes(t *testing.T, f func(t *testing.T)) {
	for _, mode := range []string{"", "splice", "goroutine"} {
		name := "eventloop"
		if mode != "" {
			name = mode
		}
		t.Run(name, func(t *testing.T) {
			saved := relayMode
			relayMode = mode
			t.Cleanup(func() { relayMode = saved })
			f(t)
		})
	}
}

// startCarry opens a registry connection with a handler's first cut (close
// the client), lets pre run (e.g. to cut it before the relay takes over), and
// hands the sockets to carry. It returns a channel that receives how the
// relay ended, after release ran.
func startCarry(t *testing.T, s cutSockets, pre func(rc *registry.Conn)) (*registry.Conn, <-chan error) {
	t.Helper()
	rc := registry.Open(&registry.Conn{Remote: s.client.LocalAddr().String(), Handler: "test"})
	rc.SetCut(func() { _ = s.proxyClient.Close() })
	if pre != nil {
		pre(rc)
	}
	ended := make(chan error, 1)
	var relayErr error
	done := func(_ pairStats, err error) { relayErr = err }
	release := func() {
		registry.Close(rc, relayErr)
		ended <- relayErr
	}
	go func() {
		if !carry(s.proxyClient, s.proxyUp, time.Minute, rc, done, release) {
			release() // the goroutine relay leaves release to its caller
		}
		// as caddy-l4 does when the handler returns; the event loop holds
		// a duplicate of the socket
		_ = s.proxyClient.Close()
	}()
	return rc, ended
}

func waitCut(t *testing.T, ended <-chan error) {
	t.Helper()
	select {
	case err := <-ended:
		if err != errCut || !errors.Is(err, net.ErrClosed) {
			t.Fatalf("the relay ended with %v, want errCut (matching net.ErrClosed)", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not end after the cut")
	}
}

// expectEOF asserts the peer sees its connection end without more bytes
// (for a TLS client: close_notify or a closed socket).
func expectEOF(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(make([]byte, 16))
	if n != 0 || err == nil {
		t.Fatalf("read %d bytes, err %v; want the connection closed", n, err)
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the connection was not closed")
	}
}

// TestCutRelay cuts a live relayed connection through the registry, as a
// shutdown's deadline does: the relay ends with errCut, release runs (the
// connection leaves the registry) and both peers see their connection
// closed.
func TestCutRelay(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		s := newCutSockets(t)
		rc, ended := startCarry(t, s, nil)
		// the relay carries bytes both ways
		for _, dir := range [][2]net.Conn{{s.client, s.upstream}, {s.upstream, s.client}} {
			if _, err := dir[0].Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 4)
			_ = dir[1].SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(dir[1], got); err != nil || string(got) != "ping" {
				t.Fatalf("relayed %q, %v", got, err)
			}
		}
		if rc.FromClient.Load() != 4 || rc.FromUpstream.Load() != 4 {
			t.Fatalf("counted %d/%d bytes, want 4/4", rc.FromClient.Load(), rc.FromUpstream.Load())
		}
		if !rc.Cut() {
			t.Fatal("the relayed connection had no cut function")
		}
		waitCut(t, ended)
		expectEOF(t, s.client)
		expectEOF(t, s.upstream)
		if rc.Cut() {
			t.Fatal("a closed connection was cut again")
		}
	})
}

// TestCutBeforeRelay cuts a connection while its handler still owns it
// (dialling): the handler's cut runs, and the relay that takes over after it
// ends at once instead of carrying a connection the shutdown already gave
// up on. The handler's cut here does not close the client, as when the cut
// lands between the event loop duplicating the socket and the relay taking
// over: the relay's own cut must still apply.
func TestCutBeforeRelay(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		s := newCutSockets(t)
		_, ended := startCarry(t, s, func(rc *registry.Conn) {
			rc.SetCut(func() {}) // the handler's cut, not yet effective
			if !rc.Cut() {
				t.Fatal("the handler's cut did not run")
			}
		})
		waitCut(t, ended)
		expectEOF(t, s.client)
		expectEOF(t, s.upstream)
	})
}
