package registry

import (
	"sync"
	"sync/atomic"
	"time"
)

// Event types.
const (
	EventOpened = "opened"
	EventClosed = "closed"
	EventError  = "error"
)

// Event is one connection event (GET /waproxy/events). Connection is the
// state at the time of the event: for `closed`, the final byte counts and
// duration.
type Event struct {
	Type       string    `json:"type"`
	Time       time.Time `json:"time"`
	Connection Info      `json:"connection"`
	Error      string    `json:"error,omitempty"`
}

// Subscriber receives events on a bounded channel. A subscriber that falls
// behind (its buffer is full) is dropped, never waited for: publishing runs
// on the relay's goroutines and must not block.
type Subscriber struct {
	ch      chan Event
	dropped chan struct{}
	once    sync.Once
}

var (
	subMu   sync.Mutex
	subs    = make(map[*Subscriber]struct{})
	subsLen atomic.Int32
)

// Subscribe returns a subscriber with room for buffer pending events.
func Subscribe(buffer int) *Subscriber {
	s := &Subscriber{ch: make(chan Event, max(buffer, 1)), dropped: make(chan struct{})}
	subMu.Lock()
	subs[s] = struct{}{}
	subsLen.Store(int32(len(subs)))
	subMu.Unlock()
	return s
}

// Events is the channel the subscriber reads.
func (s *Subscriber) Events() <-chan Event { return s.ch }

// Dropped is closed when the subscriber was dropped for being too slow
// (or unsubscribed).
func (s *Subscriber) Dropped() <-chan struct{} { return s.dropped }

// Unsubscribe stops delivery. It is safe to call more than once.
func (s *Subscriber) Unsubscribe() {
	subMu.Lock()
	s.remove()
	subMu.Unlock()
}

// remove must be called with subMu held.
func (s *Subscriber) remove() {
	delete(subs, s)
	subsLen.Store(int32(len(subs)))
	s.once.Do(func() { close(s.dropped) })
}

func publish(typ string, c *Conn, err error) {
	if subsLen.Load() == 0 {
		return // nobody listens: no snapshot, no lock
	}
	send(typ, c, err)
}

// send is publish with subscribers. It is a function of its own so the
// common case (none) does not reserve its large stack frame: publish runs on
// every connection's goroutine, which would grow its stack for it.
func send(typ string, c *Conn, err error) {
	ev := Event{Type: typ, Time: time.Now(), Connection: c.Info()}
	if err != nil {
		ev.Error = err.Error()
	}
	subMu.Lock()
	defer subMu.Unlock()
	for s := range subs {
		select {
		case s.ch <- ev:
		default:
			s.remove() // too slow: drop it rather than block the proxy
		}
	}
}

// Subscribers returns how many subscribers receive events.
func Subscribers() int { return int(subsLen.Load()) }
