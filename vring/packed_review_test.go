package vring

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// Adversarial review of the packed ring (issue 12): a hostile driver
// against the device side and a hostile device against the driver side.
// Every case ends in a typed error or a well-defined "nothing available",
// and no chain is handed out (or reclaimed) twice.

// A PushBatch naming one buffer id twice writes nothing and leaves every
// id of the batch in flight, with and without IN_ORDER.
func TestPackedReviewPushBatchRepeatedID(t *testing.T) {
	const d = rawRingAt
	for _, feat := range []virtio.Features{allPacked, allPacked.With(virtio.FInOrder)} {
		for _, batch := range [][]UsedElem{
			{{Head: 1}, {Head: 1}},
			{{Head: 1}, {Head: 2}, {Head: 1}},
			{{Head: 2}, {Head: 1}, {Head: 2, Len: 8}},
		} {
			r := newRawPacked(t, feat)
			r.desc(d, 0, rawData, 8, 1, A1)
			r.desc(d, 1, rawData, 8, 2, A1|DescFWrite)
			n, err := r.dev.PopBatch(make([]Chain, 2))
			require.NoError(t, err)
			require.Equal(t, 2, n)
			before := append([]byte(nil), r.region[d:d+16*rawPSize]...)
			err = r.dev.PushBatch(batch)
			require.ErrorIs(t, err, ErrNotInFlight, "%v %+v", feat, batch)
			assert.Equal(t, before, r.region[d:d+16*rawPSize], "nothing written")
			require.NoError(t, r.dev.Err(), "the device's own mistake does not break the queue")
			require.NoError(t, r.dev.PushBatch([]UsedElem{{Head: 1}, {Head: 2, Len: 8}}), "both still in flight")
			assert.Equal(t, QueueState{NextAvail: PackedIndex(2, true), NextUsed: PackedIndex(2, true)}, r.dev.State())
		}
	}
}

// Device side: what a hostile driver writes into the ring.
func TestPackedReviewHostileDriver(t *testing.T) {
	const d = rawRingAt
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	for _, tc := range []struct {
		name  string
		feat  virtio.Features
		build func(r *rawPacked) // then PopBatch(3) until an error or nothing
		pops  int                // chains popped before the outcome
		want  error              // nil: nothing more available, no error
	}{
		{"the same buffer id twice in one PopBatch", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 2, A1)
			r.desc(d, 1, rawData, 8, 2, A1)
		}, 1, ErrBufferIDInFlight},
		{"the same buffer id twice, second one a chain", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 4, A1)
			r.desc(d, 1, rawData, 8, 0, A1|N)
			r.desc(d, 2, rawData, 8, 4, A1)
		}, 1, ErrBufferIDInFlight},
		{"an in-flight head re-marked available for the same lap is not popped again", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 0, A1)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(r.t, err)
			require.True(r.t, ok)
			r.desc(d, 0, rawData+8, 16, 1, A1|W) // rewritten after the device read it
		}, 0, nil},
		{"an in-flight head re-marked for the next lap, reached after a lap", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 0, A1)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(r.t, err)
			require.True(r.t, ok)
			r.desc(d, 0, rawData, 8, 0, A0) // the slot still in flight, forged for lap 2
			for i := 1; i < rawPSize; i++ {
				r.desc(d, i, rawData, 8, uint16(i), A1)
			}
		}, rawPSize - 1, ErrChainTooLong},
		{"a chain mixing wrap counters before the ring end", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0, A0|W) // lap-2 bits at a lap-1 position
			r.desc(d, 0, rawData, 8, 0, A1|N)
		}, 0, ErrDescNotAvailable},
		{"a chain wrapping the ring end with lap-1 bits after it", allPacked, func(r *rawPacked) {
			r.dev.pk.nextAvail, r.dev.pk.nextUsed = 3, 3
			r.desc(d, 3, rawData, 8, 0, A1|N)
			r.desc(d, 4, rawData, 8, 0, A1|N)
			r.desc(d, 0, rawData, 8, 0, A1) // should be A0: lap 2 there
		}, 0, ErrDescNotAvailable},
		{"an indirect table ending one byte past guest memory", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawMem-32, 48, 0, A1|I)
		}, 0, ErrBufferOutOfRange},
		{"an indirect table whose address + length wraps the address space", allPacked, func(r *rawPacked) {
			r.desc(d, 0, 1<<64-16, 32, 0, A1|I)
		}, 0, ErrBufferOutOfRange},
		{"a buffer whose length wraps the address space", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 0xffffffff, 0, A1)
			r.desc(d, 1, 1<<64-8, 0xffffffff, 1, A1)
		}, 0, ErrBufferOutOfRange},
		{"the buffer id 0xffff", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 0xffff, A1)
		}, 0, ErrBufferIDOutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRawPacked(t, tc.feat)
			tc.build(r)
			seen := map[uint16]bool{}
			pops := 0
			var err error
			for range 2 * rawPSize {
				cs := make([]Chain, 3)
				var n int
				n, err = r.dev.PopBatch(cs)
				for _, c := range cs[:n] {
					require.False(t, seen[c.Head], "buffer id %d handed out twice", c.Head)
					seen[c.Head] = true
				}
				pops += n
				if err != nil || n == 0 {
					break
				}
			}
			assert.Equal(t, tc.pops, pops)
			if tc.want == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.want)
			var qe *QueueError
			require.ErrorAs(t, err, &qe)
			assert.ErrorIs(t, r.dev.Err(), ErrQueueBroken)
		})
	}
}

// The valid corner cases next to those: a table ending exactly at the end
// of guest memory, zero-length descriptors inside a chain.
func TestPackedReviewEdgesAccepted(t *testing.T) {
	const d = rawRingAt
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	t.Run("indirect table ending at the last byte of guest memory", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		r.desc(rawMem-32, 0, rawData, 8, 0, 0)
		r.desc(rawMem-32, 1, rawMem-64, 16, 0, W)
		r.desc(d, 0, rawMem-32, 32, 3, A1|I)
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(3), c.Head)
		assert.Equal(t, uint64(16), c.WritableLen)
	})
	t.Run("zero-length descriptors inside a chain", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		r.desc(d, 0, rawData, 0, 0, A1|N)
		r.desc(d, 1, rawData, 8, 0, A1|N)
		r.desc(d, 2, rawData, 0, 0, A1|N|W)
		r.desc(d, 3, rawData+8, 0, 2, A1|W)
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(2), c.Head)
		assert.Equal(t, uint16(4), c.Descs)
		assert.Equal(t, uint64(8), c.ReadableLen)
		assert.Zero(t, c.WritableLen)
		require.NoError(t, r.dev.Push(2, 0))
		_, _, fl := r.used(0)
		assert.Equal(t, DescFAvail|DescFUsed, fl, "nothing writable, nothing written: no WRITE")
	})
}

// The driver's event suppression word, however odd, decides the
// interrupt without panicking: DESC without EVENT_IDX and the reserved
// value 3 are ENABLE, an event offset beyond the ring is never reached by
// a push of less than a ring.
func TestPackedReviewDriverEventWord(t *testing.T) {
	const d = rawRingAt
	for _, tc := range []struct {
		name    string
		feat    virtio.Features
		offWrap uint16
		flags   uint16
		want    bool
	}{
		{"DESC without EVENT_IDX is ENABLE", virtio.Features(0), PackedIndex(3, true), EventFlagsDesc, true},
		{"reserved flags 3 is ENABLE", allPacked, PackedIndex(3, true), 3, true},
		{"DISABLE", allPacked, 0, EventFlagsDisable, false},
		{"upper flag bits ignored", allPacked, 0, 0xfffc | EventFlagsDisable, false},
		{"DESC at the pushed descriptor", allPacked, PackedIndex(0, true), EventFlagsDesc, true},
		{"DESC at an offset beyond the ring, this lap", allPacked, PackedIndex(0x7fff, true), EventFlagsDesc, false},
		// Offsets of the other lap move one ring back, as Linux's
		// vhost_vring_packed_need_event computes it: offset 5 of lap 0 is
		// offset 0 of lap 1, the descriptor just used.
		{"DESC at an offset beyond the ring, other lap", allPacked, PackedIndex(rawPSize, false), EventFlagsDesc, true},
		{"DESC at an offset far beyond the ring, other lap", allPacked, PackedIndex(0x7fff, false), EventFlagsDesc, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRawPacked(t, tc.feat)
			r.driverEvent(tc.offWrap, tc.flags)
			r.desc(d, 0, rawData, 8, 0, A1)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.NoError(t, r.dev.Push(0, 0))
			assert.Equal(t, tc.want, r.dev.NeedsInterrupt())
			assert.False(t, r.dev.NeedsInterrupt(), "nothing pushed since")
		})
	}
}

// Restoring a packed queue from a state no queue of its size can be at
// is ErrInvalidState.
func TestPackedReviewRestoreInconsistent(t *testing.T) {
	const size = rawPSize
	for _, tc := range []struct {
		name string
		st   QueueState
		ok   bool
	}{
		{"avail index = size", QueueState{NextAvail: PackedIndex(size, true), NextUsed: PackedIndex(0, true)}, false},
		{"avail index 0x7fff", QueueState{NextAvail: 0xffff, NextUsed: 0xffff}, false},
		{"used index = size", QueueState{NextAvail: PackedIndex(0, true), NextUsed: PackedIndex(size, true)}, false},
		{"used ahead of avail in one lap", QueueState{NextAvail: PackedIndex(1, true), NextUsed: PackedIndex(2, true)}, false},
		{"more than a ring in flight", QueueState{NextAvail: PackedIndex(3, false), NextUsed: PackedIndex(1, true)}, false},
		{"split encoding (both wrap 0 at 0) is a valid lap-0 position", QueueState{}, true},
		{"a full ring in flight", QueueState{NextAvail: PackedIndex(2, false), NextUsed: PackedIndex(2, true)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRawPacked(t, allPacked)
			dev, err := NewDeviceQueue(r.mem, DeviceQueueOptions{Index: 1, Layout: r.l, Features: allPacked.With(virtio.FRingPacked), State: tc.st})
			if tc.ok {
				require.NoError(t, err)
				assert.Equal(t, tc.st, dev.State())
				return
			}
			require.ErrorIs(t, err, ErrInvalidState)
			assert.Nil(t, dev)
		})
	}
}

// Driver side: a hostile device.
func TestPackedReviewHostileDevice(t *testing.T) {
	const U1 = DescFAvail | DescFUsed
	for _, feat := range []virtio.Features{allPacked, allPacked.With(virtio.FInOrder)} {
		name := "any-order"
		if feat.Has(virtio.FInOrder) {
			name = "in-order"
		}
		mk := func(t *testing.T) (*DriverQueue, []byte, Layout, [2]uint16) {
			mem, drv, _ := newPackedPair(t, rawPSize, feat)
			var ids [2]uint16
			for i := range ids {
				id, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 64, Writable: true}})
				require.NoError(t, err)
				ids[i] = id
			}
			drv.Publish()
			return drv, mem.Regions()[0].Bytes(), ContiguousPackedLayout(0x1000, rawPSize), ids
		}
		forge := func(raw []byte, l Layout, i int, id uint16, n uint32, flags uint16) {
			b := raw[int(l.Desc)+16*i:]
			putLE32(b[8:], n)
			putLE16(b[12:], id)
			putLE16(b[14:], flags)
		}
		t.Run(name+"/used written twice", func(t *testing.T) {
			drv, raw, l, ids := mk(t)
			forge(raw, l, 0, ids[1], 4, U1|DescFWrite)
			forge(raw, l, 1, ids[1], 4, U1|DescFWrite)
			got := map[uint16]int{}
			var err error
			for range 4 {
				var id uint16
				var ok bool
				id, _, ok, err = drv.Reclaim()
				if err != nil || !ok {
					break
				}
				got[id]++
			}
			if feat.Has(virtio.FInOrder) {
				// The first used descriptor (id 1 at slot 0) covers both
				// chains and slots 0..1: the copy at slot 1 is never read.
				require.NoError(t, err)
				assert.Equal(t, map[uint16]int{ids[0]: 1, ids[1]: 1}, got)
			} else {
				require.ErrorIs(t, err, ErrUsedIDNotOutstanding)
			}
			for id, n := range got {
				assert.Equal(t, 1, n, "id %d reclaimed %d times", id, n)
			}
		})
		t.Run(name+"/used with the wrong wrap counter is not used", func(t *testing.T) {
			drv, raw, l, ids := mk(t)
			forge(raw, l, 0, ids[0], 4, DescFWrite) // lap-2 used bits in lap 1
			_, _, ok, err := drv.Reclaim()
			require.NoError(t, err)
			require.False(t, ok)
			assert.Equal(t, rawPSize-2, drv.NumFree())
		})
		t.Run(name+"/length one past the writable bytes", func(t *testing.T) {
			drv, raw, l, ids := mk(t)
			forge(raw, l, 0, ids[0], 65, U1|DescFWrite)
			_, _, ok, err := drv.Reclaim()
			require.False(t, ok)
			require.ErrorIs(t, err, ErrUsedLenTooLarge)
		})
		t.Run(name+"/id never added", func(t *testing.T) {
			drv, raw, l, _ := mk(t)
			forge(raw, l, 0, rawPSize-1, 0, U1)
			_, _, ok, err := drv.Reclaim()
			require.False(t, ok)
			require.ErrorIs(t, err, ErrUsedIDNotOutstanding)
		})
	}
}

func putLE16(b []byte, v uint16) { b[0], b[1] = byte(v), byte(v>>8) }
func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
