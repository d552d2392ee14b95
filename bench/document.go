//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"
)

// machine is what the report says about where it ran.
type machine struct {
	date, cpu, kernel, memory          string
	goVersion, haproxy, caddy          string
	commit, nofile, loadStart, loadEnd string
	nproc                              int
	started                            time.Time
	elapsed                            time.Duration
}

// fill gathers the machine facts the report states.
func (m *machine) fill(ctx context.Context, cfg *config) {
	m.date = m.started.UTC().Format("2006-01-02 15:04 MST")
	m.nproc = runtime.NumCPU()
	m.goVersion = runtime.Version()
	m.kernel = strings.TrimSpace(readFile("/proc/sys/kernel/osrelease"))
	for _, line := range strings.Split(readFile("/proc/cpuinfo"), "\n") {
		if name, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "model name" {
			m.cpu = strings.TrimSpace(v)
			break
		}
	}
	if v, err := procField(readFile("/proc/meminfo"), "MemTotal"); err == nil {
		m.memory = fmt.Sprintf("%.1f GiB", float64(v)/(1<<30))
	}
	m.haproxy = firstLine(ctx, cfg.haproxy, "-v")
	m.caddy = firstLine(ctx, cfg.caddy, "version")
	m.commit = firstLine(ctx, "git", "rev-parse", "--short", "--verify", "-q", "HEAD")
	if m.commit == "" || strings.Contains(m.commit, "exit status") {
		m.commit = "no commit yet"
	}
	if st := firstLine(ctx, "git", "status", "--porcelain"); st != "" && !strings.Contains(st, "exit status") {
		m.commit += " (with uncommitted changes)"
	}
	m.loadStart = loadavg()
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func loadavg() string {
	f := strings.Fields(readFile("/proc/loadavg"))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// writeDocument writes the whole markdown report.
func (b *bench) writeDocument(w io.Writer) {
	b.info.loadEnd = loadavg()
	b.info.elapsed = time.Since(b.info.started).Round(time.Second)
	cfg, m := b.cfg, b.info
	fmt.Fprintf(w, "# caddy-waproxy benchmark\n\n")
	fmt.Fprintf(w, "%s; `go run ./bench %s`; %d of %d round(s) in %s%s.\n\n",
		m.date, strings.Join(cfg.args, " "), b.roundsDone, cfg.rounds, m.elapsed, b.interrupted)
	fmt.Fprintf(w, "Medians over rounds; ratios are the median of ratios computed within each round "+
		"(targets measured side by side, one after another, in the same run). Higher is better for conn/s and MB/s; "+
		"lower is better for latency, CPU and bytes.\n\n")
	b.res.writeTable(w)
	var notRun []string
	for _, t := range b.res.targets {
		if t.notRun != "" {
			notRun = append(notRun, fmt.Sprintf("- **%s** not run: %s", t.name, t.notRun))
		}
	}
	if len(notRun) > 0 {
		fmt.Fprintf(w, "\n%s\n", strings.Join(notRun, "\n"))
	}
	if ws := b.res.warnings(); len(ws) > 0 {
		fmt.Fprintf(w, "\n⚠ marks a figure with a warning:\n\n")
		for _, s := range ws {
			fmt.Fprintf(w, "- %s\n", s)
		}
	}
	if len(b.res.fails) > 0 {
		fmt.Fprintf(w, "\nFailed runs (their numbers are left out):\n\n")
		for _, f := range b.res.fails {
			fmt.Fprintf(w, "- %s\n", f)
		}
	}
	fmt.Fprintf(w, "\n## Every target against %s (same-round ratios, median)\n\n", baseline)
	b.res.writeRatios(w)
	if b.has("idle") {
		fmt.Fprintf(w, "\n## Bytes per idle chat connection (RSS) by connections held (median)\n\n")
		b.res.writeGrowth(w)
	}
	fmt.Fprintf(w, "\n## Machine\n\n")
	fmt.Fprintf(w, "- %d CPUs (%s), %s RAM, Linux %s\n", m.nproc, m.cpu, m.memory, m.kernel)
	fmt.Fprintf(w, "- %s; %s; Caddy %s\n", m.goVersion, m.haproxy, m.caddy)
	fmt.Fprintf(w, "- commit %s\n", m.commit)
	fmt.Fprintf(w, "- load average at start %s, at end %s (the bench's own load included at the end); RLIMIT_NOFILE %s\n",
		m.loadStart, m.loadEnd, m.nofile)
	fmt.Fprintf(w, "\n## Method\n\n")
	b.writeMethod(w)
	fmt.Fprintf(w, "\n## Raw numbers per round\n\nTarget order per round:\n\n")
	for i, o := range b.res.orders {
		fmt.Fprintf(w, "%d. %s\n", i+1, strings.Join(o, ", "))
	}
	b.res.writeRaw(w)
	if len(b.res.notes) > 0 {
		fmt.Fprintf(w, "\nPer-run details:\n\n")
		for _, n := range b.res.notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

func (b *bench) writeMethod(w io.Writer) {
	cfg := b.cfg
	warm := b.warm()
	lines := []string{
		"Everything runs on 127.0.0.1: the bench program is the client and also the edge (a stand-in for WhatsApp's chat server) that every target connects to; client, edge and proxy share the machine's CPUs. " +
			"WhatsApp-shaped traffic: each connection starts with the 43-byte hello `57 41 06 03 00 00 24 12 22 0A 20` + 32 random bytes, then frames (3-byte big-endian length + payload); the echo edge echoes every byte.",
		"Targets: **direct** (client to edge); **haproxy-official**: HAProxy from Debian, TCP mode, shaped like the official WhatsApp proxy config (`maxconn 27500`, frontend `maxconn 27495`, `tune.bufsize 4096`, `timeout connect 5s`, `client/server 200s`, `client-fin/server-fin 1s`), one frontend, the edge as the only server, without `send-proxy` and without health checks, run with `-db` (foreground, one process, no master-worker) so the pid measured is the one holding the connections; `no strict-limits` is added so it starts when the descriptor limit is below the 2×maxconn it asks for (it then runs with the limit it has); **haproxy-16k**: the same with `tune.bufsize 16384`; **caddy-l4**: stock caddy-l4 in the same Caddy binary, one layer4 route with its `proxy` handler; **waproxy**: the same binary, a `wa_xmpp` matcher and `wa_proxy` (direct dialer, `allow 127.0.0.1`). Both Caddy targets run `caddy run --config` with the admin endpoint on a loopback port and logs at WARN.",
		fmt.Sprintf("Rounds: %d. In each round every figure is measured for every target in turn, the target order rotated by one each round; every run starts a fresh proxy process and stops it afterwards. Medians over rounds; ratios are computed within a round, then their median is taken.", cfg.rounds),
	}
	if b.has("chat") {
		lines = append(lines, fmt.Sprintf("**Chat conn/s**: %d workers, each in a loop: connect, send the hello and one 100-byte frame in one write, read the full echo (checked byte for byte), close. %s of warm-up, then %s measured; conn/s = completed exchanges / time until the last worker stopped. Latency is per exchange, from the start of connect to the last echoed byte (p50/p99 over all exchanges of the run). Proxy CPU is the proxy process's user + system time (/proc/PID/stat, all threads) during the measured part, divided by the exchanges; it is less sensitive to other load on the machine than conn/s.", cfg.workers, warm, cfg.duration))
	}
	if b.has("idle") {
		cp := b.checkpoints()
		lines = append(lines, fmt.Sprintf("**Bytes per idle connection**: on a freshly started proxy, 32 warm-up connections are made and closed, then the proxy's memory is read once its RSS is stable (5 readings 200 ms apart within 128 KiB or 0.2%%, at most %s). Then %s connections are opened (64 at a time), each fully established through the proxy (hello sent and echoed), memory is read again once stable at %s held; (after − before) / held. RSS is VmRSS from /proc/PID/status; PSS from /proc/PID/smaps_rollup. Both are user-space memory only; the kernel's socket memory is not counted (for any target). HAProxy is one process (`-db`), Caddy is one process. At the end a 100-byte frame is sent on every held connection and its echo checked; a run where any held connection fails is discarded.",
			cfg.stableMax, formatCount(float64(cfg.idleConns)), joinCounts(cp)))
	}
	if b.has("bulk") {
		lines = append(lines, fmt.Sprintf("**Plain MB/s**: %d connections, each sends the hello, then the edge writes 64 KiB chunks as fast as it can; the client reads with 64 KiB buffers. %s of warm-up, then the bytes arriving at the client in %s are counted (1 MB = 10^6 bytes). Proxy CPU per GB is the proxy process's CPU time over the whole run, warm-up included, divided by all bytes that arrived.", cfg.streams, warm, cfg.duration))
	}
	for _, l := range lines {
		fmt.Fprintf(w, "- %s\n", l)
	}
}

func joinCounts(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = formatCount(float64(n))
	}
	return strings.Join(s, ", ")
}
