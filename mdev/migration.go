package mdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// ErrNoState: the device left RESUMING without a complete state stream
// having been loaded.
var ErrNoState = errors.New("mdev: no device state loaded")

type migState struct {
	state  MigState
	saved  []byte // captured on entering STOP_COPY
	staged *State // validated in RESUMING, applied on leaving it
}

// MigrationState returns the device's VFIO migration state. A new device is
// RUNNING.
func (d *Device) MigrationState() MigState {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mig.state
}

// DataPathActive reports whether the backing device may be accessing guest
// memory: the data path went live (the driver set DRIVER_OK, or a stopped
// device restarted) and has not been stopped since (by a migration stop, a
// reset or FAILED), or a reset of the backing device is still pending. The
// migration state alone does not say it: a stop that failed leaves the data
// path in ERROR as it was. A driver setting DRIVER_OK makes the device live
// in RUNNING, PRE_COPY (and their P2P forms) and ERROR; in STOP, STOP_COPY
// and RESUMING the bit is recorded and the data path starts when the device
// returns to RUNNING_P2P. While it reports false, the VMM may unmap guest
// memory without the data path noticing.
func (d *Device) DataPathActive() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.live || d.resetPending
}

// SetMigrationState moves the device to target, walking the intermediate
// arcs the kernel would (see MigrationPath). The actions on the arcs are:
//
//	RUNNING_P2P -> STOP, PRE_COPY_P2P -> STOP_COPY: suspend the backing
//	    device and read back every queue's position;
//	STOP -> STOP_COPY, PRE_COPY_P2P -> STOP_COPY: capture the device state
//	    (SaveState returns it);
//	STOP_COPY -> STOP: end the save session;
//	STOP -> RESUMING: reset the device, open a load session (LoadState);
//	RESUMING -> STOP: apply the loaded state (fails, staying in RESUMING,
//	    when none was loaded);
//	STOP -> RUNNING_P2P: restart the data path from the recorded positions.
//
// The P2P states behave as their non-P2P counterparts (the device does no
// peer-to-peer DMA). When an action fails the device stays in the last
// state it reached, unless its state is then unknown, in which case it
// enters ERROR (leave it with ResetMigration).
//
// The device's registers stay readable by the guest while the backing device
// works (see oplock.go).
func (d *Device) SetMigrationState(target MigState) error {
	return d.SetMigrationStateContext(context.Background(), target)
}

// SetMigrationStateContext is SetMigrationState with ctx bounding the wait
// for a back-end operation in progress; giving up leaves the state as it
// was.
func (d *Device) SetMigrationStateContext(ctx context.Context, target MigState) error {
	if err := d.begin(ctx); err != nil {
		return err
	}
	defer d.end()
	if d.closed {
		return ErrClosed
	}
	path, err := MigrationPath(d.mig.state, target)
	if err != nil {
		return err
	}
	for _, next := range path {
		if err := d.migArc(d.mig.state, next); err != nil {
			return fmt.Errorf("mdev: migration %s -> %s: %w", d.mig.state, next, err)
		}
		held := d.mig.state.holdsDataPath()
		d.mig.state = next
		if held && !next.holdsDataPath() {
			d.releaseHeld()
		}
	}
	return nil
}

// releaseHeld sends, as the device runs again, what its stop held back: a
// change of the backing device's configuration made meanwhile
// (refreshGeneration) and a configuration interrupt owed (cfgHeld), one
// notification for both.
func (d *Device) releaseHeld() {
	held := d.cfgHeld
	d.cfgHeld = false
	gen := d.generation
	d.refreshGeneration()
	if held && d.generation == gen && d.status&virtio.StatusDriverOK != 0 {
		d.configInterrupt()
	}
}

func (d *Device) migArc(from, to MigState) error {
	switch {
	case from == MigRunningP2P && to == MigStop:
		if err := d.quiesce(); err != nil {
			d.mig.state = MigError
			return err
		}
	case from == MigPreCopyP2P && to == MigStopCopy:
		if err := d.quiesce(); err != nil {
			d.mig.state = MigError
			return err
		}
		return d.capture()
	case from == MigStop && to == MigStopCopy:
		return d.capture()
	case from == MigStopCopy && to == MigStop:
		d.mig.saved = nil
	case from == MigStop && to == MigResuming:
		// The destination starts from a reset device.
		d.reset()
		d.mig.staged = nil
	case from == MigResuming && to == MigStop:
		if d.mig.staged == nil {
			return ErrNoState
		}
		d.apply(d.mig.staged)
		d.mig.staged = nil
	case from == MigStop && to == MigRunningP2P:
		if err := d.restart(); err != nil {
			// ERROR first: the driver is told at once (a stopped
			// state would hold the notification back, for ever here).
			// A notification held while restart ran without d.mu
			// (a data-path failure report) goes too.
			d.mig.state = MigError
			d.needsReset(err)
			d.releaseHeld()
			return err
		}
	}
	return nil
}

// ResetMigration is VFIO_DEVICE_RESET for the migration FSM: the device is
// reset (as if the driver wrote 0 to device_status) and returns to RUNNING.
// It is the only way out of ERROR.
func (d *Device) ResetMigration() {
	_ = d.ResetMigrationContext(context.Background())
}

// ResetMigrationContext is ResetMigration with ctx bounding the wait for a
// back-end operation in progress (its only error).
func (d *Device) ResetMigrationContext(ctx context.Context) error {
	if err := d.begin(ctx); err != nil {
		return err
	}
	defer d.end()
	d.reset()
	d.mig = migState{state: MigRunning}
	return nil
}

// SaveState returns the device state captured on entering STOP_COPY.
func (d *Device) SaveState() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.mig.state != MigStopCopy {
		return nil, fmt.Errorf("%w: SaveState in %s (want STOP_COPY)", ErrMigrationState, d.mig.state)
	}
	return append([]byte(nil), d.mig.saved...), nil
}

// LoadState validates a device state stream for this device while in
// RESUMING. The whole stream is checked — framing, checksum, the spec's
// rules and compatibility with this device — before anything is kept; on
// any error the device is untouched. The state takes effect when the device
// leaves RESUMING.
func (d *Device) LoadState(b []byte) error {
	return d.LoadStateContext(context.Background(), b)
}

// LoadStateContext is LoadState with ctx bounding the wait for a back-end
// operation in progress.
func (d *Device) LoadStateContext(ctx context.Context, b []byte) error {
	if err := d.begin(ctx); err != nil {
		return err
	}
	defer d.end()
	if d.mig.state != MigResuming {
		return fmt.Errorf("%w: LoadState in %s (want RESUMING)", ErrMigrationState, d.mig.state)
	}
	s, err := DecodeState(b)
	if err != nil {
		return err
	}
	if err := d.compatible(s); err != nil {
		return err
	}
	d.mig.staged = s
	return nil
}

// State returns the device's current state as it would be migrated. The
// queue positions are those last recorded (meaningful once the device is
// stopped).
func (d *Device) State() *State {
	_ = d.begin(context.Background())
	defer d.end()
	return d.snapshot()
}

// migratedStatus is device_status as the destination presents it. A reset
// whose backing reset is still pending here (see reset) is complete there:
// the destination's backing device is another one, programmed only when
// the driver sets DRIVER_OK again.
func (d *Device) migratedStatus() virtio.Status {
	if d.resetPending {
		return 0
	}
	return d.status
}

func (d *Device) snapshot() *State {
	cfg := d.readBackingConfig()
	gen, isr := d.generation, d.isr
	if d.mig.state.holdsDataPath() && d.status&virtio.StatusDriverOK != 0 {
		// What the stop holds back moves with the state: a configuration
		// changed meanwhile is a new generation, and a notification owed
		// (that change, or a NEEDS_RESET) is the ISR's configuration bit,
		// which makes the destination notify when it runs (apply).
		changed := !bytes.Equal(cfg, d.cfgSnapshot)
		if changed {
			gen++
		}
		if changed || d.cfgHeld {
			isr |= ISRConfig
		}
	}
	s := &State{
		Backend:             d.opts.Backend,
		DeviceID:            d.devID,
		DeviceFeatures:      d.offered,
		DriverFeatures:      d.driverFeatures,
		Status:              d.migratedStatus(),
		ConfigGeneration:    gen,
		ISR:                 isr,
		MSIXConfig:          d.msixConfig,
		DeviceFeatureSelect: d.dfSelect,
		DriverFeatureSelect: d.gfSelect,
		QueueSelect:         d.queueSelect,
		Config:              cfg,
		PCIConfig:           append([]byte(nil), d.pci.img[:]...),
		MSIX:                append([]byte(nil), d.msix...),
		Queues:              make([]QueueRecord, len(d.queues)),
	}
	for i, q := range d.queues {
		s.Queues[i] = QueueRecord{Size: q.size, Enabled: q.enabled, Vector: q.vector,
			Desc: q.desc, Driver: q.driver, Device: q.device,
			NextAvail: q.base.NextAvail, NextUsed: q.base.NextUsed}
	}
	return s
}

func (d *Device) capture() error {
	b, err := EncodeState(d.snapshot())
	if err != nil {
		return err
	}
	d.mig.saved = b
	return nil
}

// compatible checks that s can be restored on this device.
func (d *Device) compatible(s *State) error {
	inc := func(format string, args ...any) error { return stateErr(ErrStateIncompatible, format, args...) }
	if s.DeviceID != d.devID {
		return inc("device id %s, this device is %s", s.DeviceID, d.devID)
	}
	if extra := s.DriverFeatures &^ d.offered; extra != 0 {
		return inc("negotiated features %s not offered here", extra.Format(d.devID))
	}
	if len(s.Queues) != d.numQueues {
		return inc("%d queues, this device has %d", len(s.Queues), d.numQueues)
	}
	for i, q := range s.Queues {
		if q.Size > d.maxQueue {
			return inc("queue %d size %d > maximum %d", i, q.Size, d.maxQueue)
		}
		if q.Vector != NoVector && int(q.Vector) >= d.opts.MSIXVectors {
			return inc("queue %d vector %d, table has %d", i, q.Vector, d.opts.MSIXVectors)
		}
	}
	if s.MSIXConfig != NoVector && int(s.MSIXConfig) >= d.opts.MSIXVectors {
		return inc("config vector %d, table has %d", s.MSIXConfig, d.opts.MSIXVectors)
	}
	if len(s.MSIX) != len(d.msix) {
		return inc("MSI-X area %d bytes, this device has %d", len(s.MSIX), len(d.msix))
	}
	if len(s.Config) != d.cfgSize {
		return inc("config space %d bytes, this device has %d", len(s.Config), d.cfgSize)
	}
	// The guest has read the configuration (MAC, MTU, queue pairs); the
	// destination must present the same one.
	if cur := d.readBackingConfig(); !bytes.Equal(cur, s.Config) {
		for i := range cur {
			if cur[i] != s.Config[i] {
				return inc("device config differs at offset %d (%#02x here, %#02x in stream)", i, cur[i], s.Config[i])
			}
		}
	}
	return nil
}

// apply installs a validated, compatible state. The backing device is
// programmed when the device next runs.
func (d *Device) apply(s *State) {
	d.driverFeatures = s.DriverFeatures
	d.extraAccepted = false
	d.status = s.Status
	d.generation = s.ConfigGeneration
	// The configuration that generation stands for is the source's: the
	// guest may have read it under that generation. LoadState refused a
	// destination whose configuration differed; one that changed since
	// (its link went down, say) presents a new generation and notifies
	// once the device runs (releaseHeld), as for any change. Its current
	// configuration under the source's generation would let the driver
	// accept a torn read.
	if len(s.Config) == d.cfgSize {
		d.cfgSnapshot = append([]byte(nil), s.Config...)
	} else {
		d.cfgSnapshot = d.readBackingConfig()
	}
	d.isr = s.ISR
	d.msixConfig = s.MSIXConfig
	d.dfSelect = s.DeviceFeatureSelect
	d.gfSelect = s.DriverFeatureSelect
	d.queueSelect = s.QueueSelect
	for i, q := range s.Queues {
		d.queues[i] = queue{size: q.Size, vector: q.Vector, enabled: q.Enabled,
			desc: q.Desc, driver: q.Driver, device: q.Device}
		d.queues[i].base.NextAvail = q.NextAvail
		d.queues[i].base.NextUsed = q.NextUsed
	}
	if len(s.PCIConfig) == pciConfigSize {
		// Only the guest-writable bits move; identity and layout are this
		// device's own.
		for i := range d.pci.img {
			m := d.pci.wmask[i]
			d.pci.img[i] = d.pci.img[i]&^m | s.PCIConfig[i]&m
		}
	}
	copy(d.msix, s.MSIX)
	d.live, d.negotiated = false, false
	if d.status&virtio.StatusDeviceNeedsReset != 0 {
		d.lastErr = errors.New("mdev: migrated in NEEDS_RESET")
	}
	// A configuration notification the driver has not acknowledged (the
	// ISR's configuration bit: one the source held back while stopped, see
	// snapshot, or one sent before that the driver has not read the ISR
	// for) is sent again when the device runs here: the source's may have
	// been held, or lost with the source. A driver that had seen it only
	// looks at the configuration again; NEEDS_RESET is always told.
	d.cfgHeld = d.status&virtio.StatusDriverOK != 0 &&
		(d.isr&ISRConfig != 0 || d.status&virtio.StatusDeviceNeedsReset != 0)
}
