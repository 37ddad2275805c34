package vhostusertest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// TestRingsShowsGuestMemoryView: Rings reports the transmit ring's indices
// as they lie in guest memory once the worker consumed a frame, and a zero
// snapshot for the receive queue, which was never started.
func TestRingsShowsGuestMemoryView(t *testing.T) {
	h := New(Sink, devMAC)
	drv := startTxOnly(t, h, virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx), 64)

	// No kick eventfd: the handler must poll. Let the worker go idle
	// first, so the frame arrives while it sleeps.
	time.Sleep(50 * time.Millisecond)
	_, err := drv.Add([][]byte{make([]byte, 12), []byte("frame")}, nil)
	require.NoError(t, err)
	drv.Queue.Publish()
	waitFor(t, func() bool { return h.Counters().TxFrames == 1 })
	rings := h.Rings()
	assert.Equal(t, vring.RingSnapshot{}, rings[0], "receive queue not started")
	assert.Equal(t, uint16(1), rings[1].AvailIdx)
	assert.Equal(t, uint16(1), rings[1].UsedIdx)
}

// startTxOnly negotiates f on h and starts its transmit queue alone (ring
// of size, no kick or call eventfd: the worker polls) in guest memory of
// its own, and returns the driver side of that queue; h is reset when the
// test ends.
func startTxOnly(t *testing.T, h *Handler, f virtio.Features, size uint16) *vringtest.Driver {
	t.Helper()
	r, err := vring.NewMemfdRegion(0, 4<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	require.NoError(t, h.SetFeatures(f))
	l := vring.ContiguousLayout(0, size)
	drv, err := vringtest.NewDriver(mem, vringtest.DriverOptions{Index: 1, Layout: l, Features: f,
		Data: 0x10000, SlotSize: 2048})
	require.NoError(t, err)
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: 1, Layout: l, Features: f})
	require.NoError(t, err)
	require.NoError(t, h.StartQueue(1, dq, nil, nil))
	t.Cleanup(h.Reset)
	return drv
}
