//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// machine is what the report says about where it ran.
type machine struct {
	date, cpu, kernel, memory          string
	goVersion, haproxy, caddy, openssl string
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
	m.openssl = haproxySSL(ctx, cfg.haproxy)
	m.caddy = firstLine(ctx, cfg.caddy, "version")
	if cfg.caddyB != "" {
		m.caddy += "; build B: " + firstLine(ctx, cfg.caddyB, "version")
	}
	m.commit = firstLine(ctx, "git", "rev-parse", "--short", "--verify", "-q", "HEAD")
	if m.commit == "" || strings.Contains(m.commit, "exit status") {
		m.commit = "no commit yet"
	}
	if st := firstLine(ctx, "git", "status", "--porcelain"); st != "" && !strings.Contains(st, "exit status") {
		m.commit += " (with uncommitted changes)"
	}
	m.loadStart = loadavg()
}

// haproxySSL returns the TLS library HAProxy runs on ("OpenSSL 3.0.x ..."),
// from the "Running on OpenSSL version : ..." line of `haproxy -vv`.
func haproxySSL(ctx context.Context, bin string) string {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(cctx, bin, "-vv").CombinedOutput()
	for _, line := range strings.Split(string(out), "\n") {
		if _, v, ok := strings.Cut(line, "Running on OpenSSL version :"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
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
	b.res.writeTables(w)
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
	if b.res.hasTarget(baseline) {
		fmt.Fprintf(w, "\n## Every target against %s (same-round ratios, median)\n\n", baseline)
		b.res.writeRatios(w)
	}
	if b.res.hasExitHop() {
		fmt.Fprintf(w, "\n## The SOCKS5 exit hop (medians; same-round ratios, median)\n\n")
		fmt.Fprintf(w, "%s is waproxy with its SOCKS5 dialer to a local microsocks (client → waproxy → microsocks → edge; "+
			"its memory and CPU figures are the Caddy process's alone); %s is that exit hop alone (client → microsocks → edge: "+
			"the client speaks SOCKS5), since HAProxy has no SOCKS5.\n\n", viaSOCKS, socksOnly)
		b.res.writeExitHop(w)
	}
	if b.res.hasAB() {
		fmt.Fprintf(w, "\n## Build B against build A (medians; same-round ratios, median)\n\n")
		fmt.Fprintf(w, "%s runs `%s` (A), %s runs `%s` (B), with the same config; the rounds alternate them with the rest. "+
			"Read a ratio against its round-to-round spread (the raw numbers below) before calling it a change.\n\n",
			buildA, cfg.caddy, buildB, cfg.caddyB)
		b.res.writeAB(w)
	}
	if b.has("idle") {
		if cfg.scaling {
			fmt.Fprintf(w, "\n## Bytes per idle chat connection (RSS) by connections held (median; a fresh process for each count)\n\n")
		} else {
			fmt.Fprintf(w, "\n## Bytes per idle chat connection (RSS) by connections held (median; one process, read as it fills)\n\n")
		}
		b.res.writeGrowth(w)
		fmt.Fprintf(w, "\nEach count's figure is (RSS held − RSS before) / held; a marginal row is what each connection added between two counts "+
			"costs: (figure(b)·b − figure(a)·a) / (b − a), from the same round. Linear growth shows as marginal costs equal to the figures; "+
			"a fixed cost as figures that fall with the count.\n")
	}
	if b.hasTLS() {
		fmt.Fprintf(w, "\n## TLS certificates\n\n")
		var kinds []string
		for k := range b.certs {
			kinds = append(kinds, certKinds[k])
		}
		slices.Sort(kinds)
		fmt.Fprintf(w, "- generated at the start of the run: %s. For each, a CA and a leaf of that key type, the leaf signed by the CA, `CN=<random>.net` with the SAN `%s`, as the official proxy's generate-certs.sh makes them; HAProxy loads key + leaf from one PEM (no CA, as the official proxy's), Caddy the same leaf and key with `load_files`, the direct TLS edge with Go's crypto/tls.\n",
			strings.Join(kinds, ", "), tlsServerName)
		if slices.Contains(b.tlsRows(), "default") {
			fmt.Fprintf(w, "- each one's default: HAProxy serves the RSA-4096 certificate above (the official proxy's generate-certs.sh makes RSA-4096 at start); the Caddy targets get theirs from Caddy's internal CA (`tls.automation` with the `internal` issuer for `%s`, as examples/tls.Caddyfile), issued by certmagic at start: an ECDSA P-256 leaf and its intermediate.\n", tlsServerName)
		}
	}
	fmt.Fprintf(w, "\n## Machine\n\n")
	fmt.Fprintf(w, "- %d CPUs (%s), %s RAM, Linux %s\n", m.nproc, m.cpu, m.memory, m.kernel)
	fmt.Fprintf(w, "- %s; %s (TLS: %s); Caddy %s\n", m.goVersion, m.haproxy, m.openssl, m.caddy)
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
		"Targets: **direct** (client to edge); **haproxy-official**: HAProxy from Debian, TCP mode, shaped like the official WhatsApp proxy config (`maxconn 27500`, frontend `maxconn 27495`, `tune.bufsize 4096`, `timeout connect 5s`, `client/server 200s`, `client-fin/server-fin 1s`), one frontend, the edge as the only server, without `send-proxy` and without health checks, run with `-db` (foreground, one process, no master-worker) so the pid measured is the one holding the connections; `no strict-limits` is added so it starts when the descriptor limit is below the 2×maxconn it asks for (it then runs with the limit it has); **haproxy-16k**: the same with `tune.bufsize 16384`; **caddy-l4**: stock caddy-l4 in the same Caddy binary, one layer4 route with its `proxy` handler; **waproxy**: the same binary, a `wa_xmpp` matcher and `wa_proxy` (direct dialer, `allow 127.0.0.1`); **waproxy-socks5**: the same with the SOCKS5 dialer (`via socks5`) to a microsocks (Debian's microsocks, no authentication) started afresh with every run, the edge the destination it connects to; **microsocks**: that exit hop alone, a fresh microsocks per run, the client doing a SOCKS5 CONNECT (no authentication, greeting and request one after the other) to the edge on every connection before its hello. The Caddy targets run `caddy run --config` with the admin endpoint on a loopback port and logs at WARN. For waproxy-socks5 the memory and CPU figures are the Caddy process's alone; the microsocks target measures the exit hop's own.",
		fmt.Sprintf("Rounds: %d. In each round every figure is measured for every target in turn, the target order rotated by one each round; every run starts a fresh proxy process and stops it afterwards. Medians over rounds; ratios are computed within a round, then their median is taken.", cfg.rounds),
	}
	if b.res.hasTarget(buildB) {
		lines = append(lines, fmt.Sprintf("**%s**: %s's config run by a second build, `%s` (`-caddy-b`), next to %s run by `%s`, for comparing a change's after with its before in one run.",
			buildB, buildA, cfg.caddyB, buildA, cfg.caddy))
	}
	if b.has("chat") {
		lines = append(lines, fmt.Sprintf("**Chat conn/s**: %d workers, each in a loop: connect, send the hello and one 100-byte frame in one write, read the full echo (checked byte for byte), close. %s of warm-up, then %s measured; conn/s = completed exchanges / time until the last worker stopped. Latency is per exchange, from the start of connect to the last echoed byte (p50/p99 over all exchanges of the run). Proxy CPU is the proxy process's user + system time (/proc/PID/stat, all threads) during the measured part, divided by the exchanges; it is less sensitive to other load on the machine than conn/s. Machine CPU is every CPU's busy time (/proc/stat: user, nice, system, irq, softirq, steal) over the same part, divided by the exchanges: the proxy, the bench's client and edge (one process), and the kernel work each causes, which on loopback is partly charged to whichever process sends (a write delivers to the receiving socket in the sender's system call); with the client, edge and proxy sharing the CPUs, it is what bounds conn/s, and direct's is the floor.", cfg.workers, warm, cfg.duration))
	}
	if b.has("idle") {
		cp := b.checkpoints()
		held := fmt.Sprintf("Then %s connections are opened (64 at a time), each fully established through the proxy (hello sent and echoed), memory is read again once stable at %s held; (after − before) / held.",
			formatCount(float64(cfg.idleConns)), joinCounts(cp))
		if cfg.scaling {
			held = fmt.Sprintf("Then N connections are opened (64 at a time), each fully established through the proxy (hello sent and echoed), and memory is read again once stable; (after − before) / N. N is %s, each on a fresh process (one run per count and target, the smallest count first, every target in turn); the %s run gives the main figure.",
				joinCounts(cp), formatCount(float64(cfg.idleConns)))
		}
		lines = append(lines, fmt.Sprintf("**Bytes per idle connection**: on a freshly started proxy, 32 warm-up connections are made and closed, then the proxy's memory is read once its RSS is stable (5 readings 200 ms apart within 128 KiB or 0.2%%, at most %s). %s RSS is VmRSS from /proc/PID/status; PSS from /proc/PID/smaps_rollup. Both are user-space memory only; the kernel's socket memory is not counted (for any target). HAProxy is one process (`-db`), Caddy is one process, microsocks is one process with a thread per connection. At the end a 100-byte frame is sent on every held connection and its echo checked; a run where any held connection fails is discarded.",
			cfg.stableMax, held))
	}
	if cfg.idleFrame > 0 && (b.has("idle") || b.has("tls")) {
		lines = append(lines, fmt.Sprintf("**-idle-frame %d**: in both idle figures each held connection, after its hello, also carried one frame of %s payload bytes (echoed and checked) before it was left idle.", cfg.idleFrame, formatCount(float64(cfg.idleFrame))))
	}
	if b.has("bulk") {
		lines = append(lines, fmt.Sprintf("**Plain MB/s**: %d connections, each sends the hello, then the edge writes 64 KiB chunks as fast as it can; the client reads with 64 KiB buffers. %s of warm-up, then the bytes arriving at the client in %s are counted (1 MB = 10^6 bytes). Proxy CPU per GB is the proxy process's CPU time over the whole run, warm-up included, divided by all bytes that arrived; machine CPU per GB is every CPU's busy time over the same run (as for chat), divided the same way.", cfg.streams, warm, cfg.duration))
	}
	if b.hasTLS() {
		groups := "X25519 only, so that every target does the same key exchange (HAProxy 2.6 on OpenSSL 3.0 has no post-quantum group; Go servers would pick X25519MLKEM768)"
		if cfg.tlsGroups == "default" {
			groups = "Go's default list (X25519MLKEM768 first), so each server picks what it prefers"
		}
		lines = append(lines,
			"**TLS targets**: every proxy terminates TLS and sends the decrypted chat stream to the echo edge (for TLS MB/s: takes the bulk edge's plain stream and sends it encrypted). **haproxy-official** / **haproxy-16k**: the same configs as above with `bind <addr> ssl crt <pem>` (the official proxy's port 443); **caddy-l4**: caddy-l4's `tls` matcher, `tls` handler and `proxy`; **waproxy**: the routes of examples/tls.Caddyfile (wa_silent; wa_tls or wa_xmpp into a subroute: media passthrough by server name; any other TLS terminated by `wa_tls_terminate`, caddy-l4's `tls` handler within a 10 s handshake timeout, the decrypted stream sorted in a subroute of its own, `wa_xmpp` → `wa_proxy` and a catch-all; plain chat → `wa_proxy`) with the edge as the destination (a build without `wa_tls_terminate`, in an A/B against an older revision, runs the layout it shipped with: Caddy's `tls` handler and the routes after it); **waproxy-socks5**: the same, every `wa_proxy` through microsocks, in the ECDSA P-256 row only (the hop's cost does not depend on the certificate, and its idle TLS connections would repeat waproxy's: the hop is behind the TLS termination); microsocks terminates no TLS and has no TLS figure; the Caddy targets with `default_sni`/`fallback_sni` "+tlsServerName+"; **direct**: a TLS server in the bench process (Go's crypto/tls) with the same certificate, an echo (for TLS MB/s: the bulk stream).",
			fmt.Sprintf("**TLS client**: as WhatsApp's on port 443, no server name (it connects to an IP address) and no certificate check; no session cache, so every connection is a full handshake (no resumption). Key exchange groups offered: %s. Each run's readiness probe checks that the target presents the certificate type of its row and records the version, cipher suite and group it negotiated (per-run details below).", groups))
	}
	if b.has("tls") {
		lines = append(lines,
			fmt.Sprintf("**TLS conn/s**: %d workers, each in a loop: connect, full handshake, send the hello and one 100-byte frame in one write, read the full echo, close; %s of warm-up, then %s measured, on a fresh process per certificate row. Proxy CPU per TLS connection as for chat. Rows with the same certificate for every target are the fair comparison; the default row compares what each ships with.", cfg.tlsWorkers, warm, cfg.duration),
			fmt.Sprintf("**Bytes per idle TLS connection**: on a fresh process (%s), 32 warm-up TLS connections made and closed, RSS read once stable (as for the chat figure); then %s TLS connections opened (32 handshakes at a time), each with its hello sent and echoed through the proxy and then left idle (the proxy waits to read from the client's TLS connection and from the upstream socket); RSS read again once stable; (after − before) / held. For the Caddy targets, right after each of the two RSS readings a garbage collection is forced (`/debug/pprof/heap?gc=1` on the admin endpoint) and Go's own figures are read (StackInuse and HeapAlloc from /debug/vars, the goroutine count from /debug/pprof/goroutine): their differences per connection are the Go stacks, live heap and goroutines rows. RSS is not their sum: heap garbage not yet collected counts in RSS (how much depends on where the collector's cycle stands when RSS is read), and the pages of a buffer that were never written are not resident. At the end a frame is sent on every held connection and its echo checked.",
				tlsRowLabel(cfg.tlsIdleCert), formatCount(float64(cfg.tlsIdleConns))))
	}
	if b.has("tlsbulk") {
		lines = append(lines, fmt.Sprintf("**TLS MB/s**: as plain MB/s (%d connections, the bulk edge writing 64 KiB chunks, the client reading with 64 KiB buffers, %s of warm-up, then %s measured, proxy CPU per GB over the whole run), but the client connects with TLS (a full handshake per stream, before the measured part) and the proxy terminates it: it reads the edge's plain stream and encrypts it towards the client, which decrypts it (with Go's crypto/tls, on the same CPUs). MB/s counts the decrypted bytes. Each server picks its own cipher suite from the client's offer (HAProxy on OpenSSL: TLS_AES_256_GCM_SHA384; Go: TLS_AES_128_GCM_SHA256 where the CPU has AES-NI; see the per-run details), as it would for WhatsApp's client. One certificate row, %s: the certificate only costs at the handshake. waproxy-socks5 is left out to keep the run short (its exit hop is on the plain side, so what it costs on a stream is the plain figure's), and microsocks terminates no TLS.",
			cfg.streams, warm, cfg.duration, tlsRowLabel(tlsBulkRow)))
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
