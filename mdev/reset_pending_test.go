package mdev

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
)

// A guest reset must stop the device's use of guest memory before the
// driver reuses it: the driver writes 0 and waits for device_status to read
// 0 (virtio 1.2 §2.4, §4.1.4.3.2). When the backing device refuses its
// reset it may still be processing the rings, so the reset is not complete:
// status reads DEVICE_NEEDS_RESET, the driver's other status writes are
// ignored, Err says why, and each status read retries until the backing
// device resets. A backing device that is gone (vdpa.ErrClosed) counts as
// reset.
func TestGuestResetWaitsForBackingReset(t *testing.T) {
	resetOp := fmt.Sprintf("SetStatus(%s)", virtio.Status(0))
	full := virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK

	t.Run("refused, then done", func(t *testing.T) {
		f := newFakeBacking()
		d := newTestDevice(t, f, nil)
		g := driver{t, d}
		g.bringUp(netFeatures)
		require.Equal(t, full, g.status())

		f.mu.Lock()
		f.failOn[resetOp] = true
		f.mu.Unlock()
		g.setStatus(0)
		assert.Equal(t, virtio.StatusDeviceNeedsReset, g.status(), "reset reported done while the backing device runs")
		assert.ErrorIs(t, d.Err(), errInjected)
		f.mu.Lock()
		assert.Equal(t, full, f.status, "backing device status")
		f.mu.Unlock()

		// The driver does not wait (against §2.4): nothing it writes takes.
		g.setStatus(virtio.StatusAcknowledge)
		assert.Equal(t, virtio.StatusDeviceNeedsReset, g.status())
		// The migration stream carries a completed reset: the
		// destination's backing device is another one.
		assert.Equal(t, virtio.Status(0), d.State().Status)

		f.mu.Lock()
		delete(f.failOn, resetOp)
		f.mu.Unlock()
		assert.Equal(t, virtio.Status(0), g.status(), "a status read retries the backing reset")
		assert.NoError(t, d.Err())
		f.mu.Lock()
		assert.Equal(t, virtio.Status(0), f.status)
		f.mu.Unlock()

		g.bringUp(netFeatures)
		assert.Equal(t, full, g.status())
	})

	t.Run("refused, then reset again by the driver", func(t *testing.T) {
		f := newFakeBacking()
		d := newTestDevice(t, f, nil)
		g := driver{t, d}
		g.bringUp(netFeatures)
		f.mu.Lock()
		f.failOn[resetOp] = true
		f.mu.Unlock()
		g.setStatus(0)
		f.mu.Lock()
		delete(f.failOn, resetOp)
		f.mu.Unlock()
		g.setStatus(0)
		assert.Equal(t, virtio.Status(0), g.status())
		assert.NoError(t, d.Err())
	})

	t.Run("backing device gone", func(t *testing.T) {
		f := newFakeBacking()
		// No health watcher: the test swaps the backing device under it.
		d := newTestDevice(t, f, &Options{HealthInterval: -1})
		g := driver{t, d}
		g.bringUp(netFeatures)
		gone := &closedBacking{fakeBacking: f}
		d.bk.b = gone
		g.setStatus(0)
		assert.Equal(t, virtio.Status(0), g.status())
		assert.NoError(t, d.Err())
		assert.Equal(t, 1, gone.resets)
	})
}

// closedBacking is a backing device whose connection is gone: its reset
// fails with vdpa.ErrClosed.
type closedBacking struct {
	*fakeBacking
	resets int
}

func (c *closedBacking) SetStatus(s virtio.Status) error {
	if s == 0 {
		c.resets++
		return fmt.Errorf("reset: %w", vdpa.ErrClosed)
	}
	return c.fakeBacking.SetStatus(s)
}

// A negotiation the backing device fails part-way (features refused,
// FEATURES_OK refused or not kept) leaves it reset, not half set up: the
// guest reads FEATURES_OK clear and the backing device holds no status
// or features of the failed attempt.
func TestFailedNegotiationResetsBacking(t *testing.T) {
	for _, fault := range []string{
		"SetFeatures",
		fmt.Sprintf("SetStatus(%s)", virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK),
		"refuse FEATURES_OK",
	} {
		t.Run(fault, func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, nil)
			g := driver{t, d}
			f.mu.Lock()
			if fault == "refuse FEATURES_OK" {
				f.refuseFOK = true
			} else {
				f.failOn[fault] = true
			}
			f.mu.Unlock()
			g.setStatus(virtio.StatusAcknowledge)
			g.setStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
			g.writeFeatures(netFeatures)
			g.setStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
			assert.Zero(t, g.status()&virtio.StatusFeaturesOK, "FEATURES_OK kept")
			f.mu.Lock()
			assert.Equal(t, virtio.Status(0), f.status, "backing device status")
			assert.Zero(t, f.accepted, "backing device features")
			ops := append([]string(nil), f.ops...)
			f.mu.Unlock()
			require.NotEmpty(t, ops)
			assert.Equal(t, fmt.Sprintf("SetStatus(%s)", virtio.Status(0)), ops[len(ops)-1], "last operation")
		})
	}
}

// TestFailedWaitsForBackingReset: a driver that sets FAILED stops the data
// path by resetting the backing device; when that reset is refused, the
// backing device may still be processing the rings, so DataPathActive
// stays true (the VMM must not unmap guest memory yet) until a status
// read's retry succeeds. The refusal used to be ignored and the data path
// reported stopped at once.
func TestFailedWaitsForBackingReset(t *testing.T) {
	resetOp := fmt.Sprintf("SetStatus(%s)", virtio.Status(0))
	full := virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	require.True(t, d.DataPathActive())

	f.mu.Lock()
	f.failOn[resetOp] = true
	f.mu.Unlock()
	g.setStatus(full | virtio.StatusFailed)
	assert.True(t, d.DataPathActive(), "data path reported stopped while the backing device runs")
	assert.ErrorIs(t, d.Err(), errInjected)
	assert.NotZero(t, g.status()&virtio.StatusFailed)
	assert.True(t, d.DataPathActive(), "a failed retry keeps it pending")

	f.mu.Lock()
	delete(f.failOn, resetOp)
	f.mu.Unlock()
	assert.Equal(t, full|virtio.StatusFailed, g.status(), "a status read retries the backing reset; FAILED stays")
	assert.False(t, d.DataPathActive())
	assert.NoError(t, d.Err())
	f.mu.Lock()
	assert.Equal(t, virtio.Status(0), f.status)
	f.mu.Unlock()
}
