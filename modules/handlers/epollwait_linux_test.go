//go:build linux

package handlers

import (
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pipes returns n non-blocking pipes, closed when the test ends.
func pipes(t *testing.T, n int) [][2]int {
	t.Helper()
	ps := make([][2]int, n)
	for i := range ps {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		ps[i] = p
		t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	}
	return ps
}

// startSet runs an epoll set whose handler reads one byte per event from
// each ready pipe (so a pipe with more stays ready, level-triggered) and
// reports the byte.
func startSet(t *testing.T, ps [][2]int, batch int, interval time.Duration, tick func()) <-chan byte {
	t.Helper()
	set, err := newEpollSet()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(p[0])}
		if err := unix.EpollCtl(set.fd, unix.EPOLL_CTL_ADD, p[0], &ev); err != nil {
			t.Fatal(err)
		}
	}
	got := make(chan byte, 1024)
	go set.run(make([]unix.EpollEvent, batch), func(evs []unix.EpollEvent) {
		for _, ev := range evs {
			var b [1]byte
			if n, _ := unix.Read(int(ev.Fd), b[:]); n == 1 {
				got <- b[0]
			}
		}
	}, interval, tick)
	return got
}

func receive(t *testing.T, got <-chan byte, want int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for i := range want {
		select {
		case <-got:
		case <-timeout:
			t.Fatalf("got %d of %d bytes: the set stopped signalling with events still ready", i, want)
		}
	}
}

// A socket left ready after its event (level-triggered, partly read) and
// more ready sockets than one epoll_wait returns are all served, with no new
// readiness to wake the loop.
func TestEpollSetServesEverythingReady(t *testing.T) {
	ps := pipes(t, 10)
	got := startSet(t, ps, 4, 0, nil)
	time.Sleep(20 * time.Millisecond) // parked in the poller first
	for _, p := range ps {
		if _, err := unix.Write(p[1], []byte("0123456789")); err != nil {
			t.Fatal(err)
		}
	}
	receive(t, got, 100)
	// and it keeps going after having run dry
	if _, err := unix.Write(ps[3][1], []byte("abc")); err != nil {
		t.Fatal(err)
	}
	receive(t, got, 3)
}

// While nothing is ready the loop's goroutine waits in Go's poller (IO wait),
// not in a blocking epoll_wait that holds a thread, and tick still runs.
func TestEpollSetWaitsInPoller(t *testing.T) {
	var ticks atomic.Int32
	startSet(t, pipes(t, 1), 4, 20*time.Millisecond, func() { ticks.Add(1) })
	deadline := time.Now().Add(10 * time.Second)
	for ticks.Load() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("tick ran %d times in 10s with a 20ms interval", ticks.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	var stacks string
	for range 20 { // it may be between waits: look again
		buf := make([]byte, 1<<20)
		stacks = string(buf[:runtime.Stack(buf, true)])
		for _, g := range strings.Split(stacks, "\n\n") {
			header, _, _ := strings.Cut(g, "\n")
			if strings.Contains(g, "(*epollSet).run(") && strings.Contains(header, "[IO wait") {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no epoll set goroutine in IO wait; goroutines:\n%s", stacks)
}
