//go:build linux

package handlers

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// socketInode is the inode of c's socket, which every descriptor of it
// shows in /proc/self/fd.
func socketInode(t *testing.T, c net.Conn) uint64 {
	t.Helper()
	raw, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }); err != nil || serr != nil {
		t.Fatalf("fstat: %v %v", err, serr)
	}
	return st.Ino
}

// descriptors counts this process's open descriptors of the socket ino.
func descriptors(t *testing.T, ino uint64) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("socket:[%d]", ino)
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && l == want {
			n++
		}
	}
	return n
}

func waitDescriptors(t *testing.T, what string, ino uint64, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for descriptors(t, ino) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d descriptors of the socket, want %d", what, descriptors(t, ino), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestHandOverLeavesOneDescriptor: once the event loop has a pair, its
// descriptors are the sockets' only ones (Go's originals are closed at the
// hand-over), and none is left once the pair ended. The loop relies on it:
// it closes a pair's sockets without taking them out of its epoll set
// first, which is right only for the last descriptor (an open original
// would keep a ready socket in the set, reported over and over).
func TestHandOverLeavesOneDescriptor(t *testing.T) {
	for _, mode := range []string{"", "splice"} {
		name := "eventloop"
		if mode != "" {
			name = mode
		}
		t.Run("carry/"+name, func(t *testing.T) {
			saved := relayMode
			relayMode = mode
			t.Cleanup(func() { relayMode = saved })
			s := newCutSockets(t)
			client, up := socketInode(t, s.proxyClient), socketInode(t, s.proxyUp)
			rc := registry.Open(&registry.Conn{Remote: s.client.LocalAddr().String(), Handler: "test"})
			ended := make(chan error, 1)
			if !carry(s.proxyClient, s.proxyUp, time.Minute, rc, func(pairStats, error) {}, func() { ended <- nil }) {
				t.Fatal("the event loop did not take the pair")
			}
			if n, m := descriptors(t, client), descriptors(t, up); n != 1 || m != 1 {
				t.Fatalf("after the hand-over: %d descriptors of the client's socket, %d of the upstream's; want 1 each", n, m)
			}
			s.client.Close()
			s.upstream.Close()
			<-ended
			waitDescriptors(t, "client socket after the end", client, 0)
			waitDescriptors(t, "upstream socket after the end", up, 0)
		})
		t.Run("connect/"+name, func(t *testing.T) {
			saved := relayMode
			relayMode = mode
			t.Cleanup(func() { relayMode = saved })
			client, proxyClient := connectPair(t)
			ino := socketInode(t, proxyClient)
			var n [2]atomic.Int64
			ended := make(chan error, 1)
			_, ok, err := offloadConnect(proxyClient, "echo", nil, nil, 0, time.Minute, time.Minute, [2]*atomic.Int64{&n[0], &n[1]},
				[2]prometheus.Counter{prometheus.NewCounter(prometheus.CounterOpts{Name: "a"}), prometheus.NewCounter(prometheus.CounterOpts{Name: "b"})},
				func(_ pairStats, err error) { ended <- err })
			if ok || err != nil {
				t.Fatalf("offloadConnect with no address: ok %v, err %v; want it declined", ok, err)
			}
			if got := descriptors(t, ino); got != 1 {
				t.Fatalf("declined: %d descriptors of the client's socket, want Go's own", got)
			}
			_, ok, err = offloadConnect(proxyClient, "echo", []netip.AddrPort{echoAddrPort(t)}, [][]byte{[]byte("hi")}, 2, time.Minute, time.Minute,
				[2]*atomic.Int64{&n[0], &n[1]},
				[2]prometheus.Counter{prometheus.NewCounter(prometheus.CounterOpts{Name: "a"}), prometheus.NewCounter(prometheus.CounterOpts{Name: "b"})},
				func(_ pairStats, err error) { ended <- err })
			if !ok || err != nil {
				t.Fatalf("offloadConnect: ok %v, err %v", ok, err)
			}
			if got := descriptors(t, ino); got != 1 {
				t.Fatalf("after the hand-over: %d descriptors of the client's socket, want 1", got)
			}
			_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
			got := make([]byte, 2)
			if _, err := io.ReadFull(client, got); err != nil || string(got) != "hi" {
				t.Fatalf("echo of the first bytes: %q, %v", got, err)
			}
			client.Close()
			if err := <-ended; err != nil {
				t.Fatalf("the pair ended with %v", err)
			}
			waitDescriptors(t, "client socket after the end", ino, 0)
		})
	}
}

// TestRelayedClientHasNoKeepAlive: the client's socket comes from accept
// with Go's TCP keep-alive on (probes after 15 s of silence); once carry or
// carryConnecting has it, keep-alive is off, in every relay mode, for a
// TLS-terminated client and when the loop connects (see clientKeepAlive).
func TestRelayedClientHasNoKeepAlive(t *testing.T) {
	// watch returns a function reading SO_KEEPALIVE of c's socket through a
	// descriptor of the test's own, which sees the socket after the
	// hand-over closed Go's; closing it (before the pair ends, see pair) is
	// left to the caller.
	watch := func(t *testing.T, c net.Conn) (keepAlive func() int, look int) {
		raw, err := c.(syscall.Conn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		_ = raw.Control(func(fd uintptr) { look, err = unix.Dup(int(fd)) })
		if err != nil {
			t.Fatal(err)
		}
		keepAlive = func() int {
			v, err := unix.GetsockoptInt(look, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		if keepAlive() != 1 {
			t.Fatal("the accepted socket has no keep-alive to begin with: the test shows nothing")
		}
		return keepAlive, look
	}
	waitOff := func(t *testing.T, keepAlive func() int, look int) {
		defer unix.Close(look)
		deadline := time.Now().Add(5 * time.Second)
		for keepAlive() != 0 {
			if time.Now().After(deadline) {
				t.Fatal("the relayed client's socket still has TCP keep-alive on")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	relayModes(t, func(t *testing.T) {
		s := newCutSockets(t)
		keepAlive, look := watch(t, s.proxyClient)
		_, ended := startCarry(t, s, nil)
		waitOff(t, keepAlive, look)
		s.client.Close()
		s.upstream.Close()
		<-ended
	})
	t.Run("TLS terminated", func(t *testing.T) {
		var keepAlive func() int
		var look int
		tr := startTLSRelayWith(t, time.Minute, nil, func(c *net.TCPConn) { keepAlive, look = watch(t, c) })
		waitOff(t, keepAlive, look)
		_ = tr.client.Close()
		_ = tr.upstream.Close()
		<-tr.ended
	})
	t.Run("loop connects", func(t *testing.T) {
		if !loopEnabled() {
			t.Skip("WAPROXY_RELAY=" + relayMode + ": no event loop")
		}
		client, proxyClient := connectPair(t)
		keepAlive, look := watch(t, proxyClient)
		rc := registry.Open(&registry.Conn{Remote: client.LocalAddr().String(), Handler: "test"})
		ended := make(chan struct{})
		ok, err := carryConnecting(proxyClient, "echo", []netip.AddrPort{echoAddrPort(t)}, net.Buffers{[]byte("hi")}, 2,
			5*time.Second, time.Minute, rc, func(pairStats, error) {}, func() { registry.Close(rc, nil); close(ended) })
		if !ok || err != nil {
			unix.Close(look)
			t.Fatalf("carryConnecting: %v, %v", ok, err)
		}
		waitOff(t, keepAlive, look)
		client.Close()
		<-ended
	})
}
