//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly || solaris

package matchers

import (
	"errors"
	"net"
	"os"
	"syscall"
	"time"

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
// Only plain sockets qualify: a wrapper that buffers (a *tls.Conn, a PROXY
// protocol conn) may hold bytes that the socket no longer shows, and a
// wrapper type embedding a socket could still expose SyscallConn, so this
// checks concrete types rather than syscall.Conn.
func peekSilent(conn net.Conn, wait time.Duration) (bool, error) {
	var sc syscall.Conn
	switch c := conn.(type) {
	case *net.TCPConn:
		sc = c
	case *net.UnixConn:
		sc = c
	default:
		return false, nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false, err
	}
	if err := conn.SetReadDeadline(time.Now().Add(wait)); err != nil {
		return false, err
	}
	// Clearing the deadline is safe: caddy-l4's route compiler sets its own
	// matching deadline again before every prefetch, and clears it when a
	// route matches.
	defer func() { _ = conn.SetReadDeadline(time.Time{}) }()

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
