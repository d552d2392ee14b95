// Package ports hands out loopback TCP ports for the tests and the bench to
// listen on a moment later (a Caddy config names its listen address before
// Caddy binds it).
//
// A port from "127.0.0.1:0" is not safe for that: Caddy listens with
// SO_REUSEPORT, so when two of its listeners end up on one port (the same
// port handed out twice, say for a server and the admin endpoint) both
// binds succeed and the kernel shares the connections between them — a
// test's client then talks to the wrong server. The kernel also hands out
// the same port again soon after a listener on it closed, and an outgoing
// connection can take a port of the ephemeral range as its local port.
// Free avoids all three: it never hands out a port twice in a process, and
// picks below the kernel's ephemeral range when there is room, where
// neither port 0 nor an outgoing connection ever lands.
package ports

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// low is the lowest port Free picks from when the range below the
// ephemeral ports is used (ports under it are left to system services).
const low = 10000

var (
	mu     sync.Mutex
	handed = make(map[int]bool) // every port Free returned in this process
)

// Free returns a port on 127.0.0.1 that was free a moment ago (a listen on it
// succeeded) and that Free has not returned before in this process.
func Free() (int, error) {
	mu.Lock()
	defer mu.Unlock()
	if hi := EphemeralLow(); hi > low+1000 {
		for range 200 {
			port := low + rand.IntN(hi-low)
			if !handed[port] && bindable(port) {
				handed[port] = true
				return port, nil
			}
		}
	}
	for range 200 { // no room below the ephemeral range: let the kernel pick
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, fmt.Errorf("find a free port: %w", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if !handed[port] {
			handed[port] = true
			return port, nil
		}
	}
	return 0, errors.New("find a free port: every port tried was taken or handed out before")
}

// bindable reports whether a listen on 127.0.0.1:port succeeds now.
func bindable(port int) bool {
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// EphemeralLow returns the start of the kernel's ephemeral port range, or 0
// when it cannot be read.
func EphemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	lo, err := strconv.Atoi(f[0])
	if err != nil || lo > 65535 {
		return 0
	}
	return lo
}
