package vhostuser

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// fakeBackend answers front-end requests with fn's replies; a nil reply
// sends nothing, closeAfter ends the connection.
type fakeReply struct {
	hdr     Header
	payload []byte
	fds     []int
	close   bool
}

func fakeBackend(t *testing.T, fn func(m *Message) *fakeReply) (*conn, <-chan struct{}) {
	t.Helper()
	a, b := socketpair(t)
	bc := newConn(b)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer bc.close()
		for {
			m, err := bc.read()
			if err != nil {
				return
			}
			r := fn(m)
			m.Close()
			if r == nil {
				continue
			}
			if r.hdr.Flags == 0 {
				r.hdr = Header{Request: m.Request, Flags: Version | FlagReply}
			}
			_ = bc.write(r.hdr, r.payload, r.fds)
			closeFds(r.fds)
			if r.close {
				return
			}
		}
	}()
	return newConn(a), done
}

// standard answers the handshake of a back-end offering VERSION_1 and
// PROTOCOL_FEATURES with the given protocol features.
func standard(m *Message, proto ProtocolFeatures) *fakeReply {
	switch m.Request {
	case ReqGetFeatures:
		return &fakeReply{payload: putU64(uint64(virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat)))}
	case ReqGetProtocolFeatures:
		return &fakeReply{payload: putU64(uint64(proto))}
	case ReqGetQueueNum:
		return &fakeReply{payload: putU64(1)}
	}
	if m.NeedReply() {
		return &fakeReply{payload: putU64(0)}
	}
	return nil
}

func TestFrontendRejectsBadReplies(t *testing.T) {
	tests := []struct {
		name string
		fn   func(m *Message) *fakeReply
		want error
	}{
		{"reply for another request", func(m *Message) *fakeReply {
			if m.Request == ReqGetFeatures {
				return &fakeReply{hdr: Header{Request: ReqGetVringBase, Flags: Version | FlagReply}, payload: putU64(0)}
			}
			return standard(m, 0)
		}, ErrUnexpectedReply},
		{"reply without the reply flag", func(m *Message) *fakeReply {
			if m.Request == ReqGetFeatures {
				return &fakeReply{hdr: Header{Request: ReqGetFeatures, Flags: Version}, payload: putU64(0)}
			}
			return standard(m, 0)
		}, ErrUnexpectedReply},
		{"reply with a descriptor", func(m *Message) *fakeReply {
			if m.Request == ReqGetFeatures {
				return &fakeReply{payload: putU64(0), fds: pipeFds(t, 1)}
			}
			return standard(m, 0)
		}, ErrFdCount},
		{"u64 reply of the wrong size", func(m *Message) *fakeReply {
			if m.Request == ReqGetFeatures {
				return &fakeReply{payload: make([]byte, 4)}
			}
			return standard(m, 0)
		}, ErrBadSize},
		{"REPLY_ACK failure status", func(m *Message) *fakeReply {
			if m.Request == ReqGetQueueNum {
				return &fakeReply{payload: putU64(1)}
			}
			if m.Request == ReqSetProtocolFeatures {
				return nil
			}
			if m.NeedReply() {
				return &fakeReply{payload: putU64(22)}
			}
			return standard(m, ProtocolFeatures(0).With(PFReplyAck, PFMQ))
		}, ErrReplyFailed},
		{"back-end closes mid-handshake", func(m *Message) *fakeReply {
			if m.Request == ReqGetFeatures {
				return &fakeReply{hdr: Header{Request: ReqGetFeatures, Flags: Version | FlagReply}, payload: nil, close: true}
			}
			return standard(m, 0)
		}, ErrBadSize},
		{"zero queues", func(m *Message) *fakeReply {
			if m.Request == ReqGetQueueNum {
				return &fakeReply{payload: putU64(0)}
			}
			return standard(m, ProtocolFeatures(0).With(PFMQ))
		}, ErrProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := countFds(t)
			c, done := fakeBackend(t, tc.fn)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			f, err := NewFrontend(ctx, c.uc, nil)
			if err == nil {
				// REPLY_ACK failures show on the first acknowledged
				// request after the handshake.
				err = f.SetFeatures(virtio.Features(0).With(virtio.FVersion1))
			}
			require.Error(t, err)
			assert.ErrorIs(t, err, tc.want)
			c.close()
			<-done
			assert.Equal(t, before, countFds(t), "descriptors leaked")
		})
	}
}

func TestFrontendTimeout(t *testing.T) {
	c, _ := fakeBackend(t, func(m *Message) *fakeReply { return nil }) // never answers
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := NewFrontend(ctx, c.uc, nil)
	require.Error(t, err)
	assert.True(t, errors.Is(err, context.DeadlineExceeded) || errors.Is(err, io.EOF), "got %v", err)
}

func TestFrontendAfterClose(t *testing.T) {
	c, _ := fakeBackend(t, func(m *Message) *fakeReply { return standard(m, 0) })
	f, err := NewFrontend(context.Background(), c.uc, nil)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	assert.Error(t, f.SetFeatures(0))
	assert.Error(t, f.Close())
}
