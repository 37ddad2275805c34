package mdev_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// TestBrokenRingNotifiesGuest: on the direct data path (no relay) a guest
// ring that breaks the rules (avail.idx jumps by more than the queue size,
// §2.7.13.3) is caught by the software backing device, which breaks the
// queue and sets its own DEVICE_NEEDS_RESET. The mediated device must pass
// that on with the configuration change notification (§2.1.2) by itself:
// here the guest never reads device_status until the notification came.
func TestBrokenRingNotifiesGuest(t *testing.T) {
	s := newSide(t, testGuestMem, mdev.DirtyAuto)
	g, err := mdevtest.Boot(s.dev, s.mem, 100, nil)
	require.NoError(t, err)
	for !g.Done() {
		g.Step()
	}
	require.NoError(t, g.Verify())
	n, err := s.dev.ConfigFD().TryWait()
	require.NoError(t, err)
	require.Zero(t, n, "no notification while healthy")

	// transmitq0's avail.idx (mdevtest's layout: the TX ring at 0x11000,
	// a descriptor table of 16*256 bytes), then its kick.
	require.NoError(t, s.mem.Write(vring.GuestAddr(0x11000+16*256+2), []byte{0x00, 0x40}))
	require.NoError(t, s.dev.Write(mdev.RegionNotify, 1*mdev.NotifyOffMultiplier, 2, 1))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err = s.dev.ConfigFD().Wait(ctx)
	require.NoError(t, err, "the configuration change notification")
	assert.EqualValues(t, 1, n)
	assert.NotZero(t, s.dev.Status()&virtio.StatusDeviceNeedsReset)
	assert.ErrorIs(t, s.dev.Err(), mdev.ErrBacking)
	isr, err := s.dev.Read(mdev.RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, mdev.ISRConfig, isr&uint64(mdev.ISRConfig), "ISR says configuration change")

	// Reset recovers the device.
	require.NoError(t, s.dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, 0))
	assert.EqualValues(t, 0, s.dev.Status())
}
