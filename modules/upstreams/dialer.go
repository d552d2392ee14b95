// Package upstreams holds the dialer modules (namespace wa.dialers) that the
// proxy handlers use to reach a destination: directly, or through SOCKS5
// servers. It also holds the destination allowlist the handlers enforce.
package upstreams

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// Dialer opens TCP connections to destinations. Modules in the wa.dialers
// namespace implement it.
type Dialer interface {
	// DialContext connects to address, a "host:port" string, over network
	// "tcp". A host name is passed on as a name, so a dialer that resolves at
	// the exit (SOCKS5) does so. The context carries the connect deadline.
	//
	// The returned connection has no bytes buffered in user space: once
	// DialContext returns, everything read from it comes from the
	// destination. Dialers return the underlying *net.TCPConn where they can,
	// so the relay can use the kernel's zero-copy paths.
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Resolver is implemented by a dialer whose connections are plain TCP from
// this host (wa.dialers.direct). Resolve returns the addresses DialContext
// would connect to for address, in the order it would try them, after the
// checks it makes; a caller that connects by itself (wa_proxy's event loop
// connects without a goroutine) keeps the dialer's policy that way. Errors
// are *DialError values, as DialContext's.
type Resolver interface {
	Resolve(ctx context.Context, network, address string) ([]netip.AddrPort, error)
}

// AttemptShare is how long a connect to one of a name's addresses may take
// when left is the time that remains and addrsLeft addresses (this one
// included) are still to try: an equal share, but at least 2 s while there
// is that much, so a silent address does not use up the others' time. It is
// net.Dialer's rule for a name (partialDeadline); the direct dialer and
// wa_proxy's event loop, which connect to a name's addresses themselves,
// both keep it.
func AttemptShare(left time.Duration, addrsLeft int) time.Duration {
	share := left / time.Duration(max(addrsLeft, 1))
	if share < 2*time.Second {
		share = min(left, 2*time.Second)
	}
	return share
}

// DialError is the error dialers return. Kind is one of the metrics.Kind*
// values and becomes the kind label of whatsapp_proxy_errors_total.
type DialError struct {
	Kind string // metrics.KindDial, KindTimeout, KindSOCKS5Auth, ...
	Err  error  // the message, already carrying its context
}

func (e *DialError) Error() string { return e.Err.Error() }
func (e *DialError) Unwrap() error { return e.Err }

// ErrorKind returns the errors_total kind for err: the Kind of a *DialError
// in its chain, metrics.KindTimeout for a deadline, else metrics.KindDial.
func ErrorKind(err error) string {
	var de *DialError
	if errors.As(err, &de) && de.Kind != "" {
		return de.Kind
	}
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return metrics.KindTimeout
	}
	return metrics.KindDial
}

// dialErrorf returns a *DialError of kind with a formatted message (%w works).
func dialErrorf(kind, format string, args ...any) error {
	return &DialError{Kind: kind, Err: fmt.Errorf(format, args...)}
}
