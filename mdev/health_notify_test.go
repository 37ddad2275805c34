package mdev_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// A backing device that announces its failures (vdpa.Local over softnet,
// a vdpa.FailureNotifier) is not polled: with an hour between looks, a
// guest that breaks its transmit ring under the software device still
// gets DEVICE_NEEDS_RESET and the configuration change notification
// (§2.1.2) at once, without reading device_status.
func TestHealthWatcherWaitsForAnnouncedFailure(t *testing.T) {
	s := newSideWith(t, testGuestMem, &mdev.Options{HealthInterval: time.Hour})
	dev, mem, local := s.dev, s.mem, s.local
	require.NotNil(t, local.FailureNotify(), "Local over softnet announces failures")

	g, err := mdevtest.Boot(dev, mem, 100, nil)
	require.NoError(t, err)
	for !g.Done() {
		g.Step()
	}
	require.NoError(t, g.Verify())
	n, err := dev.ConfigFD().TryWait()
	require.NoError(t, err)
	require.Zero(t, n, "no configuration change while healthy")

	// transmitq0's avail.idx (mdevtest: the TX ring at 0x11000, desc
	// table 16*256 bytes) jumps by more than the queue size (§2.7.13.3).
	require.NoError(t, mem.Write(vring.GuestAddr(0x11000+16*256+2), []byte{0x00, 0x40}))
	require.NoError(t, dev.Write(mdev.RegionNotify, 1*mdev.NotifyOffMultiplier, 2, 1))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err = dev.ConfigFD().Wait(ctx)
	require.NoError(t, err, "no configuration change notification: the failure was not announced (the next look is an hour away)")
	assert.EqualValues(t, 1, n)
	assert.NotZero(t, dev.Status()&virtio.StatusDeviceNeedsReset, "without a device_status read")
	assert.ErrorIs(t, dev.Err(), mdev.ErrBacking)

	// A reset recovers the device, and it is watched again.
	require.NoError(t, dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, 0))
	assert.EqualValues(t, 0, dev.Status())
}

// A failure the backing device causes itself while an operation calls it
// is not announced (vdpa.Local does not announce its own state): here
// Local restarts its queues for a new dirty log too small for the rings,
// one fails to start, and Local sets DEVICE_NEEDS_RESET. The failed call
// makes the operation look at the backing device when it ends, so the
// guest still gets DEVICE_NEEDS_RESET and the configuration change
// notification, as it did when the watcher polled.
func TestFailedBackingCallLooksAtBacking(t *testing.T) {
	s := newSideWith(t, testGuestMem, &mdev.Options{DirtyMode: mdev.DirtyDeviceLog, HealthInterval: time.Hour})
	dev, mem, local := s.dev, s.mem, s.local
	g, err := mdevtest.Boot(dev, mem, 50, nil)
	require.NoError(t, err)
	for !g.Done() {
		g.Step()
	}
	require.NoError(t, g.Verify())

	log, err := dirty.New(64<<10, nil) // the first 64 KiB of guest memory: the rings lie beyond it
	require.NoError(t, err)
	t.Cleanup(func() { _ = log.Close() })
	_, err = dev.StartDirtyTracking(log)
	require.Error(t, err)
	st, err := local.Status()
	require.NoError(t, err)
	require.NotZero(t, st&virtio.StatusDeviceNeedsReset, "the backing device set NEEDS_RESET itself")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := dev.ConfigFD().Wait(ctx)
	require.NoError(t, err, "no configuration change notification")
	assert.EqualValues(t, 1, n)
	assert.NotZero(t, dev.Status()&virtio.StatusDeviceNeedsReset)
}
