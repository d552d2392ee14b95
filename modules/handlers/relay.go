package handlers

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// relayBufSize is the size of the buffers that relays borrow while bytes are
// in flight. An idle connection holds none: buffers come from a pool when a
// socket is readable and go back as soon as the chunk is written.
const relayBufSize = 32 * 1024

var relayBufs = sync.Pool{New: func() any { b := make([]byte, relayBufSize); return &b }}

// genericBufSize is the size of the buffers for wrapped connections: the
// TLS copy loops borrow one while bytes are in flight, the blocking copy loop
// (other wrappers) holds one per direction for the connection's whole life.
// A TLS read returns at most one record (16 KiB of plaintext), so a larger
// buffer would only sit idle.
const genericBufSize = 16 * 1024

var genericBufs = sync.Pool{New: func() any { b := make([]byte, genericBufSize); return &b }}

// genericBorrowed, set by the tests only, counts the genericBufs buffers
// the relays hold right now, so they can check that an idle TLS relay holds
// none. Nil in the proxy: no shared counter on the per-chunk path.
var genericBorrowed *atomic.Int64

func borrowGeneric() *[]byte {
	if genericBorrowed != nil {
		genericBorrowed.Add(1)
	}
	return genericBufs.Get().(*[]byte)
}

func returnGeneric(bp *[]byte) {
	genericBufs.Put(bp)
	if genericBorrowed != nil {
		genericBorrowed.Add(-1)
	}
}

// relayMode selects how established connections are relayed. Empty (the
// default) uses the event loop for plain TCP pairs where the platform has
// one, moving bytes with read and write; WAPROXY_RELAY=splice uses the event
// loop with splice(2) instead (Linux: less CPU per byte, see
// splice_linux.go); WAPROXY_RELAY=goroutine (or any other value) forces the
// goroutine relay everywhere, as a debugging escape hatch and so the tests
// can exercise every path.
var relayMode = os.Getenv("WAPROXY_RELAY")

// loopEnabled reports whether the event loop (and the TLS wake-ups) may
// take connections.
func loopEnabled() bool { return relayMode == "" || relayMode == "splice" }

// errIdle reports that nothing moved in either direction for the idle timeout.
var errIdle = errors.New("idle timeout")

// errCut reports a connection ended from outside: a graceful shutdown cut it
// at the end of its grace period (registry.CutAll). It matches net.ErrClosed,
// so code that checks for a closed connection treats it as one; logEnd logs
// it at Info as "<what> cut at shutdown", not as a relay failure; the
// shutdown counts it (errors_total{kind="shutdown_cut"}).
var errCut error = cutError{}

type cutError struct{}

func (cutError) Error() string        { return "cut at shutdown" }
func (cutError) Is(target error) bool { return target == net.ErrClosed }

// relay carries bytes both ways between a client and an upstream until both
// directions have ended, honouring half-close: when one side finishes sending
// (EOF), the other side's write half is shut down and the opposite direction
// keeps flowing. A read or write error in either direction, or idle_timeout
// without a byte in either direction, closes both connections.
type relay struct {
	idle       time.Duration
	lastActive atomic.Int64 // unix nanoseconds of the last chunk moved, either way

	// byte counts, readable while the relay runs (the connection registry's
	// counters: read from the client, read from the upstream)
	up, down *atomic.Int64
}

// run relays between client (read from clientR, written to clientW; the
// same raw connection unless a wrapper sits between) and upstream. On any
// failure it closes both at once, so the other direction stops too; the
// caller closes everything after run returns. The error is the first failure
// (errIdle for the idle timeout), or nil when both directions ended with EOF.
func (r *relay) run(clientR, clientW, upstream net.Conn, sent, received prometheus.Counter) error {
	r.touch()
	var (
		once     sync.Once
		firstErr error
	)
	fail := func(err error) {
		once.Do(func() {
			firstErr = err
			_ = upstream.Close()
			_ = clientR.Close()
			_ = clientW.Close()
		})
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := r.pipe(clientW, upstream, r.down, sent); err != nil {
			fail(err)
		}
	}()
	if err := r.pipe(upstream, clientR, r.up, received); err != nil {
		fail(err)
	}
	<-done
	once.Do(func() {}) // no failure: firstErr stays nil
	return firstErr
}

func (r *relay) touch() { r.lastActive.Store(time.Now().UnixNano()) }

// pipe copies src to dst until src ends. On EOF it shuts down dst's write half
// and returns nil.
func (r *relay) pipe(dst, src net.Conn, total *atomic.Int64, counter prometheus.Counter) error {
	var err error
	switch s := src.(type) {
	case *net.TCPConn:
		err = r.pipeTCP(dst, s, total, counter)
	case *tls.Conn:
		err = r.pipeTLS(dst, s, total, counter)
	default:
		err = r.pipeGeneric(dst, src, total, counter)
	}
	if err == nil {
		closeWrite(dst)
	}
	return err
}

// pipeTCP waits for src to be readable through Go's netpoller without holding
// a buffer, then borrows one for a single non-blocking read and the write.
func (r *relay) pipeTCP(dst net.Conn, src *net.TCPConn, total *atomic.Int64, counter prometheus.Counter) error {
	raw, err := src.SyscallConn()
	if err != nil {
		return r.pipeGeneric(dst, src, total, counter)
	}
	for {
		if err := src.SetReadDeadline(time.Now().Add(r.idle)); err != nil {
			return err
		}
		var (
			bp    *[]byte
			n     int
			rerr  error
			ready bool
		)
		err := raw.Read(func(fd uintptr) bool {
			bp = relayBufs.Get().(*[]byte)
			for {
				n, rerr = syscall.Read(int(fd), *bp)
				if rerr != syscall.EINTR {
					break
				}
			}
			if rerr == syscall.EAGAIN {
				relayBufs.Put(bp)
				bp = nil
				return false // not readable yet: wait in the netpoller, holding nothing
			}
			ready = true
			return true
		})
		if err != nil {
			if bp != nil {
				relayBufs.Put(bp)
			}
			if errors.Is(err, os.ErrDeadlineExceeded) && !ready {
				if r.activeWithin() {
					continue
				}
				return errIdle
			}
			return err
		}
		if rerr != nil {
			relayBufs.Put(bp)
			return rerr
		}
		if n <= 0 {
			relayBufs.Put(bp)
			return nil // EOF
		}
		werr := r.forward(dst, (*bp)[:n], total, counter)
		relayBufs.Put(bp)
		if werr != nil {
			return werr
		}
	}
}

// pipeTLS copies from a TLS connection without holding a buffer while it is
// idle: it waits until the TCP socket under src is readable (peeking, so no
// byte is taken from crypto/tls), then borrows a buffer and reads what came.
//
// crypto/tls may keep bytes it has already received: more complete records
// in its raw input (one Read returns one record's data), or the start of the
// next record. Waiting on the socket then could stall with data inside src,
// so after a read that returned data it keeps reading with an expired
// deadline until the read times out, which happens only when src must go to
// the socket for more; crypto/tls does not make a timeout sticky, and keeps
// a partial record for the next read. The same drain runs first, for bytes
// read together with the handshake.
//
// Without a TCP socket under src (say a PROXY-protocol wrapper), it falls
// back to pipeGeneric.
func (r *relay) pipeTLS(dst net.Conn, src *tls.Conn, total *atomic.Int64, counter prometheus.Counter) error {
	sock := tcpUnder(src)
	if sock == nil {
		return r.pipeGeneric(dst, src, total, counter)
	}
	raw, err := sock.SyscallConn()
	if err != nil {
		return r.pipeGeneric(dst, src, total, counter)
	}
	// ready is set by the wait callback on this goroutine only.
	var ready bool
	readable := func(fd uintptr) bool {
		ready = peekReadable(fd)
		return ready
	}
	eof, err := r.readTLS(dst, src, raw, false, total, counter)
	for !eof && err == nil {
		if err := src.SetReadDeadline(time.Now().Add(r.idle)); err != nil {
			return err
		}
		ready = false
		if err := raw.Read(readable); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !ready {
				if r.activeWithin() {
					continue
				}
				return errIdle
			}
			return err
		}
		eof, err = r.readTLS(dst, src, raw, true, total, counter)
	}
	return err
}

// readTLS reads from src into a borrowed buffer and writes each chunk to dst,
// until src has nothing more, neither buffered nor in its socket sock (the
// TCP socket under src, or nil). With wait (the socket is readable) the first
// read may wait, up to the idle timeout, for the rest of a record; then, and
// from the start without wait, it reads with an expired deadline, and when
// that times out it looks at the socket once more. It returns eof when src
// ended cleanly, and nil with eof false when src has nothing more to read.
func (r *relay) readTLS(dst net.Conn, src *tls.Conn, sock syscall.RawConn, wait bool, total *atomic.Int64, counter prometheus.Counter) (eof bool, err error) {
	draining := !wait
	deadline := time.Now()
	if wait {
		deadline = deadline.Add(r.idle)
	}
	if err := src.SetReadDeadline(deadline); err != nil {
		return false, err
	}
	bp := borrowGeneric()
	defer returnGeneric(bp)
	buf := *bp
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if werr := r.forward(dst, buf[:n], total, counter); werr != nil {
				return false, werr
			}
		}
		switch {
		case err == nil:
			if !draining {
				draining = true
				if err := src.SetReadDeadline(time.Now()); err != nil {
					return false, err
				}
			}
		case errors.Is(err, io.EOF):
			return true, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			if draining {
				if sock == nil || !socketReadable(sock) {
					return false, nil // nothing left inside src: wait on the socket
				}
				// more came meanwhile: read on (saves a wait)
				draining = false
				if err := src.SetReadDeadline(time.Now().Add(r.idle)); err != nil {
					return false, err
				}
				continue
			}
			if !r.activeWithin() {
				return false, errIdle
			}
			if err := src.SetReadDeadline(time.Now().Add(r.idle)); err != nil {
				return false, err
			}
		default:
			return false, err
		}
	}
}

// tcpUnder returns the TCP socket under a terminated TLS connection (caddy-l4
// wraps it in its Connection), or nil when there is another wrapper between.
func tcpUnder(c net.Conn) *net.TCPConn {
	for range 4 {
		switch v := c.(type) {
		case *net.TCPConn:
			return v
		case *tls.Conn:
			c = v.NetConn()
		case *layer4.Connection:
			c = v.Conn
		default:
			return nil
		}
	}
	return nil
}

// socketReadable reports whether sock has a byte to read (or has ended or
// failed), without waiting and whatever its read deadline.
func socketReadable(sock syscall.RawConn) bool {
	ready := false
	if err := sock.Control(func(fd uintptr) { ready = peekReadable(fd) }); err != nil {
		return true // let the read report it
	}
	return ready
}

// peekReadable reports whether the socket fd has a byte to read, has ended or
// has failed, without taking anything from it; false means it would block.
func peekReadable(fd uintptr) bool {
	var b [1]byte
	for {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if err != syscall.EINTR {
			return err != syscall.EAGAIN
		}
	}
}

// pipeGeneric is the copy loop for connections without a raw socket (e.g.
// PROXY-protocol wrappers): it holds one pooled buffer while it runs.
func (r *relay) pipeGeneric(dst, src net.Conn, total *atomic.Int64, counter prometheus.Counter) error {
	bp := borrowGeneric()
	defer returnGeneric(bp)
	buf := *bp
	for {
		if err := src.SetReadDeadline(time.Now().Add(r.idle)); err != nil {
			return err
		}
		n, err := src.Read(buf)
		if n > 0 {
			if werr := r.forward(dst, buf[:n], total, counter); werr != nil {
				return werr
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if r.activeWithin() {
					continue
				}
				return errIdle
			}
			return err
		}
	}
}

// forward writes a chunk read from one side to dst. The chunk is counted as
// read, before the write, so a peer that has seen the bytes sees them
// counted; it also counts as activity for the idle timeout.
func (r *relay) forward(dst net.Conn, b []byte, total *atomic.Int64, counter prometheus.Counter) error {
	r.touch()
	total.Add(int64(len(b)))
	counter.Add(float64(len(b)))
	_, err := dst.Write(b)
	return err
}

// activeWithin reports whether a chunk moved (either way) within the idle
// timeout, so a one-way transfer does not time out its quiet direction.
func (r *relay) activeWithin() bool {
	return time.Since(time.Unix(0, r.lastActive.Load())) < r.idle
}

// closeWrite shuts down the write half of c (a FIN for TCP, close_notify for
// TLS), so the peer sees the end of the stream while it can still send.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// carryConnecting is carry for a pair whose upstream the event loop connects
// itself (offloadConnect, with the addresses a upstreams.Resolver gave):
// first goes upstream before anything else, fromClient bytes of it the
// client's. offloaded is false, with nothing changed, when the loop cannot
// take the client (the caller dials and carries); err is a failure to
// connect to every address at once (for the caller to log and count; a
// later failure reaches done as a *upstreams.DialError).
func carryConnecting(client net.Conn, dest string, addrs []netip.AddrPort, first net.Buffers, fromClient int,
	timeout, idle time.Duration, rc *registry.Conn, done func(pairStats, error), release func()) (offloaded bool, err error) {
	keepAliveOff(client)
	n, end := offloadEnds(rc, done, release)
	cut, ok, err := offloadConnect(client, dest, addrs, first, fromClient, timeout, idle, n,
		[2]prometheus.Counter{metrics.BytesReceived, metrics.BytesSent}, end)
	if ok {
		rc.ReplaceCut(cut)
	}
	return ok, err
}

// offloadEnds is what a relay taken over by the event loop or the wake-ups
// counts into (rc's byte counts) and calls when the pair ends (done, then
// release: the handler's goroutine has returned by then).
func offloadEnds(rc *registry.Conn, done func(pairStats, error), release func()) ([2]*atomic.Int64, func(pairStats, error)) {
	return [2]*atomic.Int64{&rc.FromClient, &rc.FromUpstream}, func(st pairStats, err error) {
		done(st, err)
		release()
	}
}

// clientKeepAlive: a relayed client's socket has no TCP keep-alive. Go
// turns it on for every accepted connection (probes after 15 s of silence,
// caddy-l4 listens with Go's defaults); on an idle WhatsApp connection that
// is a packet to the phone and its answer every 15 s, waking its radio,
// which the app's own keepalives are spaced to avoid. The official HAProxy
// config has none either (no clitcpka); wa_proxy's idle_timeout ends dead
// connections. carry and carryConnecting turn it off before any relay
// takes the client (a duplicate of the socket keeps the setting).

// keepAliveOff turns TCP keep-alive off on client's socket (see
// clientKeepAlive).
func keepAliveOff(client net.Conn) {
	if tc := tcpUnder(client); tc != nil {
		_ = tc.SetKeepAlive(false)
	}
}

// carry relays client and up until both directions end: on the event loop
// when it can take them, or on wake-ups for a TLS-terminated client
// (offloadTLS; carry then returns true at once, and done and release run on
// another goroutine when the pair ends), else on this goroutine (done runs
// before carry returns false; release is left to the caller). carry owns up
// from the call on: it closes it either way, and callers must not close it
// (the wake-up relay keeps using it after carry returned). The bytes read from the client and from the upstream
// are added to rc's FromClient and FromUpstream as they move, so they can be
// read while the pair lives; done's pairStats holds their final values.
//
// carry makes the relay cuttable (rc's cut function, see registry.CutAll): a
// cut ends the pair promptly and done sees errCut. A cut that came before
// the relay took over (the handler's own cut closed the client) still ends
// it.
func carry(client, up net.Conn, idle time.Duration, rc *registry.Conn,
	done func(pairStats, error), release func()) (offloaded bool) {
	keepAliveOff(client)
	n, end := offloadEnds(rc, done, release)
	if cut, ok := offloadCuttable(client, up, idle, n, metrics.BytesReceived, metrics.BytesSent, end); ok {
		rc.ReplaceCut(cut)
		return true
	}
	if cut, ok := offloadTLS(client, up, idle, n, metrics.BytesReceived, metrics.BytesSent, end); ok {
		rc.ReplaceCut(cut)
		return true
	}
	defer up.Close()
	// Closing both connections ends both copy loops at once; net.Conn's
	// Close is safe from any goroutine.
	var cut atomic.Bool
	rc.ReplaceCut(func() {
		cut.Store(true)
		_ = client.Close()
		_ = up.Close()
	})
	r := &relay{idle: idle, up: &rc.FromClient, down: &rc.FromUpstream}
	err := r.run(client, client, up, metrics.BytesSent, metrics.BytesReceived)
	if cut.Load() {
		err = errCut
	}
	done(pairStats{toUpstream: r.up.Load(), toClient: r.down.Load()}, err)
	return false
}
