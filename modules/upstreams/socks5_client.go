package upstreams

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"

	"github.com/waproxy/caddy-waproxy/modules/metrics"
)

// The SOCKS5 client side of RFC 1928 (CONNECT only) and RFC 1929
// (username/password). It reads exactly the bytes each reply consists of,
// never more, so that once the CONNECT reply is read every later byte on the
// connection comes from the destination.

const (
	socksVersion     = 0x05
	userPassVersion  = 0x01 // RFC 1929 sub-negotiation version
	methodNoAuth     = 0x00
	methodGSSAPI     = 0x01
	methodUserPass   = 0x02
	methodNoneUsable = 0xFF
	cmdConnect       = 0x01
	atypIPv4         = 0x01
	atypDomain       = 0x03
	atypIPv6         = 0x04

	maxSocksName = 255 // a domain name, a username, a password: one length byte
	// socksMsgLen holds the largest CONNECT request or reply:
	// VER CMD/REP RSV ATYP, a length byte, a 255-byte name and the port.
	socksMsgLen = 4 + 1 + maxSocksName + 2
)

// socksReplyTexts are RFC 1928's meanings of the CONNECT reply codes.
var socksReplyTexts = [...]string{
	1: "general SOCKS server failure",
	2: "connection not allowed by ruleset",
	3: "network unreachable",
	4: "host unreachable",
	5: "destination refused the connection",
	6: "TTL expired",
	7: "command not supported",
	8: "address type not supported",
}

// socksReplyText returns the meaning of a non-zero CONNECT reply code.
func socksReplyText(code byte) string {
	if int(code) < len(socksReplyTexts) && socksReplyTexts[code] != "" {
		return socksReplyTexts[code]
	}
	return "unassigned reply code"
}

// socksGreeting returns the method selection message: no authentication, and
// username/password when we have credentials.
func socksGreeting(withAuth bool) []byte {
	if withAuth {
		return []byte{socksVersion, 2, methodNoAuth, methodUserPass}
	}
	return []byte{socksVersion, 1, methodNoAuth}
}

// socksUserPass returns the RFC 1929 request. username and password must be
// 1 to 255 bytes long. The result holds the password: never log it.
func socksUserPass(username, password string) []byte {
	b := make([]byte, 0, 3+len(username)+len(password))
	b = append(b, userPassVersion, byte(len(username)))
	b = append(b, username...)
	b = append(b, byte(len(password)))
	return append(b, password...)
}

// appendSocksConnect appends the CONNECT request for address ("host:port") to
// b. A host name goes as a name (ATYP 3), so the SOCKS5 server resolves it;
// IP literals go as ATYP 1 or 4. Errors are of kind metrics.KindDestination.
func appendSocksConnect(b []byte, address string) ([]byte, error) {
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, dialErrorf(metrics.KindDestination, "socks5: destination %q: %v", address, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return nil, dialErrorf(metrics.KindDestination, "socks5: destination %q: invalid port %q", address, portStr)
	}
	b = append(b, socksVersion, cmdConnect, 0x00)
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return nil, dialErrorf(metrics.KindDestination, "socks5: destination %q: an IPv6 zone cannot be sent to a SOCKS5 server", address)
		}
		if ip = ip.Unmap(); ip.Is4() {
			a := ip.As4()
			b = append(append(b, atypIPv4), a[:]...)
		} else {
			a := ip.As16()
			b = append(append(b, atypIPv6), a[:]...)
		}
	} else {
		switch {
		case host == "":
			return nil, dialErrorf(metrics.KindDestination, "socks5: destination %q: empty host", address)
		case len(host) > maxSocksName:
			return nil, dialErrorf(metrics.KindDestination, "socks5: destination host name is %d bytes long; SOCKS5 allows at most %d", len(host), maxSocksName)
		}
		b = append(b, atypDomain, byte(len(host)))
		b = append(b, host...)
	}
	return binary.BigEndian.AppendUint16(b, uint16(port)), nil
}

// socksStepError is a failed read or write in a step of the handshake
// ("greeting", "authentication", "connect"). The dialer decides its kind, as
// that depends on its context.
type socksStepError struct {
	step string
	err  error
}

func (e *socksStepError) Error() string { return e.step + ": " + e.err.Error() }
func (e *socksStepError) Unwrap() error { return e.err }

// socksReplyError is an answer from the server that ends the handshake: a
// refusal, a rejected authentication or a malformed reply.
type socksReplyError struct {
	kind string // metrics.KindSOCKS5*
	msg  string
}

func (e *socksReplyError) Error() string { return e.msg }

func replyErrorf(kind, format string, args ...any) error {
	return &socksReplyError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// socksNegotiate runs the first part of the client handshake on rw: it sends
// greeting and, when the server asks for username and password,
// authenticates with auth (nil without credentials). buf is scratch space of
// at least socksMsgLen bytes. It reads exactly the bytes of the replies.
func socksNegotiate(rw io.ReadWriter, greeting, auth, buf []byte) error {
	if _, err := rw.Write(greeting); err != nil {
		return &socksStepError{"greeting", err}
	}
	if _, err := io.ReadFull(rw, buf[:2]); err != nil {
		return &socksStepError{"greeting", err}
	}
	if buf[0] != socksVersion {
		return replyErrorf(metrics.KindSOCKS5Protocol, "greeting: unexpected reply version 0x%02x (not a SOCKS5 server?)", buf[0])
	}
	switch method := buf[1]; {
	case method == methodNoAuth:
		return nil
	case method == methodUserPass && auth != nil:
		return socksAuthenticate(rw, auth, buf)
	case method == methodUserPass:
		return replyErrorf(metrics.KindSOCKS5Auth, "no acceptable authentication method (server requires username/password; none configured)")
	case method == methodNoneUsable && auth != nil:
		return replyErrorf(metrics.KindSOCKS5Auth, "no acceptable authentication method (server accepts neither no authentication nor username/password)")
	case method == methodNoneUsable:
		return replyErrorf(metrics.KindSOCKS5Auth, "no acceptable authentication method (server requires authentication; none configured)")
	case method == methodGSSAPI:
		return replyErrorf(metrics.KindSOCKS5Protocol, "greeting: server chose GSSAPI authentication, which was not offered")
	default:
		return replyErrorf(metrics.KindSOCKS5Protocol, "greeting: server chose authentication method 0x%02x, which was not offered", method)
	}
}

// socksConnect sends the CONNECT request req on rw, after socksNegotiate, and
// reads the reply: exactly its bytes, so that everything read from rw
// afterwards comes from the destination. buf is scratch space of at least
// socksMsgLen bytes.
func socksConnect(rw io.ReadWriter, req, buf []byte) error {
	buf = buf[:socksMsgLen]
	if _, err := rw.Write(req); err != nil {
		return &socksStepError{"connect", err}
	}
	// VER REP RSV ATYP. A failure reply may be cut short; VER and REP suffice.
	if n, err := io.ReadFull(rw, buf[:4]); err != nil {
		if n < 2 || (buf[0] == socksVersion && buf[1] == 0) {
			return &socksStepError{"connect", err}
		}
	}
	if buf[0] != socksVersion {
		return replyErrorf(metrics.KindSOCKS5Protocol, "connect: unexpected reply version 0x%02x", buf[0])
	}
	if rep := buf[1]; rep != 0 {
		return replyErrorf(metrics.KindSOCKS5Refused, "%s (reply %d)", socksReplyText(rep), rep)
	}
	// BND.ADDR and BND.PORT: read them whole (and discard them), so none of
	// the reply is left for the caller to mistake for the destination's bytes.
	var n int
	switch atyp := buf[3]; atyp {
	case atypIPv4:
		n = 4 + 2
	case atypIPv6:
		n = 16 + 2
	case atypDomain:
		if _, err := io.ReadFull(rw, buf[4:5]); err != nil {
			return &socksStepError{"connect", err}
		}
		n = int(buf[4]) + 2 // at most 257: buf has room
	default:
		return replyErrorf(metrics.KindSOCKS5Protocol, "connect: reply has unknown address type 0x%02x", atyp)
	}
	if _, err := io.ReadFull(rw, buf[5:5+n]); err != nil {
		return &socksStepError{"connect", err}
	}
	return nil
}

// socksAuthenticate runs the RFC 1929 sub-negotiation.
func socksAuthenticate(rw io.ReadWriter, auth, buf []byte) error {
	if _, err := rw.Write(auth); err != nil {
		return &socksStepError{"authentication", err}
	}
	if _, err := io.ReadFull(rw, buf[:2]); err != nil {
		return &socksStepError{"authentication", err}
	}
	// RFC 1929 says version 1; some servers answer with 5. Both carry the
	// status in the second byte.
	if buf[0] != userPassVersion && buf[0] != socksVersion {
		return replyErrorf(metrics.KindSOCKS5Protocol, "authentication: unexpected reply version 0x%02x", buf[0])
	}
	if buf[1] != 0 {
		return replyErrorf(metrics.KindSOCKS5Auth, "username/password rejected (status %d)", buf[1])
	}
	return nil
}
