package handlers

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/waproxy/caddy-waproxy/internal/hostname"
	"github.com/waproxy/caddy-waproxy/modules/metrics"
	"github.com/waproxy/caddy-waproxy/modules/registry"
	"github.com/waproxy/caddy-waproxy/modules/upstreams"
)

const (
	// httpMaxHeaderBytes caps a request's header (the request line and the
	// fields): a larger one is answered 431. A response's header may take
	// 1 MiB (the transport's MaxResponseHeaderBytes).
	httpMaxHeaderBytes = 64 << 10
	// httpBufSize is the size of a client connection's read and write buffers.
	httpBufSize = 4 << 10
	// viaPseudonym names this proxy in the Via fields it adds (RFC 9110 7.6.3).
	viaPseudonym = "waproxy"
	// lingerTimeout and lingerMaxBytes bound how long and how much
	// lingerClose reads from a client after a closing response.
	lingerTimeout  = 500 * time.Millisecond
	lingerMaxBytes = 256 << 10
	// proxyAuthenticate is the challenge of a 407.
	proxyAuthenticate = `Basic realm="waproxy", charset="UTF-8"`
)

// errHeaderTooLarge reports a request header longer than httpMaxHeaderBytes.
var errHeaderTooLarge = errors.New("request header too large")

// Handle serves HTTP proxy requests on cx until the client leaves, a
// request asks to close, a failure ends the connection, or a CONNECT turns
// it into a tunnel. It is a terminal handler: next is never called.
// Failures are logged once here and counted in whatsapp_proxy_errors_total;
// Handle returns nil so caddy-l4 does not log them again.
func (h *HandleHTTP) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	protocol := metrics.Protocol(cx)
	metrics.ConnectionsTotal.Inc()
	metrics.ConnectionsActive.Inc()
	metrics.ProtocolGauge(protocol).Inc()
	c := &httpConn{h: h, cx: cx, remote: cx.RemoteAddr().String(), protocol: protocol, idle: time.Duration(h.IdleTimeout)}
	c.rc = registry.Open(&registry.Conn{Remote: c.remote, Listener: cx.LocalAddr().String(), Protocol: protocol,
		Handler: "layer4.handlers.wa_http", Dialer: h.dialerID})
	holdLimit(cx, c.rc)
	// a shutdown's deadline ends the connection between requests too
	c.rc.SetCut(func() { _ = cx.Conn.Close() })
	release := func() {
		metrics.ConnectionsActive.Dec()
		metrics.ProtocolGauge(protocol).Dec()
		registry.Close(c.rc, c.relayErr) // how a tunnel the goroutine relay carried ended; nil otherwise
	}
	c.repl, _ = cx.Context.Value(layer4.ReplacerCtxKey).(*caddy.Replacer)
	if c.repl == nil {
		c.repl = caddy.NewReplacer()
	}
	c.in = &clientReader{conn: cx}
	c.out = &clientWriter{conn: cx, idle: c.idle}
	c.br = bufio.NewReaderSize(c.in, httpBufSize)
	c.bw = bufio.NewWriterSize(c.out, httpBufSize)

	if !c.serve() {
		c.lingerClose()
		release()
	} // else a tunnel owns the connection and releases the gauges when it ends
	return nil
}

// lingerClose ends a connection the proxy is closing: it shuts down the
// write half, then reads and discards what the client still sends, for a
// moment, before caddy-l4 closes the socket. Closing a socket with unread
// bytes sends a reset, which can destroy the last response (a 400 for a
// request whose body was not read) before the client has read it.
func (c *httpConn) lingerClose() {
	if !c.linger {
		return
	}
	closeWrite(c.cx.Conn)
	_ = c.cx.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	if c.pending != nil {
		// the transport may still be reading a request body from the
		// client: the deadline ends that read
		select {
		case <-c.pending.closed:
		case <-time.After(2 * lingerTimeout):
		}
		return
	}
	bp := relayBufs.Get().(*[]byte)
	defer relayBufs.Put(bp)
	for total := 0; total < lingerMaxBytes; {
		n, err := c.cx.Read(*bp)
		total += n
		metrics.BytesReceived.Add(float64(n)) // read from the client, as every byte before
		if err != nil {
			return
		}
	}
}

// httpConn is one client connection served by wa_http.
type httpConn struct {
	h        *HandleHTTP
	cx       *layer4.Connection
	remote   string
	protocol string
	idle     time.Duration
	repl     *caddy.Replacer
	in       *clientReader
	out      *clientWriter
	br       *bufio.Reader
	bw       *bufio.Writer
	linger   bool         // a response said Connection: close: lingerClose
	pending  *requestBody // a request body the transport may still be reading
	rc       *registry.Conn
	relayErr error // how a tunnel's relay ended, for the registry
}

// serve reads and answers requests. It returns true when a tunnel took the
// connection over and will release the gauges itself.
func (c *httpConn) serve() (offloaded bool) {
	for {
		req, ok := c.readRequest()
		if !ok {
			return false
		}
		var keep bool
		keep, offloaded = c.handle(req)
		if offloaded || !keep {
			return offloaded
		}
	}
}

// readRequest reads the next request. On failure it answers the client if
// that is still useful, logs and counts, and returns false.
func (c *httpConn) readRequest() (*http.Request, bool) {
	// The whole header must arrive within the idle timeout, and may take
	// no more than httpMaxHeaderBytes.
	_ = c.cx.SetReadDeadline(time.Now().Add(c.idle))
	c.in.idle = 0
	c.in.limit = httpMaxHeaderBytes
	before, buffered := c.in.total, c.br.Buffered()
	req, err := http.ReadRequest(c.br)
	tooLarge := c.in.limit == 0
	c.in.limit = -1
	c.in.idle = c.idle
	if err == nil {
		if req.ProtoMajor != 1 {
			c.fail(req, http.StatusHTTPVersionNotSupported, metrics.KindHTTPRequest, "only HTTP/1.x is supported",
				"refuse request", zap.String("proto", req.Proto))
			return nil, false
		}
		return req, true
	}
	started := c.in.total > before || buffered > 0
	switch {
	case !started && (errors.Is(err, io.EOF) || isClosedByPeer(err) || errors.Is(err, os.ErrDeadlineExceeded)):
		// the client left, or kept an idle connection past idle_timeout
		c.h.logger.Debug("client connection closed", zap.String("remote", c.remote))
	case tooLarge || errors.Is(err, errHeaderTooLarge):
		c.fail(nil, http.StatusRequestHeaderFieldsTooLarge, metrics.KindHTTPRequest,
			fmt.Sprintf("request header larger than %d bytes", httpMaxHeaderBytes), "read request", zap.Error(err))
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.fail(nil, http.StatusRequestTimeout, metrics.KindHTTPRequest,
			"request header not received in time", "read request", zap.Error(err))
	case errors.Is(err, io.ErrUnexpectedEOF) || isClosedByPeer(err):
		c.h.logger.Debug("client left in the middle of a request header", zap.String("remote", c.remote), zap.Error(err))
	default:
		c.fail(nil, http.StatusBadRequest, metrics.KindHTTPRequest, "malformed request", "read request", zap.Error(err))
	}
	return nil, false
}

// handle answers one request. keep reports whether the connection may serve
// another; offloaded that a tunnel took it over.
func (c *httpConn) handle(req *http.Request) (keep, offloaded bool) {
	if c.h.OriginForm != OriginFormReject && isOriginForm(req) {
		return c.servePage(req), false
	}
	if c.h.userHash != nil && !c.h.authorized(req) {
		kind, reason := metrics.KindProxyAuth, "proxy authentication required"
		if req.Header.Get("Proxy-Authorization") != "" {
			reason = "wrong proxy credentials"
		}
		keep := c.keepAfterRefusal(req)
		c.reply(req, http.StatusProxyAuthRequired, reason, !keep, http.Header{"Proxy-Authenticate": {proxyAuthenticate}})
		metrics.CountError(kind)
		c.h.logger.Warn("refuse request without valid proxy credentials",
			zap.String("remote", c.remote), zap.String("method", req.Method), zap.String("reason", reason))
		return keep, false
	}

	dest, status, reason := destination(req)
	if status != 0 {
		target := req.RequestURI
		if req.URL.User != nil {
			target = req.URL.Redacted() // no password in the logs
		}
		c.fail(req, status, metrics.KindHTTPRequest, reason, "refuse request", zap.String("target", target))
		return false, false
	}
	host, _, _ := net.SplitHostPort(dest)
	if !c.h.allow.AllowsHost(host) {
		reason := "destination " + host + " is not allowed by this proxy"
		if addr, err := netip.ParseAddr(host); err == nil {
			if rng, internal := upstreams.InternalRange(addr); internal {
				reason = "destination " + host + " is " + article(rng) + " " + rng + " address, which this proxy does not reach"
			}
		}
		keep := c.keepAfterRefusal(req)
		c.reply(req, http.StatusForbidden, reason, !keep, nil)
		metrics.CountError(metrics.KindNotAllowed)
		c.h.logger.Warn("refuse destination outside the allowlist",
			zap.String("remote", c.remote), zap.String("method", req.Method), zap.String("destination", dest))
		return keep, false
	}

	if req.Method == http.MethodConnect {
		return false, c.tunnel(req, dest)
	}
	return c.forward(req, dest), false
}

// article returns "a" or "an" for word.
func article(word string) string {
	if word != "" && strings.ContainsRune("aeiou", rune(word[0])) {
		return "an"
	}
	return "a"
}

// destination returns the host:port a proxy request is for, or the status
// and reason to refuse it with.
func destination(req *http.Request) (dest string, status int, reason string) {
	if req.Method == http.MethodConnect {
		if req.URL.Host == "" || req.URL.Path != "" {
			return "", http.StatusBadRequest, "CONNECT needs a host:port target"
		}
		host, _, err := splitDestination(req.URL.Host)
		if err != nil {
			return "", http.StatusBadRequest, "CONNECT needs a host:port target"
		}
		if reason := checkTargetHost(host); reason != "" {
			return "", http.StatusBadRequest, reason
		}
		return req.URL.Host, 0, ""
	}
	if !req.URL.IsAbs() || req.URL.Host == "" {
		return "", http.StatusBadRequest, "not a proxy request: the target must be an absolute URL (http://host/path) or CONNECT host:port"
	}
	var port string
	switch req.URL.Scheme {
	case "http":
		port = "80"
	case "https":
		port = "443"
	default:
		return "", http.StatusBadRequest, "unsupported URL scheme " + strconv.Quote(req.URL.Scheme) + " (want http or https)"
	}
	if p := req.URL.Port(); p != "" {
		port = p
	}
	dest = net.JoinHostPort(req.URL.Hostname(), port)
	if _, _, err := splitDestination(dest); err != nil {
		return "", http.StatusBadRequest, "bad host or port in the request target"
	}
	if reason := checkTargetHost(req.URL.Hostname()); reason != "" {
		return "", http.StatusBadRequest, reason
	}
	return dest, 0, ""
}

// checkTargetHost returns why host, a request's target host, cannot be
// dialled as written, or "". It must be an IP address without a zone, or
// a host name (hostname.Check; one trailing dot allowed). What is checked
// against the allowlist is then what is dialled: Go's HTTP transport would
// turn a Unicode name into another one (full-width digits into an IP
// address, for one), and a SOCKS5 request cannot carry a name over 255
// bytes.
func checkTargetHost(host string) string {
	if addr, err := netip.ParseAddr(host); err == nil {
		if addr.Zone() != "" {
			return "the target's IPv6 address has a zone"
		}
		return ""
	}
	switch why := hostname.Check(strings.TrimSuffix(host, ".")); why {
	case "":
		return ""
	case hostname.NotASCII:
		return "the target's host name " + why + " (write an international name in its xn-- form)"
	default:
		return "the target's host name " + why
	}
}

// authorized reports whether req carries the configured Basic credentials.
// The comparison takes the same time whatever the credentials.
func (h *HandleHTTP) authorized(req *http.Request) bool {
	scheme, encoded, ok := strings.Cut(req.Header.Get("Proxy-Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return false
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(encoded))
	if err != nil {
		return false
	}
	user, pass, ok := strings.Cut(string(raw), ":")
	if !ok {
		return false
	}
	uh, ph := sha256.Sum256([]byte(user)), sha256.Sum256([]byte(pass))
	return subtle.ConstantTimeCompare(uh[:], h.userHash[:])&subtle.ConstantTimeCompare(ph[:], h.passHash[:]) == 1
}

// requestDone reports whether nothing of req's body is left on the
// connection.
func requestDone(req *http.Request) bool { return req.Body == nil || req.Body == http.NoBody }

// canContinue reports whether another request may follow req once the proxy
// has answered it without reading its body: there is no body, and the
// client did not ask to close (an HTTP/1.0 client without keep-alive asks).
func canContinue(req *http.Request) bool { return requestDone(req) && !req.Close }

// keepAfterRefusal reports whether the connection may serve another request
// after req was refused (403, 407). A refused CONNECT is closed when bytes
// already follow its head: clients may send their first tunnelled bytes (a
// TLS ClientHello) before the answer, and those are not a next request.
// With nothing after it, the connection stays, so that a client can retry
// a 407 with credentials on it, as curl does.
func (c *httpConn) keepAfterRefusal(req *http.Request) bool {
	if !canContinue(req) {
		return false
	}
	return req.Method != http.MethodConnect || (c.br.Buffered() == 0 && len(c.cx.MatchingBytes()) == 0)
}

// ---- origin-form requests ----

// The pages origin_form page serves. The default page has the wording of
// the placeholder site in examples/single-port.Caddyfile, so a proxy without
// a website looks like one with the example's.
const (
	defaultPage          = `<!doctype html><html><head><title>Welcome</title></head><body><h1>It works!</h1><p>This site is under construction.</p></body></html>`
	notFoundPage         = `<!doctype html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1><p>The requested page was not found.</p></body></html>`
	methodNotAllowedPage = `<!doctype html><html><head><title>405 Method Not Allowed</title></head><body><h1>Method Not Allowed</h1></body></html>`
)

// isOriginForm reports whether req is a request to a web server rather than
// to a proxy: not CONNECT, and its target is a path (`/index.html`) or `*`,
// not an absolute URL.
func isOriginForm(req *http.Request) bool {
	return req.Method != http.MethodConnect && !req.URL.IsAbs()
}

// servePage answers an origin-form request like a plain web server: the
// default page for GET or HEAD of /, 404 for other paths, 405 for other
// methods. It returns whether the connection may serve another request.
// This is no failure: it is logged at debug level and not counted.
func (c *httpConn) servePage(req *http.Request) (keep bool) {
	status, body := http.StatusOK, defaultPage
	hdr := http.Header{
		"Content-Type": {"text/html; charset=utf-8"},
		"Date":         {time.Now().UTC().Format(http.TimeFormat)},
	}
	switch {
	case req.Method != http.MethodGet && req.Method != http.MethodHead:
		status, body = http.StatusMethodNotAllowed, methodNotAllowedPage
		hdr["Allow"] = []string{"GET, HEAD"}
	case req.URL.Path != "/":
		status, body = http.StatusNotFound, notFoundPage
	}
	keep = canContinue(req)
	if keep && !req.ProtoAtLeast(1, 1) {
		hdr["Connection"] = []string{"keep-alive"} // an HTTP/1.0 client asked for it
	}
	resp := &http.Response{
		StatusCode: status, ProtoMajor: 1, ProtoMinor: 1,
		Header: hdr, ContentLength: int64(len(body)), Body: io.NopCloser(strings.NewReader(body)),
		Close: !keep, Request: req, // a response to HEAD has no body
	}
	c.linger = c.linger || !keep
	err := resp.Write(c.bw)
	if err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		c.h.logger.Debug("client left before the page was sent", zap.String("remote", c.remote), zap.Error(err))
		return false
	}
	c.h.logger.Debug("serve default page", zap.String("remote", c.remote), zap.String("method", req.Method),
		zap.String("target", req.RequestURI), zap.Int("status", status))
	return keep
}

// ---- absolute-form requests ----

// forward sends req to dest through the transport and streams the response
// back. It returns whether the client connection may serve another request.
func (c *httpConn) forward(req *http.Request, dest string) (keep bool) {
	c.rc.SetDestination(dest)
	start := time.Now()
	ctx, cancel := context.WithCancel(c.cx.Context)
	defer cancel()

	out := req.WithContext(ctx)
	out.RequestURI = ""
	out.Close = false // the transport manages its own connections
	removeHopByHop(out.Header)
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header["User-Agent"] = []string{""} // keep Go from adding its own
	}
	addVia(out.Header, req.ProtoMajor, req.ProtoMinor)
	if c.h.Headers != nil {
		c.h.Headers.Request.ApplyTo(out.Header, c.repl)
	}
	var body *requestBody
	if !requestDone(req) {
		body = &requestBody{r: req.Body, c: c, closed: make(chan struct{}),
			// no 1xx to an HTTP/1.0 client (RFC 9110 §15.2)
			expect: req.ProtoAtLeast(1, 1) && strings.EqualFold(req.Header.Get("Expect"), "100-continue")}
		out.Body = body
		c.pending = body
	}
	fields := func(extra ...zap.Field) []zap.Field {
		return append([]zap.Field{zap.String("remote", c.remote), zap.String("method", req.Method),
			zap.String("destination", dest), zap.String("via", c.h.dialerID)}, extra...)
	}

	resp, err := c.h.transport.RoundTrip(out)
	if err != nil {
		if body != nil && body.clientErr() != nil {
			c.h.logger.Debug("client left while sending a request body", fields(zap.Error(body.clientErr()))...)
			return false
		}
		body.headStarted()
		c.upstreamFailed(req, dest, err, "forward request")
		return false
	}
	defer resp.Body.Close()

	removeHopByHop(resp.Header)
	addVia(resp.Header, resp.ProtoMajor, resp.ProtoMinor)
	if c.h.Headers != nil {
		c.h.Headers.Response.ApplyTo(resp.Header, c.repl)
	}
	keep = req.ProtoAtLeast(1, 1) && !req.Close
	body.headStarted()
	if keep && !body.readableToEnd() {
		// the head says so: the client must not send another request
		keep = false
	}
	resp.ProtoMajor, resp.ProtoMinor = 1, 1
	if !req.ProtoAtLeast(1, 1) {
		resp.ProtoMinor = 0
		resp.TransferEncoding = nil // HTTP/1.0 has no chunks: the body ends with the connection
	}
	if resp.ContentLength < 0 && len(resp.TransferEncoding) == 0 && keep &&
		req.Method != http.MethodHead && bodyAllowed(resp.StatusCode) {
		// a body delimited by the destination closing: chunk it instead, so
		// the client's connection can stay
		resp.TransferEncoding = []string{"chunked"}
	}
	if resp.ContentLength < 0 && len(resp.TransferEncoding) == 0 {
		keep = false
	}
	resp.Close = !keep
	relayed := &responseBody{r: resp.Body, w: c.bw}
	resp.Body = relayed

	err = resp.Write(writerOnly{c.bw})
	if err == nil {
		err = c.bw.Flush()
	}
	switch {
	case err == nil:
	case c.out.failed() || relayed.flushErr != nil:
		c.h.logger.Debug("client left during a response", fields(zap.Error(err))...)
		return false
	default:
		// the destination broke off mid-response: the client sees a
		// truncated body and its connection closes
		metrics.CountError(metrics.KindUpstream)
		c.h.logger.Warn("relay response", fields(zap.Int("status", resp.StatusCode), zap.Error(err))...)
		return false
	}
	if body != nil && keep {
		// the transport may still be sending the request body: wait until it
		// is done with the connection's reader (when the connection closes
		// instead, lingerClose waits for that)
		select {
		case <-body.closed:
			if !body.finished() {
				body.discardRest() // the head promised the connection
			}
		case <-time.After(c.idle):
		}
	}
	if body != nil {
		if !body.finished() {
			keep = false
		} else {
			c.pending = nil
		}
	}
	c.h.logger.Debug("forward request", fields(zap.Int("status", resp.StatusCode), zap.Duration("duration", time.Since(start)))...)
	// a connection that ends after a forwarded response lingers, as after
	// the proxy's own answers: unread client bytes would reset it
	c.linger = c.linger || !keep
	return keep
}

// upstreamFailed answers a failure to reach dest or to get its response
// (err from the dialer or the transport) with 403, 502 or 504, counts it and
// logs it once as msg.
func (c *httpConn) upstreamFailed(req *http.Request, dest string, err error, msg string) {
	status, kind := upstreamFailure(err)
	reason := "destination " + dest + " could not be reached"
	switch status {
	case http.StatusGatewayTimeout:
		reason = "destination " + dest + " did not answer in time"
	case http.StatusForbidden:
		reason = "destination " + dest + " resolves to an internal address, which this proxy does not reach"
	}
	c.reply(req, status, reason, true, nil)
	metrics.CountError(kind)
	logf := c.h.logger.Error
	if kind == metrics.KindNotAllowed {
		logf = c.h.logger.Warn
	}
	logf(msg, zap.String("remote", c.remote), zap.String("method", req.Method), zap.String("destination", dest),
		zap.String("via", c.h.dialerID), zap.String("kind", kind), zap.Error(err))
}

// upstreamFailure maps a transport error to the status for the client and
// the errors_total kind.
func upstreamFailure(err error) (status int, kind string) {
	var de *upstreams.DialError
	if errors.As(err, &de) {
		switch de.Kind {
		case metrics.KindTimeout:
			return http.StatusGatewayTimeout, de.Kind
		case metrics.KindNotAllowed:
			return http.StatusForbidden, de.Kind
		}
		return http.StatusBadGateway, upstreams.ErrorKind(err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		if strings.Contains(err.Error(), tlsHandshakeTimeout) {
			// part of connecting (TLSHandshakeTimeout is connect_timeout)
			return http.StatusGatewayTimeout, metrics.KindTimeout
		}
		return http.StatusGatewayTimeout, metrics.KindResponseTimeout
	}
	return http.StatusBadGateway, metrics.KindUpstream
}

// tlsHandshakeTimeout is the text of net/http's error for a TLS handshake
// with an https:// destination that took longer than TLSHandshakeTimeout
// (its type is not exported).
const tlsHandshakeTimeout = "TLS handshake timeout"

// bodyAllowed reports whether a response with status may have a body.
func bodyAllowed(status int) bool {
	return !(status >= 100 && status <= 199) && status != http.StatusNoContent && status != http.StatusNotModified
}

// requestBody is a forwarded request's body, read by the transport from the
// client connection. It answers `Expect: 100-continue` when the transport
// starts reading (so the destination has said to continue, or the transport
// stopped waiting), and it records how reading ended. Closing it does not
// drain the client: a body that was not read to the end makes the
// connection close instead.
type requestBody struct {
	r      io.Reader
	c      *httpConn
	expect bool

	mu        sync.Mutex
	started   bool // the response head is being written: no more 100 Continue
	continued bool
	err       error // the client's read error

	eof       atomic.Bool
	closeOnce sync.Once
	closed    chan struct{}
}

func (b *requestBody) Read(p []byte) (int, error) {
	if b.expect {
		b.mu.Lock()
		if !b.started && !b.continued {
			b.continued = true
			if _, err := io.WriteString(b.c.out, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
				b.err = err
			}
		}
		b.mu.Unlock()
	}
	n, err := b.r.Read(p)
	if errors.Is(err, io.EOF) {
		b.eof.Store(true)
	} else if err != nil {
		b.mu.Lock()
		if b.err == nil {
			b.err = err
		}
		b.mu.Unlock()
	}
	return n, err
}

func (b *requestBody) Close() error {
	b.closeOnce.Do(func() { close(b.closed) })
	return nil
}

// headStarted stops 100 Continue before the response head is written. It
// may be called on a nil body.
func (b *requestBody) headStarted() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.started = true
	b.mu.Unlock()
}

// clientErr returns the client's read or write error while the body was
// being sent, if any.
func (b *requestBody) clientErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// finished reports whether the body was read to its end.
func (b *requestBody) finished() bool { return b.eof.Load() }

// maxBodyDiscard is how much of a request body the destination did not take
// the proxy reads and discards to keep the client's connection (as Go's
// HTTP server does after a handler).
const maxBodyDiscard = 256 << 10

// readableToEnd reports, as the response head is about to be written (after
// headStarted), whether the request body can still be read to its end, so
// that the connection may serve another request. It may be called on a nil
// body. Not when the client expected a 100 Continue that was never sent (it
// may send the body later, or never: what follows is unknown); not when the
// transport is done with a body it did not finish and more than
// maxBodyDiscard of it is left (the rest is read and discarded here).
// While the transport still sends the body, it may yet finish.
func (b *requestBody) readableToEnd() bool {
	if b == nil || b.finished() {
		return true
	}
	b.mu.Lock()
	noContinue := b.expect && !b.continued
	b.mu.Unlock()
	if noContinue {
		return false
	}
	select {
	case <-b.closed:
		return b.discardRest()
	default:
		return true
	}
}

// discardRest reads and discards up to maxBodyDiscard of what is left of
// the body, once the transport is done with it, and reports whether that
// was its end.
func (b *requestBody) discardRest() bool {
	_, _ = io.CopyN(io.Discard, b, maxBodyDiscard)
	return b.finished()
}

// responseBody is a response body relayed to the client. Before each read
// from the destination it flushes what the client has not been sent yet, so
// the response streams: each chunk reaches the client before the proxy
// waits for the next.
type responseBody struct {
	r        io.ReadCloser
	w        *bufio.Writer
	flushErr error
}

func (b *responseBody) Read(p []byte) (int, error) {
	if b.w.Buffered() > 0 {
		if err := b.w.Flush(); err != nil {
			b.flushErr = err
			return 0, err
		}
	}
	return b.r.Read(p)
}

func (b *responseBody) Close() error { return b.r.Close() }

// writerOnly hides the bufio.Writer's ReadFrom from io.Copy, which would
// otherwise read into the buffer that responseBody flushes.
type writerOnly struct{ io.Writer }

// ---- CONNECT ----

// tunnel connects to dest, answers 200 and carries the bytes both ways
// until they end. It returns true when the event loop took the connection
// over (and releases the gauges when it ends).
func (c *httpConn) tunnel(req *http.Request, dest string) (offloaded bool) {
	start := time.Now()
	c.rc.SetDestination(dest)
	up, err := c.h.dial(c.cx.Context, dest)
	if err != nil {
		c.upstreamFailed(req, dest, err, "dial upstream")
		return false
	}

	_, err = io.WriteString(c.bw, "HTTP/1.1 200 Connection Established\r\n\r\n")
	if err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		up.Close()
		c.h.logger.Debug("client left before the tunnel opened", zap.String("remote", c.remote), zap.Error(err))
		return false
	}
	// Bytes the client sent after the CONNECT request (a TLS ClientHello
	// that did not wait for the 200) are in the reader's buffer, or still in
	// caddy-l4's prefetch buffer: they go first.
	pending, _ := c.br.Peek(c.br.Buffered())
	prefetched := c.cx.MatchingBytes()
	sent := int64(len(pending) + len(prefetched))
	if sent > 0 {
		if _, err := (&net.Buffers{pending, prefetched}).WriteTo(up); err != nil {
			up.Close()
			metrics.CountError(metrics.KindRelay)
			c.h.logger.Warn("write first bytes upstream", zap.String("remote", c.remote), zap.String("destination", dest), zap.Error(err))
			return false
		}
		metrics.BytesReceived.Add(float64(len(prefetched))) // the reader counted the others
		_, _ = c.br.Discard(len(pending))
		if len(prefetched) > 0 {
			if _, err := c.cx.Read(prefetched); err != nil {
				up.Close()
				return false
			}
		}
	}
	_ = c.cx.Conn.SetDeadline(time.Time{}) // the relay keeps its own
	c.rc.FromClient.Add(sent)

	release := func() {
		metrics.ConnectionsActive.Dec()
		metrics.ProtocolGauge(c.protocol).Dec()
		registry.Close(c.rc, c.relayErr)
	}
	end := func(st pairStats, err error) {
		c.relayErr = err
		logEnd(c.h.logger, "tunnel", err, func() []zap.Field {
			return []zap.Field{
				zap.String("remote", c.remote), zap.String("destination", dest), zap.String("via", c.h.dialerID),
				zap.Int64("bytes_from_client", st.toUpstream), zap.Int64("bytes_to_client", st.toClient),
				zap.Duration("duration", time.Since(start)),
			}
		})
	}
	return carry(c.cx.Conn, up, c.idle, c.rc, end, release)
}

// ---- replies, hygiene ----

// fail answers req (nil when it could not be read) with status and a
// one-line reason, closes the connection after it, counts kind and logs msg.
func (c *httpConn) fail(req *http.Request, status int, kind, reason, msg string, fields ...zap.Field) {
	c.reply(req, status, reason, true, nil)
	metrics.CountError(kind)
	fields = append([]zap.Field{zap.String("remote", c.remote), zap.Int("status", status), zap.String("reason", reason)}, fields...)
	if req != nil {
		fields = append(fields, zap.String("method", req.Method))
	}
	c.h.logger.Warn(msg, fields...)
}

// reply writes a response generated by the proxy: status, extra fields and
// reason as a one-line plain-text body. With closing, it says
// `Connection: close`, and the connection ends after it.
func (c *httpConn) reply(req *http.Request, status int, reason string, closing bool, extra http.Header) {
	body := reason + "\n"
	hdr := http.Header{
		"Content-Type":           {"text/plain; charset=utf-8"},
		"X-Content-Type-Options": {"nosniff"},
	}
	for k, v := range extra {
		hdr[k] = v
	}
	addVia(hdr, 1, 1)
	resp := &http.Response{
		StatusCode: status, ProtoMajor: 1, ProtoMinor: 1,
		Header: hdr, ContentLength: int64(len(body)), Body: io.NopCloser(strings.NewReader(body)),
		Close: closing, Request: req,
	}
	c.linger = c.linger || closing
	if err := resp.Write(c.bw); err == nil {
		_ = c.bw.Flush()
	}
}

// hopHeaders are the hop-by-hop fields (RFC 9110 7.6.1) that a proxy never
// forwards, with Proxy-Connection, which old clients send.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// removeHopByHop deletes the hop-by-hop fields from hdr and those named in
// its Connection fields. `TE: trailers` is kept: it tells the destination
// the client understands trailers, which this proxy relays.
func removeHopByHop(hdr http.Header) {
	for _, v := range hdr["Connection"] {
		for name := range strings.SplitSeq(v, ",") {
			if name = textproto.TrimString(name); name != "" {
				hdr.Del(name)
			}
		}
	}
	trailers := false
	for _, v := range hdr["Te"] {
		for t := range strings.SplitSeq(v, ",") {
			if name, _, _ := strings.Cut(t, ";"); strings.EqualFold(textproto.TrimString(name), "trailers") {
				trailers = true
			}
		}
	}
	for _, k := range hopHeaders {
		delete(hdr, k)
	}
	if trailers {
		hdr["Te"] = []string{"trailers"}
	}
}

// addVia appends this proxy to hdr's Via field (RFC 9110 7.6.3), with the
// version of the message it received.
func addVia(hdr http.Header, major, minor int) {
	hdr.Add("Via", strconv.Itoa(major)+"."+strconv.Itoa(minor)+" "+viaPseudonym)
}

// clientReader reads from the client connection: it counts the bytes in
// whatsapp_proxy_bytes_received_total, caps the bytes a request header may
// take, moves the read deadline forward on each read in bodies, and keeps
// the first error.
type clientReader struct {
	conn  net.Conn
	idle  time.Duration // > 0: a read deadline this far ahead before each read
	limit int64         // >= 0: the bytes the current header may still take
	total int64
	err   error
}

func (r *clientReader) Read(p []byte) (int, error) {
	if r.limit == 0 {
		return 0, errHeaderTooLarge
	}
	if r.limit > 0 && int64(len(p)) > r.limit {
		p = p[:r.limit]
	}
	if r.idle > 0 {
		if err := r.conn.SetReadDeadline(time.Now().Add(r.idle)); err != nil {
			return 0, err
		}
	}
	n, err := r.conn.Read(p)
	if r.limit > 0 {
		r.limit -= int64(n)
	}
	r.total += int64(n)
	metrics.BytesReceived.Add(float64(n))
	if err != nil && r.err == nil {
		r.err = err
	}
	return n, err
}

// clientWriter writes to the client connection: it counts the bytes in
// whatsapp_proxy_bytes_sent_total, gives each write idle_timeout to
// complete, and keeps the first error.
type clientWriter struct {
	conn net.Conn
	idle time.Duration
	mu   sync.Mutex // a 100 Continue may be written from the transport's goroutine
	err  error
}

// failed reports whether a write to the client failed.
func (w *clientWriter) failed() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err != nil
}

func (w *clientWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return 0, w.err
	}
	if err := w.conn.SetWriteDeadline(time.Now().Add(w.idle)); err != nil {
		w.err = err
		return 0, err
	}
	n, err := w.conn.Write(p)
	metrics.BytesSent.Add(float64(n))
	if err != nil {
		w.err = err
	}
	return n, err
}
