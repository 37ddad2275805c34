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
				pos, ok, err := PackedUsedPosition(mem, l)
				require.NoError(t, err, "step %d", step)
				if !ok {
					require.True(t, !pushed || tc.maxLen > 1, "step %d: a ring of single descriptors a device used records no position", step)
					continue
				}
				recorded++
				if tc.full && !hasUsedDesc(t, mem, l) {
					fromFull++
				}
				require.Equal(t, dev.State().NextUsed, pos, "step %d: the used position the ring records (device %+v)", step, dev.State())
			}
			require.Greater(t, recorded, 1000, "steps at which the ring recorded the position")
			if tc.full {
				require.Greater(t, fromFull, 300, "steps at which the driver had reused every used slot")
			}
		})
	}
}

// hasUsedDesc reports whether the packed ring at l holds a descriptor
// whose AVAIL and USED bits are equal.
func hasUsedDesc(t *testing.T, mem *Memory, l Layout) bool {
	t.Helper()
	b := make([]byte, 16*int(l.Size))
	require.NoError(t, mem.Read(l.Desc, b))
	for i := 0; i < len(b); i += 16 {
		f := binary.LittleEndian.Uint16(b[i+14:])
		avail, used := f&DescFAvail != 0, f&DescFUsed != 0
		if avail == used {
			return true
		}
	}
	return false
}

// TestPackedUsedPositionRejects: rings whose used descriptors do not form
// a run the device could have written give ErrUsedRun, and rings that
// record nothing give ok false, whatever the driver wrote.
func TestPackedUsedPositionRejects(t *testing.T) {
	const size = 4
	l := ContiguousPackedLayout(0x1000, size)
	type desc struct {
		addr  uint64
		flags uint16
		id    uint16
	}
	mark := func(n uint64) uint64 { return usedMark | n }
	const used1, used0, avail1, avail0 = DescFAvail | DescFUsed, 0, DescFAvail, DescFUsed
	for _, tc := range []struct {
		name    string
		ring    [size]desc
		pos     uint16
		ok      bool
		errLike bool
	}{
		{"a zeroed ring", [size]desc{}, 0, false, false},
		{"a fresh ring, two available", [size]desc{{0x100000, avail1, 0}, {0x100000, avail1, 0}}, 0, false, false},
		{"a fresh ring the driver filled", [size]desc{{1, avail1, 0}, {1, avail1, 1}, {1, avail1, 2}, {1, avail1, 3}}, PackedIndex(0, true), true, false},
		{"full, the device one lap and two in", [size]desc{{1, avail0, 2}, {1, avail0, 0}, {1, avail1, 3}, {1, avail1, 1}}, PackedIndex(2, true), true, false},
		{"full-looking, but chained: a used chain's leftover may look available", [size]desc{{1, avail0, 0}, {1, avail1 | DescFNext, 1}, {1, avail1, 2}, {1, avail1, 3}}, 0, false, false},
		{"full-looking, but an id twice: a used chain's leftover and its id reused", [size]desc{{1, avail0, 0}, {1, avail0, 1}, {1, avail1, 1}, {1, avail1, 3}}, 0, false, false},
		{"a run of two, then available", [size]desc{{mark(1), used1, 0}, {mark(2), used1, 0}, {0, used0, 0}, {1, avail1, 0}}, PackedIndex(3, true), true, false},
		{"a run across the ring's end", [size]desc{{mark(1), used0, 0}, {1, avail1, 0}, {mark(1), used1, 0}, {mark(2), used1, 0}}, PackedIndex(1, false), true, false},
		{"a count of 0 mid-run", [size]desc{{mark(1), used1, 0}, {mark(0), used1, 0}}, 0, false, true},
		{"a used descriptor without the mark ends the run", [size]desc{{mark(1), used1, 0}, {0x200000, used1, 0}}, 0, false, true},
		{"a count past the ring", [size]desc{{mark(5), used1, 0}}, 0, false, true},
		{"a run longer than the ring", [size]desc{{mark(3), used1, 0}, {mark(2), used0, 0}, {}, {mark(2), used1, 0}}, 0, false, true},
		{"unmarked used descriptors only (another implementation)", [size]desc{{0x200000, used1, 0}, {0x200000, used1, 0}}, 0, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewMemfdRegion(0, 1<<20, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			for i, d := range tc.ring {
				var b [16]byte
				binary.LittleEndian.PutUint64(b[0:], d.addr)
				binary.LittleEndian.PutUint32(b[8:], 64)
				binary.LittleEndian.PutUint16(b[12:], d.id)
				binary.LittleEndian.PutUint16(b[14:], d.flags)
				require.NoError(t, mem.Write(l.Desc+GuestAddr(16*i), b[:]))
			}
			pos, ok, err := PackedUsedPosition(mem, l)
			if tc.errLike {
				require.ErrorIs(t, err, ErrUsedRun)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.ok, ok)
			if ok {
				require.Equal(t, tc.pos, pos, "position %#x", pos)
			}
		})
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
		pos, ok, err := PackedUsedPosition(mem, l)
		if err != nil {
			require.ErrorIs(t, err, ErrUsedRun)
			return
		}
		if ok {
			idx, _ := PackedPosition(pos)
			require.Less(t, idx, size, "position %#x", pos)
		}
		pos2, ok2, err2 := PackedUsedPosition(mem, l)
		require.NoError(t, err2)
		require.Equal(t, ok, ok2)
		require.Equal(t, pos, pos2)
	})
}
