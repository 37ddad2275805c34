package vhostuser

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// packedBaseWord builds a packed base word (avail position in bits 0..15,
// used position in bits 16..31, each index | wrap<<15).
func packedBaseWord(ai uint16, aw bool, ui uint16, uw bool) uint32 {
	return uint32(vring.PackedIndex(ai, aw)) | uint32(vring.PackedIndex(ui, uw))<<16
}

// hostilePackedBases are GET/SET_VRING_BASE words no packed queue of size
// 8 can be at.
var hostilePackedBases = []struct {
	name string
	word uint32
}{
	{"avail index = size", packedBaseWord(8, true, 0, true)},
	{"avail index beyond size", packedBaseWord(0x7fff, true, 0x7fff, true)},
	{"used index = size", packedBaseWord(1, true, 8, true)},
	{"used ahead of avail in the same lap", packedBaseWord(2, true, 5, true)},
	{"avail more than a lap ahead of used", packedBaseWord(6, false, 3, true)},
}

// packedBaseBackend is a fake back-end offering features f and protocol
// features proto that answers every GET_VRING_BASE with word.
func packedBaseBackend(t *testing.T, f virtio.Features, word uint32, proto ProtocolFeatures) (*conn, <-chan struct{}) {
	return fakeBackend(t, func(m *Message) *fakeReply {
		switch m.Request {
		case ReqGetFeatures:
			return &fakeReply{payload: putU64(uint64(f))}
		case ReqGetVringBase:
			st, _ := DecodeVringState(m.Payload)
			return &fakeReply{payload: VringState{Index: st.Index, Num: word}.Encode()}
		}
		return standard(m, proto)
	})
}

// A hostile back-end's GET_VRING_BASE answer for a packed ring that no
// queue of the negotiated size can be at is ErrUnexpectedReply, not a
// state handed on to a migration stream or a restarted queue.
func TestFrontendPackedQueueBaseHostile(t *testing.T) {
	const size = 8
	packedF := virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat, virtio.FRingPacked)
	for _, tc := range append(hostilePackedBases, struct {
		name string
		word uint32
	}{"valid: 5 in flight across the ring end", packedBaseWord(2, false, 5, true)}) {
		t.Run(tc.name, func(t *testing.T) {
			c, done := packedBaseBackend(t, packedF, tc.word, 0)
			defer func() { c.close(); <-done }()
			f, err := NewFrontend(context.Background(), c.uc, nil)
			require.NoError(t, err)
			defer f.Close()
			require.NoError(t, f.SetFeatures(packedF))
			require.NoError(t, f.SetQueueNum(0, size))
			st, err := f.QueueBase(0)
			if tc.name[:6] == "valid:" {
				require.NoError(t, err)
				n, ok := st.PackedInFlight(size)
				require.True(t, ok)
				assert.Equal(t, uint16(5), n)
				return
			}
			require.Error(t, err, "got %+v", st)
			assert.ErrorIs(t, err, ErrUnexpectedReply)
			var me *MessageError
			if assert.ErrorAs(t, err, &me) {
				assert.Equal(t, ReqGetVringBase, me.Request)
			}
		})
	}
}

// When the Frontend does not know a packed queue's size (SET_VRING_NUM
// refused by the back-end, or not sent since a reset) a GET_VRING_BASE
// answer is still refused if no queue of any size can be at it (used ahead
// of avail, avail more than a lap ahead), and positions only a larger
// queue than usual can be at are accepted. The fuzzer found the first
// case handed on unchecked.
func TestFrontendPackedQueueBaseSizeUnknown(t *testing.T) {
	packedF := virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat, virtio.FRingPacked)
	for _, tc := range []struct {
		name  string
		word  uint32
		reset bool // SET_STATUS 0 before: the size set before is forgotten
		ok    bool
	}{
		{"used ahead of avail in the same lap", packedBaseWord(3, true, 5, true), false, false},
		{"avail more than a lap ahead of used", packedBaseWord(6, false, 3, true), false, false},
		{"used ahead of avail after a reset", packedBaseWord(3, true, 5, true), true, false},
		{"valid: 10 in flight at index 1000", packedBaseWord(1000, true, 990, true), false, true},
		{"valid: DPDK form, used half zero", uint32(vring.PackedIndex(0x7fff, false)), false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, done := packedBaseBackend(t, packedF, tc.word, ProtocolFeatures(0).With(PFStatus))
			defer func() { c.close(); <-done }()
			f, err := NewFrontend(context.Background(), c.uc, nil)
			require.NoError(t, err)
			defer f.Close()
			require.NoError(t, f.SetFeatures(packedF))
			if tc.reset {
				require.NoError(t, f.SetQueueNum(0, 8))
				require.NoError(t, f.SetStatus(0))
			}
			st, err := f.QueueBase(0)
			if tc.ok {
				require.NoError(t, err)
				_, ok := st.PackedInFlight(1 << 15)
				assert.True(t, ok, "%+v", st)
				return
			}
			require.ErrorIs(t, err, ErrUnexpectedReply, "got %+v", st)
			var me *MessageError
			if assert.ErrorAs(t, err, &me) {
				assert.Equal(t, ReqGetVringBase, me.Request)
			}
		})
	}
}

// A front-end's SET_VRING_BASE word for a packed ring that no queue of
// the size it set can be at ends the session with ErrProtocol naming
// SET_VRING_BASE (and vring.ErrInvalidState), before any ring starts.
func TestBackendPackedSetVringBaseHostile(t *testing.T) {
	for _, tc := range []struct {
		name string
		word uint32
	}{
		{"avail index = size", packedBaseWord(lcSize, true, 0, true)},
		{"avail index beyond size, used half zero (DPDK form)", uint32(vring.PackedIndex(0x7fff, true))},
		{"used index = size", packedBaseWord(1, true, lcSize, true)},
		{"used ahead of avail in the same lap", packedBaseWord(2, true, 5, true)},
		{"avail more than a lap ahead of used", packedBaseWord(lcSize-2, false, 3, true)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newLCGuestWith(t, lcPackedFeatures)
			c := g.connect(lcDevice(t))
			c.negotiatePacked()
			c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
			c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: tc.word}.Encode())
			select {
			case err := <-c.done:
				require.ErrorIs(t, err, ErrProtocol)
				assert.ErrorIs(t, err, vring.ErrInvalidState)
				var me *MessageError
				if assert.ErrorAs(t, err, &me) {
					assert.Equal(t, ReqSetVringBase, me.Request)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("session not ended")
			}
			assert.Zero(t, c.be.Info().RunningQueues)
		})
	}
}

// RESET_DEVICE forgets the rings' size, addresses and position: a packed
// SET_VRING_BASE that only a larger ring can be at, sent before that
// ring's SET_VRING_NUM, is accepted after a reset (it was refused against
// the size from before the reset), and a kick without the configuration
// sent again does not start the ring.
func TestBackendResetDeviceForgetsRingConfiguration(t *testing.T) {
	g := newLCGuestWith(t, lcPackedFeatures)
	c := g.connect(lcDevice(t))
	c.negotiatePacked()
	c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
	c.send(ReqResetDevice, nil)
	c.send(ReqSetFeatures, putU64(uint64(lcPackedFeatures)))
	word := packedBaseWord(lcSize+10, true, lcSize+10, true) // a position only a ring of more than lcSize+10 can be at
	c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: word}.Encode())
	c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: 2 * lcSize}.Encode())
	c.send(ReqSetVringKick, putU64(lcQueue), g.kick.Fd())
	assert.Equal(t, 0, c.running(), "no addresses since the reset: the ring does not start")
	assert.Equal(t, word, c.base32(), "GET_VRING_BASE answers the position set after the reset")
	select {
	case err := <-c.done:
		t.Fatalf("session ended: %v", err)
	default:
	}
}
