package vring

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// newPair builds memfd-backed memory with a ring of the given size at 0x1000
// and a data area at 0x100000, and both sides of the queue.
func newPair(t testing.TB, size uint16, feat virtio.Features) (*Memory, *DriverQueue, *DeviceQueue) {
	t.Helper()
	r, err := NewMemfdRegion(0, 4<<20, &RegionOptions{Name: "vring-test"})
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	l := ContiguousLayout(0x1000, size)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: feat})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat})
	require.NoError(t, err)
	return mem, drv, dev
}

func TestBasicRoundTrip(t *testing.T) {
	for _, feat := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx, virtio.FIndirectDesc)} {
		mem, drv, dev := newPair(t, 8, feat)
		require.NoError(t, mem.Write(0x100000, []byte("hello")))
		head, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 5}, {Addr: 0x200000, Len: 64, Writable: true}})
		require.NoError(t, err)
		require.Equal(t, 6, drv.NumFree())
		var c Chain
		ok, err := dev.Pop(&c)
		require.NoError(t, err)
		require.False(t, ok, "not published yet")
		drv.Publish()
		require.True(t, drv.NeedsKick())
		ok, err = dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, head, c.Head)
		require.Equal(t, 1, c.Readable)
		require.Len(t, c.Segs, 2)
		require.Equal(t, "hello", string(c.Segs[0].Buf))
		require.Equal(t, 3, c.Scatter([]byte("abc")))
		require.NoError(t, dev.PushChain(&c, 3))
		require.True(t, dev.NeedsInterrupt())
		h, n, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		require.Equal(t, head, h)
		require.Equal(t, uint32(3), n)
		require.Equal(t, 8, drv.NumFree())
		got := make([]byte, 3)
		require.NoError(t, mem.Read(0x200000, got))
		require.Equal(t, "abc", string(got))
		require.Equal(t, QueueState{NextAvail: 1, NextUsed: 1}, dev.State())
	}
}

// TestDriverQueueReset: after a device reset the driver re-initializes the
// queue (virtio 1.2 §3.1.1: the rings are set up again): Reset zeroes the
// ring areas, frees every descriptor, restarts the indexes and clears a
// broken state, and a device side started from a zero state works with it.
func TestDriverQueueReset(t *testing.T) {
	mem, drv, dev := newPair(t, 8, 0)
	l := dev.Layout()
	addOne(t, drv)
	addOne(t, drv)
	var c Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, dev.Push(c.Head, 4))
	_, _, ok, err = drv.Reclaim()
	require.NoError(t, err)
	require.True(t, ok)
	// The device returns a head the driver never made available: the
	// driver side breaks.
	ok, err = dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, dev.Push(7, 0))
	_, _, _, err = drv.Reclaim()
	require.ErrorIs(t, err, ErrUsedIDNotOutstanding)
	require.ErrorIs(t, drv.Err(), ErrQueueBroken)

	drv.Reset()
	require.NoError(t, drv.Err())
	assert.Equal(t, 8, drv.NumFree())
	assert.Equal(t, 0, drv.Outstanding())
	d, a, u := SplitSizes(8)
	for _, area := range []struct {
		name string
		addr GuestAddr
		n    uint64
	}{{"descriptor table", l.Desc, d}, {"available ring", l.Avail, a}, {"used ring", l.Used, u}} {
		b, err := mem.Slice(area.addr, area.n)
		require.NoError(t, err)
		assert.Equal(t, make([]byte, area.n), b, "%s zeroed", area.name)
	}

	dev2, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
	require.NoError(t, err)
	h := addOne(t, drv)
	assert.Equal(t, uint16(0), h, "free list starts again at descriptor 0")
	ok, err = dev2.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, h, c.Head)
	require.NoError(t, dev2.Push(c.Head, 16))
	head, n, ok, err := drv.Reclaim()
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, h, head)
	assert.Equal(t, uint32(16), n)
	assert.Equal(t, 8, drv.NumFree())
}

// TestDriverAddChecksBuffers: the driver side only makes available buffers
// that lie in guest memory, also after earlier buffers made it cache a
// region (the cache must not accept a buffer running past it).
func TestDriverAddChecksBuffers(t *testing.T) {
	r1, err := NewMemfdRegion(0, 1<<20, nil)
	require.NoError(t, err)
	r2, err := NewMemfdRegion(1<<20, 1<<20, nil) // adjacent to r1
	require.NoError(t, err)
	r3, err := NewMemfdRegion(4<<20, 1<<20, nil) // a hole before it
	require.NoError(t, err)
	mem, err := NewMemory(r1, r2, r3)
	require.NoError(t, err)
	defer mem.Close()
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: ContiguousLayout(0, 8)})
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		buf  Buffer
		ok   bool
	}{
		{"inside the first region", Buffer{Addr: 0x10000, Len: 100}, true},
		{"running past the cached region into an adjacent one", Buffer{Addr: 1<<20 - 50, Len: 100}, true},
		{"inside the second region", Buffer{Addr: 1<<20 + 10, Len: 100}, true},
		{"running past the cached region into a hole", Buffer{Addr: 2<<20 - 50, Len: 100}, false},
		{"in the hole", Buffer{Addr: 3 << 20, Len: 1}, false},
		{"inside the third region", Buffer{Addr: 4<<20 + 10, Len: 100}, true},
		{"past the end of memory", Buffer{Addr: 5<<20 - 1, Len: 2}, false},
		{"below the cached region, in the hole", Buffer{Addr: 4<<20 - 1, Len: 1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := drv.Add([]Buffer{tc.buf}) // 8 descriptors: enough for every ok case
			if !tc.ok {
				require.ErrorIs(t, err, ErrBadChain)
				assert.ErrorIs(t, err, ErrOutOfRange)
				return
			}
			require.NoError(t, err)
		})
	}
}

// TestDriverRejectedChainLeavesNoTrace: Add checks each buffer as it
// writes it into a free descriptor, so a chain rejected at its second or
// third buffer has already written the first. Nothing of it may be seen:
// the free count, the outstanding count and the ring stay as they were,
// and the next chain added is the one the device pops, whole. A chain that
// is both bad and too long for the free descriptors reports the bad
// buffer, not the lack of space.
func TestDriverRejectedChainLeavesNoTrace(t *testing.T) {
	good := []Buffer{{Addr: 0x100000, Len: 5}, {Addr: 0x101000, Len: 7}, {Addr: 0x200000, Len: 64, Writable: true}}
	for _, tc := range []struct {
		name string
		bufs []Buffer
		want []error
	}{
		{"readable after writable", []Buffer{{Addr: 0x100000, Len: 5}, {Addr: 0x200000, Len: 8, Writable: true}, {Addr: 0x100100, Len: 5}},
			[]error{ErrBadChain}},
		{"second buffer outside memory", []Buffer{{Addr: 0x100000, Len: 5}, {Addr: 8 << 20, Len: 8}},
			[]error{ErrBadChain, ErrOutOfRange}},
		{"third buffer runs past the end of memory", []Buffer{{Addr: 0x100000, Len: 5}, {Addr: 0x100100, Len: 5}, {Addr: 4<<20 - 4, Len: 8, Writable: true}},
			[]error{ErrBadChain, ErrOutOfRange}},
		{"empty chain", nil, []error{ErrBadChain}},
		{"bad and longer than the free descriptors", append(make([]Buffer, 8), Buffer{Addr: 8 << 20, Len: 1}),
			[]error{ErrBadChain, ErrOutOfRange}},
		{"too long", make([]Buffer, 9), []error{ErrNoSpace}},
	} {
		for _, packed := range []bool{false, true} {
			pair := newPair
			if packed {
				pair = newPackedPair
			}
			t.Run(fmt.Sprintf("%s/packed=%v", tc.name, packed), func(t *testing.T) {
				bufs := tc.bufs
				for i := range bufs {
					if bufs[i].Len == 0 && bufs[i].Addr == 0 {
						bufs[i] = Buffer{Addr: 0x100000 + GuestAddr(i)*0x100, Len: 16}
					}
				}
				_, drv, dev := pair(t, 8, 0)
				// One chain in flight first, so the rejected one starts
				// past descriptor 0.
				first, err := drv.Add(good[:1])
				require.NoError(t, err)
				free, out := drv.NumFree(), drv.Outstanding()

				_, err = drv.Add(bufs)
				for _, want := range tc.want {
					require.ErrorIs(t, err, want)
				}
				assert.Equal(t, free, drv.NumFree(), "free descriptors")
				assert.Equal(t, out, drv.Outstanding(), "outstanding chains")
				require.NoError(t, drv.Err(), "a rejected chain does not break the queue")

				// Nothing of the rejected chain is available: a one-buffer
				// chain added now is the only one the device finds after
				// the first (on a packed ring it would go on to the next
				// descriptors if the rejected chain had left them looking
				// available).
				one, err := drv.Add([]Buffer{{Addr: 0x300000, Len: 32, Writable: true}})
				require.NoError(t, err)
				drv.Publish()
				for _, want := range []uint16{first, one} {
					var c Chain
					ok, err := dev.Pop(&c)
					require.NoError(t, err)
					require.True(t, ok)
					require.Equal(t, want, c.Head)
					require.Len(t, c.Segs, 1)
				}
				var c0 Chain
				ok, err := dev.Pop(&c0)
				require.NoError(t, err)
				require.False(t, ok, "after the rejected chain, only the chains added are available")
				free--

				// Every descriptor is still there: the good chain and
				// then one-buffer chains until none is free, each popped
				// by the device as it was added.
				var heads []uint16
				head, err := drv.Add(good)
				require.NoError(t, err)
				heads = append(heads, head)
				for drv.NumFree() > 0 {
					h, err := drv.Add([]Buffer{{Addr: 0x300000, Len: 32, Writable: true}})
					require.NoError(t, err)
					heads = append(heads, h)
				}
				assert.Len(t, heads, 1+free-len(good), "chains that fit in the free descriptors")
				drv.Publish()
				var c Chain
				seen := map[uint16]bool{}
				for i, want := range heads {
					ok, err := dev.Pop(&c)
					require.NoError(t, err)
					require.True(t, ok)
					require.Equal(t, want, c.Head)
					require.False(t, seen[c.Head], "head %d popped twice", c.Head)
					seen[c.Head] = true
					if i == 0 {
						require.Len(t, c.Segs, len(good))
						for k, s := range c.Segs {
							assert.Equal(t, good[k].Addr, s.Addr, "segment %d", k)
							assert.Equal(t, good[k].Len, s.Len, "segment %d", k)
							assert.Equal(t, good[k].Writable, s.Writable, "segment %d", k)
						}
					}
				}
				ok, err = dev.Pop(&c)
				require.NoError(t, err)
				require.False(t, ok, "only the chains added are available")
			})
		}
	}
}
