package softnet

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// TestRxFaultMidBatchKeepsCount: a peer truncates the ring's memory so that
// popping receive chains ahead faults after the batch's first chain. The
// queue breaks (Deliver reports the fault), and the chain popped before
// the fault is held like any other: stopping the queue gives it back, so
// its state has nothing in flight.
func TestRxFaultMidBatchKeepsCount(t *testing.T) {
	const size = 512
	for _, packed := range []bool{false, true} {
		name := "split"
		if packed {
			name = "packed"
		}
		t.Run(name, func(t *testing.T) {
			// The ring's file: the second chain's descriptor lies in its
			// third page, which the truncation below takes away.
			fd, err := unix.MemfdCreate("softnet-ring", unix.MFD_CLOEXEC)
			require.NoError(t, err)
			t.Cleanup(func() { unix.Close(fd) })
			require.NoError(t, unix.Ftruncate(fd, 0x4000))
			ring, err := vring.NewFdRegion(0, 0x4000, fd, 0, &vring.RegionOptions{NoSeal: true})
			require.NoError(t, err)
			data, err := vring.NewMemfdRegion(0x10000, 0x10000, nil)
			require.NoError(t, err)
			mem, err := vring.NewMemory(ring, data)
			require.NoError(t, err)
			t.Cleanup(func() { mem.Close() })
			raw := ring.Bytes()
			desc := func(at uint64, addr uint64, length uint32, a, b uint16) {
				binary.LittleEndian.PutUint64(raw[at:], addr)
				binary.LittleEndian.PutUint32(raw[at+8:], length)
				binary.LittleEndian.PutUint16(raw[at+12:], a)
				binary.LittleEndian.PutUint16(raw[at+14:], b)
			}
			feat := virtio.Features(0).With(virtio.FVersion1)
			var l vring.Layout
			var st vring.QueueState
			if packed {
				// Descriptors from 0x1000: position 255 in the second
				// page, 256 in the third.
				feat = feat.With(virtio.FRingPacked)
				l = vring.Layout{Size: size, Desc: 0x1000, Avail: 0, Used: 0x100}
				st = vring.QueueState{NextAvail: vring.PackedIndex(255, true), NextUsed: vring.PackedIndex(255, true)}
				const avail = 1 << 7 // AVAIL set, USED clear: available in wrap 1
				desc(0x1000+16*255, 0x10000, 2048, 0, vring.DescFWrite|avail)
				desc(0x1000+16*256, 0x10800, 2048, 1, vring.DescFWrite|avail)
			} else {
				// Available ring at 0, used ring at 0x800, descriptors
				// from 0x2000: head 0 in the third page, head 300 in the
				// fourth.
				l = vring.Layout{Size: size, Desc: 0x2000, Avail: 0, Used: 0x800}
				desc(0x2000, 0x10000, 2048, vring.DescFWrite, 0)
				desc(0x2000+16*300, 0x10800, 2048, vring.DescFWrite, 0)
				binary.LittleEndian.PutUint16(raw[4:], 0)
				binary.LittleEndian.PutUint16(raw[6:], 300)
				binary.LittleEndian.PutUint16(raw[2:], 2) // avail.idx
			}
			dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: l, Features: feat, State: st})
			require.NoError(t, err)
			d, err := New(nil)
			require.NoError(t, err)
			require.NoError(t, d.SetFeatures(base1.With(virtio.NetFMrgRxbuf)))
			require.NoError(t, d.StartQueue(0, dq, nil, nil))
			t.Cleanup(d.Reset)

			cut := int64(0x3000) // split: head 300's descriptor is at 0x32c0
			if packed {
				cut = 0x2000 // packed: position 256 is at 0x2000
			}
			require.NoError(t, unix.Ftruncate(fd, cut))
			err = d.Deliver(0, make([]byte, 60))
			require.ErrorIs(t, err, vring.ErrMemoryFault, "the second chain's descriptor faults")
			require.ErrorIs(t, d.QueueErr(0), vring.ErrMemoryFault)
			assert.Equal(t, 1, d.queues[0].nstash, "the chain popped before the fault is held")

			got, err := d.StopQueue(0)
			require.NoError(t, err)
			assert.Equal(t, st.NextAvail, got.NextAvail, "the held chain is given back")
			assert.Equal(t, got.NextUsed, got.NextAvail, "nothing in flight")
		})
	}
}
