// Package hostname checks DNS host names as the proxy takes them from the
// wire: a TLS ClientHello's server name, an HTTP proxy request's target.
package hostname

// Limits of a host name (RFC 1035 §2.3.4, as presentation text).
const (
	// MaxLen is the longest host name, in bytes, without a trailing dot.
	MaxLen = 253
	// MaxLabelLen is the longest label, in bytes.
	MaxLabelLen = 63
)

// NotASCII is what Check says of a name with a byte IsByte refuses (a
// Unicode name among them).
const NotASCII = "is not an ASCII host name"

// IsByte reports whether c may appear in a host name label: letters,
// digits, `-` and `_` (used by some service names).
func IsByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// Check returns "" when name is a host name — at most MaxLen bytes,
// dot-separated labels of 1 to MaxLabelLen bytes for which IsByte holds,
// no trailing dot — and otherwise what is wrong with it, as a phrase that
// follows "the host name": "is empty or longer than 253 bytes", "has an
// empty label", "has a label longer than 63 bytes", "is not an ASCII host
// name". It allocates nothing.
func Check[T ~string | ~[]byte](name T) string {
	if len(name) == 0 || len(name) > MaxLen {
		return "is empty or longer than 253 bytes"
	}
	label := 0
	for i := range len(name) {
		switch c := name[i]; {
		case c == '.':
			if label == 0 {
				return "has an empty label"
			}
			label = 0
		case IsByte(c):
			label++
			if label > MaxLabelLen {
				return "has a label longer than 63 bytes"
			}
		default:
			return NotASCII
		}
	}
	if label == 0 {
		return "has an empty label"
	}
	return ""
}
