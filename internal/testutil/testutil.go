// Package testutil runs real peers for the tests: Caddy in-process with a real
// config, loopback echo servers, free ports, and condition waits. It never
// talks to anything but 127.0.0.1.
package testutil

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/waproxy/caddy-waproxy/internal/ports"
)

// FreePort returns a loopback TCP port that was free a moment ago and that
// no other FreePort call in this test binary returned (see package ports:
// Caddy's listeners share a port handed out twice, silently).
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := ports.Free()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// FreeAddr returns "127.0.0.1:<free port>".
func FreeAddr(t testing.TB) string { return fmt.Sprintf("127.0.0.1:%d", FreePort(t)) }

var caddyMu sync.Mutex // Caddy's running config is process-global

// Caddy is an in-process Caddy started by StartCaddy.
type Caddy struct {
	// Admin is the admin endpoint's address ("127.0.0.1:port").
	Admin string
}

// StartCaddy loads cfg (a JSON config, with "admin" left out: StartCaddy sets
// it to a free loopback port and turns off persistence) and stops Caddy when
// the test ends. Only one Caddy runs at a time in a test binary.
func StartCaddy(t testing.TB, cfg string) *Caddy {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		t.Fatalf("test config is not JSON: %v\n%s", err, cfg)
	}
	admin := FreeAddr(t)
	full := withAdmin(m, admin)
	caddyMu.Lock()
	if err := caddy.Load(full, true); err != nil {
		caddyMu.Unlock()
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() {
		defer caddyMu.Unlock()
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	c := &Caddy{Admin: admin}
	WaitFor(t, 5*time.Second, "admin endpoint up", func() bool {
		resp, err := http.Get("http://" + admin + "/config/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return c
}

func withAdmin(m map[string]any, admin string) []byte {
	m["admin"] = map[string]any{"listen": admin, "config": map[string]any{"persist": false}}
	full, _ := json.Marshal(m)
	return full
}

// Load replaces the running config through the admin API's POST /load, as
// an operator's reload does. The admin section is kept as StartCaddy set it.
func (c *Caddy) Load(t testing.TB, cfg string) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(cfg), &m); err != nil {
		t.Fatalf("test config is not JSON: %v", err)
	}
	status, body, err := c.AdminDo(http.MethodPost, "/load", withAdmin(m, c.Admin))
	if err != nil {
		t.Fatalf("POST /load: %v", err)
	}
	if status != http.StatusOK {
		t.Fatalf("POST /load: status %d: %s", status, body)
	}
}

// Metrics returns the admin endpoint's /metrics text. It scrapes through
// AdminDo (a fresh connection, sent again if no server read it): a test may
// scrape while a reload replaces the admin server, which resets kept-alive
// connections.
func (c *Caddy) Metrics(t testing.TB) string {
	t.Helper()
	status, body, err := c.AdminDo(http.MethodGet, "/metrics", nil)
	if err != nil || status != http.StatusOK {
		t.Fatalf("scraping metrics: status %d, %v", status, err)
	}
	return body
}

// Metric returns the value of the sample named series (for example
// `whatsapp_proxy_errors_total{kind="dial"}`) in the admin endpoint's
// /metrics, or fails the test if it is absent.
func (c *Caddy) Metric(t testing.TB, series string) float64 {
	t.Helper()
	text := c.Metrics(t)
	for _, line := range strings.Split(text, "\n") {
		// the value follows the last space: label values may hold spaces
		if i := strings.LastIndexByte(line, ' '); i > 0 && line[:i] == series {
			val := line[i+1:]
			var f float64
			if _, err := fmt.Sscan(val, &f); err != nil {
				t.Fatalf("metric %s: bad value %q", series, val)
			}
			return f
		}
	}
	t.Fatalf("metric %s not found in /metrics", series)
	return 0
}

// WaitFor polls cond until it returns true, failing the test with what after
// timeout. Use it instead of sleeping.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; ; delay = min(delay*2, 50*time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(delay)
	}
}

// EchoServer is a loopback TCP server that echoes every byte back and records
// the first bytes of each connection (up to 4 KiB).
type EchoServer struct {
	Addr   string
	ln     net.Listener
	mu     sync.Mutex
	firsts [][]byte
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// StartEcho starts an EchoServer on 127.0.0.1 that stops when the test ends.
func StartEcho(t testing.TB) *EchoServer {
	t.Helper()
	return StartEchoOn(t, "127.0.0.1:0")
}

// StartEchoOn is StartEcho listening on addr (say "[::1]:0").
func StartEchoOn(t testing.TB, addr string) *EchoServer {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &EchoServer{Addr: ln.Addr().String(), ln: ln, conns: make(map[net.Conn]struct{})}
	// serve counts in wg too: its wg.Add for a connection accepted as the
	// listener closes then happens while the count is above zero, as a
	// WaitGroup requires of an Add concurrent with Wait (the race detector
	// reported it when serve was not counted).
	s.wg.Go(s.serve)
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.conns { // a test that failed may leave relays open: end them
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *EchoServer) serve() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
			buf := make([]byte, 32*1024)
			var first []byte
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if len(first) < 4096 {
						first = append(first, buf[:min(n, 4096-len(first))]...)
					}
					if _, werr := c.Write(buf[:n]); werr != nil {
						break
					}
				}
				if err != nil {
					if errors.Is(err, io.EOF) {
						if tc, ok := c.(*net.TCPConn); ok {
							_ = tc.CloseWrite()
						}
					}
					break
				}
			}
			s.mu.Lock()
			s.firsts = append(s.firsts, first)
			s.mu.Unlock()
		}()
	}
}

// Received returns the first bytes of each connection that has ended, in the
// order they ended.
func (s *EchoServer) Received() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.firsts...)
}

// AdminDo sends one request to the admin endpoint and returns the status
// and body. It reports errors instead of failing the test, so goroutines may
// call it.
//
// Caddy replaces its admin server at every load, binding a new
// SO_REUSEPORT socket and closing the old one just after: a kept-alive
// connection to the old server may be closed under a request that cannot be
// retried (a POST), and a new connection may be reset while connecting
// (unless net.ipv4.tcp_migrate_req is 1), or closed with the request in it
// before any server read it (the old listener's queue is dropped; a server
// that did read a request answers it before it shuts down). So each request
// gets a fresh connection, sent again when it was reset or closed without an
// answer.
func (c *Caddy) AdminDo(method, path string, body []byte) (int, string, error) {
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	var resp *http.Response
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequest(method, "http://"+c.Admin+path, bytes.NewReader(body))
		if err != nil {
			return 0, "", err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err = client.Do(req)
		if err == nil {
			break
		}
		// reset while connecting, or closed with no answer: the connection
		// sat in the old admin listener's queue when it closed, so no
		// server read the request
		if attempt < 5 && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF)) {
			continue
		}
		return 0, "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// ListeningSockets counts the IPv4 TCP sockets in LISTEN state bound to addr
// (an IPv4 address and port), from /proc/net/tcp (Linux, little-endian: the
// address is printed as a host-order word). Elsewhere it returns an error.
func ListeningSockets(addr string) (int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		return 0, fmt.Errorf("not an IPv4 address and port: %q", addr)
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return 0, err
	}
	ip := ap.Addr().As4()
	local := fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], ap.Port())
	n := 0
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == local && f[3] == "0A" {
			n++
		}
	}
	return n, nil
}

// ServeLoopback runs handle for each connection to a new 127.0.0.1
// listener, closes the connection after it, and returns the listener's
// address. The listener closes when the test ends.
func ServeLoopback(t testing.TB, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}
