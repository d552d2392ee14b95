//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly || solaris

package matchers

import (
	"errors"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"
)

// silentPeekSupported reports whether wa_silent can wait on this platform.
const silentPeekSupported = true

// peekSilent waits up to wait for conn's peer to send something, without
// consuming it. It returns true if the peer stayed silent for the whole
// wait; false once a byte is readable, the peer closed its side or the
// socket failed (the router's next read will then see that data, EOF or
// error); and false at once for a connection it cannot peek at.
//
// Only plain sockets qualify: a wrapper that buffers (a *tls.Conn) may hold
// bytes that the socket no longer shows, and a wrapper type embedding a
// socket could still expose SyscallConn, so this checks concrete types
// rather than syscall.Conn. The one wrapper it looks through is caddy-l4's
// PROXY protocol handler's (see behindHeader).
func peekSilent(conn net.Conn, wait time.Duration) (bool, error) {
	var sock interface {
		net.Conn
		syscall.Conn
	}
	switch c := conn.(type) {
	case *net.TCPConn:
		sock = c
	case *net.UnixConn:
		sock = c
	case *proxyproto.Conn:
		tc, err := behindHeader(c)
		if tc == nil || err != nil {
			return false, err
		}
		sock = tc
	default:
		return false, nil
	}
	raw, err := sock.SyscallConn()
	if err != nil {
		return false, err
	}
	if err := sock.SetReadDeadline(time.Now().Add(wait)); err != nil {
		return false, err
	}
	// Clearing the deadline is safe: caddy-l4's route compiler sets its own
	// matching deadline again before every prefetch, and clears it when a
	// route matches.
	defer func() { _ = sock.SetReadDeadline(time.Time{}) }()

	var one [1]byte
	readable := func(fd uintptr) bool {
		for {
			_, _, err := unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			if err == unix.EINTR {
				continue
			}
			// EAGAIN: nothing yet. Anything else (data, EOF, a socket
			// error): the client is not silent.
			return err != unix.EAGAIN && err != unix.EWOULDBLOCK
		}
	}
	// raw.Read calls readable, and while it returns false waits for the
	// socket to become readable (Go's netpoller) or the deadline to pass.
	err = raw.Read(readable)
	if err == nil {
		return false, nil
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return false, err
	}
	// The wait is over. Peek once more: raw.Read does not call readable at
	// all once the deadline has passed, so bytes that came just before it
	// (or a wait too short for a first peek) would otherwise pass for
	// silence. Control neither waits nor checks the deadline.
	var spoke bool
	if err := raw.Control(func(fd uintptr) { spoke = readable(fd) }); err != nil {
		return false, err
	}
	return !spoke, nil
}

// behindHeader returns the TCP socket under c, a connection caddy-l4's
// proxy_protocol handler wrapped after reading a PROXY header, when peeking
// at that socket tells whether the client behind the header has spoken:
// when no byte the client sent after the header has been read from the
// socket yet. go-proxyproto reads the header through a buffer that may hold
// the bytes that came with it, where a peek cannot see them; so the bytes
// read from the socket so far (the kernel's count of bytes received, less
// those still queued) must be the header's exact length (0 without one).
// It returns nil, and no error, when that cannot be known: not a TCP socket
// underneath, a header whose length is unknown, or a platform without
// those counts (then wa_silent does not match, as for any wrapper).
func behindHeader(c *proxyproto.Conn) (*net.TCPConn, error) {
	inner := c.Raw()
	for {
		lc, ok := inner.(*layer4.Connection)
		if !ok {
			break
		}
		inner = lc.Conn
	}
	tc, ok := inner.(*net.TCPConn)
	if !ok {
		return nil, nil
	}
	headerLen := 0
	if h := c.ProxyHeader(); h != nil {
		b, err := h.Format()
		if err != nil {
			return nil, nil
		}
		headerLen = len(b)
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil, err
	}
	read, known := int64(0), false
	if err := raw.Control(func(fd uintptr) { read, known = bytesConsumed(int(fd)) }); err != nil {
		return nil, err
	}
	if !known || read != int64(headerLen) {
		return nil, nil
	}
	return tc, nil
}
