//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// start starts a fresh instance of t in front of e, again with another
// port if the one it picked was taken in between.
func (b *bench) start(ctx context.Context, t *target, e *edge) (*proc, error) {
	for attempt := 1; ; attempt++ {
		b.seq++
		p, err := t.start(ctx, b.dir, b.seq, b.bin, e)
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
	c0, err0 := readCPU(p.pid)
	return func() (time.Duration, bool) {
		c1, err1 := readCPU(p.pid)
		return c1 - c0, err0 == nil && err1 == nil
	}
}

// runChat measures chat conn/s and connect-to-echo latency on a fresh
// instance of t.
func (b *bench) runChat(ctx context.Context, round int, t *target) {
	p, err := b.start(ctx, t, b.echo)
	if err != nil {
		b.fail(round, t, "chat", err)
		return
	}
	defer p.stop()
	fds0, _ := p.fds()
	runChat(ctx, p.addr, b.cfg.workers, b.warm())
	cpuUsed := cpuSince(p)
	res := runChat(ctx, p.addr, b.cfg.workers, b.cfg.duration)
	cpu, cpuOK := cpuUsed()
	switch {
	case !p.alive():
		b.fail(round, t, "chat", fmt.Errorf("process died during the run%s", p.logTail(5)))
		return
	case res.Conns == 0:
		b.fail(round, t, "chat", fmt.Errorf("no exchange completed: %s", res.FirstErr))
		return
	}
	p50 := percentile(res.Latency, 50)
	p99 := percentile(res.Latency, 99)
	b.res.set("chat", t.name, round, res.rate())
	b.res.set("p50", t.name, round, float64(p50)/1e6)
	b.res.set("p99", t.name, round, float64(p99)/1e6)
	msg := fmt.Sprintf("%s conn/s (%d in %.2fs), p50 %s, p99 %s", formatCount(res.rate()), res.Conns,
		res.Elapsed.Seconds(), p50.Round(time.Microsecond), p99.Round(time.Microsecond))
	if cpuOK {
		b.res.set("chat-cpu", t.name, round, float64(cpu.Microseconds())/float64(res.Conns))
		msg += fmt.Sprintf(", proxy CPU %s", cpu)
	}
	if res.Errors > 0 {
		msg += fmt.Sprintf("; %d failed exchanges, first: %s", res.Errors, res.FirstErr)
		b.res.flag("chat", t.name, fmt.Sprintf("failed exchanges (%d in round %d, first: %s)", res.Errors, round+1, res.FirstErr))
	}
	// Every exchange has ended: the proxy should be back to the descriptors
	// it had before the run. A leak shows here long before EMFILE does.
	if p.pid != 0 && fds0 > 0 {
		if n, err := waitFDs(ctx, p.pid, fds0+8, 3*time.Second); err == nil && n > fds0+8 {
			msg += fmt.Sprintf("; %d descriptors open 3 s after the run, %d before: a leak?", n, fds0)
			b.res.flag("chat", t.name, fmt.Sprintf("descriptors not released (%d open after round %d, %d before)", n, round+1, fds0))
		}
	}
	b.note(round, t, "chat", "%s", msg)
}

// runIdle measures bytes per idle proxied connection on a freshly started
// instance of t: memory after a warm-up, then after holding each checkpoint's
// connections, each established through the proxy (hello sent and echoed);
// then it checks that every held connection still carries a frame.
func (b *bench) runIdle(ctx context.Context, round int, t *target) {
	p, err := b.start(ctx, t, b.echo)
	if err != nil {
		b.fail(round, t, "idle", err)
		return
	}
	defer p.stop()
	warm := &idlePool{}
	warm.open(ctx, p.addr, 32, 8)
	warm.close()
	before, settled, err := waitStable(ctx, p.pid, b.cfg.stableMax)
	if err != nil {
		b.fail(round, t, "idle", err)
		return
	}
	details := []string{fmt.Sprintf("baseline RSS %s B (PSS %s, private %s)",
		formatCount(float64(before.RSS)), formatCount(float64(before.PSS)), formatCount(float64(before.Private)))}
	if !settled {
		details = append(details, "baseline RSS did not settle")
	}
	if th, err := procField(readFile(fmt.Sprintf("/proc/%d/status", p.pid)), "Threads"); err == nil {
		details = append(details, fmt.Sprintf("one process, %d threads", th))
	}
	pool := &idlePool{}
	defer pool.close()
	// Opening is bounded as a whole, on top of each connection's own limit.
	octx, cancel := context.WithTimeout(ctx, time.Duration(b.cfg.idleConns)*2*time.Millisecond+30*time.Second)
	defer cancel()
	var last memSample
	for _, n := range b.checkpoints() {
		pool.open(octx, p.addr, n-len(pool.conns), 64)
		held := len(pool.conns)
		if held == 0 {
			b.fail(round, t, "idle", fmt.Errorf("no connection established: %s", pool.firstErr))
			return
		}
		s, settled, err := waitStable(ctx, p.pid, b.cfg.stableMax)
		if err != nil {
			b.fail(round, t, "idle", err)
			return
		}
		last = s
		per := float64(s.RSS-before.RSS) / float64(held)
		b.res.set(growthKey(n), t.name, round, per)
		d := fmt.Sprintf("%s held: RSS %s B (PSS %s, private %s), %s B/conn", formatCount(float64(held)),
			formatCount(float64(s.RSS)), formatCount(float64(s.PSS)), formatCount(float64(s.Private)), formatCount(per))
		if !settled {
			d += " (RSS had not settled)"
		}
		details = append(details, d)
	}
	held := len(pool.conns)
	ok, aliveErr := pool.alive(ctx, 64)
	details = append(details, fmt.Sprintf("alive at the end %d/%d", ok, held))
	if pool.errors > 0 {
		details = append(details, fmt.Sprintf("%d connections failed to establish, first: %s", pool.errors, pool.firstErr))
	}
	switch {
	case !p.alive():
		b.fail(round, t, "idle", fmt.Errorf("process died during the run%s", p.logTail(5)))
		return
	case ok < held:
		b.fail(round, t, "idle", fmt.Errorf("only %d of %d held connections still echo (first error: %s); figure discarded", ok, held, aliveErr))
		return
	case held < b.cfg.idleConns*99/100:
		b.fail(round, t, "idle", fmt.Errorf("only %d of %d connections established (first error: %s); figure discarded", held, b.cfg.idleConns, pool.firstErr))
		return
	}
	b.res.set("idle", t.name, round, float64(last.RSS-before.RSS)/float64(held))
	if last.PSS > 0 && before.PSS > 0 {
		b.res.set("idle-pss", t.name, round, float64(last.PSS-before.PSS)/float64(held))
	}
	b.note(round, t, "idle", "%s", strings.Join(details, "; "))
}

// runBulk measures edge→client throughput on a fresh instance of t.
func (b *bench) runBulk(ctx context.Context, round int, t *target) {
	p, err := b.start(ctx, t, b.bulk)
	if err != nil {
		b.fail(round, t, "bulk", err)
		return
	}
	defer p.stop()
	cpuUsed := cpuSince(p)
	res := runBulk(ctx, p.addr, b.cfg.streams, b.warm(), b.cfg.duration)
	cpu, cpuOK := cpuUsed()
	switch {
	case !p.alive():
		b.fail(round, t, "bulk", fmt.Errorf("process died during the run%s", p.logTail(5)))
		return
	case res.Streams < b.cfg.streams:
		b.fail(round, t, "bulk", fmt.Errorf("%d of %d streams opened: %s", res.Streams, b.cfg.streams, res.FirstErr))
		return
	case res.MBps <= 0:
		b.fail(round, t, "bulk", errors.New("no bytes arrived"))
		return
	}
	b.res.set("bulk", t.name, round, res.MBps)
	msg := fmt.Sprintf("%s MB/s", formatCount(res.MBps))
	if cpuOK && res.Total > 0 {
		b.res.set("bulk-cpu", t.name, round, float64(cpu.Milliseconds())/(float64(res.Total)/1e9))
		msg += fmt.Sprintf(", proxy CPU %s for %s MB", cpu, formatCount(float64(res.Total)/1e6))
	}
	b.note(round, t, "bulk", "%s", msg)
}
