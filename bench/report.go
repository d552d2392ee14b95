//go:build linux

package main

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
)

// metric is one row of the report.
type metric struct {
	key       string
	label     string
	proxyOnly bool   // a direct connection has no value (no proxy process)
	goOnly    bool   // only Go (Caddy) processes have a value
	tls       bool   // a row of the tls figure (its own table)
	row       string // tls: the certificate row
	tlsIdle   bool   // tls: a figure of the idle TLS run
	tlsBulk   bool   // tls: a row of the tlsbulk figure (TLS MB/s); its runs are tlsBulkRuns'
	vsDirect  bool   // the ratio against direct means something
	format    func(float64) string
}

// results holds every measured number, per metric, target and round (NaN
// where there is none).
type results struct {
	rounds  int
	targets []*target
	metrics []metric
	vals    map[string]map[string][]float64
	growth  []int // idle checkpoints (connections held)
	orders  [][]string
	flags   map[string][]string // metric key + "/" + target → warnings that mark its cells
	notes   []string            // per-run details, in run order
	fails   []string            // runs that failed
}

func newResults(ts []*target, ms []metric, rounds int, growth []int) *results {
	r := &results{rounds: rounds, targets: ts, metrics: ms, growth: growth, vals: map[string]map[string][]float64{}}
	keys := []string{}
	for _, m := range ms {
		keys = append(keys, m.key)
	}
	for _, n := range growth {
		keys = append(keys, growthKey(n))
	}
	for _, k := range keys {
		r.vals[k] = map[string][]float64{}
		for _, t := range ts {
			v := make([]float64, rounds)
			for i := range v {
				v[i] = math.NaN()
			}
			r.vals[k][t.name] = v
		}
	}
	return r
}

func growthKey(n int) string { return "growth:" + strconv.Itoa(n) }

// set records v for metric key, target and round.
func (r *results) set(key, target string, round int, v float64) {
	r.vals[key][target][round] = v
}

// flag marks target's cells of metric key with a warning, listed under the
// table (one mark per cell however many warnings).
func (r *results) flag(key, target, warning string) {
	if r.flags == nil {
		r.flags = map[string][]string{}
	}
	r.flags[key+"/"+target] = append(r.flags[key+"/"+target], warning)
}

// warnings returns every flag as "target, metric label: warning" lines.
func (r *results) warnings() []string {
	var out []string
	for _, m := range r.metrics {
		for _, t := range r.targets {
			for _, w := range r.flags[m.key+"/"+t.name] {
				out = append(out, fmt.Sprintf("%s, %s: %s", t.name, m.label, w))
			}
		}
	}
	return out
}

// median returns the median of the finite values in xs, NaN if there is none.
func median(xs []float64) float64 {
	var v []float64
	for _, x := range xs {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return math.NaN()
	}
	sort.Float64s(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// sameRoundRatios returns a[i]/b[i] for every round where both are finite
// and b is not zero.
func sameRoundRatios(a, b []float64) []float64 {
	var out []float64
	for i := range min(len(a), len(b)) {
		if math.IsNaN(a[i]) || math.IsNaN(b[i]) || b[i] == 0 {
			continue
		}
		out = append(out, a[i]/b[i])
	}
	return out
}

// ratio is the median of the same-round ratios of target to base for key.
func (r *results) ratio(key, target, base string) float64 {
	return median(sameRoundRatios(r.vals[key][target], r.vals[key][base]))
}

// formatRatio prints a ratio as "1.23×", or "–" when there is none.
func formatRatio(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f×", x)
}

// formatCount prints x rounded to an integer with thousands separated by
// commas: 36486.4 → "36,486".
func formatCount(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	s := strconv.FormatInt(int64(math.Round(math.Abs(x))), 10)
	var b strings.Builder
	if math.Round(x) < 0 {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// formatFrac prints x with two decimals.
func formatFrac(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f", x)
}

// formatMS prints milliseconds with two decimals.
func formatMS(x float64) string {
	if math.IsNaN(x) {
		return "–"
	}
	return fmt.Sprintf("%.2f", x)
}

// appliesTo reports whether target t has a value for m: direct has no
// proxy process, only Caddy has Go's figures, and the TLS figures' runs are
// those of target.tlsRuns and target.tlsBulkRuns.
func (m metric) appliesTo(t *target) bool {
	switch {
	case m.proxyOnly && t.kind == kindDirect, m.goOnly && t.kind != kindCaddy:
		return false
	case m.tlsBulk:
		return t.tlsBulkRuns()
	case m.tls:
		return t.tlsRuns(m.row, m.tlsIdle)
	}
	return true
}

// cell is the table entry for a target's median of key.
func (r *results) cell(m metric, t *target) string {
	switch {
	case t.notRun != "":
		return "not run"
	case !m.appliesTo(t):
		return "–"
	}
	v := median(r.vals[m.key][t.name])
	if math.IsNaN(v) {
		return "failed"
	}
	if len(r.flags[m.key+"/"+t.name]) > 0 {
		return m.format(v) + " ⚠"
	}
	return m.format(v)
}

// hasTarget reports whether a target with that name is in the run.
func (r *results) hasTarget(name string) bool {
	for _, t := range r.targets {
		if t.name == name {
			return true
		}
	}
	return false
}

// sections splits the metrics into the plain table and the TLS table (each
// only when it has rows).
func (r *results) sections() [][]metric {
	var plain, withTLS []metric
	for _, m := range r.metrics {
		if m.tls {
			withTLS = append(withTLS, m)
		} else {
			plain = append(plain, m)
		}
	}
	var out [][]metric
	for _, ms := range [][]metric{plain, withTLS} {
		if len(ms) > 0 {
			out = append(out, ms)
		}
	}
	return out
}

// writeTables writes the main table of each section, a blank line apart.
func (r *results) writeTables(w io.Writer) {
	for i, ms := range r.sections() {
		if i > 0 {
			fmt.Fprintln(w)
		}
		r.writeTable(w, ms)
	}
}

// writeTable writes a main table for metrics ms: medians, then waproxy's
// ratios against the official HAProxy setup and against direct.
func (r *results) writeTable(w io.Writer, ms []metric) {
	head := []string{"figure"}
	for _, t := range r.targets {
		head = append(head, t.name)
	}
	ours := r.hasTarget("waproxy") && r.hasTarget(baseline)
	if ours {
		head = append(head, "waproxy/"+baseline)
	}
	if r.hasTarget("waproxy") && r.hasTarget("direct") {
		head = append(head, "waproxy/direct")
	}
	writeRow(w, head)
	writeRow(w, dashes(len(head)))
	for _, m := range ms {
		row := []string{m.label}
		for _, t := range r.targets {
			row = append(row, r.cell(m, t))
		}
		if ours {
			row = append(row, formatRatio(r.ratio(m.key, "waproxy", baseline)))
		}
		if r.hasTarget("waproxy") && r.hasTarget("direct") {
			if m.vsDirect {
				row = append(row, formatRatio(r.ratio(m.key, "waproxy", "direct")))
			} else {
				row = append(row, "–")
			}
		}
		writeRow(w, row)
	}
}

// writeRatios writes every target's same-round ratio against the baseline.
func (r *results) writeRatios(w io.Writer) {
	if !r.hasTarget(baseline) {
		return
	}
	head := []string{"figure"}
	var others []*target
	for _, t := range r.targets {
		if t.name != baseline {
			head = append(head, t.name+"/"+baseline)
			others = append(others, t)
		}
	}
	writeRow(w, head)
	writeRow(w, dashes(len(head)))
	for _, m := range r.metrics {
		if m.goOnly {
			continue // HAProxy has no such figure
		}
		row := []string{m.label}
		for _, t := range others {
			if !m.appliesTo(t) {
				row = append(row, "–")
				continue
			}
			row = append(row, formatRatio(r.ratio(m.key, t.name, baseline)))
		}
		writeRow(w, row)
	}
}

// writeGrowth writes bytes per idle connection at each checkpoint, then the
// marginal cost of the connections added between two checkpoints.
func (r *results) writeGrowth(w io.Writer) {
	head := []string{"connections held"}
	var proxies []*target
	for _, t := range r.targets {
		if t.kind != kindDirect {
			head = append(head, t.name)
			proxies = append(proxies, t)
		}
	}
	writeRow(w, head)
	writeRow(w, dashes(len(head)))
	for _, n := range r.growth {
		row := []string{formatCount(float64(n))}
		for _, t := range proxies {
			row = append(row, r.cell(metric{key: growthKey(n), format: formatCount}, t))
		}
		writeRow(w, row)
	}
	for i := 1; i < len(r.growth); i++ {
		lo, hi := r.growth[i-1], r.growth[i]
		row := []string{fmt.Sprintf("marginal, %s → %s", formatCount(float64(lo)), formatCount(float64(hi)))}
		for _, t := range proxies {
			switch v := r.marginal(t.name, lo, hi); {
			case t.notRun != "":
				row = append(row, "not run")
			case math.IsNaN(v):
				row = append(row, "–")
			default:
				row = append(row, formatCount(v))
			}
		}
		writeRow(w, row)
	}
}

// marginal is the median over rounds of the bytes per connection added
// between lo and hi connections held: (per(hi)·hi − per(lo)·lo) / (hi − lo)
// from the same round's figures.
func (r *results) marginal(target string, lo, hi int) float64 {
	a, b := r.vals[growthKey(lo)][target], r.vals[growthKey(hi)][target]
	var out []float64
	for i := range min(len(a), len(b)) {
		if !math.IsNaN(a[i]) && !math.IsNaN(b[i]) && hi > lo {
			out = append(out, (b[i]*float64(hi)-a[i]*float64(lo))/float64(hi-lo))
		}
	}
	return median(out)
}

// exitHop names the targets of the SOCKS5 exit hop table.
const (
	viaSOCKS  = "waproxy-socks5"
	socksOnly = "microsocks"
)

// hasExitHop reports whether the exit hop table has a row: waproxy-socks5
// or microsocks is in the run, and a figure measured for either (the
// tlsbulk figure alone runs neither).
func (r *results) hasExitHop() bool {
	for _, m := range r.metrics {
		for _, name := range []string{viaSOCKS, socksOnly} {
			if t := r.target(name); t != nil && m.appliesTo(t) {
				return true
			}
		}
	}
	return false
}

// writeExitHop writes the cost of the SOCKS5 exit hop: waproxy direct and
// through microsocks, microsocks alone, and same-round ratios between them.
// It writes nothing when hasExitHop is false.
func (r *results) writeExitHop(w io.Writer) {
	if !r.hasExitHop() {
		return
	}
	r.writeCompared(w, []string{"waproxy", viaSOCKS, socksOnly}, [][2]string{{viaSOCKS, "waproxy"}, {viaSOCKS, socksOnly}})
}

// hasAB reports whether the run has both builds of an A/B run.
func (r *results) hasAB() bool { return r.hasTarget(buildA) && r.hasTarget(buildB) }

// writeAB writes the two builds of an A/B run side by side, with the
// same-round ratios of B to A. It writes nothing when hasAB is false.
func (r *results) writeAB(w io.Writer) {
	if !r.hasAB() {
		return
	}
	r.writeCompared(w, []string{buildA, buildB}, [][2]string{{buildB, buildA}})
}

// writeCompared writes a table of the named targets' medians and, for each
// pair, the same-round ratios of the first to the second. A figure is a row
// when it applies to a target other than the first.
func (r *results) writeCompared(w io.Writer, names []string, pairs [][2]string) {
	var ts []*target
	for _, name := range names {
		if t := r.target(name); t != nil {
			ts = append(ts, t)
		}
	}
	head := []string{"figure"}
	for _, t := range ts {
		head = append(head, t.name)
	}
	ratios := [][2]string{}
	for _, p := range pairs {
		if r.hasTarget(p[0]) && r.hasTarget(p[1]) {
			ratios = append(ratios, p)
			head = append(head, p[0]+"/"+p[1])
		}
	}
	writeRow(w, head)
	writeRow(w, dashes(len(head)))
	for _, m := range r.metrics {
		applies := false
		for _, t := range ts {
			applies = applies || (t.name != names[0] && m.appliesTo(t))
		}
		if !applies {
			continue
		}
		row := []string{m.label}
		for _, t := range ts {
			row = append(row, r.cell(m, t))
		}
		for _, p := range ratios {
			a, b := r.target(p[0]), r.target(p[1])
			if !m.appliesTo(a) || !m.appliesTo(b) {
				row = append(row, "–")
				continue
			}
			row = append(row, formatRatio(r.ratio(m.key, p[0], p[1])))
		}
		writeRow(w, row)
	}
}

// target returns the target of that name (nil if it is not in the run).
func (r *results) target(name string) *target {
	for _, t := range r.targets {
		if t.name == name {
			return t
		}
	}
	return nil
}

// writeRaw writes every round's number for every metric.
func (r *results) writeRaw(w io.Writer) {
	for _, m := range r.metrics {
		fmt.Fprintf(w, "\n%s\n\n", m.label)
		head := []string{"round"}
		for _, t := range r.targets {
			head = append(head, t.name)
		}
		writeRow(w, head)
		writeRow(w, dashes(len(head)))
		for i := range r.rounds {
			row := []string{strconv.Itoa(i + 1)}
			for _, t := range r.targets {
				v := r.vals[m.key][t.name][i]
				switch {
				case t.notRun != "":
					row = append(row, "not run")
				case !m.appliesTo(t):
					row = append(row, "–")
				case math.IsNaN(v):
					row = append(row, "–")
				default:
					row = append(row, m.format(v))
				}
			}
			writeRow(w, row)
		}
	}
}

func writeRow(w io.Writer, cells []string) {
	fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
}

func dashes(n int) []string {
	d := make([]string, n)
	for i := range d {
		d[i] = "---"
	}
	return d
}
