package vring

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

func TestPackedLayoutValidate(t *testing.T) {
	f := fPacked
	ok := ContiguousPackedLayout(0x10000, 3)
	require.NoError(t, ok.ValidateFor(f))
	assert.Error(t, ok.Validate(), "as a split layout: size 3 is not a power of two")
	for _, size := range []uint16{1, 3, 5, 255, 1000, 32767, 32768} {
		assert.NoError(t, ContiguousPackedLayout(0, size).ValidateFor(f), "size %d", size)
		assert.True(t, ValidPackedQueueSize(size))
	}
	for _, size := range []uint16{0, 32769, 65535} {
		assert.ErrorIs(t, ContiguousPackedLayout(0, size).ValidateFor(f), ErrQueueSize, "size %d", size)
		assert.False(t, ValidPackedQueueSize(size))
	}
	for name, tc := range map[string]struct {
		l    Layout
		want error
	}{
		"descriptor ring 16-aligned":         {Layout{Size: 4, Desc: 0x1008, Avail: 0x2000, Used: 0x3000}, ErrMisaligned},
		"driver area 4-aligned":              {Layout{Size: 4, Desc: 0x1000, Avail: 0x2002, Used: 0x3000}, ErrMisaligned},
		"device area 4-aligned":              {Layout{Size: 4, Desc: 0x1000, Avail: 0x2000, Used: 0x3001}, ErrMisaligned},
		"driver area inside descriptor ring": {Layout{Size: 4, Desc: 0x1000, Avail: 0x1030, Used: 0x3000}, ErrRingOverlap},
		"device area on driver area":         {Layout{Size: 4, Desc: 0x1000, Avail: 0x2000, Used: 0x2000}, ErrRingOverlap},
		"descriptor ring overflows":          {Layout{Size: 4, Desc: ^GuestAddr(0) &^ 15, Avail: 0x2000, Used: 0x3000}, ErrOverflow},
	} {
		assert.ErrorIs(t, tc.l.ValidateFor(f), tc.want, name)
	}
	// Areas sized 16*n, 4, 4: adjacent areas are fine.
	require.NoError(t, Layout{Size: 2, Desc: 0x1000, Avail: 0x1020, Used: 0x1024}.ValidateFor(f))
	d, a, u := RingSizes(7, f)
	assert.Equal(t, [3]uint64{112, 4, 4}, [3]uint64{d, a, u})
	l := ContiguousPackedLayout(0x40000, 5)
	assert.Equal(t, Layout{Size: 5, Desc: 0x40000, Avail: 0x40080, Used: 0x400c0}, l)
	assert.Equal(t, uint64(0xc4), ContiguousPackedLayoutBytes(5))
	assert.Equal(t, l, LayoutFor(0x40000, 5, f))
	assert.Equal(t, ContiguousLayout(0x40000, 8), LayoutFor(0x40000, 8, 0))
}

func TestPackedStateEncoding(t *testing.T) {
	assert.Equal(t, QueueState{}, InitialState(0))
	assert.Equal(t, QueueState{NextAvail: 0x8000, NextUsed: 0x8000}, InitialState(fPacked))
	assert.Equal(t, uint16(0x8005), PackedIndex(5, true))
	assert.Equal(t, uint16(0x7fff), PackedIndex(0x7fff, false))
	idx, wrap := PackedPosition(0x8123)
	assert.Equal(t, uint16(0x123), idx)
	assert.True(t, wrap)
	st := QueueState{NextAvail: PackedIndex(3, false), NextUsed: PackedIndex(9, true)}
	assert.Equal(t, uint16(3), st.AvailIndex())
	assert.False(t, st.AvailWrap())
	assert.Equal(t, uint16(9), st.UsedIndex())
	assert.True(t, st.UsedWrap())
	for _, tc := range []struct {
		avail, used uint16
		size        uint16
		n           uint16
		ok          bool
	}{
		{0x8000, 0x8000, 4, 0, true},
		{0x8003, 0x8001, 4, 2, true},
		{0x0001, 0x8003, 4, 2, true},  // avail wrapped, used not yet
		{0x0003, 0x8003, 4, 4, true},  // a full ring in flight
		{0x0000, 0x0000, 4, 0, true},  // index 0 after an odd number of laps
		{0x0004, 0x0000, 4, 0, false}, // index >= size
		{0x8000, 0x8004, 4, 0, false},
		{0x8001, 0x8003, 4, 0, false}, // avail behind used
		{0x0003, 0x8001, 4, 0, false}, // more than a lap ahead
		{0x8000, 0x8000, 0, 0, false},
	} {
		st := QueueState{NextAvail: tc.avail, NextUsed: tc.used}
		n, ok := st.PackedInFlight(tc.size)
		assert.Equal(t, tc.ok, ok, "%+v size %d", st, tc.size)
		assert.Equal(t, tc.n, n, "%+v size %d", st, tc.size)
	}
}

// TestPackedBack: moving a packed position back by n descriptors stays in
// the lap while the index allows it and flips the wrap counter where it
// crosses the ring's start; moving forward by the same amount (as a device
// popping those descriptors again would, PackedInFlight from the moved-back
// position) comes back to where it started.
func TestPackedBack(t *testing.T) {
	w := PackedWrapBit
	cases := []struct {
		name       string
		v, n, size uint16
		want       uint16
	}{
		{"nothing", w | 3, 0, 7, w | 3},
		{"within the lap", w | 5, 2, 7, w | 3},
		{"to index 0", 4, 4, 7, 0},
		{"across the start, wrap 1 to 0", w, 1, 7, 6},
		{"across the start, wrap 0 to 1", 1, 3, 7, w | 5},
		{"a whole ring", w | 2, 7, 7, 2},
		{"largest ring", 0, 1, 32768, w | 32767},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := PackedBack(tc.v, tc.n, tc.size)
			assert.Equal(t, tc.want, got, "PackedBack(%#x, %d, %d)", tc.v, tc.n, tc.size)
			n, ok := QueueState{NextAvail: tc.v, NextUsed: got}.PackedInFlight(tc.size)
			require.True(t, ok)
			assert.Equal(t, tc.n, n, "descriptors between the moved-back position and the start")
		})
	}
}

func TestPackedConstructorChecks(t *testing.T) {
	mem, _, _ := newPackedPair(t, 4, 0)
	l := ContiguousPackedLayout(0x1000, 4)
	_, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: fPacked, State: QueueState{NextAvail: 0x8001, NextUsed: 0x8002}})
	assert.ErrorIs(t, err, ErrInvalidState)
	_, err = NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: fPacked, State: QueueState{NextAvail: 4, NextUsed: 4}})
	assert.ErrorIs(t, err, ErrInvalidState, "index >= size")
	_, err = NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousPackedLayout(4<<20-64, 4), Features: fPacked})
	assert.ErrorIs(t, err, ErrOutOfRange)
	_, err = NewDriverQueue(mem, DriverQueueOptions{Layout: Layout{Size: 4, Desc: 0x1000, Avail: 0x1002, Used: 0x2000}, Features: fPacked})
	assert.ErrorIs(t, err, ErrMisaligned)
	_, err = NewDeviceQueue(nil, DeviceQueueOptions{Layout: l, Features: fPacked})
	assert.ErrorIs(t, err, ErrInvalidRegion)
}

// popAll pops every available chain.
func popAll(t *testing.T, dev *DeviceQueue) []Chain {
	t.Helper()
	var out []Chain
	for {
		var c Chain
		ok, err := dev.Pop(&c)
		require.NoError(t, err)
		if !ok {
			return out
		}
		out = append(out, c)
	}
}

func addN(t *testing.T, drv *DriverQueue, ndesc int, writable uint32) uint16 {
	t.Helper()
	bufs := make([]Buffer, ndesc)
	for i := range bufs {
		bufs[i] = Buffer{Addr: GuestAddr(0x100000 + 0x1000*i), Len: 16}
	}
	bufs[ndesc-1] = Buffer{Addr: 0x200000, Len: writable, Writable: true}
	id, err := drv.Add(bufs)
	require.NoError(t, err)
	return id
}

// TestPackedOutOfOrderCompletion: chains used in another order than made
// available; the driver follows the used descriptors by id and skips by
// each chain's descriptor count.
func TestPackedOutOfOrderCompletion(t *testing.T) {
	for _, size := range []uint16{7, 8, 9} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			_, drv, dev := newPackedPair(t, size, 0)
			for round := range 30 {
				a := addN(t, drv, 2, 10)
				b := addN(t, drv, 1, 20)
				c := addN(t, drv, 3, 30)
				drv.Publish()
				cs := popAll(t, dev)
				require.Len(t, cs, 3)
				require.Equal(t, []uint16{2, 1, 3}, []uint16{cs[0].Descs, cs[1].Descs, cs[2].Descs})
				// Complete c, a, b.
				require.NoError(t, dev.Push(c, 3))
				require.NoError(t, dev.PushBatch([]UsedElem{{a, 1}, {b, 2}}))
				for _, want := range []struct {
					id uint16
					n  uint32
				}{{c, 3}, {a, 1}, {b, 2}} {
					id, n, ok, err := drv.Reclaim()
					require.NoError(t, err, "round %d", round)
					require.True(t, ok)
					require.Equal(t, want.id, id)
					require.Equal(t, want.n, n)
				}
				_, _, ok, err := drv.Reclaim()
				require.NoError(t, err)
				require.False(t, ok)
				require.Equal(t, int(size), drv.NumFree())
			}
		})
	}
}

// TestPackedInOrderBatch: with IN_ORDER, PushBatch writes a used
// descriptor per chain, where the chain began, and the driver returns each
// of them, over many wraps.
func TestPackedInOrderBatch(t *testing.T) {
	f := virtio.Features(0).With(virtio.FInOrder)
	mem, drv, dev := newPackedPair(t, 10, f)
	raw := mem.Regions()[0].Bytes()
	l := ContiguousPackedLayout(0x1000, 10)
	usedFlagsAt := func(i int) uint16 {
		return uint16(raw[int(l.Desc)+16*i+14]) | uint16(raw[int(l.Desc)+16*i+15])<<8
	}
	for round := range 7 { // 7 rounds of 9 descriptors on a size-10 ring
		tx1 := addN(t, drv, 2, 0) // nothing writable: "used completely" with 0
		tx2 := addN(t, drv, 1, 0)
		rx := addN(t, drv, 2, 64)
		tx3 := addN(t, drv, 2, 0)
		rx2 := addN(t, drv, 2, 64)
		drv.Publish()
		cs := popAll(t, dev)
		require.Len(t, cs, 5)
		before := dev.State()
		require.NoError(t, dev.PushBatch([]UsedElem{{tx1, 0}, {tx2, 0}, {rx, 10}, {tx3, 0}, {rx2, 64}}))
		// One used descriptor per chain, where it began (no grouping:
		// see packedPushBatch).
		idAt := func(i int) uint16 { return uint16(raw[int(l.Desc)+16*i+12]) | uint16(raw[int(l.Desc)+16*i+13])<<8 }
		s := int(before.UsedIndex())
		for _, u := range []struct {
			pos int
			id  uint16
		}{{s, tx1}, {(s + 2) % 10, tx2}, {(s + 3) % 10, rx}, {(s + 5) % 10, tx3}, {(s + 7) % 10, rx2}} {
			wrap := before.UsedWrap() != (u.pos < s)
			want := uint16(0)
			if wrap {
				want = DescFAvail | DescFUsed
			}
			assert.Equal(t, want, usedFlagsAt(u.pos)&(DescFAvail|DescFUsed), "round %d pos %d", round, u.pos)
			assert.Equal(t, u.id, idAt(u.pos), "round %d pos %d", round, u.pos)
		}
		for _, want := range []struct {
			id uint16
			n  uint32
		}{{tx1, 0}, {tx2, 0}, {rx, 10}, {tx3, 0}, {rx2, 64}} {
			id, n, ok, err := drv.Reclaim()
			require.NoError(t, err, "round %d", round)
			require.True(t, ok)
			require.Equal(t, want.id, id, "round %d", round)
			require.Equal(t, want.n, n)
		}
		_, _, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.False(t, ok)
		require.Equal(t, 10, drv.NumFree())
		require.Equal(t, dev.State().NextAvail, dev.State().NextUsed)
	}
	// A batch out of pop order is written one descriptor per chain.
	a, b := addN(t, drv, 1, 0), addN(t, drv, 1, 0)
	drv.Publish()
	require.Len(t, popAll(t, dev), 2)
	st := dev.State()
	require.NoError(t, dev.PushBatch([]UsedElem{{b, 0}, {a, 0}}))
	ui := int(st.UsedIndex())
	id0 := uint16(raw[int(l.Desc)+16*ui+12]) | uint16(raw[int(l.Desc)+16*ui+13])<<8
	assert.Equal(t, b, id0, "b's descriptor first")
}

// With IN_ORDER, receive chains written completely still get a used
// descriptor each, in their own slots: DPDK's packed receive paths read
// one buffer per used descriptor and would stall on a skipped slot. So do
// transmitted chains (the device groups nothing).
func TestPackedInOrderKeepsReceiveDescriptors(t *testing.T) {
	f := virtio.Features(0).With(virtio.FInOrder)
	mem, drv, dev := newPackedPair(t, 16, f)
	raw := mem.Regions()[0].Bytes()
	l := ContiguousPackedLayout(0x1000, 16)
	at := func(i int) (id uint16, n uint32, flags uint16) {
		o := int(l.Desc) + 16*i
		return binary.LittleEndian.Uint16(raw[o+12:]), binary.LittleEndian.Uint32(raw[o+8:]), binary.LittleEndian.Uint16(raw[o+14:])
	}
	rx1 := addN(t, drv, 1, 64)
	rx2 := addN(t, drv, 2, 64) // two descriptors, 64 bytes writable
	rx3 := addN(t, drv, 1, 64)
	tx1 := addN(t, drv, 1, 0)
	tx2 := addN(t, drv, 1, 0)
	drv.Publish()
	require.Len(t, popAll(t, dev), 5)
	require.NoError(t, dev.PushBatch([]UsedElem{{rx1, 64}, {rx2, 64}, {rx3, 10}, {tx1, 0}, {tx2, 0}}))
	for _, want := range []struct {
		pos int
		id  uint16
		n   uint32
	}{{0, rx1, 64}, {1, rx2, 64}, {3, rx3, 10}, {4, tx1, 0}, {5, tx2, 0}} {
		id, n, flags := at(want.pos)
		assert.Equal(t, want.id, id, "slot %d", want.pos)
		assert.Equal(t, want.n, n, "slot %d", want.pos)
		assert.Equal(t, DescFAvail|DescFUsed, flags&(DescFAvail|DescFUsed), "slot %d used", want.pos)
	}
	for _, want := range []struct {
		id uint16
		n  uint32
	}{{rx1, 64}, {rx2, 64}, {rx3, 10}, {tx1, 0}, {tx2, 0}} {
		id, n, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, want.id, id)
		require.Equal(t, want.n, n)
	}
}

// TestPackedInOrderDriverSkips: an IN_ORDER device's single used
// descriptor for several chains, written by hand.
func TestPackedInOrderDriverSkips(t *testing.T) {
	f := virtio.Features(0).With(virtio.FInOrder)
	mem, drv, _ := newPackedPair(t, 8, f)
	raw := mem.Regions()[0].Bytes()
	l := ContiguousPackedLayout(0x1000, 8)
	a := addN(t, drv, 2, 32)
	b := addN(t, drv, 1, 0)
	c := addN(t, drv, 3, 64)
	drv.Publish()
	// One used descriptor, at the first chain's slot, naming c.
	o := int(l.Desc)
	raw[o+8], raw[o+12], raw[o+13] = 5, byte(c), byte(c>>8)
	raw[o+14], raw[o+15] = byte(DescFAvail|DescFWrite), byte((DescFAvail|DescFUsed)>>8)
	for _, want := range []struct {
		id uint16
		n  uint32
	}{{a, 32}, {b, 0}, {c, 5}} { // skipped chains count as used completely
		id, n, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, want.id, id)
		require.Equal(t, want.n, n)
	}
	require.Equal(t, 8, drv.NumFree())
	// The next used descriptor is expected at slot 6.
	d := addN(t, drv, 1, 8)
	drv.Publish()
	o = int(l.Desc) + 16*6
	raw[o+12], raw[o+13] = byte(d), byte(d>>8)
	raw[o+14], raw[o+15] = byte(DescFAvail), byte((DescFAvail|DescFUsed)>>8)
	id, n, ok, err := drv.Reclaim()
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, d, id)
	require.Zero(t, n)
}

// TestPackedPushMisuse: the device's own mistakes do not break the queue.
func TestPackedPushMisuse(t *testing.T) {
	_, drv, dev := newPackedPair(t, 4, 0)
	assert.ErrorIs(t, dev.Push(0, 0), ErrNotInFlight)
	addN(t, drv, 1, 16)
	drv.Publish()
	var c Chain
	ok, err := dev.Pop(&c)
	require.True(t, ok)
	require.NoError(t, err)
	assert.ErrorIs(t, dev.Push(4, 0), ErrNotInFlight)
	assert.ErrorIs(t, dev.Push(c.Head+1, 0), ErrNotInFlight)
	assert.ErrorIs(t, dev.PushChain(&c, 17), ErrWrittenTooLarge)
	assert.ErrorIs(t, dev.PushBatch([]UsedElem{{c.Head, 0}, {c.Head, 0}}), ErrNotInFlight)
	assert.ErrorIs(t, dev.PushBatch([]UsedElem{{c.Head, 0}, {3, 0}}), ErrNotInFlight)
	assert.ErrorIs(t, dev.AdoptInFlight(1, 1), ErrNotInFlight, "nothing restored in flight")
	require.NoError(t, dev.Err(), "caller misuse does not break the queue")
	require.NoError(t, dev.PushChain(&c, 16))
	assert.ErrorIs(t, dev.Push(c.Head, 0), ErrNotInFlight, "pushed twice")
	_, dsplit := func() (*DriverQueue, *DeviceQueue) { _, d, v := newPair(t, 4, 0); return d, v }()
	assert.ErrorIs(t, dsplit.AdoptInFlight(0, 1), ErrNotInFlight)
}

// TestPackedSaveRestore: State and DeviceQueueOptions.State reproduce the
// exact position, chains in flight included.
func TestPackedSaveRestore(t *testing.T) {
	for _, f := range []virtio.Features{0, virtio.Features(0).With(virtio.FInOrder)} {
		t.Run(fmt.Sprintf("%#x", uint64(f)), func(t *testing.T) {
			mem, drv, dev := newPackedPair(t, 6, f)
			f = f.With(virtio.FRingPacked)
			// Move both positions around the ring a few times.
			for range 7 {
				addN(t, drv, 2, 8)
				drv.Publish()
				for _, c := range popAll(t, dev) {
					require.NoError(t, dev.Push(c.Head, 1))
				}
				_, _, ok, err := drv.Reclaim()
				require.NoError(t, err)
				require.True(t, ok)
			}
			// Two chains in flight (3 descriptors), one more available.
			a := addN(t, drv, 2, 8)
			b := addN(t, drv, 1, 8)
			drv.Publish()
			cs := popAll(t, dev)
			require.Len(t, cs, 2)
			c := addN(t, drv, 2, 8)
			drv.Publish()
			st := dev.State()
			n, ok := st.PackedInFlight(6)
			require.True(t, ok)
			require.Equal(t, uint16(3), n)

			// The destination resumes from the state.
			dev2, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: dev.Layout(), Features: f, State: st})
			require.NoError(t, err)
			assert.Equal(t, st, dev2.State(), "exact position")
			assert.ErrorIs(t, dev2.Push(a, 1), ErrNotInFlight, "ids of chains in flight are unknown")
			require.NoError(t, dev2.AdoptInFlight(a, 2))
			require.NoError(t, dev2.AdoptInFlight(b, 1))
			assert.ErrorIs(t, dev2.AdoptInFlight(c, 1), ErrNotInFlight, "no more in flight")
			got := popAll(t, dev2)
			require.Len(t, got, 1)
			require.Equal(t, c, got[0].Head)
			require.NoError(t, dev2.Push(a, 2))
			require.NoError(t, dev2.Push(b, 3))
			require.NoError(t, dev2.Push(c, 4))
			requireReclaimed(t, drv, []uint16{a, b, c}, []uint32{2, 3, 4})
			st2 := dev2.State()
			assert.Equal(t, st2.NextAvail, st2.NextUsed)
			dev2.Reset()
			assert.Equal(t, st, dev2.State(), "Reset returns to the restored state")
		})
	}
}

// requireReclaimed reclaims len(ids) chains from drv and requires them to
// be ids, in order, with the used lengths lens.
func requireReclaimed(t *testing.T, drv *DriverQueue, ids []uint16, lens []uint32) {
	t.Helper()
	for i, want := range ids {
		id, n, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok, "chain %d", i)
		require.Equal(t, want, id)
		require.Equal(t, lens[i], n)
	}
}

// inOrderRestored is an IN_ORDER packed pair of size 6 whose device popped
// a (2 descriptors) and b (1), and a device queue restored from that
// device's state: a and b are in flight there with ids it does not know.
func inOrderRestored(t *testing.T) (drv *DriverQueue, dev2 *DeviceQueue, a, b uint16) {
	t.Helper()
	f := virtio.Features(0).With(virtio.FInOrder)
	mem, drv, dev := newPackedPair(t, 6, f)
	a = addN(t, drv, 2, 8)
	b = addN(t, drv, 1, 8)
	drv.Publish()
	require.Len(t, popAll(t, dev), 2)
	dev2, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: dev.Layout(), Features: f.With(virtio.FRingPacked), State: dev.State()})
	require.NoError(t, err)
	return drv, dev2, a, b
}

// TestPackedInOrderPartialAdoption: with IN_ORDER, a used descriptor
// stands for every chain made available before it, and a restored queue
// does not know where an adopted chain lies among its chains in flight.
// While some are adopted and others not, a push fails (ErrNotInFlight,
// the queue unbroken): it used to write the adopted chain's used
// descriptor covering the unadopted ones after it too, moving the used
// position past chains the driver did not count as used, and the queue
// went dead (found by a review). Once every chain is adopted, they are
// pushed in order and the driver reclaims all.
func TestPackedInOrderPartialAdoption(t *testing.T) {
	for _, batch := range []bool{false, true} {
		t.Run(fmt.Sprint("batch=", batch), func(t *testing.T) {
			drv, dev2, a, b := inOrderRestored(t)
			require.NoError(t, dev2.AdoptInFlight(a, 2))
			c := addN(t, drv, 2, 8)
			drv.Publish()
			got := popAll(t, dev2)
			require.Len(t, got, 1)
			require.Equal(t, c, got[0].Head)
			push := func(id uint16, n uint32) error {
				if batch {
					return dev2.PushBatch([]UsedElem{{id, n}})
				}
				return dev2.Push(id, n)
			}
			for _, id := range []uint16{a, c} {
				require.ErrorIs(t, push(id, 1), ErrNotInFlight, "b's place among them is unknown")
			}
			require.NoError(t, dev2.Err(), "the queue is not broken")
			require.NoError(t, dev2.AdoptInFlight(b, 1))
			for i, id := range []uint16{a, b, c} {
				require.NoError(t, push(id, uint32(i+2)))
			}
			requireReclaimed(t, drv, []uint16{a, b, c}, []uint32{2, 3, 4})
			st := dev2.State()
			assert.Equal(t, st.NextAvail, st.NextUsed)
			assert.Zero(t, drv.Outstanding())
		})
	}
}

// With IN_ORDER a restored queue need not adopt its chains in flight: the
// first used descriptor the device writes, through Push or PushBatch,
// covers them (the driver counts them as used completely).
func TestPackedInOrderRestoreCoversChainsInFlight(t *testing.T) {
	for _, batch := range []bool{false, true} {
		t.Run(fmt.Sprint("batch=", batch), func(t *testing.T) {
			drv, dev2, a, b := inOrderRestored(t)
			c := addN(t, drv, 2, 8)
			drv.Publish()
			got := popAll(t, dev2)
			require.Len(t, got, 1)
			require.Equal(t, c, got[0].Head)
			if batch {
				require.NoError(t, dev2.PushBatch([]UsedElem{{c, 4}}))
			} else {
				require.NoError(t, dev2.Push(c, 4))
			}
			st := dev2.State()
			assert.Equal(t, st.NextAvail, st.NextUsed, "the used position moved past a and b too")
			for _, want := range []struct {
				id uint16
				n  uint32
			}{{a, 8}, {b, 8}, {c, 4}} {
				id, n, ok, err := drv.Reclaim()
				require.NoError(t, err)
				require.True(t, ok)
				require.Equal(t, want.id, id)
				require.Equal(t, want.n, n)
			}
		})
	}
}

// TestPackedNotifications: NeedsInterrupt and NeedsKick against the
// ENABLE/DISABLE/DESC flags, with event offsets on both sides of a wrap.
func TestPackedNotifications(t *testing.T) {
	t.Run("flags", func(t *testing.T) {
		r := newRawPacked(t, 0)
		r.desc(rawRingAt, 0, rawData, 8, 0, A1)
		var c Chain
		_, err := r.dev.Pop(&c)
		require.NoError(t, err)
		assert.False(t, r.dev.NeedsInterrupt(), "nothing used yet")
		require.NoError(t, r.dev.Push(0, 0))
		r.driverEvent(0, EventFlagsDisable)
		assert.False(t, r.dev.NeedsInterrupt())
		r.desc(rawRingAt, 1, rawData, 8, 1, A1)
		_, err = r.dev.Pop(&c)
		require.NoError(t, err)
		require.NoError(t, r.dev.Push(1, 0))
		r.driverEvent(0, EventFlagsEnable)
		assert.True(t, r.dev.NeedsInterrupt())
		assert.False(t, r.dev.NeedsInterrupt(), "once per push")
		r.desc(rawRingAt, 2, rawData, 8, 2, A1)
		_, err = r.dev.Pop(&c)
		require.NoError(t, err)
		require.NoError(t, r.dev.Push(2, 0))
		r.driverEvent(PackedIndex(4, true), EventFlagsDesc)
		assert.True(t, r.dev.NeedsInterrupt(), "DESC without EVENT_IDX means ENABLE")
		_, fl := r.deviceEvent()
		assert.Equal(t, EventFlagsEnable, fl)
		r.dev.DisableNotify()
		_, fl = r.deviceEvent()
		assert.Equal(t, EventFlagsDisable, fl)
		pending, err := r.dev.EnableNotify()
		require.NoError(t, err)
		assert.False(t, pending)
		_, fl = r.deviceEvent()
		assert.Equal(t, EventFlagsEnable, fl)
	})
	t.Run("event offsets across a wrap", func(t *testing.T) {
		// Device used position at 3 (wrap 1) on a size-5 ring; it pushes
		// 4 descriptors: positions 3, 4, 0, 1 (the last two in lap 2).
		for _, tc := range []struct {
			off  uint16
			want bool
		}{
			{PackedIndex(2, true), false},  // before the batch
			{PackedIndex(3, true), true},   // its first
			{PackedIndex(4, true), true},   // lap 1's last
			{PackedIndex(0, false), true},  // lap 2's first
			{PackedIndex(1, false), true},  // the batch's last
			{PackedIndex(2, false), false}, // not used yet
			{PackedIndex(3, false), false}, // next lap
			{PackedIndex(0, true), false},  // lap 1's 0: long ago
		} {
			r := newRawPacked(t, allPacked)
			r.dev.pk.nextAvail, r.dev.pk.nextUsed = 3, 3
			for i, pos := range []int{3, 4, 0, 1} {
				bits := A1
				if pos < 3 {
					bits = A0
				}
				r.desc(rawRingAt, pos, rawData, 8, uint16(i), bits)
			}
			cs := make([]Chain, 4)
			n, err := r.dev.PopBatch(cs)
			require.NoError(t, err)
			require.Equal(t, 4, n)
			r.driverEvent(tc.off, EventFlagsDesc)
			require.NoError(t, r.dev.PushBatch([]UsedElem{{0, 0}, {1, 0}, {2, 0}, {3, 0}}))
			assert.Equal(t, tc.want, r.dev.NeedsInterrupt(), "off_wrap %#x", tc.off)
		}
	})
	t.Run("driver side", func(t *testing.T) {
		for _, tc := range []struct {
			flags, off uint16
			want       bool
		}{
			{EventFlagsDisable, 0, false},
			{EventFlagsEnable, 0, true},
			{EventFlagsDesc, PackedIndex(3, true), true}, // the batch's first
			{EventFlagsDesc, PackedIndex(0, false), true},
			{EventFlagsDesc, PackedIndex(1, false), false}, // past the batch
			{EventFlagsDesc, PackedIndex(2, true), false},  // before it
		} {
			mem, drv, dev := newPackedPair(t, 4, virtio.Features(0).With(virtio.FEventIdx))
			// Move the driver to position 3.
			addN(t, drv, 3, 8)
			drv.Publish()
			require.True(t, drv.NeedsKick())
			for _, c := range popAll(t, dev) {
				require.NoError(t, dev.Push(c.Head, 0))
			}
			_, _, ok, err := drv.Reclaim()
			require.NoError(t, err)
			require.True(t, ok)
			addN(t, drv, 2, 8) // positions 3 and 0 (lap 2)
			drv.Publish()
			w := eventWord(tc.off, tc.flags)
			require.NoError(t, mem.Write(ContiguousPackedLayout(0x1000, 4).Used, []byte{byte(w), byte(w >> 8), byte(w >> 16), byte(w >> 24)}))
			assert.Equal(t, tc.want, drv.NeedsKick(), "flags %d off_wrap %#x", tc.flags, tc.off)
			assert.False(t, drv.NeedsKick(), "once per publish")
		}
	})
	t.Run("EVENT_IDX: an empty Pop arms the event offset at the next avail position", func(t *testing.T) {
		r := newRawPacked(t, allPacked)
		off, fl := r.deviceEvent()
		assert.Equal(t, EventFlagsDesc, fl)
		assert.Equal(t, PackedIndex(0, true), off)
		for i := range 7 {
			pos := i % rawPSize
			bits := A1
			if i >= rawPSize {
				bits = A0
			}
			r.desc(rawRingAt, pos, rawData, 8, uint16(i%rawPSize), bits)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.NoError(t, r.dev.Push(c.Head, 0))
			ok, err = r.dev.Pop(&c)
			require.NoError(t, err)
			require.False(t, ok)
			off, fl = r.deviceEvent()
			assert.Equal(t, EventFlagsDesc, fl)
			assert.Equal(t, PackedIndex(uint16((i+1)%rawPSize), i+1 < rawPSize), off)
		}
		r.dev.DisableNotify()
		_, fl = r.deviceEvent()
		assert.Equal(t, EventFlagsDisable, fl)
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.False(t, ok)
		_, fl = r.deviceEvent()
		assert.Equal(t, EventFlagsDisable, fl, "an empty Pop with notifications off writes nothing")
	})
	t.Run("enable then re-check", func(t *testing.T) {
		for _, f := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx)} {
			_, drv, dev := newPackedPair(t, 4, f)
			dev.DisableNotify()
			addN(t, drv, 1, 8)
			drv.Publish()
			assert.False(t, drv.NeedsKick(), "device disabled kicks")
			pending, err := dev.EnableNotify()
			require.NoError(t, err)
			assert.True(t, pending, "published before the enable: the re-check sees it")
			require.Len(t, popAll(t, dev), 1)
			pending, err = dev.EnableNotify()
			require.NoError(t, err)
			assert.False(t, pending)
			addN(t, drv, 1, 8)
			drv.Publish()
			assert.True(t, drv.NeedsKick(), "published after the enable: the driver kicks")
		}
	})
	t.Run("driver interrupts enable then re-check", func(t *testing.T) {
		for _, f := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx)} {
			_, drv, dev := newPackedPair(t, 4, f)
			drv.DisableInterrupts()
			id := addN(t, drv, 1, 8)
			drv.Publish()
			require.Len(t, popAll(t, dev), 1)
			require.NoError(t, dev.Push(id, 0))
			assert.False(t, dev.NeedsInterrupt(), "driver disabled interrupts")
			pending, err := drv.EnableInterrupts()
			require.NoError(t, err)
			assert.True(t, pending)
			_, _, ok, err := drv.Reclaim()
			require.NoError(t, err)
			require.True(t, ok)
			pending, err = drv.EnableInterrupts()
			require.NoError(t, err)
			assert.False(t, pending)
			id = addN(t, drv, 1, 8)
			drv.Publish()
			require.Len(t, popAll(t, dev), 1)
			require.NoError(t, dev.Push(id, 0))
			assert.True(t, dev.NeedsInterrupt())
		}
	})
}

// TestPackedWriteLogging: every guest write of the device side is logged:
// used descriptors (at UsedLogAddr, the descriptor ring's guest address
// for logging), device event suppression writes (at DeviceEventLogAddr)
// and PushChain's written bytes.
func TestPackedWriteLogging(t *testing.T) {
	for _, tc := range []struct {
		name          string
		feat          virtio.Features
		descLog, devL GuestAddr
	}{
		{"at the ring's guest addresses", 0, 0, 0},
		{"at UsedLogAddr and DeviceEventLogAddr", 0, 0x7770000, 0x8880000},
		{"EVENT_IDX", virtio.Features(0).With(virtio.FEventIdx), 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewMemfdRegion(0, 4<<20, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			f := tc.feat.With(virtio.FRingPacked)
			l := ContiguousPackedLayout(0x1000, 5)
			drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: f})
			require.NoError(t, err)
			log := &recLog{}
			dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: f, Log: log, State: InitialState(f),
				UsedLogAddr: tc.descLog, DeviceEventLogAddr: tc.devL})
			require.NoError(t, err)
			descBase, devBase := uint64(l.Desc), uint64(l.Used)
			if tc.descLog != 0 {
				descBase, devBase = uint64(tc.descLog), uint64(tc.devL)
			}
			devEvent := [2]uint64{devBase, 4}
			assert.Equal(t, [][2]uint64{devEvent}, log.writes, "creation enables notifications")
			log.writes = nil
			for round := range 3 {
				_, err = drv.Add([]Buffer{{Addr: 0x100000, Len: 10}, {Addr: 0x200000, Len: 100, Writable: true}, {Addr: 0x300000, Len: 100, Writable: true}})
				require.NoError(t, err)
				drv.Publish()
				var c Chain
				ok, err := dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				at := uint64(3*round) % 5
				require.NoError(t, dev.PushChain(&c, 150))
				assert.Equal(t, [][2]uint64{
					{0x200000, 100}, {0x300000, 50}, // written bytes
					{descBase + 16*at, 16}, // the used descriptor: its mark (addr), len, id, flags
				}, log.writes)
				log.writes = nil
				ok, err = dev.Pop(&c)
				require.NoError(t, err)
				require.False(t, ok)
				if tc.feat.Has(virtio.FEventIdx) {
					assert.Equal(t, [][2]uint64{devEvent}, log.writes, "re-arming the event offset is logged")
				} else {
					assert.Empty(t, log.writes)
				}
				log.writes = nil
				_, _, ok, err = drv.Reclaim()
				require.NoError(t, err)
				require.True(t, ok)
			}
			dev.DisableNotify()
			assert.Equal(t, [][2]uint64{devEvent}, log.writes, "DISABLE is logged")
			log.writes = nil
			dev.DisableNotify()
			assert.Empty(t, log.writes, "no write, no log")

			// A batch wrapping the ring end: position 4, then 0, 1.
			ids := []uint16{}
			for range 3 {
				id, err := drv.Add([]Buffer{{Addr: 0x200000, Len: 8, Writable: true}})
				require.NoError(t, err)
				ids = append(ids, id)
			}
			drv.Publish()
			require.Len(t, popAll(t, dev), 3)
			log.writes = nil
			require.NoError(t, dev.PushBatch([]UsedElem{{ids[0], 1}, {ids[1], 1}, {ids[2], 1}}))
			assert.Equal(t, [][2]uint64{{descBase + 16*4, 16}, {descBase, 32}}, log.writes)
		})
	}
	t.Run("a failing logger breaks the queue with ErrLogWrite", func(t *testing.T) {
		_, drv, dev := newPackedPair(t, 4, 0)
		bad := errors.New("log full")
		log := &recLog{}
		dev.log = log
		addN(t, drv, 1, 8)
		drv.Publish()
		var c Chain
		ok, err := dev.Pop(&c)
		require.True(t, ok)
		require.NoError(t, err)
		log.fail = bad
		err = dev.PushChain(&c, 1)
		assert.ErrorIs(t, err, ErrLogWrite)
		assert.ErrorIs(t, err, bad)
		assert.ErrorIs(t, dev.Push(0, 0), ErrQueueBroken)
	})
}

func TestPackedSnapshot(t *testing.T) {
	r := newRawPacked(t, allPacked)
	r.driverEvent(PackedIndex(3, false), EventFlagsDesc)
	s := r.dev.Snapshot()
	assert.Equal(t, RingSnapshot{Packed: true, AvailFlags: EventFlagsDesc, UsedEvent: 3,
		UsedFlags: EventFlagsDesc, AvailEvent: PackedIndex(0, true)}, s)
	assert.Contains(t, s.String(), "packed")
}

func TestPackedDriverReset(t *testing.T) {
	_, drv, dev := newPackedPair(t, 3, 0)
	addN(t, drv, 2, 8)
	drv.Publish()
	require.Len(t, popAll(t, dev), 1)
	drv.Reset()
	assert.Equal(t, 3, drv.NumFree())
	assert.Zero(t, drv.Outstanding())
	dev.Reset()
	for range 5 {
		id := addN(t, drv, 3, 8)
		drv.Publish()
		cs := popAll(t, dev)
		require.Len(t, cs, 1)
		require.NoError(t, dev.Push(id, 8))
		got, n, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, id, got)
		require.Equal(t, uint32(8), n)
	}
}

// TestPackedDriverAdd: the driver side writes chains as §2.8.21 says.
func TestPackedDriverAdd(t *testing.T) {
	mem, drv, _ := newPackedPair(t, 4, virtio.Features(0).With(virtio.FIndirectDesc))
	raw := mem.Regions()[0].Bytes()
	l := ContiguousPackedLayout(0x1000, 4)
	rd := func(i int) (uint64, uint32, uint16, uint16) {
		b := raw[int(l.Desc)+16*i:]
		return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16, uint32(b[8]) | uint32(b[9])<<8,
			uint16(b[12]) | uint16(b[13])<<8, uint16(b[14]) | uint16(b[15])<<8
	}
	id, err := drv.Add([]Buffer{{Addr: 0x10000, Len: 5}, {Addr: 0x20000, Len: 6, Writable: true}})
	require.NoError(t, err)
	_, _, _, f0 := rd(0)
	assert.Zero(t, f0, "the head is not available before Publish")
	a1, n1, id1, f1 := rd(1)
	assert.Equal(t, [4]uint64{0x20000, 6, uint64(id), uint64(DescFAvail | DescFWrite)}, [4]uint64{a1, uint64(n1), uint64(id1), uint64(f1)})
	drv.Publish()
	a0, n0, id0, f0 := rd(0)
	assert.Equal(t, [4]uint64{0x10000, 5, uint64(id), uint64(DescFAvail | DescFNext)}, [4]uint64{a0, uint64(n0), uint64(id0), uint64(f0)})
	assert.Equal(t, 2, drv.NumFree())
	_, err = drv.Add([]Buffer{{Addr: 0x10000, Len: 5}, {Addr: 0x10000, Len: 5}, {Addr: 0x20000, Len: 6, Writable: true}})
	assert.ErrorIs(t, err, ErrNoSpace)
	id2, err := drv.AddIndirect(0x30000, []Buffer{{Addr: 0x10000, Len: 5}, {Addr: 0x20000, Len: 6, Writable: true}})
	require.NoError(t, err)
	drv.Publish()
	a2, n2, id2b, f2 := rd(2)
	assert.Equal(t, [4]uint64{0x30000, 32, uint64(id2), uint64(DescFAvail | DescFIndirect)}, [4]uint64{a2, uint64(n2), uint64(id2b), uint64(f2)})
	tb := raw[0x30000:]
	assert.Equal(t, uint16(DescFWrite), uint16(tb[16+14])|uint16(tb[16+15])<<8, "WRITE is the only flag in a table")
	assert.Zero(t, uint16(tb[14])|uint16(tb[15])<<8)
	assert.Equal(t, 1, drv.NumFree())
	assert.Equal(t, 2, drv.Outstanding())
	_, err = drv.Add(nil)
	assert.ErrorIs(t, err, ErrBadChain)
}

// TestPackedHotPathsDoNotAllocate asserts zero allocations per operation
// in steady state on a packed ring: pop, push, batch pop/push, add,
// publish, kick, reclaim (one at a time and in batches), the notification calls, with logging and with
// in-order batching.
func TestPackedHotPathsDoNotAllocate(t *testing.T) {
	for _, feat := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx, virtio.FInOrder)} {
		_, drv, dev := newPackedPair(t, 61, feat)
		dev.log = &nopLog{}
		bufs := []Buffer{{Addr: 0x100000, Len: 64}, {Addr: 0x100100, Len: 64, Writable: true}}
		cs := make([]Chain, 8)
		elems := make([]UsedElem, 8)
		round := func() {
			for range 8 {
				if _, err := drv.Add(bufs); err != nil {
					t.Fatal(err)
				}
			}
			drv.Publish()
			drv.NeedsKick()
			if ok, err := dev.Pop(&cs[0]); !ok || err != nil {
				t.Fatal(ok, err)
			}
			if err := dev.PushChain(&cs[0], 10); err != nil {
				t.Fatal(err)
			}
			n, err := dev.PopBatch(cs[1:])
			if n != 7 || err != nil {
				t.Fatal(n, err)
			}
			for i := range n {
				elems[i] = UsedElem{cs[1+i].Head, uint32(64 * (i % 2))}
			}
			if err := dev.PushBatch(elems[:n]); err != nil {
				t.Fatal(err)
			}
			dev.NeedsInterrupt()
			for range 4 {
				if _, _, ok, err := drv.Reclaim(); !ok || err != nil {
					t.Fatal(ok, err)
				}
			}
			if n, err := drv.ReclaimBatch(elems[:4]); n != 4 || err != nil {
				t.Fatal(n, err)
			}
			if n, err := drv.ReclaimBatch(elems); n != 0 || err != nil {
				t.Fatal(n, err)
			}
			drv.Reclaim()
			dev.Pop(&cs[0])
			dev.DisableNotify()
			if _, err := dev.EnableNotify(); err != nil {
				t.Fatal(err)
			}
			drv.DisableInterrupts()
			if _, err := drv.EnableInterrupts(); err != nil {
				t.Fatal(err)
			}
		}
		round() // grow Chain.Segs once
		require.Zero(t, testing.AllocsPerRun(100, round))
	}
}

// TestPackedLogChain: LogChain logs a packed chain's written bytes like
// PushChain, and a failing logger breaks the packed queue.
func TestPackedLogChain(t *testing.T) {
	_, drv, dev := newPackedPair(t, 4, 0)
	log := &recLog{}
	dev.log = log
	_, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 8}, {Addr: 0x200000, Len: 64, Writable: true}, {Addr: 0x300000, Len: 64, Writable: true}})
	require.NoError(t, err)
	drv.Publish()
	var c Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.ErrorIs(t, dev.LogChain(&c, 129), ErrWrittenTooLarge)
	log.writes = nil
	require.NoError(t, dev.LogChain(&c, 100))
	assert.Equal(t, [][2]uint64{{0x200000, 64}, {0x300000, 36}}, log.writes)
	require.NoError(t, dev.PushBatch([]UsedElem{{c.Head, 100}}))
	_, n, ok, err := drv.Reclaim()
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, uint32(100), n)
	log.fail = errors.New("log full")
	addN(t, drv, 2, 8)
	drv.Publish()
	ok, err = dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.ErrorIs(t, dev.LogChain(&c, 8), ErrLogWrite)
	assert.ErrorIs(t, dev.Err(), ErrLogWrite)
	assert.False(t, dev.NeedsInterrupt(), "broken")
}

// TestPackedWraparound runs many laps of tiny rings (sizes 1 to 9, most
// not powers of two): chains of random length up to the ring size, direct
// and indirect, completed in random order one by one or in batches, the
// driver checking every id and length; both wrap counters flip hundreds of
// times.
func TestPackedWraparound(t *testing.T) {
	for size := uint16(1); size <= 9; size++ {
		for _, f := range []virtio.Features{virtio.Features(0).With(virtio.FIndirectDesc), virtio.Features(0).With(virtio.FEventIdx, virtio.FInOrder)} {
			t.Run(fmt.Sprintf("size%d/%#x", size, uint64(f)), func(t *testing.T) {
				mem, drv, dev := newPackedPair(t, size, f)
				inOrder := f.Has(virtio.FInOrder)
				rng := newGen(uint64(size)*7 + uint64(f))
				var descs uint64
				type want struct {
					id uint16
					n  uint32
				}
				cs := make([]Chain, size)
				for round := 0; round < 400; round++ {
					// Fill.
					for drv.NumFree() > 0 {
						nd := 1 + int(rng.r.Uint64()%uint64(drv.NumFree()))
						bufs := make([]Buffer, nd)
						for i := range bufs {
							bufs[i] = Buffer{Addr: GuestAddr(0x100000 + 0x100*i), Len: 16, Writable: i == nd-1}
						}
						var err error
						if f.Has(virtio.FIndirectDesc) && rng.r.Uint64()%2 == 0 {
							_, err = drv.AddIndirect(0x300000+GuestAddr(0x1000*drv.Outstanding()), bufs)
							descs++
						} else {
							_, err = drv.Add(bufs)
							descs += uint64(nd)
						}
						require.NoError(t, err)
					}
					drv.Publish()
					n, err := dev.PopBatch(cs)
					require.NoError(t, err)
					require.Equal(t, drv.Outstanding(), n)
					// Complete in random order (pop order with IN_ORDER).
					order := rng.r.Perm(n)
					if inOrder {
						for i := range order {
							order[i] = i
						}
					}
					var wants []want
					var batch []UsedElem
					for _, i := range order {
						l := uint32(rng.r.Uint64() % 17)
						if inOrder && rng.r.Uint64()%2 == 0 {
							l = 16 // used completely: may be skipped
						}
						e := UsedElem{cs[i].Head, l}
						wants = append(wants, want{e.Head, e.Len})
						if rng.r.Uint64()%2 == 0 {
							batch = append(batch, e)
							continue
						}
						if len(batch) > 0 {
							require.NoError(t, dev.PushBatch(batch))
							batch = batch[:0]
						}
						require.NoError(t, dev.Push(e.Head, e.Len))
					}
					if len(batch) > 0 {
						require.NoError(t, dev.PushBatch(batch))
					}
					for _, w := range wants {
						id, n, ok, err := drv.Reclaim()
						require.NoError(t, err, "round %d", round)
						require.True(t, ok, "round %d", round)
						require.Equal(t, w, want{id, n}, "round %d", round)
					}
					_, _, ok, err := drv.Reclaim()
					require.NoError(t, err)
					require.False(t, ok)
					require.Equal(t, int(size), drv.NumFree())
				}
				st := dev.State()
				idx := uint16(descs % uint64(size))
				wrap := (descs/uint64(size))%2 == 0
				assert.Equal(t, QueueState{NextAvail: PackedIndex(idx, wrap), NextUsed: PackedIndex(idx, wrap)}, st)
				_ = mem
			})
		}
	}
}
