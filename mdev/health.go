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
// reads it only when told to, so while the device is live a watcher
// goroutine asks the backing device and, when it reports
// DEVICE_NEEDS_RESET or FAILED, sets NEEDS_RESET here, which raises the
// configuration interrupt.
//
// It asks when the backing device announces a possible failure (a
// vdpa.FailureNotifier with a channel: vdpa.Local over softnet), and
// otherwise every HealthInterval. A device that announces costs nothing
// while healthy and is noticed at once; the others cost a look per
// interval.
//
// The watcher runs only while the device is live and not yet NEEDS_RESET:
// goLive starts it, and it ends itself at the first look that finds the
// device otherwise (or when Close stops it). It never waits for a back-end
// operation: when one is in progress it looks again an interval later.

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

// watch is the watcher: it looks at the backing device at every tick, or,
// with notify, at every announcement, and an interval after a look that
// found an operation in progress. With notify it also looks once an
// interval after it starts, for a failure announced before (its
// announcement may have gone to the previous watcher).
func (d *Device) watch(every time.Duration, notify <-chan struct{}, stop, done chan struct{}) {
	defer close(done)
	var tick, retry <-chan time.Time
	if notify == nil {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	} else {
		retry = time.After(every)
	}
	for {
		select {
		case <-stop:
			return
		case <-tick:
		case <-notify:
		case <-retry:
		}
		retry = nil
		goOn, busy := d.lookAtBacking(stop)
		if !goOn {
			return
		}
		if busy && notify != nil {
			retry = time.After(every)
		}
	}
}

// lookAtBacking is one look of the watcher whose stop channel is stop. It
// reports whether the watcher goes on, and whether it could not look
// because an operation was in progress.
func (d *Device) lookAtBacking(stop chan struct{}) (goOn, busy bool) {
	if !d.ops.tryLock() {
		return true, true // an operation is in progress: later
	}
	d.mu.Lock()
	if d.watchStop != stop { // stopped (Close) meanwhile
		d.mu.Unlock()
		d.ops.unlock()
		return false, false
	}
	d.checkBacking()
	if !d.live || d.status&virtio.StatusDeviceNeedsReset != 0 {
		// Nothing more to watch until the device goes live again.
		d.watchStop, d.watchDone = nil, nil
		d.end()
		return false, false
	}
	d.end()
	return true, false
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
