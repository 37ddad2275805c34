package kernel

import (
	"fmt"
	"sync"

	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Options configures Open. A nil *Options means defaults.
type Options struct {
	// BackendFeatures, when non-zero, limits the backend features
	// negotiated to this set (intersected with Supported and with what the
	// kernel offers). IOTLB_MSG_V2 is always required and always taken.
	BackendFeatures BackendFeatures
}

// Device is an open /dev/vhost-vdpa-N. It implements vdpa.Device and
// vdpa.Suspender.
//
// Like every vdpa.Device it is not meant for concurrent control calls; it
// serializes them with a mutex anyway, so a racing Close is safe. The data
// path (kick and call eventfds) runs independently.
type Device struct {
	mu      sync.Mutex
	f       *vhostsys.File
	closed  bool
	backend BackendFeatures
	offered BackendFeatures
	nvqs    int
	cfgSize int
	// maxNum is VHOST_VDPA_GET_VRING_NUM, the largest queue size; ngroups
	// is VHOST_VDPA_GET_GROUP_NUM (0 when the kernel cannot say). Both are
	// read at Open.
	maxNum  uint16
	ngroups uint32
	// features are the features last given to SetFeatures: they size the
	// rings SetQueueAddr checks (vring.RingSizes).
	features virtio.Features
	iova     vhostsys.IOVARange
	queues   []queue
	// mems is the memory MapMemory put in each address space; maps are
	// the IOTLB mappings this Device made, per address space, in the order
	// made; memASID the subset MapMemory made. groupASID records
	// SetGroupASID (groups not in it are in address space 0).
	mems      map[uint32]*vring.Memory
	maps      map[uint32][]Mapping
	memASID   map[uint32][]Mapping
	groupASID map[uint32]uint32
}

type queue struct {
	num  uint16
	addr vdpa.QueueAddr
	set  bool // addr was set
}

var (
	_ vdpa.Device    = (*Device)(nil)
	_ vdpa.Suspender = (*Device)(nil)
)

// Open opens a vhost-vdpa character device, becomes its owner and
// negotiates backend features. Opening resets the device (the kernel sets
// status 0 on open).
func Open(path string, opts *Options) (*Device, error) {
	f, err := vhostsys.Open(path)
	if err != nil {
		return nil, err
	}
	d := &Device{f: f, maps: map[uint32][]Mapping{}, memASID: map[uint32][]Mapping{},
		mems: map[uint32]*vring.Memory{}, groupASID: map[uint32]uint32{}}
	if err := d.init(opts); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

func (d *Device) init(opts *Options) error {
	if err := d.f.SetOwner(); err != nil {
		return err
	}
	off, err := d.f.GetBackendFeatures()
	if err != nil {
		return err
	}
	d.offered = BackendFeatures(off)
	if !d.offered.Has(BackendIOTLBMsgV2) {
		return fmt.Errorf("%w (offered %v)", ErrNoIOTLBv2, d.offered)
	}
	want := d.offered & Supported
	if opts != nil && opts.BackendFeatures != 0 {
		want &= opts.BackendFeatures
	}
	want = want.With(BackendIOTLBMsgV2)
	if !want.Has(BackendIOTLBASID) {
		want &^= BackendDescASID.Bit()
	}
	if err := d.f.SetBackendFeatures(uint64(want)); err != nil {
		return err
	}
	d.backend = want
	n, err := d.f.VDPAGetVQsCount()
	if err != nil {
		return err
	}
	if n > 1<<16 {
		return fmt.Errorf("vdpa/kernel: device reports %d virtqueues", n)
	}
	d.nvqs = int(n)
	d.queues = make([]queue, n)
	cs, err := d.f.VDPAGetConfigSize()
	if err != nil {
		return err
	}
	if cs > 1<<20 {
		return fmt.Errorf("vdpa/kernel: device reports a %d-byte config space", cs)
	}
	d.cfgSize = int(cs)
	if d.iova, err = d.f.VDPAGetIOVARange(); err != nil {
		return err
	}
	if d.maxNum, err = d.f.VDPAGetVringNum(); err != nil {
		return err
	}
	// VHOST_VDPA_GET_GROUP_NUM is Linux 5.17+; without it SetGroupASID
	// (same vintage) leaves the group check to the kernel.
	if g, err := d.f.VDPAGetGroupNum(); err == nil {
		d.ngroups = g
	}
	return nil
}

// lock takes the mutex and fails after Close.
func (d *Device) lock() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// lockedCall runs fn with the device locked (ErrClosed after Close) and
// maps the error of a call on the closed file to ErrClosed.
func lockedCall[T any](d *Device, fn func() (T, error)) (T, error) {
	if err := d.lock(); err != nil {
		var zero T
		return zero, err
	}
	defer d.mu.Unlock()
	v, err := fn()
	return v, vhostcore.ClosedErr(err)
}

// lockedDo is lockedCall for an operation that returns only an error.
func lockedDo(d *Device, fn func() error) error {
	_, err := lockedCall(d, func() (struct{}, error) { return struct{}{}, fn() })
	return err
}

// queueCall is lockedCall for an operation on queue q, which it checks
// first.
func queueCall[T any](d *Device, q int, fn func(q uint32) (T, error)) (T, error) {
	return lockedCall(d, func() (T, error) {
		if err := d.checkQueue(q); err != nil {
			var zero T
			return zero, err
		}
		return fn(uint32(q))
	})
}

// queueDo is queueCall for an operation that returns only an error.
func queueDo(d *Device, q int, fn func(q uint32) error) error {
	_, err := queueCall(d, q, func(q uint32) (struct{}, error) { return struct{}{}, fn(q) })
	return err
}

func (d *Device) checkQueue(q int) error {
	if q < 0 || q >= d.nvqs {
		return fmt.Errorf("%w: queue %d of %d", ErrQueueIndex, q, d.nvqs)
	}
	return nil
}

// Path is the device node the Device was opened from.
func (d *Device) Path() string { return d.f.Name() }

// BackendFeatures are the negotiated backend features.
func (d *Device) BackendFeatures() BackendFeatures { return d.backend }

// OfferedBackendFeatures are the backend features the kernel offered.
func (d *Device) OfferedBackendFeatures() BackendFeatures { return d.offered }

// DeviceID is VHOST_VDPA_GET_DEVICE_ID.
func (d *Device) DeviceID() (virtio.DeviceID, error) {
	id, err := lockedCall(d, d.f.VDPAGetDeviceID)
	return virtio.DeviceID(id), err
}

// Features is VHOST_GET_FEATURES: the device's offered features.
func (d *Device) Features() (virtio.Features, error) {
	f, err := lockedCall(d, d.f.GetFeatures)
	return virtio.Features(f), err
}

// SetFeatures is VHOST_SET_FEATURES. f must be a subset of Features; the
// kernel refuses changes once FEATURES_OK is set (EBUSY).
func (d *Device) SetFeatures(f virtio.Features) error {
	return lockedDo(d, func() error {
		off, err := d.f.GetFeatures()
		if err != nil {
			return err
		}
		if extra := uint64(f) &^ off; extra != 0 {
			return fmt.Errorf("%w: %s not offered", ErrFeatures, virtio.Features(extra).Format(virtio.DeviceNet))
		}
		if err := d.f.SetFeatures(uint64(f)); err != nil {
			return err
		}
		d.features = f
		return nil
	})
}

// Status is VHOST_VDPA_GET_STATUS.
func (d *Device) Status() (virtio.Status, error) {
	s, err := lockedCall(d, d.f.VDPAGetStatus)
	return virtio.Status(s), err
}

// SetStatus is VHOST_VDPA_SET_STATUS. Status 0 resets the device; the
// kernel refuses to clear bits otherwise (EINVAL). Setting FEATURES_OK
// re-reads the status, as the virtio spec requires of a driver, and
// returns ErrFeatures when the device did not accept the features. A reset
// without IOTLB_PERSIST drops the device's mappings; SetStatus(0) then
// replays the mappings this Device made, so the memory stays mapped.
func (d *Device) SetStatus(s virtio.Status) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := d.f.VDPASetStatus(uint8(s)); err != nil {
		return vhostcore.ClosedErr(err)
	}
	if s == 0 {
		for i := range d.queues {
			d.queues[i] = queue{}
		}
		// A reset binds every group to address space 0 again.
		clear(d.groupASID)
		if !d.backend.Has(BackendIOTLBPersist) {
			return d.replayMaps()
		}
		return nil
	}
	if s&virtio.StatusFeaturesOK != 0 {
		got, err := d.f.VDPAGetStatus()
		if err != nil {
			return vhostcore.ClosedErr(err)
		}
		if virtio.Status(got)&virtio.StatusFeaturesOK == 0 {
			return fmt.Errorf("%w: FEATURES_OK not set after writing %v (status %v)", ErrFeatures, s, virtio.Status(got))
		}
	}
	return nil
}

// Negotiate runs the feature handshake: ACKNOWLEDGE|DRIVER, features =
// offered ∩ want, FEATURES_OK (checked). It returns the negotiated set.
func (d *Device) Negotiate(want virtio.Features) (virtio.Features, error) {
	off, err := d.Features()
	if err != nil {
		return 0, err
	}
	f := off & want
	if err := d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver); err != nil {
		return 0, err
	}
	if err := d.SetFeatures(f); err != nil {
		return 0, err
	}
	if err := d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK); err != nil {
		return 0, err
	}
	return f, nil
}

// ConfigSize is VHOST_VDPA_GET_CONFIG_SIZE (read at Open).
func (d *Device) ConfigSize() (int, error) {
	return lockedCall(d, func() (int, error) { return d.cfgSize, nil })
}

func (d *Device) checkConfig(off int, n int) error {
	if off < 0 || n < 0 || off > d.cfgSize || n > d.cfgSize-off {
		return fmt.Errorf("%w: [%d, %d+%d) of %d bytes", ErrConfigRange, off, off, n, d.cfgSize)
	}
	return nil
}

// ReadConfig is VHOST_VDPA_GET_CONFIG.
func (d *Device) ReadConfig(off int, p []byte) error {
	return lockedDo(d, func() error {
		if err := d.checkConfig(off, len(p)); err != nil {
			return err
		}
		if len(p) == 0 {
			return nil
		}
		return d.f.VDPAGetConfig(uint32(off), p)
	})
}

// WriteConfig is VHOST_VDPA_SET_CONFIG.
func (d *Device) WriteConfig(off int, p []byte) error {
	return lockedDo(d, func() error {
		if err := d.checkConfig(off, len(p)); err != nil {
			return err
		}
		if len(p) == 0 {
			return nil
		}
		return d.f.VDPASetConfig(uint32(off), p)
	})
}

// NumQueues is VHOST_VDPA_GET_VQS_COUNT (read at Open).
func (d *Device) NumQueues() (int, error) {
	return lockedCall(d, func() (int, error) { return d.nvqs, nil })
}

// MaxQueueSize is VHOST_VDPA_GET_VRING_NUM.
func (d *Device) MaxQueueSize() (uint16, error) {
	return lockedCall(d, d.f.VDPAGetVringNum)
}

// QueueSize is VHOST_VDPA_GET_VRING_SIZE (Linux 6.8+): queue q's own
// maximum size. Older kernels fail with ENOTTY.
func (d *Device) QueueSize(q int) (uint16, error) {
	n, err := queueCall(d, q, d.f.VDPAGetVringSize)
	if err != nil {
		return 0, err
	}
	if n > vring.MaxQueueSize {
		return 0, fmt.Errorf("vdpa/kernel: queue %d reports size %d", q, n)
	}
	return uint16(n), nil
}

// SetQueueNum is VHOST_SET_VRING_NUM. The size must be a power of two no
// larger than the queue's maximum (VHOST_VDPA_GET_VRING_SIZE where the
// kernel has it, else MaxQueueSize); the kernel itself checks only the
// power of two. A refused size is ErrQueueLayout and, as with vdpa.Local,
// vdpa.ErrBadQueue.
func (d *Device) SetQueueNum(q int, size uint16) error {
	return queueDo(d, q, func(uint32) error {
		limit := d.queueMax(q)
		if !vring.ValidQueueSizeFor(size, d.features) || size > limit {
			return fmt.Errorf("%w: %w: queue %d size %d (up to %d; a power of two unless RING_PACKED)", ErrQueueLayout, vdpa.ErrBadQueue, q, size, limit)
		}
		if err := d.f.SetVringNum(uint32(q), uint32(size)); err != nil {
			return err
		}
		d.queues[q].num = size
		return nil
	})
}

// queueMax is queue q's largest size: its own (Linux 6.8+) when the kernel
// reports one, else the device's. Called with d.mu held.
func (d *Device) queueMax(q int) uint16 {
	limit := d.maxNum
	if n, err := d.f.VDPAGetVringSize(uint32(q)); err == nil && n != 0 && n < uint32(limit) {
		limit = uint16(n)
	}
	return limit
}

// SetQueueAddr is VHOST_SET_VRING_ADDR. The addresses are IOVAs, that is
// guest addresses of the memory given to SetMemory. When the queue size and
// memory are known, the areas are checked for alignment and against guest
// memory first.
func (d *Device) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	return queueDo(d, q, func(uint32) error {
		if n := d.queues[q].num; n != 0 {
			l := vring.Layout{Size: n, Desc: a.Desc, Avail: a.Avail, Used: a.Used}
			if err := l.ValidateFor(d.features); err != nil {
				return fmt.Errorf("%w: queue %d: %w", ErrQueueLayout, q, err)
			}
			if mem, asid := d.memFor(q); mem != nil {
				ds, as, us := vring.RingSizes(n, d.features)
				if !mem.Contains(a.Desc, ds) || !mem.Contains(a.Avail, as) || !mem.Contains(a.Used, us) {
					return fmt.Errorf("%w: queue %d rings outside the memory of its address space %d", ErrQueueLayout, q, asid)
				}
			}
		}
		err := d.f.SetVringAddr(vhostsys.VringAddr{
			Index:         uint32(q),
			DescUserAddr:  uint64(a.Desc),
			UsedUserAddr:  uint64(a.Used),
			AvailUserAddr: uint64(a.Avail),
		})
		if err != nil {
			return err
		}
		d.queues[q].addr, d.queues[q].set = a, true
		return nil
	})
}

// SetQueueBase is VHOST_SET_VRING_BASE. vhost-vdpa restores only the
// available index of a split ring and restarts the used index from it, so
// a split state with NextUsed != NextAvail is refused with ErrInFlight. A
// packed ring's base carries both positions with their wrap counters
// (vhostcore.VringBase), so a packed state is restored as it is, once
// checked against the queue size set (vhost-vdpa hands it to the device
// unchecked): one no queue of that size can be at is refused with
// vring.ErrInvalidState.
func (d *Device) SetQueueBase(q int, st vdpa.QueueState) error {
	return queueDo(d, q, func(uint32) error {
		if n := d.queues[q].num; n != 0 && d.features.Has(virtio.FRingPacked) {
			if _, ok := st.PackedInFlight(n); !ok {
				return fmt.Errorf("%w: queue %d size %d: packed next avail %#x, next used %#x",
					vring.ErrInvalidState, q, n, st.NextAvail, st.NextUsed)
			}
		}
		// A packed ring's base carries both positions (avail in bits
		// 0..15, used in 16..31, each with its wrap counter in bit 15:
		// vhostcore.VringBase, which vhost-vdpa splits into struct
		// vdpa_vq_state_packed); a split ring's carries avail alone.
		if !d.features.Has(virtio.FRingPacked) && st.NextUsed != st.NextAvail {
			return fmt.Errorf("%w: queue %d next avail %d, next used %d", ErrInFlight, q, st.NextAvail, st.NextUsed)
		}
		return d.f.SetVringBase(uint32(q), vhostcore.VringBase(st, d.features))
	})
}

// QueueBase reads queue q's position: NextAvail from VHOST_GET_VRING_BASE,
// NextUsed from the used ring's idx in guest memory (the device publishes
// it there) for a split ring, from the base's bits 16..31 for a packed one.
// Call it on a suspended device for a stable answer.
func (d *Device) QueueBase(q int) (vdpa.QueueState, error) {
	return queueCall(d, q, func(uint32) (vdpa.QueueState, error) {
		n, err := d.f.GetVringBase(uint32(q))
		if err != nil {
			return vdpa.QueueState{}, err
		}
		st, err := vhostcore.BaseState(n, d.features)
		if err != nil {
			return vdpa.QueueState{}, fmt.Errorf("vdpa/kernel: queue %d: %w", q, err)
		}
		if d.features.Has(virtio.FRingPacked) {
			return st, nil // both positions are in the base
		}
		if mem, _ := d.memFor(q); d.queues[q].set && mem != nil {
			used, err := vhostcore.UsedIdx(mem, d.queues[q].addr.Used)
			if err != nil {
				return vdpa.QueueState{}, fmt.Errorf("vdpa/kernel: queue %d: %w", q, err)
			}
			st.NextUsed = used
		}
		return st, nil
	})
}

// SetQueueKick is VHOST_SET_VRING_KICK: the kernel polls kick and notifies
// the device. nil unbinds.
func (d *Device) SetQueueKick(q int, kick *vdpa.EventFD) error {
	return queueDo(d, q, func(q uint32) error { return d.f.SetVringKick(q, vhostcore.Fd(kick)) })
}

// SetQueueCall is VHOST_SET_VRING_CALL: the kernel signals call when the
// device interrupts. nil unbinds.
func (d *Device) SetQueueCall(q int, call *vdpa.EventFD) error {
	return queueDo(d, q, func(q uint32) error { return d.f.SetVringCall(q, vhostcore.Fd(call)) })
}

// SetConfigCall is VHOST_VDPA_SET_CONFIG_CALL: signalled when the device's
// configuration changes. nil unbinds.
func (d *Device) SetConfigCall(call *vdpa.EventFD) error {
	return lockedDo(d, func() error {
		return d.f.VDPASetConfigCall(vhostcore.Fd(call))
	})
}

// EnableQueue is VHOST_VDPA_SET_VRING_ENABLE.
func (d *Device) EnableQueue(q int, enable bool) error {
	return queueDo(d, q, func(q uint32) error { return d.f.VDPASetVringEnable(q, enable) })
}

// SetupQueue configures and enables queue q from a ring layout in one
// call: num, addresses, base, kick, call, enable.
func (d *Device) SetupQueue(q int, l vring.Layout, st vdpa.QueueState, kick, call *vdpa.EventFD) error {
	return vhostcore.SetupQueue(d, q, l, st, kick, call)
}

// Suspend is VHOST_VDPA_SUSPEND: the device stops processing its queues
// and keeps their state, which QueueBase then reads. It needs the SUSPEND
// backend feature.
func (d *Device) Suspend() error {
	return lockedDo(d, func() error {
		if !d.backend.Has(BackendSuspend) {
			return fmt.Errorf("VHOST_VDPA_SUSPEND: %w", ErrNotSupported)
		}
		return d.f.VDPASuspend()
	})
}

// Resume is VHOST_VDPA_RESUME: a suspended device continues where it
// stopped. It needs the RESUME backend feature.
func (d *Device) Resume() error {
	return lockedDo(d, func() error {
		if !d.backend.Has(BackendResume) {
			return fmt.Errorf("VHOST_VDPA_RESUME: %w", ErrNotSupported)
		}
		return d.f.VDPAResume()
	})
}

// NumGroups is VHOST_VDPA_GET_GROUP_NUM: the number of virtqueue groups.
func (d *Device) NumGroups() (int, error) {
	n, err := lockedCall(d, d.f.VDPAGetGroupNum)
	return int(n), err
}

// NumAddressSpaces is VHOST_VDPA_GET_AS_NUM.
func (d *Device) NumAddressSpaces() (int, error) {
	n, err := lockedCall(d, d.f.VDPAGetASNum)
	return int(n), err
}

// QueueGroup is VHOST_VDPA_GET_VRING_GROUP: the group queue q belongs to.
func (d *Device) QueueGroup(q int) (int, error) {
	g, err := queueCall(d, q, d.f.VDPAGetVringGroup)
	return int(g), err
}

// QueueDescGroup is VHOST_VDPA_GET_VRING_DESC_GROUP (Linux 6.7+): the
// group of queue q's rings when they may be bound apart from its buffers.
// Devices without that capability fail with EOPNOTSUPP.
func (d *Device) QueueDescGroup(q int) (int, error) {
	g, err := queueCall(d, q, d.f.VDPAGetVringDescGroup)
	return int(g), err
}

// SetGroupASID is VHOST_VDPA_SET_GROUP_ASID: binds a virtqueue group to an
// address space. It needs the IOTLB_ASID backend feature; a group outside
// [0, NumGroups) is ErrGroupIndex.
func (d *Device) SetGroupASID(group, asid uint32) error {
	return lockedDo(d, func() error {
		if !d.backend.Has(BackendIOTLBASID) {
			return fmt.Errorf("VHOST_VDPA_SET_GROUP_ASID: %w", ErrNotSupported)
		}
		if d.ngroups != 0 && group >= d.ngroups {
			return fmt.Errorf("%w: group %d of %d", ErrGroupIndex, group, d.ngroups)
		}
		if err := d.f.VDPASetGroupASID(group, asid); err != nil {
			return err
		}
		d.groupASID[group] = asid
		return nil
	})
}

// memFor returns the memory mapped in queue q's address space (its group's
// ASID), nil when none is known.
func (d *Device) memFor(q int) (*vring.Memory, uint32) {
	var asid uint32
	if len(d.groupASID) > 0 {
		if g, err := d.f.VDPAGetVringGroup(uint32(q)); err == nil {
			asid = d.groupASID[g]
		}
	}
	return d.mems[asid], asid
}

// Close closes the device node; the kernel resets the device and drops
// every mapping. The memory given to SetMemory is not closed.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.closed = true
	clear(d.mems)
	return d.f.Close()
}
