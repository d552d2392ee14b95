//go:build race

package testutil

// RaceEnabled reports whether the binary was built with -race. Under the
// race detector every memory access is several times slower, a process may
// hold at most 8128 live goroutines, and sync.Pool drops a quarter of what it
// is given (so pooled buffers are sometimes allocated anew): heavy tests
// scale down and allocation counts are not checked.
const RaceEnabled = true
