//go:build linux

// Command bench measures caddy-waproxy side by side with the official
// WhatsApp proxy's setup (HAProxy 2.6 in TCP mode, shaped like its config),
// HAProxy with 16 KiB buffers, stock caddy-l4, a direct connection, and the
// cost of a SOCKS5 exit hop (caddy-waproxy through microsocks, and
// microsocks alone), on
// WhatsApp-shaped traffic over loopback, plain and with TLS terminated by
// the proxy (HAProxy `bind ... ssl crt`, as the official port 443), and
// writes a markdown report.
//
//	go run ./bench -caddy ./caddy                 # the full comparison, about 14 minutes on 2 cores
//	go run ./bench -caddy ./caddy -quick          # under a minute: a smoke test of the harness
//	go run ./bench -caddy ./caddy -figures tls    # the TLS figures only
//
// Every target proxies to an edge that the bench runs itself on 127.0.0.1.
// Targets are alternated within each round, each run gets a freshly started
// proxy process, and the report gives medians over rounds and ratios computed
// within a round. See docs/performance.md.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// config is the command line.
type config struct {
	caddy, haproxy, out string
	caddyB              string
	microsocks          string
	rounds              int
	duration            time.Duration
	workers, streams    int
	idleConns           int
	idleFrame           int
	scaling             bool // the idle figure at 1/9, 5/9 and 9/9 of idleConns, each on a fresh process
	stableMax           time.Duration
	maxTime             time.Duration
	targets, figures    []string
	quick, keep         bool
	args                []string

	// the tls figure (and, for the client, the tlsbulk figure)
	tlsCerts     []string // rows: rsa2048, rsa4096, p256, default
	tlsIdleCert  string   // the row the idle TLS figure uses
	tlsIdleConns int
	tlsWorkers   int
	tlsGroups    string // x25519 or default
}

func main() {
	os.Exit(run())
}

func run() int {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	nofile, err := raiseNoFile(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// A hard ceiling on top of the time budget, so the bench always ends.
	ctx, cancel := context.WithTimeout(ctx, cfg.maxTime+3*time.Minute)
	defer cancel()

	b, err := newBench(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	defer b.close()
	b.info.nofile = nofile
	b.runAll(ctx)

	var doc bytes.Buffer
	b.writeDocument(&doc)
	if dir := filepath.Dir(cfg.out); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
	}
	if err := os.WriteFile(cfg.out, doc.Bytes(), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	fmt.Println()
	b.res.writeTables(os.Stdout)
	for _, t := range b.res.targets {
		if t.notRun != "" {
			fmt.Printf("\n%s not run: %s", t.name, t.notRun)
		}
	}
	for _, w := range b.res.warnings() {
		fmt.Printf("\n⚠ %s", w)
	}
	fmt.Printf("\n\nreport written to %s\n", cfg.out)
	if len(b.res.fails) > 0 || b.interrupted != "" {
		fmt.Fprintf(os.Stderr, "bench: %d run(s) failed%s; see the report\n", len(b.res.fails), b.interrupted)
		return 1
	}
	return 0
}

func parseFlags(args []string) (*config, error) {
	cfg := &config{args: args}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.StringVar(&cfg.caddy, "caddy", "./caddy", "the Caddy binary built with this plugin and caddy-l4")
	fs.StringVar(&cfg.caddyB, "caddy-b", "", "a second such build, run as the waproxy-b target next to waproxy (-caddy): a change's after against its before (just ab)")
	fs.StringVar(&cfg.haproxy, "haproxy", "/usr/sbin/haproxy", "the HAProxy binary (Debian's haproxy package)")
	fs.StringVar(&cfg.microsocks, "microsocks", "/usr/bin/microsocks", "the SOCKS5 server of the waproxy-socks5 and microsocks targets (Debian's microsocks package)")
	fs.StringVar(&cfg.out, "out", "docs/bench-latest.md", "where to write the markdown report")
	fs.IntVar(&cfg.rounds, "rounds", 3, "rounds; each runs every target once per figure")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "measuring time of the chat and throughput runs")
	fs.IntVar(&cfg.workers, "workers", 32, "concurrent chat workers")
	fs.IntVar(&cfg.streams, "streams", 16, "concurrent throughput streams")
	fs.IntVar(&cfg.idleConns, "idle-conns", 9000, "connections held for the idle memory figure")
	fs.BoolVar(&cfg.scaling, "scaling", true, "idle figure: hold 1/9, 5/9 and all of -idle-conns, each on a freshly started proxy (false: one run, memory read at those counts as it fills)")
	fs.IntVar(&cfg.idleFrame, "idle-frame", 0, "idle figures: each held connection first carries a frame of this many bytes (0: the hello only)")
	fs.DurationVar(&cfg.stableMax, "stable-wait", 20*time.Second, "longest wait for a proxy's RSS to settle")
	fs.DurationVar(&cfg.maxTime, "max-time", 14*time.Minute, "time budget; no new run starts after it")
	targets := fs.String("targets", "direct,haproxy-official,haproxy-16k,caddy-l4,waproxy,waproxy-socks5,microsocks", "targets to run, in round order")
	figures := fs.String("figures", strings.Join(figureNames, ","), "figures to measure: chat (conn/s, latency), idle (bytes per connection), bulk (MB/s), tls (TLS conn/s and bytes per idle TLS connection), tlsbulk (TLS MB/s, P-256 certificate)")
	tlsCerts := fs.String("tls-certs", "rsa2048,p256,default", "tls figure: certificate rows for TLS conn/s (rsa2048, rsa4096, p256: every target serves the same; default: each target's own)")
	fs.StringVar(&cfg.tlsIdleCert, "tls-idle-cert", "p256", "tls figure: the certificate row of the idle TLS figure")
	fs.IntVar(&cfg.tlsIdleConns, "tls-idle-conns", 3000, "tls figure: TLS connections held for the idle TLS figure")
	fs.IntVar(&cfg.tlsWorkers, "tls-workers", 8, "tls figure: concurrent TLS workers (a handshake is CPU-bound)")
	fs.StringVar(&cfg.tlsGroups, "tls-groups", "x25519", "tls and tlsbulk figures: key exchange groups the client offers (x25519, or default: Go's list, with X25519MLKEM768)")
	fs.BoolVar(&cfg.quick, "quick", false, "smoke test: 1 round, 1s runs, 500 idle connections, 300 idle TLS connections, P-256 row only (explicit flags win)")
	fs.BoolVar(&cfg.keep, "keep", false, "keep the temporary directory with the configs and logs")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if cfg.quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := map[string]func(){
			"rounds":         func() { cfg.rounds = 1 },
			"duration":       func() { cfg.duration = time.Second },
			"idle-conns":     func() { cfg.idleConns = 500 },
			"stable-wait":    func() { cfg.stableMax = 5 * time.Second },
			"max-time":       func() { cfg.maxTime = 3 * time.Minute },
			"tls-certs":      func() { *tlsCerts = "p256" },
			"tls-idle-conns": func() { cfg.tlsIdleConns = 300 },
		}
		for name, apply := range quick {
			if !set[name] {
				apply()
			}
		}
	}
	known := map[string]bool{}
	for _, t := range allTargets() {
		known[t.name] = true
	}
	for _, s := range strings.Split(*targets, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if !known[s] {
			return nil, fmt.Errorf("unknown target %q in -targets", s)
		}
		cfg.targets = append(cfg.targets, s)
	}
	for _, s := range strings.Split(*figures, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if !slices.Contains(figureNames, s) {
			return nil, fmt.Errorf("unknown figure %q in -figures (%s)", s, strings.Join(figureNames, ", "))
		}
		if !slices.Contains(cfg.figures, s) {
			cfg.figures = append(cfg.figures, s)
		}
	}
	for _, s := range strings.Split(*tlsCerts, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if !slices.Contains(tlsRowNames, s) {
			return nil, fmt.Errorf("unknown certificate %q in -tls-certs (%s)", s, strings.Join(tlsRowNames, ", "))
		}
		if !slices.Contains(cfg.tlsCerts, s) {
			cfg.tlsCerts = append(cfg.tlsCerts, s)
		}
	}
	switch {
	case len(cfg.targets) == 0:
		return nil, errors.New("-targets names no target")
	case len(cfg.figures) == 0:
		return nil, errors.New("-figures names no figure")
	case cfg.rounds < 1 || cfg.rounds > 50:
		return nil, fmt.Errorf("-rounds %d: want 1 to 50", cfg.rounds)
	case cfg.duration < 100*time.Millisecond || cfg.duration > time.Minute:
		return nil, fmt.Errorf("-duration %s: want 100ms to 1m", cfg.duration)
	case cfg.workers < 1 || cfg.workers > 1024:
		return nil, fmt.Errorf("-workers %d: want 1 to 1024", cfg.workers)
	case cfg.streams < 1 || cfg.streams > 256:
		return nil, fmt.Errorf("-streams %d: want 1 to 256", cfg.streams)
	case cfg.idleConns < 9 || cfg.idleConns > 100000:
		return nil, fmt.Errorf("-idle-conns %d: want 9 to 100000", cfg.idleConns)
	case cfg.idleFrame < 0 || cfg.idleFrame > 1<<20:
		return nil, fmt.Errorf("-idle-frame %d: want 0 to 1048576", cfg.idleFrame)
	case cfg.stableMax < time.Second || cfg.stableMax > 5*time.Minute:
		return nil, fmt.Errorf("-stable-wait %s: want 1s to 5m", cfg.stableMax)
	case cfg.maxTime < 10*time.Second || cfg.maxTime > 2*time.Hour:
		return nil, fmt.Errorf("-max-time %s: want 10s to 2h", cfg.maxTime)
	case slices.Contains(cfg.figures, "tls") && len(cfg.tlsCerts) == 0:
		return nil, errors.New("-tls-certs names no certificate")
	case !slices.Contains(tlsRowNames, cfg.tlsIdleCert):
		return nil, fmt.Errorf("-tls-idle-cert %q: want one of %s", cfg.tlsIdleCert, strings.Join(tlsRowNames, ", "))
	case cfg.tlsIdleConns < 1 || cfg.tlsIdleConns > 100000:
		return nil, fmt.Errorf("-tls-idle-conns %d: want 1 to 100000", cfg.tlsIdleConns)
	case cfg.tlsWorkers < 1 || cfg.tlsWorkers > 1024:
		return nil, fmt.Errorf("-tls-workers %d: want 1 to 1024", cfg.tlsWorkers)
	case cfg.tlsGroups != "x25519" && cfg.tlsGroups != "default":
		return nil, fmt.Errorf("-tls-groups %q: want x25519 or default", cfg.tlsGroups)
	}
	return cfg, nil
}

// figureNames are the figures -figures accepts, all measured by default, in
// this order unless -figures gives another.
var figureNames = []string{"chat", "idle", "bulk", "tls", "tlsbulk"}

// raiseNoFile raises the soft descriptor limit to the hard one. Calling
// Setrlimit ourselves also makes the children inherit it (Go otherwise
// restores the original soft limit in the processes it starts). The bench
// holds both ends of every idle connection: the client's and the edge's.
func raiseNoFile(cfg *config) (string, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return "", fmt.Errorf("get RLIMIT_NOFILE: %w", err)
	}
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return "", fmt.Errorf("raise RLIMIT_NOFILE to %d: %w", rl.Max, err)
	}
	held := cfg.idleConns
	if slices.Contains(cfg.figures, "tls") {
		held = max(held, cfg.tlsIdleConns)
	}
	need := uint64(2*held + 4*max(cfg.workers, cfg.tlsWorkers) + 2*cfg.streams + 512)
	if need > rl.Cur {
		return "", fmt.Errorf("RLIMIT_NOFILE is %d, and %d idle connections need about %d descriptors (client and edge ends); lower -idle-conns or -tls-idle-conns", rl.Cur, held, need)
	}
	return fmt.Sprintf("%d (soft = hard)", rl.Cur), nil
}

// bench is one run of the whole comparison.
type bench struct {
	cfg         *config
	bin         *binaries
	dir         string
	echo, bulk  *edge
	res         *results
	info        machine
	seq         int
	deadline    time.Time
	roundsDone  int
	interrupted string
	certs       map[string]*certFiles // the tls figure's generated certificates, by kind
	tlsClient   *tls.Config
}

// selectTargets returns the named targets, in the order given.
func selectTargets(names []string) []*target {
	var ts []*target
	for _, t := range allTargets() {
		if slices.Contains(names, t.name) {
			ts = append(ts, t)
		}
	}
	slices.SortStableFunc(ts, func(a, c *target) int {
		return slices.Index(names, a.name) - slices.Index(names, c.name)
	})
	return ts
}

func newBench(ctx context.Context, cfg *config) (*bench, error) {
	// the proxies run in a temporary directory: make relative paths absolute
	for _, p := range []*string{&cfg.caddy, &cfg.caddyB, &cfg.haproxy, &cfg.microsocks} {
		if *p == "" {
			continue
		}
		if abs, err := filepath.Abs(*p); err == nil {
			*p = abs
		}
	}
	b := &bench{cfg: cfg, bin: &binaries{caddy: cfg.caddy, caddyB: cfg.caddyB, haproxy: cfg.haproxy, microsocks: cfg.microsocks}}
	b.info.started = time.Now()
	b.deadline = b.info.started.Add(cfg.maxTime)
	ts := selectTargets(cfg.targets)
	resolveTargets(ctx, ts, b.bin, b.hasTLS())
	b.res = newResults(ts, b.metrics(), cfg.rounds, b.checkpoints())
	var err error
	if b.dir, err = os.MkdirTemp("", "waproxy-bench-"); err != nil {
		return nil, err
	}
	if b.hasTLS() {
		b.tlsClient = clientTLS(cfg.tlsGroups)
		b.certs = map[string]*certFiles{}
		haproxy := slices.ContainsFunc(ts, func(t *target) bool { return t.kind == kindHAProxy && t.notRun == "" })
		for _, kind := range certsNeeded(b.tlsRows(), haproxy) {
			t0 := time.Now()
			if b.certs[kind], err = genCert(b.dir, kind); err != nil {
				b.close()
				return nil, fmt.Errorf("generate a %s certificate: %w", kind, err)
			}
			b.logf("generated a %s certificate (CA and leaf) in %s", certKinds[kind], time.Since(t0).Round(time.Millisecond))
		}
	}
	if b.echo, err = startEdge(false, 0); err == nil {
		b.bulk, err = startEdge(true, 2*cfg.duration+2*opTimeout)
	}
	if err != nil {
		b.close()
		return nil, err
	}
	b.info.fill(ctx, cfg)
	return b, nil
}

// close stops the edges and removes the temporary directory (unless -keep).
func (b *bench) close() {
	for _, e := range []*edge{b.echo, b.bulk} {
		if e != nil {
			e.close()
		}
	}
	if b.cfg.keep {
		fmt.Fprintln(os.Stderr, "bench: configs and logs kept in", b.dir)
		return
	}
	os.RemoveAll(b.dir)
}

// has reports whether figure f was asked for.
func (b *bench) has(f string) bool { return slices.Contains(b.cfg.figures, f) }

// hasTLS reports whether a figure over TLS was asked for.
func (b *bench) hasTLS() bool { return b.has("tls") || b.has("tlsbulk") }

// tlsRows are the certificate rows the TLS figures asked for use.
func (b *bench) tlsRows() []string {
	var rows []string
	if b.has("tls") {
		rows = append(slices.Clone(b.cfg.tlsCerts), b.cfg.tlsIdleCert)
	}
	if b.has("tlsbulk") {
		rows = append(rows, tlsBulkRow)
	}
	return rows
}

// metrics are the report's rows for the figures asked for.
func (b *bench) metrics() []metric {
	var ms []metric
	if b.has("chat") {
		ms = append(ms,
			metric{key: "chat", label: fmt.Sprintf("chat conn/s, %d workers, %s", b.cfg.workers, b.cfg.duration),
				vsDirect: true, format: formatCount},
			metric{key: "p50", label: "chat connect-to-echo p50, ms", vsDirect: true, format: formatMS},
			metric{key: "p99", label: "chat connect-to-echo p99, ms", vsDirect: true, format: formatMS},
			metric{key: "chat-cpu", label: "proxy CPU per chat connection, µs", proxyOnly: true, format: formatCount},
			metric{key: "chat-machine", label: "machine CPU per chat connection (proxy, client and edge), µs", vsDirect: true, format: formatCount})
	}
	if b.has("idle") {
		n := formatCount(float64(b.cfg.idleConns))
		ms = append(ms,
			metric{key: "idle", label: fmt.Sprintf("bytes per idle chat connection, RSS (%s held)", n), proxyOnly: true, format: formatCount},
			metric{key: "idle-pss", label: fmt.Sprintf("bytes per idle chat connection, PSS (%s held)", n), proxyOnly: true, format: formatCount})
	}
	if b.has("bulk") {
		ms = append(ms, metric{key: "bulk", label: fmt.Sprintf("plain MB/s, %d streams, edge→client", b.cfg.streams),
			vsDirect: true, format: formatCount},
			metric{key: "bulk-cpu", label: "proxy CPU per GB relayed, ms", proxyOnly: true, format: formatCount},
			metric{key: "bulk-machine", label: "machine CPU per GB relayed (proxy, client and edge), ms", vsDirect: true, format: formatCount})
	}
	if b.has("tls") {
		for _, row := range b.cfg.tlsCerts {
			same := row != "default"
			ms = append(ms, metric{key: "tls:" + row, tls: true, row: row,
				label:    fmt.Sprintf("TLS conn/s, %s, %d workers, %s", tlsRowLabel(row), b.cfg.tlsWorkers, b.cfg.duration),
				vsDirect: same, proxyOnly: !same, format: formatCount})
		}
		for _, row := range b.cfg.tlsCerts {
			ms = append(ms, metric{key: "tls-cpu:" + row, tls: true, row: row, label: "proxy CPU per TLS connection, µs, " + tlsRowLabel(row),
				proxyOnly: true, format: formatCount})
		}
		idle := fmt.Sprintf("%s held, %s", formatCount(float64(b.cfg.tlsIdleConns)), tlsRowLabel(b.cfg.tlsIdleCert))
		r := b.cfg.tlsIdleCert
		ms = append(ms,
			metric{key: "tls-idle", tls: true, row: r, tlsIdle: true, label: "bytes per idle TLS connection, RSS (" + idle + ")", proxyOnly: true, format: formatCount},
			metric{key: "tls-idle-stack", tls: true, row: r, tlsIdle: true, label: "Go stacks per idle TLS connection, bytes (after a GC)", goOnly: true, format: formatCount},
			metric{key: "tls-idle-heap", tls: true, row: r, tlsIdle: true, label: "Go live heap per idle TLS connection, bytes (after a GC)", goOnly: true, format: formatCount},
			metric{key: "tls-idle-goroutines", tls: true, row: r, tlsIdle: true, label: "goroutines per idle TLS connection", goOnly: true, format: formatFrac})
	}
	if b.has("tlsbulk") {
		ms = append(ms,
			metric{key: "tlsbulk", tls: true, row: tlsBulkRow, tlsBulk: true,
				label:    fmt.Sprintf("TLS MB/s, %d streams, edge→client, %s", b.cfg.streams, tlsRowLabel(tlsBulkRow)),
				vsDirect: true, format: formatCount},
			metric{key: "tlsbulk-cpu", tls: true, row: tlsBulkRow, tlsBulk: true,
				label: "proxy CPU per GB relayed over TLS, ms, " + tlsRowLabel(tlsBulkRow), proxyOnly: true, format: formatCount},
			metric{key: "tlsbulk-machine", tls: true, row: tlsBulkRow, tlsBulk: true,
				label: "machine CPU per GB relayed over TLS (proxy, client and edge), ms, " + tlsRowLabel(tlsBulkRow), vsDirect: true, format: formatCount})
	}
	return ms
}

// checkpoints are the connection counts at which idle memory is measured:
// 1/9, 5/9 and all of -idle-conns (1,000, 5,000 and 9,000 by default). With
// -scaling each is a run of its own on a fresh process; without, one run
// reads memory at each as it fills.
func (b *bench) checkpoints() []int {
	if !b.has("idle") {
		return nil
	}
	return levels(b.cfg.idleConns)
}

func levels(n int) []int { return []int{n / 9, n * 5 / 9, n} }

// warm is how long a chat or bulk run warms up before it measures.
func (b *bench) warm() time.Duration { return min(time.Second, b.cfg.duration/5) }

// runAll runs the rounds: in each, every figure for every target, the
// target order rotated by one per round so that no target always goes first.
func (b *bench) runAll(ctx context.Context) {
	var runnable []*target
	for _, t := range b.res.targets {
		if t.notRun == "" {
			runnable = append(runnable, t)
		} else {
			b.logf("%s not run: %s", t.name, t.notRun)
		}
	}
	for round := range b.cfg.rounds {
		order := append(slices.Clone(runnable[round%max(len(runnable), 1):]), runnable[:round%max(len(runnable), 1)]...)
		var names []string
		for _, t := range order {
			names = append(names, t.name)
		}
		b.res.orders = append(b.res.orders, names)
		for _, s := range b.steps(order) {
			if ctx.Err() != nil {
				b.interrupted = fmt.Sprintf("; interrupted in round %d (%v)", round+1, context.Cause(ctx))
				return
			}
			if time.Now().After(b.deadline) {
				b.interrupted = fmt.Sprintf("; time budget (-max-time %s) spent in round %d", b.cfg.maxTime, round+1)
				return
			}
			switch s.fig {
			case "chat":
				b.runChat(ctx, round, s.t)
			case "idle":
				b.runIdle(ctx, round, s.t, s.held)
			case "bulk":
				b.runBulk(ctx, round, s.t)
			case "tls":
				b.runTLS(ctx, round, s.t, s.row)
			case "tls-idle":
				b.runTLSIdle(ctx, round, s.t)
			case "tlsbulk":
				b.runTLSBulk(ctx, round, s.t)
			}
		}
		b.roundsDone++
	}
}

// step is one run of a round: a figure for a target (and for the tls
// figure, a certificate row).
type step struct {
	fig  string // chat, idle, bulk, tls, tls-idle, tlsbulk
	t    *target
	row  string
	held int // idle: connections to hold (0: -idle-conns, memory read at every checkpoint)
}

// steps lists a round's runs in order: figure by figure, and within the tls
// figure certificate row by row, every target in turn, so that the runs
// whose ratios are taken follow one another; then the idle TLS runs. With
// -scaling the idle figure is one step per connection count, the smallest
// first. Targets without a value for a figure (direct for idle ones; see
// tlsRuns for the tls figure and tlsBulkRuns for tlsbulk) have no step.
func (b *bench) steps(order []*target) []step {
	var out []step
	for _, fig := range b.cfg.figures {
		switch fig {
		case "tls":
			for _, row := range b.cfg.tlsCerts {
				for _, t := range order {
					if t.tlsRuns(row, false) {
						out = append(out, step{fig: "tls", t: t, row: row})
					}
				}
			}
			for _, t := range order {
				if t.tlsRuns(b.cfg.tlsIdleCert, true) {
					out = append(out, step{fig: "tls-idle", t: t, row: b.cfg.tlsIdleCert})
				}
			}
		case "tlsbulk":
			for _, t := range order {
				if t.tlsBulkRuns() {
					out = append(out, step{fig: fig, t: t})
				}
			}
		case "idle":
			counts := []int{0}
			if b.cfg.scaling {
				counts = b.checkpoints()
			}
			for _, n := range counts {
				for _, t := range order {
					if t.kind != kindDirect {
						out = append(out, step{fig: fig, t: t, held: n})
					}
				}
			}
		default:
			for _, t := range order {
				out = append(out, step{fig: fig, t: t})
			}
		}
	}
	return out
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// note records a detail of one run for the report and the console.
func (b *bench) note(round int, t *target, fig, format string, args ...any) {
	s := fmt.Sprintf("round %d, %s, %s: %s (load %s)", round+1, fig, t.name, fmt.Sprintf(format, args...),
		strings.Fields(loadavg())[0])
	b.res.notes = append(b.res.notes, s)
	b.logf("%s", s)
}

// fail records a failed run.
func (b *bench) fail(round int, t *target, fig string, err error) {
	s := fmt.Sprintf("round %d, %s, %s: %v", round+1, fig, t.name, err)
	b.res.fails = append(b.res.fails, s)
	b.logf("FAILED %s", s)
}
