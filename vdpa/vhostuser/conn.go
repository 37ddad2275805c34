package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// conn frames vhost-user messages on a unix stream socket and carries file
// descriptors in SCM_RIGHTS control messages. The socket goes through the
// runtime poller, so closing it unblocks a pending read.
type conn struct {
	uc  *net.UnixConn
	hdr [HeaderSize]byte
	oob []byte
}

func newConn(uc *net.UnixConn) *conn {
	// Room for MaxFds descriptors and no more: a peer sending more gets
	// MSG_CTRUNC, and the kernel closes the descriptors that did not fit.
	return &conn{uc: uc, oob: make([]byte, unix.CmsgSpace(MaxFds*4))}
}

// readFull fills b, collecting every descriptor that arrives with any part
// of it into *fds. It returns io.EOF when the peer closed before the first
// byte, ErrTruncated when it closed part way.
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
			err = fmt.Errorf("%w: more than %d descriptors (control data truncated)", ErrFdCount, MaxFds)
		}
		got += n
		if err != nil {
			if errors.Is(err, io.EOF) {
				if got == 0 && !started {
					return io.EOF
				}
				return fmt.Errorf("%w: peer closed after %d of %d bytes", ErrTruncated, got, len(b))
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
	for i := range cmsgs {
		if cmsgs[i].Header.Level != unix.SOL_SOCKET || cmsgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&cmsgs[i])
		*fds = append(*fds, got...)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrFdCount, err)
		}
	}
	return nil
}

// read reads one message. The header is checked (version, size cap); the
// payload is not validated against the request type. On error every
// received descriptor is closed. io.EOF means the peer closed the
// connection cleanly between messages.
func (c *conn) read() (*Message, error) {
	var fds []int
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
	if len(fds) > MaxFds {
		closeFds(fds)
		return nil, msgErr(h.Request, ErrFdCount, "%d descriptors > %d", len(fds), MaxFds)
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
	n, _, err := c.uc.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n < len(b) {
		// A stream socket may accept part of the data; the
		// descriptors went with the first part.
		if _, err := c.uc.Write(b[n:]); err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) close() error { return c.uc.Close() }
