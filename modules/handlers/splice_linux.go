//go:build linux

package handlers

import (
	"golang.org/x/sys/unix"
)

// With WAPROXY_RELAY=splice the event loop moves bytes with splice(2)
// through a pipe instead of read(2) and write(2) through a user-space
// buffer: socket → pipe takes the received pages by reference, pipe →
// socket sends them without copying, so the proxy touches no byte. On this
// machine's loopback it cost 0.53× the proxy CPU per GB relayed of
// read/write, but the bench's MB/s (client, edge and proxy sharing 2 CPUs)
// came out at 0.89×, so it is not the default (docs/performance.md,
// "splice(2)").
//
// A direction borrows a pipe from its loop's pool only while bytes are in
// flight: an idle connection holds none, as with the buffers.

// splicePipeSize is the capacity asked for each pipe (F_SETPIPE_SZ; a
// process that may not have it keeps the default 64 KiB). 256 KiB moved
// twice as much per call as 64 KiB; the pool's 64 pipes per loop stay within
// the default per-user pipe allowance (fs.pipe-user-pages-soft, 64 MiB).
const splicePipeSize = 256 * 1024

// maxPooledPipes bounds each loop's pool of empty pipes.
const maxPooledPipes = 64

type kpipe struct{ r, w int }

func rawSplice(in, out, n int) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

// getPipe returns an empty pipe (loop goroutine only).
func (l *eventLoop) getPipe() (kpipe, error) {
	if k := len(l.pipes); k > 0 {
		p := l.pipes[k-1]
		l.pipes = l.pipes[:k-1]
		return p, nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return kpipe{}, err
	}
	_, _ = unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, splicePipeSize)
	return kpipe{r: fds[0], w: fds[1]}, nil
}

// putPipe takes back an empty pipe.
func (l *eventLoop) putPipe(p kpipe) {
	if len(l.pipes) < maxPooledPipes {
		l.pipes = append(l.pipes, p)
		return
	}
	p.close()
}

func (p kpipe) close() {
	_ = rawClose(p.r)
	_ = rawClose(p.w)
}

// spliceChunk moves one chunk from fds[s] to the other side through a pipe,
// as readChunk does through a buffer. more is true when the socket may have
// more; alive is false when the pair was closed.
func (l *eventLoop) spliceChunk(p *pair, s int) (more, alive bool) {
	d := 1 - s
	pp, err := l.getPipe()
	if err != nil {
		l.close(p, err)
		return false, false
	}
	n, err := rawSplice(p.fds[s], pp.w, splicePipeSize)
	switch {
	case err == unix.EAGAIN:
		l.putPipe(pp)
		return false, true
	case err != nil:
		l.putPipe(pp)
		l.close(p, err)
		return false, false
	case n == 0:
		l.putPipe(pp)
		return false, l.ended(p, s)
	}
	p.moved(s, n)
	w, err := rawSplice(pp.r, p.fds[d], n)
	if err != nil && err != unix.EAGAIN {
		pp.close() // not empty: not reusable
		l.close(p, err)
		return false, false
	}
	if w == n {
		l.putPipe(pp)
		return n == splicePipeSize, true
	}
	// the destination is full: the pipe keeps the rest, reading stops
	p.pipe[d], p.pipeLen[d] = pp, n-max(w, 0)
	return false, l.updateInterest(p)
}

// flushPipe writes what the pipe holds for fds[d]. It returns false when the
// pair was closed.
func (l *eventLoop) flushPipe(p *pair, d int) bool {
	w, err := rawSplice(p.pipe[d].r, p.fds[d], p.pipeLen[d])
	if err != nil && err != unix.EAGAIN {
		l.close(p, err)
		return false
	}
	p.touch()
	p.pipeLen[d] -= max(w, 0)
	if p.pipeLen[d] > 0 {
		return true
	}
	l.putPipe(p.pipe[d])
	return l.updateInterest(p)
}
