//go:build linux

package handlers

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

// Connecting from the loop: for a plain client and a dialer that only
// resolves (wa.dialers.direct, see upstreams.Resolver), wa_proxy does not
// dial with Go's net package and then hand both sockets over. It starts a
// non-blocking connect(2) itself and hands the client's socket and the
// connecting one to the event loop with the first bytes (PROXY header and
// the bytes the matchers read) pending for the upstream; the loop writes
// them when the socket becomes writable, which is when the connect
// completed. That saves, per connection, registering and unregistering the
// upstream socket with Go's poller, parking caddy-l4's goroutine until the
// connect completes, duplicating the socket, Go's connection objects, and
// four setsockopt calls for TCP keep-alive (the relay's idle timeout ends a
// dead connection; the official proxy sets no keep-alive either).

// connectState is a pair's connect in progress (loop goroutine only, once
// the pair is added).
type connectState struct {
	address   string           // the destination as configured, for messages
	current   netip.AddrPort   // the address being connected to
	addrs     []netip.AddrPort // what is left to try after the current one
	firstErr  error            // the first address's failure, reported if all fail
	firstKind string           // its errors_total kind
	fromFirst int              // the client's bytes among the pending first bytes
	deadline  time.Time
	attemptBy time.Time   // the current address's share of the time
	timer     *time.Timer // made by the first startAttempt
	early     error       // the failure connectedAtOnce's write found (it took the socket's error)
}

// startAttempt gives the address just tried its upstreams.AttemptShare of
// the time left. The timer calls expired when the share has passed.
func (cs *connectState) startAttempt(now time.Time, expired func()) {
	share := upstreams.AttemptShare(cs.deadline.Sub(now), 1+len(cs.addrs))
	cs.attemptBy = now.Add(share)
	if cs.timer == nil {
		cs.timer = time.AfterFunc(share, expired)
		return
	}
	cs.timer.Reset(share)
}

// startConnect creates a non-blocking socket and connects it to the first
// address that does not fail at once. It returns the socket, that address
// and the addresses not tried yet, or the first failure when every address
// failed.
func startConnect(addrs []netip.AddrPort) (fd int, current netip.AddrPort, rest []netip.AddrPort, err error) {
	var first error
	for i, ap := range addrs {
		fd, err := connectTo(ap)
		if err == nil {
			return fd, ap, addrs[i+1:], nil
		}
		if first == nil {
			first = err
		}
	}
	if first == nil {
		first = errors.New("no address to connect to")
	}
	return -1, netip.AddrPort{}, nil, first
}

func connectTo(ap netip.AddrPort) (int, error) {
	family, scope := unix.AF_INET, uint32(0)
	if !ap.Addr().Is4() {
		family = unix.AF_INET6
		if z := ap.Addr().Zone(); z != "" {
			if ifi, err := net.InterfaceByName(z); err == nil {
				scope = uint32(ifi.Index)
			}
		}
	}
	fd, err := rawSocket(family)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	// as Go's net package: small writes (chat frames) go out at once
	_ = rawSetNoDelay(fd)
	for {
		err = rawConnect(fd, ap, scope)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil && err != unix.EINPROGRESS {
		_ = rawClose(fd)
		return -1, fmt.Errorf("connect: %w", err)
	}
	return fd, nil
}

// connectsInLoop reports whether offloadConnect can take client (a plain
// TCP socket, with the event loop in use).
func connectsInLoop(client net.Conn) bool {
	_, ok := client.(*net.TCPConn)
	return ok && loopEnabled()
}

// offloadConnect connects to addrs (in order, until one succeeds, within
// timeout) from an event loop and relays client with it there. first holds
// the bytes to send upstream before anything else; fromClient of them are
// the client's (counted when they go out). done runs once when the pair
// ends: with a *upstreams.DialError (kind dial or timeout) when no address
// could be connected to, else as for offloadCuttable. ok is false, with
// nothing changed, when connectsInLoop(client) is false, first does not fit
// a relay buffer, or the loop is unavailable: the caller then dials. err is
// the failure when every address failed at once (nothing changed either).
func offloadConnect(client net.Conn, address string, addrs []netip.AddrPort, first [][]byte, fromClient int,
	timeout, idle time.Duration, n [2]*atomic.Int64, counters [2]prometheus.Counter,
	done func(pairStats, error)) (cut func(), ok bool, err error) {
	cc, isTCP := client.(*net.TCPConn)
	size := 0
	for _, b := range first {
		size += len(b)
	}
	if !isTCP || !loopEnabled() || size > relayBufSize || len(addrs) == 0 {
		return nil, false, nil
	}
	ls, lerr := startLoops()
	if lerr != nil || len(ls) == 0 {
		return nil, false, nil
	}
	cfd, derr := dupFD(cc)
	if derr != nil {
		return nil, false, nil
	}
	ufd, current, rest, cerr := startConnect(addrs)
	if cerr != nil {
		unix.Close(cfd)
		return nil, false, &upstreams.DialError{Kind: metrics.KindDial, Err: fmt.Errorf("dial %s: %w", address, cerr)}
	}
	p := newPair(cfd, ufd, idle, n, counters, done)
	p.connecting = &connectState{address: address, current: current, addrs: rest, fromFirst: fromClient, deadline: time.Now().Add(timeout)}
	if size > 0 {
		bp := relayBufs.Get().(*[]byte)
		k := 0
		for _, b := range first {
			k += copy((*bp)[k:], b)
		}
		p.pend[1], p.pendBuf[1] = (*bp)[:k], bp
	}
	_ = client.Close() // the duplicate is the socket's only descriptor now (see pair)
	l := ls[loopNext.Add(1)%uint32(len(ls))]
	if p.pend[1] != nil && connectedAtOnce(p) {
		// The loop relays it from the start, as a pair it would have
		// connected itself.
		_ = l.addWith(p, p.wantInterest())
		return p.requestCut, true, nil
	}
	// The upstream is watched for writable (connected) even with nothing
	// to send; the client is not read until the upstream is connected.
	// addWith starts the connect timer; from then on the pair is the
	// loop's (if the add fails, the pair is closed and done has run).
	_ = l.addWith(p, [2]uint32{0, unix.EPOLLOUT})
	return p.requestCut, true, nil
}

// connectedAtOnce writes p's first bytes right after the connect was
// started, before the pair goes to a loop (the handler's goroutine still
// owns it). On loopback, and wherever the handshake completes within
// connect(2) itself, the socket is already connected: the bytes go out now
// instead of after a wake-up of the loop, and the upstream is registered
// for reading at once rather than for writable and then switched. A socket
// still connecting answers EAGAIN (one system call spent). A failed
// connect is left for the loop to find, as without this; the write took
// the socket's error (SO_ERROR reads 0 afterwards), so it is kept in
// p.connecting.early for the loop's message. It returns whether the connect
// has completed, with p then set up as connected.
func connectedAtOnce(p *pair) bool {
	w, err := writeFD(p.fds[1], p.pend[1])
	if err != nil || w <= 0 {
		if err != nil && err != unix.EAGAIN {
			p.connecting.early = err // reading it cleared SO_ERROR: connected reports it
		}
		return false
	}
	p.connectDone()
	p.wrote(1, w)
	return true
}

// connectDone ends p's connecting phase once its upstream is connected:
// the address goes back to its place in Resolve's order, and the client's
// first bytes count as relayed.
func (p *pair) connectDone() {
	cs := p.connecting
	p.connecting = nil
	if cs.timer != nil {
		cs.timer.Stop()
	}
	upstreams.NoteConnected(cs.current)
	if cs.fromFirst > 0 {
		p.n[0].Add(int64(cs.fromFirst))
		p.counters[0].Add(float64(cs.fromFirst))
	}
}

// connected is called for an event on the upstream socket of a pair still
// connecting. It returns true when the connect completed (the pair goes on
// as any other), false when it failed and the next address is being tried,
// or the pair was closed.
func (l *eventLoop) connected(p *pair, events uint32) bool {
	cs := p.connecting
	failed := events&(unix.EPOLLERR|unix.EPOLLHUP) != 0
	if !failed && events&unix.EPOLLOUT == 0 {
		return false // not yet
	}
	// Writable with no error or hang-up is connected: a connect that
	// failed is reported with EPOLLERR (its SO_ERROR set), so SO_ERROR is
	// read only then, for the error's name (one system call less per
	// connection; HAProxy does not read it either).
	if !failed {
		p.connectDone()
		p.touch()
		if p.pend[1] != nil {
			return l.flush(p, 1) // the first bytes; flush sets both sides' interest
		}
		return l.updateInterest(p)
	}
	soErr, err := rawSoError(p.fds[1])
	switch {
	case err == nil && soErr != 0:
		err = unix.Errno(soErr)
	case err == nil && cs.early != nil:
		err = cs.early
	case err == nil:
		err = errors.New("connection failed")
	}
	cs.early = nil
	l.retryConnect(p, metrics.KindDial, fmt.Errorf("connect: %w", err))
	return false
}

// retryConnect replaces the failed upstream socket with a connect to the
// next address, or ends the pair with a dial error when none is left.
func (l *eventLoop) retryConnect(p *pair, kind string, cause error) {
	cs := p.connecting
	if cs.firstErr == nil {
		cs.firstErr, cs.firstKind = cause, kind
	}
	if kind == metrics.KindTimeout {
		upstreams.NoteTimeout(cs.current) // the next connections try it last
	}
	old := p.fds[1]
	l.mu.Lock()
	delete(l.pairs, int32(old))
	l.mu.Unlock()
	now := time.Now()
	fd, current, rest := -1, netip.AddrPort{}, []netip.AddrPort(nil)
	if now.Before(cs.deadline) {
		// The next socket is made while the old one is still open, so it
		// cannot get the old one's number: an event of the old socket
		// later in this batch (its connect completing as its time ran out)
		// finds no pair under that number, instead of passing for the new
		// socket's (the pair keeps its id).
		fd, current, rest, _ = startConnect(cs.addrs) // fd < 0 when every address failed at once
	}
	_ = rawClose(old) // the last descriptor (see pair): out of the epoll set too
	p.fds[1] = -1
	if fd < 0 {
		l.failConnect(p, cs.firstKind, cs.firstErr) // out of time, or every address failed at once
		return
	}
	cs.current, cs.addrs = current, rest
	cs.startAttempt(now, nil) // the timer exists: it keeps its function
	p.fds[1] = fd
	ev := unix.EpollEvent{Events: unix.EPOLLOUT, Fd: int32(fd), Pad: int32(p.id)}
	if err := rawEpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		l.failConnect(p, metrics.KindDial, fmt.Errorf("epoll_ctl add: %w", err))
		return
	}
	p.interest[1] = unix.EPOLLOUT
	l.mu.Lock()
	l.pairs[int32(fd)] = p
	l.mu.Unlock()
}

// failConnect ends a pair whose connect failed.
func (l *eventLoop) failConnect(p *pair, kind string, cause error) {
	cs := p.connecting
	l.close(p, &upstreams.DialError{Kind: kind, Err: fmt.Errorf("dial %s: %w", cs.address, cause)})
}

// connectTimedOut moves p, if it is still connecting and its address's
// time is up, on to the next address, or ends it (loop goroutine).
func (l *eventLoop) connectTimedOut(p *pair) {
	if p.closed || p.connecting == nil || time.Now().Before(p.connecting.attemptBy) {
		return // connected, ended, or a timer of an earlier address
	}
	l.retryConnect(p, metrics.KindTimeout, errors.New("i/o timeout"))
}
