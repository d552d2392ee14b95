package handlers

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// count the pooled buffers the relays hold (see genericBorrowed)
func init() { genericBorrowed = new(atomic.Int64) }

// The goroutine relay carries TLS-terminated connections (caddy-l4's tls
// handler, then wa_proxy) without holding a buffer while they are idle: it
// waits on the TCP socket under the tls.Conn and reads only when bytes came.
// These tests run real TLS over loopback, with the server side wrapped as
// caddy-l4 wraps it (tls.Server over a layer4.Connection over the TCP
// socket).

// testCert is a self-signed ECDSA certificate for 127.0.0.1, made once.
var testCert = sync.OnceValues(func() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "relay test"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
})

// burstConn is the test client's side of the TCP connection. Once holding,
// its writes are kept until flush sends them in one write, so several TLS
// records (and the end of the handshake) reach the proxy in one burst.
type burstConn struct {
	*net.TCPConn
	mu      sync.Mutex
	writes  int
	holdAt  int // hold from this write on (0: never)
	pending []byte
}

func (c *burstConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	if c.holdAt > 0 && c.writes >= c.holdAt {
		c.pending = append(c.pending, p...)
		return len(p), nil
	}
	return c.TCPConn.Write(p)
}

// hold keeps every write from now on until flush.
func (c *burstConn) hold() {
	c.mu.Lock()
	c.holdAt = c.writes + 1
	c.mu.Unlock()
}

// flush sends the held writes in one write and stops holding.
func (c *burstConn) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.holdAt = 0
	_, err := c.TCPConn.Write(c.pending)
	c.pending = nil
	return err
}

// tlsRelay is a TLS-terminated connection relayed by carry: the test's TLS
// client, its upstream peer (plain TCP), and how the relay ended.
type tlsRelay struct {
	client   *tls.Conn
	raw      *burstConn // under client
	upstream net.Conn
	rc       *registry.Conn
	ended    chan error
}

// startTLSRelay connects a TLS client to a proxy side that terminates TLS as
// caddy-l4 does and hands the connection to carry. With burst, everything the
// client sends after its ClientHello is held: the end of its handshake, then
// one record per element of burst, all sent in one write, so the proxy's
// handshake may read application records along with the client's Finished.
//
// pre runs before carry, as TestCutBeforeRelay's does.
func startTLSRelay(t testing.TB, idle time.Duration, burst []string, pre ...func(rc *registry.Conn)) *tlsRelay {
	t.Helper()
	return startTLSRelayWith(t, idle, burst, nil, pre...)
}

// startTLSRelayWith is startTLSRelay; onAccepted, unless nil, is called with
// the proxy's end of the TCP connection before carry takes it.
func startTLSRelayWith(t testing.TB, idle time.Duration, burst []string, onAccepted func(*net.TCPConn), pre ...func(rc *registry.Conn)) *tlsRelay {
	t.Helper()
	cert, err := testCert()
	if err != nil {
		t.Fatal(err)
	}
	dialed, accepted := tcpPair(t)
	proxyUp, upstream := tcpPair(t)
	tr := &tlsRelay{raw: &burstConn{TCPConn: dialed}, upstream: upstream, ended: make(chan error, 1)}
	pool := x509.NewCertPool()
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	pool.AddCert(leaf)
	tr.client = tls.Client(tr.raw, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	t.Cleanup(func() { tr.client.Close() })

	cx := layer4.WrapConnection(accepted, nil, zap.NewNop())
	server := tls.Server(cx, &tls.Config{Certificates: []tls.Certificate{cert}})
	shaken := make(chan error, 1)
	go func() {
		_ = server.SetDeadline(time.Now().Add(10 * time.Second))
		err := server.Handshake()
		_ = server.SetDeadline(time.Time{})
		shaken <- err
	}()
	if burst != nil {
		tr.raw.holdAt = 2 // the ClientHello goes out, the rest waits
	}
	if err := tr.client.Handshake(); err != nil {
		t.Fatal("client handshake:", err)
	}
	if burst != nil {
		for _, rec := range burst {
			if _, err := tr.client.Write([]byte(rec)); err != nil {
				t.Fatal(err)
			}
		}
		if err := tr.raw.flush(); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-shaken:
		if err != nil {
			t.Fatal("server handshake:", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server handshake did not complete")
	}

	tr.rc = registry.Open(&registry.Conn{Remote: dialed.LocalAddr().String(), Handler: "test"})
	tr.rc.SetCut(func() { _ = server.Close() })
	for _, f := range pre {
		f(tr.rc)
	}
	if onAccepted != nil {
		onAccepted(accepted)
	}
	go func() {
		var relayErr error
		done := func(_ pairStats, err error) { relayErr = err }
		release := func() {
			registry.Close(tr.rc, relayErr)
			tr.ended <- relayErr
		}
		if !carry(server, proxyUp, idle, tr.rc, done, release) {
			release() // the goroutine relay leaves release to its caller
		}
		// as caddy-l4 does when the handler returns: it closes the socket
		// (a relay that took the connection over holds a duplicate)
		_ = accepted.Close()
	}()
	return tr
}

// readN reads exactly n bytes from c, with a hang guard.
func readN(t testing.TB, c net.Conn, n int) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return got
}

func (tr *tlsRelay) waitEnd(t testing.TB) error {
	t.Helper()
	select {
	case err := <-tr.ended:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not end")
		return nil
	}
}

// waitNoBuffers waits until no goroutine relay holds a pooled buffer: an idle
// relay must hold none. It fails if one stays borrowed.
func waitNoBuffers(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for genericBorrowed.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("an idle relay holds %d pooled buffer(s)", genericBorrowed.Load())
		}
		time.Sleep(time.Millisecond)
	}
}

// TestTLSRelayBufferedRecords: the client's Finished and three application
// records arrive in one burst, so crypto/tls on the proxy side has records
// buffered beyond the one a read returns; later another burst of three. The
// relay delivers every byte without waiting for more input, then holds no
// buffer while idle, and still relays afterwards.
func TestTLSRelayBufferedRecords(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelay(t, time.Minute, []string{"one,", "two,", "three;"})
		if got := readN(t, tr.upstream, len("one,two,three;")); string(got) != "one,two,three;" {
			t.Fatalf("upstream got %q", got)
		}
		waitNoBuffers(t)

		tr.raw.hold()
		want := ""
		for _, rec := range []string{"four,", "five,", "six;"} {
			want += rec
			if _, err := tr.client.Write([]byte(rec)); err != nil {
				t.Fatal(err)
			}
		}
		if err := tr.raw.flush(); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, tr.upstream, len(want)); string(got) != want {
			t.Fatalf("upstream got %q, want %q", got, want)
		}
		waitNoBuffers(t)

		// the other way round, and the counts
		if _, err := tr.upstream.Write([]byte("pong")); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, tr.client, 4); string(got) != "pong" {
			t.Fatalf("client got %q", got)
		}
		waitNoBuffers(t)
		if !tr.rc.Cut() {
			t.Fatal("the relayed connection had no cut function")
		}
		if err := tr.waitEnd(t); err != errCut {
			t.Fatalf("the relay ended with %v, want errCut", err)
		}
		if up, down := tr.rc.FromClient.Load(), tr.rc.FromUpstream.Load(); up != int64(len("one,two,three;")+len(want)) || down != 4 {
			t.Fatalf("counted %d bytes from the client and %d from the upstream", up, down)
		}
		expectEOF(t, tr.upstream)
		expectEOF(t, tr.client)
	})
}

// TestTLSRelaySplitRecord: a record that reaches the proxy in two writes (its
// first half alone) is delivered once the rest comes.
func TestTLSRelaySplitRecord(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelay(t, time.Minute, nil)
		tr.raw.hold()
		msg := bytes.Repeat([]byte("split record "), 100)
		if _, err := tr.client.Write(msg); err != nil {
			t.Fatal(err)
		}
		tr.raw.mu.Lock()
		rec := tr.raw.pending
		tr.raw.pending, tr.raw.holdAt = nil, 0
		tr.raw.mu.Unlock()
		for _, part := range [][]byte{rec[:3], rec[3 : len(rec)/2], rec[len(rec)/2:]} {
			if _, err := tr.raw.TCPConn.Write(part); err != nil {
				t.Fatal(err)
			}
		}
		if got := readN(t, tr.upstream, len(msg)); !bytes.Equal(got, msg) {
			t.Fatalf("upstream got %d different bytes", len(got))
		}
		waitNoBuffers(t)
	})
}

// TestTLSRelayHalfClose: the client ends its sending half (close_notify),
// the upstream sees EOF and can still answer; then the upstream ends its
// half, the client sees EOF, and the relay ends cleanly.
func TestTLSRelayHalfClose(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelay(t, time.Minute, nil)
		if _, err := tr.client.Write([]byte("last words")); err != nil {
			t.Fatal(err)
		}
		if err := tr.client.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = tr.upstream.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(tr.upstream)
		if err != nil || string(got) != "last words" {
			t.Fatalf("upstream read %q, %v; want the bytes then EOF", got, err)
		}
		if _, err := tr.upstream.Write([]byte("the answer")); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, tr.client, len("the answer")); string(got) != "the answer" {
			t.Fatalf("client got %q", got)
		}
		waitNoBuffers(t)
		if err := tr.upstream.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		_ = tr.client.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := tr.client.Read(make([]byte, 8)); n != 0 || err != io.EOF {
			t.Fatalf("client read %d bytes, %v; want EOF", n, err)
		}
		if err := tr.waitEnd(t); err != nil {
			t.Fatalf("the relay ended with %v, want nil", err)
		}
	})
}

// TestTLSRelayIdleTimeout: with nothing moving either way, the relay ends
// with errIdle and closes both sides; also with half a record waiting.
func TestTLSRelayIdleTimeout(t *testing.T) {
	relayModes(t, func(t *testing.T) { testTLSRelayIdleTimeout(t) })
}

func testTLSRelayIdleTimeout(t *testing.T) {
	for _, partial := range []bool{false, true} {
		name := "quiet"
		if partial {
			name = "partial_record"
		}
		t.Run(name, func(t *testing.T) {
			tr := startTLSRelay(t, 200*time.Millisecond, nil)
			if _, err := tr.client.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			readN(t, tr.upstream, 5)
			if partial {
				// a record header announcing bytes that never come
				if _, err := tr.raw.TCPConn.Write([]byte{23, 3, 3, 0, 100, 1, 2}); err != nil {
					t.Fatal(err)
				}
			}
			if err := tr.waitEnd(t); !errors.Is(err, errIdle) {
				t.Fatalf("the relay ended with %v, want errIdle", err)
			}
			expectEOF(t, tr.upstream)
			expectEOF(t, tr.client)
		})
	}
}

// TestTLSRelayLargeTransfer moves a few MiB each way at once and checks every
// byte and the counts.
func TestTLSRelayLargeTransfer(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelay(t, time.Minute, nil)
		const size = 3 << 20
		up, down := make([]byte, size), make([]byte, size)
		_, _ = rand.Read(up)
		_, _ = rand.Read(down)
		errs := make(chan error, 4)
		write := func(c net.Conn, b []byte) {
			// odd sizes, so records and reads do not line up
			for len(b) > 0 {
				n := min(len(b), 7001)
				if _, err := c.Write(b[:n]); err != nil {
					errs <- err
					return
				}
				b = b[n:]
			}
			errs <- nil
		}
		read := func(c net.Conn, want []byte) {
			_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
			got := make([]byte, len(want))
			if _, err := io.ReadFull(c, got); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, want) {
				errs <- errors.New("the bytes differ")
				return
			}
			errs <- nil
		}
		go write(tr.client, up)
		go write(tr.upstream, down)
		go read(tr.upstream, up)
		go read(tr.client, down)
		for range 4 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		waitNoBuffers(t)
		if err := tr.client.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if err := tr.upstream.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if err := tr.waitEnd(t); err != nil {
			t.Fatalf("the relay ended with %v, want nil", err)
		}
		if a, b := tr.rc.FromClient.Load(), tr.rc.FromUpstream.Load(); a != size || b != size {
			t.Fatalf("counted %d bytes from the client and %d from the upstream, want %d each", a, b, size)
		}
	})
}

// TestTLSRelayFindsSocket: the relay finds the TCP socket under caddy-l4's
// wrapping of a terminated connection, and gives up on unknown wrappers.
func TestTLSRelayFindsSocket(t *testing.T) {
	a, _ := tcpPair(t)
	cx := layer4.WrapConnection(a, nil, zap.NewNop())
	outer := cx.Wrap(tls.Server(cx, &tls.Config{}))
	if got := tcpUnder(outer.Conn); got != a {
		t.Fatalf("tcpUnder(tls over layer4) = %v, want the socket", got)
	}
	if got := tcpUnder(tls.Server(wrappedConn{a}, &tls.Config{})); got != nil {
		t.Fatalf("tcpUnder(tls over an unknown wrapper) = %v, want nil", got)
	}
}

// TestTLSRelayIdleHoldsNothing: taken over from the handler (Linux), an idle
// TLS relay has no goroutine and no buffer: only its two sockets are watched.
// Traffic after that still flows both ways, and its end removes the watches.
func TestTLSRelayIdleHoldsNothing(t *testing.T) {
	watches := watchedSockets
	before := watches()
	if before < 0 || !loopEnabled() {
		t.Skip("TLS relays are not taken over on this platform, or with WAPROXY_RELAY=" + relayMode)
	}
	tr := startTLSRelay(t, time.Minute, []string{"hello"})
	if got := readN(t, tr.upstream, 5); string(got) != "hello" {
		t.Fatalf("upstream got %q", got)
	}
	for range 3 {
		if _, err := tr.upstream.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, tr.client, 4); string(got) != "ping" {
			t.Fatalf("client got %q", got)
		}
		if _, err := tr.client.Write([]byte("pong")); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, tr.upstream, 4); string(got) != "pong" {
			t.Fatalf("upstream got %q", got)
		}
		waitNoBuffers(t)
		if got := watches() - before; got != 2 {
			t.Fatalf("%d sockets watched for the relay, want 2", got)
		}
		// no goroutine is left in the relay (hang guard only)
		deadline := time.Now().Add(5 * time.Second)
		for {
			buf := make([]byte, 1<<20)
			stacks := string(buf[:runtime.Stack(buf, true)])
			if !strings.Contains(stacks, "handlers.(*tlsPair)") && !strings.Contains(stacks, "handlers.(*relay)") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a goroutine stays in the idle relay:\n%s", stacks)
			}
			time.Sleep(time.Millisecond)
		}
	}
	if err := tr.client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := tr.upstream.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := tr.waitEnd(t); err != nil {
		t.Fatalf("the relay ended with %v, want nil", err)
	}
	if got := watches() - before; got != 0 {
		t.Fatalf("%d sockets still watched after the relay ended", got)
	}
}

// TestTLSRelayCutBeforeRelay: a cut that came while the handler still owned
// the connection (and did not close it) ends the relay that takes over.
func TestTLSRelayCutBeforeRelay(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelay(t, time.Minute, nil, func(rc *registry.Conn) {
			rc.SetCut(func() {}) // the handler's cut, not yet effective
			if !rc.Cut() {
				t.Fatal("the handler's cut did not run")
			}
		})
		if err := tr.waitEnd(t); err != errCut {
			t.Fatalf("the relay ended with %v, want errCut", err)
		}
		expectEOF(t, tr.upstream)
		expectEOF(t, tr.client)
	})
}

// TestTLSRelayBackpressure: the upstream sends far more than the socket
// buffers hold while the client does not read. The relay holds at most one
// buffer per direction meanwhile (it stops reading the upstream while the
// client's socket is full), and every byte arrives once the client reads.
func TestTLSRelayBackpressure(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelay(t, time.Minute, nil)
		const size = 24 << 20
		data := make([]byte, size)
		_, _ = rand.Read(data)
		wrote := make(chan error, 1)
		go func() {
			_, err := tr.upstream.Write(data)
			wrote <- err
		}()
		stop := make(chan struct{})
		most := make(chan int64, 1)
		go func() {
			var m int64
			defer func() { most <- m }()
			for {
				m = max(m, genericBorrowed.Load())
				select {
				case <-stop:
					return
				default:
					time.Sleep(100 * time.Microsecond)
				}
			}
		}()
		time.Sleep(200 * time.Millisecond) // the client does not read yet
		_ = tr.client.SetReadDeadline(time.Now().Add(30 * time.Second))
		got := make([]byte, size)
		if _, err := io.ReadFull(tr.client, got); err != nil {
			t.Fatal(err)
		}
		close(stop)
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatal("the client got different bytes")
		}
		if m := <-most; m > 1 {
			t.Fatalf("the relay held up to %d buffers for one direction", m)
		}
		waitNoBuffers(t)
	})
}

// BenchmarkTLSRelayThroughput moves 64 KiB writes from a TLS client through
// the relay to the upstream, in both relay modes.
func BenchmarkTLSRelayThroughput(b *testing.B) {
	for _, mode := range []string{"", "goroutine"} {
		name := "offload"
		if mode != "" {
			name = mode
		}
		b.Run(name, func(b *testing.B) {
			saved := relayMode
			relayMode = mode
			defer func() { relayMode = saved }()
			tr := startTLSRelay(b, time.Minute, nil)
			chunk := make([]byte, 64<<10)
			done := make(chan error, 1)
			go func() {
				_, err := io.CopyN(io.Discard, tr.upstream, int64(b.N)*int64(len(chunk)))
				done <- err
			}()
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for range b.N {
				if _, err := tr.client.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// TestTLSRelayHalfCloseThenSlowReader is TestRelayHalfCloseThenSlowReader
// for a TLS-terminated client (the wake-up relay): the client half-closes,
// then the upstream answers with more than a slow client's buffers hold
// and closes; every byte still arrives, then EOF.
func TestTLSRelayHalfCloseThenSlowReader(t *testing.T) {
	relayModes(t, func(t *testing.T) {
		tr := startTLSRelayWith(t, time.Minute, nil, func(c *net.TCPConn) { _ = c.SetWriteBuffer(8 << 10) })
		_ = tr.raw.SetReadBuffer(8 << 10)
		if _, err := tr.client.Write([]byte("req")); err != nil {
			t.Fatal(err)
		}
		if err := tr.client.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		payload := make([]byte, 128<<10)
		_, _ = rand.Read(payload)
		go func() {
			_, _ = io.ReadAll(tr.upstream) // the request, then the relay's FIN
			_, _ = tr.upstream.Write(payload)
			_ = tr.upstream.Close()
		}()
		time.Sleep(500 * time.Millisecond) // the buffers towards the client fill up
		expectAllThenEnd(t, tr.client, payload, tr.ended)
	})
}
