package softnet_test

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestRxPopAheadKeepsEveryBuffer: with MRG_RXBUF the device pops receive
// chains several at a time and holds those a frame does not take for the
// frames after it. Whatever the driver posts (chains of one descriptor or
// several, some longer than an entry's room) and however many chains the
// frames take, a frame is delivered whenever the buffers the driver has
// posted and not had back hold it (none is lost in the device's holding,
// across the stash's end, or across a suspend), frames arrive whole and in
// order, and a suspended queue has nothing in flight (the held chains are
// given back).
func TestRxPopAheadKeepsEveryBuffer(t *testing.T) {
	for _, tc := range []struct {
		name   string
		packed bool
		size   uint16
	}{
		{"split", false, 16},
		{"split, large ring", false, 256},
		{"packed", true, 16},
		{"packed, odd size", true, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := base.With(virtio.FEventIdx, virtio.NetFMrgRxbuf)
			if tc.packed {
				f = f.With(virtio.FRingPacked)
			}
			s := newStack(t, stackOptions{features: f, size: tc.size})
			rng := rand.New(rand.NewPCG(uint64(tc.size), 3))
			const bufSize = 128
			delivered, short := 0, 0
			for seq := uint32(0); seq < 1500; seq++ {
				if rng.IntN(3) != 0 {
					// Up to 6 buffers of bufSize bytes, each a chain of 1,
					// 2 or 8 descriptors (8 is more than a stash entry's
					// room: popped ahead only as a batch's first).
					for range 1 + rng.IntN(6) {
						parts := []int{1, 1, 2, 8}[rng.IntN(4)]
						if s.drv[0].Queue.NumFree() < parts {
							continue
						}
						lens := make([]uint32, parts)
						for i := range lens {
							lens[i] = bufSize / uint32(parts)
						}
						_, err := s.drv[0].Add(nil, lens)
						require.NoError(t, err)
					}
					s.drv[0].Queue.Publish()
				}
				n := rng.IntN(3 * bufSize) // frames of 1 to 4 buffers
				fr := frame(s.dev.MAC(), seq, n)
				need := (s.hdrLen + len(fr) + bufSize - 1) / bufSize
				posted := s.drv[0].Queue.Outstanding() // held by the device or available to it
				err := s.dev.Deliver(0, fr)
				if posted < need {
					require.ErrorIs(t, err, softnet.ErrNoBuffer, "frame %d: %d buffers posted, %d needed", seq, posted, need)
					short++
					continue
				}
				require.NoError(t, err, "frame %d: %d buffers posted, %d needed", seq, posted, need)
				h, got := s.recvFrame(0)
				require.Equal(t, need, int(h.NumBuffers), "frame %d", seq)
				require.Equal(t, fr, got, "frame %d", seq)
				delivered++
				if seq%97 == 0 {
					require.NoError(t, s.local.Suspend())
					st, err := s.local.QueueBase(0)
					require.NoError(t, err)
					assert.Equal(t, st.NextAvail, st.NextUsed, "frame %d: held chains are given back", seq)
					require.NoError(t, s.local.SetQueueBase(0, st))
					require.NoError(t, s.local.Resume())
				}
			}
			t.Logf("%d frames delivered, %d found too few buffers", delivered, short)
			require.Greater(t, delivered, 750)
			require.NotZero(t, short)
			assert.Zero(t, s.dev.Stats().Drop(softnet.DropRxTooSmall))
		})
	}
}
