// Package registry tracks every proxied connection from accept to close, and
// the dialers the running config uses. It is package-level state, so it
// outlives config reloads: a connection opened under one config is still
// listed, and still counted, after the next one is loaded.
//
// Handlers call Open when they take a connection and Close where they
// release the metrics gauges. The relay adds to a Conn's byte counters
// atomically; readers (the admin API) load them without locks.
package registry

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Conn is one tracked connection. The fields set before Open are fixed for
// its life; the destination may be set later (wa_http learns it from a
// request), and the byte counters grow while it relays. Never put
// credentials in a Conn.
type Conn struct {
	Remote   string // client address
	Listener string // local address the client connected to
	Protocol string // detected protocol (the protocol label of the metrics)
	Handler  string // handler module ID, e.g. layer4.handlers.wa_proxy
	Dialer   string // dialer module ID, e.g. wa.dialers.socks5

	// FromClient and FromUpstream count the bytes read from the client
	// (sent upstream) and from the upstream (sent to the client).
	FromClient, FromUpstream atomic.Int64

	id      uint64
	start   time.Time
	dest    atomic.Pointer[string]
	closed  atomic.Bool
	hookMu  sync.Mutex
	onClose []func()
	cut     func()
	wasCut  bool // Cut has run: ReplaceCut applies at once
}

// OnClose registers f to run once when c is closed (after it leaves the
// registry), e.g. to release a connection-limit slot. If c is already
// closed, f runs at once.
func (c *Conn) OnClose(f func()) {
	c.hookMu.Lock()
	if c.closed.Load() {
		c.hookMu.Unlock()
		f()
		return
	}
	c.onClose = append(c.onClose, f)
	c.hookMu.Unlock()
}

// SetCut records how to end c from outside (a graceful shutdown's
// deadline): f must make the connection end promptly and be safe to call
// from any goroutine, at most once. Handlers set it when they take the
// connection and again when the relay takes over.
func (c *Conn) SetCut(f func()) {
	c.hookMu.Lock()
	c.cut = f
	c.hookMu.Unlock()
}

// Cut ends c with the function given to SetCut; it reports whether there
// was one.
func (c *Conn) Cut() bool {
	c.hookMu.Lock()
	f := c.cut
	c.cut = nil
	c.wasCut = true
	c.hookMu.Unlock()
	if f == nil || c.closed.Load() {
		return false
	}
	f()
	return true
}

// ReplaceCut is SetCut for a later stage of the connection (the relay
// taking over from the handler): if c has already been cut, f runs at once
// instead of being recorded, so a cut that came while the stage changed
// still ends the new stage.
func (c *Conn) ReplaceCut(f func()) {
	c.hookMu.Lock()
	if c.wasCut {
		c.hookMu.Unlock()
		f()
		return
	}
	c.cut = f
	c.hookMu.Unlock()
}

// ID returns the connection's id, unique in this process (0 before Open).
func (c *Conn) ID() uint64 { return c.id }

// SetDestination records where the connection is carried (host:port).
func (c *Conn) SetDestination(dest string) { c.dest.Store(&dest) }

// Destination returns the recorded destination, or "".
func (c *Conn) Destination() string {
	if p := c.dest.Load(); p != nil {
		return *p
	}
	return ""
}

// Info is the JSON view of a connection (GET /waproxy/connections).
type Info struct {
	ID              uint64    `json:"id"`
	Remote          string    `json:"remote"`
	Listener        string    `json:"listener"`
	Protocol        string    `json:"protocol"`
	Handler         string    `json:"handler"`
	Destination     string    `json:"destination"`
	Dialer          string    `json:"dialer"`
	BytesFromClient int64     `json:"bytes_from_client"`
	BytesToClient   int64     `json:"bytes_to_client"`
	Start           time.Time `json:"start"`
	DurationSeconds float64   `json:"duration_seconds"`
}

// Info returns a snapshot of c.
func (c *Conn) Info() Info {
	return Info{
		ID: c.id, Remote: c.Remote, Listener: c.Listener, Protocol: c.Protocol,
		Handler: c.Handler, Destination: c.Destination(), Dialer: c.Dialer,
		BytesFromClient: c.FromClient.Load(), BytesToClient: c.FromUpstream.Load(),
		Start: c.start, DurationSeconds: time.Since(c.start).Seconds(),
	}
}

var (
	mu     sync.Mutex
	conns  = make(map[uint64]*Conn)
	nextID atomic.Uint64
	// emptied is closed (and reset to nil) when the last tracked
	// connection closes; Empty creates it on demand.
	emptied chan struct{}
)

// Open starts tracking c and publishes an `opened` event. It returns c.
func Open(c *Conn) *Conn {
	c.id = nextID.Add(1)
	c.start = time.Now()
	mu.Lock()
	conns[c.id] = c
	mu.Unlock()
	publish(EventOpened, c, nil)
	return c
}

// Close stops tracking c and publishes a `closed` event (with err's text
// when err is not nil) and, when err is not nil, an `error` event. Calls
// after the first do nothing.
func Close(c *Conn, err error) {
	if c == nil || !c.closed.CompareAndSwap(false, true) {
		return
	}
	mu.Lock()
	delete(conns, c.id)
	if emptied != nil && len(conns) == 0 {
		close(emptied)
		emptied = nil
	}
	mu.Unlock()
	c.hookMu.Lock()
	hooks := c.onClose
	c.onClose, c.cut = nil, nil
	c.hookMu.Unlock()
	for _, f := range hooks {
		f()
	}
	if err != nil {
		publish(EventError, c, err)
	}
	publish(EventClosed, c, err)
}

// CutAll cuts every tracked connection (see Conn.SetCut) and returns how
// many it cut.
func CutAll() int {
	mu.Lock()
	list := make([]*Conn, 0, len(conns))
	for _, c := range conns {
		list = append(list, c)
	}
	mu.Unlock()
	n := 0
	for _, c := range list {
		if c.Cut() {
			n++
		}
	}
	return n
}

// Len returns how many connections are tracked.
func Len() int {
	mu.Lock()
	defer mu.Unlock()
	return len(conns)
}

// closedChan is an already closed channel, for Empty.
var closedChan = func() chan struct{} { ch := make(chan struct{}); close(ch); return ch }()

// Empty returns a channel that is closed when no connection is tracked: at
// once if none is now, else when the last one closes. A connection opened
// after that may make the registry non-empty again; check Len after the
// channel closes. A graceful shutdown waits on it.
func Empty() <-chan struct{} {
	mu.Lock()
	defer mu.Unlock()
	if len(conns) == 0 {
		return closedChan
	}
	if emptied == nil {
		emptied = make(chan struct{})
	}
	return emptied
}

// Opened returns how many connections have been opened in this process, so
// the connections opened between two calls can be counted.
func Opened() uint64 { return nextID.Load() }

// List returns the tracked connections, oldest first.
func List() []Info {
	mu.Lock()
	list := make([]*Conn, 0, len(conns))
	for _, c := range conns {
		list = append(list, c)
	}
	mu.Unlock()
	slices.SortFunc(list, func(a, b *Conn) int { return cmpID(a.id, b.id) })
	out := make([]Info, len(list))
	for i, c := range list {
		out[i] = c.Info()
	}
	return out
}

func cmpID(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
