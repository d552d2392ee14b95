package upstreams

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/testutil"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// scriptConn is the server side of one connection of a scripted SOCKS5
// server. Its methods return errors instead of failing the test, since they
// run on the server's goroutine.
type scriptConn struct{ net.Conn }

// expect reads exactly len(want) bytes and compares them with want.
func (c scriptConn) expect(what string, want []byte) error {
	got := make([]byte, len(want))
	if n, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("reading %s: %v (got %x)", what, err, got[:n])
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%s:\n got %x\nwant %x", what, got, want)
	}
	return nil
}

func (c scriptConn) send(b ...byte) error {
	_, err := c.Write(b)
	return err
}

// expectClose waits for the client to close the connection without sending
// more. A client that closes with part of our reply unread (it has no use
// for the rest of a failure) makes its kernel send a reset: that counts too.
func (c scriptConn) expectClose() error {
	var b [1]byte
	if n, err := c.Read(b[:]); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("want the client to close, got %d bytes (%x), %v", n, b[:n], err)
	}
	return nil
}

// startScript runs a scripted SOCKS5 server for one connection and returns
// its address. When the test ends it checks that the script ran and succeeded.
func startScript(t *testing.T, script func(c scriptConn) error) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			done <- fmt.Errorf("accept: %v", err)
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		done <- script(scriptConn{c})
	}()
	t.Cleanup(func() {
		ln.Close()
		if err := <-done; err != nil {
			t.Errorf("scripted server: %v", err)
		}
	})
	return ln.Addr().String()
}

// Wire messages.
var (
	greetNoAuth   = []byte{5, 1, 0}
	greetUserPass = []byte{5, 2, 0, 2}
	okIPv4Reply   = []byte{5, 0, 0, 1, 127, 0, 0, 1, 0x9c, 0x40}
)

// connectName is the CONNECT request for name:port (ATYP 3).
func connectName(name string, port uint16) []byte {
	b := append([]byte{5, 1, 0, 3, byte(len(name))}, name...)
	return append(b, byte(port>>8), byte(port))
}

// TestSOCKS5Wire asserts the exact bytes the dialer sends, and that bytes
// the server sends right after its CONNECT reply reach the caller intact.
func TestSOCKS5Wire(t *testing.T) {
	const fromDest = "hello from the destination"
	for _, tc := range []struct {
		name       string
		user, pass string
		dest       string
		script     func(c scriptConn) error
	}{
		{
			name: "name, no authentication, IPv4 reply",
			dest: "g.whatsapp.net:5222",
			script: func(c scriptConn) error {
				if err := c.expect("greeting", greetNoAuth); err != nil {
					return err
				}
				if err := c.send(5, 0); err != nil {
					return err
				}
				if err := c.expect("connect request", connectName("g.whatsapp.net", 5222)); err != nil {
					return err
				}
				// The reply and the destination's first bytes in one segment.
				return c.send(append(append([]byte{}, okIPv4Reply...), fromDest...)...)
			},
		},
		{
			name: "username/password, IPv4 literal, domain reply",
			user: "alice", pass: "s3cr3t",
			dest: "157.240.1.53:443",
			script: func(c scriptConn) error {
				if err := c.expect("greeting", greetUserPass); err != nil {
					return err
				}
				if err := c.send(5, 2); err != nil {
					return err
				}
				if err := c.expect("username/password request", []byte("\x01\x05alice\x06s3cr3t")); err != nil {
					return err
				}
				if err := c.send(1, 0); err != nil {
					return err
				}
				if err := c.expect("connect request", []byte{5, 1, 0, 1, 157, 240, 1, 53, 0x01, 0xbb}); err != nil {
					return err
				}
				reply := append([]byte{5, 0, 0, 3, 9}, "exit.test"...)
				reply = append(reply, 0x12, 0x34)
				return c.send(append(reply, fromDest...)...)
			},
		},
		{
			name: "credentials offered, server picks no authentication, IPv6 literal and reply",
			user: "alice", pass: "s3cr3t",
			dest: "[2a03:2880:f200::1]:443",
			script: func(c scriptConn) error {
				if err := c.expect("greeting", greetUserPass); err != nil {
					return err
				}
				if err := c.send(5, 0); err != nil {
					return err
				}
				req := []byte{5, 1, 0, 4, 0x2a, 0x03, 0x28, 0x80, 0xf2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x01, 0xbb}
				if err := c.expect("connect request", req); err != nil {
					return err
				}
				reply := make([]byte, 4+16+2)
				copy(reply, []byte{5, 0, 0, 4})
				reply[19] = 1
				return c.send(append(reply, fromDest...)...)
			},
		},
		{
			name: "IPv4-mapped IPv6 literal goes as IPv4; auth reply version 5 tolerated",
			user: "u", pass: "p",
			dest: "[::ffff:127.0.0.1]:80",
			script: func(c scriptConn) error {
				if err := c.expect("greeting", greetUserPass); err != nil {
					return err
				}
				if err := c.send(5, 2); err != nil {
					return err
				}
				if err := c.expect("username/password request", []byte("\x01\x01u\x01p")); err != nil {
					return err
				}
				if err := c.send(5, 0); err != nil {
					return err
				}
				if err := c.expect("connect request", []byte{5, 1, 0, 1, 127, 0, 0, 1, 0, 80}); err != nil {
					return err
				}
				return c.send(append(append([]byte{}, okIPv4Reply...), fromDest...)...)
			},
		},
		{
			name: "255-byte name",
			dest: strings.Repeat("a", 255) + ":1",
			script: func(c scriptConn) error {
				if err := c.expect("greeting", greetNoAuth); err != nil {
					return err
				}
				if err := c.send(5, 0); err != nil {
					return err
				}
				if err := c.expect("connect request", connectName(strings.Repeat("a", 255), 1)); err != nil {
					return err
				}
				// A reply whose bound name is 255 bytes long too.
				reply := append([]byte{5, 0, 0, 3, 255}, strings.Repeat("b", 255)...)
				reply = append(reply, 0, 1)
				return c.send(append(reply, fromDest...)...)
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server := startScript(t, func(c scriptConn) error {
				if err := tc.script(c); err != nil {
					return err
				}
				// Then echo what the caller sends, once.
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err != nil {
					return fmt.Errorf("reading the caller's bytes: %v", err)
				}
				if err := c.send(buf...); err != nil {
					return err
				}
				return c.expectClose()
			})
			conn := mustDial(t, newSOCKS5Dialer(t, tc.user, tc.pass, server), tc.dest)
			assertTCPConn(t, conn)
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			got := make([]byte, len(fromDest))
			if _, err := io.ReadFull(conn, got); err != nil {
				t.Fatalf("reading the destination's first bytes: %v (got %q)", err, got)
			}
			if string(got) != fromDest {
				t.Fatalf("first bytes after the reply: got %q, want %q", got, fromDest)
			}
			assertEchoes(t, conn, "ping")
			conn.Close()
		})
	}
}

// noAuthThenReply is a script that negotiates no authentication, checks the
// CONNECT request for g.whatsapp.net:443, answers with reply and closes.
func noAuthThenReply(reply ...byte) func(c scriptConn) error {
	return func(c scriptConn) error {
		if err := c.expect("greeting", greetNoAuth); err != nil {
			return err
		}
		if err := c.send(5, 0); err != nil {
			return err
		}
		if err := c.expect("connect request", connectName("g.whatsapp.net", 443)); err != nil {
			return err
		}
		return c.send(reply...)
	}
}

func TestSOCKS5WireReplyCodes(t *testing.T) {
	for code, text := range map[byte]string{
		1:    "general SOCKS server failure",
		2:    "connection not allowed by ruleset",
		3:    "network unreachable",
		4:    "host unreachable",
		5:    "destination refused the connection",
		6:    "TTL expired",
		7:    "command not supported",
		8:    "address type not supported",
		9:    "unassigned reply code",
		0xff: "unassigned reply code",
	} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			server := startScript(t, noAuthThenReply(5, code, 0, 1, 0, 0, 0, 0, 0, 0))
			_, err := dialTimeout(newSOCKS5Dialer(t, "", "", server), 5*time.Second, "g.whatsapp.net:443")
			assertDialError(t, err, metrics.KindSOCKS5Refused, fmt.Sprintf("socks5 %s: %s (reply %d)", server, text, code))
		})
	}
	t.Run("cut short after the reply code", func(t *testing.T) {
		server := startScript(t, noAuthThenReply(5, 4))
		_, err := dialTimeout(newSOCKS5Dialer(t, "", "", server), 5*time.Second, "g.whatsapp.net:443")
		assertDialError(t, err, metrics.KindSOCKS5Refused, "socks5 "+server+": host unreachable (reply 4)")
	})
}

func TestSOCKS5WireFailures(t *testing.T) {
	// greetThen is a script that checks greeting and then sends answer and
	// waits for the client to hang up.
	greetThen := func(greeting []byte, answer ...byte) func(c scriptConn) error {
		return func(c scriptConn) error {
			if err := c.expect("greeting", greeting); err != nil {
				return err
			}
			if err := c.send(answer...); err != nil {
				return err
			}
			return c.expectClose()
		}
	}
	for _, tc := range []struct {
		name       string
		user, pass string
		script     func(c scriptConn) error
		kind, msg  string // msg after "socks5 <server>: "
	}{
		{
			name: "not a SOCKS5 server", script: greetThen(greetNoAuth, []byte("HTTP/1.1 400 Bad Request\r\n\r\n")...),
			kind: metrics.KindSOCKS5Protocol, msg: "greeting: unexpected reply version 0x48 (not a SOCKS5 server?)",
		},
		{
			name: "SOCKS4 reply version", script: greetThen(greetNoAuth, 4, 0),
			kind: metrics.KindSOCKS5Protocol, msg: "greeting: unexpected reply version 0x04 (not a SOCKS5 server?)",
		},
		{
			name: "method not offered", script: greetThen(greetNoAuth, 5, 0x80),
			kind: metrics.KindSOCKS5Protocol, msg: "greeting: server chose authentication method 0x80, which was not offered",
		},
		{
			name: "GSSAPI", script: greetThen(greetNoAuth, 5, 1),
			kind: metrics.KindSOCKS5Protocol, msg: "greeting: server chose GSSAPI authentication, which was not offered",
		},
		{
			name: "no acceptable method, no credentials", script: greetThen(greetNoAuth, 5, 0xff),
			kind: metrics.KindSOCKS5Auth, msg: "no acceptable authentication method (server requires authentication; none configured)",
		},
		{
			name: "username/password chosen, no credentials", script: greetThen(greetNoAuth, 5, 2),
			kind: metrics.KindSOCKS5Auth, msg: "no acceptable authentication method (server requires username/password; none configured)",
		},
		{
			name: "no acceptable method, with credentials", user: "u", pass: "hunter2", script: greetThen(greetUserPass, 5, 0xff),
			kind: metrics.KindSOCKS5Auth, msg: "no acceptable authentication method (server accepts neither no authentication nor username/password)",
		},
		{
			name: "closed after the greeting", script: func(c scriptConn) error { return c.expect("greeting", greetNoAuth) },
			kind: metrics.KindSOCKS5Protocol, msg: "greeting: server closed the connection (EOF)",
		},
		{
			name: "half a method reply", script: func(c scriptConn) error {
				if err := c.expect("greeting", greetNoAuth); err != nil {
					return err
				}
				return c.send(5)
			},
			kind: metrics.KindSOCKS5Protocol, msg: "greeting: server closed the connection (unexpected EOF)",
		},
		{
			name: "credentials rejected", user: "u", pass: "hunter2", script: func(c scriptConn) error {
				if err := c.expect("greeting", greetUserPass); err != nil {
					return err
				}
				if err := c.send(5, 2); err != nil {
					return err
				}
				if err := c.expect("username/password request", []byte("\x01\x01u\x07hunter2")); err != nil {
					return err
				}
				if err := c.send(1, 1); err != nil {
					return err
				}
				return c.expectClose()
			},
			kind: metrics.KindSOCKS5Auth, msg: "username/password rejected (status 1)",
		},
		{
			name: "credentials rejected by closing", user: "u", pass: "hunter2", script: func(c scriptConn) error {
				if err := c.expect("greeting", greetUserPass); err != nil {
					return err
				}
				if err := c.send(5, 2); err != nil {
					return err
				}
				return c.expect("username/password request", []byte("\x01\x01u\x07hunter2"))
			},
			kind: metrics.KindSOCKS5Auth, msg: "username/password rejected (server closed the connection without a status)",
		},
		{
			name: "bad authentication reply version", user: "u", pass: "hunter2", script: func(c scriptConn) error {
				if err := c.expect("greeting", greetUserPass); err != nil {
					return err
				}
				if err := c.send(5, 2); err != nil {
					return err
				}
				if err := c.expect("username/password request", []byte("\x01\x01u\x07hunter2")); err != nil {
					return err
				}
				if err := c.send(2, 0); err != nil {
					return err
				}
				return c.expectClose()
			},
			kind: metrics.KindSOCKS5Protocol, msg: "authentication: unexpected reply version 0x02",
		},
		{
			name: "bad CONNECT reply version", script: noAuthThenReply(4, 0x5a, 0, 80, 127, 0, 0, 1),
			kind: metrics.KindSOCKS5Protocol, msg: "connect: unexpected reply version 0x04",
		},
		{
			name: "unknown address type in reply", script: noAuthThenReply(5, 0, 0, 7, 1, 2, 3, 4, 5, 6),
			kind: metrics.KindSOCKS5Protocol, msg: "connect: reply has unknown address type 0x07",
		},
		{
			name: "truncated success reply", script: noAuthThenReply(5, 0, 0, 1, 127, 0),
			kind: metrics.KindSOCKS5Protocol, msg: "connect: server closed the connection (unexpected EOF)",
		},
		{
			name: "truncated domain in reply", script: noAuthThenReply(5, 0, 0, 3, 10, 'a', 'b'),
			kind: metrics.KindSOCKS5Protocol, msg: "connect: server closed the connection (unexpected EOF)",
		},
		{
			name: "closed instead of a CONNECT reply", script: func(c scriptConn) error {
				if err := c.expect("greeting", greetNoAuth); err != nil {
					return err
				}
				if err := c.send(5, 0); err != nil {
					return err
				}
				return c.expect("connect request", connectName("g.whatsapp.net", 443))
			},
			kind: metrics.KindSOCKS5Protocol, msg: "connect: server closed the connection (EOF)",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server := startScript(t, tc.script)
			_, err := dialTimeout(newSOCKS5Dialer(t, tc.user, tc.pass, server), 5*time.Second, "g.whatsapp.net:443")
			assertDialError(t, err, tc.kind, "socks5 "+server+": "+tc.msg)
			if tc.pass != "" && strings.Contains(err.Error(), tc.pass) {
				t.Fatalf("error reveals the password: %v", err)
			}
		})
	}
}

// TestSOCKS5WireDeadlineCleared: the handshake's deadline does not outlive
// DialContext, and cancelling the dial's context afterwards leaves the
// connection alone.
func TestSOCKS5WireDeadlineCleared(t *testing.T) {
	release := make(chan struct{})
	server := startScript(t, func(c scriptConn) error {
		if err := c.expect("greeting", greetNoAuth); err != nil {
			return err
		}
		if err := c.send(5, 0); err != nil {
			return err
		}
		if err := c.expect("connect request", connectName("g.whatsapp.net", 443)); err != nil {
			return err
		}
		if err := c.send(okIPv4Reply...); err != nil {
			return err
		}
		<-release // until the dial's deadline has passed
		if err := c.send([]byte("late")...); err != nil {
			return err
		}
		return c.expectClose()
	})
	d := newSOCKS5Dialer(t, "", "", server)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	deadline, _ := ctx.Deadline()
	conn, err := d.DialContext(ctx, "tcp", "g.whatsapp.net:443")
	cancel()
	if err != nil {
		close(release)
		t.Fatal(err)
	}
	defer conn.Close()
	testutil.WaitFor(t, 5*time.Second, "the dial deadline to pass", func() bool { return time.Now().After(deadline.Add(50 * time.Millisecond)) })
	close(release)
	got := make([]byte, 4)
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != "late" {
		t.Fatalf("read after the dial's deadline: %q, %v", got, err)
	}
}

// FuzzSOCKS5Reply feeds arbitrary server replies to the handshake: it must
// never panic, never read past the reply, and succeed only on a well-formed one.
func FuzzSOCKS5Reply(f *testing.F) {
	f.Add([]byte{5, 0}, []byte(okIPv4Reply), false)
	f.Add([]byte{5, 2, 1, 0}, []byte{5, 0, 0, 3, 3, 'a', 'b', 'c', 0, 1}, true)
	f.Add([]byte{5, 0xff}, []byte{}, true)
	f.Add([]byte{5, 0}, []byte{5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2}, false)
	f.Add([]byte{5, 0}, []byte{5, 1}, false)
	f.Fuzz(func(t *testing.T, negotiation, reply []byte, withAuth bool) {
		var auth []byte
		if withAuth {
			auth = socksUserPass("u", "p")
		}
		req, err := appendSocksConnect(nil, "g.whatsapp.net:443")
		if err != nil {
			t.Fatal(err)
		}
		data := append(append(append([]byte{}, negotiation...), reply...), "DESTINATION"...)
		in := bytes.NewReader(data)
		rw := struct {
			io.Reader
			io.Writer
		}{in, io.Discard}
		buf := make([]byte, socksMsgLen)
		err = socksNegotiate(rw, socksGreeting(withAuth), auth, buf)
		if err == nil {
			err = socksConnect(rw, req, buf)
		}
		if err != nil {
			var re *socksReplyError
			var se *socksStepError
			if !errors.As(err, &re) && !errors.As(err, &se) {
				t.Fatalf("unexpected error type %T: %v", err, err)
			}
			return
		}
		// Success: the handshake consumed exactly the replies.
		want := 2 // method selection
		if data[1] == methodUserPass {
			want += 2 // authentication status
		}
		atyp := data[want+3]
		want += 4
		switch atyp {
		case atypIPv4:
			want += 4 + 2
		case atypIPv6:
			want += 16 + 2
		case atypDomain:
			want += 1 + int(data[want]) + 2
		default:
			t.Fatalf("success with address type %d", atyp)
		}
		if consumed := len(data) - in.Len(); consumed != want {
			t.Fatalf("the handshake consumed %d bytes of %x, want %d", consumed, data, want)
		}
	})
}
