//go:build !linux

package handlers

import (
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type pairStats struct{ toUpstream, toClient int64 }

// offload is Linux-only (epoll); elsewhere the goroutine relay carries every
// connection.
func offload(client, upstream net.Conn, idle time.Duration, n [2]*atomic.Int64, fromClient, fromUpstream prometheus.Counter,
	done func(pairStats, error)) bool {
	return false
}

// offloadCuttable is offload that also returns a cut function; see offload.
func offloadCuttable(client, upstream net.Conn, idle time.Duration, n [2]*atomic.Int64, fromClient, fromUpstream prometheus.Counter,
	done func(pairStats, error)) (cut func(), ok bool) {
	return nil, false
}

// offloadTLS is Linux-only (epoll); elsewhere the goroutine relay carries
// TLS-terminated connections.
func offloadTLS(client, upstream net.Conn, idle time.Duration, n [2]*atomic.Int64, fromClient, fromUpstream prometheus.Counter,
	done func(pairStats, error)) (cut func(), ok bool) {
	return nil, false
}

// watchedSockets is -1: there is no waker.
func watchedSockets() int { return -1 }

// connectsInLoop is false: there is no event loop.
func connectsInLoop(net.Conn) bool { return false }

// offloadConnect is Linux-only (epoll); elsewhere wa_proxy dials.
func offloadConnect(client net.Conn, address string, addrs []netip.AddrPort, first [][]byte, fromClient int,
	timeout, idle time.Duration, n [2]*atomic.Int64, counters [2]prometheus.Counter,
	done func(pairStats, error)) (cut func(), ok bool, err error) {
	return nil, false, nil
}
