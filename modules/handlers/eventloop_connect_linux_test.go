//go:build linux

package handlers

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"weak"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

// connectPair is a client connected to the proxy's end of it (which the
// test hands to offloadConnect), as caddy-l4 holds an accepted connection.
func connectPair(t *testing.T) (client, proxyClient net.Conn) {
	t.Helper()
	s := newCutSockets(t)
	return s.client, s.proxyClient
}

// closedAddrPort is a loopback address nothing listens on (a port from
// package ports: nothing else in the test binary is handed it).
func closedAddrPort(t *testing.T) netip.AddrPort {
	t.Helper()
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(testutil.FreePort(t)))
}

// echoAddrPort is a loopback echo server's address.
func echoAddrPort(t *testing.T) netip.AddrPort { return echoOn(t, "127.0.0.1:0") }

// echoOn is the address of an echo server listening on addr.
func echoOn(t *testing.T, addr string) netip.AddrPort {
	t.Helper()
	return netip.MustParseAddrPort(testutil.StartEchoOn(t, addr).Addr)
}

// fullBacklog is a loopback address whose connect hangs (see
// testutil.FullBacklog).
func fullBacklog(t testing.TB) netip.AddrPort {
	return testutil.FullBacklog(t, netip.MustParseAddr("127.0.0.1"))
}

type connectResult struct {
	st  pairStats
	err error
}

// startConnectRelay hands proxyClient and addrs to offloadConnect with first
// pending ("hello", all of it the client's). It returns the result channel,
// or the synchronous error.
func startConnectRelay(t *testing.T, proxyClient net.Conn, addrs []netip.AddrPort, timeout time.Duration) (<-chan connectResult, func(), error) {
	t.Helper()
	if !loopEnabled() {
		t.Skip("WAPROXY_RELAY=" + relayMode + ": no event loop")
	}
	var n [2]atomic.Int64
	res := make(chan connectResult, 1)
	cut, ok, err := offloadConnect(proxyClient, "dest.example:443", addrs, [][]byte{[]byte("hel"), []byte("lo")}, 5,
		timeout, time.Minute, [2]*atomic.Int64{&n[0], &n[1]}, [2]prometheus.Counter{prometheus.NewCounter(prometheus.CounterOpts{Name: "a"}), prometheus.NewCounter(prometheus.CounterOpts{Name: "b"})},
		func(st pairStats, err error) { res <- connectResult{st, err} })
	if err != nil {
		return nil, nil, err
	}
	if !ok {
		t.Fatal("offloadConnect did not take a plain TCP client")
	}
	_ = proxyClient.Close() // as caddy-l4 does when the handler returns
	return res, cut, nil
}

// expectHelloThenEnd reads the echo of startConnectRelay's first bytes
// ("hello") on client, closes it, and expects the pair to end cleanly.
func expectHelloThenEnd(t *testing.T, client net.Conn, res <-chan connectResult) {
	t.Helper()
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 5)
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "hello" {
		t.Fatalf("echo %q, %v; want the first bytes from the address that answers", got, err)
	}
	client.Close()
	if r := waitResult(t, res); r.err != nil && !isClosedByPeer(r.err) {
		t.Fatalf("ended %+v", r)
	}
}

func waitResult(t *testing.T, res <-chan connectResult) connectResult {
	t.Helper()
	select {
	case r := <-res:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("the pair did not end")
		return connectResult{}
	}
}

// The loop connects to the first address that answers (a refused one is
// skipped), sends the first bytes, then relays both ways; the client's first
// bytes are counted once connected.
func TestConnectFromLoop(t *testing.T) {
	client, proxyClient := connectPair(t)
	res, _, err := startConnectRelay(t, proxyClient, []netip.AddrPort{closedAddrPort(t), echoAddrPort(t)}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write([]byte(", world")); err != nil {
		t.Fatal(err)
	}
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len("hello, world"))
	if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, []byte("hello, world")) {
		t.Fatalf("echo %q, %v; want the first bytes then the client's", got, err)
	}
	_ = client.(*net.TCPConn).CloseWrite()
	if b, err := io.ReadAll(client); err != nil || len(b) != 0 {
		t.Fatalf("after the half-close: %q, %v", b, err)
	}
	r := waitResult(t, res)
	if r.err != nil || r.st.toUpstream != 12 || r.st.toClient != 12 {
		t.Fatalf("ended %+v; want a clean end, 12 bytes each way (the 5 first bytes counted)", r)
	}
}

// IPv6: the loop builds its own socket addresses.
func TestConnectFromLoopIPv6(t *testing.T) {
	if ln, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	} else {
		ln.Close()
	}
	client, proxyClient := connectPair(t)
	res, _, err := startConnectRelay(t, proxyClient, []netip.AddrPort{echoOn(t, "[::1]:0")}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	expectHelloThenEnd(t, client, res)
}

// Every address refused: a dial error naming the destination, whether the
// refusal came from connect(2) at once or from the loop.
func TestConnectFromLoopRefused(t *testing.T) {
	client, proxyClient := connectPair(t)
	res, _, err := startConnectRelay(t, proxyClient, []netip.AddrPort{closedAddrPort(t), closedAddrPort(t)}, 5*time.Second)
	if err == nil {
		err = waitResult(t, res).err
		expectEOF(t, client)
	}
	var de *upstreams.DialError
	if !errors.As(err, &de) || de.Kind != metrics.KindDial || err.Error() != "dial dest.example:443: connect: connection refused" {
		t.Fatalf("error %v (%T), want a dial error: dial dest.example:443: connect: connection refused", err, err)
	}
}

// A connect that hangs ends at the timeout with a timeout error, and the
// client is closed.
func TestConnectFromLoopTimeout(t *testing.T) {
	client, proxyClient := connectPair(t)
	res, _, err := startConnectRelay(t, proxyClient, []netip.AddrPort{fullBacklog(t)}, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	r := waitResult(t, res)
	var de *upstreams.DialError
	if !errors.As(r.err, &de) || de.Kind != metrics.KindTimeout || !strings.HasPrefix(r.err.Error(), "dial dest.example:443: ") {
		t.Fatalf("ended %+v, want a timeout dial error", r)
	}
	expectEOF(t, client)
}

// connectedAtOnce: a connect that completed within connect(2) (loopback)
// takes the first bytes at once and leaves the pair connected, counted; one
// still in progress (a SYN the listener drops) leaves everything for the
// loop, the bytes still pending.
func TestConnectedAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name      string
		addr      netip.AddrPort
		connected bool
	}{
		{"connected within connect(2)", echoAddrPort(t), true},
		{"still connecting", fullBacklog(t), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fd, current, _, err := startConnect([]netip.AddrPort{tc.addr})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = rawClose(fd) })
			var n [2]atomic.Int64
			fromClient := prometheus.NewCounter(prometheus.CounterOpts{Name: "from_client"})
			p := newPair(-1, fd, time.Minute, [2]*atomic.Int64{&n[0], &n[1]},
				[2]prometheus.Counter{fromClient, prometheus.NewCounter(prometheus.CounterOpts{Name: "from_upstream"})}, nil)
			p.connecting = &connectState{address: "dest.example:443", current: current, fromFirst: 5, deadline: time.Now().Add(time.Second)}
			bp := relayBufs.Get().(*[]byte)
			p.pend[1], p.pendBuf[1] = (*bp)[:copy(*bp, "hello")], bp

			if got := connectedAtOnce(p); got != tc.connected {
				t.Fatalf("connectedAtOnce = %v, want %v", got, tc.connected)
			}
			if !tc.connected {
				if p.connecting == nil || p.connecting.early != nil || string(p.pend[1]) != "hello" || n[0].Load() != 0 {
					t.Fatalf("still connecting, yet the state changed: connecting %+v, pending %q, counted %d", p.connecting, p.pend[1], n[0].Load())
				}
				return
			}
			if p.connecting != nil || p.pend[1] != nil || p.pendBuf[1] != nil {
				t.Fatalf("connected, yet connecting %+v, pending %q", p.connecting, p.pend[1])
			}
			if n[0].Load() != 5 || promtest.ToFloat64(fromClient) != 5 {
				t.Fatalf("the client's 5 first bytes counted %d (counter %v), want 5", n[0].Load(), promtest.ToFloat64(fromClient))
			}
			if want := [2]uint32{unix.EPOLLIN, unix.EPOLLIN}; p.wantInterest() != want {
				t.Fatalf("interest %v, want both sockets read (%v)", p.wantInterest(), want)
			}
			// the echo server got the bytes: they come back on the socket
			_ = unix.SetNonblock(fd, false)
			_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 10})
			got := make([]byte, 0, 5)
			for len(got) < 5 {
				k, err := unix.Read(fd, got[len(got):cap(got)])
				if err != nil || k == 0 {
					t.Fatalf("echo %q, then %d, %v", got, k, err)
				}
				got = got[:len(got)+k]
			}
			if string(got) != "hello" {
				t.Fatalf("echo %q, want hello", got)
			}
		})
	}
}

// BenchmarkStillConnectingWrite is what connectedAtOnce costs when the
// connect has not completed, as to any upstream a round trip away: one
// write(2) answering EAGAIN on a socket in SYN_SENT (here: a loopback
// listener that drops the SYN).
func BenchmarkStillConnectingWrite(b *testing.B) {
	fd, _, _, err := startConnect([]netip.AddrPort{fullBacklog(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer rawClose(fd)
	hello := make([]byte, 43)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := writeFD(fd, hello); err != unix.EAGAIN {
			b.Fatalf("write on a connecting socket: %v, want EAGAIN", err)
		}
	}
}

// A cut while connecting ends the pair with errCut.
func TestConnectFromLoopCut(t *testing.T) {
	client, proxyClient := connectPair(t)
	res, cut, err := startConnectRelay(t, proxyClient, []netip.AddrPort{fullBacklog(t)}, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	cut()
	if r := waitResult(t, res); r.err != errCut {
		t.Fatalf("ended %+v, want errCut", r)
	}
	expectEOF(t, client)
}

// A silent address gets its share of the time (2s here), then the next one
// is tried: a black-holed address does not use up the whole timeout.
func TestConnectFromLoopSilentFirst(t *testing.T) {
	client, proxyClient := connectPair(t)
	silent, good := fullBacklog(t), echoAddrPort(t)
	upstreams.NoteTimeout(good) // an old time-out: a connect that succeeds clears it
	res, _, err := startConnectRelay(t, proxyClient, []netip.AddrPort{silent, good}, 4*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	expectHelloThenEnd(t, client, res)
	// the next connections to these addresses try the silent one last
	listed := func(ap netip.AddrPort) bool {
		return slices.ContainsFunc(upstreams.UnreachableAddresses(), func(u upstreams.UnreachableAddress) bool { return u.Address == ap })
	}
	if !listed(silent) || listed(good) {
		t.Fatalf("unreachable: silent %v, answering %v; want the silent one noted, not the other",
			listed(silent), listed(good))
	}
}

// No time left (the name's resolution used it up): the connect timer fires
// at once, while the pair is being registered, and still ends it cleanly
// with a timeout.
func TestConnectFromLoopNoTimeLeft(t *testing.T) {
	for range 20 {
		client, proxyClient := connectPair(t)
		res, _, err := startConnectRelay(t, proxyClient, []netip.AddrPort{fullBacklog(t)}, -time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		r := waitResult(t, res)
		var de *upstreams.DialError
		if !errors.As(r.err, &de) || de.Kind != metrics.KindTimeout {
			t.Fatalf("ended %+v, want a timeout dial error", r)
		}
		expectEOF(t, client)
	}
}

// provisionProxy provisions a wa_proxy handler from its JSON, as Caddy does.
func provisionProxy(t *testing.T, config string) *Handler {
	t.Helper()
	h := new(Handler)
	if err := provisionJSON(t, config, h); err != nil {
		t.Fatal(err)
	}
	return h
}

// wa_proxy with the direct dialer and a plain client hands the connect to
// the event loop: Handle returns while the connect is still pending (a
// destination whose accept queue is full never answers the SYN), where a
// dial would hold caddy-l4's goroutine until connect_timeout. The pair
// then ends at that timeout, counted as errors_total{kind="timeout"}, and
// the client's connection is closed.
func TestProxyHandlerConnectsFromLoop(t *testing.T) {
	if !loopEnabled() {
		t.Skip("WAPROXY_RELAY=" + relayMode + ": no event loop")
	}
	dest := fullBacklog(t)
	h := provisionProxy(t, `{"destination":"`+dest.String()+`","allow":["127.0.0.1"],"connect_timeout":"5s"}`)
	cx, client := limitPair(t, limitListen(t))
	timeouts := limitErrors(metrics.KindTimeout)
	returned := make(chan error, 1)
	go func() { returned <- h.Handle(cx, nil) }()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second): // well inside connect_timeout
		t.Fatal("Handle waited for the connect: the event loop did not take it")
	}
	_ = cx.Close() // as caddy-l4 does when the handler returns
	expectEOF(t, client)
	// the loop closes the sockets, then reports (and counts)
	testutil.WaitFor(t, 5*time.Second, "errors_total{kind=timeout} to grow by 1", func() bool {
		return limitErrors(metrics.KindTimeout)-timeouts == 1
	})
}

// TestProxyHandlerLetsGoOfConnection: once wa_proxy has handed a
// connection to the event loop and returned, nothing it leaves behind (the
// pair's callbacks, the registry entry) holds caddy-l4's Connection, whose
// context, replacer and variables would otherwise stay for as long as the
// connection lives (1.2 KB more per idle chat connection when they did).
func TestProxyHandlerLetsGoOfConnection(t *testing.T) {
	if !loopEnabled() {
		t.Skip("WAPROXY_RELAY=" + relayMode + ": no event loop")
	}
	echo := echoAddrPort(t)
	h := provisionProxy(t, `{"destination":"`+echo.String()+`","allow":["127.0.0.1"]}`)
	cx, client := limitPair(t, limitListen(t))
	ref := weak.Make(cx)
	if err := h.Handle(cx, nil); err != nil {
		t.Fatal(err)
	}
	_ = cx.Close() // as caddy-l4 does when the handler returns
	cx = nil
	// the pair lives on: an exchange goes through it
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	_ = client.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 4)
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo through the relayed pair: %q, %v", got, err)
	}
	for range 5 {
		runtime.GC()
		if ref.Value() == nil {
			return
		}
	}
	t.Fatal("caddy-l4's Connection is still reachable while the event loop relays the pair")
}

// TestConnectRetryIgnoresStaleEvent: one batch of events holds the connect
// timer's wake-up (the first address's time is up) and then the first
// socket's writable (its connect completed at that moment). The wake-up
// moves the pair on to the next address (one that never answers); the
// writable that follows belongs to the closed socket and must not pass for
// the new socket's: the pair is still connecting afterwards. (It used to
// pass when the new socket got the old one's number, as the lowest free
// descriptor: the pair was taken as connected to an address in SYN_SENT.)
// The batch goes through the loop's dispatch, on a loop that is not started.
func TestConnectRetryIgnoresStaleEvent(t *testing.T) {
	l, err := newEventLoop()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(l.wakefd); _ = l.set.file.Close() })
	_, proxyClient := connectPair(t)
	cfd, err := dupFD(proxyClient.(*net.TCPConn))
	if err != nil {
		t.Fatal(err)
	}
	_ = proxyClient.Close()
	good, silent := echoAddrPort(t), fullBacklog(t)
	var n [2]atomic.Int64
	counters := [2]prometheus.Counter{prometheus.NewCounter(prometheus.CounterOpts{Name: "a"}), prometheus.NewCounter(prometheus.CounterOpts{Name: "b"})}
	p := newPair(cfd, -1, time.Minute, [2]*atomic.Int64{&n[0], &n[1]}, counters, func(pairStats, error) {})
	// 1. the connect timer's wake-up is queued first ...
	l.mu.Lock()
	l.late = append(l.late, p)
	l.mu.Unlock()
	l.notify()
	// 2. ... then the first address's connect completes (loopback: at once)
	ufd, current, rest, err := startConnect([]netip.AddrPort{good, silent})
	if err != nil {
		t.Fatal(err)
	}
	p.fds[1] = ufd
	p.connecting = &connectState{address: "dest.example:443", current: current, addrs: rest, deadline: time.Now().Add(time.Minute)}
	if err := l.addWith(p, [2]uint32{0, unix.EPOLLOUT}); err != nil {
		t.Fatal(err)
	}
	p.connecting.timer.Stop()
	p.connecting.attemptBy = time.Now().Add(-time.Millisecond) // its share has passed
	events := make([]unix.EpollEvent, 16)
	var k int
	for deadline := time.Now().Add(5 * time.Second); ; {
		if k, err = rawEpollPoll(l.epfd, events); err != nil {
			t.Fatal(err)
		}
		if k == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if k != 2 || events[0].Fd != int32(l.wakefd) || events[1].Fd != int32(ufd) || events[1].Events&unix.EPOLLOUT == 0 {
		t.Skipf("batch %v: not the order this test needs", events[:k])
	}
	l.dispatch(events[:k]) // as eventLoop.run does
	defer l.close(p, nil)
	if p.closed {
		t.Fatal("pair closed")
	}
	if p.fds[1] == ufd {
		t.Errorf("the next address's socket got the number %d of the socket it replaced", ufd)
	}
	if p.connecting == nil {
		t.Fatalf("the old socket's writable was taken for the new socket's connect to %v (SYN_SENT); interest %v", silent, p.interest)
	}
}
