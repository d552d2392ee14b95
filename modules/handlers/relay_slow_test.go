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
