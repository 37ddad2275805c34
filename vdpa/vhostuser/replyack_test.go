package vhostuser

import (
	"context"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
)

// TestBackendReplyAckOnlyWithoutReplyBody: with REPLY_ACK negotiated and
// NEED_REPLY set, a failed request gets a non-zero u64 status "unless the
// message already has an explicit reply body" (vhost-user spec, REPLY_ACK).
// For a request whose reply is its own body (a vring position, a feature
// set, a count, a config space, a descriptor) a u64 1 would be read as that
// body: GET_VRING_BASE's position of queue 1, one memory slot, features
// 0x1. Such a request that fails gets no reply at all; the session ends
// with the typed error and no descriptor leaks. A request without a reply
// body of its own still gets the failure status.
func TestBackendReplyAckOnlyWithoutReplyBody(t *testing.T) {
	tests := []struct {
		name   string
		req    Request
		p      []byte
		fds    int // stray descriptors sent with it
		want   error
		status bool // a failure status is due (REPLY_ACK applies)
	}{
		{"GET_VRING_BASE with a stray fd", ReqGetVringBase, VringState{Index: 1}.Encode(), 1, ErrFdCount, false},
		{"GET_FEATURES with a stray fd", ReqGetFeatures, nil, 1, ErrFdCount, false},
		{"GET_PROTOCOL_FEATURES with a stray fd", ReqGetProtocolFeatures, nil, 1, ErrFdCount, false},
		{"GET_STATUS with a stray fd", ReqGetStatus, nil, 1, ErrFdCount, false},
		{"GET_QUEUE_NUM with a 4-byte payload", ReqGetQueueNum, make([]byte, 4), 0, ErrBadSize, false},
		{"GET_CONFIG with a short payload", ReqGetConfig, make([]byte, 4), 0, ErrBadSize, false},
		{"GET_MAX_MEM_SLOTS, not served", ReqGetMaxMemSlots, nil, 0, ErrUnsupported, false},
		{"POSTCOPY_ADVISE, not served", ReqPostcopyAdvise, nil, 0, ErrUnsupported, false},
		{"GET_INFLIGHT_FD, not served", ReqGetInflightFd, Inflight{NumQueues: 2, QueueSize: 256}.Encode(), 0, ErrUnsupported, false},
		{"SET_VRING_NUM beyond the queues", ReqSetVringNum, VringState{Index: 9, Num: 8}.Encode(), 0, ErrBadQueue, true},
		{"SET_OWNER with a stray fd", ReqSetOwner, nil, 1, ErrFdCount, true},
		{"POSTCOPY_END, not served (its reply is a status)", ReqPostcopyEnd, nil, 0, ErrUnsupported, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := openFdSet(t)
			h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
			a, b := socketpair(t)
			done := make(chan error, 1)
			go func() { done <- NewBackend(h, nil).ServeConn(context.Background(), b) }()
			sendRaw(t, a, rawMsg(ReqSetOwner, Version, 0, nil), nil)
			pf := u64p(uint64(ProtocolFeatures(0).With(PFReplyAck, PFMQ, PFConfig, PFStatus)))
			sendRaw(t, a, rawMsg(ReqSetProtocolFeatures, Version, 8, pf), nil)
			fds := pipeFds(t, tc.fds)
			sendRaw(t, a, rawMsg(tc.req, Version|FlagNeedReply, uint32(len(tc.p)), tc.p), fds)
			closeFds(fds)

			var err error
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("back-end did not end the session")
			}
			require.ErrorIs(t, err, tc.want)
			_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
			rest, rerr := io.ReadAll(a)
			require.NoError(t, rerr)
			if tc.status {
				require.Len(t, rest, HeaderSize+u64Size, "one u64 status reply")
				hd, err := DecodeHeader(rest)
				require.NoError(t, err)
				assert.Equal(t, tc.req, hd.Request)
				assert.True(t, hd.IsReply())
				assert.NotZero(t, binary.NativeEndian.Uint64(rest[HeaderSize:]), "a failure status")
			} else {
				assert.Empty(t, rest, "no reply that could be read as the request's own reply body")
			}
			require.NoError(t, a.Close())
			_ = b.Close()
			assert.Empty(t, leakedSince(t, before), "descriptors leaked")
		})
	}
}
