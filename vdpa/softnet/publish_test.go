package softnet

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// TestRepliesPublishedInRunsOfWholeFrames: replies written during a
// transmit batch become visible to the driver while the batch goes on,
// every few chains (rxPendingMax) rather than at its end, and never part
// of a frame: with MRG_RXBUF, all num_buffers chains of a frame are used
// together (§5.1.6.4). A visible reply is counted in Stats, and so is the
// transmitted frame that caused it. The handler looks at the receive ring
// after each reply, as a driver on another CPU could at any moment.
func TestRepliesPublishedInRunsOfWholeFrames(t *testing.T) {
	const frames = 32
	for _, packed := range []bool{false, true} {
		for _, mrg := range []bool{false, true} {
			t.Run(fmt.Sprintf("packed=%v/mrg=%v", packed, mrg), func(t *testing.T) {
				f := virtio.Features(0).With(virtio.FVersion1)
				if packed {
					f = f.With(virtio.FRingPacked)
				}
				// With MRG_RXBUF a frame and its header take three
				// 64-byte buffers (64, 64, 34 bytes); without, one
				// buffer holds it.
				const frameLen = 150
				rxLen, perFrame := uint32(4096), 1
				if mrg {
					f = f.With(virtio.NetFMrgRxbuf)
					rxLen, perFrame = 64, 3
				}
				hdrLen := virtio.NetHdrLen(f)
				l := newLoopFrame(t, f, false, virtio.NetHdr{}, func(d *Device) []byte {
					fr := make([]byte, frameLen)
					copy(fr, d.cfgMAC[:])
					return fr
				}, rxLen)

				var lens []uint32 // used lengths seen by the driver, in order
				drain := func() {
					for {
						_, n, ok, err := l.rxq.Reclaim()
						require.NoError(t, err)
						if !ok {
							return
						}
						lens = append(lens, n)
					}
				}
				var seen []int // chains the driver had after each reply
				l.d.SetHandler(FrameHandlerFunc(func(tx *Tx, frame []byte) {
					require.NoError(t, tx.Reply(frame))
					drain()
					seen = append(seen, len(lens))
					// A driver that sees a reply finds the frame that
					// caused it, and the reply, in Stats.
					st := l.d.Stats()
					visible := uint64(len(lens) / perFrame)
					assert.GreaterOrEqual(t, st.Queues[1].Frames, visible, "transmitted frames counted when %d replies are visible", visible)
					assert.GreaterOrEqual(t, st.Queues[0].Frames, visible, "received frames counted when %d replies are visible", visible)
				}))
				l.post(t, frames*perFrame, frames)
				got, err := l.d.txBatch(l.tx)
				require.NoError(t, err)
				require.Equal(t, frames, got)
				drain()

				require.Len(t, lens, frames*perFrame)
				want := []uint32{uint32(hdrLen + frameLen)}
				if mrg {
					want = []uint32{64, 64, uint32(hdrLen+frameLen) - 128}
				}
				for i, n := range lens {
					require.Equal(t, want[i%perFrame], n, "used length of chain %d", i)
				}
				// Published at the end of every frame that brings
				// rxPendingMax or more chains waiting.
				framesPerRun := (rxPendingMax + perFrame - 1) / perFrame
				require.Len(t, seen, frames)
				for i, n := range seen {
					assert.Zero(t, n%perFrame, "after reply %d the driver sees %d chains: part of a frame", i+1, n)
					assert.Equal(t, (i+1)/framesPerRun*framesPerRun*perFrame, n, "chains visible after reply %d", i+1)
				}
			})
		}
	}
}
