package mdev

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// watching reports whether a health watcher runs, and its done channel.
func (d *Device) watching() (bool, chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.watchStop != nil, d.watchDone
}

// waitConfigSignal waits until the device's configuration eventfd is
// signalled and returns its count.
func waitConfigSignal(t *testing.T, d *Device, limit time.Duration) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	n, err := d.ConfigFD().Wait(ctx)
	require.NoError(t, err, "no configuration change notification within %v", limit)
	return n
}

// TestHealthWatcherReportsBackingFailure: a backing device that fails on
// its own while live (its status shows DEVICE_NEEDS_RESET) makes the device
// set NEEDS_RESET and send the configuration change notification (§2.1.2:
// a device with DRIVER_OK that sets DEVICE_NEEDS_RESET MUST send it),
// without the guest reading device_status first. Before this watcher the
// guest learned it only by reading device_status, which a driver does only
// when notified.
func TestHealthWatcherReportsBackingFailure(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, &Options{HealthInterval: time.Millisecond})
	g := driver{t, d}
	on, _ := d.watching()
	assert.False(t, on, "no watcher before DRIVER_OK")
	g.bringUp(netFeatures)
	on, done := d.watching()
	require.True(t, on, "a live device is watched")

	f.mu.Lock()
	f.status |= sNR
	f.mu.Unlock()
	assert.EqualValues(t, 1, waitConfigSignal(t, d, 10*time.Second))
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, d.Status(), "without a device_status read")
	assert.Equal(t, ISRConfig, d.ISRPending()&ISRConfig)
	assert.ErrorIs(t, d.Err(), ErrBacking)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher goes on after NEEDS_RESET")
	}
	on, _ = d.watching()
	assert.False(t, on)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status(), "the guest's read agrees")
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "one notification, not one per look")

	// Reset and a new driver session: watched again, and a second failure
	// is reported again.
	g.setStatus(0)
	assert.Zero(t, g.status())
	g.bringUp(netFeatures)
	on, _ = d.watching()
	require.True(t, on, "watched again after a reset and DRIVER_OK")
	f.mu.Lock()
	f.status |= sNR
	f.mu.Unlock()
	assert.EqualValues(t, 1, waitConfigSignal(t, d, 10*time.Second))
	assert.NotZero(t, d.Status()&sNR)
}

// TestHealthWatcherLifetime: the watcher runs only while the device is
// live, not at all with a negative interval, and Close ends it before it
// returns.
func TestHealthWatcherLifetime(t *testing.T) {
	for _, tc := range []struct {
		name     string
		interval time.Duration
		watched  bool
	}{
		{"default", 0, true},
		{"one millisecond", time.Millisecond, true},
		{"disabled", -1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			d, err := NewDevice(f, &Options{Memory: testMemory(t), HealthInterval: tc.interval})
			require.NoError(t, err)
			g := driver{t, d}
			g.bringUp(netFeatures)
			on, done := d.watching()
			require.Equal(t, tc.watched, on)
			if !tc.watched {
				// The guest still learns of the failure by reading.
				f.mu.Lock()
				f.status |= sNR
				f.mu.Unlock()
				assert.NotZero(t, g.status()&sNR)
				require.NoError(t, d.Close())
				return
			}
			require.NoError(t, d.Close())
			select {
			case <-done:
			default:
				t.Fatal("Close returned with the watcher running")
			}
			on, _ = d.watching()
			assert.False(t, on)
		})
	}
}

// TestHealthWatcherEndsWhenNotLive: a reset takes the device out of live;
// the watcher ends at its next look rather than polling an idle backing
// device.
func TestHealthWatcherEndsWhenNotLive(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, &Options{HealthInterval: time.Millisecond})
	g := driver{t, d}
	g.bringUp(netFeatures)
	on, done := d.watching()
	require.True(t, on)
	g.setStatus(0)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the watcher of a reset device goes on")
	}
	on, _ = d.watching()
	assert.False(t, on)
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "a healthy device sends no notification")
}

// notifyingBacking is a fakeBacking that announces failures
// (vdpa.FailureNotifier) and counts the watcher's looks (Status calls).
type notifyingBacking struct {
	*fakeBacking
	ch    chan struct{}
	looks atomic.Int32
}

func (n *notifyingBacking) FailureNotify() <-chan struct{} { return n.ch }

// newNotifyingDevice is a device over a new notifyingBacking, with the
// given health interval.
func newNotifyingDevice(t *testing.T, every time.Duration) (*notifyingBacking, *Device) {
	t.Helper()
	f := &notifyingBacking{fakeBacking: newFakeBacking(), ch: make(chan struct{}, 1)}
	d, err := NewDevice(f, &Options{Memory: testMemory(t), HealthInterval: every})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return f, d
}

func (n *notifyingBacking) Status() (virtio.Status, error) {
	n.looks.Add(1)
	return n.fakeBacking.Status()
}

// TestHealthWatcherAnnouncedNotPolled: a backing device that announces its
// failures is looked at when the device goes live (by the operation that
// makes it live, for a failure announced before) and then only when it
// announces one, however short the interval; an announcement is acted on
// at once; and the watcher stays for the device's next session, so that
// the announcements have one receiver until Close.
func TestHealthWatcherAnnouncedNotPolled(t *testing.T) {
	f, d := newNotifyingDevice(t, time.Millisecond)
	g := driver{t, d}
	g.bringUp(netFeatures)
	on, done := d.watching()
	require.True(t, on)
	before := f.looks.Load()
	require.NotZero(t, before, "looked at when going live")
	time.Sleep(200 * time.Millisecond) // 200 intervals
	assert.Equal(t, before, f.looks.Load(), "looks without an announcement")

	// An announcement that finds the backing device healthy is one look.
	f.ch <- struct{}{}
	require.Eventually(t, func() bool { return f.looks.Load() == before+1 }, 10*time.Second, time.Millisecond)
	assert.Zero(t, d.Status()&sNR)

	f.mu.Lock()
	f.status |= sNR
	f.mu.Unlock()
	f.ch <- struct{}{}
	assert.EqualValues(t, 1, waitConfigSignal(t, d, 10*time.Second))
	assert.NotZero(t, d.Status()&sNR)

	// Reset: the watcher stays (an announcement now is a look at a device
	// that is not live), and the next session is watched by it.
	g.setStatus(0)
	f.mu.Lock()
	f.status = 0
	f.mu.Unlock()
	f.ch <- struct{}{}
	time.Sleep(20 * time.Millisecond)
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "no notification for a device that is not live")
	g.bringUp(netFeatures)
	on, done2 := d.watching()
	require.True(t, on)
	assert.Equal(t, done, done2, "the same watcher")
	f.mu.Lock()
	f.status |= sNR
	f.mu.Unlock()
	f.ch <- struct{}{}
	assert.EqualValues(t, 1, waitConfigSignal(t, d, 10*time.Second))
	require.NoError(t, d.Close())
	select {
	case <-done:
	default:
		t.Fatal("Close returned with the watcher running")
	}
}

// An announcement while an operation holds the device is acted on when
// that operation ends, not an interval later.
func TestHealthWatcherAnnouncementDuringOperation(t *testing.T) {
	f, d := newNotifyingDevice(t, time.Hour)
	g := driver{t, d}
	g.bringUp(netFeatures)
	// An operation in progress, calling the backing device (mu released,
	// as unlockedBacking does).
	require.NoError(t, d.begin(context.Background()))
	d.mu.Unlock()
	ended := false
	defer func() { // a failed check must not leave Close waiting for ops
		if !ended {
			d.mu.Lock()
			d.end()
		}
	}()
	f.mu.Lock()
	f.status |= sNR
	f.mu.Unlock()
	looks := f.looks.Load()
	f.ch <- struct{}{}
	require.Eventually(t, func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.lookPending
	}, 10*time.Second, time.Millisecond, "the watcher leaves the look to the operation")
	assert.Equal(t, looks, f.looks.Load(), "no look while the operation runs")
	d.mu.Lock()
	ended = true
	d.end()
	assert.EqualValues(t, 1, waitConfigSignal(t, d, 10*time.Second))
	assert.NotZero(t, d.Status()&sNR)
}
