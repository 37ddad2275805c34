package vhostusertest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// TestTruncatedMemoryStopsWorker: the front-end's memory file loses the
// transmit buffers' pages while the handler runs. The worker's access
// faults; the fault is reported as a queue error matching
// vring.ErrMemoryFault (which the vhost-user back-end turns into
// NEEDS_RESET and an error eventfd signal), and the process goes on.
func TestTruncatedMemoryStopsWorker(t *testing.T) {
	const size = 64
	ringBytes := (vring.ContiguousLayoutBytes(size) + 4095) &^ 4095
	dopts := vringtest.DriverOptions{Layout: vring.Layout{Size: size}, SlotSize: 2048}
	per := ringBytes + (dopts.DataBytes()+4095)&^4095
	var fds [2]int
	var regions []*vring.Region
	for i := range fds {
		fd, err := unix.MemfdCreate("front-end", unix.MFD_CLOEXEC)
		require.NoError(t, err)
		t.Cleanup(func() { unix.Close(fd) })
		require.NoError(t, unix.Ftruncate(fd, int64(per)))
		r, err := vring.NewFdRegion(vring.GuestAddr(uint64(i)*per), per, fd, 0, nil)
		require.NoError(t, err)
		require.False(t, r.Sealed(), "a memfd without MFD_ALLOW_SEALING cannot be sealed")
		regions = append(regions, r)
		fds[i] = fd
	}
	mem, err := vring.NewMemory(regions...)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })

	f := virtio.Features(0).With(virtio.FVersion1)
	h := New(Sink, devMAC)
	require.NoError(t, h.SetFeatures(f))
	var drv [2]*vringtest.Driver
	var kicks [2]*vdpa.EventFD
	for q := range 2 {
		l := vring.ContiguousLayout(vring.GuestAddr(uint64(q)*per), size)
		drv[q], err = vringtest.NewDriver(mem, vringtest.DriverOptions{Index: q, Layout: l, Features: f,
			Data: l.Desc + vring.GuestAddr(ringBytes), SlotSize: 2048})
		require.NoError(t, err)
		dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: q, Layout: l, Features: f})
		require.NoError(t, err)
		kick, err := vdpa.NewEventFD()
		require.NoError(t, err)
		t.Cleanup(func() { kick.Close() })
		kicks[q] = kick
		require.NoError(t, h.StartQueue(q, dq, kick, nil))
	}
	defer h.Reset()

	_, err = drv[1].Add([][]byte{make([]byte, 12), []byte("before")}, nil)
	require.NoError(t, err)
	drv[1].Queue.Publish()
	// Kick as a driver must: an idle worker sleeps on its kick eventfd
	// (on a slow machine it is asleep before the first frame arrives).
	if drv[1].Queue.NeedsKick() {
		require.NoError(t, kicks[1].Signal())
	}
	waitFor(t, func() bool { return h.Counters().TxFrames == 1 })
	assert.NoError(t, h.QueueErr(1))

	// Sink reads no frame bytes, only the rings: the front-end takes the
	// transmit queue's whole file away and kicks; the next poll faults on
	// the available ring.
	require.NoError(t, unix.Ftruncate(fds[1], 0))
	require.NoError(t, kicks[1].Signal())
	waitFor(t, func() bool { return h.QueueErr(1) != nil })
	assert.ErrorIs(t, h.QueueErr(1), vring.ErrMemoryFault)
	assert.ErrorIs(t, h.QueueErr(0), vring.ErrMemoryFault, "one worker serves both queues")
	assert.ErrorIs(t, h.Err(), vring.ErrMemoryFault)

	h.Reset()
	assert.NoError(t, h.QueueErr(1), "a reset clears the fault")
}

// waitFor polls cond; the deadline only guards against a hang.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		require.True(t, time.Now().Before(deadline), "condition not reached")
		time.Sleep(time.Millisecond)
	}
}
