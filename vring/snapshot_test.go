package vring

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestSnapshotReadsSpecOffsets: the six shared fields are read from their
// places in virtio 1.2 §2.7.6 (avail: le16 flags, le16 idx, ring[size],
// le16 used_event) and §2.7.8 (used: le16 flags, le16 idx, ring[size],
// le16 avail_event), written here byte by byte.
func TestSnapshotReadsSpecOffsets(t *testing.T) {
	const size = 8
	mem, _, dev := newPair(t, size, virtio.Features(0).With(virtio.FEventIdx))
	l := dev.Layout()
	put := func(a GuestAddr, v uint16) {
		var b [2]byte
		binary.LittleEndian.PutUint16(b[:], v)
		require.NoError(t, mem.Write(a, b[:]))
	}
	put(l.Avail, 0x0001)
	put(l.Avail+2, 0x1234)
	put(l.Avail+4+2*size, 0x2345)
	put(l.Used, 0x0001)
	put(l.Used+2, 0x3456)
	put(l.Used+4+8*size, 0x4567)
	assert.Equal(t, RingSnapshot{AvailFlags: 1, AvailIdx: 0x1234, UsedEvent: 0x2345,
		UsedFlags: 1, UsedIdx: 0x3456, AvailEvent: 0x4567}, dev.Snapshot())
}

// TestSnapshotFollowsTraffic: after the driver publishes and the device
// pops, pushes and re-arms (2.7.10 avail_event = next avail index), the
// snapshot shows both sides' indices.
func TestSnapshotFollowsTraffic(t *testing.T) {
	_, drv, dev := newPair(t, 8, virtio.Features(0).With(virtio.FEventIdx))
	for i := 0; i < 3; i++ {
		addOne(t, drv)
	}
	var c Chain
	for i := 0; i < 2; i++ {
		ok, err := dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		require.NoError(t, dev.Push(c.Head, 0))
	}
	s := dev.Snapshot()
	assert.Equal(t, uint16(3), s.AvailIdx)
	assert.Equal(t, uint16(2), s.UsedIdx)
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	ok, err = dev.Pop(&c)
	require.NoError(t, err)
	require.False(t, ok)
	assert.Equal(t, uint16(3), dev.Snapshot().AvailEvent, "empty ring re-armed at the next avail index")
	assert.Contains(t, dev.Snapshot().String(), "avail_event 3")
}
