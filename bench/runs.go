//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// start starts a fresh instance of t in front of e (terminating TLS with
// ts), again with another port if the one it picked was taken in between.
func (b *bench) start(ctx context.Context, t *target, e *edge, ts *tlsServe) (*proc, error) {
	for attempt := 1; ; attempt++ {
		b.seq++
		p, err := t.start(ctx, b.dir, b.seq, b.bin, e, ts)
		if !addrInUse(err) || attempt == 3 {
			return p, err
		}
		b.logf("%s: port taken, starting again", t.name)
	}
}

// cpuSince returns a function that reports the CPU time p's process has
// used since cpuSince was called, and whether both readings worked (a
// direct target has no process).
func cpuSince(p *proc) func() (time.Duration, bool) {
	if p.pid == 0 {
		return func() (time.Duration, bool) { return 0, false }
	}
	return usedSince(func() (time.Duration, error) { return readCPU(p.pid) })
}

// usedSince returns a function that reports how much the CPU time read
// grew since usedSince was called, and whether both readings worked.
func usedSince(read func() (time.Duration, error)) func() (time.Duration, bool) {
	c0, err0 := read()
	return func() (time.Duration, bool) {
		c1, err1 := read()
		return c1 - c0, err0 == nil && err1 == nil
	}
}

// exchanges says what a run of chat exchanges measures and where its
// numbers go: the metric keys ("" leaves a number out).
type exchanges struct {
	fig            string    // for the report: "chat", "tls p256", ...
	ts             *tlsServe // nil: plain chat; else over TLS
	workers        int
	rate, p50, p99 string // metric keys
	cpu, machine   string
}

// runChat measures chat conn/s and connect-to-echo latency on a fresh
// instance of t.
func (b *bench) runChat(ctx context.Context, round int, t *target) {
	b.runExchanges(ctx, round, t, exchanges{fig: "chat", workers: b.cfg.workers,
		rate: "chat", p50: "p50", p99: "p99", cpu: "chat-cpu", machine: "chat-machine"})
}

// runTLS measures TLS conn/s (a full handshake, then the chat exchange) on a
// fresh instance of t serving row's certificate.
func (b *bench) runTLS(ctx context.Context, round int, t *target, row string) {
	ts := b.serve(row, t)
	if ts == nil {
		return
	}
	b.runExchanges(ctx, round, t, exchanges{fig: "tls " + row, ts: ts, workers: b.cfg.tlsWorkers,
		rate: "tls:" + row, cpu: "tls-cpu:" + row})
}

// runExchanges runs workers loops of chat exchanges (connect, hello + one
// frame, echo, close) on a fresh instance of t: a warm-up, then the
// measured part.
func (b *bench) runExchanges(ctx context.Context, round int, t *target, x exchanges) {
	p, err := b.start(ctx, t, b.echo, x.ts)
	if err != nil {
		b.fail(round, t, x.fig, err)
		return
	}
	defer p.stop()
	dial := p.connector()
	if x.ts != nil {
		dial = x.ts.dial
	}
	fds0, _ := p.fds()
	runChat(ctx, dial, p.addr, x.workers, b.warm())
	cpuUsed, machineUsed := cpuSince(p), usedSince(readMachineCPU)
	res := runChat(ctx, dial, p.addr, x.workers, b.cfg.duration)
	cpu, cpuOK := cpuUsed()
	machine, machineOK := machineUsed()
	switch {
	case !p.alive():
		b.fail(round, t, x.fig, fmt.Errorf("process died during the run%s", p.logTail(5)))
		return
	case res.Conns == 0:
		b.fail(round, t, x.fig, fmt.Errorf("no exchange completed: %s", res.FirstErr))
		return
	}
	p50 := percentile(res.Latency, 50)
	p99 := percentile(res.Latency, 99)
	b.res.set(x.rate, t.name, round, res.rate())
	if x.p50 != "" {
		b.res.set(x.p50, t.name, round, float64(p50)/1e6)
	}
	if x.p99 != "" {
		b.res.set(x.p99, t.name, round, float64(p99)/1e6)
	}
	msg := fmt.Sprintf("%s conn/s (%d in %.2fs), p50 %s, p99 %s", formatCount(res.rate()), res.Conns,
		res.Elapsed.Seconds(), p50.Round(time.Microsecond), p99.Round(time.Microsecond))
	if cpuOK {
		b.res.set(x.cpu, t.name, round, float64(cpu.Microseconds())/float64(res.Conns))
		msg += fmt.Sprintf(", proxy CPU %s", cpu)
	}
	if machineOK && x.machine != "" {
		b.res.set(x.machine, t.name, round, float64(machine.Microseconds())/float64(res.Conns))
		msg += fmt.Sprintf(", machine CPU %s", machine)
	}
	if x.ts != nil {
		msg += "; " + x.ts.negotiated()
	}
	if res.Errors > 0 {
		msg += fmt.Sprintf("; %d failed exchanges, first: %s", res.Errors, res.FirstErr)
		b.res.flag(x.rate, t.name, fmt.Sprintf("failed exchanges (%d in round %d, first: %s)", res.Errors, round+1, res.FirstErr))
	}
	// Every exchange has ended: the proxy should be back to the descriptors
	// it had before the run. A leak shows here long before EMFILE does.
	if p.pid != 0 && fds0 > 0 {
		if n, err := waitFDs(ctx, p.pid, fds0+8, 3*time.Second); err == nil && n > fds0+8 {
			msg += fmt.Sprintf("; %d descriptors open 3 s after the run, %d before: a leak?", n, fds0)
			b.res.flag(x.rate, t.name, fmt.Sprintf("descriptors not released (%d open after round %d, %d before)", n, round+1, fds0))
		}
	}
	b.note(round, t, x.fig, "%s", msg)
}

// idleSpec says what an idle run holds and where its numbers go.
type idleSpec struct {
	fig         string    // for the report: "idle", "tls-idle"
	ts          *tlsServe // nil: plain chat connections; else TLS ones
	conns       int       // connections to hold
	checkpoints []int     // memory is read at each of these counts held
	growth      bool      // record each checkpoint's figure (growthKey)
	rss, pss    string    // metric keys of the final figure ("": none)
	goKeys      bool      // Caddy: also Go stacks, live heap and goroutines per connection
	openTimeout time.Duration
}

// runIdle measures bytes per idle chat connection: with held 0, holding
// -idle-conns and reading memory at every checkpoint as they fill; else
// (-scaling) holding held connections on a fresh process, which gives the
// figure of that count in the growth table and, for -idle-conns itself, the
// main figure.
func (b *bench) runIdle(ctx context.Context, round int, t *target, held int) {
	spec := idleSpec{fig: "idle", conns: b.cfg.idleConns, checkpoints: b.checkpoints(), growth: true,
		rss: "idle", pss: "idle-pss"}
	if held > 0 {
		spec.fig = "idle " + formatCount(float64(held))
		spec.conns, spec.checkpoints = held, []int{held}
		if held != b.cfg.idleConns {
			spec.rss, spec.pss = "", ""
		}
	}
	spec.openTimeout = time.Duration(spec.conns)*2*time.Millisecond + 30*time.Second
	b.runIdleSpec(ctx, round, t, spec)
}

// runTLSIdle measures bytes per idle TLS connection (terminated by the
// proxy, the decrypted chat stream relayed to the edge).
func (b *bench) runTLSIdle(ctx context.Context, round int, t *target) {
	ts := b.serve(b.cfg.tlsIdleCert, t)
	if ts == nil {
		return
	}
	n := b.cfg.tlsIdleConns
	b.runIdleSpec(ctx, round, t, idleSpec{fig: "tls-idle", ts: ts, conns: n, checkpoints: []int{n},
		rss: "tls-idle", goKeys: t.kind == kindCaddy, openTimeout: time.Duration(n)*10*time.Millisecond + 30*time.Second})
}

// runIdleSpec measures bytes per idle proxied connection on a freshly
// started instance of t: memory after a warm-up, then after holding each
// checkpoint's connections, each established through the proxy (hello sent
// and echoed); then it checks that every held connection still carries a
// frame.
func (b *bench) runIdleSpec(ctx context.Context, round int, t *target, spec idleSpec) {
	p, err := b.start(ctx, t, b.echo, spec.ts)
	if err != nil {
		b.fail(round, t, spec.fig, err)
		return
	}
	defer p.stop()
	dial, conc := p.connector(), 64
	if spec.ts != nil {
		dial, conc = spec.ts.dial, 32
	}
	warm := &idlePool{frame: b.cfg.idleFrame}
	warm.open(ctx, dial, p.addr, 32, 8)
	warm.close()
	before, settled, err := waitStable(ctx, p.pid, b.cfg.stableMax)
	if err != nil {
		b.fail(round, t, spec.fig, err)
		return
	}
	// Then (the RSS baseline is read as for any target) a Caddy target
	// collects its garbage and reports its live memory, to compare with the
	// same after the connections are held.
	var go0 goMem
	if spec.goKeys {
		if go0, err = readGoMem(ctx, p.admin, ""); err != nil {
			b.fail(round, t, spec.fig, fmt.Errorf("read Go memory statistics: %w", err))
			return
		}
	}
	details := []string{fmt.Sprintf("baseline RSS %s B (PSS %s, private %s)",
		formatCount(float64(before.RSS)), formatCount(float64(before.PSS)), formatCount(float64(before.Private)))}
	// waproxy-socks5: the exit hop's own memory, for the notes (its figure
	// is the microsocks target's).
	var exit0 memSample
	if p.exit != nil {
		exit0, _ = readMem(p.exit.pid)
	}
	if !settled {
		details = append(details, "baseline RSS did not settle")
	}
	if th, err := procField(readFile(fmt.Sprintf("/proc/%d/status", p.pid)), "Threads"); err == nil {
		details = append(details, fmt.Sprintf("one process, %d threads", th))
	}
	pool := &idlePool{frame: b.cfg.idleFrame}
	defer pool.close()
	// Opening is bounded as a whole, on top of each connection's own limit.
	octx, cancel := context.WithTimeout(ctx, spec.openTimeout)
	defer cancel()
	var last memSample
	for _, n := range spec.checkpoints {
		pool.open(octx, dial, p.addr, n-len(pool.conns), conc)
		held := len(pool.conns)
		if held == 0 {
			b.fail(round, t, spec.fig, fmt.Errorf("no connection established: %s", pool.firstErr))
			return
		}
		s, settled, err := waitStable(ctx, p.pid, b.cfg.stableMax)
		if err != nil {
			b.fail(round, t, spec.fig, err)
			return
		}
		last = s
		per := float64(s.RSS-before.RSS) / float64(held)
		if spec.growth {
			b.res.set(growthKey(n), t.name, round, per)
		}
		d := fmt.Sprintf("%s held: RSS %s B (PSS %s, private %s), %s B/conn", formatCount(float64(held)),
			formatCount(float64(s.RSS)), formatCount(float64(s.PSS)), formatCount(float64(s.Private)), formatCount(per))
		if !settled {
			d += " (RSS had not settled)"
		}
		details = append(details, d)
	}
	held := len(pool.conns)
	if p.exit != nil {
		if exit1, err := readMem(p.exit.pid); err == nil && exit0.RSS > 0 {
			details = append(details, fmt.Sprintf("its microsocks: RSS %s → %s B, %s B/conn (not counted in this figure)",
				formatCount(float64(exit0.RSS)), formatCount(float64(exit1.RSS)), formatCount(float64(exit1.RSS-exit0.RSS)/float64(held))))
		}
	}
	var go1 goMem
	if spec.goKeys {
		profile := ""
		if b.cfg.keep {
			profile = strings.TrimSuffix(p.log, ".log") + "-heap.pb.gz"
		}
		if go1, err = readGoMem(ctx, p.admin, profile); err != nil {
			b.fail(round, t, spec.fig, fmt.Errorf("read Go memory statistics: %w", err))
			return
		}
		stack := float64(go1.stack-go0.stack) / float64(held)
		heap := float64(go1.heap-go0.heap) / float64(held)
		gr := float64(go1.goroutines-go0.goroutines) / float64(held)
		b.res.set(spec.rss+"-stack", t.name, round, stack)
		b.res.set(spec.rss+"-heap", t.name, round, heap)
		b.res.set(spec.rss+"-goroutines", t.name, round, gr)
		details = append(details, fmt.Sprintf("Go, after a GC: stacks %s B/conn, live heap %s B/conn, %.2f goroutines/conn (%d → %d)",
			formatCount(stack), formatCount(heap), gr, go0.goroutines, go1.goroutines))
		if profile != "" {
			details = append(details, "heap profile "+profile)
		}
	}
	if spec.ts != nil {
		details = append(details, spec.ts.negotiated())
	}
	ok, aliveErr := pool.alive(ctx, 64)
	details = append(details, fmt.Sprintf("alive at the end %d/%d", ok, held))
	if pool.errors > 0 {
		details = append(details, fmt.Sprintf("%d connections failed to establish, first: %s", pool.errors, pool.firstErr))
	}
	switch {
	case !p.alive():
		b.fail(round, t, spec.fig, fmt.Errorf("process died during the run%s", p.logTail(5)))
		return
	case ok < held:
		b.fail(round, t, spec.fig, fmt.Errorf("only %d of %d held connections still echo (first error: %s); figure discarded", ok, held, aliveErr))
		return
	case held < spec.conns*99/100:
		b.fail(round, t, spec.fig, fmt.Errorf("only %d of %d connections established (first error: %s); figure discarded", held, spec.conns, pool.firstErr))
		return
	}
	if spec.rss != "" {
		b.res.set(spec.rss, t.name, round, float64(last.RSS-before.RSS)/float64(held))
	}
	if spec.pss != "" && last.PSS > 0 && before.PSS > 0 {
		b.res.set(spec.pss, t.name, round, float64(last.PSS-before.PSS)/float64(held))
	}
	b.note(round, t, spec.fig, "%s", strings.Join(details, "; "))
}

// bulkSpec says what a bulk run measures and where its numbers go.
type bulkSpec struct {
	fig                string    // for the report: "bulk", "tlsbulk"
	ts                 *tlsServe // nil: plain streams; else over TLS, terminated by the proxy
	mbps, cpu, machine string    // metric keys
}

// runBulk measures plain edge→client throughput on a fresh instance of t.
func (b *bench) runBulk(ctx context.Context, round int, t *target) {
	b.runBulkSpec(ctx, round, t, bulkSpec{fig: "bulk", mbps: "bulk", cpu: "bulk-cpu", machine: "bulk-machine"})
}

// runTLSBulk measures edge→client throughput over TLS on a fresh instance
// of t terminating TLS with the tlsbulk row's certificate: the client reads
// TLS, the proxy encrypts what the bulk edge sends it in plain.
func (b *bench) runTLSBulk(ctx context.Context, round int, t *target) {
	ts := b.serve(tlsBulkRow, t)
	if ts == nil {
		return
	}
	b.runBulkSpec(ctx, round, t, bulkSpec{fig: "tlsbulk", ts: ts, mbps: "tlsbulk", cpu: "tlsbulk-cpu", machine: "tlsbulk-machine"})
}

// runBulkSpec measures edge→client throughput (the bulk edge through a
// freshly started instance of t, streams at a time) and the proxy's CPU
// time per GB relayed.
func (b *bench) runBulkSpec(ctx context.Context, round int, t *target, spec bulkSpec) {
	p, err := b.start(ctx, t, b.bulk, spec.ts)
	if err != nil {
		b.fail(round, t, spec.fig, err)
		return
	}
	defer p.stop()
	dial := p.connector()
	if spec.ts != nil {
		dial = spec.ts.dial
	}
	cpuUsed, machineUsed := cpuSince(p), usedSince(readMachineCPU)
	res := runBulk(ctx, dial, p.addr, b.cfg.streams, b.warm(), b.cfg.duration)
	cpu, cpuOK := cpuUsed()
	machine, machineOK := machineUsed()
	switch {
	case !p.alive():
		b.fail(round, t, spec.fig, fmt.Errorf("process died during the run%s", p.logTail(5)))
		return
	case res.Streams < b.cfg.streams:
		b.fail(round, t, spec.fig, fmt.Errorf("%d of %d streams opened: %s", res.Streams, b.cfg.streams, res.FirstErr))
		return
	case res.MBps <= 0:
		b.fail(round, t, spec.fig, errors.New("no bytes arrived"))
		return
	}
	b.res.set(spec.mbps, t.name, round, res.MBps)
	msg := fmt.Sprintf("%s MB/s", formatCount(res.MBps))
	if cpuOK && res.Total > 0 {
		b.res.set(spec.cpu, t.name, round, float64(cpu.Milliseconds())/(float64(res.Total)/1e9))
		msg += fmt.Sprintf(", proxy CPU %s for %s MB", cpu, formatCount(float64(res.Total)/1e6))
	}
	if machineOK && res.Total > 0 {
		b.res.set(spec.machine, t.name, round, float64(machine.Milliseconds())/(float64(res.Total)/1e9))
		msg += fmt.Sprintf(", machine CPU %s", machine)
	}
	if spec.ts != nil {
		msg += "; " + spec.ts.negotiated()
	}
	b.note(round, t, spec.fig, "%s", msg)
}
