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

// TestRelayGuestMemoryAtTheTop: the shadow rings go at the first 2 MiB
// boundary above guest memory. Guest memory that reaches the top of the
// address space (a DMA map may put a window there) leaves no room: the
// relay refuses with vring.ErrOverflow, where it used to take the wrapped
// end (0) and place its rings over guest memory at address 0. Found by a
// review.
func TestRelayGuestMemoryAtTheTop(t *testing.T) {
	const size = 16 << 20
	low, err := vring.NewMemfdRegion(0, size, nil)
	require.NoError(t, err)
	high, err := vring.NewMemfdRegion(^vring.GuestAddr(0)-0xfff, 0x1000, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(low, high)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	s := newSideOnMemory(t, mem, &mdev.Options{DirtyMode: mdev.DirtyRelay, Backend: "software"})
	g, err := mdevtest.Boot(s.dev, s.mem, 50, nil)
	require.NoError(t, err)
	log, err := dirty.New(size, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, s)
	_, err = s.dev.StartDirtyTracking(log)
	require.ErrorIs(t, err, vring.ErrOverflow, "no shadow rings over guest memory")
	assert.ErrorIs(t, s.dev.Err(), vring.ErrOverflow)
	assert.NotZero(t, s.dev.Status()&virtio.StatusDeviceNeedsReset)
	assert.False(t, g.Done())
}
