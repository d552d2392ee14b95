//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// The SOCKS5 exit hop. waproxy-socks5 is waproxy with its SOCKS5 dialer in
// the path, to a microsocks (Debian's microsocks package) that the bench
// starts with it; microsocks is that exit hop alone (client → microsocks →
// edge), the comparison row for it, since HAProxy has no SOCKS5.

// socksConnect runs a SOCKS5 CONNECT to dest (an IPv4 "ip:port") on c,
// without authentication, one step at a time as RFC 1928 has it: the
// greeting and its answer, then the request and its reply. The deadline is
// the caller's.
func socksConnect(c net.Conn, dest string) error {
	ap, err := netip.ParseAddrPort(dest)
	if err != nil || !ap.Addr().Is4() {
		return fmt.Errorf("socks5: destination %q is not an IPv4 address and port", dest)
	}
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		return fmt.Errorf("socks5 greeting: %w", err)
	}
	var b [10]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return fmt.Errorf("socks5 method: %w", err)
	}
	if b[0] != 5 || b[1] != 0 {
		return fmt.Errorf("socks5 method: got %d %d, want 5 0 (no authentication)", b[0], b[1])
	}
	ip, port := ap.Addr().As4(), ap.Port()
	req := []byte{5, 1, 0, 1, ip[0], ip[1], ip[2], ip[3], byte(port >> 8), byte(port)}
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("socks5 connect: %w", err)
	}
	// The reply: VER REP RSV ATYP, then the bound address and port.
	if _, err := io.ReadFull(c, b[:4]); err != nil {
		return fmt.Errorf("socks5 reply: %w", err)
	}
	if b[0] != 5 || b[1] != 0 {
		return fmt.Errorf("socks5 reply: version %d, code %d; want 5, 0 (succeeded)", b[0], b[1])
	}
	var rest int
	switch b[3] {
	case 1:
		rest = 4 + 2
	case 4:
		rest = 16 + 2
	case 3:
		if _, err := io.ReadFull(c, b[:1]); err != nil {
			return fmt.Errorf("socks5 reply: %w", err)
		}
		rest = int(b[0]) + 2
	default:
		return fmt.Errorf("socks5 reply: address type %d", b[3])
	}
	if _, err := io.CopyN(io.Discard, c, int64(rest)); err != nil {
		return fmt.Errorf("socks5 reply: %w", err)
	}
	return nil
}

// socksConnector returns the connector of the microsocks target: connect to
// the SOCKS5 server at addr and have it connect to dest. The connection it
// returns carries the client's bytes to dest, with no deadline set.
func socksConnector(dest string) connector {
	if ap, err := netip.ParseAddrPort(dest); err != nil || !ap.Addr().Is4() {
		return func(context.Context, *net.Dialer, string) (net.Conn, error) {
			return nil, fmt.Errorf("socks5: destination %q is not an IPv4 address and port", dest)
		}
	}
	return func(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		c.SetDeadline(time.Now().Add(opTimeout))
		if err := socksConnect(c, dest); err != nil {
			c.Close()
			return nil, err
		}
		c.SetDeadline(time.Time{})
		return c, nil
	}
}

// startMicrosocks runs a fresh microsocks on a free loopback port, logging to
// base.log, and waits until it accepts connections. Its pid is the
// measured one for the microsocks target.
func startMicrosocks(ctx context.Context, bin, base string) (*proc, error) {
	listen, err := freeAddr()
	if err != nil {
		return nil, err
	}
	host, port, _ := net.SplitHostPort(listen)
	logf, err := os.Create(base + ".log")
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "-i", host, "-p", port)
	cmd.Dir = filepath.Dir(base)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start microsocks: %w", err)
	}
	p := &proc{addr: listen, pid: cmd.Process.Pid, cmd: cmd, log: base + ".log", exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	listening := func(ctx context.Context, addr string) error {
		c, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
	if err := p.waitReady(ctx, listening, 10*time.Second); err != nil {
		p.stop()
		if errors.Is(err, context.Canceled) {
			return nil, err
		}
		return nil, fmt.Errorf("microsocks did not come up: %w%s", err, p.logTail(5))
	}
	return p, nil
}
