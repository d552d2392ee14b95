package caddyfile_test

// The modules that the waproxy preset's JSON names beyond ours, so that the
// examples built on it validate in TestExamples.
import (
	_ "github.com/mholt/caddy-l4/modules/l4proxyprotocol"
	_ "github.com/mholt/caddy-l4/modules/l4tls"
)
