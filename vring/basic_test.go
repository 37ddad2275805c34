package vring

import (
	"testing"

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
