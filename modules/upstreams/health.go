package upstreams

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
)

// Health check defaults.
const (
	DefaultHealthDestination = "g.whatsapp.net:5222"
	DefaultHealthInterval    = 30 * time.Second
	DefaultHealthTimeout     = 5 * time.Second
)

// HealthCheck configures a dialer's active health check: every Interval,
// each upstream (each SOCKS5 server, or the direct dialer) opens a TCP
// connection to Destination the way a proxied connection would (for SOCKS5:
// method selection, authentication and a CONNECT that must succeed), then
// closes it. The result is the gauge whatsapp_proxy_upstream_healthy and the
// `health` of GET /waproxy/upstreams; the socks5 dialer skips unhealthy
// servers in its failover order (unless all of them are unhealthy).
//
// The first check runs when the config loads. Checkers with the same
// settings are shared by every handler and survive config reloads, so a
// reload neither restarts nor forgets them.
type HealthCheck struct {
	// Destination is the "host:port" each check connects to. It is used as
	// configured: the handler's allowlist does not apply to it. Placeholders
	// such as `{env.HEALTH_DESTINATION}` are expanded at provision.
	// Default: `g.whatsapp.net:5222`.
	Destination string `json:"destination,omitempty"`

	// Interval is the time between the start of two checks, at least 10ms.
	// Default: `30s`.
	Interval caddy.Duration `json:"interval,omitempty"`

	// Timeout bounds one check: connecting, the SOCKS5 handshake and the
	// CONNECT reply; at least 10ms. Default: `5s`.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// UnhealthyAfter is how many consecutive failed checks mark a healthy
	// upstream unhealthy. Default: `1`.
	UnhealthyAfter int `json:"unhealthy_after,omitempty"`

	// HealthyAfter is how many consecutive successful checks mark an
	// unhealthy upstream healthy again. Default: `1`.
	HealthyAfter int `json:"healthy_after,omitempty"`
}

// healthSettings is a provisioned HealthCheck.
type healthSettings struct {
	destination     string
	interval        time.Duration
	timeout         time.Duration
	unhealthyAfter  int
	healthyAfter    int
	credentialsHash string // for socks5 with credentials: checkers with other credentials are other checkers
}

// minHealthPeriod is the shortest interval and timeout a health check takes.
const minHealthPeriod = 10 * time.Millisecond

// provision expands placeholders, applies the defaults and checks the values.
func (hc *HealthCheck) provision() (healthSettings, error) {
	s := healthSettings{
		destination:    strings.TrimSpace(caddy.NewReplacer().ReplaceKnown(hc.Destination, "")),
		interval:       time.Duration(hc.Interval),
		timeout:        time.Duration(hc.Timeout),
		unhealthyAfter: hc.UnhealthyAfter,
		healthyAfter:   hc.HealthyAfter,
	}
	if hc.Destination == "" {
		s.destination = DefaultHealthDestination
	}
	if err := checkHostPort(s.destination); err != nil {
		return s, fmt.Errorf("health_check: destination %q: %v", hc.Destination, err)
	}
	switch {
	case s.interval == 0:
		s.interval = DefaultHealthInterval
	case s.interval < minHealthPeriod:
		return s, fmt.Errorf("health_check: interval %v is too short: at least %v", s.interval, minHealthPeriod)
	}
	switch {
	case s.timeout == 0:
		s.timeout = DefaultHealthTimeout
	case s.timeout < minHealthPeriod:
		return s, fmt.Errorf("health_check: timeout %v is too short: at least %v", s.timeout, minHealthPeriod)
	}
	switch {
	case s.unhealthyAfter < 0:
		return s, fmt.Errorf("health_check: unhealthy_after must not be negative: %d", s.unhealthyAfter)
	case s.unhealthyAfter == 0:
		s.unhealthyAfter = 1
	}
	switch {
	case s.healthyAfter < 0:
		return s, fmt.Errorf("health_check: healthy_after must not be negative: %d", s.healthyAfter)
	case s.healthyAfter == 0:
		s.healthyAfter = 1
	}
	return s, nil
}

// unmarshalHealthCheck reads `health_check [<destination>] [{ ... }]`, with d
// on the health_check token:
//
//	health_check [<destination>] {
//		interval <duration>
//		timeout <duration>
//		unhealthy_after <n>
//		healthy_after <n>
//	}
func unmarshalHealthCheck(d *caddyfile.Dispenser, dialer string) (*HealthCheck, error) {
	hc := new(HealthCheck)
	if d.NextArg() {
		hc.Destination = d.Val()
		if d.NextArg() {
			return nil, d.Errf("%s: health_check: unexpected argument '%s': it takes one destination", dialer, d.Val())
		}
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return nil, d.Errf("%s: health_check: duplicate subdirective '%s'", dialer, opt)
		}
		seen[opt] = true
		if d.CountRemainingArgs() != 1 {
			return nil, d.Errf("%s: health_check: subdirective '%s' takes exactly one argument", dialer, opt)
		}
		d.NextArg()
		val := d.Val()
		switch opt {
		case "interval", "timeout":
			dur, err := caddy.ParseDuration(val)
			if err != nil {
				return nil, d.Errf("%s: health_check: %s: bad duration '%s': %v", dialer, opt, val, err)
			}
			if dur <= 0 {
				return nil, d.Errf("%s: health_check: %s must be positive: '%s'", dialer, opt, val)
			}
			if opt == "interval" {
				hc.Interval = caddy.Duration(dur)
			} else {
				hc.Timeout = caddy.Duration(dur)
			}
		case "unhealthy_after", "healthy_after":
			n, err := strconv.Atoi(val)
			if err != nil || n < 1 {
				return nil, d.Errf("%s: health_check: %s: want a whole number of checks, at least 1, got '%s'", dialer, opt, val)
			}
			if opt == "unhealthy_after" {
				hc.UnhealthyAfter = n
			} else {
				hc.HealthyAfter = n
			}
		default:
			return nil, d.Errf("%s: health_check: unrecognized subdirective '%s'", dialer, opt)
		}
		if d.NextBlock(nesting + 1) {
			return nil, d.Errf("%s: health_check: malformed subdirective '%s': blocks are not supported", dialer, opt)
		}
	}
	return hc, nil
}

// healthCheckers are the running checkers, shared by every dialer whose
// upstream and health settings are the same, across config reloads. The key
// is a healthKey.
var healthCheckers = caddy.NewUsagePool()

// healthKey identifies a checker: the upstream and every setting that
// changes what a check does.
type healthKey struct {
	upstream string // the gauge label: "socks5 127.0.0.1:1080" or "direct"
	healthSettings
}

// checker runs one upstream's health checks in a goroutine, from the moment
// it is created until it is destructed (when no config uses it any more).
type checker struct {
	upstream string
	settings healthSettings
	probe    func(ctx context.Context) error

	healthy atomic.Bool // true until checks say otherwise
	logger  atomic.Pointer[zap.Logger]

	mu        sync.Mutex // guards the fields below
	lastCheck time.Time
	lastErr   string
	checked   bool
	fails     int // consecutive failed checks
	successes int // consecutive successful checks

	cancel context.CancelFunc
	done   chan struct{}
}

// acquireChecker returns the running checker for upstream and settings,
// starting it if no config has one yet. probe runs one check. Release it
// with healthCheckers.Delete(key).
func acquireChecker(ctx caddy.Context, upstream string, settings healthSettings, probe func(context.Context) error) (*checker, healthKey, error) {
	key := healthKey{upstream: upstream, healthSettings: settings}
	logger := ctx.Logger().Named("health")
	val, _, err := healthCheckers.LoadOrNew(key, func() (caddy.Destructor, error) {
		c := &checker{upstream: upstream, settings: settings, probe: probe, done: make(chan struct{})}
		c.healthy.Store(true)
		c.logger.Store(logger)
		acquireGaugeLabel(upstream)
		var runCtx context.Context
		runCtx, c.cancel = context.WithCancel(context.Background())
		go c.run(runCtx)
		return c, nil
	})
	if err != nil {
		return nil, key, err
	}
	c := val.(*checker)
	c.logger.Store(logger) // the newest config's logger
	return c, key, nil
}

// Destruct stops the checker and waits for its goroutine to end. The
// UsagePool calls it when the last config using the checker is unloaded.
func (c *checker) Destruct() error {
	c.cancel()
	<-c.done
	releaseGaugeLabel(c.upstream)
	return nil
}

// run checks at once, then every interval, until ctx ends.
func (c *checker) run(ctx context.Context) {
	defer close(c.done)
	defer func() {
		if r := recover(); r != nil {
			c.logger.Load().Error("health checker panicked", zap.String("upstream", c.upstream),
				zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
		}
	}()
	tick := time.NewTicker(c.settings.interval)
	defer tick.Stop()
	for {
		c.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// check runs one probe and records its result.
func (c *checker) check(ctx context.Context) {
	pctx, cancel := context.WithTimeout(ctx, c.settings.timeout)
	err := c.probe(pctx)
	cancel()
	if ctx.Err() != nil {
		return // stopping: the probe was cut short, it says nothing about the upstream
	}
	now := time.Now()

	c.mu.Lock()
	c.lastCheck, c.checked = now, true
	wasHealthy := c.healthy.Load()
	healthy := wasHealthy
	if err != nil {
		c.lastErr = err.Error()
		c.fails++
		c.successes = 0
		if c.fails >= c.settings.unhealthyAfter {
			healthy = false
		}
	} else {
		c.lastErr = ""
		c.successes++
		c.fails = 0
		if c.successes >= c.settings.healthyAfter {
			healthy = true
		}
	}
	c.healthy.Store(healthy)
	c.mu.Unlock()

	if healthy {
		metrics.UpstreamHealthy.WithLabelValues(c.upstream).Set(1)
	} else {
		metrics.UpstreamHealthy.WithLabelValues(c.upstream).Set(0)
	}
	logger := c.logger.Load()
	switch {
	case wasHealthy && !healthy:
		logger.Warn("upstream unhealthy", zap.String("upstream", c.upstream),
			zap.String("destination", c.settings.destination), zap.Error(err))
	case !wasHealthy && healthy:
		logger.Info("upstream healthy again", zap.String("upstream", c.upstream),
			zap.String("destination", c.settings.destination))
	default:
		if ce := logger.Check(zap.DebugLevel, "health check"); ce != nil {
			ce.Write(zap.String("upstream", c.upstream), zap.String("destination", c.settings.destination),
				zap.Bool("healthy", healthy), zap.Error(err))
		}
	}
}

// status is the checker's state for the admin API.
func (c *checker) status() registry.ServerHealth {
	c.mu.Lock()
	defer c.mu.Unlock()
	h := registry.ServerHealth{
		Upstream:    c.upstream,
		Healthy:     c.healthy.Load(),
		Destination: c.settings.destination,
		Error:       c.lastErr,
	}
	if c.checked {
		h.LastCheck = c.lastCheck
	}
	return h
}

// gaugeLabels counts the running checkers per upstream label, so that the
// gauge's series is deleted when the last one stops, and not while another
// (from a config being loaded with other settings) still reports it.
var (
	gaugeMu     sync.Mutex
	gaugeLabels = make(map[string]int)
)

func acquireGaugeLabel(upstream string) {
	gaugeMu.Lock()
	gaugeLabels[upstream]++
	gaugeMu.Unlock()
}

func releaseGaugeLabel(upstream string) {
	gaugeMu.Lock()
	defer gaugeMu.Unlock()
	gaugeLabels[upstream]--
	if gaugeLabels[upstream] <= 0 {
		delete(gaugeLabels, upstream)
		metrics.UpstreamHealthy.DeleteLabelValues(upstream)
	}
}

// healthSet is a dialer's checkers: one per upstream, in the dialer's order.
// The zero value (no health check) reports every upstream healthy.
type healthSet struct {
	checkers []*checker
	keys     []healthKey
}

// add starts (or joins) the checker of upstream.
func (hs *healthSet) add(ctx caddy.Context, upstream string, settings healthSettings, probe func(context.Context) error) error {
	c, key, err := acquireChecker(ctx, upstream, settings, probe)
	if err != nil {
		return fmt.Errorf("health_check %s: %w", upstream, err)
	}
	hs.checkers = append(hs.checkers, c)
	hs.keys = append(hs.keys, key)
	return nil
}

// release lets go of every checker; the last dialer to release one stops it.
func (hs *healthSet) release() error {
	var errs []error
	for _, key := range hs.keys {
		if _, err := healthCheckers.Delete(key); err != nil {
			errs = append(errs, err)
		}
	}
	hs.checkers, hs.keys = nil, nil
	return errors.Join(errs...)
}

// view returns a function that snapshots the checkers' state, or nil
// without checkers.
func (hs *healthSet) view() func() []registry.ServerHealth {
	checkers := hs.checkers
	if len(checkers) == 0 {
		return nil
	}
	return func() []registry.ServerHealth {
		list := make([]registry.ServerHealth, len(checkers))
		for i, c := range checkers {
			list[i] = c.status()
		}
		return list
	}
}

// HealthView returns a function that reports the health of d's upstreams for
// GET /waproxy/upstreams, or nil when d has no health check. Handlers pass it
// to registry.AddDialer.
func HealthView(d Dialer) func() []registry.ServerHealth {
	switch d := d.(type) {
	case *SOCKS5:
		return d.health.view()
	case *Direct:
		return d.health.view()
	}
	return nil
}

// credentialsHash distinguishes checkers of the same server with different
// credentials without keeping the password in the key.
func credentialsHash(username, password string) string {
	if username == "" && password == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(username + "\x00" + password))
	return string(sum[:])
}
