package integration

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
)

// pushServer is an edge that, after reading the 43-byte hello, writes size
// bytes as fast as the connection takes them, then closes.
func pushServer(t *testing.T, payload []byte) string {
	t.Helper()
	return testutil.ServeLoopback(t, func(c net.Conn) {
		if _, err := io.ReadFull(c, make([]byte, 43)); err != nil {
			return
		}
		_, _ = c.Write(payload)
	})
}

// TestBackpressure: the edge sends 16 MiB to a client that does not read at
// first. The proxy must stop reading from the edge while the client's socket
// is full (not buffer without bound, not drop), and deliver every byte once
// the client reads.
func TestBackpressure(t *testing.T) {
	payload := randomBytes(16 << 20)
	edge := pushServer(t, payload)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge, "allow": []string{"127.0.0.1"}}),
	}, "", nil))
	before := metric(t, c, "whatsapp_proxy_bytes_sent_total")
	conn := dial(t, listen)
	_ = conn.SetReadBuffer(16 << 10)
	if _, err := conn.Write(waHello()); err != nil {
		t.Fatal(err)
	}
	// while the client does not read, the proxy can only have moved what the
	// kernel buffers hold: far less than the 16 MiB the edge wants to send
	testutil.WaitFor(t, 5*time.Second, "the proxy to start relaying", func() bool {
		return metric(t, c, "whatsapp_proxy_bytes_sent_total") > before
	})
	moved := func() float64 { return metric(t, c, "whatsapp_proxy_bytes_sent_total") - before }
	stalled, last := 0, -1.0
	testutil.WaitFor(t, 10*time.Second, "the relay to stall on the full client socket", func() bool {
		m := moved()
		if m == last {
			stalled++
		} else {
			stalled, last = 0, m
		}
		return stalled >= 5
	})
	if m := moved(); m >= float64(len(payload)) {
		t.Fatalf("the proxy moved all %v bytes to a client that reads nothing: no backpressure", m)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatalf("received %d bytes, want the %d the edge sent, intact", len(got), len(payload))
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd on this system")
	}
	return len(ents)
}

// TestNoLeaks: clients that leave normally, reset mid-stream, or vanish
// mid-body leave no socket, goroutine-held connection or gauge behind.
func TestNoLeaks(t *testing.T) {
	edge := testutil.StartEcho(t)
	listen := testutil.FreeAddr(t)
	c := testutil.StartCaddy(t, proxyConfig(listen, []obj{
		chatRoute(obj{"destination": edge.Addr, "allow": []string{"127.0.0.1"}}),
	}, "", nil))
	warm := dial(t, listen)
	exchange(t, warm, waHello())
	warm.Close()
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
	base := openFDs(t)

	const n = 60
	for i := range n {
		conn, err := net.Dial("tcp", listen)
		if err != nil {
			t.Fatal(err)
		}
		tc := conn.(*net.TCPConn)
		exchange(t, tc, waHello())
		switch i % 3 {
		case 0: // a normal close
			tc.Close()
		case 1: // a reset (SO_LINGER 0)
			_ = tc.SetLinger(0)
			tc.Close()
		case 2: // gone in the middle of a large frame
			_, _ = tc.Write(frame(randomBytes(256 << 10))[:100_000])
			_ = tc.SetLinger(0)
			tc.Close()
		}
	}
	waitMetric(t, c, "whatsapp_proxy_connections_active", 0)
	waitMetric(t, c, `whatsapp_proxy_protocol_connections{protocol="whatsapp"}`, 0)
	testutil.WaitFor(t, 10*time.Second, "open file descriptors back to the baseline", func() bool {
		return openFDs(t) <= base
	})
	// and the proxy still works
	conn := dial(t, listen)
	exchange(t, conn, bytes.Repeat(waHello(), 3))
}
