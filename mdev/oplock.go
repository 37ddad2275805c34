package mdev

import (
	"context"
	"fmt"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Locking. A Device has two locks:
//
//   - ops serialises back-end operations: everything that calls the backing
//     device (a vdpa.Device is not safe for concurrent control calls) or
//     changes the data path's state (live, negotiated, relay, tracking, the
//     migration state, the recorded queue positions). It is held for a whole
//     operation — a status write, a migration transition, a dirty-tracking
//     switch, Close — and taken first.
//   - mu guards the register file and the rest of the device's fields. An
//     operation holds it while it reads or changes them, and releases it
//     around every call into the backing device (through d.bk), so a slow
//     back-end never holds it: guest register reads, and writes that need no
//     back-end, go on meanwhile.
//
// Guest reads never wait for ops: a read that would consult the backing
// device (device_status polls it for a failed data path, config_generation
// and the device configuration read it) does so only when no operation is
// in progress, and otherwise answers from the device's own copy (the status
// as last known, the configuration as last read). Guest writes that need
// the back-end (device_status, queue_msix_vector, the device configuration,
// and the PCI configuration space, whose PCI_CFG window reaches them) take
// ops; all others take only mu.
//
// Blocking entry points have Context variants: ctx bounds the wait for ops
// (an operation already running in the back-end cannot be interrupted).

// opLock is a mutex whose Lock can give up when a context ends.
type opLock chan struct{}

func newOpLock() opLock { return make(opLock, 1) }

func (l opLock) lock(ctx context.Context) error {
	select {
	case l <- struct{}{}:
		return nil
	default:
	}
	select {
	case l <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("mdev: waiting for a back-end operation in progress: %w", context.Cause(ctx))
	}
}

func (l opLock) tryLock() bool {
	select {
	case l <- struct{}{}:
		return true
	default:
		return false
	}
}

func (l opLock) unlock() { <-l }

// begin starts a back-end operation: ops, then mu.
func (d *Device) begin(ctx context.Context) error {
	if err := d.ops.lock(ctx); err != nil {
		return err
	}
	d.mu.Lock()
	return nil
}

// end ends an operation started with begin (or a guest access that took
// ops and mu itself), first handling a configuration change reported
// meanwhile (ConfigChanged does not wait for
// operations). A report that comes in after that check, once the register
// lock is released, either finds ops free or is seen by the second check.
func (d *Device) end() {
	if d.lookPending {
		d.lookPending = false
		if d.opts.HealthInterval >= 0 { // negative: the guest's status reads only
			d.checkBacking()
		}
	}
	if d.cfgPending {
		d.configChanged()
	}
	d.mu.Unlock()
	d.ops.unlock()
	d.mu.Lock()
	again := d.cfgPending || d.lookPending
	d.mu.Unlock()
	if again && d.ops.tryLock() {
		d.mu.Lock()
		d.end()
	}
}

// unlockedBacking calls the backing device with d.mu released. Callers hold
// d.ops (no other operation runs) and d.mu, which they hold again when the
// call returns; the device's fields may have been changed meanwhile only by
// guest accesses that need no back-end, and by a data-path failure report
// (NEEDS_RESET).
type unlockedBacking struct {
	d *Device
	b vdpa.Device
}

func (u unlockedBacking) call(fn func() error) (err error) {
	u.d.mu.Unlock()
	defer func() {
		u.d.mu.Lock()
		if err != nil {
			// The backing device may have failed: look at it when this
			// operation ends (health.go).
			u.d.lookPending = true
		}
	}()
	return fn()
}

func (u unlockedBacking) SetFeatures(f virtio.Features) error {
	return u.call(func() error { return u.b.SetFeatures(f) })
}

func (u unlockedBacking) Status() (st virtio.Status, err error) {
	err = u.call(func() (e error) { st, e = u.b.Status(); return })
	return st, err
}

func (u unlockedBacking) SetStatus(s virtio.Status) error {
	return u.call(func() error { return u.b.SetStatus(s) })
}

func (u unlockedBacking) ReadConfig(off int, p []byte) error {
	return u.call(func() error { return u.b.ReadConfig(off, p) })
}

func (u unlockedBacking) WriteConfig(off int, p []byte) error {
	return u.call(func() error { return u.b.WriteConfig(off, p) })
}

func (u unlockedBacking) SetMemory(m *vring.Memory) error {
	return u.call(func() error { return u.b.SetMemory(m) })
}

func (u unlockedBacking) SetQueueNum(q int, n uint16) error {
	return u.call(func() error { return u.b.SetQueueNum(q, n) })
}

func (u unlockedBacking) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	return u.call(func() error { return u.b.SetQueueAddr(q, a) })
}

func (u unlockedBacking) SetQueueBase(q int, st vring.QueueState) error {
	return u.call(func() error { return u.b.SetQueueBase(q, st) })
}

func (u unlockedBacking) QueueBase(q int) (st vring.QueueState, err error) {
	err = u.call(func() (e error) { st, e = u.b.QueueBase(q); return })
	return st, err
}

func (u unlockedBacking) SetQueueKick(q int, e *vdpa.EventFD) error {
	return u.call(func() error { return u.b.SetQueueKick(q, e) })
}

func (u unlockedBacking) SetQueueCall(q int, e *vdpa.EventFD) error {
	return u.call(func() error { return u.b.SetQueueCall(q, e) })
}

func (u unlockedBacking) EnableQueue(q int, en bool) error {
	return u.call(func() error { return u.b.EnableQueue(q, en) })
}

// Suspend suspends the backing device if it is a vdpa.Suspender (ok false
// otherwise).
func (u unlockedBacking) Suspend() (ok bool, err error) {
	s, ok := u.b.(vdpa.Suspender)
	if !ok {
		return false, nil
	}
	return true, u.call(s.Suspend)
}

// SetLog sets the backing device's dirty log; it must be a vdpa.Logger.
func (u unlockedBacking) SetLog(log *dirty.Bitmap) error {
	lg, ok := u.b.(vdpa.Logger)
	if !ok {
		return fmt.Errorf("%w: dirty logging", ErrNotSupported)
	}
	return u.call(func() error { return lg.SetLog(log) })
}
