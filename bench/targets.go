//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/waproxy/caddy-waproxy/internal/ports"
)

type targetKind int

const (
	kindDirect targetKind = iota
	kindHAProxy
	kindCaddy
	kindSOCKS // a SOCKS5 server alone (microsocks): the client speaks SOCKS5 to it
)

// target is one way for the client to reach the edge.
type target struct {
	name      string
	kind      targetKind
	bufsize   int                          // HAProxy's tune.bufsize
	routes    func(edge, socks string) any // Caddy: the layer4 server's routes ("" socks: dial directly)
	tlsRoutes func(edge, socks string) any // Caddy: the routes when it terminates TLS
	// tlsRoutesBefore: those routes for a build without wa_tls_terminate
	tlsRoutesBefore func(edge, socks string) any
	modules         []string // Caddy: modules the binary must have
	tlsModules      []string // Caddy: and those the tls figure needs
	socks           bool     // Caddy: dials through a microsocks started with it
	buildB          bool     // Caddy: runs the -caddy-b build instead of -caddy
	notRun          string   // why the target is not run; "" when it is
}

// baseline is the target the ratios are computed against.
const baseline = "haproxy-official"

// allTargets returns every target, in the order a round visits them.
func allTargets() []*target {
	return []*target{
		{name: "direct", kind: kindDirect},
		{name: "haproxy-official", kind: kindHAProxy, bufsize: 4096},
		{name: "haproxy-16k", kind: kindHAProxy, bufsize: 16384},
		{name: "caddy-l4", kind: kindCaddy, routes: caddyL4Routes, tlsRoutes: caddyL4TLSRoutes,
			modules:    []string{"layer4", "layer4.handlers.proxy"},
			tlsModules: []string{"tls", "pki", "tls.issuance.internal", "layer4.matchers.tls", "layer4.handlers.tls"}},
		{name: "waproxy", kind: kindCaddy, routes: waproxyRoutes, tlsRoutes: waproxyTLSRoutes, tlsRoutesBefore: waproxyTLSRoutesBefore,
			modules: []string{"layer4", "layer4.matchers.wa_xmpp", "layer4.handlers.wa_proxy"},
			tlsModules: []string{"tls", "pki", "tls.issuance.internal", "layer4.matchers.wa_tls",
				"layer4.matchers.wa_silent", "layer4.handlers.subroute", "layer4.handlers.tls"}},
		{name: "waproxy-socks5", kind: kindCaddy, routes: waproxyRoutes, tlsRoutes: waproxyTLSRoutes, tlsRoutesBefore: waproxyTLSRoutesBefore, socks: true,
			modules: []string{"layer4", "layer4.matchers.wa_xmpp", "layer4.handlers.wa_proxy", "wa.dialers.socks5"},
			tlsModules: []string{"tls", "pki", "tls.issuance.internal", "layer4.matchers.wa_tls",
				"layer4.matchers.wa_silent", "layer4.handlers.subroute", "layer4.handlers.tls"}},
		{name: "microsocks", kind: kindSOCKS},
		// waproxy as the -caddy-b build runs it: two builds side by side
		// in one run, for a change's before and after (see buildA/buildB).
		{name: buildB, kind: kindCaddy, routes: waproxyRoutes, tlsRoutes: waproxyTLSRoutes, tlsRoutesBefore: waproxyTLSRoutesBefore, buildB: true,
			modules: []string{"layer4", "layer4.matchers.wa_xmpp", "layer4.handlers.wa_proxy"},
			tlsModules: []string{"tls", "pki", "tls.issuance.internal", "layer4.matchers.wa_tls",
				"layer4.matchers.wa_silent", "layer4.handlers.subroute", "layer4.handlers.tls"}},
	}
}

// The targets of an A/B run: waproxy from -caddy (A) and from -caddy-b (B).
const (
	buildA = "waproxy"
	buildB = "waproxy-b"
)

// tlsRuns reports whether target t has a run in the tls figure's
// certificate row (idle: the idle TLS run). microsocks does not terminate
// TLS. waproxy-socks5 runs the ECDSA P-256 row alone: what the exit hop
// costs does not depend on the certificate, and its other rows and idle TLS
// connections would repeat waproxy's (the hop is behind the TLS
// termination, on a plain socket either way), so they are left out to keep
// the run short. direct has no default certificate.
func (t *target) tlsRuns(row string, idle bool) bool {
	switch {
	case t.kind == kindSOCKS:
		return false
	case t.socks:
		return !idle && row == "p256"
	case t.kind == kindDirect:
		return !idle && row != "default"
	}
	return true
}

// tlsBulkRuns reports whether target t has a run in the tlsbulk figure
// (TLS MB/s). microsocks does not terminate TLS; waproxy-socks5 is left out
// to keep the full run short: the exit hop is behind the TLS termination, on
// a plain socket, and its cost on a stream is the plain bulk figure's.
func (t *target) tlsBulkRuns() bool {
	return t.kind != kindSOCKS && !t.socks
}

// caddyL4Routes is stock caddy-l4: one route, its proxy handler, no matcher.
func caddyL4Routes(edge, _ string) any {
	return []any{map[string]any{
		"handle": []any{map[string]any{
			"handler":   "proxy",
			"upstreams": []any{map[string]any{"dial": []string{edge}}},
		}},
	}}
}

// waproxyRoutes is our plugin: wa_xmpp detection, then wa_proxy with the
// default (direct) dialer, or with the SOCKS5 dialer to socks.
func waproxyRoutes(edge, socks string) any {
	return []any{map[string]any{
		"match":  []any{map[string]any{"wa_xmpp": map[string]any{}}},
		"handle": []any{waProxy(edge, socks, "127.0.0.1")},
	}}
}

// waProxy is a wa_proxy handler to dest allowing allow (none: the default
// allowlist), through the SOCKS5 server socks unless it is "".
func waProxy(dest, socks string, allow ...string) map[string]any {
	h := map[string]any{"handler": "wa_proxy", "destination": dest}
	if len(allow) > 0 {
		h["allow"] = allow
	}
	if socks != "" {
		h["via"] = map[string]any{"dialer": "socks5", "servers": []string{socks}}
	}
	return h
}

// haproxyConfig is HAProxy in TCP mode shaped like the official WhatsApp
// proxy's proxy_config.cfg: the same global and default tunables, one
// frontend, the edge as the only server (no send-proxy, no health check).
// "no strict-limits" lets HAProxy start when the descriptor limit is below
// the 2×maxconn it asks for (it then warns and runs with the limit it has).
// With a PEM file (key + certificate) the frontend terminates TLS as the
// official port 443 does: `bind ... ssl crt <pem>`.
func haproxyConfig(bufsize int, listen, edge, pem string) string {
	bind := listen
	if pem != "" {
		bind += " ssl crt " + pem
	}
	return fmt.Sprintf(`global
    maxconn 27500
    tune.bufsize %d
    no strict-limits

defaults
    mode tcp
    timeout connect 5s
    timeout client 200s
    timeout server 200s
    timeout client-fin 1s
    timeout server-fin 1s

frontend bench
    bind %s
    maxconn 27495
    default_backend edge

backend edge
    server edge %s
`, bufsize, bind, edge)
}

// caddyConfig is a whole Caddy JSON config: admin on a loopback port with no
// persistence, logs at WARN, storage inside dir, one layer4 server, and
// extra apps (tls, pki) when it terminates TLS.
func caddyConfig(admin, listen, dir string, routes any, extra map[string]any) ([]byte, error) {
	apps := map[string]any{"layer4": map[string]any{"servers": map[string]any{
		"bench": map[string]any{"listen": []string{listen}, "routes": routes},
	}}}
	for k, v := range extra {
		apps[k] = v
	}
	return json.MarshalIndent(map[string]any{
		"admin":   map[string]any{"listen": admin, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "WARN"}}},
		"storage": map[string]any{"module": "file_system", "root": filepath.Join(dir, "storage")},
		"apps":    apps,
	}, "", "\t")
}

// binaries are the programs the targets run.
type binaries struct {
	caddy, haproxy, microsocks string
	caddyB                     string          // -caddy-b: the build of the waproxy-b target ("" none)
	caddyModules               map[string]bool // from caddy list-modules
	caddyBModules              map[string]bool // the same for caddyB
}

// modulesFor is the module list of the Caddy binary target t runs.
func (bin *binaries) modulesFor(t *target) map[string]bool {
	if t.buildB {
		return bin.caddyBModules
	}
	return bin.caddyModules
}

// caddyFor is the Caddy binary target t runs.
func (bin *binaries) caddyFor(t *target) string {
	if t.buildB {
		return bin.caddyB
	}
	return bin.caddy
}

// listModules checks that the Caddy binary at path exists and returns its
// modules.
func listModules(ctx context.Context, path string) (map[string]bool, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("%s not found (build it: just build, or go tool xcaddy build ... --output %s)", path, path)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	out, err := exec.CommandContext(cctx, path, "list-modules").Output()
	cancel()
	if err != nil {
		return nil, fmt.Errorf("%s list-modules: %w", path, err)
	}
	mods := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		mods[strings.TrimSpace(sc.Text())] = true
	}
	return mods, nil
}

// resolveTargets checks the binaries and modules each target needs (with
// withTLS, also those of the tls figure) and sets notRun on those that
// cannot run.
func resolveTargets(ctx context.Context, ts []*target, bin *binaries, withTLS bool) {
	var haproxyErr, caddyErr, socksErr error
	if _, err := os.Stat(bin.haproxy); err != nil {
		haproxyErr = fmt.Errorf("%s not found (apt-get install haproxy)", bin.haproxy)
	}
	if _, err := os.Stat(bin.microsocks); err != nil {
		socksErr = fmt.Errorf("%s not found (apt-get install microsocks)", bin.microsocks)
	}
	bin.caddyModules, caddyErr = listModules(ctx, bin.caddy)
	caddyBErr := errors.New("no -caddy-b build given")
	if bin.caddyB != "" && slices.ContainsFunc(ts, func(t *target) bool { return t.buildB }) {
		bin.caddyBModules, caddyBErr = listModules(ctx, bin.caddyB)
	}
	for _, t := range ts {
		switch t.kind {
		case kindHAProxy:
			if haproxyErr != nil {
				t.notRun = haproxyErr.Error()
			}
		case kindSOCKS:
			if socksErr != nil {
				t.notRun = socksErr.Error()
			}
		case kindCaddy:
			mods, err := bin.caddyModules, caddyErr
			if t.buildB {
				mods, err = bin.caddyBModules, caddyBErr
			}
			if err != nil {
				t.notRun = err.Error()
				continue
			}
			if t.socks && socksErr != nil {
				t.notRun = socksErr.Error()
				continue
			}
			var missing []string
			need := t.modules
			if withTLS {
				need = append(slices.Clone(need), t.tlsModules...)
			}
			for _, m := range need {
				if !mods[m] {
					missing = append(missing, m)
				}
			}
			if len(missing) > 0 {
				t.notRun = fmt.Sprintf("%s lacks module(s) %s", bin.caddyFor(t), strings.Join(missing, ", "))
			}
		}
	}
}

// proc is a started target: where clients connect and, for a proxy, its
// process.
type proc struct {
	addr    string
	pid     int       // 0 for direct
	admin   string    // Caddy: its admin endpoint
	dial    connector // how a client connects (nil: plain TCP)
	exit    *proc     // waproxy-socks5: the microsocks it dials through
	cmd     *exec.Cmd
	log     string
	exited  chan struct{}
	cleanup func() // direct over TLS: stops the TLS edge
}

// connector returns how a client connects to p (plain TCP, or SOCKS5 to the
// edge for the microsocks target).
func (p *proc) connector() connector {
	if p.dial != nil {
		return p.dial
	}
	return dialTCP
}

// start runs a fresh instance of t in front of edge e and waits until an
// exchange with e goes through it (edge.probe: the hello comes back, or the
// bulk stream starts). With ts the instance terminates TLS (see tlsServe)
// and the probe goes through TLS; a direct target is then a TLS server of
// its own that serves its connections as e does.
func (t *target) start(ctx context.Context, dir string, seq int, bin *binaries, e *edge, ts *tlsServe) (*proc, error) {
	edge := e.addr()
	probe := func(ctx context.Context, addr string) error { return e.probe(ctx, dialTCP, addr) }
	if ts != nil {
		probe = func(ctx context.Context, addr string) error { return ts.probe(ctx, e, addr) }
	}
	base := filepath.Join(dir, fmt.Sprintf("%s-%d", t.name, seq))
	if t.kind == kindSOCKS {
		if ts != nil {
			return nil, errors.New("microsocks does not terminate TLS")
		}
		p, err := startMicrosocks(ctx, bin.microsocks, base)
		if err != nil {
			return nil, err
		}
		p.dial = socksConnector(edge)
		if err := p.waitReady(ctx, func(ctx context.Context, addr string) error { return e.probe(ctx, p.dial, addr) }, 10*time.Second); err != nil {
			p.stop()
			return nil, fmt.Errorf("no exchange through microsocks: %w%s", err, p.logTail(5))
		}
		return p, nil
	}
	var exit *proc
	if t.socks {
		var err error
		if exit, err = startMicrosocks(ctx, bin.microsocks, base+"-microsocks"); err != nil {
			return nil, err
		}
	}
	p, err := t.startProxy(ctx, dir, base, bin, e, exit, ts, probe)
	if err != nil && exit != nil {
		exit.stop()
	}
	return p, err
}

// startProxy starts a proxy process in front of e (HAProxy or Caddy; Caddy
// dialling through exit when it is not nil) or, for direct over TLS, a TLS
// edge that serves its connections as e does.
func (t *target) startProxy(ctx context.Context, dir, base string, bin *binaries, e *edge, exit *proc, ts *tlsServe,
	probe func(context.Context, string) error) (*proc, error) {
	edge, socks := e.addr(), ""
	if exit != nil {
		socks = exit.addr
	}
	if t.kind == kindDirect {
		if ts == nil {
			return &proc{addr: edge}, nil
		}
		te, err := startTLSEdge(ts.files, e.handle)
		if err != nil {
			return nil, err
		}
		p := &proc{addr: te.Addr().String(), cleanup: func() { te.Close() }}
		if err := probe(ctx, p.addr); err != nil {
			p.stop()
			return nil, fmt.Errorf("TLS edge: %w", err)
		}
		return p, nil
	}
	listen, err := freeAddr()
	if err != nil {
		return nil, err
	}
	var cmd *exec.Cmd
	var admin string
	switch t.kind {
	case kindHAProxy:
		cfg := base + ".cfg"
		pem := ""
		if ts != nil {
			pem = ts.haproxyPEM()
		}
		if err := os.WriteFile(cfg, []byte(haproxyConfig(t.bufsize, listen, edge, pem)), 0o600); err != nil {
			return nil, err
		}
		// -db: foreground, one process, no master-worker, so the pid we
		// start is the one that holds the connections.
		cmd = exec.Command(bin.haproxy, "-db", "-f", cfg)
	case kindCaddy:
		if admin, err = freeAddr(); err != nil {
			return nil, err
		}
		routes, apps := t.routes(edge, socks), map[string]any(nil)
		if ts != nil {
			routes, apps = t.tlsRoutes(edge, socks), ts.caddyApps()
			if t.tlsRoutesBefore != nil && !bin.modulesFor(t)["layer4.handlers.wa_tls_terminate"] {
				routes = t.tlsRoutesBefore(edge, socks) // an older build (just ab)
			}
		}
		cfg, err := caddyConfig(admin, listen, dir, routes, apps)
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(base+".json", cfg, 0o600); err != nil {
			return nil, err
		}
		cmd = exec.Command(bin.caddyFor(t), "run", "--config", base+".json")
		cmd.Env = append(os.Environ(),
			"HOME="+dir,
			"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
			"XDG_DATA_HOME="+filepath.Join(dir, "data"))
	}
	logf, err := os.Create(base + ".log")
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child keeps its own descriptor
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// The child dies with the bench, even when the bench is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", t.name, err)
	}
	p := &proc{addr: listen, pid: cmd.Process.Pid, admin: admin, exit: exit, cmd: cmd, log: base + ".log", exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	if err := p.waitReady(ctx, probe, 20*time.Second); err != nil {
		p.stop()
		return nil, fmt.Errorf("%s did not come up: %w%s", t.name, err, p.logTail(5))
	}
	return p, nil
}

// waitReady waits until probe (an exchange with the edge through p)
// succeeds, p exits, or limit passes.
func (p *proc) waitReady(ctx context.Context, probe func(context.Context, string) error, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	var last error
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("process exited: %v", p.cmd.ProcessState)
		default:
		}
		if last = probe(ctx, p.addr); last == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no echo after %s: %w", limit, last)
		}
		sleepCtx(ctx, 50*time.Millisecond)
	}
}

// alive reports whether the process is still running.
func (p *proc) alive() bool {
	if p.pid == 0 {
		return true
	}
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// fds returns how many descriptors the process has open (0 for direct).
func (p *proc) fds() (int, error) {
	if p.pid == 0 {
		return 0, nil
	}
	return countFDs(p.pid)
}

// stop ends the process (and its exit hop): SIGTERM, then SIGKILL after 10 s.
func (p *proc) stop() {
	if p.cleanup != nil {
		p.cleanup()
	}
	if p.exit != nil {
		defer p.exit.stop()
	}
	if p.pid == 0 {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return
	case <-time.After(10 * time.Second):
	}
	p.cmd.Process.Kill()
	<-p.exited
}

// logTail returns the last n lines of the process's output, indented, for an
// error message.
func (p *proc) logTail(n int) string {
	b, err := os.ReadFile(p.log)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\n    " + strings.Join(lines, "\n    ")
}

// freeAddr returns a loopback address whose port was free a moment ago,
// below the kernel's ephemeral range when there is room (ports.Free): a port
// in that range can be taken in between by an outgoing connection, or be
// blocked for a minute by one in TIME_WAIT, and the chat runs make tens of
// thousands.
func freeAddr() (string, error) {
	port, err := ports.Free()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("127.0.0.1:%d", port), nil
}

// addrInUse reports whether a start failed because its port was taken in
// between (Caddy: "address already in use"; HAProxy: "Address already in use").
func addrInUse(err error) bool {
	return err != nil && strings.Contains(strings.ToLower(err.Error()), "address already in use")
}

// firstLine runs name with args and returns the first line of its output.
func firstLine(ctx context.Context, name string, args ...string) string {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, name, args...).CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if err != nil && line == "" {
		var ee *exec.Error
		if errors.As(err, &ee) {
			return "not available"
		}
		return err.Error()
	}
	return line
}
