//go:build !linux

package handlers

import (
	"net"
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
