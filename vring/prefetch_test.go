package vring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestPrefetchRange is the table of what Prefetch asks for of one
// descriptor's buffer: the lines of its first 128 bytes, counted on host
// addresses, never a line past the region, nothing for what Pop's fast
// path would not read directly.
func TestPrefetchRange(t *testing.T) {
	const base, size = GuestAddr(0x10000), 0x1000
	for _, tc := range []struct {
		name   string
		host   uint64 // the region's host address
		addr   GuestAddr
		length uint32
		flags  uint16
		off    uint64
		lines  int
		ok     bool
	}{
		{"one byte at a line start", 0x7f0000000000, base, 1, 0, 0, 1, true},
		{"a line exactly", 0x7f0000000000, base + 0x40, 64, 0, 0x40, 1, true},
		{"header and 64-byte frame from a line start", 0x7f0000000000, base, 76, 0, 0, 2, true},
		{"header and 64-byte frame from byte 52 (a mergeable receive buffer)", 0x7f0000000000, base + 0x34, 2048, DescFWrite, 0x34, 3, true},
		{"a long buffer from a line start: two lines", 0x7f0000000000, base + 0x80, 1500, 0, 0x80, 2, true},
		{"a long buffer from the last byte of a line: three lines", 0x7f0000000000, base + 0x3f, 1500, DescFWrite, 0x3f, 3, true},
		{"lines follow the host address, not the guest address", 0x7f0000000010, base + 0x30, 16, 0, 0x30, 1, true},
		{"same, crossing on the host", 0x7f0000000010, base + 0x2c, 8, 0, 0x2c, 2, true},
		{"clamped at the region's end", 0x7f0000000000, base + size - 1, 4096, DescFWrite, size - 1, 1, true},
		{"clamped at the region's end, two lines left", 0x7f0000000000, base + size - 0x41, 4096, 0, size - 0x41, 2, true},
		{"next flag is irrelevant", 0x7f0000000000, base, 64, DescFNext, 0, 1, true},
		{"empty buffer", 0x7f0000000000, base, 0, 0, 0, 0, false},
		{"indirect table", 0x7f0000000000, base, 64, DescFIndirect, 0, 0, false},
		{"before the region", 0x7f0000000000, base - 1, 64, 0, 0, 0, false},
		{"at the region's end", 0x7f0000000000, base + size, 64, 0, 0, 0, false},
		{"far past it", 0x7f0000000000, ^GuestAddr(0), 0xffffffff, DescFWrite, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			off, lines, ok := prefetchRange(size, tc.host, base, tc.addr, tc.length, tc.flags)
			require.Equal(t, tc.ok, ok)
			if !ok {
				return
			}
			require.Equal(t, tc.off, off)
			require.Equal(t, tc.lines, lines)
			// The invariant behind the table: the last line asked for
			// starts inside the region (the first holds byte off).
			first := (tc.host + off) &^ (cacheLine - 1)
			last := first + uint64(lines-1)*cacheLine
			require.Less(t, last, tc.host+size)
			require.LessOrEqual(t, first, tc.host+off)
		})
	}
}

// TestPrefetchCounts checks what Prefetch reports on split and packed
// queues: the chains available and not yet taken, at most n, each chain
// once however many descriptors it has, nothing on a broken queue.
func TestPrefetchCounts(t *testing.T) {
	for _, packed := range []bool{false, true} {
		t.Run(map[bool]string{false: "split", true: "packed"}[packed], func(t *testing.T) {
			var drv *DriverQueue
			var dev *DeviceQueue
			if packed {
				_, drv, dev = newPackedPair(t, 8, 0)
			} else {
				_, drv, dev = newPair(t, 8, 0)
			}
			require.Zero(t, dev.Prefetch(4), "empty ring")
			tx := []Buffer{{Addr: 0x100000, Len: 76}}
			req := []Buffer{{Addr: 0x100100, Len: 16}, {Addr: 0x100200, Len: 32, Writable: true}, {Addr: 0x100300, Len: 8, Writable: true}}
			for _, bufs := range [][]Buffer{tx, req, tx} { // 5 descriptors, 3 chains
				_, err := drv.Add(bufs)
				require.NoError(t, err)
			}
			require.Zero(t, dev.Prefetch(4), "added but not published")
			drv.Publish()
			require.Equal(t, 3, dev.Prefetch(4))
			require.Equal(t, 2, dev.Prefetch(2))
			require.Equal(t, 1, dev.Prefetch(1))
			require.Zero(t, dev.Prefetch(0))
			require.Zero(t, dev.Prefetch(-1))
			var c Chain
			ok, err := dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, 2, dev.Prefetch(4), "one taken")
			ok, err = dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.Len(t, c.Segs, 3, "the three-descriptor chain")
			require.Equal(t, 1, dev.Prefetch(4))
			// Round the ring several times: the count follows wraps.
			for round := 0; round < 10; round++ {
				ok, err = dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				require.NoError(t, dev.PushChain(&c, 0))
				reclaimAll(t, drv)
				for _, bufs := range [][]Buffer{tx, req} {
					_, err := drv.Add(bufs)
					require.NoError(t, err)
				}
				drv.Publish()
				require.Equal(t, 2, dev.Prefetch(8), "round %d", round)
				ok, err = dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				require.NoError(t, dev.PushChain(&c, 0))
				require.Equal(t, 1, dev.Prefetch(8), "round %d", round)
			}
		})
	}
}

// TestPrefetchLeavesRuleBreakingToPop: an avail.idx that jumps past the
// ring is not Prefetch's to report. It prefetches nothing and the queue
// stays as it was, and the next Pop reports the jump.
func TestPrefetchLeavesRuleBreakingToPop(t *testing.T) {
	mem, _, dev := newPair(t, 8, 0)
	l := ContiguousLayout(0x1000, 8)
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], 9) // 9 chains on a ring of 8
	require.NoError(t, mem.Write(l.Avail+2, idx[:]))
	before := snapshotQueue(dev)
	require.Zero(t, dev.Prefetch(4))
	require.Equal(t, before, snapshotQueue(dev))
	var c Chain
	_, err := dev.Pop(&c)
	require.ErrorIs(t, err, ErrAvailIdxJump)
	require.Zero(t, dev.Prefetch(4), "broken queue")
}

// TestPrefetchChangesNothing runs Prefetch on random rings full of hostile
// descriptors (addresses anywhere, empty and indirect buffers, heads and
// links out of range, loops), split and packed: it never panics, never
// writes guest memory and leaves the queue exactly as it was, so Pop and
// its errors are the same with or without it.
func TestPrefetchChangesNothing(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 4))
	for iter := 0; iter < 4000; iter++ {
		packed := iter%2 == 1
		size := uint16(1) << rng.IntN(5)
		backing := make([]byte, 0x4000)
		for i := range backing[:0x2000] {
			backing[i] = byte(rng.Uint32())
		}
		r1, err := NewRegion(0x1000, backing[:0x2000:0x2000], nil)
		require.NoError(t, err)
		r2, err := NewRegion(0x3000, backing[0x2000:], nil)
		require.NoError(t, err)
		mem, err := NewMemory(r1, r2)
		require.NoError(t, err)
		feat := virtio.Features(0).With(virtio.FIndirectDesc)
		var l Layout
		var state QueueState
		if packed {
			feat = feat.With(virtio.FRingPacked)
			l = ContiguousPackedLayout(0x1000, size)
			state.NextAvail = PackedIndex(uint16(rng.IntN(int(size))), rng.IntN(2) == 0)
			state.NextUsed = state.NextAvail
		} else {
			l = ContiguousLayout(0x1000, size)
			state.NextAvail = uint16(rng.Uint32())
			state.NextUsed = state.NextAvail
			// avail.idx near the start, sometimes past the ring.
			binary.LittleEndian.PutUint16(backing[l.Avail-0x1000+2:], state.NextAvail+uint16(rng.IntN(int(size)+3)))
		}
		dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat, State: state})
		require.NoError(t, err)
		var c Chain
		for step := 0; step < 2*int(size)+2; step++ {
			snapshot := bytes.Clone(backing)
			before := snapshotQueue(dev)
			n := rng.IntN(int(size) + 2)
			got := dev.Prefetch(n)
			require.GreaterOrEqual(t, got, 0)
			require.LessOrEqual(t, got, max(n, 0))
			require.Equal(t, before, snapshotQueue(dev), "iteration %d step %d: Prefetch changed the queue", iter, step)
			require.Equal(t, snapshot, backing, "iteration %d step %d: Prefetch wrote guest memory", iter, step)
			ok, err := dev.Pop(&c)
			if err != nil {
				var qe *QueueError
				require.True(t, errors.As(err, &qe), "%v", err)
				require.Zero(t, dev.Prefetch(n), "broken queue")
				break
			}
			if !ok {
				break
			}
			if got == 0 && n > 0 && !packed {
				t.Fatalf("iteration %d step %d: Pop took a chain Prefetch did not count", iter, step)
			}
		}
	}
}

// queueSnapshot is a DeviceQueue's state by value, but for Prefetch's
// record of how far it has asked: the queue struct and, for a packed
// queue, its packedDevice with its own copy of the ids table (the struct
// alone holds pointers, which compare equal whatever they point to now).
type queueSnapshot struct {
	q   DeviceQueue
	pk  packedDevice
	ids []packedID
}

func snapshotQueue(q *DeviceQueue) queueSnapshot {
	s := queueSnapshot{q: *q}
	s.q.pk = nil
	s.q.prefetched = 0 // Prefetch's own record
	if q.pk != nil {
		s.pk = *q.pk
		s.ids = slices.Clone(q.pk.ids)
		s.pk.ids = nil
		s.pk.pfSeq, s.pk.pfIdx, s.pk.pfBits = 0, 0, 0
	}
	return s
}

// TestPrefetchTargets checks what Prefetch asks for, chain by chain, on
// split and packed rings: the first buffer of each chain (readable or
// writable, as its descriptor says), the lines of its first 128 bytes,
// nothing for an indirect chain (counted all the same), nothing before
// the queue has a cached region.
func TestPrefetchTargets(t *testing.T) {
	type target struct {
		addr  GuestAddr
		lines int
		write bool
	}
	for _, packed := range []bool{false, true} {
		t.Run(map[bool]string{false: "split", true: "packed"}[packed], func(t *testing.T) {
			feat := virtio.Features(0).With(virtio.FIndirectDesc)
			var drv *DriverQueue
			var dev *DeviceQueue
			if packed {
				_, drv, dev = newPackedPair(t, 16, feat)
			} else {
				_, drv, dev = newPair(t, 16, feat)
			}
			var got []target
			dev.prefetchTrace = func(addr GuestAddr, lines int, write bool) {
				got = append(got, target{addr, lines, write})
			}
			add := func(bufs ...Buffer) {
				t.Helper()
				_, err := drv.Add(bufs)
				require.NoError(t, err)
			}
			add(Buffer{Addr: 0x100000, Len: 64})
			drv.Publish()
			require.Equal(t, 1, dev.Prefetch(8))
			require.Empty(t, got, "no cached region before the first walk")
			var c Chain
			ok, err := dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)

			add(Buffer{Addr: 0x100034, Len: 76})                                                  // header and frame from byte 52: 2 lines
			add(Buffer{Addr: 0x100834, Len: 2048, Writable: true})                                // a receive buffer: 3 lines, for writing
			add(Buffer{Addr: 0x101000, Len: 16}, Buffer{Addr: 0x102000, Len: 64, Writable: true}) // first descriptor only
			_, err = drv.AddIndirect(0x103000, []Buffer{{Addr: 0x104000, Len: 64}})
			require.NoError(t, err)
			add(Buffer{Addr: 0x105000, Len: 4096, Writable: true}) // from a line start: 2 lines
			drv.Publish()
			require.Equal(t, 5, dev.Prefetch(8))
			require.Equal(t, []target{
				{0x100034, 2, false},
				{0x100834, 3, true},
				{0x101000, 1, false},
				{0x105000, 2, true},
			}, got)

			got = nil
			require.Equal(t, 2, dev.Prefetch(2), "n bounds the chains")
			require.Empty(t, got, "asked for already")
			require.Equal(t, 5, dev.Prefetch(8))
			require.Empty(t, got, "asked for already")

			for range 3 {
				ok, err := dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
			}
			require.Equal(t, 2, dev.Prefetch(8), "from the next chain Pop takes")
			require.Empty(t, got, "asked for already")
		})
	}
}

// TestPrefetchKeepsADistance: Prefetch(d) after every Pop asks for exactly
// one new chain each time, d chains ahead of the one taken, on split and
// packed rings and across the ring's wrap; a reset forgets how far it had
// asked.
func TestPrefetchKeepsADistance(t *testing.T) {
	for _, packed := range []bool{false, true} {
		t.Run(map[bool]string{false: "split", true: "packed"}[packed], func(t *testing.T) {
			const size, d = 8, 3
			var drv *DriverQueue
			var dev *DeviceQueue
			if packed {
				_, drv, dev = newPackedPair(t, size, 0)
			} else {
				_, drv, dev = newPair(t, size, 0)
			}
			var got []GuestAddr
			dev.prefetchTrace = func(addr GuestAddr, _ int, _ bool) { got = append(got, addr) }
			addrOf := func(k int) GuestAddr { return GuestAddr(0x100000 + 0x100*(k%64)) }
			added, popped := 0, 0
			fill := func() {
				for drv.NumFree() > 0 {
					_, err := drv.Add([]Buffer{{Addr: addrOf(added), Len: 64, Writable: true}})
					require.NoError(t, err)
					added++
				}
				drv.Publish()
			}
			fill()
			var c Chain
			ok, err := dev.Pop(&c) // the first walk sets the cached region
			require.NoError(t, err)
			require.True(t, ok)
			require.NoError(t, dev.PushChain(&c, 0))
			popped++
			require.Equal(t, d, dev.Prefetch(d))
			require.Equal(t, []GuestAddr{addrOf(1), addrOf(2), addrOf(3)}, got)
			for round := 0; round < 5*size; round++ {
				got = nil
				ok, err := dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				require.Equal(t, addrOf(popped), c.Segs[0].Addr)
				popped++
				require.Equal(t, d, dev.Prefetch(d), "round %d", round)
				require.Equal(t, []GuestAddr{addrOf(popped + d - 1)}, got, "round %d: one new chain, %d ahead", round, d)
				require.NoError(t, dev.PushChain(&c, 0))
				reclaimAll(t, drv)
				fill()
			}
			dev.Reset()
			if packed {
				require.Equal(t, dev.pk.popSeq, dev.pk.pfSeq, "a reset forgets how far Prefetch had asked")
			} else {
				require.Equal(t, dev.lastAvail, dev.prefetched, "a reset forgets how far Prefetch had asked")
			}
		})
	}
}

// reclaimAll reclaims every chain the device has used.
func reclaimAll(t *testing.T, drv *DriverQueue) {
	t.Helper()
	for {
		_, _, ok, err := drv.Reclaim()
		require.NoError(t, err)
		if !ok {
			return
		}
	}
}

// checkPrefetch calls dev.Prefetch(n) and fails t unless the count is in
// range and the queue's state, but for Prefetch's own record, is as it was:
// a hint must change nothing Pop sees (the ring-walk fuzzers call it).
func checkPrefetch(t *testing.T, dev *DeviceQueue, n int) {
	t.Helper()
	before := snapshotQueue(dev)
	if got := dev.Prefetch(n); got < 0 || got > n {
		t.Fatalf("Prefetch(%d) = %d", n, got)
	}
	if !reflect.DeepEqual(before, snapshotQueue(dev)) {
		t.Fatal("Prefetch changed the queue")
	}
}

// TestPrefetchReadableTarget is the table of the byte PrefetchReadable asks
// for: byte off of the readable segments taken in order, across segment
// boundaries, never a writable segment's, nothing past the readable bytes,
// and a Readable its holder set out of range clamped to the segments.
func TestPrefetchReadableTarget(t *testing.T) {
	mem := make([]byte, 256)
	seg := func(from, n int, w bool) Segment {
		return Segment{Addr: GuestAddr(from), Len: uint32(n), Writable: w, Buf: mem[from : from+n]}
	}
	split := Chain{Segs: []Segment{seg(0, 12, false), seg(64, 60, false), seg(128, 100, true)}, Readable: 2}
	one := Chain{Segs: []Segment{seg(16, 76, false)}, Readable: 1}
	tests := []struct {
		name string
		c    Chain
		off  uint64
		want int // index into mem, -1 for none
	}{
		{"first byte", one, 0, 16},
		{"after a 12-byte header in the same buffer", one, 12, 28},
		{"last readable byte", one, 75, 91},
		{"one past the readable bytes", one, 76, -1},
		{"far past", one, 1 << 40, -1},
		{"header in a segment of its own: the frame's first byte is the next segment's", split, 12, 64},
		{"inside the first segment", split, 11, 11},
		{"last readable byte of the second segment", split, 71, 123},
		{"the writable segment is not readable", split, 72, -1},
		{"no readable segments", Chain{Segs: split.Segs}, 0, -1},
		{"negative Readable", Chain{Segs: split.Segs, Readable: -3}, 0, -1},
		{"Readable beyond Segs is clamped", Chain{Segs: one.Segs, Readable: 5}, 80, -1},
		{"Readable beyond Segs still finds the segments it has", Chain{Segs: one.Segs, Readable: 5}, 3, 19},
		{"no segments", Chain{}, 0, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.c
			got := c.readableAt(tt.off)
			if tt.want < 0 {
				require.Nil(t, got)
			} else {
				require.Same(t, &mem[tt.want], got)
			}
			require.NotPanics(t, func() { c.PrefetchReadable(tt.off) })
		})
	}
}
