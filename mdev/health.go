package mdev

import (
	"fmt"
	"time"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
)

// DefaultHealthInterval is how often a live device asks its backing device
// whether the data path has failed, unless Options.HealthInterval says
// otherwise.
const DefaultHealthInterval = 50 * time.Millisecond

// The health watcher. A backing device can give up on its own while live:
// a software device breaks a queue whose ring the guest made invalid, a
// vhost-user back-end goes away. The spec then wants the device to set
// DEVICE_NEEDS_RESET and, with DRIVER_OK set, to send a configuration
// change notification (§2.1.2). A guest learns of it by reading
// device_status (commonRead asks the backing device then), but a driver
// reads it only when told to, so a watcher goroutine asks the backing
// device and, when it reports DEVICE_NEEDS_RESET or FAILED, sets
// NEEDS_RESET here, which raises the configuration interrupt.
//
// A backing device that announces possible failures (a
// vdpa.FailureNotifier with a channel: vdpa.Local over softnet) is asked
// when it announces one. Its watcher starts when the device first goes
// live and runs until Close, so that one receiver, always the same, takes
// the announcements: one that comes while the device is not live is a look
// that finds nothing. Any other backing device is asked every
// HealthInterval while the device is live; its watcher starts when the
// device goes live and ends at the first look that finds it otherwise.
//
// A look never waits for an operation: when one is in progress the
// watcher leaves the look to it (lookPending, done by end), so an
// announcement is acted on as soon as the operation ends. The same flag
// makes an operation look when it made the device live (a failure may have
// been announced before the watcher could hear it), and when a call to the
// backing device failed (the backing device may have set
// DEVICE_NEEDS_RESET itself, which it does not announce: vdpa.Local
// failing to restart a queue for a new dirty log).

// startWatch has the backing device looked at once the current operation
// ends, and starts the health watcher unless one runs or it is disabled.
// goLive calls it; the caller holds ops and mu.
func (d *Device) startWatch() {
	if d.opts.HealthInterval < 0 || d.closed {
		return
	}
	d.lookPending = true
	if d.watchStop != nil {
		return
	}
	every := d.opts.HealthInterval
	if every == 0 {
		every = DefaultHealthInterval
	}
	var notify <-chan struct{}
	if n, ok := d.bk.b.(vdpa.FailureNotifier); ok {
		notify = n.FailureNotify()
	}
	stop, done := make(chan struct{}), make(chan struct{})
	d.watchStop, d.watchDone = stop, done
	go d.watch(every, notify, stop, done)
}

// stopWatch tells the watcher to end and returns the channel its end
// closes (nil if none runs). The caller holds mu, and waits on the
// channel only once it has released ops and mu.
func (d *Device) stopWatch() chan struct{} {
	if d.watchStop == nil {
		return nil
	}
	close(d.watchStop)
	done := d.watchDone
	d.watchStop, d.watchDone = nil, nil
	return done
}

// watch is the watcher: it looks at the backing device at every
// announcement on notify or, without one, at every tick.
func (d *Device) watch(every time.Duration, notify <-chan struct{}, stop, done chan struct{}) {
	defer close(done)
	var tick <-chan time.Time
	if notify == nil {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-stop:
			return
		case <-tick:
		case <-notify:
		}
		if !d.lookAtBacking(stop, notify != nil) {
			return
		}
	}
}

// lookAtBacking is one look of the watcher whose stop channel is stop. It
// reports whether the watcher goes on: until Close for an announcing
// backing device (untilClose), otherwise while the device is live.
func (d *Device) lookAtBacking(stop chan struct{}, untilClose bool) bool {
	if !d.ops.tryLock() {
		// An operation is in progress: its end looks.
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.watchStop != stop {
			return false
		}
		d.lookPending = true
		return true
	}
	d.mu.Lock()
	if d.watchStop != stop { // stopped (Close) meanwhile
		d.mu.Unlock()
		d.ops.unlock()
		return false
	}
	d.checkBacking()
	if !untilClose && (!d.live || d.status&virtio.StatusDeviceNeedsReset != 0) {
		// Nothing more to watch until the device goes live again.
		d.watchStop, d.watchDone = nil, nil
		d.end()
		return false
	}
	d.end()
	return true
}

// checkBacking asks a live backing device for its status and sets
// DEVICE_NEEDS_RESET (with the configuration change notification) when it
// reports a failure or cannot answer. The caller holds ops and mu.
func (d *Device) checkBacking() {
	if !d.live || d.status&virtio.StatusDeviceNeedsReset != 0 {
		return
	}
	if st, err := d.bk.Status(); err != nil {
		d.needsReset(backingErr("status", err))
	} else if st&(virtio.StatusDeviceNeedsReset|virtio.StatusFailed) != 0 {
		d.needsReset(backingErr("status", fmt.Errorf("backing device status %s", st)))
	}
}
