//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// memSample is one reading of a process's memory, in bytes.
type memSample struct {
	RSS     int64 // VmRSS from /proc/PID/status
	PSS     int64 // Pss from /proc/PID/smaps_rollup (shared pages split between sharers)
	Private int64 // Private_Clean + Private_Dirty from smaps_rollup
}

// readMem reads pid's memory from /proc.
func readMem(pid int) (memSample, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memSample{}, fmt.Errorf("read status of pid %d: %w", pid, err)
	}
	rss, err := procField(string(status), "VmRSS")
	if err != nil {
		return memSample{}, fmt.Errorf("pid %d: %w", pid, err)
	}
	s := memSample{RSS: rss}
	// smaps_rollup exists since Linux 4.14; without it PSS and Private stay 0.
	if rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)); err == nil {
		s.PSS, s.Private = parseSmapsRollup(string(rollup))
	}
	return s, nil
}

// procField returns the value of a "Key:   1234 kB" line of a /proc file
// (status, smaps_rollup) in bytes.
func procField(text, key string) (int64, error) {
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != key {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return 0, fmt.Errorf("field %s has no value", key)
		}
		v, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("field %s: %w", key, err)
		}
		if len(fields) > 1 {
			switch strings.ToLower(fields[1]) {
			case "kb":
				v *= 1024
			default:
				return 0, fmt.Errorf("field %s: unknown unit %q", key, fields[1])
			}
		}
		return v, nil
	}
	return 0, fmt.Errorf("no %s field", key)
}

// parseSmapsRollup returns Pss and Private_Clean+Private_Dirty in bytes;
// missing fields count as 0.
func parseSmapsRollup(text string) (pss, private int64) {
	pss, _ = procField(text, "Pss")
	clean, _ := procField(text, "Private_Clean")
	dirty, _ := procField(text, "Private_Dirty")
	return pss, clean + dirty
}

// stableWindow is how many consecutive RSS readings must agree, and
// stablePoll how far apart they are: 5 × 200 ms, one quiet second.
const (
	stableWindow = 5
	stablePoll   = 200 * time.Millisecond
)

// isStable reports whether the last window readings of hist lie within a
// tolerance of each other: 128 KiB or 0.2% of the latest reading, whichever
// is larger (9,000 connections at 3.4 KB each move RSS by 30 MB; 128 KiB is
// 0.4% of that).
func isStable(hist []int64, window int) bool {
	if window < 2 || len(hist) < window {
		return false
	}
	w := hist[len(hist)-window:]
	lo, hi := w[0], w[0]
	for _, v := range w[1:] {
		lo, hi = min(lo, v), max(hi, v)
	}
	tol := max(int64(128<<10), w[len(w)-1]/500)
	return hi-lo <= tol
}

// waitStable polls pid's memory until its RSS is stable (see isStable) or
// limit passes, and returns the last reading and whether it settled.
func waitStable(ctx context.Context, pid int, limit time.Duration) (memSample, bool, error) {
	deadline := time.Now().Add(limit)
	var hist []int64
	for {
		s, err := readMem(pid)
		if err != nil {
			return s, false, err
		}
		hist = append(hist, s.RSS)
		if isStable(hist, stableWindow) {
			return s, true, nil
		}
		if time.Now().After(deadline) {
			return s, false, nil
		}
		select {
		case <-ctx.Done():
			return s, false, ctx.Err()
		case <-time.After(stablePoll):
		}
	}
}

// userHZ is the unit of the CPU times in /proc/PID/stat (USER_HZ, 100 on
// every Linux architecture Go supports).
const userHZ = 100

// readCPU returns the CPU time (user + system, all threads) pid has used.
func readCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	ticks, err := statCPUTicks(string(b))
	if err != nil {
		return 0, fmt.Errorf("pid %d: %w", pid, err)
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// statCPUTicks returns utime + stime from the text of /proc/PID/stat. The
// command name (field 2) is in parentheses and may hold spaces, so fields
// are counted from the last ')'.
func statCPUTicks(text string) (int64, error) {
	i := strings.LastIndexByte(text, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat: no command name")
	}
	f := strings.Fields(text[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("stat: %d fields after the command name, want at least 13", len(f))
	}
	u, err := strconv.ParseInt(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat utime: %w", err)
	}
	s, err := strconv.ParseInt(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat stime: %w", err)
	}
	return u + s, nil
}

// countFDs returns how many descriptors pid has open.
func countFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("list descriptors of pid %d: %w", pid, err)
	}
	return len(ents), nil
}

// waitFDs polls pid's descriptor count until it is at most want or limit
// passes, and returns the last count.
func waitFDs(ctx context.Context, pid, want int, limit time.Duration) (int, error) {
	deadline := time.Now().Add(limit)
	for {
		n, err := countFDs(pid)
		if err != nil || n <= want || time.Now().After(deadline) || ctx.Err() != nil {
			return n, err
		}
		sleepCtx(ctx, 50*time.Millisecond)
	}
}

// readMachineCPU returns the CPU time every CPU of the machine has spent
// busy (/proc/stat's first line: user, nice, system, irq, softirq and
// steal; not idle or iowait): the proxy, the bench's client and edge, an
// exit hop, the kernel's interrupt work, everything.
func readMachineCPU() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, fmt.Errorf("read /proc/stat: %w", err)
	}
	ticks, err := machineBusyTicks(string(b))
	if err != nil {
		return 0, err
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// machineBusyTicks returns the busy ticks of /proc/stat's "cpu" line (the
// sum over CPUs). guest and guest_nice are left out: user and nice already
// count them.
func machineBusyTicks(text string) (int64, error) {
	line, _, _ := strings.Cut(text, "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: first line %q is not the cpu totals (user nice system idle iowait irq softirq steal)", line)
	}
	var busy int64
	for _, i := range []int{1, 2, 3, 6, 7, 8} { // user nice system irq softirq steal
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: field %d of the cpu line: %w", i, err)
		}
		busy += v
	}
	return busy, nil
}
