package mdev_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// TestRelayTruncatedGuestMemoryNeedsReset: guest memory is a file its owner
// truncates while the shadow relay serves the guest. The relay worker's
// next access faults; the device gets DEVICE_NEEDS_RESET with an error
// matching vring.ErrMemoryFault, and the process goes on (a reset works).
func TestRelayTruncatedGuestMemoryNeedsReset(t *testing.T) {
	const size = 16 << 20
	fd, s := unsealedSide(t, size, mdev.DirtyRelay)
	dev, mem := s.dev, s.mem
	g, err := mdevtest.Boot(dev, mem, 50, nil)
	require.NoError(t, err)
	log, err := dirty.New(size, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, s)
	_, err = dev.StartDirtyTracking(log)
	require.NoError(t, err)
	for !g.Done() {
		g.Step()
	}

	require.NoError(t, unix.Ftruncate(fd, 0))
	require.NoError(t, dev.Write(mdev.RegionNotify, 1*mdev.NotifyOffMultiplier, 2, 1))
	deadline := time.Now().Add(10 * time.Second)
	for dev.Status()&virtio.StatusDeviceNeedsReset == 0 {
		require.True(t, time.Now().Before(deadline), "no NEEDS_RESET; status %v", dev.Status())
		time.Sleep(time.Millisecond)
	}
	assert.ErrorIs(t, dev.Err(), vring.ErrMemoryFault)
	require.NoError(t, dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, 0))
	assert.EqualValues(t, 0, dev.Status())
}
