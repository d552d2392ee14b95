//go:build linux

// Command bench measures caddy-waproxy side by side with the official
// WhatsApp proxy's setup (HAProxy 2.6 in TCP mode, shaped like its config),
// HAProxy with 16 KiB buffers, stock caddy-l4 and a direct connection, on
// WhatsApp-shaped traffic over loopback, and writes a markdown report.
//
//	go run ./bench -caddy ./caddy                 # the full comparison, under 15 minutes
//	go run ./bench -caddy ./caddy -quick          # about a minute: a smoke test of the harness
//
// Every target proxies to an edge that the bench runs itself on 127.0.0.1.
// Targets are alternated within each round, each run gets a freshly started
// proxy process, and the report gives medians over rounds and ratios computed
// within a round. See docs/performance.md.
package main

import (
	"bytes"
	"context"
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
	rounds              int
	duration            time.Duration
	workers, streams    int
	idleConns           int
	stableMax           time.Duration
	maxTime             time.Duration
	targets, figures    []string
	quick, keep         bool
	args                []string
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
	b.res.writeTable(os.Stdout)
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
	fs.StringVar(&cfg.haproxy, "haproxy", "/usr/sbin/haproxy", "the HAProxy binary (Debian's haproxy package)")
	fs.StringVar(&cfg.out, "out", "docs/bench-latest.md", "where to write the markdown report")
	fs.IntVar(&cfg.rounds, "rounds", 3, "rounds; each runs every target once per figure")
	fs.DurationVar(&cfg.duration, "duration", 5*time.Second, "measuring time of the chat and throughput runs")
	fs.IntVar(&cfg.workers, "workers", 32, "concurrent chat workers")
	fs.IntVar(&cfg.streams, "streams", 16, "concurrent throughput streams")
	fs.IntVar(&cfg.idleConns, "idle-conns", 9000, "connections held for the idle memory figure")
	fs.DurationVar(&cfg.stableMax, "stable-wait", 20*time.Second, "longest wait for a proxy's RSS to settle")
	fs.DurationVar(&cfg.maxTime, "max-time", 14*time.Minute, "time budget; no new run starts after it")
	targets := fs.String("targets", "direct,haproxy-official,haproxy-16k,caddy-l4,waproxy", "targets to run, in round order")
	figures := fs.String("figures", "chat,idle,bulk", "figures to measure: chat (conn/s, latency), idle (bytes per connection), bulk (MB/s)")
	fs.BoolVar(&cfg.quick, "quick", false, "smoke test: 1 round, 1s runs, 500 idle connections (explicit flags win)")
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
			"rounds":      func() { cfg.rounds = 1 },
			"duration":    func() { cfg.duration = time.Second },
			"idle-conns":  func() { cfg.idleConns = 500 },
			"stable-wait": func() { cfg.stableMax = 5 * time.Second },
			"max-time":    func() { cfg.maxTime = 3 * time.Minute },
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
		if s != "chat" && s != "idle" && s != "bulk" {
			return nil, fmt.Errorf("unknown figure %q in -figures (chat, idle, bulk)", s)
		}
		cfg.figures = append(cfg.figures, s)
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
	case cfg.stableMax < time.Second || cfg.stableMax > 5*time.Minute:
		return nil, fmt.Errorf("-stable-wait %s: want 1s to 5m", cfg.stableMax)
	case cfg.maxTime < 10*time.Second || cfg.maxTime > 2*time.Hour:
		return nil, fmt.Errorf("-max-time %s: want 10s to 2h", cfg.maxTime)
	}
	return cfg, nil
}

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
	need := uint64(2*cfg.idleConns + 4*cfg.workers + 2*cfg.streams + 512)
	if need > rl.Cur {
		return "", fmt.Errorf("RLIMIT_NOFILE is %d, and -idle-conns %d needs about %d descriptors (client and edge ends); lower -idle-conns", rl.Cur, cfg.idleConns, need)
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
}

func newBench(ctx context.Context, cfg *config) (*bench, error) {
	// the proxies run in a temporary directory: make relative paths absolute
	for _, p := range []*string{&cfg.caddy, &cfg.haproxy} {
		if abs, err := filepath.Abs(*p); err == nil {
			*p = abs
		}
	}
	b := &bench{cfg: cfg, bin: &binaries{caddy: cfg.caddy, haproxy: cfg.haproxy}}
	b.info.started = time.Now()
	b.deadline = b.info.started.Add(cfg.maxTime)
	var ts []*target
	for _, t := range allTargets() {
		if slices.Contains(cfg.targets, t.name) {
			ts = append(ts, t)
		}
	}
	// Order as given on the command line.
	slices.SortStableFunc(ts, func(a, c *target) int {
		return slices.Index(cfg.targets, a.name) - slices.Index(cfg.targets, c.name)
	})
	resolveTargets(ctx, ts, b.bin)
	b.res = newResults(ts, b.metrics(), cfg.rounds, b.checkpoints())
	var err error
	if b.dir, err = os.MkdirTemp("", "waproxy-bench-"); err != nil {
		return nil, err
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

// metrics are the report's rows for the figures asked for.
func (b *bench) metrics() []metric {
	var ms []metric
	if b.has("chat") {
		ms = append(ms,
			metric{key: "chat", label: fmt.Sprintf("chat conn/s, %d workers, %s", b.cfg.workers, b.cfg.duration),
				vsDirect: true, format: formatCount},
			metric{key: "p50", label: "chat connect-to-echo p50, ms", vsDirect: true, format: formatMS},
			metric{key: "p99", label: "chat connect-to-echo p99, ms", vsDirect: true, format: formatMS},
			metric{key: "chat-cpu", label: "proxy CPU per chat connection, µs", proxyOnly: true, format: formatCount})
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
			metric{key: "bulk-cpu", label: "proxy CPU per GB relayed, ms", proxyOnly: true, format: formatCount})
	}
	return ms
}

// checkpoints are the connection counts at which idle memory is read: 1/9,
// 5/9 and all of -idle-conns (1,000, 5,000 and 9,000 by default).
func (b *bench) checkpoints() []int {
	if !b.has("idle") {
		return nil
	}
	n := b.cfg.idleConns
	return []int{n / 9, n * 5 / 9, n}
}

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
		for _, fig := range b.cfg.figures {
			for _, t := range order {
				if ctx.Err() != nil {
					b.interrupted = fmt.Sprintf("; interrupted in round %d (%v)", round+1, context.Cause(ctx))
					return
				}
				if time.Now().After(b.deadline) {
					b.interrupted = fmt.Sprintf("; time budget (-max-time %s) spent in round %d", b.cfg.maxTime, round+1)
					return
				}
				switch fig {
				case "chat":
					b.runChat(ctx, round, t)
				case "idle":
					if t.kind != kindDirect {
						b.runIdle(ctx, round, t)
					}
				case "bulk":
					b.runBulk(ctx, round, t)
				}
			}
		}
		b.roundsDone++
	}
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
