package vring

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestPackedWalkDirectAgreesWithWalk checks packedWalk's fast path against
// packedWalk itself on random packed rings, mostly well-formed chains with
// every kind of defect mixed in, from random ring positions with random
// descriptors in flight: whenever packedWalkDirect takes a chain,
// packedWalk takes it too, builds the same Chain and leaves the queue in the
// same state; whatever packedWalkDirect declines, it leaves the queue as it
// was, and packedWalk decides.
func TestPackedWalkDirectAgreesWithWalk(t *testing.T) {
	const size = 13 // packed rings need not be a power of two
	rng := rand.New(rand.NewPCG(14, 2))
	feat := virtio.Features(0).With(virtio.FRingPacked, virtio.FIndirectDesc)
	accepted, declined, declinedOK := 0, 0, 0
	for iter := 0; iter < 20000; iter++ {
		backing, mem := walkTestMemory(t, rng)
		l := ContiguousPackedLayout(0x1000, size)

		at, st, availBits := randomPackedPosition(rng, size, size)
		g := backing[:0x2000]
		writeRandomPackedDescs(rng, g[l.Desc-0x1000:], size, at, availBits, 26)
		// The head is always available (the callers check it first).
		hb := g[int(l.Desc-0x1000)+16*int(at)+14:]
		binary.LittleEndian.PutUint16(hb, binary.LittleEndian.Uint16(hb)&^availUsed|availBits)

		var seed Chain
		if rng.IntN(4) != 0 {
			seed.Segs = make([]Segment, 0, rng.IntN(size+1))
		}
		busy := make([]bool, size)
		for i := range busy {
			busy[i] = rng.IntN(6) == 0
		}
		newQ := func(warm bool) *DeviceQueue {
			q, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat, State: st})
			require.NoError(t, err)
			for i, b := range busy {
				q.pk.ids[i].inflight = b
			}
			if warm { // a queue whose region cache is warm
				q.cBase, q.cMem = 0x1000, backing[:0x2000]
			}
			return q
		}
		q := newQ(rng.IntN(2) == 0)
		headFlags, ok := q.pk.headAvailable()
		require.True(t, ok)
		fast := seed
		fast.Segs = make([]Segment, 0, cap(seed.Segs))
		before := *q.pk
		before.ids = append([]packedID(nil), q.pk.ids...)
		if headFlags&DescFIndirect != 0 || !q.packedWalkDirect(&fast, headFlags) {
			declined++
			require.Equal(t, before, *q.pk, "iteration %d: packedWalkDirect declined and changed the queue", iter)
			if q.packedWalk(&fast, headFlags) == nil {
				declinedOK++
			}
			mem.Close()
			continue
		}
		accepted++
		q2 := newQ(false)
		slow := seed
		slow.Segs = make([]Segment, 0, cap(seed.Segs))
		require.NoError(t, q2.packedWalk(&slow, headFlags), "iteration %d: packedWalkDirect took a chain packedWalk refuses", iter)
		requireSameChain(t, slow, fast, "iteration %d", iter)
		require.Equal(t, *q2.pk, *q.pk, "iteration %d: the queues differ after the walks", iter)
		mem.Close()
	}
	t.Logf("packedWalkDirect took %d chains, declined %d (packedWalk took %d of those)", accepted, declined, declinedOK)
	require.NotZero(t, accepted)
	require.NotZero(t, declined)
	require.NotZero(t, declinedOK, "no declined chain was valid: the fast path's bounds are not exercised")
}

// TestPackedWalkRunAgreesWithWalkDirect checks packedPopBatch's run loop
// for chains of several descriptors against packedWalkDirect on random
// packed rings (the defects of TestPackedWalkDirectAgreesWithWalk, chains
// that wrap, random descriptors and buffer ids in flight): packedWalkRun
// takes exactly the chains that headAvailable and packedWalkDirect, called
// chain after chain, take, builds the same Chains, stops where they stop,
// and leaves the queue in the same state.
func TestPackedWalkRunAgreesWithWalkDirect(t *testing.T) {
	const size = 13
	rng := rand.New(rand.NewPCG(15, 3))
	feat := virtio.Features(0).With(virtio.FRingPacked, virtio.FIndirectDesc)
	full, stopped, atLimit, pastWrap := 0, 0, 0, 0
	for iter := 0; iter < 20000; iter++ {
		backing, mem := walkTestMemory(t, rng)
		l := ContiguousPackedLayout(0x1000, size)
		at, st, availBits := randomPackedPosition(rng, size, size/2)
		g := backing[:0x2000]
		writeRandomPackedDescs(rng, g[l.Desc-0x1000:], size, at, availBits, 40)
		busy := make([]bool, size)
		for i := range busy {
			busy[i] = rng.IntN(8) == 0
		}
		nb := 1 + rng.IntN(6)
		caps := make([]int, nb)
		for i := range caps {
			caps[i] = size
			if rng.IntN(8) == 0 {
				caps[i] = rng.IntN(4)
			}
		}
		newQ := func() *DeviceQueue {
			q, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat, State: st})
			require.NoError(t, err)
			for i, b := range busy {
				q.pk.ids[i].inflight = b
			}
			q.cBase, q.cMem = 0x1000, backing[:0x2000]
			return q
		}
		run := make([]Chain, nb)
		for i := range run {
			run[i].Segs = make([]Segment, 0, caps[i])
		}
		q := newQ()
		got := q.packedWalkRun(run)
		ref := newQ()
		for i := 0; i < nb; i++ {
			c := Chain{Segs: make([]Segment, 0, caps[i])}
			flags, ok := ref.pk.headAvailable()
			ok = ok && flags&DescFIndirect == 0 && ref.packedWalkDirect(&c, flags)
			if i == got {
				require.False(t, ok, "iteration %d: packedWalkRun stopped at chain %d, which packedWalkDirect takes", iter, i)
				stopped++
				break
			}
			require.True(t, ok, "iteration %d: packedWalkRun took chain %d, which packedWalkDirect declines", iter, i)
			requireSameChain(t, c, run[i], "iteration %d chain %d", iter, i)
		}
		if got == nb {
			full++
		}
		require.Equal(t, *ref.pk, *q.pk, "iteration %d: the queues differ after %d chains", iter, got)
		// What stopped or ended the run: the next chain running into the
		// descriptors in flight (counted as they were before the run plus
		// those the run took), and chains taken after the ring's end.
		if got < nb {
			n, at := 1, int(q.pk.nextAvail)
			for at+n-1 < size && n <= size &&
				binary.LittleEndian.Uint16(g[int(l.Desc-0x1000)+16*(at+n-1)+14:])&DescFNext != 0 {
				n++
			}
			if n > int(size-q.pk.inflight) {
				atLimit++
			}
		}
		if q.pk.availBits != availBits && q.pk.nextAvail > 0 {
			pastWrap++
		}
		mem.Close()
	}
	t.Logf("packedWalkRun took whole batches %d times, stopped early %d times (%d at the in-flight limit); %d runs went on past the ring's end",
		full, stopped, atLimit, pastWrap)
	require.NotZero(t, full)
	require.NotZero(t, stopped)
	require.NotZero(t, atLimit, "no run met the descriptors in flight")
	require.NotZero(t, pastWrap, "no run went on past the ring's end")
}

// randomPackedPosition is where the device of a packed equivalence test
// is: the next available position at and its wrap counter (st.NextAvail,
// and the avail bits a descriptor there must carry), and fewer than
// maxInflight ring descriptors in flight before it (st.NextUsed).
func randomPackedPosition(rng *rand.Rand, size, maxInflight int) (at uint16, st QueueState, availBits uint16) {
	at = uint16(rng.IntN(size))
	wrap := rng.IntN(2) == 0
	k := rng.IntN(maxInflight)
	usedAt, usedWrap := int(at)-k, wrap
	if usedAt < 0 {
		usedAt += size
		usedWrap = !usedWrap
	}
	st = QueueState{NextAvail: PackedIndex(at, wrap), NextUsed: PackedIndex(uint16(usedAt), usedWrap)}
	availBits, _ = setWrapBits(wrap, false)
	return at, st, availBits
}

// writeRandomPackedDescs writes a packed ring of size random descriptors
// into ring for the equivalence tests, available from at on for this lap
// and before at for the next: buffers in walkTestMemory's first region,
// NEXT two times in three, writable ones mostly in the second half, random
// buffer ids, and one descriptor in about defectsOneIn with a defect:
// empty, in the other region or past it, nowhere, INDIRECT, not available,
// crossing the region's end, or an id out of range. The head at at is
// left as it came out; callers that need it available make it so.
func writeRandomPackedDescs(rng *rand.Rand, ring []byte, size int, at, availBits uint16, defectsOneIn int) {
	for i := 0; i < size; i++ {
		addr := uint64(0x1800 + rng.IntN(0x700))
		length := uint32(1 + rng.IntN(64))
		bits := availBits
		if i < int(at) { // the next lap's positions
			bits ^= availUsed
		}
		flags := bits
		if rng.IntN(3) != 0 {
			flags |= DescFNext
		}
		if i >= size/2 || rng.IntN(8) == 0 {
			flags |= DescFWrite
		}
		id := uint16(rng.IntN(size))
		switch rng.IntN(defectsOneIn) {
		case 0:
			length = 0
		case 1:
			addr = 0x3000 + uint64(rng.IntN(0x2000)) // the other region, or past it
		case 2:
			addr = 0x1fff0 // nowhere
		case 3:
			flags |= DescFIndirect
			length = 16 * uint32(1+rng.IntN(3))
		case 4:
			flags ^= availUsed // not available
		case 5:
			addr, length = 0x2ff0, 64 // crosses the region's end
		case 6:
			id = uint16(size + rng.IntN(4)) // out of range
		}
		b := ring[16*i:]
		binary.LittleEndian.PutUint64(b, addr)
		binary.LittleEndian.PutUint32(b[8:], length)
		binary.LittleEndian.PutUint16(b[12:], id)
		binary.LittleEndian.PutUint16(b[14:], flags)
	}
}
