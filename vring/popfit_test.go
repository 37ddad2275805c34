package vring

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// addedChain is what a test's driver made available: its head (buffer id
// on a packed ring), its buffers, and whether it went through an indirect
// table.
type addedChain struct {
	head     uint16
	bufs     []Buffer
	indirect bool
}

// TestPopBatchFit drives a split and a packed queue through many laps of
// random traffic (chains of 1 to 6 descriptors, some indirect) and pops
// with PopBatchFit in batches of random length into Chains of random room.
// It checks the rules PopBatchFit promises: the chains come in the order
// the driver made them available, each with its buffers; the Segs of
// cs[1:] are never grown (same room, same array); a batch stops early only
// at the ring's end or before a chain that is indirect or longer than the
// room of the Chain it would go into; an empty ring is (0, nil).
func TestPopBatchFit(t *testing.T) {
	for _, packed := range []bool{false, true} {
		name := "split"
		if packed {
			name = "packed"
		}
		t.Run(name, func(t *testing.T) {
			const size = 32
			feat := virtio.Features(0).With(virtio.FIndirectDesc, virtio.FEventIdx)
			newQ := newPair
			if packed {
				newQ = newPackedPair
			}
			_, drv, dev := newQ(t, size, feat)
			rng := rand.New(rand.NewPCG(61, 7))
			var fifo []addedChain // made available, not popped yet
			var popped []Chain    // popped, not pushed yet
			seq := 0
			stoppedBefore := map[string]int{}
			for round := 0; round < 3000; round++ {
				// The driver adds chains while it has room (and wants to).
				for drv.NumFree() > 0 && rng.IntN(4) != 0 {
					nd := 1 + rng.IntN(6)
					if rng.IntN(3) == 0 {
						nd = 1
					}
					bufs := make([]Buffer, nd)
					w := rng.IntN(nd + 1) // the first w are readable
					for k := range bufs {
						bufs[k] = Buffer{Addr: GuestAddr(0x100000 + 0x1000*(seq%64) + 64*k), Len: uint32(1 + rng.IntN(64)), Writable: k >= w}
					}
					a := addedChain{bufs: bufs}
					var err error
					if rng.IntN(6) == 0 {
						a.indirect = true
						a.head, err = drv.AddIndirect(GuestAddr(0x300000+0x200*(seq%64)), bufs)
					} else if nd <= drv.NumFree() {
						a.head, err = drv.Add(bufs)
					} else {
						break
					}
					require.NoError(t, err)
					fifo = append(fifo, a)
					seq++
				}
				drv.Publish()

				// The device pops a batch.
				cs := make([]Chain, 1+rng.IntN(8))
				room := make([]int, len(cs))
				arrays := make([]*Segment, len(cs))
				for k := range cs {
					room[k] = rng.IntN(7)
					cs[k].Segs = make([]Segment, 0, room[k])
					arrays[k] = unsafe.SliceData(cs[k].Segs[:cap(cs[k].Segs)])
				}
				n, err := dev.PopBatchFit(cs)
				require.NoError(t, err)
				require.LessOrEqual(t, n, len(fifo), "round %d: more chains than were made available", round)
				if len(fifo) == 0 {
					require.Zero(t, n, "round %d: an empty ring", round)
				}
				for k := range n {
					want := fifo[k]
					c := &cs[k]
					require.Equal(t, want.head, c.Head, "round %d chain %d", round, k)
					require.Len(t, c.Segs, len(want.bufs), "round %d chain %d", round, k)
					for j, b := range want.bufs {
						s := c.Segs[j]
						require.Equal(t, b.Addr, s.Addr, "round %d chain %d segment %d", round, k, j)
						require.Equal(t, b.Len, s.Len)
						require.Equal(t, b.Writable, s.Writable)
						require.Len(t, s.Buf, int(b.Len))
					}
					if k > 0 {
						require.Equal(t, room[k], cap(c.Segs), "round %d: chain %d's Segs grew", round, k)
						if room[k] > 0 {
							require.Same(t, arrays[k], unsafe.SliceData(c.Segs[:cap(c.Segs)]), "round %d: chain %d's Segs is another array", round, k)
						}
					}
				}
				if n < len(cs) && n < len(fifo) {
					// Stopped early with chains left: only before one
					// that is indirect or does not fit, and never at the
					// first (which is popped as Pop pops it).
					require.NotZero(t, n, "round %d: the first chain was left", round)
					next := fifo[n]
					switch {
					case next.indirect:
						stoppedBefore["indirect"]++
					case len(next.bufs) > room[n]:
						stoppedBefore["too long"]++
					case packed && int(dev.State().AvailIndex())+len(next.bufs) > size:
						stoppedBefore["wraps"]++ // packedWalkRun leaves those to packedWalk
					default:
						require.Failf(t, "stopped early", "round %d: stopped before chain %d (%d direct descriptors, room %d)", round, n, len(next.bufs), room[n])
					}
				} else if n < len(cs) {
					stoppedBefore["ring end"]++
				}
				fifo = fifo[n:]
				popped = append(popped, cs[:n]...)

				// The device pushes some of what it popped, in order; the
				// driver reclaims it.
				push := rng.IntN(len(popped) + 1)
				for k := range push {
					require.NoError(t, dev.PushChain(&popped[k], 0))
				}
				popped = popped[push:]
				for {
					_, _, ok, err := drv.Reclaim()
					require.NoError(t, err)
					if !ok {
						break
					}
				}
			}
			t.Logf("batches stopped early: %v", stoppedBefore)
			for _, why := range []string{"indirect", "too long", "ring end"} {
				require.NotZero(t, stoppedBefore[why], "no batch stopped before: %s", why)
			}
		})
	}
}

// TestPopBatchFitLeavesBrokenRules: a chain after the first that breaks a
// rule ends the batch without an error; the next call, which takes it as
// Pop does, reports the typed error and breaks the queue.
func TestPopBatchFitLeavesBrokenRules(t *testing.T) {
	cases := []struct {
		name   string
		packed bool
		want   error
	}{
		{"split head out of range", false, ErrHeadOutOfRange},
		{"packed buffer id out of range", true, ErrBufferIDOutOfRange},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			const size = 8
			newQ := newPair
			if tc.packed {
				newQ = newPackedPair
			}
			mem, drv, dev := newQ(t, size, 0)
			for k := range 3 {
				_, err := drv.Add([]Buffer{{Addr: GuestAddr(0x100000 + 0x100*k), Len: 64, Writable: true}})
				require.NoError(t, err)
			}
			drv.Publish()
			// The second chain made available breaks a rule.
			if tc.packed {
				var id [2]byte
				binary.LittleEndian.PutUint16(id[:], size+3)
				require.NoError(t, mem.Write(0x1000+16*1+12, id[:])) // descriptor 1's id
			} else {
				l := ContiguousLayout(0x1000, size)
				var head [2]byte
				binary.LittleEndian.PutUint16(head[:], size+3)
				require.NoError(t, mem.Write(l.Avail+4+2*1, head[:])) // avail.ring[1]
			}
			cs := make([]Chain, 4)
			for k := range cs {
				cs[k].Segs = make([]Segment, 0, 4)
			}
			n, err := dev.PopBatchFit(cs)
			require.NoError(t, err, "the first chain is good: the batch ends before the bad one")
			require.Equal(t, 1, n)
			n, err = dev.PopBatchFit(cs)
			require.Zero(t, n)
			require.ErrorIs(t, err, tc.want)
			var qe *QueueError
			require.True(t, errors.As(err, &qe))
			_, err = dev.PopBatchFit(cs)
			require.ErrorIs(t, err, ErrQueueBroken)
		})
	}
}

// TestPopBatchFitGrowsOnlyTheFirst: a chain longer than the room of the
// Chain it goes into is popped only as a batch's first (Segs grows, as
// with Pop); a batch that reaches it stops before it.
func TestPopBatchFitGrowsOnlyTheFirst(t *testing.T) {
	for _, packed := range []bool{false, true} {
		newQ := newPair
		if packed {
			newQ = newPackedPair
		}
		_, drv, dev := newQ(t, 16, 0)
		long := make([]Buffer, 9)
		for k := range long {
			long[k] = Buffer{Addr: GuestAddr(0x100000 + 0x100*k), Len: 16, Writable: true}
		}
		_, err := drv.Add(long[:1])
		require.NoError(t, err)
		_, err = drv.Add(long)
		require.NoError(t, err)
		drv.Publish()
		cs := make([]Chain, 4)
		for k := range cs {
			cs[k].Segs = make([]Segment, 0, 4)
		}
		n, err := dev.PopBatchFit(cs)
		require.NoError(t, err)
		require.Equal(t, 1, n, "packed %v: the long chain does not fit cs[1]", packed)
		require.Equal(t, 4, cap(cs[1].Segs))
		n, err = dev.PopBatchFit(cs)
		require.NoError(t, err)
		require.Equal(t, 1, n, "packed %v", packed)
		require.Len(t, cs[0].Segs, 9, "packed %v: the first chain grows its Segs", packed)
		n, err = dev.PopBatchFit(cs)
		require.NoError(t, err)
		require.Zero(t, n, "packed %v: empty", packed)
	}
}

// TestPopBatchFitArmsOnlyWhenEmpty: with EVENT_IDX and notifications on, a
// short batch (chains popped, then the ring found empty) leaves
// avail_event alone, and the call that pops nothing arms it at the next
// avail index, as Pop does (split ring: avail_event is the used ring's
// last word; packed: the device event suppression area).
func TestPopBatchFitArmsOnlyWhenEmpty(t *testing.T) {
	for _, packed := range []bool{false, true} {
		feat := virtio.Features(0).With(virtio.FEventIdx)
		newQ := newPair
		event := func(mem *Memory) uint32 {
			var b [2]byte
			l := ContiguousLayout(0x1000, 8)
			require.NoError(t, mem.Read(l.Used+4+8*8, b[:]))
			return uint32(binary.LittleEndian.Uint16(b[:]))
		}
		if packed {
			newQ = newPackedPair
			event = func(mem *Memory) uint32 {
				var b [4]byte
				l := ContiguousPackedLayout(0x1000, 8)
				require.NoError(t, mem.Read(l.Used, b[:])) // device event: off_wrap, flags
				return binary.LittleEndian.Uint32(b[:])
			}
		}
		mem, drv, dev := newQ(t, 8, feat)
		for k := range 3 {
			_, err := drv.Add([]Buffer{{Addr: GuestAddr(0x100000 + 0x100*k), Len: 64, Writable: true}})
			require.NoError(t, err)
		}
		drv.Publish()
		before := event(mem)
		cs := make([]Chain, 8)
		for k := range cs {
			cs[k].Segs = make([]Segment, 0, 2)
		}
		n, err := dev.PopBatchFit(cs)
		require.NoError(t, err)
		require.Equal(t, 3, n)
		require.Equal(t, before, event(mem), "packed %v: a batch that popped chains does not arm the event", packed)
		n, err = dev.PopBatchFit(cs)
		require.NoError(t, err)
		require.Zero(t, n)
		// Armed at the next avail index (3): a split ring's avail_event;
		// a packed ring's off_wrap (wrap counter 1) with flags DESC (2).
		want := uint32(3)
		if packed {
			want = 3 | uint32(PackedWrapBit) | 2<<16
		}
		require.Equal(t, want, event(mem), "packed %v: finding the ring empty arms the event", packed)
	}
}
