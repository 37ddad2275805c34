package vring

import (
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

var fPacked = virtio.Features(0).With(virtio.FRingPacked)

// newPackedPair is newPair for a packed queue: the ring at 0x1000 (size
// need not be a power of two).
func newPackedPair(t testing.TB, size uint16, feat virtio.Features) (*Memory, *DriverQueue, *DeviceQueue) {
	t.Helper()
	r, err := NewMemfdRegion(0, 4<<20, &RegionOptions{Name: "vring-test"})
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	feat = feat.With(virtio.FRingPacked)
	l := ContiguousPackedLayout(0x1000, size)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: feat})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat, State: InitialState(feat)})
	require.NoError(t, err)
	return mem, drv, dev
}

func TestPackedBasicRoundTrip(t *testing.T) {
	for _, feat := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx, virtio.FIndirectDesc)} {
		mem, drv, dev := newPackedPair(t, 5, feat)
		require.True(t, drv.Packed())
		require.True(t, dev.Packed())
		require.NoError(t, mem.Write(0x100000, []byte("hello")))
		for round := 0; round < 20; round++ {
			head, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 5}, {Addr: 0x200000, Len: 64, Writable: true}})
			require.NoError(t, err)
			require.Equal(t, 3, drv.NumFree())
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
			require.Equal(t, uint16(2), c.Descs)
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
			require.Equal(t, 5, drv.NumFree())
			got := make([]byte, 3)
			require.NoError(t, mem.Read(0x200000, got))
			require.Equal(t, "abc", string(got))
		}
		// 20 rounds of 2 descriptors on a size-5 ring: 40 = 8 laps, index 0, wrap 1.
		require.Equal(t, QueueState{NextAvail: 0x8000, NextUsed: 0x8000}, dev.State())
	}
}
