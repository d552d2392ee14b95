package matchers

import "golang.org/x/sys/unix"

// bytesConsumed returns how many bytes have been read from the TCP socket
// fd so far: those it received in sequence (tcpi_bytes_received) less those
// still in its receive queue (SIOCINQ).
func bytesConsumed(fd int) (n int64, known bool) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0, false
	}
	queued, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	if err != nil {
		return 0, false
	}
	return int64(info.Bytes_received) - int64(queued), true
}
