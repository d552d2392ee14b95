package testutil

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// InteropEnv is the environment variable that makes a missing interop peer a
// test failure instead of a skip. CI sets it after installing the peers.
const InteropEnv = "WAPROXY_INTEROP"

// RequireBinary returns the path of an interop peer's executable (from the
// Debian package pkg). When it is missing the test is skipped, or fails when
// WAPROXY_INTEROP=1.
func RequireBinary(t testing.TB, name, pkg string) string {
	t.Helper()
	for _, p := range []string{name, "/usr/sbin/" + name, "/usr/bin/" + name} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if os.Getenv(InteropEnv) == "1" {
		t.Fatalf("%s not found (%s=1): install the Debian package %s", name, InteropEnv, pkg)
	}
	t.Skipf("%s not found: install the Debian package %s, or set %s=1 to make this a failure", name, pkg, InteropEnv)
	return ""
}

// syncBuffer collects a subprocess's output for failure messages.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// StartProcess runs path with args in its own process group, waits until
// addr accepts connections, and kills the whole group (dante forks helpers)
// when the test ends. Its output is logged if the test failed.
func StartProcess(t testing.TB, addr, path string, args ...string) {
	t.Helper()
	cmd := exec.Command(path, args...)
	out := new(syncBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", path, err)
	}
	var exited atomic.Bool
	waited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		exited.Store(true)
		close(waited)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-waited
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(path), out)
		}
	})
	WaitFor(t, 10*time.Second, filepath.Base(path)+" listening on "+addr, func() bool {
		if exited.Load() {
			return true
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	if exited.Load() {
		t.Fatalf("%s exited early: %v\n%s", filepath.Base(path), cmd.ProcessState, out)
	}
}

// StartMicrosocks runs Debian's microsocks on a free loopback port, with
// RFC 1929 username/password authentication when user is not empty, and
// returns its address.
func StartMicrosocks(t testing.TB, user, pass string) string {
	t.Helper()
	bin := RequireBinary(t, "microsocks", "microsocks")
	addr := FreeAddr(t)
	host, port, _ := net.SplitHostPort(addr)
	args := []string{"-i", host, "-p", port}
	if user != "" {
		args = append(args, "-u", user, "-P", pass)
	}
	StartProcess(t, addr, bin, args...)
	return addr
}

// StartDante runs Debian's dante-server (danted 1.4) in the foreground on a
// free loopback port, without authentication, letting loopback clients reach
// anywhere, and returns its address.
func StartDante(t testing.TB) string {
	t.Helper()
	bin := RequireBinary(t, "danted", "dante-server")
	addr := FreeAddr(t)
	host, port, _ := net.SplitHostPort(addr)
	dir := t.TempDir()
	conf := fmt.Sprintf(`logoutput: stderr
internal: %s port = %s
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
	from: 127.0.0.0/8 to: 0.0.0.0/0
	log: error
}
socks pass {
	from: 127.0.0.0/8 to: 0.0.0.0/0
	log: error
}
`, host, port)
	confPath := filepath.Join(dir, "danted.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	StartProcess(t, addr, bin, "-f", confPath, "-p", filepath.Join(dir, "danted.pid"))
	return addr
}
