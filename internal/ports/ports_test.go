package ports

import (
	"net"
	"strconv"
	"testing"
)

// TestFreeNeverTwice: many ports in a row are all distinct and listenable,
// and below the ephemeral range when it leaves room (a port from there is
// the one an outgoing connection or a listen on port 0 could take).
func TestFreeNeverTwice(t *testing.T) {
	seen := make(map[int]bool)
	hi := EphemeralLow()
	for range 2000 {
		port, err := Free()
		if err != nil {
			t.Fatal(err)
		}
		if seen[port] {
			t.Fatalf("port %d handed out twice", port)
		}
		seen[port] = true
		if hi > low+1000 && (port < low || port >= hi) {
			t.Fatalf("port %d is outside [%d, %d), below the ephemeral range", port, low, hi)
		}
	}
}

// TestFreeSkipsTakenPorts: a port something listens on is never handed out
// (with 200 of about 22,000 ports held, 2,000 picks that did not check would
// hit one with a probability of 1 - e^-18).
func TestFreeSkipsTakenPorts(t *testing.T) {
	var held []net.Listener
	taken := make(map[int]bool)
	for range 200 {
		port, err := Free()
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, ln)
		taken[port] = true
	}
	defer func() {
		for _, ln := range held {
			ln.Close()
		}
	}()
	// Forget the hand-outs: only the listens keep those ports from coming back.
	mu.Lock()
	for p := range taken {
		delete(handed, p)
	}
	mu.Unlock()
	for range 2000 {
		port, err := Free()
		if err != nil {
			t.Fatal(err)
		}
		if taken[port] {
			t.Fatalf("port %d is listened on but was handed out", port)
		}
	}
}
