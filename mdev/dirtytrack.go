package mdev

import (
	"context"
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
)

// DirtyMode is how guest-memory writes by the data path are tracked while
// the device is passed through.
type DirtyMode int

const (
	// DirtyAuto uses DirtyDeviceLog when the backing device implements
	// vdpa.Logger, DirtyRelay otherwise.
	DirtyAuto DirtyMode = iota
	// DirtyDeviceLog: the backing device logs its own writes into the
	// bitmap (vhost log, vhost-user LOG_BASE, the software device).
	DirtyDeviceLog
	// DirtyRelay: the backing device is moved onto shadow rings and a relay
	// forwards the guest's chains, marking every page written.
	DirtyRelay
)

func (m DirtyMode) String() string {
	switch m {
	case DirtyAuto:
		return "auto"
	case DirtyDeviceLog:
		return "device-log"
	case DirtyRelay:
		return "relay"
	}
	return fmt.Sprintf("DirtyMode(%d)", int(m))
}

// StartDirtyTracking makes every guest-memory write of the data path mark
// log (indexed by guest address), using Options.DirtyMode, and returns the
// mode in effect. The device may be live: switching into relay mode
// suspends the backing device, reads its ring positions and reprograms it
// onto shadow rings, losing and duplicating nothing. log must stay open
// until StopDirtyTracking or Close returns.
func (d *Device) StartDirtyTracking(log *dirty.Bitmap) (DirtyMode, error) {
	return d.StartDirtyTrackingContext(context.Background(), log)
}

// StartDirtyTrackingContext is StartDirtyTracking with ctx bounding the wait
// for a back-end operation in progress.
func (d *Device) StartDirtyTrackingContext(ctx context.Context, log *dirty.Bitmap) (DirtyMode, error) {
	if err := d.begin(ctx); err != nil {
		return 0, err
	}
	defer d.end()
	if log == nil {
		return 0, fmt.Errorf("%w: nil dirty bitmap", ErrInvalidOptions)
	}
	if d.tracking != DirtyAuto {
		return d.tracking, fmt.Errorf("%w: dirty tracking already on (%s)", ErrInvalidOptions, d.tracking)
	}
	mode := d.opts.DirtyMode
	_, canLog := d.backing.(vdpa.Logger)
	if mode == DirtyAuto {
		mode = DirtyRelay
		if canLog {
			mode = DirtyDeviceLog
		}
	}
	switch mode {
	case DirtyDeviceLog:
		if !canLog {
			return 0, fmt.Errorf("%w: dirty logging", ErrNotSupported)
		}
		if err := d.bk.SetLog(log); err != nil {
			return 0, backingErr("set log", err)
		}
		d.tracking = DirtyDeviceLog
		// vhost devices log only while LOG_ALL is negotiated. Rather than
		// toggling features under a running data path, the device goes
		// through the same stop / read positions / reprogram cycle as a
		// relay switch, and is renegotiated with LOG_ALL.
		if d.canLogAll {
			if err := d.renegotiate(); err != nil {
				d.tracking = DirtyAuto
				_ = d.bk.SetLog(nil)
				return 0, err
			}
		}
	case DirtyRelay:
		if err := d.switchRelay(&relay{log: log}); err != nil {
			return 0, err
		}
	default:
		return 0, fmt.Errorf("%w: dirty mode %s", ErrInvalidOptions, mode)
	}
	d.tracking = mode
	return mode, nil
}

// StopDirtyTracking ends dirty tracking; in relay mode the backing device
// goes back to the guest's rings (passthrough) at the exact ring positions
// the relay reached.
func (d *Device) StopDirtyTracking() error {
	return d.StopDirtyTrackingContext(context.Background())
}

// StopDirtyTrackingContext is StopDirtyTracking with ctx bounding the wait
// for a back-end operation in progress.
func (d *Device) StopDirtyTrackingContext(ctx context.Context) error {
	if err := d.begin(ctx); err != nil {
		return err
	}
	defer d.end()
	mode := d.tracking
	d.tracking = DirtyAuto
	switch mode {
	case DirtyDeviceLog:
		// The backing must let go of the log even when the
		// renegotiation fails: the caller may close the log once this
		// returns.
		var rerr error
		if d.canLogAll {
			rerr = d.renegotiate()
		}
		return errors.Join(rerr, d.releaseLog())
	case DirtyRelay:
		return d.switchRelay(nil)
	}
	return nil
}

// releaseLog takes the dirty log away from the backing device. A backing
// that keeps it because one of its queues failed to stop and may still be
// marking it (vdpa.ErrQueueBusy, as vdpa.Local answers until a reset) is
// reset, which stops everything, and asked again; the guest sees
// DEVICE_NEEDS_RESET.
func (d *Device) releaseLog() error {
	err := d.bk.SetLog(nil)
	if errors.Is(err, vdpa.ErrQueueBusy) {
		d.needsReset(backingErr("set log", err))
		if rerr := d.bk.SetStatus(0); rerr != nil {
			return backingErr("reset to release the log", rerr)
		}
		d.live, d.negotiated = false, false
		err = d.bk.SetLog(nil)
	}
	return backingErr("set log", err)
}

// DirtyTracking reports the dirty-tracking mode in effect: DirtyRelay when
// the data path runs through the shadow relay, DirtyDeviceLog when the
// backing device logs, DirtyAuto when tracking is off.
func (d *Device) DirtyTracking() DirtyMode {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.tracking
}

// renegotiate reprograms the backing device with backingFeatures: a live
// device is stopped at a consistent point and restarted from its positions;
// one that has only negotiated is renegotiated.
func (d *Device) renegotiate() error {
	switch {
	case d.live:
		return d.switchRelay(d.relay)
	case d.negotiated:
		if err := d.negotiateBacking(); err != nil {
			d.needsReset(err)
			return err
		}
	}
	return nil
}

// switchRelay moves a live device into (r != nil) or out of relay mode.
func (d *Device) switchRelay(r *relay) error {
	wasLive := d.live
	if wasLive {
		if err := d.quiesce(); err != nil {
			d.needsReset(err)
			return err
		}
	}
	d.relay = r
	switch {
	case wasLive:
		if err := d.goLive(); err != nil {
			d.needsReset(err)
			return err
		}
	case d.negotiated:
		// FEATURES_OK without DRIVER_OK yet (or DRIVER_OK held in a
		// stopped migration state): the backing device was negotiated
		// for the other mode (a relay's shadow rings are split), and
		// goLive would program it as it is.
		if err := d.negotiateBacking(); err != nil {
			d.needsReset(err)
			return err
		}
	}
	return nil
}
