package mdev

import (
	"fmt"
	"time"

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
// reads it only when told to, so while the device is live a watcher
// goroutine asks the backing device every HealthInterval and, when it
// reports DEVICE_NEEDS_RESET or FAILED, sets NEEDS_RESET here, which raises
// the configuration interrupt.
//
// The watcher runs only while the device is live and not yet NEEDS_RESET:
// goLive starts it, and it ends itself at the first look that finds the
// device otherwise (or when Close stops it). It never waits for a back-end
// operation: when one is in progress it looks again at the next tick.

// startWatch starts the health watcher unless one runs or it is disabled.
// The caller holds ops and mu.
func (d *Device) startWatch() {
	if d.opts.HealthInterval < 0 || d.watchStop != nil || d.closed {
		return
	}
	every := d.opts.HealthInterval
	if every == 0 {
		every = DefaultHealthInterval
	}
	stop, done := make(chan struct{}), make(chan struct{})
	d.watchStop, d.watchDone = stop, done
	go d.watch(every, stop, done)
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

func (d *Device) watch(every time.Duration, stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if !d.lookAtBacking(stop) {
			return
		}
	}
}

// lookAtBacking is one look of the watcher whose stop channel is stop. It
// reports whether the watcher goes on.
func (d *Device) lookAtBacking(stop chan struct{}) bool {
	if !d.ops.tryLock() {
		return true // an operation is in progress: next tick
	}
	d.mu.Lock()
	if d.watchStop != stop { // stopped (Close) meanwhile
		d.mu.Unlock()
		d.ops.unlock()
		return false
	}
	d.checkBacking()
	if !d.live || d.status&virtio.StatusDeviceNeedsReset != 0 {
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
