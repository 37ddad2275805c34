package vring

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// rawPacked is a packed ring whose driver side is written byte by byte.
type rawPacked struct {
	t      testing.TB
	mem    *Memory
	l      Layout
	dev    *DeviceQueue
	region []byte
}

const rawPSize = 5 // not a power of two

var allPacked = virtio.Features(0).With(virtio.FRingPacked, virtio.FIndirectDesc, virtio.FEventIdx)

func newRawPacked(t testing.TB, feat virtio.Features) *rawPacked {
	t.Helper()
	reg, err := NewMemfdRegion(0, rawMem, nil)
	require.NoError(t, err)
	mem, err := NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	feat = feat.With(virtio.FRingPacked)
	l := ContiguousPackedLayout(rawRingAt, rawPSize)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Index: 3, Layout: l, Features: feat, State: InitialState(feat)})
	require.NoError(t, err)
	return &rawPacked{t: t, mem: mem, l: l, dev: dev, region: reg.Bytes()}
}

// desc writes a packed descriptor (le64 addr, le32 len, le16 id, le16
// flags) at index i of the table at table.
func (r *rawPacked) desc(table GuestAddr, i int, addr uint64, n uint32, id, flags uint16) {
	b := r.region[int(table)+16*i:]
	binary.LittleEndian.PutUint64(b, addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], id)
	binary.LittleEndian.PutUint16(b[14:], flags)
}

func (r *rawPacked) used(i int) (id uint16, n uint32, flags uint16) {
	b := r.region[int(r.l.Desc)+16*i:]
	return binary.LittleEndian.Uint16(b[12:]), binary.LittleEndian.Uint32(b[8:]), binary.LittleEndian.Uint16(b[14:])
}

func (r *rawPacked) driverEvent(offWrap, flags uint16) {
	binary.LittleEndian.PutUint16(r.region[int(r.l.Avail):], offWrap)
	binary.LittleEndian.PutUint16(r.region[int(r.l.Avail)+2:], flags)
}

func (r *rawPacked) deviceEvent() (offWrap, flags uint16) {
	return binary.LittleEndian.Uint16(r.region[int(r.l.Used):]), binary.LittleEndian.Uint16(r.region[int(r.l.Used)+2:])
}

// A1 and U0 are the AVAIL/USED bits of an available descriptor in the
// first lap (driver wrap counter 1); A0 in the second (wrap 0).
const (
	A1 = DescFAvail
	A0 = DescFUsed
)

func TestPackedHostileDeviceInput(t *testing.T) {
	const d = rawRingAt // descriptor ring
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	tests := []struct {
		name     string
		feat     virtio.Features
		build    func(r *rawPacked)
		want     error
		index    uint16
		indirect bool
	}{
		{"2.8.6 a chain's later descriptors must be available (not marked at all)", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0, W) // no AVAIL/USED bits
			r.desc(d, 0, rawData, 8, 0, A1|N)
		}, ErrDescNotAvailable, 1, false},
		{"2.8.6 a chain's later descriptors must be available for their lap (stale previous lap)", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0, A0|W)
			r.desc(d, 0, rawData, 8, 0, A1|N)
		}, ErrDescNotAvailable, 1, false},
		{"2.8.6 a chain's later descriptors must not be used descriptors", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0, DescFAvail|DescFUsed)
			r.desc(d, 0, rawData, 8, 0, A1|N)
		}, ErrDescNotAvailable, 1, false},
		{"2.8.6 a chain wrapping the ring end uses the next lap's bits", allPacked, func(r *rawPacked) {
			// Head at 4 (lap 1), continuing at 0 with lap-1 bits: 0 has not
			// been made available for lap 2.
			r.dev.pk.nextAvail = 4
			r.desc(d, 0, rawData, 8, 0, A1)
			r.desc(d, 4, rawData, 8, 0, A1|N)
		}, ErrDescNotAvailable, 0, false},
		{"2.8.15 a chain must not be longer than the queue size", allPacked, func(r *rawPacked) {
			for i := range rawPSize {
				r.desc(d, i, rawData, 8, 0, A1|N)
			}
		}, ErrChainTooLong, 0, false},
		{"2.8.15 a chain must not run into descriptors in flight", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 0, A1)
			var c Chain
			ok, err := r.dev.Pop(&c) // descriptor 0 in flight
			require.NoError(r.t, err)
			require.True(r.t, ok)
			for i := 1; i < rawPSize; i++ {
				r.desc(d, i, rawData, 8, 1, A1|N) // ... and on into 0 (lap 2 bits: A0)
			}
			r.desc(d, 0, rawData, 8, 1, A0) // forged: the in-flight slot re-marked for lap 2
		}, ErrChainTooLong, 0, false},
		{"2.8.17 indirect table length must not be zero", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawTable, 0, 0, A1|I)
		}, ErrIndirectSize, 0, false},
		{"2.8.17 indirect table length must be a multiple of 16", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawTable, 24, 0, A1|I)
		}, ErrIndirectSize, 0, false},
		{"2.8.15 indirect table no longer than the queue size", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawTable, 16*(rawPSize+1), 0, A1|I)
		}, ErrChainTooLong, 0, false},
		{"2.8.17 INDIRECT and NEXT must not both be set", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0, A1)
			r.desc(d, 0, rawTable, 16, 0, A1|I|N)
		}, ErrIndirectWithNext, 0, false},
		{"2.8.17 no INDIRECT descriptor in a NEXT list", allPacked, func(r *rawPacked) {
			r.desc(rawTable, 0, rawData, 8, 0, 0)
			r.desc(d, 1, rawTable, 16, 0, A1|I)
			r.desc(d, 0, rawData, 8, 0, A1|N)
		}, ErrIndirectWithNext, 1, false},
		{"2.8.17 no INDIRECT inside an indirect table", allPacked, func(r *rawPacked) {
			r.desc(rawTable, 0, rawData, 8, 0, 0)
			r.desc(rawTable, 1, rawTable, 16, 0, I)
			r.desc(d, 0, rawTable, 32, 0, A1|I)
		}, ErrNestedIndirect, 1, true},
		{"2.8.17 INDIRECT only with VIRTIO_F_INDIRECT_DESC", 0, func(r *rawPacked) {
			r.desc(d, 0, rawTable, 16, 0, A1|I)
		}, ErrIndirectNotNegotiated, 0, false},
		{"2.8.15 readable descriptors must precede writable ones", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0, A1)
			r.desc(d, 0, rawData, 8, 0, A1|W|N)
		}, ErrReadableAfterWritable, 1, false},
		{"2.8.15 readable before writable inside an indirect table", allPacked, func(r *rawPacked) {
			r.desc(rawTable, 0, rawData, 8, 0, W)
			r.desc(rawTable, 1, rawData, 8, 0, 0)
			r.desc(d, 0, rawTable, 32, 0, A1|I)
		}, ErrReadableAfterWritable, 1, true},
		{"buffer must lie in guest memory", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawMem-4, 8, 0, A1)
		}, ErrOutOfRange, 0, false},
		{"buffer address plus length must not overflow", allPacked, func(r *rawPacked) {
			r.desc(d, 0, ^uint64(0)-2, 8, 0, A1)
		}, ErrOverflow, 0, false},
		{"zero-length buffer must not lie past the end of guest memory", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawMem+1, 0, 0, A1)
		}, ErrOutOfRange, 0, false},
		{"buffer in an indirect table must lie in guest memory", allPacked, func(r *rawPacked) {
			r.desc(rawTable, 0, rawData, 8, 0, 0)
			r.desc(rawTable, 1, 2*rawMem, 8, 0, W)
			r.desc(d, 0, rawTable, 32, 0, A1|I)
		}, ErrOutOfRange, 1, true},
		{"indirect table must lie in guest memory", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawMem-16, 32, 0, A1|I)
		}, ErrOutOfRange, 0, false},
		{"buffer id must be < queue size", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, rawPSize, A1)
		}, ErrBufferIDOutOfRange, 0, false},
		{"buffer id (of the last descriptor) must be < queue size", allPacked, func(r *rawPacked) {
			r.desc(d, 1, rawData, 8, 0xffff, A1|W)
			r.desc(d, 0, rawData, 8, 0, A1|N)
		}, ErrBufferIDOutOfRange, 1, false},
		{"buffer id must not be in flight", allPacked, func(r *rawPacked) {
			r.desc(d, 0, rawData, 8, 2, A1)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(r.t, err)
			require.True(r.t, ok)
			r.desc(d, 2, rawData, 8, 2, A1|W)
			r.desc(d, 1, rawData, 8, 0, A1|N)
		}, ErrBufferIDInFlight, 2, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRawPacked(t, tc.feat)
			tc.build(r)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.Error(t, err)
			assert.False(t, ok)
			assert.ErrorIs(t, err, tc.want)
			var qe *QueueError
			require.ErrorAs(t, err, &qe)
			assert.Equal(t, 3, qe.Queue)
			assert.Equal(t, tc.index, qe.Index)
			assert.Equal(t, tc.indirect, qe.Indirect)
			if errors.Is(tc.want, ErrOutOfRange) || errors.Is(tc.want, ErrOverflow) {
				assert.ErrorIs(t, err, ErrBufferOutOfRange)
			}

			// Broken: every call fails with ErrQueueBroken and the cause.
			_, err = r.dev.Pop(&c)
			assert.ErrorIs(t, err, ErrQueueBroken)
			assert.ErrorIs(t, err, tc.want)
			assert.ErrorIs(t, r.dev.Push(0, 0), ErrQueueBroken)
			assert.ErrorIs(t, r.dev.PushBatch([]UsedElem{{}}), ErrQueueBroken)
			_, err = r.dev.PopBatch(make([]Chain, 2))
			assert.ErrorIs(t, err, ErrQueueBroken)
			_, err = r.dev.EnableNotify()
			assert.ErrorIs(t, err, ErrQueueBroken)
			assert.ErrorIs(t, r.dev.Err(), tc.want)
			assert.False(t, r.dev.NeedsInterrupt())

			// Reset, then a valid chain at index 0 works again.
			r.dev.Reset()
			require.NoError(t, r.dev.Err())
			r.desc(d, 0, rawData, 8, 4, A1)
			ok, err = r.dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			assert.Equal(t, uint16(4), c.Head)
		})
	}
}

// TestPackedNotAvailableIsNotAnError: a head whose AVAIL/USED bits do not
// show it available for the device's wrap counter is "nothing to pop",
// never an error: the zeroed ring, a used descriptor, a descriptor left
// from the previous lap.
func TestPackedNotAvailableIsNotAnError(t *testing.T) {
	const d = rawRingAt
	for _, tc := range []struct {
		name  string
		flags uint16
	}{
		{"zeroed ring", 0},
		{"used descriptor, wrap 1", DescFAvail | DescFUsed},
		{"used descriptor, wrap 0", 0 | DescFWrite},
		{"available for the other lap", A0 | DescFNext},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRawPacked(t, allPacked)
			r.desc(d, 0, 0xdead0000, 8, 0xffff, tc.flags) // garbage otherwise: never read
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(t, err)
			require.False(t, ok)
			n, err := r.dev.PopBatch(make([]Chain, 3))
			require.NoError(t, err)
			require.Zero(t, n)
			pending, err := r.dev.EnableNotify()
			require.NoError(t, err)
			require.False(t, pending)
			require.NoError(t, r.dev.Err())
		})
	}
}

// TestPackedValidDeviceInput: what the rules allow.
func TestPackedValidDeviceInput(t *testing.T) {
	const d = rawRingAt
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	t.Run("2.8.6 the buffer id is the last descriptor's", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		r.desc(d, 1, rawData+8, 8, 3, A1|W)
		r.desc(d, 0, rawData, 8, 0xffff, A1|N) // the head's id is not the buffer id
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(3), c.Head)
		assert.Equal(t, uint16(2), c.Descs)
		require.NoError(t, r.dev.Push(3, 4))
		id, n, fl := r.used(0)
		assert.Equal(t, uint16(3), id)
		assert.Equal(t, uint32(4), n)
		assert.Equal(t, DescFAvail|DescFUsed|W, fl, "used in lap 1, written")
		assert.Equal(t, QueueState{NextAvail: PackedIndex(2, true), NextUsed: PackedIndex(2, true)}, r.dev.State())
	})
	t.Run("2.8.6 a chain may wrap around the ring end", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		r.dev.Reset()
		r.dev.pk.nextAvail, r.dev.pk.nextUsed = 3, 3
		r.desc(d, 0, rawData+16, 8, 1, A0|W)
		r.desc(d, 4, rawData+8, 8, 1, A1|N)
		r.desc(d, 3, rawData, 8, 1, A1|N)
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(3), c.Descs)
		assert.Equal(t, QueueState{NextAvail: PackedIndex(1, false), NextUsed: PackedIndex(3, true)}, r.dev.State())
		require.NoError(t, r.dev.Push(1, 0))
		_, _, fl := r.used(3)
		assert.Equal(t, DescFAvail|DescFUsed|W, fl, "written at the head's slot, lap 1 bits")
		assert.Equal(t, QueueState{NextAvail: PackedIndex(1, false), NextUsed: PackedIndex(1, false)}, r.dev.State())
	})
	t.Run("2.8.17 indirect table entries: only WRITE counts, NEXT/AVAIL/USED/id ignored", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		r.desc(rawTable, 0, rawData, 8, 7, N|A0)
		r.desc(rawTable, 1, rawData+8, 8, 9, N|W|DescFAvail|DescFUsed)
		r.desc(d, 0, rawTable, 32, 2, A1|I|W) // WRITE on the indirect descriptor is ignored too
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(2), c.Head)
		assert.Equal(t, uint16(1), c.Descs)
		assert.Equal(t, 1, c.Readable)
		assert.Equal(t, uint64(8), c.WritableLen)
	})
	t.Run("a full ring in flight", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		for i := range rawPSize {
			r.desc(d, i, rawData, 8, uint16(i), A1)
		}
		cs := make([]Chain, rawPSize+1)
		n, err := r.dev.PopBatch(cs)
		require.NoError(t, err)
		require.Equal(t, rawPSize, n)
		assert.Equal(t, QueueState{NextAvail: PackedIndex(0, false), NextUsed: PackedIndex(0, true)}, r.dev.State())
		n, err = r.dev.PopBatch(cs)
		require.NoError(t, err)
		require.Zero(t, n, "slot 0 is in flight: its lap-1 bits are not lap 2's")
	})
}

// TestPackedHostileDriverSideInput: a device that breaks the rules, seen
// by the driver side.
func TestPackedHostileDriverSideInput(t *testing.T) {
	type setup struct {
		mem *Memory
		drv *DriverQueue
		raw []byte
		l   Layout
	}
	mk := func(t *testing.T) setup {
		mem, drv, _ := newPackedPair(t, rawPSize, allPacked)
		return setup{mem, drv, mem.Regions()[0].Bytes(), ContiguousPackedLayout(0x1000, rawPSize)}
	}
	forge := func(s setup, i int, id uint16, n uint32, flags uint16) {
		b := s.raw[int(s.l.Desc)+16*i:]
		binary.LittleEndian.PutUint32(b[8:], n)
		binary.LittleEndian.PutUint16(b[12:], id)
		binary.LittleEndian.PutUint16(b[14:], flags)
	}
	const U1 = DescFAvail | DescFUsed
	for _, tc := range []struct {
		name string
		id   uint16
		n    uint32
		fl   uint16
		want error
	}{
		{"used id out of range", rawPSize, 0, U1, ErrUsedIDNotOutstanding},
		{"used id not outstanding", 3, 0, U1, ErrUsedIDNotOutstanding},
		{"used length larger than the writable bytes", 0xffff, 65, U1 | DescFWrite, ErrUsedLenTooLarge},
	} {
		for _, batched := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "", true: ", ReclaimBatch"}[batched], func(t *testing.T) {
				s := mk(t)
				id, err := s.drv.Add([]Buffer{{Addr: 0x100000, Len: 64, Writable: true}})
				require.NoError(t, err)
				s.drv.Publish()
				if tc.id == 0xffff {
					tc.id = id
				}
				forge(s, 0, tc.id, tc.n, tc.fl)
				if batched {
					var out [2]UsedElem
					n, err := s.drv.ReclaimBatch(out[:])
					require.Zero(t, n)
					require.ErrorIs(t, err, tc.want)
					var qe *QueueError
					require.ErrorAs(t, err, &qe)
					assert.Equal(t, uint16(0), qe.Index)
					_, err = s.drv.ReclaimBatch(out[:0])
					assert.ErrorIs(t, err, ErrQueueBroken)
					return
				}
				_, _, ok, err := s.drv.Reclaim()
				require.False(t, ok)
				require.ErrorIs(t, err, tc.want)
				var qe *QueueError
				require.ErrorAs(t, err, &qe)
				assert.Equal(t, uint16(0), qe.Index)
				_, _, _, err = s.drv.Reclaim()
				assert.ErrorIs(t, err, ErrQueueBroken)
				_, err = s.drv.Add([]Buffer{{Addr: 0x100000, Len: 64}})
				assert.ErrorIs(t, err, ErrQueueBroken)
				s.drv.Reset()
				require.NoError(t, s.drv.Err())
				assert.Equal(t, rawPSize, s.drv.NumFree())
			})
		}
	}
	t.Run("a used id of a chain added but not published", func(t *testing.T) {
		s := mk(t)
		a, err := s.drv.Add([]Buffer{{Addr: 0x100000, Len: 64}})
		require.NoError(t, err)
		s.drv.Publish()
		b, err := s.drv.Add([]Buffer{{Addr: 0x100000, Len: 64}})
		require.NoError(t, err)
		require.NotEqual(t, a, b)
		forge(s, 0, b, 0, U1) // b's descriptors are in the ring, its head not published
		_, _, ok, err := s.drv.Reclaim()
		require.False(t, ok)
		require.ErrorIs(t, err, ErrUsedIDNotOutstanding)
	})
	t.Run("without WRITE the used length is ignored", func(t *testing.T) {
		s := mk(t)
		id, err := s.drv.Add([]Buffer{{Addr: 0x100000, Len: 64}})
		require.NoError(t, err)
		s.drv.Publish()
		forge(s, 0, id, 1<<30, U1)
		h, n, ok, err := s.drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, id, h)
		assert.Zero(t, n)
	})
	t.Run("a descriptor not marked used for the lap is not used yet", func(t *testing.T) {
		s := mk(t)
		id, err := s.drv.Add([]Buffer{{Addr: 0x100000, Len: 64}})
		require.NoError(t, err)
		s.drv.Publish()
		for _, fl := range []uint16{0, DescFAvail, DescFUsed} { // lap-2 used, available, odd
			forge(s, 0, id, 0, fl)
			_, _, ok, err := s.drv.Reclaim()
			require.NoError(t, err)
			require.False(t, ok)
		}
	})
}
