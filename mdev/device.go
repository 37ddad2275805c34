package mdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"time"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Transport feature bits this emulation never offers: no notification data,
// no per-queue reset, and the vhost-only bits are not virtio features at all.
// RING_PACKED is offered when the backing device offers it.
const unsupportedFeatures = virtio.Features(1)<<virtio.FNotificationData |
	virtio.Features(1)<<virtio.FRingReset |
	virtio.Features(1)<<virtio.FLogAll |
	virtio.Features(1)<<virtio.FProtocolFeat |
	virtio.Features(1)<<virtio.FSRIOV

// transportFeatures are the bits virtio reserves for the transport and
// the virtqueues (24 to 41, and 42 to 49 reserved for their extensions:
// virtio 1.2 §6). supportedTransport are those this emulation implements
// and passes through when the backing device offers them. The others are
// never offered: the legacy-only NOTIFY_ON_EMPTY and ANY_LAYOUT (the device
// is non-transitional, §6.3; vhost-net offers them), and bits whose
// transport fields this common configuration does not have
// (NOTIF_CONFIG_DATA, ADMIN_VQ) or that no version of the spec names yet.
const (
	transportFeatures  = virtio.Features(1)<<50 - virtio.Features(1)<<24
	supportedTransport = virtio.Features(1)<<virtio.FIndirectDesc |
		virtio.Features(1)<<virtio.FEventIdx |
		virtio.Features(1)<<virtio.FVersion1 |
		virtio.Features(1)<<virtio.FAccessPlatform |
		virtio.Features(1)<<virtio.FRingPacked |
		virtio.Features(1)<<virtio.FInOrder |
		virtio.Features(1)<<virtio.FOrderPlatform
)

// maxQueueSize is the largest queue size, split (virtio 1.2 §2.7) or packed
// (§2.8).
const maxQueueSize = 32768

// maxQueues bounds the queue count of a device (and of a state stream).
const maxQueues = 1024

// maxConfigSize bounds the device configuration space.
const maxConfigSize = 1024

// Options configure NewDevice. A nil *Options means defaults.
type Options struct {
	// Memory is the guest memory the guest's rings and buffers live in. It
	// is handed to the backing device (SetMemory) at DRIVER_OK and used to
	// validate ring addresses. Required for the device to go live.
	Memory *vring.Memory
	// Features, when non-zero, masks the features offered to the guest
	// (offered = backing features & Features, minus transport features this
	// emulation does not implement).
	Features virtio.Features
	// MaxQueueSize caps the queue size offered (default: the backing
	// device's maximum).
	MaxQueueSize uint16
	// MSIXVectors is the MSI-X table size (default: one per queue plus one
	// for configuration changes).
	MSIXVectors int
	// Vector, when set, returns the VMM's irqfd for an MSI-X vector. Queue
	// interrupts are then wired from the backing device straight to it.
	// When nil, the device creates one call EventFD per queue (CallFD) and
	// one for configuration changes (ConfigFD) for the VMM to route.
	Vector func(vector uint16) *vdpa.EventFD
	// INTx, used only with Vector, is the eventfd raised for every
	// interrupt while the guest has MSI-X disabled (the MSI-X Enable bit
	// of the capability in RegionPCIConfig, which the VMM must write
	// through as the guest writes it: QEMU's vfio-user client does): the
	// guest then uses the line interrupt, §4.1.5. With MSI-X enabled,
	// interrupts go to Vector, and an interrupt whose vector is NO_VECTOR
	// is not delivered. The VMM that waits on INTx sets the ISR queue bit
	// with RaiseISR before asserting the line (the configuration bit is
	// set by the device itself).
	INTx *vdpa.EventFD
	// Backend names the kind of backing device ("software", "vhost-vdpa",
	// "vhost-user", "vduse"), recorded in the migration state.
	Backend string
	// SubsystemVendorID and SubsystemID fill the PCI subsystem fields
	// (defaults 0x1af4 and 0x1100).
	SubsystemVendorID uint16
	SubsystemID       uint16
	// DirtyMode selects how guest-memory writes are tracked during
	// migration (default DirtyAuto).
	DirtyMode DirtyMode
	// HealthInterval is how often a live device asks its backing device
	// whether the data path has failed on its own (a broken ring, a
	// back-end gone), so that the guest gets DEVICE_NEEDS_RESET with the
	// configuration change notification §2.1.2 requires, without first
	// reading device_status. Default DefaultHealthInterval; negative:
	// never (the guest then learns it at its next device_status read).
	// One goroutine per live device does it. A backing device that
	// announces its failures (vdpa.FailureNotifier: vdpa.Local over
	// softnet) is not asked on a timer but when it announces one, by one
	// goroutine from the device's first DRIVER_OK until Close; the
	// interval is then not used. Such a backing device serves one Device
	// at a time: Close the Device before handing the backing device to
	// another, which would otherwise compete for its announcements.
	HealthInterval time.Duration
}

// queue is the per-virtqueue register state.
type queue struct {
	size    uint16
	vector  uint16
	enabled bool
	desc    uint64
	driver  uint64
	device  uint64
	// base is the ring position the backing device starts from:
	// vring.InitialState of the negotiated features for a fresh queue
	// (FEATURES_OK sets it), the read-back position after a suspend, the
	// restored position after a migration. A packed queue's is in the
	// vhost encoding (index | wrap counter << 15).
	base vring.QueueState
}

// Device is a mediated virtio-pci device: an emulated virtio 1.x modern PCI
// control path in front of a backing vdpa.Device. A VMM forwards its MMIO
// traps to Read and Write (or ReadBAR and WriteBAR); when the guest sets
// DRIVER_OK the backing device is programmed with the guest's rings, kick
// and interrupt eventfds, and from then on processes the data path itself.
//
// All methods are safe for concurrent use. Back-end operations run
// without the register lock held (see oplock.go): a slow backing device
// does not stall the guest's register reads.
type Device struct {
	mu      sync.Mutex
	ops     opLock          // serialises back-end operations; taken before mu
	backing vdpa.Device     // NewDevice only; operations go through bk
	bk      unlockedBacking // the backing device, called with mu released
	opts    Options

	devID     virtio.DeviceID
	offered   virtio.Features
	numQueues int
	maxQueue  uint16
	cfgSize   int
	layout    Layout
	pci       pciConfig
	msix      []byte

	// Common configuration registers.
	dfSelect       uint32
	gfSelect       uint32
	driverFeatures virtio.Features
	extraAccepted  bool // the driver set bits in a feature window >= 2
	msixConfig     uint16
	status         virtio.Status
	generation     uint8
	queueSelect    uint16
	queues         []queue
	isr            uint8
	cfgSnapshot    []byte

	kicks    []*vdpa.EventFD
	calls    []*vdpa.EventFD
	configFD *vdpa.EventFD

	// live: the backing device is programmed and processing the rings.
	live bool
	// negotiated: the backing device has accepted driverFeatures
	// (FEATURES_OK) for the current driver session.
	negotiated bool
	// resetPending: the guest reset the device but the backing device
	// refused its reset, so it may still be processing the rings in guest
	// memory. device_status reads DEVICE_NEEDS_RESET instead of 0 (the
	// driver waits for 0 before it reuses the device, §2.4, §4.1.4.3.2)
	// and each status read retries the backing reset.
	resetPending bool
	lastErr      error

	mig    migState
	closed bool
	// cfgPending: ConfigChanged was called while an operation held ops;
	// the operation's end handles it.
	cfgPending bool
	// cfgHeld: a configuration interrupt is owed to the driver but was
	// held back because the migration state stops the device (STOP,
	// STOP_COPY, RESUMING: no interrupts, linux/vfio.h); it is sent when
	// the device runs again (releaseHeld).
	cfgHeld bool
	// lookPending: the backing device is to be looked at (checkBacking)
	// when the operation holding ops ends (health.go).
	lookPending bool
	// relay is non-nil while the data path runs through the shadow relay.
	relay *relay
	// relayGen counts relay runs programmed and torn down; a run's
	// failure report is current only while relayGen is the run's gen.
	relayGen uint64
	// tracking is the dirty-tracking mode in effect (DirtyAuto: none).
	tracking DirtyMode
	// canLogAll: the backing device offers VHOST_F_LOG_ALL, which must be
	// negotiated for its log to take effect (vhost-net, vhost-user).
	canLogAll bool
	// watchStop, closed to stop it, and watchDone, closed when it has
	// ended, belong to the running health watcher (health.go); nil when
	// none runs. A watcher of an announcing backing device runs until
	// Close.
	watchStop, watchDone chan struct{}
}

// NewDevice creates a mediated device in front of backing, which it resets.
// The Device does not take ownership of backing: Close leaves it open.
func NewDevice(backing vdpa.Device, opts *Options) (*Device, error) {
	if backing == nil {
		return nil, fmt.Errorf("%w: nil backing device", ErrInvalidOptions)
	}
	d := &Device{backing: backing, ops: newOpLock()}
	d.bk = unlockedBacking{d: d, b: backing}
	if opts != nil {
		d.opts = *opts
	}
	if d.opts.SubsystemVendorID == 0 {
		d.opts.SubsystemVendorID = PCIVendorID
	}
	if d.opts.SubsystemID == 0 {
		d.opts.SubsystemID = defaultSubsysID
	}
	var err error
	if d.devID, err = backing.DeviceID(); err != nil {
		return nil, backingErr("device id", err)
	}
	if d.offered, err = backing.Features(); err != nil {
		return nil, backingErr("features", err)
	}
	d.canLogAll = d.offered.Has(virtio.FLogAll)
	if d.opts.Features != 0 {
		d.offered &= d.opts.Features
	}
	d.offered &^= unsupportedFeatures
	d.offered &^= transportFeatures &^ supportedTransport
	// §2.2.2: nothing is offered without the features it requires (a
	// mask in Options.Features that leaves out CTRL_VQ takes MQ, CTRL_RX
	// and the rest with it; Linux's virtio-net fails to probe otherwise).
	d.offered = d.offered.Consistent(d.devID)
	if !d.offered.Has(virtio.FVersion1) {
		return nil, fmt.Errorf("%w: backing device does not offer VERSION_1", ErrInvalidOptions)
	}
	if d.numQueues, err = backing.NumQueues(); err != nil {
		return nil, backingErr("num queues", err)
	}
	if d.numQueues < 1 || d.numQueues > maxQueues {
		return nil, fmt.Errorf("%w: backing device has %d queues (1..%d)", ErrInvalidOptions, d.numQueues, maxQueues)
	}
	if d.maxQueue, err = backing.MaxQueueSize(); err != nil {
		return nil, backingErr("max queue size", err)
	}
	if d.opts.MaxQueueSize != 0 && d.opts.MaxQueueSize < d.maxQueue {
		d.maxQueue = d.opts.MaxQueueSize
	}
	if d.maxQueue == 0 || d.maxQueue > maxQueueSize {
		return nil, fmt.Errorf("%w: queue size %d", ErrInvalidOptions, d.maxQueue)
	}
	// Offer the largest power of two not above the maximum.
	d.maxQueue = uint16(1) << (bits.Len16(d.maxQueue) - 1)
	if d.cfgSize, err = backing.ConfigSize(); err != nil {
		return nil, backingErr("config size", err)
	}
	if d.cfgSize < 0 || d.cfgSize > maxConfigSize {
		return nil, fmt.Errorf("%w: config size %d", ErrInvalidOptions, d.cfgSize)
	}
	if d.opts.MSIXVectors == 0 {
		d.opts.MSIXVectors = d.numQueues + 1
	}
	if d.opts.MSIXVectors < 1 || d.opts.MSIXVectors > 2048 {
		return nil, fmt.Errorf("%w: %d MSI-X vectors (1..2048)", ErrInvalidOptions, d.opts.MSIXVectors)
	}
	if err := backing.SetStatus(0); err != nil {
		return nil, backingErr("reset", err)
	}
	d.computeLayout()
	d.buildPCIConfig()
	d.msix = make([]byte, d.layout.MSIXPBA+uint32((d.opts.MSIXVectors+63)/64*8))
	for v := 0; v < d.opts.MSIXVectors; v++ {
		d.msix[v*msixTableEntrySize+12] = 1 // vector control: masked
	}
	d.queues = make([]queue, d.numQueues)
	d.kicks = make([]*vdpa.EventFD, d.numQueues)
	if d.opts.Vector == nil {
		d.calls = make([]*vdpa.EventFD, d.numQueues)
	}
	cleanup := func() {
		for _, e := range append(append([]*vdpa.EventFD(nil), d.kicks...), d.calls...) {
			if e != nil {
				_ = e.Close()
			}
		}
		if d.configFD != nil {
			_ = d.configFD.Close()
		}
	}
	for q := range d.kicks {
		if d.kicks[q], err = vdpa.NewEventFD(); err != nil {
			cleanup()
			return nil, err
		}
		if d.calls != nil {
			if d.calls[q], err = vdpa.NewEventFD(); err != nil {
				cleanup()
				return nil, err
			}
		}
	}
	if d.opts.Vector == nil {
		if d.configFD, err = vdpa.NewEventFD(); err != nil {
			cleanup()
			return nil, err
		}
	}
	d.resetRegisters()
	d.cfgSnapshot = make([]byte, d.cfgSize)
	if d.cfgSize > 0 {
		if err := backing.ReadConfig(0, d.cfgSnapshot); err != nil {
			cleanup()
			return nil, backingErr(fmt.Sprintf("read %d bytes of config", d.cfgSize), err)
		}
	}
	d.mig.state = MigRunning
	return d, nil
}

// Close stops the data path (resetting the backing device if it was live)
// and releases the device's eventfds. The backing device stays open.
func (d *Device) Close() error {
	_ = d.begin(context.Background())
	err := d.closeLocked()
	watcher := d.stopWatch()
	d.end()
	if watcher != nil {
		<-watcher // after the locks are released: it may be taking them to look once more
	}
	return err
}

// closeLocked is Close's work, with the device's locks held.
func (d *Device) closeLocked() error {
	if d.closed {
		return nil
	}
	d.closed = true
	d.stopRelay()
	var err error
	if d.live || d.negotiated || d.resetPending {
		err = backingErr("reset", d.bk.SetStatus(0))
	}
	for _, e := range append(append([]*vdpa.EventFD(nil), d.kicks...), d.calls...) {
		if e != nil {
			_ = e.Close()
		}
	}
	if d.configFD != nil {
		_ = d.configFD.Close()
	}
	return err
}

// DeviceID is the virtio device type of the backing device.
func (d *Device) DeviceID() virtio.DeviceID { return d.devID }

// OfferedFeatures are the features the guest sees in device_feature.
func (d *Device) OfferedFeatures() virtio.Features { return d.offered }

// NumQueues is the number of virtqueues (num_queues).
func (d *Device) NumQueues() int { return d.numQueues }

// Status returns the device status byte as the guest reads it.
func (d *Device) Status() virtio.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

// DriverFeatures returns the features the driver has accepted.
func (d *Device) DriverFeatures() virtio.Features {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.driverFeatures
}

// Err returns the backing-device error that set NEEDS_RESET, or that keeps
// a guest reset pending (the backing device refused its reset; see
// device_status in the package documentation), if any.
func (d *Device) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lastErr
}

// KickFD returns queue q's kick eventfd. A write to the queue's notification
// address signals it; a VMM can instead register it directly as a KVM
// ioeventfd for that address, so guest kicks reach the backing device
// without a trap.
func (d *Device) KickFD(q int) *vdpa.EventFD {
	if q < 0 || q >= len(d.kicks) {
		return nil
	}
	return d.kicks[q]
}

// CallFD returns queue q's interrupt eventfd when Options.Vector is nil (the
// VMM routes it to the MSI-X vector QueueVector(q) reports, e.g. as a KVM
// irqfd). It is nil when Options.Vector supplies per-vector irqfds.
func (d *Device) CallFD(q int) *vdpa.EventFD {
	if q < 0 || q >= len(d.calls) {
		return nil
	}
	return d.calls[q]
}

// ConfigFD returns the configuration-change interrupt eventfd when
// Options.Vector is nil.
func (d *Device) ConfigFD() *vdpa.EventFD { return d.configFD }

// QueueVector returns the MSI-X vector the guest assigned to queue q.
func (d *Device) QueueVector(q int) uint16 {
	d.mu.Lock()
	defer d.mu.Unlock()
	if q < 0 || q >= len(d.queues) {
		return NoVector
	}
	return d.queues[q].vector
}

// resetRegisters returns every register to its reset value (virtio 1.2
// §4.1.4.3.1: queue_size holds the maximum, vectors hold NO_VECTOR).
func (d *Device) resetRegisters() {
	d.dfSelect, d.gfSelect = 0, 0
	d.driverFeatures = 0
	d.extraAccepted = false
	d.msixConfig = NoVector
	d.status = 0
	d.queueSelect = 0
	d.isr = 0
	for i := range d.queues {
		d.queues[i] = queue{size: d.maxQueue, vector: NoVector}
	}
	d.negotiated = false
	d.lastErr = nil
	d.cfgHeld = false
}

// readBackingConfig reads the backing device's whole configuration; if the
// read fails (a device stopped mid-migration, for example) it returns the
// last configuration read, which NewDevice guarantees exists. Caller holds
// d.ops and d.mu.
func (d *Device) readBackingConfig() []byte {
	b := make([]byte, d.cfgSize)
	if d.cfgSize > 0 {
		if err := d.bk.ReadConfig(0, b); err != nil {
			return append([]byte(nil), d.cfgSnapshot...)
		}
	}
	return b
}

// refreshGeneration compares the backing device's configuration with the
// last snapshot and, on a change, bumps config_generation (§2.5.1: the
// device changes config_generation whenever the configuration changes)
// and, with DRIVER_OK set, sends the configuration change notification
// (§4.1.4.5). Whoever notices the change first notifies: a guest reading
// config_generation before the back-end's ConfigChanged arrives takes the
// change into the snapshot, and ConfigChanged then finds nothing new, so
// leaving the notification to it alone would lose it. Caller holds d.ops
// and d.mu.
//
// While the migration state stops the device it does nothing: a stopped
// VFIO device changes neither its internal state nor, by an interrupt, the
// guest's (linux/vfio.h). The comparison is made when the device runs again
// (releaseHeld).
func (d *Device) refreshGeneration() {
	if d.mig.state.holdsDataPath() {
		return
	}
	cur := d.readBackingConfig()
	if !bytes.Equal(cur, d.cfgSnapshot) {
		d.cfgSnapshot = cur
		d.generation++
		if d.status&virtio.StatusDriverOK != 0 {
			d.configInterrupt()
		}
	}
}

// ConfigChanged tells the device that the backing device's configuration
// may have changed (link status, for example). If it did, the device bumps
// config_generation, sets the ISR configuration bit and raises the
// configuration interrupt (§2.5.1, §4.1.4.5). A device whose migration
// state stops it (STOP, STOP_COPY, RESUMING) does all that when it runs
// again, or, migrated, on the destination.
//
// It never waits for a back-end operation in progress (it may be called
// from the back-end itself): the operation handles the change when it ends.
func (d *Device) ConfigChanged() {
	if !d.ops.tryLock() {
		d.mu.Lock()
		d.cfgPending = true
		d.mu.Unlock()
		// The operation may have ended meanwhile (see end).
		if !d.ops.tryLock() {
			return
		}
	}
	d.mu.Lock()
	d.cfgPending = true
	d.end()
}

// configChanged is ConfigChanged's work. Caller holds d.ops and d.mu.
func (d *Device) configChanged() {
	d.cfgPending = false
	if d.closed {
		return
	}
	d.refreshGeneration()
}

// BackingFailed reports that the backing device failed while live. The
// device sets DEVICE_NEEDS_RESET and raises the configuration interrupt
// (§2.1.2); the driver must reset it. While the migration state stops the
// device the interrupt waits until it runs again (or runs on the
// destination).
func (d *Device) BackingFailed(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.needsReset(backingErr("data path", err))
}

func (d *Device) needsReset(err error) {
	d.lastErr = err
	if d.status&virtio.StatusDeviceNeedsReset != 0 {
		return
	}
	d.status |= virtio.StatusDeviceNeedsReset
	if d.status&virtio.StatusDriverOK != 0 {
		d.configInterrupt()
	}
}

// configInterrupt sends the configuration change notification, or, while
// the migration state stops the device, holds it back until the device runs
// again (cfgHeld).
func (d *Device) configInterrupt() {
	if d.mig.state.holdsDataPath() {
		d.cfgHeld = true
		return
	}
	d.isr |= ISRConfig
	if fd := d.vectorFD(d.msixConfig, d.configFD); fd != nil {
		_ = fd.Signal()
	}
}

// vectorFD returns the eventfd that raises vector v: the VMM's irqfd when
// Options.Vector is set, otherwise fallback. With Options.Vector the
// device follows the guest's MSI-X Enable bit, as §4.1.5 has it: with
// MSI-X disabled every interrupt is the line interrupt (Options.INTx,
// which sets the ISR), whatever vector the driver wrote; with MSI-X
// enabled an interrupt goes to its vector, and one whose vector is
// NO_VECTOR is not delivered at all (§4.1.5.4, §4.1.5.5). Caller holds
// d.mu.
func (d *Device) vectorFD(v uint16, fallback *vdpa.EventFD) *vdpa.EventFD {
	if d.opts.Vector == nil {
		return fallback
	}
	switch {
	case !d.msixEnabled():
		return d.opts.INTx
	case v == NoVector:
		return nil
	}
	return d.opts.Vector(v)
}

func (d *Device) queueCallFD(q int) *vdpa.EventFD {
	var fb *vdpa.EventFD
	if d.calls != nil {
		fb = d.calls[q]
	}
	return d.vectorFD(d.queues[q].vector, fb)
}

// Read performs a guest read of size bytes at offset within region. It never
// waits for a back-end operation in progress: registers that mirror the
// backing device (the device configuration, a failure it reports through
// its status) are then answered from what the device last read. After
// Close every access fails with ErrClosed.
func (d *Device) Read(region Region, offset uint64, size int) (uint64, error) {
	withBacking := readMayUseBacking(region) && d.ops.tryLock()
	d.mu.Lock()
	var v uint64
	var err error
	if d.closed {
		err = ErrClosed // see WriteContext
	} else {
		v, err = d.readLocked(region, offset, size, withBacking)
	}
	if withBacking {
		// Holding ops makes this read a back-end operation: like every
		// other, it handles on its way out a ConfigChanged that came in
		// meanwhile (ConfigChanged does not wait for it, see end), or
		// the change would reach the guest only at the next begin/end
		// operation, which may never come.
		d.end()
	} else {
		d.mu.Unlock()
	}
	if err != nil {
		return 0, &AccessError{Region: region, Offset: offset, Size: size, Err: err}
	}
	return v, nil
}

// Write performs a guest write of the low size bytes of value at offset
// within region. Writes the spec forbids in the current state are ignored
// (the register keeps its value), as the spec requires of a device; only
// malformed accesses (wrong width, out of range) return an error, and,
// after Close, every access (ErrClosed).
func (d *Device) Write(region Region, offset uint64, size int, value uint64) error {
	return d.WriteContext(context.Background(), region, offset, size, value)
}

// WriteContext is Write for a write that may need the backing device
// (device_status, queue_msix_vector, the device configuration, the PCI
// configuration space): ctx bounds the wait for a back-end operation
// already in progress. Giving up returns an *AccessError wrapping ctx's
// error, with the register unchanged.
func (d *Device) WriteContext(ctx context.Context, region Region, offset uint64, size int, value uint64) error {
	needOps := writeMayUseBacking(region, offset)
	if needOps {
		if err := d.ops.lock(ctx); err != nil {
			return &AccessError{Region: region, Offset: offset, Size: size, Write: true, Err: err}
		}
	}
	d.mu.Lock()
	var err error
	if d.closed {
		// A vCPU may still trap into the device while the VMM tears it
		// down. Close has reset the back-end and released the eventfds
		// a DRIVER_OK would hand it, and nothing would reset it again:
		// the access must not reach it.
		err = ErrClosed
	} else {
		err = d.writeLocked(region, offset, size, value)
	}
	if needOps {
		d.end() // handles a ConfigChanged that came in meanwhile (see Read)
	} else {
		d.mu.Unlock()
	}
	if err != nil {
		return &AccessError{Region: region, Offset: offset, Size: size, Write: true, Err: err}
	}
	return nil
}

// readMayUseBacking reports whether a read of region may consult the
// backing device.
func readMayUseBacking(region Region) bool {
	return region == RegionCommon || region == RegionDevice || region == RegionPCIConfig
}

// writeMayUseBacking reports whether a write at off of region may call the
// backing device (and so must hold d.ops): status changes, interrupt
// re-wiring, device configuration writes, and the PCI configuration space
// (its PCI_CFG window reaches all of them).
func writeMayUseBacking(region Region, off uint64) bool {
	switch region {
	case RegionCommon:
		return off == OffDeviceStatus || off == OffQueueMSIXVector
	case RegionDevice, RegionPCIConfig:
		return true
	}
	return false
}

// readLocked performs a guest read; withBacking says that the caller holds
// d.ops, so the backing device may be consulted.
func (d *Device) readLocked(region Region, off uint64, size int, withBacking bool) (uint64, error) {
	switch region {
	case RegionCommon:
		return d.commonRead(off, size, withBacking)
	case RegionNotify:
		if err := d.notifyCheck(off, size); err != nil {
			return 0, err
		}
		return 0, nil
	case RegionISR:
		if off != 0 {
			return 0, ErrOutOfRange
		}
		if size != 1 {
			return 0, ErrAccessSize
		}
		v := d.isr
		d.isr = 0 // §4.1.4.5: reading the ISR status resets it to 0
		return uint64(v), nil
	case RegionDevice:
		if !validSize(size, 4) {
			return 0, ErrAccessSize
		}
		if !fits(off, size, uint64(d.cfgSize)) {
			return 0, ErrOutOfRange
		}
		// Every value the driver reads comes from the snapshot that
		// config_generation stands for, and the snapshot changes only
		// with a new generation (§4.1.4.3.1: after the driver reads a
		// value that changed, the device presents a new
		// config_generation). With d.ops held the backing device is
		// read first, and a change becomes a new snapshot and
		// generation (refreshGeneration); without it (a back-end
		// operation in progress) or while the migration state stops
		// the device, the driver reads the snapshot as it is, and a
		// change comes in with a new generation later. A value read
		// live beside a generation read from the snapshot would let a
		// driver accept a torn configuration.
		if withBacking {
			d.refreshGeneration()
		}
		var b [4]byte
		copy(b[:size], d.cfgSnapshot[off:])
		return readLE(b[:], size), nil
	case RegionPCIConfig:
		return d.pciRead(off, size, withBacking)
	case RegionMSIX:
		if !validSize(size, 8) || off%uint64(size) != 0 {
			return 0, ErrAccessSize
		}
		if !fits(off, size, uint64(len(d.msix))) {
			if off < d.layout.BARs[0].Size {
				return 0, nil
			}
			return 0, ErrOutOfRange
		}
		return readLE(d.msix[off:], size), nil
	}
	return 0, ErrRegion
}

func (d *Device) writeLocked(region Region, off uint64, size int, v uint64) error {
	switch region {
	case RegionCommon:
		return d.commonWrite(off, size, v)
	case RegionNotify:
		if err := d.notifyCheck(off, size); err != nil {
			return err
		}
		d.notify(int(off / NotifyOffMultiplier))
		return nil
	case RegionISR:
		if off != 0 {
			return ErrOutOfRange
		}
		if size != 1 {
			return ErrAccessSize
		}
		return nil // read-only
	case RegionDevice:
		if !validSize(size, 4) {
			return ErrAccessSize
		}
		if !fits(off, size, uint64(d.cfgSize)) {
			return ErrOutOfRange
		}
		var b [4]byte
		writeLE(b[:], size, v)
		if err := d.bk.WriteConfig(int(off), b[:size]); err != nil {
			return backingErr("write config", err)
		}
		return nil
	case RegionPCIConfig:
		return d.pciWrite(off, size, v)
	case RegionMSIX:
		if !validSize(size, 8) || off%uint64(size) != 0 {
			return ErrAccessSize
		}
		if !fits(off, size, uint64(d.layout.MSIXPBA)) {
			if off < d.layout.BARs[0].Size {
				return nil // PBA is read-only
			}
			return ErrOutOfRange
		}
		writeLE(d.msix[off:], size, v)
		return nil
	}
	return ErrRegion
}

// notifyCheck validates an access to the notification area: the driver
// writes a 16-bit queue index at the queue's slot, queue_notify_off *
// notify_off_multiplier (§4.1.4.4).
func (d *Device) notifyCheck(off uint64, size int) error {
	if off >= uint64(d.numQueues*NotifyOffMultiplier) {
		return ErrOutOfRange
	}
	if size != 2 && size != 4 {
		return ErrAccessSize
	}
	if off%NotifyOffMultiplier+uint64(size) > NotifyOffMultiplier {
		return ErrOutOfRange
	}
	return nil
}

// notify delivers a guest kick for queue q to the queue's kick eventfd,
// which the backing device (or the relay) waits on.
func (d *Device) notify(q int) {
	if q < 0 || q >= len(d.kicks) {
		return
	}
	_ = d.kicks[q].Signal()
}

// field widths of the common configuration structure, indexed by offset of
// the field's first byte.
var commonFieldWidth = map[uint64]int{
	OffDeviceFeatureSelect: 4, OffDeviceFeature: 4, OffDriverFeatureSelect: 4, OffDriverFeature: 4,
	OffMSIXConfig: 2, OffNumQueues: 2, OffDeviceStatus: 1, OffConfigGeneration: 1,
	OffQueueSelect: 2, OffQueueSize: 2, OffQueueMSIXVector: 2, OffQueueEnable: 2, OffQueueNotifyOff: 2,
	OffQueueDesc: 8, OffQueueDriver: 8, OffQueueDevice: 8,
}

// commonField resolves an access to a field start and validates its width:
// each field is accessed with its natural width, and a 64-bit field either
// whole or as its low and high 32-bit halves (§4.1.3.1).
func commonField(off uint64, size int) (start uint64, err error) {
	if !fits(off, size, CommonCfgLen) || !validSize(size, 8) {
		if off >= CommonCfgLen {
			return 0, ErrOutOfRange
		}
		return 0, ErrAccessSize
	}
	if w, ok := commonFieldWidth[off]; ok {
		if w == size || (w == 8 && size == 4) {
			return off, nil
		}
		return 0, ErrAccessSize
	}
	if w, ok := commonFieldWidth[off-4]; ok && w == 8 && size == 4 {
		return off - 4, nil
	}
	return 0, ErrAccessSize
}

func (d *Device) selectedQueue() *queue {
	if int(d.queueSelect) >= len(d.queues) {
		return nil
	}
	return &d.queues[d.queueSelect]
}

func (d *Device) commonRead(off uint64, size int, withBacking bool) (uint64, error) {
	start, err := commonField(off, size)
	if err != nil {
		return 0, err
	}
	q := d.selectedQueue()
	var v uint64
	switch start {
	case OffDeviceFeatureSelect:
		v = uint64(d.dfSelect)
	case OffDeviceFeature:
		if d.dfSelect < 2 {
			v = uint64(d.offered) >> (32 * d.dfSelect) & 0xffffffff
		}
	case OffDriverFeatureSelect:
		v = uint64(d.gfSelect)
	case OffDriverFeature:
		if d.gfSelect < 2 {
			v = uint64(d.driverFeatures) >> (32 * d.gfSelect) & 0xffffffff
		}
	case OffMSIXConfig:
		v = uint64(d.msixConfig)
	case OffNumQueues:
		v = uint64(d.numQueues)
	case OffDeviceStatus:
		if withBacking {
			// The backing device may have given up on its own (a broken
			// ring): the guest learns it here at the latest (health.go).
			d.checkBacking()
			d.retryReset()
		}
		v = uint64(d.status)
	case OffConfigGeneration:
		if withBacking {
			d.refreshGeneration()
		}
		v = uint64(d.generation)
	case OffQueueSelect:
		v = uint64(d.queueSelect)
	case OffQueueSize:
		// §4.1.4.3: a queue_size of 0 means the selected queue is
		// unavailable.
		if q != nil {
			v = uint64(q.size)
		}
	case OffQueueMSIXVector:
		v = uint64(NoVector)
		if q != nil {
			v = uint64(q.vector)
		}
	case OffQueueEnable:
		if q != nil && q.enabled {
			v = 1
		}
	case OffQueueNotifyOff:
		if q != nil {
			v = uint64(d.queueSelect)
		}
	case OffQueueDesc, OffQueueDriver, OffQueueDevice:
		if q != nil {
			v = *q.addrField(start)
		}
	}
	if start != off { // high half of a 64-bit field
		v >>= 32
	}
	if size < 8 {
		v &= 1<<(8*size) - 1
	}
	return v, nil
}

func (q *queue) addrField(start uint64) *uint64 {
	switch start {
	case OffQueueDesc:
		return &q.desc
	case OffQueueDriver:
		return &q.driver
	}
	return &q.device
}

func (d *Device) commonWrite(off uint64, size int, v uint64) error {
	start, err := commonField(off, size)
	if err != nil {
		return err
	}
	featuresOK := d.status&virtio.StatusFeaturesOK != 0
	driverOK := d.status&virtio.StatusDriverOK != 0
	q := d.selectedQueue()
	switch start {
	case OffDeviceFeatureSelect:
		d.dfSelect = uint32(v)
	case OffDriverFeatureSelect:
		d.gfSelect = uint32(v)
	case OffDriverFeature:
		// §3.1.1: features are fixed once FEATURES_OK is set.
		if featuresOK {
			return nil
		}
		switch d.gfSelect {
		case 0:
			d.driverFeatures = d.driverFeatures&^0xffffffff | virtio.Features(uint32(v))
		case 1:
			d.driverFeatures = d.driverFeatures&0xffffffff | virtio.Features(uint32(v))<<32
		default:
			// No feature bits exist beyond 63: accepting one makes
			// FEATURES_OK fail.
			if uint32(v) != 0 {
				d.extraAccepted = true
			}
		}
	case OffMSIXConfig:
		d.msixConfig = d.mapVector(uint16(v))
	case OffDeviceStatus:
		d.setStatus(virtio.Status(v))
	case OffQueueSelect:
		d.queueSelect = uint16(v)
	case OffQueueSize:
		// §4.1.4.3.2: the driver may reduce queue_size before enabling
		// the queue: to a power of two for split rings (§2.7), to any
		// size from 1 for packed ones (§2.8); anything else is ignored.
		// The format is the negotiated one: before FEATURES_OK the
		// driver's feature bits may still change, and the split rule
		// (which suits both formats) applies. §4.1.4.3.1: without
		// RING_PACKED, queue_size reads 0 or a power of two.
		n := uint16(v)
		f := d.driverFeatures
		if d.status&virtio.StatusFeaturesOK == 0 {
			f = 0
		}
		if q == nil || q.enabled || driverOK || n == 0 || n > d.maxQueue ||
			!vring.ValidQueueSizeFor(n, f) {
			return nil
		}
		q.size = n
	case OffQueueMSIXVector:
		if q == nil {
			return nil
		}
		q.vector = d.mapVector(uint16(v))
		if d.live {
			if err := d.rewireCall(int(d.queueSelect)); err != nil {
				d.needsReset(err)
			}
		}
	case OffQueueEnable:
		// §4.1.4.3.2: the driver must not write 0 to queue_enable (no
		// VIRTIO_F_RING_RESET); enabling after DRIVER_OK is not allowed
		// either.
		if q == nil || driverOK || uint16(v) != 1 {
			return nil
		}
		q.enabled = true
	case OffQueueDesc, OffQueueDriver, OffQueueDevice:
		if q == nil || q.enabled || driverOK {
			return nil
		}
		p := q.addrField(start)
		switch {
		case size == 8:
			*p = v
		case start == off:
			*p = *p&^0xffffffff | v&0xffffffff
		default:
			*p = *p&0xffffffff | (v&0xffffffff)<<32
		}
	}
	// device_feature, num_queues, config_generation and queue_notify_off
	// are read-only: writes are ignored.
	return nil
}

// mapVector returns v if the MSI-X table has it, else NO_VECTOR (§4.1.5.1.2:
// the device answers NO_VECTOR when it cannot map the vector).
func (d *Device) mapVector(v uint16) uint16 {
	if v == NoVector || int(v) >= d.opts.MSIXVectors {
		return NoVector
	}
	return v
}

const statusKnown = virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK |
	virtio.StatusDriverOK | virtio.StatusDeviceNeedsReset | virtio.StatusFailed

// setStatus applies a driver write to device_status (virtio 1.2 §2.1, §3.1).
func (d *Device) setStatus(v virtio.Status) {
	if v == 0 {
		d.reset()
		return
	}
	if d.resetPending {
		return // the reset is not complete: the driver waits for status 0
	}
	old := d.status
	// DEVICE_NEEDS_RESET is owned by the device: the driver's copy of it
	// is neither set nor cleared by the write.
	v = v&^virtio.StatusDeviceNeedsReset | old&virtio.StatusDeviceNeedsReset
	if v&^statusKnown != 0 {
		return // reserved bits
	}
	if old&^v != 0 {
		return // §2.1.2: the driver must not clear a status bit
	}
	set := v &^ old
	if set == 0 {
		return
	}
	if set&virtio.StatusFailed != 0 {
		// The driver gave up on the device: stop the data path.
		d.status |= virtio.StatusFailed
		d.stopRelay()
		if d.live || d.negotiated {
			if err := d.bk.SetStatus(0); err != nil && !errors.Is(err, vdpa.ErrClosed) {
				// The backing device may still be processing the
				// rings: as with a refused guest reset, the reset
				// stays pending (DataPathActive) and status reads
				// retry it.
				d.resetPending = true
				d.lastErr = backingErr("reset", err)
			}
		}
		d.live, d.negotiated = false, false
		set &^= virtio.StatusFailed
		if set == 0 {
			return
		}
	}
	if d.status&virtio.StatusFailed != 0 {
		return
	}
	// §3.1.1: the bits are set in order.
	need := map[virtio.Status]virtio.Status{
		virtio.StatusDriver:     virtio.StatusAcknowledge,
		virtio.StatusFeaturesOK: virtio.StatusDriver,
		virtio.StatusDriverOK:   virtio.StatusFeaturesOK,
	}
	for bit, pre := range need {
		if set&bit != 0 && v&pre == 0 {
			return
		}
	}
	if v&virtio.StatusDeviceNeedsReset != 0 && set&(virtio.StatusFeaturesOK|virtio.StatusDriverOK) != 0 {
		return // a device that needs reset accepts nothing more
	}
	if set&virtio.StatusFeaturesOK != 0 && !d.acceptFeatures() {
		// §3.1.1 step 6: FEATURES_OK stays clear when the device does
		// not support the accepted subset; the driver reads it back.
		set &^= virtio.StatusFeaturesOK
		if set&virtio.StatusDriverOK != 0 {
			return
		}
	}
	d.status |= set
	if set&virtio.StatusDriverOK == 0 {
		return
	}
	if d.mig.state.holdsDataPath() {
		// In STOP, STOP_COPY and RESUMING the data path starts on the
		// way back to RUNNING (restart), as if the driver had set the
		// bit before the stop; its rings are judged now, as they would
		// be then.
		if err := d.checkQueues(); err != nil {
			d.needsReset(err)
		}
		return
	}
	if err := d.goLive(); err != nil {
		d.needsReset(err)
	}
}

// acceptFeatures checks the driver's accepted features and negotiates them
// with the backing device.
func (d *Device) acceptFeatures() bool {
	f := d.driverFeatures
	if d.extraAccepted || f&^d.offered != 0 || !f.Has(virtio.FVersion1) {
		return false
	}
	if err := d.negotiateBacking(); err != nil {
		d.lastErr = err
		return false
	}
	// The register lock was released during the negotiation: a driver
	// that changed its features meanwhile (another vCPU, against §3.1.1)
	// does not get FEATURES_OK for features the backing device was not
	// given.
	if d.driverFeatures != f || d.extraAccepted {
		return false
	}
	// Fresh queues start at the format's initial position (a packed
	// ring at index 0 with both wrap counters 1, §2.8.1).
	for i := range d.queues {
		d.queues[i].base = vring.InitialState(f)
	}
	return true
}

// negotiateBacking takes the backing device from reset to FEATURES_OK with
// the driver's features.
func (d *Device) negotiateBacking() (err error) {
	b := d.bk
	if err := b.SetStatus(0); err != nil {
		return backingErr("reset", err)
	}
	defer func() {
		if err != nil {
			// Leave the backing device reset, not half set up with
			// features of a negotiation that failed.
			_ = b.SetStatus(0)
		}
	}()
	st := virtio.StatusAcknowledge | virtio.StatusDriver
	if err := b.SetStatus(st); err != nil {
		return backingErr("set status", err)
	}
	if err := b.SetFeatures(d.backingFeatures()); err != nil {
		return backingErr("set features", err)
	}
	if err := b.SetStatus(st | virtio.StatusFeaturesOK); err != nil {
		return backingErr("set status FEATURES_OK", err)
	}
	got, err := b.Status()
	if err != nil {
		return backingErr("status", err)
	}
	if got&virtio.StatusFeaturesOK == 0 {
		return backingErr("set status", errors.New("FEATURES_OK refused"))
	}
	d.negotiated = true
	return nil
}

// backingFeatures are the features programmed into the backing device: the
// driver's, plus LOG_ALL while the device logs its writes for migration,
// minus RING_PACKED while the relay runs (its shadow rings are split rings,
// whatever the guest's format).
func (d *Device) backingFeatures() virtio.Features {
	f := d.driverFeatures
	if d.relay != nil {
		f &^= virtio.FRingPacked.Bit()
	}
	if d.tracking == DirtyDeviceLog && d.canLogAll {
		f = f.With(virtio.FLogAll)
	}
	return f
}

// reset performs a device reset (§2.4): registers return to their initial
// values and the backing device is reset.
//
// A backing device that refuses its reset may still be processing the
// rings; the reset is then not complete: device_status reads
// DEVICE_NEEDS_RESET rather than 0, Err reports the failure, and every
// status read (and another write of 0) tries the backing reset again. A
// backing device that is gone (vdpa.ErrClosed) no longer processes
// anything, and its reset counts as done.
func (d *Device) reset() {
	d.stopRelay()
	var err error
	if d.live || d.negotiated || d.resetPending {
		err = d.bk.SetStatus(0)
	}
	d.live = false
	d.resetRegisters()
	if err == nil || errors.Is(err, vdpa.ErrClosed) {
		// Stale kicks go. Not under a backing device that refused its
		// reset: its workers may be blocked reading the kick eventfds,
		// and a read here would wait for them (for ever, on an idle
		// queue).
		for _, k := range d.kicks {
			_, _ = k.TryWait()
		}
	}
	d.settleReset(err)
}

// settleReset records the outcome of the backing reset a guest reset
// made: with an error the reset stays pending (see reset).
func (d *Device) settleReset(err error) {
	if err == nil || errors.Is(err, vdpa.ErrClosed) {
		d.resetPending = false
		return
	}
	d.resetPending = true
	d.status = virtio.StatusDeviceNeedsReset
	d.lastErr = backingErr("reset", err)
}

// retryReset is a status read's retry of a pending backing reset.
func (d *Device) retryReset() {
	if !d.resetPending {
		return
	}
	if err := d.bk.SetStatus(0); err != nil && !errors.Is(err, vdpa.ErrClosed) {
		d.lastErr = backingErr("reset", err)
		return
	}
	d.resetPending = false
	if d.status&virtio.StatusFailed == 0 {
		// A guest reset completes; a driver that set FAILED keeps
		// seeing it.
		d.status = 0
	}
	d.lastErr = nil
}
