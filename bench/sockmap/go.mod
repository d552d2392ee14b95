module github.com/waproxy/caddy-waproxy/bench/sockmap

go 1.26.0

require (
	github.com/cilium/ebpf v0.20.0
	golang.org/x/sys v0.48.0
)
