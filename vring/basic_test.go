package vring

import (
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
