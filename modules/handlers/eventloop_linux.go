//go:build linux

package handlers

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// The event loop relays established plain-TCP connections the way HAProxy
// does: after detection, wa_proxy hands both sockets to an epoll loop and
// returns (having dialled, or with the upstream's connect still in progress:
// eventloop_connect_linux.go), so an idle connection costs a small struct instead of two
// goroutine stacks and caddy-l4's matching buffer. Each readable socket gets
// one read into a borrowed buffer and one write to its peer; a write that
// would block keeps the rest pending, stops reading from the source and waits
// for the destination to become writable (backpressure). The buffer goes back
// to the pool as soon as its bytes are written.

// loopCount is how many epoll loops share the connections. Each loop is one
// goroutine, parked in Go's poller while none of its sockets is ready.
var loopCount = min(runtime.GOMAXPROCS(0), 4)

var (
	loopsOnce sync.Once
	loops     []*eventLoop
	loopsErr  error
	loopNext  atomic.Uint32
)

func startLoops() ([]*eventLoop, error) {
	loopsOnce.Do(func() {
		for range loopCount {
			l, err := newEventLoop()
			if err != nil {
				loopsErr = err
				return
			}
			loops = append(loops, l)
			go l.run()
		}
	})
	return loops, loopsErr
}

// pairStats is what a relayed pair moved: bytes read from the client
// (toUpstream) and from the upstream (toClient).
type pairStats struct{ toUpstream, toClient int64 }

// offload is offloadCuttable for a pair that is never cut from outside.
func offload(client, upstream net.Conn, idle time.Duration, n [2]*atomic.Int64, fromClient, fromUpstream prometheus.Counter,
	done func(pairStats, error)) bool {
	_, ok := offloadCuttable(client, upstream, idle, n, fromClient, fromUpstream, done)
	return ok
}

// offloadCuttable hands an established client/upstream pair to an event loop. It
// takes over both connections: it duplicates their sockets, closes upstream,
// and leaves client for the caller to close (caddy-l4 closes it when the
// handler returns; the duplicate keeps the socket open). done runs on the
// loop's goroutine when the pair has ended, with the first error (nil for a
// clean end on both sides, errIdle for the idle timeout, errCut when cut);
// it must be quick. cut ends the pair from any goroutine: the loop closes it
// promptly (its sockets are only ever touched by the loop). It returns ok
// false, having changed nothing, when the connections are not plain TCP
// sockets or the loop is unavailable; the caller then relays itself.
func offloadCuttable(client, upstream net.Conn, idle time.Duration, n [2]*atomic.Int64, fromClient, fromUpstream prometheus.Counter,
	done func(pairStats, error)) (cut func(), ok bool) {
	if !loopEnabled() {
		return nil, false
	}
	cc, ok1 := client.(*net.TCPConn)
	uc, ok2 := upstream.(*net.TCPConn)
	if !ok1 || !ok2 {
		return nil, false
	}
	ls, err := startLoops()
	if err != nil || len(ls) == 0 {
		return nil, false
	}
	cfd, err := dupFD(cc)
	if err != nil {
		return nil, false
	}
	ufd, err := dupFD(uc)
	if err != nil {
		unix.Close(cfd)
		return nil, false
	}
	// The duplicates keep the sockets; Go's poller lets go of them, and the
	// loop's descriptors are the only ones left (see pair). caddy-l4's own
	// close of the client when the handler returns is then a no-op.
	_ = upstream.Close()
	_ = client.Close()
	p := newPair(cfd, ufd, idle, n, [2]prometheus.Counter{fromClient, fromUpstream}, done)
	l := ls[loopNext.Add(1)%uint32(len(ls))]
	// If add fails, the pair is closed and done has been called: cut is
	// then a no-op.
	_ = l.add(p)
	return p.requestCut, true
}

// newPair is the pair of the client's socket cfd and the upstream's ufd,
// with the relay mode of the moment (WAPROXY_RELAY=splice or not).
func newPair(cfd, ufd int, idle time.Duration, n [2]*atomic.Int64, counters [2]prometheus.Counter, done func(pairStats, error)) *pair {
	p := &pair{
		fds:      [2]int{cfd, ufd},
		idle:     idle,
		n:        n,
		counters: counters,
		done:     done,
		splice:   relayMode == "splice",
	}
	p.touch()
	return p
}

// dupFD duplicates a connection's socket (close-on-exec). The duplicate
// shares the open file description, so it stays non-blocking.
func dupFD(c *net.TCPConn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := raw.Control(func(s uintptr) {
		fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	return fd, derr
}

type eventLoop struct {
	set    *epollSet
	epfd   int
	wakefd int // an eventfd in the epoll set: written to wake the loop for cuts
	mu     sync.Mutex
	pairs  map[int32]*pair // both sockets of a pair map to it
	nextID uint32
	cuts   []*pair // pairs cut from other goroutines, closed by the loop (under mu)
	late   []*pair // pairs whose connect timed out (under mu)
	pipes  []kpipe // empty pipes for splice (loop goroutine only)
}

func newEventLoop() (*eventLoop, error) {
	set, err := newEpollSet()
	if err != nil {
		return nil, err
	}
	epfd := set.fd
	wakefd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		_ = set.file.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// The wake fd stays open for the loop's life, so no pair's socket ever
	// has its number.
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(wakefd)
		_ = set.file.Close()
		return nil, fmt.Errorf("epoll_ctl add eventfd: %w", err)
	}
	return &eventLoop{set: set, epfd: epfd, wakefd: wakefd, pairs: make(map[int32]*pair)}, nil
}

// requestCut asks p's loop to close p (with errCut). Any goroutine may call
// it, any number of times; the sockets are closed on the loop's goroutine
// only, so a socket number is never closed while the loop may reuse it.
func (p *pair) requestCut() {
	if p.cut.Swap(true) {
		return
	}
	l := p.loop
	l.mu.Lock()
	l.cuts = append(l.cuts, p)
	l.mu.Unlock()
	l.notify()
}

// wake asks the loop to end p if it is still connecting (its connect
// timed out). Any goroutine.
func (l *eventLoop) wake(p *pair) {
	l.mu.Lock()
	l.late = append(l.late, p)
	l.mu.Unlock()
	l.notify()
}

// notify wakes the loop up to look at its cuts and timeouts.
func (l *eventLoop) notify() {
	var one [8]byte // an eventfd is written a native-endian uint64
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(l.wakefd, one[:])
}

// closeCut closes the pairs cut since the last call. Loop goroutine only.
func (l *eventLoop) closeCut() {
	var buf [8]byte
	_, _ = unix.Read(l.wakefd, buf[:]) // reset the counter (non-blocking)
	l.mu.Lock()
	cuts, late := l.cuts, l.late
	l.cuts, l.late = nil, nil
	l.mu.Unlock()
	for _, p := range cuts {
		l.close(p, errCut)
	}
	for _, p := range late {
		l.connectTimedOut(p)
	}
}

// add registers both sockets. Events carry the socket and the pair's id, so
// an event still queued for a closed socket whose number was reused by a
// newer pair is recognised and dropped. The pair enters the map only once
// both sockets are registered; until then its (level-triggered) events are
// skipped and come again.
func (l *eventLoop) add(p *pair) error {
	return l.addWith(p, [2]uint32{unix.EPOLLIN, unix.EPOLLIN})
}

// addWith is add with the initial epoll interest of each socket.
func (l *eventLoop) addWith(p *pair, interest [2]uint32) error {
	p.loop = l
	l.mu.Lock()
	l.nextID++
	p.id = l.nextID
	l.mu.Unlock()
	p.interest = interest
	for i, fd := range p.fds {
		ev := unix.EpollEvent{Events: p.interest[i], Fd: int32(fd), Pad: int32(p.id)}
		if err := rawEpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			p.closed = true
			for _, fd := range p.fds {
				_ = rawEpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
				_ = rawClose(fd)
			}
			err = fmt.Errorf("epoll_ctl add: %w", err)
			p.done(pairStats{toUpstream: p.n[0].Load(), toClient: p.n[1].Load()}, err)
			return err
		}
	}
	l.mu.Lock()
	if p.connecting != nil {
		// The connect timer starts with the pair registered, under the
		// lock the loop takes before it touches the pair: a timer that
		// fires at once finds the pair complete.
		p.connecting.startAttempt(time.Now(), func() { l.wake(p) })
	}
	l.pairs[int32(p.fds[0])] = p
	l.pairs[int32(p.fds[1])] = p
	l.mu.Unlock()
	return nil
}

func (l *eventLoop) run() {
	lastSweep := time.Now()
	sweep := func() {
		lastSweep = time.Now()
		l.sweep()
	}
	l.set.run(make([]unix.EpollEvent, 256), func(events []unix.EpollEvent) {
		l.dispatch(events)
		if time.Since(lastSweep) >= time.Second {
			sweep() // under constant traffic the tick may wait
		}
	}, time.Second, sweep)
}

// dispatch handles one batch of events, in order: the wake-up's (cuts,
// connect timers), and each socket's readiness for the pair it belongs to.
func (l *eventLoop) dispatch(events []unix.EpollEvent) {
	for _, ev := range events {
		if ev.Fd == int32(l.wakefd) {
			l.closeCut()
			continue
		}
		l.mu.Lock()
		p := l.pairs[ev.Fd]
		l.mu.Unlock()
		if p == nil || p.closed || uint32(ev.Pad) != p.id {
			continue // a stale event, or a pair not fully registered yet
		}
		l.serve(p, ev.Fd, ev.Events)
	}
}

// sweep closes pairs where nothing moved for their idle timeout.
func (l *eventLoop) sweep() {
	now := time.Now().UnixNano()
	var idle []*pair
	l.mu.Lock()
	for fd, p := range l.pairs {
		if int(fd) == p.fds[0] && now-p.lastActive.Load() >= int64(p.idle) {
			idle = append(idle, p)
		}
	}
	l.mu.Unlock()
	for _, p := range idle {
		l.close(p, errIdle)
	}
}

// pair is one relayed connection: side 0 is the client, side 1 the upstream.
// Its fds are the only descriptors of their sockets (the hand-over closes
// Go's originals), so closing one also takes it out of the epoll set.
type pair struct {
	loop       *eventLoop
	id         uint32
	fds        [2]int
	pend       [2][]byte        // bytes waiting to be written to fds[i]
	pendBuf    [2]*[]byte       // the borrowed buffer behind pend[i]
	eof        [2]bool          // reading fds[i] has returned EOF
	interest   [2]uint32        // epoll interest registered for fds[i]
	n          [2]*atomic.Int64 // bytes read from fds[i] (readable from other goroutines)
	counters   [2]prometheus.Counter
	idle       time.Duration
	lastActive atomic.Int64
	done       func(pairStats, error)
	closed     bool          // loop goroutine only
	connecting *connectState // the upstream's connect, while in progress (see offloadConnect)
	splice     bool          // move bytes with splice(2) (WAPROXY_RELAY=splice when the pair was made)
	pipe       [2]kpipe      // with splice: the pipe holding pipeLen[i] bytes for fds[i]
	pipeLen    [2]int
	cut        atomic.Bool // requestCut was called
}

func (p *pair) touch() { p.lastActive.Store(time.Now().UnixNano()) }

// serve handles the readiness of one socket of p.
func (l *eventLoop) serve(p *pair, fd int32, events uint32) {
	s := 0
	if int(fd) == p.fds[1] {
		s = 1
	}
	if s == 1 && p.connecting != nil {
		l.connected(p, events)
		return
	}
	acted := false
	if events&unix.EPOLLOUT != 0 && p.pend[s] != nil {
		acted = true
		if !l.flush(p, s) {
			return
		}
	}
	if events&unix.EPOLLOUT != 0 && p.pipeLen[s] > 0 {
		acted = true
		if !l.flushPipe(p, s) {
			return
		}
	}
	if events&(unix.EPOLLIN|unix.EPOLLHUP|unix.EPOLLERR) != 0 && p.interest[s]&unix.EPOLLIN != 0 {
		acted = true
		if !l.read(p, s) {
			return
		}
	}
	if events&unix.EPOLLERR != 0 && !p.closed {
		l.close(p, sockError(p.fds[s]))
		return
	}
	if !acted && events&unix.EPOLLHUP != 0 && !p.closed && !p.readPaused(s) {
		// both halves of this socket are shut and nothing is left to do
		// on it. While its reading is paused, bytes may still wait in
		// its receive queue: they are read, and its EOF, once the other
		// side has drained (see wantInterest).
		l.close(p, nil)
	}
}

// read moves one chunk from fds[s] to the other side. It returns false when
// the pair was closed.
func (l *eventLoop) read(p *pair, s int) bool {
	if p.splice {
		_, alive := l.spliceChunk(p, s)
		return alive
	}
	d := 1 - s
	bp := relayBufs.Get().(*[]byte)
	n, err := readFD(p.fds[s], *bp)
	switch {
	case err == unix.EAGAIN:
		relayBufs.Put(bp)
		return true
	case err != nil:
		relayBufs.Put(bp)
		l.close(p, err)
		return false
	case n == 0:
		relayBufs.Put(bp)
		return l.ended(p, s)
	}
	p.moved(s, n)
	w, err := writeFD(p.fds[d], (*bp)[:n])
	if err != nil && err != unix.EAGAIN {
		relayBufs.Put(bp)
		l.close(p, err)
		return false
	}
	if w == n {
		relayBufs.Put(bp)
		return true
	}
	// the destination is full: keep the rest, stop reading until it drains
	p.pend[d], p.pendBuf[d] = (*bp)[max(w, 0):n], bp
	return l.updateInterest(p)
}

// ended passes an EOF read from fds[s] on to the other side (half-close),
// and closes the pair once both sides have ended. It returns false when the
// pair was closed.
func (l *eventLoop) ended(p *pair, s int) bool {
	p.eof[s] = true
	if p.eof[1-s] {
		// Both sides have said all they had and nothing is left unread
		// or unwritten: close sends the other side its FIN as shutdown
		// would.
		l.close(p, nil)
		return false
	}
	_ = rawShutdownWrite(p.fds[1-s])
	return l.updateInterest(p)
}

// moved counts n bytes read from fds[s].
func (p *pair) moved(s, n int) {
	p.touch()
	p.n[s].Add(int64(n))
	p.counters[s].Add(float64(n))
}

// flush writes pending bytes to fds[d]. It returns false when the pair was closed.
func (l *eventLoop) flush(p *pair, d int) bool {
	w, err := writeFD(p.fds[d], p.pend[d])
	if err != nil && err != unix.EAGAIN {
		l.close(p, err)
		return false
	}
	p.touch()
	if !p.wrote(d, w) {
		return true
	}
	return l.updateInterest(p)
}

// wrote takes the w bytes written to fds[d] (w < 0: none) off its pending
// bytes, and gives the buffer back once they are all out, which it reports.
func (p *pair) wrote(d, w int) (drained bool) {
	p.pend[d] = p.pend[d][max(w, 0):]
	if len(p.pend[d]) > 0 {
		return false
	}
	relayBufs.Put(p.pendBuf[d])
	p.pend[d], p.pendBuf[d] = nil, nil
	return true
}

// wantInterest is, for each socket, EPOLLIN while its bytes have somewhere
// to go and EPOLLOUT while bytes wait to be written to it. A socket whose
// reading is paused (readPaused) and that has nothing to write gets
// EPOLLONESHOT alone: epoll reports EPOLLHUP (both halves shut: the peer's
// FIN after our shutdown) whatever the interest, and would report it again
// on every wait; one-shot reports it once, and the change to EPOLLIN when
// the other side has drained arms the socket again, so the bytes still in
// its receive queue are read then.
func (p *pair) wantInterest() [2]uint32 {
	var want [2]uint32
	for i := range 2 {
		switch {
		case !p.eof[i] && p.pend[1-i] == nil && p.pipeLen[1-i] == 0:
			want[i] |= unix.EPOLLIN
		case p.readPaused(i) && p.pend[i] == nil && p.pipeLen[i] == 0:
			want[i] |= unix.EPOLLONESHOT
		}
		if p.pend[i] != nil || p.pipeLen[i] > 0 {
			want[i] |= unix.EPOLLOUT
		}
	}
	return want
}

// readPaused reports whether fds[i] has not ended but is not read while
// bytes read from it wait to be written to the other side.
func (p *pair) readPaused(i int) bool {
	return !p.eof[i] && (p.pend[1-i] != nil || p.pipeLen[1-i] > 0)
}

// updateInterest registers wantInterest with the loop's epoll set.
func (l *eventLoop) updateInterest(p *pair) bool {
	wants := p.wantInterest()
	for i := range 2 {
		want := wants[i]
		if want == p.interest[i] {
			continue
		}
		ev := unix.EpollEvent{Events: want, Fd: int32(p.fds[i]), Pad: int32(p.id)}
		if err := rawEpollCtl(l.epfd, unix.EPOLL_CTL_MOD, p.fds[i], &ev); err != nil {
			l.close(p, fmt.Errorf("epoll_ctl mod: %w", err))
			return false
		}
		p.interest[i] = want
	}
	return true
}

// close ends the pair once: it unregisters and closes both sockets, returns
// pending buffers, and reports to done.
func (l *eventLoop) close(p *pair, err error) {
	if p.closed {
		return
	}
	p.closed = true
	l.mu.Lock()
	for _, fd := range p.fds {
		if fd >= 0 && l.pairs[int32(fd)] == p {
			delete(l.pairs, int32(fd))
		}
	}
	l.mu.Unlock()
	if p.connecting != nil && p.connecting.timer != nil {
		p.connecting.timer.Stop()
	}
	for i, fd := range p.fds {
		if fd >= 0 {
			_ = rawClose(fd) // the last descriptor: the epoll set lets go of it too
		}
		if p.pendBuf[i] != nil {
			relayBufs.Put(p.pendBuf[i])
			p.pend[i], p.pendBuf[i] = nil, nil
		}
		if p.pipeLen[i] > 0 {
			p.pipe[i].close()
			p.pipeLen[i] = 0
		}
	}
	if p.done != nil {
		p.done(pairStats{toUpstream: p.n[0].Load(), toClient: p.n[1].Load()}, err)
	}
}

func readFD(fd int, b []byte) (int, error) {
	for {
		n, err := rawRead(fd, b)
		if err != unix.EINTR {
			return n, err
		}
	}
}

func writeFD(fd int, b []byte) (int, error) {
	for {
		n, err := rawWrite(fd, b)
		if err != unix.EINTR {
			return n, err
		}
	}
}

// sockError returns the pending error of a socket (SO_ERROR).
func sockError(fd int) error {
	v, err := rawSoError(fd)
	if err != nil {
		return err
	}
	if v == 0 {
		return errors.New("socket error")
	}
	return unix.Errno(v)
}

// TLS-terminated connections cannot go to the event loop: crypto/tls must
// read and write them. They get the next best thing: an idle one has no
// goroutine and no buffer. A waker (one epoll set and one goroutine, apart
// from the event loops) watches both sockets of the pair and, when one is
// readable, starts a goroutine that moves what came and ends; its socket is
// watched again after that (one-shot, so one goroutine per direction at
// most). The connection's state stays in crypto/tls, and caddy-l4's handler
// goroutine returns, as with the event loop.

type waker struct {
	set     *epollSet
	epfd    int
	mu      sync.Mutex
	next    uint64
	watches map[uint64]*watch
}

// watch is one socket registered with the waker; f runs in a new goroutine
// each time the socket becomes readable (or ends, or fails) while armed.
// The epoll calls go through the connection's RawConn, so they never touch a
// closed socket's number that a newer connection may have reused.
type watch struct {
	w    *waker
	id   uint64
	sock syscall.RawConn
	f    func()
}

// ctl runs epoll_ctl for the watch's socket.
func (wt *watch) ctl(op int, ev *unix.EpollEvent) error {
	var err error
	if cerr := wt.sock.Control(func(fd uintptr) { err = unix.EpollCtl(wt.w.epfd, op, int(fd), ev) }); cerr != nil {
		return cerr
	}
	return err
}

var (
	wakerOnce sync.Once
	theWaker  *waker
	wakerErr  error
)

// watchedSockets is how many sockets the waker watches (for tests); -1
// without a waker.
func watchedSockets() int {
	w, err := startWaker()
	if err != nil {
		return -1
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.watches)
}

func startWaker() (*waker, error) {
	wakerOnce.Do(func() {
		set, err := newEpollSet()
		if err != nil {
			wakerErr = err
			return
		}
		theWaker = &waker{set: set, epfd: set.fd, watches: make(map[uint64]*watch)}
		go theWaker.run()
	})
	return theWaker, wakerErr
}

const watchEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

// epollEvent carries a watch's id in the event's data (Fd and Pad), so an
// event still queued for a removed watch finds nothing.
func (wt *watch) epollEvent() *unix.EpollEvent {
	return &unix.EpollEvent{Events: watchEvents, Fd: int32(uint32(wt.id)), Pad: int32(uint32(wt.id >> 32))}
}

// add registers wt (its sock and f set), armed. Stop it before closing the
// socket.
func (w *waker) add(wt *watch) error {
	w.mu.Lock()
	w.next++
	wt.w, wt.id = w, w.next
	w.watches[wt.id] = wt
	w.mu.Unlock()
	if err := wt.ctl(unix.EPOLL_CTL_ADD, wt.epollEvent()); err != nil {
		w.mu.Lock()
		delete(w.watches, wt.id)
		w.mu.Unlock()
		return fmt.Errorf("epoll_ctl add: %w", err)
	}
	return nil
}

// arm watches the socket again after f ran.
func (wt *watch) arm() error {
	if err := wt.ctl(unix.EPOLL_CTL_MOD, wt.epollEvent()); err != nil {
		return fmt.Errorf("epoll_ctl mod: %w", err)
	}
	return nil
}

// stop ends the watch; call it before closing the socket.
func (wt *watch) stop() {
	if wt.w == nil {
		return // never added
	}
	_ = wt.ctl(unix.EPOLL_CTL_DEL, nil)
	wt.w.mu.Lock()
	delete(wt.w.watches, wt.id)
	wt.w.mu.Unlock()
}

func (w *waker) run() {
	w.set.run(make([]unix.EpollEvent, 256), func(events []unix.EpollEvent) {
		for _, ev := range events {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			w.mu.Lock()
			wt := w.watches[id]
			w.mu.Unlock()
			if wt != nil {
				go wt.f()
			}
		}
	}, 0, nil)
}

// tlsPair is a TLS-terminated client and a plain upstream relayed on
// wake-ups.
type tlsPair struct {
	r         relay
	tc        *tls.Conn
	up        *net.TCPConn
	upRaw     syscall.RawConn
	clientRaw syscall.RawConn // the duplicate of the client's socket
	orig      *net.TCPConn    // the client's socket as caddy-l4 holds it, see handedOff
	watches   [2]*watch       // the client's and the upstream's sockets
	counters  [2]prometheus.Counter
	timer     *time.Timer
	dirs      atomic.Int32 // directions that ended with EOF
	cut       atomic.Bool
	ended     atomic.Bool // finish ran
	once      sync.Once
	done      func(pairStats, error)

	handoff sync.Once
}

// offloadTLS relays a TLS-terminated client (crypto/tls over caddy-l4's
// Connection over a TCP socket) and a plain TCP upstream on wake-ups, so an
// idle pair holds no goroutine and no buffer. Like offloadCuttable it takes
// over both connections and returns at once: the client's socket is
// duplicated into a connection of the relay's own (caddy-l4 closes the
// original when the handler returns) and caddy-l4's Connection under the
// tls.Conn is pointed at the duplicate; the upstream connection is used as
// it is (carry owns it: its callers never close it after handing it over). done runs once when the
// pair ends (nil when both directions ended with EOF, errIdle, errCut or the
// first failure); cut ends the pair from any goroutine. ok is false, with
// nothing changed, when the connections are not of that shape.
func offloadTLS(client, upstream net.Conn, idle time.Duration, n [2]*atomic.Int64, fromClient, fromUpstream prometheus.Counter,
	done func(pairStats, error)) (cut func(), ok bool) {
	if !loopEnabled() {
		return nil, false
	}
	tc, ok1 := client.(*tls.Conn)
	uc, ok2 := upstream.(*net.TCPConn)
	if !ok1 || !ok2 {
		return nil, false
	}
	cx, ok1 := tc.NetConn().(*layer4.Connection)
	if !ok1 {
		return nil, false
	}
	orig, ok1 := cx.Conn.(*net.TCPConn)
	if !ok1 {
		return nil, false
	}
	w, err := startWaker()
	if err != nil {
		return nil, false
	}
	p := &tlsPair{tc: tc, orig: orig, counters: [2]prometheus.Counter{fromClient, fromUpstream}, done: done}
	p.r = relay{idle: idle, up: n[0], down: n[1]}
	// crypto/tls may hold bytes read with the handshake: move them now,
	// while this goroutine still owns the connection.
	eof, err := p.r.readTLS(uc, tc, nil, false, n[0], fromClient)
	if err != nil || eof {
		return nil, false // the goroutine relay sees the same at once
	}
	cdup, err := adoptTCP(orig)
	if err != nil {
		return nil, false
	}
	// The upstream is the relay's already (carry's callers leave it to
	// carry): no copy needed, unlike the client's socket, which caddy-l4
	// closes when the handler returns.
	p.up = uc
	craw, err1 := cdup.SyscallConn()
	uraw, err2 := uc.SyscallConn()
	if err1 != nil || err2 != nil {
		_ = cdup.Close()
		return nil, false
	}
	p.upRaw, p.clientRaw = uraw, craw
	cx.Conn = cdup // crypto/tls now reads and writes the duplicate
	// Nothing reads the connection's context any more (its replacer and
	// variables, the ClientHello): let the garbage collector have it while
	// the connection lives on.
	cx.Context = context.Background()
	p.r.touch()
	p.watches = [2]*watch{{sock: craw, f: p.clientReadable}, {sock: uraw, f: p.upstreamReadable}}
	p.timer = time.AfterFunc(time.Duration(math.MaxInt64), p.idleCheck)
	p.timer.Reset(idle) // after p.timer is set: idleCheck reads it
	for _, wt := range p.watches {
		if err := w.add(wt); err != nil {
			p.handoff.Do(func() {}) // still this goroutine's: no wait for caddy-l4
			p.finish(err)
			break
		}
	}
	return p.requestCut, true
}

// adoptTCP returns a new connection on a duplicate of c's socket, which
// stays open when c is closed. net.FileConn turns TCP keep-alive on, as Go
// does for every TCP connection it makes; adoptTCP turns it off again, as
// the socket was (carry turned it off: see clientKeepAlive).
func adoptTCP(c *net.TCPConn) (*net.TCPConn, error) {
	fd, err := dupFD(c)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "")
	nc, err := net.FileConn(f) // dups again
	_ = f.Close()
	if err != nil {
		return nil, err
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		_ = nc.Close()
		return nil, errors.New("not a TCP connection")
	}
	_ = tc.SetKeepAlive(false)
	return tc, nil
}

// handedOff waits until caddy-l4 is done with the connection before this
// goroutine touches the tls.Conn: caddy-l4's handler goroutine reads its
// Connection's byte counts (which crypto/tls's reads and writes through it
// update) after the handler returns, and then closes the original socket.
// Seeing that socket closed orders those reads before ours. The wait is
// short (the handler returns right after offloadTLS) and bounded, should a
// caddy-l4 version not close it.
func (p *tlsPair) handedOff() {
	p.handoff.Do(func() {
		raw, err := p.orig.SyscallConn()
		if err != nil {
			return
		}
		for i := range 20000 {
			if raw.Control(func(uintptr) {}) != nil {
				return // closed
			}
			if i < 100 {
				runtime.Gosched() // the handler's goroutine is about to return
			} else {
				time.Sleep(50 * time.Microsecond)
			}
		}
	})
}

// clientReadable moves what the client sent (all crypto/tls has, see
// readTLS) to the upstream.
func (p *tlsPair) clientReadable() {
	p.handedOff()
	eof, err := p.r.readTLS(p.up, p.tc, p.clientRaw, true, p.r.up, p.counters[0])
	switch {
	case err != nil:
		p.finish(err)
	case eof:
		closeWrite(p.up)
		p.dirDone()
	default:
		if err := p.watches[0].arm(); err != nil {
			p.finish(err)
		}
	}
}

// upstreamReadable moves what the upstream sent to the client, until the
// socket has nothing more.
func (p *tlsPair) upstreamReadable() {
	p.handedOff()
	for {
		bp := borrowGeneric()
		var (
			n    int
			rerr error
		)
		err := p.upRaw.Read(func(fd uintptr) bool {
			for {
				n, rerr = syscall.Read(int(fd), *bp)
				if rerr != syscall.EINTR {
					return true // no waiting: the waker does that
				}
			}
		})
		if err == nil {
			err = rerr
		}
		switch {
		case err == syscall.EAGAIN:
			returnGeneric(bp)
			if err := p.watches[1].arm(); err != nil {
				p.finish(err)
			}
			return
		case err != nil:
			returnGeneric(bp)
			p.finish(err)
			return
		case n <= 0: // EOF
			returnGeneric(bp)
			closeWrite(p.tc)
			p.dirDone()
			return
		}
		werr := p.r.forward(p.tc, (*bp)[:n], p.r.down, p.counters[1])
		returnGeneric(bp)
		if werr != nil {
			p.finish(werr)
			return
		}
	}
}

func (p *tlsPair) dirDone() {
	if p.dirs.Add(1) == 2 {
		p.finish(nil)
	}
}

// idleCheck runs when the idle timeout may have passed.
func (p *tlsPair) idleCheck() {
	if p.ended.Load() {
		return
	}
	if rest := p.r.idle - time.Since(time.Unix(0, p.r.lastActive.Load())); rest > 0 {
		p.timer.Reset(rest)
		return
	}
	p.finish(errIdle)
}

// requestCut ends the pair with errCut. It does not wait: finish may wait
// for caddy-l4 to let go of the connection (handedOff), and a cut that came
// before the relay took over runs on the handler's goroutine (ReplaceCut).
func (p *tlsPair) requestCut() {
	p.cut.Store(true)
	go p.finish(errCut)
}

// finish ends the pair once: it stops watching and closes both connections,
// which ends a wake-up goroutine still reading or writing, and reports to
// done.
func (p *tlsPair) finish(err error) {
	p.once.Do(func() {
		p.ended.Store(true)
		if p.cut.Load() {
			err = errCut
		}
		if p.timer != nil {
			p.timer.Stop()
		}
		for _, wt := range p.watches {
			if wt != nil {
				wt.stop()
			}
		}
		p.handedOff()
		_ = p.up.Close()
		_ = p.tc.Close()
		p.done(pairStats{toUpstream: p.r.up.Load(), toClient: p.r.down.Load()}, err)
	})
}
