package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// scmMaxFd is the most descriptors one sendmsg can carry on Linux
// (SCM_MAX_FD). The receive buffer has room for that many, so MSG_CTRUNC
// never means "the peer sent more than MaxFds" (those arrive and are
// closed here): it means this process could not take them.
const scmMaxFd = 253

// conn frames vhost-user messages on a unix stream socket and carries file
// descriptors in SCM_RIGHTS control messages. The socket goes through the
// runtime poller, so closing it unblocks a pending read.
type conn struct {
	uc  *net.UnixConn
	hdr [HeaderSize]byte
	oob []byte

	// msgTimeout bounds the rest of a message once its first byte has
	// arrived, and the writing of a message (0: no bound). Between
	// messages a connection may idle. The owner must not set deadlines of
	// its own when it is set.
	msgTimeout time.Duration
	// msgDeadline is the deadline of the message being read (zero: none
	// set).
	msgDeadline time.Time
	// interrupted is set by interrupt: every read and write returns at
	// once from then on.
	interrupted atomic.Bool
}

// interrupt makes a pending read or write, and every later one, return at
// once with a deadline error (a deadline in 1970), leaving the socket open: its owner can stop
// what it runs before it closes it. Safe to call from any goroutine.
//
// Ordering: interrupt stores the flag, then sets the past deadlines; the
// connection's own deadline changes set theirs, then load the flag and
// set the past ones again if it is up. Either the load sees the flag or
// interrupt's deadlines are set after the connection's: the deadlines end
// past either way.
func (c *conn) interrupt() {
	c.interrupted.Store(true)
	_ = c.uc.SetDeadline(time.Unix(1, 0))
}

// setReadDeadline and setWriteDeadline set the socket's deadlines unless
// the connection is interrupted.
func (c *conn) setReadDeadline(t time.Time) {
	_ = c.uc.SetReadDeadline(t)
	if c.interrupted.Load() {
		_ = c.uc.SetReadDeadline(time.Unix(1, 0))
	}
}

func (c *conn) setWriteDeadline(t time.Time) {
	_ = c.uc.SetWriteDeadline(t)
	if c.interrupted.Load() {
		_ = c.uc.SetWriteDeadline(time.Unix(1, 0))
	}
}

func newConn(uc *net.UnixConn) *conn {
	return &conn{uc: uc, oob: make([]byte, unix.CmsgSpace(scmMaxFd*4))}
}

// startMessage arms the message deadline when the first bytes of a
// message have arrived.
func (c *conn) startMessage() {
	if c.msgTimeout <= 0 || !c.msgDeadline.IsZero() {
		return
	}
	c.msgDeadline = time.Now().Add(c.msgTimeout)
	c.setReadDeadline(c.msgDeadline)
}

// endMessage clears the message deadline.
func (c *conn) endMessage() {
	if !c.msgDeadline.IsZero() {
		c.msgDeadline = time.Time{}
		c.setReadDeadline(time.Time{})
	}
}

// readFull fills b, collecting every descriptor that arrives with any part
// of it into *fds; more than MaxFds for the message is an error as soon as
// they arrive (the excess is closed at once). It returns io.EOF when the
// peer closed before the first byte, ErrTruncated when it closed part way,
// ErrStalled when the message timeout passed part way.
func (c *conn) readFull(b []byte, fds *[]int, started bool) error {
	got := 0
	for got < len(b) {
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(b[got:], c.oob)
		if oobn > 0 {
			if perr := parseRights(c.oob[:oobn], fds); perr != nil && err == nil {
				err = perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 && err == nil {
			err = fmt.Errorf("%w: control data truncated (MSG_CTRUNC) with %d descriptors taken: RLIMIT_NOFILE reached?",
				ErrFdsExhausted, len(*fds))
		}
		got += n
		if n > 0 && !started {
			started = true
			c.startMessage()
		}
		if err == nil && len(*fds) > MaxFds {
			err = fmt.Errorf("%w: more than %d descriptors for one message", ErrFdCount, MaxFds)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if got == 0 && !started {
					return io.EOF
				}
				return fmt.Errorf("%w: peer closed after %d of %d bytes", ErrTruncated, got, len(b))
			}
			if errors.Is(err, os.ErrDeadlineExceeded) && !c.msgDeadline.IsZero() && !time.Now().Before(c.msgDeadline) && !c.interrupted.Load() {
				return fmt.Errorf("%w: %d of %d bytes within %v", ErrStalled, got, len(b), c.msgTimeout)
			}
			return err
		}
		if n == 0 {
			if got == 0 && !started {
				return io.EOF
			}
			return fmt.Errorf("%w: peer closed after %d of %d bytes", ErrTruncated, got, len(b))
		}
	}
	return nil
}

func parseRights(oob []byte, fds *[]int) error {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("%w: control message: %v", ErrFdCount, err)
	}
	var perr error
	for i := range cmsgs {
		if cmsgs[i].Header.Level != unix.SOL_SOCKET || cmsgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&cmsgs[i])
		for _, fd := range got {
			if len(*fds) < MaxFds {
				*fds = append(*fds, fd)
				continue
			}
			// Over the limit: close now, report once.
			_ = unix.Close(fd)
			if perr == nil {
				perr = fmt.Errorf("%w: more than %d descriptors for one message", ErrFdCount, MaxFds)
			}
		}
		if err != nil && perr == nil {
			perr = fmt.Errorf("%w: %v", ErrFdCount, err)
		}
	}
	return perr
}

// read reads one message. The header is checked (version, size cap); the
// payload is not validated against the request type. On error every
// received descriptor is closed. io.EOF means the peer closed the
// connection cleanly between messages.
func (c *conn) read() (*Message, error) {
	var fds []int
	defer c.endMessage()
	if err := c.readFull(c.hdr[:], &fds, false); err != nil {
		closeFds(fds)
		return nil, err
	}
	h, err := DecodeHeader(c.hdr[:])
	if err != nil {
		closeFds(fds)
		return nil, err
	}
	m := &Message{Header: h}
	if h.Size > 0 {
		m.Payload = make([]byte, h.Size)
		if err := c.readFull(m.Payload, &fds, true); err != nil {
			closeFds(fds)
			return nil, &MessageError{Request: h.Request, Err: err}
		}
	}
	m.Fds = fds
	return m, nil
}

// write sends one message with optional descriptors in a single sendmsg
// (descriptors travel with the first byte).
func (c *conn) write(h Header, payload []byte, fds []int) error {
	b := Encode(make([]byte, 0, HeaderSize+len(payload)), h, payload)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if c.msgTimeout > 0 {
		// A peer that does not read what it asked for must not block
		// us for good.
		c.setWriteDeadline(time.Now().Add(c.msgTimeout))
		defer c.setWriteDeadline(time.Time{})
	}
	n, _, err := c.uc.WriteMsgUnix(b, oob, nil)
	if err == nil && n < len(b) {
		// A stream socket may accept part of the data; the
		// descriptors went with the first part.
		var m int
		m, err = c.uc.Write(b[n:])
		n += m
	}
	if errors.Is(err, os.ErrDeadlineExceeded) && c.msgTimeout > 0 && !c.interrupted.Load() {
		return fmt.Errorf("%w: peer read %d of %d bytes within %v", ErrStalled, n, len(b), c.msgTimeout)
	}
	return err
}

func (c *conn) close() error { return c.uc.Close() }

// peerState is what peerGone finds.
type peerState int

const (
	peerThere      peerState = iota // open, or nothing could be told
	peerGoneEmpty                   // closed or reset, nothing left to read
	peerGoneUnread                  // closed, bytes it sent before still unread
)

// peerGone tells whether the peer has closed or reset the connection,
// reading nothing: a poll that does not wait, for POLLRDHUP and POLLHUP
// (on a Unix stream socket they come with the peer's close even while
// bytes it wrote before are still waiting, which SIOCINQ counts) and
// POLLERR. A peer that is there, with bytes waiting or not, is there; so
// is a poll that fails. A connection closed here is gone.
func (c *conn) peerGone() peerState {
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return peerGoneEmpty
	}
	st := peerThere
	cerr := rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		for {
			_, err := unix.Poll(p, 0)
			if err == unix.EINTR {
				continue
			}
			ev := p[0].Revents
			switch {
			case err != nil:
			case ev&(unix.POLLERR|unix.POLLNVAL) != 0:
				st = peerGoneEmpty
			case ev&(unix.POLLRDHUP|unix.POLLHUP) != 0:
				// POLLIN comes with the end of the stream too: the bytes
				// queued tell.
				st = peerGoneEmpty
				if n, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil && n > 0 {
					st = peerGoneUnread
				}
			}
			return
		}
	})
	if cerr != nil {
		return peerGoneEmpty
	}
	return st
}
