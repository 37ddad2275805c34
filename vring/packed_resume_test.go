package vring

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// TestPackedUsedPositionFollowsTheDevice drives a packed ring with a
// driver and a device through random work: chains of one to four
// descriptors or indirect tables, popped and used in any order, alone or
// in batches, reclaimed and replaced by the driver, over many laps. After
// every step the position the ring records must be the device's own used
// position, whenever it records one at all; a driver that keeps the ring
// full of single descriptors (a receive ring) must leave it recorded too,
// and only a ring no device has used yet (or one holding chains, where
// the driver refilled every used slot) may record none.
func TestPackedUsedPositionFollowsTheDevice(t *testing.T) {
	for _, tc := range []struct {
		size   uint16
		feat   virtio.Features
		maxLen int  // descriptors per chain, 1..maxLen
		full   bool // the driver refills the ring whole, one descriptor a chain
	}{
		{1, 0, 1, false},
		{2, 0, 2, false},
		{5, 0, 4, false},
		{8, virtio.Features(0).With(virtio.FInOrder), 3, false},
		{64, virtio.Features(0).With(virtio.FIndirectDesc), 4, false},
		{256, virtio.Features(0).With(virtio.FEventIdx), 4, false},
		{16, 0, 1, true},
		{256, 0, 1, true},
	} {
		t.Run(fmt.Sprintf("size%d-%v-len%d-full%v", tc.size, tc.feat.Format(virtio.DeviceNet), tc.maxLen, tc.full), func(t *testing.T) {
			mem, drv, dev := newPackedPair(t, tc.size, tc.feat)
			l := ContiguousPackedLayout(0x1000, tc.size)
			rng := rand.New(rand.NewPCG(uint64(tc.size), uint64(tc.maxLen)))
			var held []Chain
			pushed, recorded, fromFull := false, 0, 0
			for step := range 3000 {
				op := rng.IntN(5)
				if tc.full {
					op = step % 4 // add until full, pop, use (in order), reclaim
				}
				switch {
				case op == 0: // the driver adds chains (a full driver: until the ring is full)
					for n := 1 + rng.IntN(4); n > 0 || tc.full; n-- {
						k := 1 + rng.IntN(tc.maxLen)
						if drv.NumFree() < k {
							break
						}
						bufs := make([]Buffer, k)
						for i := range bufs {
							bufs[i] = Buffer{Addr: GuestAddr(0x100000 + 0x100*i), Len: 64, Writable: i > 0 || tc.full}
						}
						var err error
						if tc.feat.Has(virtio.FIndirectDesc) && rng.IntN(3) == 0 {
							_, err = drv.AddIndirect(0x300000+GuestAddr(rng.IntN(64))*0x100, bufs)
						} else {
							_, err = drv.Add(bufs)
						}
						require.NoError(t, err)
					}
					drv.Publish()
				case op == 1: // the device pops
					for n := 1 + rng.IntN(8); n > 0; n-- {
						var c Chain
						ok, err := dev.Pop(&c)
						require.NoError(t, err)
						if !ok {
							break
						}
						held = append(held, c)
					}
				case op == 2 && len(held) > 0: // the device uses one, any of those it holds
					i := rng.IntN(len(held))
					if tc.feat.Has(virtio.FInOrder) || tc.full {
						i = 0
					}
					require.NoError(t, dev.PushChain(&held[i], uint32(rng.IntN(int(held[i].WritableLen)+1))))
					held = append(held[:i], held[i+1:]...)
					pushed = true
				case op == 3 && len(held) > 0 && !tc.full: // the device uses several at once
					n := 1 + rng.IntN(len(held))
					elems := make([]UsedElem, n)
					for i := range elems {
						elems[i] = UsedElem{Head: held[i].Head}
					}
					require.NoError(t, dev.PushBatch(elems))
					held = held[n:]
					pushed = true
				default: // the driver reclaims
					for {
						_, _, ok, err := drv.Reclaim()
						require.NoError(t, err)
						if !ok {
							break
						}
					}
				}
				pos, src, err := PackedUsedPosition(mem, l)
				require.NoError(t, err, "step %d", step)
				require.NotEqual(t, CutBatch, src, "step %d: every batch was published", step)
				// A device taking over with the right base keeps it; with
				// a stale one (the initial position) it resumes at the
				// device's position or, where the ring records nothing
				// it may use, at the base.
				now := dev.State().NextUsed
				got, _, err := PackedResumePosition(mem, l, now)
				require.NoError(t, err)
				require.Equal(t, now, got, "step %d: a right base is kept", step)
				stale := InitialState(fPacked).NextAvail
				got, gsrc, err := PackedResumePosition(mem, l, stale)
				require.NoError(t, err)
				if gsrc != NoPosition {
					require.Equal(t, now, got, "step %d: resumed from the ring (%v) after a stale base", step, gsrc)
				} else {
					require.Equal(t, stale, got)
				}
				if src == NoPosition {
					require.True(t, !pushed || tc.maxLen > 1, "step %d: a ring of single descriptors a device used records no position", step)
					continue
				}
				recorded++
				if src == OldestAvailable {
					fromFull++
				}
				require.Equal(t, now, pos, "step %d: the used position the ring records (%v; device %+v)", step, src, dev.State())
			}
			require.Greater(t, recorded, 1000, "steps at which the ring recorded the position")
			if tc.full {
				require.Greater(t, fromFull, 300, "steps at which the driver had reused every used slot")
			}
		})
	}
}

// packedTestDesc is a descriptor a table test writes into a packed ring.
type packedTestDesc struct {
	addr  uint64
	flags uint16
	id    uint16
}

const (
	pUsed1, pUsed0   = DescFAvail | DescFUsed, 0
	pAvail1, pAvail0 = DescFAvail, DescFUsed
)

func pMark(n uint64) uint64 { return usedMark | n }

// packedTestRing writes descs into a fresh memory's packed ring of
// len(descs) descriptors at 0x1000 and returns the memory and layout.
func packedTestRing(t *testing.T, descs []packedTestDesc) (*Memory, Layout) {
	t.Helper()
	l := ContiguousPackedLayout(0x1000, uint16(len(descs)))
	r, err := NewMemfdRegion(0, 1<<20, nil)
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	for i, d := range descs {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[0:], d.addr)
		binary.LittleEndian.PutUint32(b[8:], 64)
		binary.LittleEndian.PutUint16(b[12:], d.id)
		binary.LittleEndian.PutUint16(b[14:], d.flags)
		require.NoError(t, mem.Write(l.Desc+GuestAddr(16*i), b[:]))
	}
	return mem, l
}

// TestPackedUsedPositionRings: what rings of 4 descriptors record, by
// rule: the used run, a cut batch, a full ring, nothing; and the rings
// whose used descriptors do not form a run give ErrUsedRun, whatever the
// driver wrote.
func TestPackedUsedPositionRings(t *testing.T) {
	type d = packedTestDesc
	for _, tc := range []struct {
		name string
		ring []d
		pos  uint16
		src  PositionSource
		err  bool
	}{
		{"a zeroed ring", []d{{}, {}, {}, {}}, 0, NoPosition, false},
		{"a fresh ring, two available", []d{{0x100000, pAvail1, 0}, {0x100000, pAvail1, 1}, {}, {}}, 0, NoPosition, false},
		{"a fresh ring the driver filled", []d{{1, pAvail1, 0}, {1, pAvail1, 1}, {1, pAvail1, 2}, {1, pAvail1, 3}}, PackedIndex(0, true), OldestAvailable, false},
		{"full, the device one lap and two in", []d{{1, pAvail0, 2}, {1, pAvail0, 0}, {1, pAvail1, 3}, {1, pAvail1, 1}}, PackedIndex(2, true), OldestAvailable, false},
		{"full-looking, but chained: a used chain's leftover may look available", []d{{1, pAvail0, 0}, {1, pAvail1 | DescFNext, 1}, {1, pAvail1, 2}, {1, pAvail1, 3}}, 0, NoPosition, false},
		{"full-looking, but an id twice: a used chain's leftover and its id reused", []d{{1, pAvail0, 0}, {1, pAvail0, 1}, {1, pAvail1, 1}, {1, pAvail1, 3}}, 0, NoPosition, false},
		{"a run of two, then available", []d{{pMark(1), pUsed1, 0}, {pMark(2), pUsed1, 0}, {0, pUsed0, 0}, {1, pAvail1, 0}}, PackedIndex(3, true), UsedRun, false},
		{"a run across the ring's end", []d{{pMark(1), pUsed0, 0}, {1, pAvail1, 0}, {pMark(1), pUsed1, 0}, {pMark(2), pUsed1, 0}}, PackedIndex(1, false), UsedRun, false},
		{"a cut batch: its first descriptor marked, flags still the driver's", []d{{pMark(1), pUsed1, 0}, {pMark(1), pAvail1, 1}, {pMark(1), pUsed1, 2}, {1, pAvail1, 3}}, PackedIndex(1, true), CutBatch, false},
		{"a cut batch across the ring's end", []d{{pMark(1), pUsed0, 0}, {1, pAvail0, 1}, {1, pAvail1, 2}, {pMark(2), pAvail1, 3}}, PackedIndex(3, true), CutBatch, false},
		{"two cut batches", []d{{pMark(1), pAvail1, 0}, {pMark(1), pAvail1, 1}, {}, {}}, 0, NoPosition, true},
		{"a count of 0 mid-run", []d{{pMark(1), pUsed1, 0}, {pMark(0), pUsed1, 0}, {}, {}}, 0, NoPosition, true},
		{"a used descriptor without the mark ends the run", []d{{pMark(1), pUsed1, 0}, {0x200000, pUsed1, 0}, {}, {}}, 0, NoPosition, true},
		{"a count past the ring", []d{{pMark(5), pUsed1, 0}, {}, {}, {}}, 0, NoPosition, true},
		{"a run longer than the ring", []d{{pMark(3), pUsed1, 0}, {pMark(2), pUsed0, 0}, {}, {pMark(2), pUsed1, 0}}, 0, NoPosition, true},
		{"unmarked used descriptors only (another implementation)", []d{{0x200000, pUsed1, 0}, {0x200000, pUsed1, 0}, {}, {}}, 0, NoPosition, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem, l := packedTestRing(t, tc.ring)
			pos, src, err := PackedUsedPosition(mem, l)
			if tc.err {
				require.ErrorIs(t, err, ErrUsedRun)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.src, src)
			if src != NoPosition {
				require.Equal(t, tc.pos, pos, "position %#x", pos)
			}
		})
	}
}

// TestPackedResumePosition: a full ring's oldest available descriptor is
// taken only over a base whose own descriptor is not available in its
// lap; a base that may be right is kept (a slot a used chain left over
// can look like the oldest available one); exact positions are taken
// over any base.
func TestPackedResumePosition(t *testing.T) {
	type d = packedTestDesc
	full := []d{{1, pAvail0, 2}, {1, pAvail0, 0}, {1, pAvail1, 3}, {1, pAvail1, 1}} // the device at 2 (wrap 1)
	// Three available from 2 (wrap 1) on, and slot 1 left over from a
	// used chain of two (0 and 1, lap 1) whose id, 1, the driver has not
	// handed out again: it looks like the oldest available descriptor.
	leftover := []d{{1, pAvail0, 0}, {1, pAvail1, 1}, {1, pAvail1, 2}, {1, pAvail1, 3}}
	run := []d{{pMark(1), pUsed1, 0}, {pMark(2), pUsed1, 0}, {0, pUsed0, 0}, {1, pAvail1, 0}} // the device at 3 (wrap 1)
	for _, tc := range []struct {
		name      string
		ring      []d
		base, pos uint16
		src       PositionSource
	}{
		{"full ring, a stale base (its slot of the other lap)", full, PackedIndex(0, true), PackedIndex(2, true), OldestAvailable},
		{"full ring, the right base", full, PackedIndex(2, true), PackedIndex(2, true), NoPosition},
		{"full-looking ring with a left-over slot, the right base kept", leftover, PackedIndex(2, true), PackedIndex(2, true), NoPosition},
		{"a used run over a stale base", run, PackedIndex(0, true), PackedIndex(3, true), UsedRun},
		{"a used run over a stale base whose slot is available in its lap", run, PackedIndex(3, false), PackedIndex(3, true), UsedRun},
		{"nothing recorded", []d{{}, {}, {}, {}}, PackedIndex(1, false), PackedIndex(1, false), NoPosition},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem, l := packedTestRing(t, tc.ring)
			pos, src, err := PackedResumePosition(mem, l, tc.base)
			require.NoError(t, err)
			require.Equal(t, tc.src, src)
			require.Equal(t, tc.pos, pos, "position %#x", pos)
		})
	}
	t.Run("a base outside the ring", func(t *testing.T) {
		mem, l := packedTestRing(t, full)
		pos, _, err := PackedResumePosition(mem, l, PackedIndex(4, true))
		require.ErrorIs(t, err, ErrInvalidState)
		require.Equal(t, PackedIndex(4, true), pos)
	})
}

// TestPackedUsedPositionCutBatch: a device that dies after writing a batch
// of used descriptors but before storing the first one's flags word (which
// publishes the batch) leaves the driver's used position at the batch's
// first descriptor, and the ring says so, whichever marked descriptor a
// walk would start from.
func TestPackedUsedPositionCutBatch(t *testing.T) {
	for _, before := range []int{0, 3, 5} { // chains used first, so the batch sits anywhere, across the ring's end too
		mem, drv, dev := newPackedPair(t, 8, 0)
		l := ContiguousPackedLayout(0x1000, 8)
		for range before {
			_, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 64, Writable: true}})
			require.NoError(t, err)
			drv.Publish()
			cs := popAll(t, dev)
			require.NoError(t, dev.PushChain(&cs[0], 1))
			_, _, ok, err := drv.Reclaim()
			require.NoError(t, err)
			require.True(t, ok)
		}
		for range 4 {
			_, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 64, Writable: true}})
			require.NoError(t, err)
		}
		drv.Publish()
		cs := popAll(t, dev)
		require.Len(t, cs, 4)
		first := dev.State().NextUsed
		idx, _ := PackedPosition(first)
		var word [4]byte // the first descriptor's id|flags as the driver made it available
		require.NoError(t, mem.Read(l.Desc+GuestAddr(16*uint64(idx))+12, word[:]))
		elems := make([]UsedElem, len(cs))
		for i, c := range cs {
			elems[i] = UsedElem{Head: c.Head, Len: 1}
		}
		require.NoError(t, dev.PushBatch(elems))
		require.NoError(t, mem.Write(l.Desc+GuestAddr(16*uint64(idx))+12, word[:])) // the store that never happened
		pos, src, err := PackedUsedPosition(mem, l)
		require.NoError(t, err)
		require.Equal(t, CutBatch, src, "after %d chains", before)
		require.Equal(t, first, pos, "after %d chains", before)
	}
}

// FuzzPackedUsedPosition reads rings whose every byte the input chose
// (what a hostile driver can leave in its descriptor ring): the result is
// a position of the ring (index below its size) or ErrUsedRun, never a
// panic or a fault, and reading twice gives the same answer.
//
// Input: [0] the ring size (1..64), then the descriptors' bytes, the rest
// zero.
func FuzzPackedUsedPosition(f *testing.F) {
	desc := func(addr uint64, id, flags uint16) []byte {
		b := make([]byte, 16)
		binary.LittleEndian.PutUint64(b, addr)
		binary.LittleEndian.PutUint32(b[8:], 64)
		binary.LittleEndian.PutUint16(b[12:], id)
		binary.LittleEndian.PutUint16(b[14:], flags)
		return b
	}
	seed := func(size byte, descs ...[]byte) []byte {
		b := []byte{size - 1}
		for _, d := range descs {
			b = append(b, d...)
		}
		return b
	}
	const used1, avail0, avail1 = DescFAvail | DescFUsed, DescFUsed, DescFAvail
	f.Add(seed(4, desc(usedMark|1, 0, used1), desc(usedMark|2, 1, used1), desc(0, 0, 0), desc(1, 2, avail1)))
	f.Add(seed(4, desc(1, 2, avail0), desc(1, 0, avail0), desc(1, 3, avail1), desc(1, 1, avail1)))
	f.Add(seed(3, desc(usedMark|3, 0, used1), desc(usedMark|2, 0, 0), desc(usedMark|1, 0, used1)))
	f.Add(seed(1, desc(usedMark|1, 0, used1)))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		size := 1 + uint16(data[0])%64
		r, err := NewMemfdRegion(0, 1<<16, nil)
		require.NoError(t, err)
		mem, err := NewMemory(r)
		require.NoError(t, err)
		defer mem.Close()
		l := ContiguousPackedLayout(0x1000, size)
		ring := data[1:]
		if len(ring) > 16*int(size) {
			ring = ring[:16*int(size)]
		}
		require.NoError(t, mem.Write(l.Desc, ring))
		pos, src, err := PackedUsedPosition(mem, l)
		if err != nil {
			require.ErrorIs(t, err, ErrUsedRun)
			return
		}
		if src != NoPosition {
			idx, _ := PackedPosition(pos)
			require.Less(t, idx, size, "position %#x", pos)
		}
		pos2, src2, err2 := PackedUsedPosition(mem, l)
		require.NoError(t, err2)
		require.Equal(t, src, src2)
		require.Equal(t, pos, pos2)
		// A base the ring cannot overrule comes back as it is; any
		// other is a position of the ring.
		base := PackedIndex(uint16(len(data))%size, len(data)%2 == 0)
		got, gsrc, err := PackedResumePosition(mem, l, base)
		require.NoError(t, err)
		if gsrc == NoPosition {
			require.Equal(t, base, got)
		} else {
			require.Equal(t, pos, got)
		}
	})
}
