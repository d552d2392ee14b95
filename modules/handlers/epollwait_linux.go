//go:build linux

package handlers

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// epollSet is an epoll set waited on through Go's network poller. Its own
// descriptor (readable while any socket in the set is ready) is registered
// with the runtime's poller like a socket, so a loop waiting for events
// parks as a goroutine. Waiting in epoll_wait itself would be a blocking
// system call: the runtime then hands the thread's P to another thread and
// its sysmon thread keeps waking every 20 µs to do so, which costs more CPU
// per connection than the relaying (measured in docs/performance.md).
type epollSet struct {
	fd   int
	file *os.File // keeps the descriptor registered (and open: no finalizer runs while the set lives)
	raw  syscall.RawConn
}

func newEpollSet() (*epollSet, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	// os.NewFile registers a non-blocking descriptor with the poller.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("epoll set non-blocking: %w", err)
	}
	f := os.NewFile(uintptr(fd), "epoll")
	raw, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("epoll set: %w", err)
	}
	return &epollSet{fd: fd, file: f, raw: raw}, nil
}

// run waits for events and passes each batch to handle, forever. tick, when
// not nil, runs about every interval, also while nothing happens.
//
// The poller watches the set edge-triggered, and the kernel signals a set
// to its watchers only when a socket becomes ready, not when a
// level-triggered socket is put back on the ready list after epoll_wait
// returned it. So each wake-up collects events until epoll_wait (with no
// timeout) finds none: only then is the set guaranteed to signal again.
func (s *epollSet) run(events []unix.EpollEvent, handle func([]unix.EpollEvent), interval time.Duration, tick func()) {
	collect := func(uintptr) bool {
		for {
			n, err := rawEpollPoll(s.fd, events)
			if err == unix.EINTR {
				continue
			}
			if n <= 0 {
				return false // wait until the set is readable again
			}
			handle(events[:n])
		}
	}
	for {
		if tick != nil {
			_ = s.file.SetReadDeadline(time.Now().Add(interval))
		}
		err := s.raw.Read(collect)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			tick()
		case err != nil:
			// the set is never closed: only a programming error lands here
			time.Sleep(10 * time.Millisecond)
		}
	}
}
