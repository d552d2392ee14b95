package handlers

import (
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"testing"
	"time"
)

// TestRelaySlowReader: a client behind a small socket buffer, reading in
// small pieces, makes the relay's writes to it partial again and again (bytes wait in the
// relay's buffer or pipe for the socket to drain); every byte still arrives,
// in order, once, and both directions are counted.
func TestRelaySlowReader(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		s := newCutSockets(t)
		// a small send buffer towards the client: a write fits only part
		// of a chunk, and writable comes back with little room
		_ = s.proxyClient.(*net.TCPConn).SetWriteBuffer(8 << 10)
		rc, ended := startCarry(t, s, nil)
		payload := make([]byte, 512<<10)
		_, _ = rand.Read(payload)
		go func() {
			_, _ = s.upstream.Write(payload)
			_ = s.upstream.Close()
		}()
		var got []byte
		buf := make([]byte, 3000)
		_ = s.client.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			n, err := s.client.Read(buf)
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("after %d bytes: %v", len(got), err)
			}
		}
		if sha256.Sum256(got) != sha256.Sum256(payload) {
			t.Fatalf("received %d bytes, want the %d sent, intact", len(got), len(payload))
		}
		_ = s.client.Close()
		select {
		case <-ended:
		case <-time.After(10 * time.Second):
			t.Fatal("the relay did not end")
		}
		if rc.FromUpstream.Load() != int64(len(payload)) {
			t.Fatalf("counted %d bytes from the upstream, want %d", rc.FromUpstream.Load(), len(payload))
		}
	})
}

// TestRelayHalfCloseThenSlowReader: the client sends its request and
// half-closes (the relay shuts its write side to the upstream), then the
// upstream answers with more than the buffers towards a slow client hold
// and closes. The upstream's socket is then shut both ways (EPOLLHUP)
// while the relay has stopped reading it for the bytes still waiting to
// go to the client: every byte must still arrive, in order, then EOF.
func TestRelayHalfCloseThenSlowReader(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		s := newCutSockets(t)
		_ = s.proxyClient.(*net.TCPConn).SetWriteBuffer(8 << 10)
		_ = s.client.(*net.TCPConn).SetReadBuffer(8 << 10)
		rc, ended := startCarry(t, s, nil)
		if _, err := s.client.Write([]byte("req")); err != nil {
			t.Fatal(err)
		}
		_ = s.client.(*net.TCPConn).CloseWrite()
		payload := make([]byte, 128<<10)
		_, _ = rand.Read(payload)
		go func() {
			_, _ = io.ReadAll(s.upstream) // the request, then the relay's FIN
			_, _ = s.upstream.Write(payload)
			_ = s.upstream.Close()
		}()
		time.Sleep(500 * time.Millisecond) // the buffers towards the client fill up
		expectAllThenEnd(t, s.client, payload, ended)
		if rc.FromUpstream.Load() != int64(len(payload)) {
			t.Fatalf("counted %d bytes from the upstream, want %d", rc.FromUpstream.Load(), len(payload))
		}
	})
}

// TestRelayUpstreamClosesThenClientSends is the other direction: the
// upstream half-closes first, then the client sends more than the buffers
// towards a slow upstream hold and closes.
func TestRelayUpstreamClosesThenClientSends(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		s := newCutSockets(t)
		_ = s.proxyUp.(*net.TCPConn).SetWriteBuffer(8 << 10)
		_ = s.upstream.(*net.TCPConn).SetReadBuffer(8 << 10)
		rc, ended := startCarry(t, s, nil)
		_ = s.upstream.(*net.TCPConn).CloseWrite()
		_ = s.client.SetReadDeadline(time.Now().Add(10 * time.Second))
		if b, err := io.ReadAll(s.client); err != nil || len(b) != 0 {
			t.Fatalf("client read %d bytes, %v; want EOF", len(b), err)
		}
		payload := make([]byte, 128<<10)
		_, _ = rand.Read(payload)
		go func() {
			_, _ = s.client.Write(payload)
			_ = s.client.Close()
		}()
		time.Sleep(500 * time.Millisecond)
		expectAllThenEnd(t, s.upstream, payload, ended)
		if rc.FromClient.Load() != int64(len(payload)) {
			t.Fatalf("counted %d bytes from the client, want %d", rc.FromClient.Load(), len(payload))
		}
	})
}

// expectAllThenEnd reads c to EOF, expects exactly payload, and then the
// relay's clean end.
func expectAllThenEnd(t *testing.T, c net.Conn, payload []byte, ended <-chan error) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("after %d bytes: %v", len(got), err)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatalf("received %d bytes, want the %d sent, intact", len(got), len(payload))
	}
	select {
	case err := <-ended:
		if err != nil {
			t.Fatalf("relay ended with %v; want a clean end", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not end")
	}
}
