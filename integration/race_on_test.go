//go:build race

package integration

// raceEnabled reports whether the test binary was built with -race. The race
// detector makes every memory access several times slower and caps a process
// at 8128 live goroutines, so the heaviest tests (TestReloadUnderLoad) scale
// their connection count down under it; the behaviour they assert is the same.
const raceEnabled = true
