//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// helloPrefix is the first 11 bytes of a WhatsApp chat connection without
// the edge-routing prologue: the "WA" header (magic 6, dictionary 3) and the
// 3-byte length (36) and protobuf start of the Noise ClientHello frame. 32
// random bytes (the ephemeral key) follow. See
// ../shared/reference/whatsapp.md, section 4.
var helloPrefix = []byte{0x57, 0x41, 0x06, 0x03, 0x00, 0x00, 0x24, 0x12, 0x22, 0x0A, 0x20}

// helloLen is the length of the whole hello: prefix + 32-byte key.
const helloLen = 43

// opTimeout bounds every single network operation of a load loop.
const opTimeout = 5 * time.Second

// putHello writes a hello with a random key into b[:helloLen].
func putHello(b []byte, r *rand.Rand) {
	copy(b, helloPrefix)
	for i := len(helloPrefix); i < helloLen; i++ {
		b[i] = byte(r.Uint32())
	}
}

// appendFrame appends a WhatsApp frame (3-byte big-endian length, payload)
// to b.
func appendFrame(b, payload []byte) []byte {
	n := len(payload)
	return append(append(b, byte(n>>16), byte(n>>8), byte(n)), payload...)
}

// edge is the stand-in for WhatsApp's chat server that every target proxies
// to. An echo edge returns every byte; a bulk edge reads the hello, then
// sends a stream of bytes until the client goes away or bulkLimit passes.
type edge struct {
	ln        net.Listener
	bulk      bool
	bulkLimit time.Duration

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// startEdge listens on a free loopback port and serves until Close.
func startEdge(bulk bool, bulkLimit time.Duration) (*edge, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen for edge: %w", err)
	}
	e := &edge{ln: ln, bulk: bulk, bulkLimit: bulkLimit, conns: map[net.Conn]struct{}{}}
	e.wg.Add(1)
	go e.serve()
	return e, nil
}

func (e *edge) addr() string { return e.ln.Addr().String() }

func (e *edge) serve() {
	defer e.wg.Done()
	for {
		c, err := e.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(5 * time.Millisecond) // EMFILE and friends: back off, keep serving
			continue
		}
		e.mu.Lock()
		if e.conns == nil { // closed
			e.mu.Unlock()
			c.Close()
			return
		}
		e.conns[c] = struct{}{}
		e.mu.Unlock()
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			e.handle(c)
			c.Close()
			e.mu.Lock()
			delete(e.conns, c)
			e.mu.Unlock()
		}()
	}
}

// handle serves one connection the way this edge does: echo, or the hello
// then a bulk stream. The direct TLS target serves its TLS connections with
// it too.
func (e *edge) handle(c net.Conn) {
	if e.bulk {
		e.sendBulk(c)
	} else {
		echo(c)
	}
}

// echo returns every byte until the peer closes. It copies through a small
// buffer on purpose: io.Copy would splice, and a blocked splice holds a pipe
// (two descriptors) per idle connection.
func echo(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// sendBulk reads the hello, checks it, then writes until an error or the
// time limit.
func (e *edge) sendBulk(c net.Conn) {
	hello := make([]byte, helloLen)
	c.SetReadDeadline(time.Now().Add(opTimeout))
	if _, err := io.ReadFull(c, hello); err != nil || !bytes.HasPrefix(hello, helloPrefix) {
		return
	}
	c.SetDeadline(time.Now().Add(e.bulkLimit))
	chunk := bulkChunk()
	for {
		if _, err := c.Write(chunk); err != nil {
			return
		}
	}
}

// bulkChunk is what a bulk edge writes, over and over.
func bulkChunk() []byte {
	chunk := make([]byte, 64<<10)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	return chunk
}

// probe runs one exchange with this edge through addr (the edge itself or a
// proxy in front of it), connecting with dial: the readiness check. For an
// echo edge the hello comes back; for a bulk edge the start of its stream
// arrives.
func (e *edge) probe(ctx context.Context, dial connector, addr string) error {
	r := rand.New(rand.NewPCG(7, uint64(time.Now().UnixNano())))
	hello := make([]byte, helloLen)
	putHello(hello, r)
	d := &net.Dialer{Timeout: time.Second}
	if !e.bulk {
		return chatOnce(ctx, d, dial, addr, hello, make([]byte, helloLen))
	}
	c, err := dial(ctx, d, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(opTimeout))
	if _, err := c.Write(hello); err != nil {
		return err
	}
	in := make([]byte, 64)
	if _, err := io.ReadFull(c, in); err != nil {
		return fmt.Errorf("read bulk stream: %w", err)
	}
	if !bytes.Equal(in, bulkChunk()[:len(in)]) {
		return errors.New("bulk stream differs from what the edge sends")
	}
	return nil
}

// close stops the listener, closes every open connection and waits for the
// handlers.
func (e *edge) close() {
	e.ln.Close()
	e.mu.Lock()
	for c := range e.conns {
		c.Close()
	}
	e.conns = nil
	e.mu.Unlock()
	e.wg.Wait()
}

// connector opens a connection to a target the way a client does: plain TCP
// (a chat client on port 5222) or TLS on top (a chat client on port 443).
// The connection it returns has no deadline set.
type connector func(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error)

// dialTCP is the plain connector.
func dialTCP(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	return d.DialContext(ctx, "tcp", addr)
}

// chatOnce runs one chat exchange: connect, send out, read its echo, close.
func chatOnce(ctx context.Context, d *net.Dialer, dial connector, addr string, out, in []byte) error {
	c, err := exchange(ctx, d, dial, addr, out, in)
	if err != nil {
		return err
	}
	return c.Close()
}

// exchange connects with dial, sends out and reads its echo (checked byte for
// byte), and returns the open connection with no deadline set.
func exchange(ctx context.Context, d *net.Dialer, dial connector, addr string, out, in []byte) (net.Conn, error) {
	c, err := dial(ctx, d, addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(opTimeout))
	if _, err = c.Write(out); err != nil {
		err = fmt.Errorf("write: %w", err)
	} else if _, err = io.ReadFull(c, in[:len(out)]); err != nil {
		err = fmt.Errorf("read echo: %w", err)
	} else if !bytes.Equal(in[:len(out)], out) {
		err = errors.New("echo differs from what was sent")
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// chatResult is what a chat load run measured.
type chatResult struct {
	Conns    int           // completed exchanges
	Errors   int           // failed ones
	FirstErr string        // the first failure, if any
	Elapsed  time.Duration // from start until the last worker stopped
	Latency  []time.Duration
}

// rate returns completed exchanges per second.
func (r chatResult) rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Conns) / r.Elapsed.Seconds()
}

// runChat runs workers concurrent loops of chatOnce (hello + one 100-byte
// frame), each connection opened with dial, against addr for d. Each worker
// starts no new exchange after d, and every exchange is bounded by opTimeout
// (a TLS handshake included).
func runChat(ctx context.Context, dial connector, addr string, workers int, d time.Duration) chatResult {
	var (
		mu  sync.Mutex
		res chatResult
		wg  sync.WaitGroup
	)
	start := time.Now()
	stop := start.Add(d)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), uint64(start.UnixNano())))
			payload := make([]byte, 100)
			for i := range payload {
				payload[i] = byte(r.Uint32())
			}
			out := make([]byte, helloLen, helloLen+3+len(payload))
			out = appendFrame(out, payload)
			in := make([]byte, len(out))
			dialer := &net.Dialer{Timeout: opTimeout}
			var lat []time.Duration
			var n, nerr int
			var firstErr error
			for ctx.Err() == nil && time.Now().Before(stop) {
				putHello(out, r)
				t0 := time.Now()
				if err := chatOnce(ctx, dialer, dial, addr, out, in); err != nil {
					nerr++
					if firstErr == nil {
						firstErr = err
					}
					time.Sleep(10 * time.Millisecond) // a dead target must not become a hot loop
					continue
				}
				lat = append(lat, time.Since(t0))
				n++
			}
			mu.Lock()
			res.Conns += n
			res.Errors += nerr
			if firstErr != nil && res.FirstErr == "" {
				res.FirstErr = firstErr.Error()
			}
			res.Latency = append(res.Latency, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	return res
}

// percentile returns the p-th percentile (0 < p <= 100, nearest rank) of
// ds, sorting ds in place; 0 for an empty slice.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	rank := int(p/100*float64(len(ds))+0.999999) - 1
	return ds[min(max(rank, 0), len(ds)-1)]
}

// bulkResult is what a bulk run measured at the client.
type bulkResult struct {
	MBps     float64 // 10^6 bytes per second, all streams together
	Total    int64   // every byte that arrived, warm-up included
	Streams  int     // streams that were established
	Errors   int
	FirstErr string
}

// runBulk opens streams connections to addr with dial (a bulk edge,
// directly or through a proxy), sends each a hello, lets the bytes flow for
// warm, then counts what arrives at the clients during d.
func runBulk(ctx context.Context, dial connector, addr string, streams int, warm, d time.Duration) bulkResult {
	var res bulkResult
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	r := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	dialer := &net.Dialer{Timeout: opTimeout}
	hello := make([]byte, helloLen)
	for range streams {
		c, err := dial(ctx, dialer, addr)
		if err == nil {
			putHello(hello, r)
			c.SetWriteDeadline(time.Now().Add(opTimeout))
			_, err = c.Write(hello)
			if err != nil {
				c.Close()
			}
		}
		if err != nil {
			res.Errors++
			if res.FirstErr == "" {
				res.FirstErr = err.Error()
			}
			continue
		}
		conns = append(conns, c)
	}
	res.Streams = len(conns)
	if len(conns) == 0 {
		return res
	}
	var total atomic.Int64
	var wg sync.WaitGroup
	limit := time.Now().Add(warm + d + opTimeout)
	for _, c := range conns {
		wg.Add(1)
		c.SetReadDeadline(limit)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			for {
				n, err := c.Read(buf)
				total.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	sleepCtx(ctx, warm)
	b0, t0 := total.Load(), time.Now()
	sleepCtx(ctx, d)
	b1, t1 := total.Load(), time.Now()
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	wg.Wait()
	res.MBps = float64(b1-b0) / t1.Sub(t0).Seconds() / 1e6
	res.Total = total.Load()
	return res
}

// sleepCtx sleeps for d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// idlePool holds established chat connections open.
type idlePool struct {
	frame    int // when > 0, each connection also carries a frame of this many payload bytes before it idles
	conns    []net.Conn
	errors   int
	firstErr string
}

// open establishes n more connections to addr with dial, each with its
// hello sent and echoed, conc at a time; it stops early when ctx ends.
func (p *idlePool) open(ctx context.Context, dial connector, addr string, n, conc int) {
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		next atomic.Int64
	)
	for w := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			dialer := &net.Dialer{Timeout: opTimeout}
			hello := make([]byte, helloLen)
			if p.frame > 0 {
				payload := make([]byte, p.frame)
				for i := range payload {
					payload[i] = byte(r.Uint32())
				}
				hello = appendFrame(hello, payload)
			}
			in := make([]byte, len(hello))
			for ctx.Err() == nil && next.Add(1) <= int64(n) {
				putHello(hello, r)
				c, err := exchange(ctx, dialer, dial, addr, hello, in)
				mu.Lock()
				if err != nil {
					p.errors++
					if p.firstErr == "" {
						p.firstErr = err.Error()
					}
				} else {
					p.conns = append(p.conns, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// alive sends a 100-byte frame on every held connection, conc at a time, and
// counts those whose echo comes back intact.
func (p *idlePool) alive(ctx context.Context, conc int) (ok int, firstErr string) {
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		next atomic.Int64
	)
	frame := appendFrame(nil, bytes.Repeat([]byte{0x5a}, 100))
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := make([]byte, len(frame))
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(p.conns) {
					return
				}
				c := p.conns[i]
				c.SetDeadline(time.Now().Add(opTimeout))
				_, err := c.Write(frame)
				if err == nil {
					if _, err = io.ReadFull(c, in); err == nil && !bytes.Equal(in, frame) {
						err = errors.New("echo differs from what was sent")
					}
				}
				c.SetDeadline(time.Time{})
				mu.Lock()
				if err == nil {
					ok++
				} else if firstErr == "" {
					firstErr = err.Error()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return ok, firstErr
}

// close closes every held connection.
func (p *idlePool) close() {
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}
