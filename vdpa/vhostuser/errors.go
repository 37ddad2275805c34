package vhostuser

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error this package returns for bad peer input wraps
// one of them, so callers can test with errors.Is.
var (
	// ErrTruncated: the peer closed the connection or sent fewer bytes than
	// the header or its size field promise.
	ErrTruncated = errors.New("vhost-user: truncated message")
	// ErrPayloadTooLarge: the header's size exceeds MaxPayload.
	ErrPayloadTooLarge = errors.New("vhost-user: payload too large")
	// ErrBadVersion: the header's version bits are not 1, or unknown flag
	// bits are set.
	ErrBadVersion = errors.New("vhost-user: bad header version or flags")
	// ErrBadSize: the payload size does not match the request type.
	ErrBadSize = errors.New("vhost-user: wrong payload size for request")
	// ErrFdCount: the message carries a number of file descriptors the
	// request does not allow.
	ErrFdCount = errors.New("vhost-user: wrong number of file descriptors")
	// ErrFdsExhausted: descriptors that came with a message were lost
	// because this process could not take them (its descriptor table is
	// full: RLIMIT_NOFILE); the kernel reported MSG_CTRUNC. Not the peer's
	// fault, unlike ErrFdCount.
	ErrFdsExhausted = errors.New("vhost-user: descriptors lost: this process is out of file descriptors")
	// ErrStalled: the peer started a message and did not finish it, or
	// did not read a message sent to it, within the message timeout.
	ErrStalled = errors.New("vhost-user: peer stalled inside a message")
	// ErrUnknownRequest: the request type is not defined by the protocol.
	ErrUnknownRequest = errors.New("vhost-user: unknown request")
	// ErrUnsupported: a defined request that was not negotiated or that
	// this implementation does not serve.
	ErrUnsupported = errors.New("vhost-user: request not supported")
	// ErrTooManyRegions: a memory table with more than MaxRegions regions.
	ErrTooManyRegions = errors.New("vhost-user: too many memory regions")
	// ErrBadRegion: a memory region that is empty, overflows, overlaps
	// another, or whose descriptor cannot back it.
	ErrBadRegion = errors.New("vhost-user: bad memory region")
	// ErrAddrNotMapped: a ring address that is not inside the memory table.
	ErrAddrNotMapped = errors.New("vhost-user: address outside the memory table")
	// ErrBadQueue: a queue index beyond the device's queues, or a
	// queue size that is zero, not a power of two, or too large.
	ErrBadQueue = errors.New("vhost-user: bad queue index or size")
	// ErrProtocol: a request out of sequence or with values the protocol
	// forbids (features not offered, ring configured while running, ...).
	ErrProtocol = errors.New("vhost-user: protocol violation")
	// ErrReplyFailed: the back-end acknowledged a request with a non-zero
	// status (REPLY_ACK) or an empty config reply.
	ErrReplyFailed = errors.New("vhost-user: back-end reported failure")
	// ErrUnexpectedReply: a reply for another request, or without the
	// reply flag (the session breaks: ErrSessionBroken), or a reply whose
	// content no reply of its type can have (GET_VRING_BASE naming
	// another queue or a position no queue of its size can be at; the
	// reply was consumed and the session stays in step).
	ErrUnexpectedReply = errors.New("vhost-user: unexpected reply")
	// ErrSessionBroken: a front-end request was interrupted (its context
	// ended, the socket failed) or answered by a message it did not ask
	// for (ErrUnexpectedReply), and the session is out of step; the
	// connection is closed. Errors wrapping it also wrap the cause.
	ErrSessionBroken = errors.New("vhost-user: session broken by an interrupted request")
	// ErrDeviceFailed: the device handler rejected a well-formed request.
	ErrDeviceFailed = errors.New("vhost-user: device rejected request")

	// ErrBackendChanged: a back-end the Frontend reconnected to
	// (FrontendOptions.Reconnect) cannot take the session over: it does
	// not offer a feature or protocol feature the session negotiated, or
	// has fewer queues.
	ErrBackendChanged = errors.New("vhost-user: reconnected back-end cannot resume the session")

	// ErrBadOptions is returned by NewFrontend for options out of their
	// range (a negative queue count, a configuration size above
	// MaxConfigSize, a negative timeout).
	ErrBadOptions = errors.New("vhost-user: invalid options")
)

// MessageError reports a failure while handling one message.
type MessageError struct {
	Request Request
	Err     error
}

func (e *MessageError) Error() string {
	return fmt.Sprintf("vhost-user %v: %v", e.Request, e.Err)
}

func (e *MessageError) Unwrap() error { return e.Err }

func msgErr(r Request, sentinel error, format string, args ...any) error {
	return &MessageError{Request: r, Err: fmt.Errorf("%w: "+format, append([]any{sentinel}, args...)...)}
}
