package vring

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// TestWalkDirectAgreesWithWalk checks walk's fast path against walk itself
// on random descriptor tables, mostly well-formed chains with every kind of
// defect mixed in: whenever walkDirect accepts a chain, walk accepts it too
// and builds the same Chain; whatever walkDirect declines, walk decides.
func TestWalkDirectAgreesWithWalk(t *testing.T) {
	const size = 16
	rng := rand.New(rand.NewPCG(14, 1))
	accepted, declined := 0, 0
	for iter := 0; iter < 20000; iter++ {
		backing, mem := walkTestMemory(t, rng)
		l := ContiguousLayout(0x1000, size)
		g := backing[:0x2000]
		writeRandomDescs(rng, g[l.Desc-0x1000:], size, 24)
		head := uint16(rng.IntN(size + 2))
		var seed Chain
		if rng.IntN(4) != 0 {
			seed.Segs = make([]Segment, 0, rng.IntN(size+1))
		}
		newQ := func() *DeviceQueue {
			q, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
			require.NoError(t, err)
			if rng.IntN(2) == 0 { // a queue whose region cache is warm
				q.cBase, q.cMem = 0x1000, backing[:0x2000]
			}
			return q
		}
		fast, slow := seed, seed
		fast.Segs = make([]Segment, 0, cap(seed.Segs))
		slow.Segs = make([]Segment, 0, cap(seed.Segs))
		q := newQ()
		if !q.walkDirect(head, &fast) {
			declined++
			mem.Close()
			continue
		}
		accepted++
		q2, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
		require.NoError(t, err)
		require.NoError(t, q2.walk(head, &slow), "iteration %d: walkDirect accepted a chain walk refuses", iter)
		requireSameChain(t, slow, fast, "iteration %d", iter)
		mem.Close()
	}
	t.Logf("walkDirect accepted %d chains, declined %d", accepted, declined)
	require.NotZero(t, accepted)
	require.NotZero(t, declined)
}

// requireSameChain requires two Chains to be equal and every segment's Buf
// to be the same memory (require.Equal compares the bytes only, and a
// fast path pointing Buf at other bytes of equal content would pass).
func requireSameChain(t *testing.T, want, got Chain, msg string, args ...any) {
	t.Helper()
	require.Equal(t, want, got, append([]any{msg}, args...)...)
	for i := range want.Segs {
		require.Equal(t, unsafe.SliceData(want.Segs[i].Buf), unsafe.SliceData(got.Segs[i].Buf),
			append([]any{msg + ": segment %d's Buf is other memory"}, append(args, i)...)...)
	}
}

// walkTestMemory is the guest memory of the walk-direct equivalence tests:
// 0x2000 bytes at 0x1000 (the ring at its start, buffers from 0x1800) and
// an adjacent second region of 0x2000 bytes at 0x3000, all of it
// random bytes so that a Buf pointing at other memory shows. backing is
// both regions' bytes, in order.
func walkTestMemory(t *testing.T, rng *rand.Rand) ([]byte, *Memory) {
	backing := make([]byte, 0x4000)
	for i := range backing {
		backing[i] = byte(rng.Uint32())
	}
	r1, err := NewRegion(0x1000, backing[:0x2000:0x2000], nil)
	require.NoError(t, err)
	r2, err := NewRegion(0x3000, backing[0x2000:], nil)
	require.NoError(t, err)
	mem, err := NewMemory(r1, r2)
	require.NoError(t, err)
	return backing, mem
}

// writeRandomDescs writes size random descriptors into table for the
// walk-direct equivalence tests: buffers in walkTestMemory's first region,
// chains linked in table order (NEXT two times in three), writable ones
// mostly in the second half, and one descriptor in about defectsOneIn
// with a defect: empty, in the other region or past it, nowhere,
// INDIRECT, a link anywhere (out of range, or backwards: a loop), or
// crossing the region's end.
func writeRandomDescs(rng *rand.Rand, table []byte, size, defectsOneIn int) {
	for i := 0; i < size; i++ {
		addr := uint64(0x1800 + rng.IntN(0x700))
		length := uint32(1 + rng.IntN(64))
		flags := uint16(0)
		next := uint16(i + 1)
		if rng.IntN(3) != 0 {
			flags |= DescFNext
		}
		if i >= size/2 || rng.IntN(8) == 0 {
			flags |= DescFWrite
		}
		switch rng.IntN(defectsOneIn) {
		case 0:
			length = 0
		case 1:
			addr = 0x3000 + uint64(rng.IntN(0x2000)) // the other region, or past it
		case 2:
			addr = 0x1fff0 // nowhere
		case 3:
			flags |= DescFIndirect
		case 4:
			next = uint16(rng.IntN(2 * size)) // anywhere, also out of range or backwards (a loop)
		case 5:
			addr, length = 0x2ff0, 64 // crosses the region's end
		}
		writeDesc(table, uint16(i), addr, length, flags, next)
	}
}

// TestWalkRunAgreesWithWalkDirect checks PopBatch's run loop for chains of
// several descriptors against walkDirect, chain by chain, on random tables
// (the defects of TestWalkDirectAgreesWithWalk) and random available rings,
// with a 4-aligned available ring and with a 2-aligned one whose first
// entry shares avail.idx's word: walkRun takes exactly the chains
// walkDirect takes, in order, builds the same Chains, stops at the first
// one walkDirect declines (or at the batch's end), and moves lastAvail past
// the chains it took and no further.
func TestWalkRunAgreesWithWalkDirect(t *testing.T) {
	const size = 16
	rng := rand.New(rand.NewPCG(15, 2))
	stopped, full := 0, 0
	for iter := 0; iter < 20000; iter++ {
		backing, mem := walkTestMemory(t, rng)
		l := ContiguousLayout(0x1000, size)
		if iter%2 == 1 {
			l.Avail += 2 // avail.ring[0] in avail.idx's word
		}
		g := backing[:0x2000]
		writeRandomDescs(rng, g[l.Desc-0x1000:], size, 40)
		start := uint16(rng.IntN(1 << 16))
		nb := 1 + rng.IntN(size)
		for k := range size {
			head := uint16(rng.IntN(size))
			if rng.IntN(50) == 0 {
				head = uint16(size + rng.IntN(size)) // out of range
			}
			binary.LittleEndian.PutUint16(g[l.Avail-0x1000+4+2*GuestAddr((int(start)+k)%size):], head)
		}
		q, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
		require.NoError(t, err)
		q.cBase, q.cMem = 0x1000, backing[:0x2000]
		q.lastAvail, q.availSeen = start, start+uint16(nb)
		caps := make([]int, nb)
		for k := range caps {
			switch caps[k] = 8; rng.IntN(8) {
			case 0:
				caps[k] = rng.IntN(6) // also too few for the chain
			case 1:
				caps[k] = size + 4 // a loop ends at the table's size, not at Segs's
			}
		}
		run := make([]Chain, nb)
		for k := range run {
			run[k].Segs = make([]Segment, 0, caps[k])
		}
		got := q.walkRun(run)
		require.Equal(t, start+uint16(got), q.lastAvail, "iteration %d", iter)
		ref, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
		require.NoError(t, err)
		ref.cBase, ref.cMem = q.cBase, q.cMem
		for k := 0; k < nb; k++ {
			c := Chain{Segs: make([]Segment, 0, caps[k])}
			ok := ref.walkDirect(ref.r.availEntry(start+uint16(k)), &c)
			if k == got {
				require.False(t, ok, "iteration %d: walkRun stopped at chain %d, which walkDirect takes", iter, k)
				stopped++
				break
			}
			require.True(t, ok, "iteration %d: walkRun took chain %d, which walkDirect declines", iter, k)
			requireSameChain(t, c, run[k], "iteration %d chain %d", iter, k)
		}
		if got == nb {
			full++
		}
		mem.Close()
	}
	t.Logf("walkRun took whole batches %d times, stopped early %d times", full, stopped)
	require.NotZero(t, full)
	require.NotZero(t, stopped)
}
