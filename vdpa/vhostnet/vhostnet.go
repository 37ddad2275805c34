package vhostnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// OpError is the error of one vhost or tun operation, naming it and
// wrapping the errno.
type OpError = vhostsys.OpError

// Queue indices of the two-queue device.
const (
	RxQueue = 0
	TxQueue = 1
)

var (
	// ErrClosed is returned after Close.
	ErrClosed = vdpa.ErrClosed
	// ErrQueueIndex is returned for a queue other than RxQueue or TxQueue.
	ErrQueueIndex = errors.New("vhostnet: queue index out of range")
	// ErrFeatures is returned by SetFeatures for features not offered.
	ErrFeatures = errors.New("vhostnet: features not offered")
	// ErrQueueLayout is returned for ring areas that are misaligned, set
	// before the queue size, or not inside one memory region.
	ErrQueueLayout = errors.New("vhostnet: invalid queue layout")
	// ErrNoMemory is returned for queue addresses set before SetMemory.
	ErrNoMemory = errors.New("vhostnet: no guest memory (call SetMemory first)")
	// ErrConfigRange is returned for config accesses outside the
	// configuration space.
	ErrConfigRange = errors.New("vhostnet: config access outside the configuration space")
	// ErrReadOnlyConfig is returned for writes to config fields other than
	// the MAC.
	ErrReadOnlyConfig = errors.New("vhostnet: config field is read-only")
	// ErrInFlight is returned by SetQueueBase for a state with buffers in
	// flight (NextUsed != NextAvail): vhost restarts its used index from
	// the ring, so they would never complete.
	ErrInFlight = errors.New("vhostnet: queue state has buffers in flight")
	// ErrLog is returned by SetLog for a bitmap vhost cannot use.
	ErrLog = errors.New("vhostnet: unusable dirty log")
	// ErrStatus is returned for status writes that clear bits without a
	// reset.
	ErrStatus = errors.New("vhostnet: invalid status transition")
)

// Features the kernel's vhost-net handles that this device offers and
// passes to VHOST_SET_FEATURES. The rest of what VHOST_GET_FEATURES reports
// is vhost-internal or needs machinery vhostnet does not drive
// (ACCESS_PLATFORM with a device IOTLB, RING_RESET).
//
// Bit 27 is VIRTIO_F_ANY_LAYOUT for the driver but VHOST_NET_F_VIRTIO_NET_HDR
// for vhost-net ("vhost adds the virtio-net header"); passing it would make
// vhost-net write headers while the tap writes them too. So ANY_LAYOUT is
// offered to the driver (vhost-net copies through iovec iterators and takes
// any descriptor layout) but never handed to the kernel.
var kernelOffer = virtio.Features(0).With(virtio.FNotifyOnEmpty, virtio.FIndirectDesc,
	virtio.FEventIdx, virtio.FVersion1, virtio.NetFMrgRxbuf, virtio.FLogAll)

// configSize covers mac, status, max_virtqueue_pairs and mtu.
const configSize = virtio.NetCfgMTU + 2

// Options configures Open. A nil *Options means defaults.
type Options struct {
	// Path is the vhost-net node; "/dev/vhost-net" if empty.
	Path string
	// TapName names the tap interface to create; empty lets the kernel
	// pick tapN.
	TapName string
	// MAC, when set, is offered with VIRTIO_NET_F_MAC in the config space.
	MAC net.HardwareAddr
	// MTU, when non-zero, is offered with VIRTIO_NET_F_MTU.
	MTU uint16
	// LinkDown reports the link down in the config status (it is up by
	// default). VIRTIO_NET_F_STATUS is always offered.
	LinkDown bool
	// NoTapUp leaves the tap interface down; by default Open brings it up
	// so frames flow.
	NoTapUp bool
}

// Device is a vhost-net back-end attached to a tap. It implements
// vdpa.Device, vdpa.Suspender and vdpa.Logger. Control calls are
// serialized by a mutex; the data path runs in the kernel.
type Device struct {
	mu      sync.Mutex
	f       *vhostsys.File
	tap     *os.File
	tapName string
	closed  bool

	offered   virtio.Features
	features  virtio.Features // negotiated (driver-accepted)
	status    virtio.Status
	cfg       virtio.NetConfig
	mem       *vring.Memory
	log       *dirty.Bitmap
	suspended bool
	queues    [2]queue
}

type queue struct {
	num      uint16
	addr     vdpa.QueueAddr
	addrSet  bool
	enabled  bool
	attached bool
}

var (
	_ vdpa.Device    = (*Device)(nil)
	_ vdpa.Suspender = (*Device)(nil)
	_ vdpa.Logger    = (*Device)(nil)
)

// Open creates the tap, opens vhost-net and becomes its owner.
func Open(opts *Options) (*Device, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Path == "" {
		o.Path = "/dev/vhost-net"
	}
	if o.MAC != nil && len(o.MAC) != 6 {
		return nil, fmt.Errorf("vhostnet: MAC %v is not 6 bytes", o.MAC)
	}
	if o.MTU != 0 && o.MTU < 68 {
		return nil, fmt.Errorf("vhostnet: MTU %d is below 68", o.MTU)
	}
	tap, name, err := vhostsys.OpenTap(vhostsys.TapOptions{Name: o.TapName, VnetHdrSize: virtio.NetHdrSize})
	if err != nil {
		return nil, err
	}
	f, err := vhostsys.Open(o.Path)
	if err != nil {
		tap.Close()
		return nil, err
	}
	d := &Device{f: f, tap: tap, tapName: name}
	if err := d.init(o); err != nil {
		f.Close()
		tap.Close()
		return nil, err
	}
	return d, nil
}

func (d *Device) init(o Options) error {
	if err := d.f.SetOwner(); err != nil {
		return err
	}
	kf, err := d.f.GetFeatures()
	if err != nil {
		return err
	}
	d.offered = virtio.Features(kf)&kernelOffer | virtio.FAnyLayout.Bit() | virtio.NetFStatus.Bit()
	if o.MAC != nil {
		d.offered |= virtio.NetFMAC.Bit()
		copy(d.cfg.MAC[:], o.MAC)
	}
	if o.MTU != 0 {
		d.offered |= virtio.NetFMTU.Bit()
		d.cfg.MTU = o.MTU
	}
	if !o.LinkDown {
		d.cfg.Status = virtio.NetSLinkUp
	}
	d.cfg.MaxVirtqueuePairs = 1
	if !o.NoTapUp {
		if err := vhostsys.SetLinkUp(d.tapName, true); err != nil {
			return err
		}
	}
	return nil
}

func (d *Device) lock() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	return nil
}

func checkQueue(q int) error {
	if q != RxQueue && q != TxQueue {
		return fmt.Errorf("%w: queue %d of 2", ErrQueueIndex, q)
	}
	return nil
}

// TapName is the tap interface's name.
func (d *Device) TapName() string { return d.tapName }

// DeviceID is virtio.DeviceNet.
func (d *Device) DeviceID() (virtio.DeviceID, error) { return virtio.DeviceNet, nil }

// Features are the offered features: what vhost-net handles (of
// NOTIFY_ON_EMPTY, ANY_LAYOUT, INDIRECT_DESC, EVENT_IDX, VERSION_1,
// MRG_RXBUF and LOG_ALL) plus the emulated STATUS, MAC and MTU. LOG_ALL is
// accepted from the driver, but logging follows SetLog: the kernel gets
// VHOST_F_LOG_ALL exactly while a log is set.
func (d *Device) Features() (virtio.Features, error) {
	if err := d.lock(); err != nil {
		return 0, err
	}
	defer d.mu.Unlock()
	return d.offered, nil
}

// kernelFeatures is what VHOST_SET_FEATURES gets: the ring features of f,
// plus LOG_ALL exactly while a log is set (a driver's LOG_ALL without a log
// base would have vhost log into address 0).
func (d *Device) kernelFeatures(f virtio.Features) uint64 {
	k := f & kernelOffer &^ virtio.FLogAll.Bit()
	if d.log != nil {
		k |= virtio.FLogAll.Bit()
	}
	return uint64(k)
}

// SetFeatures accepts the driver's features (a subset of Features), hands
// the ring features to vhost-net and sizes the tap's virtio-net header.
func (d *Device) SetFeatures(f virtio.Features) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if extra := f &^ d.offered; extra != 0 {
		return fmt.Errorf("%w: %s", ErrFeatures, extra.Format(virtio.DeviceNet))
	}
	if d.status&virtio.StatusFeaturesOK != 0 {
		return fmt.Errorf("%w: features are fixed once FEATURES_OK is set", ErrStatus)
	}
	if err := vhostsys.SetTapVnetHdrSize(d.tap, virtio.NetHdrLen(f)); err != nil {
		return err
	}
	if err := d.f.SetFeatures(d.kernelFeatures(f)); err != nil {
		return vhostcore.ClosedErr(err)
	}
	d.features = f
	return nil
}

// Status returns the emulated status byte.
func (d *Device) Status() (virtio.Status, error) {
	if err := d.lock(); err != nil {
		return 0, err
	}
	defer d.mu.Unlock()
	return d.status, nil
}

// SetStatus writes the emulated status. DRIVER_OK attaches the enabled
// queues to the tap; 0 resets: the rings are detached, ownership is reset
// and taken again (forgetting memory table, rings and log), features
// cleared.
func (d *Device) SetStatus(s virtio.Status) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if s == 0 {
		return d.reset()
	}
	if d.status&^s != 0 {
		return fmt.Errorf("%w: %v -> %v", ErrStatus, d.status, s)
	}
	if s&virtio.StatusDriverOK != 0 && d.status&virtio.StatusDriverOK == 0 {
		for q := range d.queues {
			if d.queues[q].enabled {
				if err := d.attach(q); err != nil {
					return err
				}
			}
		}
	}
	d.status = s
	return nil
}

func (d *Device) reset() error {
	for q := range d.queues {
		if err := d.detach(q); err != nil {
			return err
		}
	}
	if err := d.f.ResetOwner(); err != nil {
		return vhostcore.ClosedErr(err)
	}
	if err := d.f.SetOwner(); err != nil {
		return vhostcore.ClosedErr(err)
	}
	d.queues = [2]queue{}
	d.features, d.status, d.mem, d.log, d.suspended = 0, 0, nil, nil, false
	return nil
}

func (d *Device) attach(q int) error {
	if d.queues[q].attached || d.suspended {
		return nil
	}
	if err := d.f.NetSetBackend(uint32(q), int(d.tap.Fd())); err != nil {
		return vhostcore.ClosedErr(err)
	}
	d.queues[q].attached = true
	return nil
}

// detach unbinds the ring from the tap; vhost-net flushes pending work
// first, so the ring is quiescent afterwards.
func (d *Device) detach(q int) error {
	if !d.queues[q].attached {
		return nil
	}
	if err := d.f.NetSetBackend(uint32(q), vhostsys.FileUnbind); err != nil {
		return vhostcore.ClosedErr(err)
	}
	d.queues[q].attached = false
	return nil
}

// ConfigSize is the emulated config space: mac, status,
// max_virtqueue_pairs, mtu.
func (d *Device) ConfigSize() (int, error) { return configSize, nil }

func checkConfig(off, n int) error {
	if off < 0 || n < 0 || off > configSize || n > configSize-off {
		return fmt.Errorf("%w: [%d, %d+%d) of %d bytes", ErrConfigRange, off, off, n, configSize)
	}
	return nil
}

// ReadConfig reads the emulated virtio-net config space.
func (d *Device) ReadConfig(off int, p []byte) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkConfig(off, len(p)); err != nil {
		return err
	}
	var b [virtio.NetConfigSize]byte
	if err := d.cfg.Encode(b[:]); err != nil {
		return err
	}
	copy(p, b[off:])
	return nil
}

// WriteConfig writes the MAC (legacy drivers set it this way); every other
// field is read-only.
func (d *Device) WriteConfig(off int, p []byte) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkConfig(off, len(p)); err != nil {
		return err
	}
	if off+len(p) > virtio.NetCfgMAC+6 {
		return fmt.Errorf("%w: [%d, %d)", ErrReadOnlyConfig, off, off+len(p))
	}
	copy(d.cfg.MAC[off:], p)
	return nil
}

// NumQueues is 2 (receive and transmit).
func (d *Device) NumQueues() (int, error) { return 2, nil }

// MaxQueueSize is the largest split ring vhost accepts.
func (d *Device) MaxQueueSize() (uint16, error) { return vring.MaxQueueSize, nil }

// SetMemory installs the memory table (VHOST_SET_MEM_TABLE): each region
// at its guest address, backed by its address in this process. While a
// dirty log is set (SetLog), every region must lie inside its span: the
// kernel does not know the log's size and would set bits past its end for
// writes to a region beyond it.
func (d *Device) SetMemory(mem *vring.Memory) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if mem == nil {
		return fmt.Errorf("%w: SetMemory(nil)", ErrNoMemory)
	}
	if err := logCovers(d.log, mem); err != nil {
		return err
	}
	var rs []vhostsys.MemoryRegion
	for _, r := range mem.Regions() {
		rs = append(rs, vhostsys.MemoryRegion{GuestPhysAddr: uint64(r.Base()), MemorySize: r.Size(), UserspaceAddr: uint64(r.HostAddr())})
	}
	if err := d.f.SetMemTable(rs); err != nil {
		return vhostcore.ClosedErr(err)
	}
	d.mem = mem
	return nil
}

// SetQueueNum is VHOST_SET_VRING_NUM.
func (d *Device) SetQueueNum(q int, size uint16) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return err
	}
	if !vring.ValidQueueSize(size) {
		return fmt.Errorf("%w: queue %d size %d", ErrQueueLayout, q, size)
	}
	if err := d.f.SetVringNum(uint32(q), uint32(size)); err != nil {
		return vhostcore.ClosedErr(err)
	}
	d.queues[q].num = size
	return nil
}

// SetQueueAddr checks the ring areas against guest memory (each must lie in
// one region, as vhost needs virtually contiguous rings) and hands vhost
// their addresses in this process (VHOST_SET_VRING_ADDR), with the used
// ring's guest address as log_guest_addr and logging on while a log is set.
func (d *Device) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return err
	}
	if d.queues[q].num == 0 {
		return fmt.Errorf("%w: queue %d: set the queue size first", ErrQueueLayout, q)
	}
	if d.mem == nil {
		return ErrNoMemory
	}
	l := vring.Layout{Size: d.queues[q].num, Desc: a.Desc, Avail: a.Avail, Used: a.Used}
	if err := l.ValidateFor(d.features); err != nil {
		return fmt.Errorf("%w: queue %d: %w", ErrQueueLayout, q, err)
	}
	if err := d.setAddr(q, a); err != nil {
		return err
	}
	d.queues[q].addr, d.queues[q].addrSet = a, true
	return nil
}

// setAddr issues VHOST_SET_VRING_ADDR for a (already validated).
func (d *Device) setAddr(q int, a vdpa.QueueAddr) error {
	// Sized by the negotiated features, as vhost's vq_access_ok sizes them.
	ds, as, us := vring.RingSizes(d.queues[q].num, d.features)
	var hv [3]vring.HostAddr
	for i, area := range []struct {
		g vring.GuestAddr
		n uint64
	}{{a.Desc, ds}, {a.Avail, as}, {a.Used, us}} {
		if _, err := d.mem.Slice(area.g, area.n); err != nil {
			return fmt.Errorf("%w: queue %d: ring area %v+%d: %w", ErrQueueLayout, q, area.g, area.n, err)
		}
		h, err := d.mem.GuestToHost(area.g)
		if err != nil {
			return fmt.Errorf("%w: queue %d: %w", ErrQueueLayout, q, err)
		}
		hv[i] = h
	}
	va := vhostsys.VringAddr{
		Index:         uint32(q),
		DescUserAddr:  uint64(hv[0]),
		AvailUserAddr: uint64(hv[1]),
		UsedUserAddr:  uint64(hv[2]),
		LogGuestAddr:  uint64(a.Used),
	}
	if d.log != nil {
		va.Flags = 1 << vhostsys.VHOST_VRING_F_LOG
	}
	return vhostcore.ClosedErr(d.f.SetVringAddr(va))
}

// SetQueueBase is VHOST_SET_VRING_BASE. vhost takes the used index from the
// ring itself, so a state with buffers in flight is refused.
func (d *Device) SetQueueBase(q int, st vdpa.QueueState) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return err
	}
	if st.NextUsed != st.NextAvail {
		return fmt.Errorf("%w: queue %d next avail %d, next used %d", ErrInFlight, q, st.NextAvail, st.NextUsed)
	}
	return vhostcore.ClosedErr(d.f.SetVringBase(uint32(q), uint32(st.NextAvail)))
}

// QueueBase stops queue q (detaches it from the tap, which drains vhost's
// work on it) and reads its position: NextAvail from VHOST_GET_VRING_BASE,
// NextUsed from the used ring. The queue stays stopped until EnableQueue,
// Resume or DRIVER_OK attaches it again.
func (d *Device) QueueBase(q int) (vdpa.QueueState, error) {
	if err := d.lock(); err != nil {
		return vdpa.QueueState{}, err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return vdpa.QueueState{}, err
	}
	if err := d.detach(q); err != nil {
		return vdpa.QueueState{}, err
	}
	n, err := d.f.GetVringBase(uint32(q))
	if err != nil {
		return vdpa.QueueState{}, vhostcore.ClosedErr(err)
	}
	st := vdpa.QueueState{NextAvail: uint16(n), NextUsed: uint16(n)}
	if d.queues[q].addrSet && d.mem != nil {
		used, err := vhostcore.UsedIdx(d.mem, d.queues[q].addr.Used)
		if err != nil {
			return vdpa.QueueState{}, fmt.Errorf("vhostnet: queue %d: %w", q, err)
		}
		st.NextUsed = used
	}
	return st, nil
}

// SetQueueKick is VHOST_SET_VRING_KICK (nil unbinds).
func (d *Device) SetQueueKick(q int, kick *vdpa.EventFD) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return err
	}
	return vhostcore.ClosedErr(d.f.SetVringKick(uint32(q), vhostcore.Fd(kick)))
}

// SetQueueCall is VHOST_SET_VRING_CALL (nil unbinds).
func (d *Device) SetQueueCall(q int, call *vdpa.EventFD) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return err
	}
	return vhostcore.ClosedErr(d.f.SetVringCall(uint32(q), vhostcore.Fd(call)))
}

// EnableQueue marks queue q enabled; once DRIVER_OK is set an enabled queue
// is attached to the tap (VHOST_NET_SET_BACKEND) and a disabled one
// detached.
func (d *Device) EnableQueue(q int, enable bool) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if err := checkQueue(q); err != nil {
		return err
	}
	d.queues[q].enabled = enable
	if d.status&virtio.StatusDriverOK == 0 {
		return nil
	}
	if enable {
		return d.attach(q)
	}
	return d.detach(q)
}

// SetupQueue configures and enables queue q in one call.
func (d *Device) SetupQueue(q int, l vring.Layout, st vdpa.QueueState, kick, call *vdpa.EventFD) error {
	return vhostcore.SetupQueue(d, q, l, st, kick, call)
}

// Suspend detaches both rings from the tap; vhost finishes the work in
// progress first, so afterwards the rings and guest memory are quiescent
// and QueueBase reads a stable state.
func (d *Device) Suspend() error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	for q := range d.queues {
		if err := d.detach(q); err != nil {
			return err
		}
	}
	d.suspended = true
	return nil
}

// Resume attaches the enabled rings again (once DRIVER_OK is set).
func (d *Device) Resume() error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	d.suspended = false
	if d.status&virtio.StatusDriverOK == 0 {
		return nil
	}
	for q := range d.queues {
		if d.queues[q].enabled {
			if err := d.attach(q); err != nil {
				return err
			}
		}
	}
	return nil
}

// SetLog starts logging the kernel's writes to guest memory into log
// (VHOST_SET_LOG_BASE with log.Addr(), VHOST_VRING_F_LOG on the configured
// rings, VHOST_F_LOG_ALL added to the kernel's features), or stops it when
// log is nil. The log must use 4 KiB pages and span all guest memory. The
// caller keeps log alive and open until logging is stopped (SetLog(nil),
// a reset or Close).
func (d *Device) SetLog(log *dirty.Bitmap) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	if log != nil {
		if log.PageSize() != vhostsys.VHOST_PAGE_SIZE {
			return fmt.Errorf("%w: page size %d, vhost logs %d-byte pages", ErrLog, log.PageSize(), vhostsys.VHOST_PAGE_SIZE)
		}
		if err := logCovers(log, d.mem); err != nil {
			return err
		}
		if err := d.f.SetLogBase(uint64(log.Addr())); err != nil {
			return vhostcore.ClosedErr(err)
		}
	}
	prev := d.log
	if err := d.switchLog(log); err != nil {
		// Back to the log before, all of it: the kernel's base, the
		// rings' LOG flag and LOG_ALL, so that it writes into no log the
		// caller takes for unused (and may free), and logs into the one
		// the caller takes for used. When even that fails, the rings
		// are detached: the kernel then touches neither log.
		if rerr := d.restoreLog(prev); rerr != nil {
			for q := range d.queues {
				_ = d.detach(q)
			}
			return fmt.Errorf("%w (and going back to the previous log failed, %v: the rings are detached; reset the device)", err, rerr)
		}
		return err
	}
	return nil
}

// logCovers checks that log (if any) spans every region of mem (if any).
func logCovers(log *dirty.Bitmap, mem *vring.Memory) error {
	if log == nil || mem == nil {
		return nil
	}
	for _, r := range mem.Regions() {
		if uint64(r.Last()) >= log.Span() {
			return fmt.Errorf("%w: span %#x does not cover %v", ErrLog, log.Span(), r)
		}
	}
	return nil
}

// switchLog makes log (nil: none) the one the rings and the features use:
// the rings first when starting (vhost checks the log covers them), the
// feature first when stopping. The kernel's log base is the caller's.
func (d *Device) switchLog(log *dirty.Bitmap) error {
	d.log = log
	steps := []func() error{d.reprogramRings, d.reprogramFeatures}
	if log == nil {
		steps[0], steps[1] = steps[1], steps[0]
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// restoreLog returns the kernel to prev after a SetLog that failed part
// way.
func (d *Device) restoreLog(prev *dirty.Bitmap) error {
	if prev != nil {
		if err := d.f.SetLogBase(uint64(prev.Addr())); err != nil {
			return vhostcore.ClosedErr(err)
		}
	}
	return d.switchLog(prev)
}

func (d *Device) reprogramRings() error {
	for q := range d.queues {
		if d.queues[q].addrSet {
			if err := d.setAddr(q, d.queues[q].addr); err != nil {
				return err
			}
		}
	}
	return nil
}

func (d *Device) reprogramFeatures() error {
	return vhostcore.ClosedErr(d.f.SetFeatures(d.kernelFeatures(d.features)))
}

// Close detaches the rings and closes vhost-net and the tap (the tap
// interface disappears).
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.closed = true
	for q := range d.queues {
		_ = d.detach(q)
	}
	err := d.f.Close()
	if terr := d.tap.Close(); err == nil {
		err = terr
	}
	return err
}
