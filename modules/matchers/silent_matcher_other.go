//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly || solaris)

package matchers

import (
	"net"
	"time"
)

// silentPeekSupported reports whether wa_silent can wait on this platform.
const silentPeekSupported = false

// peekSilent cannot peek at a socket without blocking or consuming on this
// platform (Windows, Plan 9, AIX, z/OS, js/wasm...), so wa_silent never
// matches here: it returns false at once.
func peekSilent(net.Conn, time.Duration) (bool, error) { return false, nil }
