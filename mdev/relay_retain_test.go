package mdev

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// relayBench is one relayQueue between a guest ring (driven by guest, a
// DriverQueue) and a shadow ring (served by backing, a DeviceQueue), over
// one memory, with buffers in data.
type relayBench struct {
	t       *testing.T
	rq      *relayQueue
	guest   *vring.DriverQueue
	backing *vring.DeviceQueue
	data    vring.GuestAddr
}

func newRelayBench(t *testing.T, size uint16) *relayBench {
	t.Helper()
	ring := (vring.ContiguousLayoutBytes(size) + 4095) &^ 4095
	region, err := vring.NewMemfdRegion(0, 2*ring+1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(region)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	f := virtio.Features(0).With(virtio.FVersion1)
	gl := vring.ContiguousLayout(0, size)
	sl := vring.ContiguousLayout(vring.GuestAddr(ring), size)
	guest, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: gl, Features: f})
	require.NoError(t, err)
	gq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: gl, Features: f})
	require.NoError(t, err)
	sq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: sl, Features: f})
	require.NoError(t, err)
	backing, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: sl, Features: f})
	require.NoError(t, err)
	rq := newRelayQueue(0, gq, sq)
	rq.shadowKick, err = vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { rq.shadowKick.Close() })
	return &relayBench{t: t, rq: rq, guest: guest, backing: backing, data: vring.GuestAddr(2 * ring)}
}

// round makes a writable chain of n 16-byte buffers available on the guest
// ring, relays it, lets the backing device use it (writing nothing) and
// relays the completion back. It returns the chain's shadow head.
func (b *relayBench) round(n int) uint16 {
	b.t.Helper()
	bufs := make([]vring.Buffer, n)
	for i := range bufs {
		bufs[i] = vring.Buffer{Addr: b.data + vring.GuestAddr(16*i), Len: 16, Writable: true}
	}
	gh, err := b.guest.Add(bufs)
	require.NoError(b.t, err)
	b.guest.Publish()
	require.NoError(b.t, b.rq.forward())
	require.False(b.t, b.rq.hasPending, "the chain is in the shadow ring")
	require.NoError(b.t, b.rq.publish())
	var c vring.Chain
	ok, err := b.backing.Pop(&c)
	require.NoError(b.t, err)
	require.True(b.t, ok)
	require.Len(b.t, c.Segs, n)
	require.NoError(b.t, b.backing.Push(c.Head, 0))
	require.NoError(b.t, b.rq.complete())
	head, _, ok, err := b.guest.Reclaim()
	require.NoError(b.t, err)
	require.True(b.t, ok)
	require.Equal(b.t, gh, head, "the guest gets its chain back")
	return c.Head
}

// TestRelaySlotDropsHugeChain: an in-flight slot that held a chain of
// many segments (here the whole ring's worth) does not keep its room once
// the chain is completed; one that held a chain of usual length keeps
// it, so that the next such chain allocates nothing.
func TestRelaySlotDropsHugeChain(t *testing.T) {
	const size = 256
	b := newRelayBench(t, size)
	head := b.round(size)
	slot := &b.rq.inflight[head]
	assert.Equal(t, relaySlotSegs, cap(slot.Segs), "the room for %d segments went", size)

	// Every slot, after a ring's worth of ring-long chains: none keeps
	// more than relayKeepSegs.
	for range size {
		b.round(size)
	}
	for i := range b.rq.inflight {
		require.LessOrEqual(t, cap(b.rq.inflight[i].Segs), relayKeepSegs, "slot %d", i)
	}

	// A big-packet chain (19 descriptors) keeps its slot's room: the same
	// chains again allocate nothing in the relay.
	head = b.round(19)
	grown := cap(b.rq.inflight[head].Segs)
	assert.GreaterOrEqual(t, grown, 19)
	assert.LessOrEqual(t, grown, relayKeepSegs)
	for range 2 * size {
		b.round(19) // every slot grows once
	}
	for i := range b.rq.inflight {
		if c := cap(b.rq.inflight[i].Segs); c > relaySlotSegs {
			assert.Equal(t, grown, c, "slot %d", i)
		}
	}
	bufs := make([]vring.Buffer, 19)
	for i := range bufs {
		bufs[i] = vring.Buffer{Addr: b.data + vring.GuestAddr(16*i), Len: 16, Writable: true}
	}
	var c vring.Chain
	c.Segs = make([]vring.Segment, 0, 32)
	allocs := testing.AllocsPerRun(20, func() {
		if _, err := b.guest.Add(bufs); err != nil {
			panic(err)
		}
		b.guest.Publish()
		if err := b.rq.forward(); err != nil {
			panic(err)
		}
		if err := b.rq.publish(); err != nil {
			panic(err)
		}
		if ok, err := b.backing.Pop(&c); err != nil || !ok {
			panic(err)
		}
		if err := b.backing.Push(c.Head, 0); err != nil {
			panic(err)
		}
		if err := b.rq.complete(); err != nil {
			panic(err)
		}
		if _, _, ok, err := b.guest.Reclaim(); err != nil || !ok {
			panic(err)
		}
	})
	if !raceEnabled { // the race detector allocates on synchronization
		assert.Zero(t, allocs, "usual chains keep their slots' room")
	}

	// A chain of 60 segments, within relayKeepSegs, keeps its slot's room
	// although append rounded that room past relayKeepSegs (67 from 4).
	head = b.round(60)
	assert.GreaterOrEqual(t, cap(b.rq.inflight[head].Segs), 60, "a chain within the bound keeps its room")
}

// relayChains adds n one-buffer writable chains to the guest ring, relays
// them into the shadow ring and pops them all on the backing device. It
// returns the guest heads in add order and the backing device's chains.
func (b *relayBench) relayChains(n int) ([]uint16, []vring.Chain) {
	b.t.Helper()
	var gheads []uint16
	for i := range n {
		gh, err := b.guest.Add([]vring.Buffer{{Addr: b.data + vring.GuestAddr(64*i), Len: 64, Writable: true}})
		require.NoError(b.t, err)
		gheads = append(gheads, gh)
	}
	b.guest.Publish()
	require.NoError(b.t, b.rq.forward())
	require.NoError(b.t, b.rq.publish())
	var popped []vring.Chain
	for {
		var c vring.Chain
		ok, err := b.backing.Pop(&c)
		require.NoError(b.t, err)
		if !ok {
			break
		}
		popped = append(popped, c)
	}
	require.Len(b.t, popped, n)
	return gheads, popped
}

// TestRelayCompletesInUsedOrder: more chains than one ReclaimBatch takes
// (relayReclaimBatch), used by the backing device in a scrambled order,
// all reach the guest in that order, and the shadow ring ends empty.
func TestRelayCompletesInUsedOrder(t *testing.T) {
	const size, chains = 128, 100
	b := newRelayBench(t, size)
	gheads, popped := b.relayChains(chains)
	guestHeads := map[uint16]int{} // guest head -> chain number
	for i, gh := range gheads {
		guestHeads[gh] = i
	}
	rand.New(rand.NewPCG(3, 4)).Shuffle(len(popped), func(i, j int) { popped[i], popped[j] = popped[j], popped[i] })
	var want []int
	for i, c := range popped {
		require.NoError(t, b.backing.Push(c.Head, uint32(i%64)))
		want = append(want, guestHeads[b.rq.inflight[c.Head].Head])
	}
	require.NoError(t, b.rq.complete())
	require.Zero(t, b.rq.shadow.Outstanding(), "every shadow chain reclaimed")
	var got []int
	for i := range chains {
		head, n, ok, err := b.guest.Reclaim()
		require.NoError(t, err)
		require.True(t, ok, "chain %d", i)
		require.Equal(t, uint32(i%64), n, "the length the backing device wrote")
		got = append(got, guestHeads[head])
	}
	require.Equal(t, want, got)
}

// TestRelayCompleteDeliversBeforeABadEntry: a backing device that reports
// a head twice, after 35 good entries (more than one batch), gets
// ErrUsedIDNotOutstanding from complete, and the 35 good completions
// reach the guest first.
func TestRelayCompleteDeliversBeforeABadEntry(t *testing.T) {
	const size, good = 64, 35
	b := newRelayBench(t, size)
	_, popped := b.relayChains(good + 1)
	var heads []uint16
	for _, c := range popped {
		heads = append(heads, c.Head)
	}
	for _, h := range heads[:good] {
		require.NoError(t, b.backing.Push(h, 0))
	}
	require.NoError(t, b.backing.Push(heads[0], 0)) // used again: not outstanding
	err := b.rq.complete()
	require.ErrorIs(t, err, vring.ErrUsedIDNotOutstanding)
	for i := range good {
		_, _, ok, err := b.guest.Reclaim()
		require.NoError(t, err)
		require.True(t, ok, "completion %d reached the guest", i)
	}
	_, _, ok, err := b.guest.Reclaim()
	require.NoError(t, err)
	require.False(t, ok, "nothing past the bad entry")
}
