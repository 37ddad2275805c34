//go:build linux

package vduse

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Options configure a VDUSE device.
type Options struct {
	// Name is the device name: /dev/vduse/NAME and the vDPA device name
	// for `vdpa dev add name NAME mgmtdev vduse`. Required.
	Name string
	// VendorID is the virtio vendor id (default 0).
	VendorID uint32
	// VQAlign is the alignment of the rings the kernel allocates (default
	// 4096).
	VQAlign uint32
	// ControlPath is the VDUSE control device (default /dev/vduse/control)
	// and DevDir the directory of device nodes (default /dev/vduse).
	ControlPath string
	DevDir      string
	// SysfsRoot is where sysfs is mounted (default /sys).
	SysfsRoot string
	// Logf, when set, receives one line per request and every failure.
	Logf func(format string, args ...any)
}

func (o *Options) defaults() {
	if o.VQAlign == 0 {
		o.VQAlign = 4096
	}
	if o.ControlPath == "" {
		o.ControlPath = "/dev/vduse/control"
	}
	if o.DevDir == "" {
		o.DevDir = "/dev/vduse"
	}
	if o.SysfsRoot == "" {
		o.SysfsRoot = "/sys"
	}
}

// Available reports whether VDUSE can be used: nil, or an error wrapping
// ErrUnavailable that says why.
func Available(opts *Options) error {
	var o Options
	if opts != nil {
		o = *opts
	}
	o.defaults()
	fd, err := unix.Open(o.ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("%w: open %s: %w (is the vduse module loaded? are you root?)", ErrUnavailable, o.ControlPath, err)
	}
	unix.Close(fd)
	return nil
}

type vq struct {
	maxSize uint16
	running bool
	state   vring.QueueState
	stopped bool // state holds a position read back by GET_VQ_STATE or a stop
	paused  bool // stopped by an IOTLB update, to restart once memory is back
	kick    *vdpa.EventFD
	call    *vdpa.EventFD
	irqDone chan struct{}
	layout  vring.Layout
}

// Device is a VDUSE device serving a vdpa.Handler. Serve runs the request
// loop; the other methods may be called concurrently with it.
type Device struct {
	h    vdpa.Handler
	opts Options
	ctl  int // /dev/vduse/control
	fd   int // /dev/vduse/NAME, non-blocking, for ioctls
	file *os.File

	mu       sync.Mutex
	status   virtio.Status
	features virtio.Features
	mem      *vring.Memory
	maps     [][]byte
	queues   []vq
	closed   bool
}

// Create creates the VDUSE device for h: VDUSE_SET_API_VERSION,
// VDUSE_CREATE_DEV with h's features, queue count and configuration space,
// open /dev/vduse/NAME, and VDUSE_VQ_SETUP for every queue. The device is
// not yet on the vDPA bus: run Serve, then add it (`vdpa dev add name NAME
// mgmtdev vduse`).
func Create(h vdpa.Handler, opts *Options) (*Device, error) {
	return CreateContext(context.Background(), h, opts)
}

// CreateContext is Create with ctx bounding the wait for the device node,
// which devtmpfs (or udev) creates shortly after VDUSE_CREATE_DEV returns:
// Create waits about a second for it, and CreateContext gives up sooner
// when ctx ends, destroying the device it created. The ioctls themselves
// do not wait.
func CreateContext(ctx context.Context, h vdpa.Handler, opts *Options) (*Device, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	o.defaults()
	f := h.Features()
	if !f.Has(virtio.FVersion1) {
		return nil, fmt.Errorf("%w: VDUSE requires VIRTIO_F_VERSION_1 in %s", ErrHandler, f.Format(h.DeviceID()))
	}
	if h.DeviceID() == virtio.DeviceNet {
		if !f.Has(virtio.FAccessPlatform) {
			return nil, fmt.Errorf("%w: a VDUSE net device must offer ACCESS_PLATFORM", ErrHandler)
		}
		if f.Has(virtio.NetFCtrlVQ) {
			return nil, fmt.Errorf("%w: VDUSE net devices may not have a control queue (Linux < 6.13)", ErrHandler)
		}
	}
	n := h.NumQueues()
	if n <= 0 || n > 0xffff {
		return nil, fmt.Errorf("%w: %d queues", ErrHandler, n)
	}
	cfg := make([]byte, h.ConfigSize())
	h.ReadConfig(0, cfg)
	dc := devConfig{Name: o.Name, VendorID: o.VendorID, DeviceID: uint32(h.DeviceID()), Features: uint64(f),
		VQNum: uint32(n), VQAlign: o.VQAlign, ConfigData: cfg}
	b, err := dc.encode()
	if err != nil {
		return nil, err
	}
	ctl, err := unix.Open(o.ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open %s: %w", ErrUnavailable, o.ControlPath, err)
	}
	if _, err := ioctlU64(ctl, ioctlSetAPIVersion, APIVersion, "VDUSE_SET_API_VERSION"); err != nil {
		unix.Close(ctl)
		return nil, err
	}
	if err := ioctlBuf(ctl, ioctlCreateDev, b, sizeDevConfig, "VDUSE_CREATE_DEV"); err != nil {
		unix.Close(ctl)
		return nil, err
	}
	d := &Device{h: h, opts: o, ctl: ctl, fd: -1, queues: make([]vq, n)}
	path := filepath.Join(o.DevDir, o.Name)
	fd, err := openRetry(ctx, path)
	if err != nil {
		d.destroy()
		return nil, &OpError{Op: "open " + path, Err: err}
	}
	d.fd = fd
	d.file = os.NewFile(uintptr(fd), path)
	max := h.MaxQueueSize()
	for i := 0; i < n; i++ {
		var c [sizeVQConfig]byte
		binary.LittleEndian.PutUint32(c[offVQConfigIndex:], uint32(i))
		binary.LittleEndian.PutUint16(c[offVQConfigMaxSize:], max)
		if err := ioctlBuf(fd, ioctlVQSetup, c[:], sizeVQConfig, "VDUSE_VQ_SETUP"); err != nil {
			d.file.Close()
			d.destroy()
			return nil, err
		}
		d.queues[i].maxSize = max
	}
	return d, nil
}

// openWait bounds openRetry's wait for the device node, openPoll is how
// often it looks.
const (
	openWait = time.Second
	openPoll = 10 * time.Millisecond
)

// openRetry opens the device node, which devtmpfs/udev creates shortly
// after VDUSE_CREATE_DEV returns. It tries for up to openWait, or until
// ctx ends (whose error it then returns, with the last open's).
func openRetry(ctx context.Context, path string) (int, error) {
	deadline := time.Now().Add(openWait)
	t := time.NewTimer(openPoll)
	defer t.Stop()
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			return fd, nil
		}
		if !errors.Is(err, unix.ENOENT) || !time.Now().Before(deadline) {
			return -1, err
		}
		t.Reset(openPoll)
		select {
		case <-t.C:
		case <-ctx.Done():
			// ctx.Err() first, so that errors.Is finds Canceled or
			// DeadlineExceeded whatever cause the context was given.
			if cause := context.Cause(ctx); cause != ctx.Err() {
				return -1, fmt.Errorf("%w: %w (the device node is still missing: %w)", ctx.Err(), cause, err)
			}
			return -1, fmt.Errorf("%w (the device node is still missing: %w)", ctx.Err(), err)
		}
	}
}

func (d *Device) destroy() error {
	var name [nameMax]byte
	copy(name[:], d.opts.Name)
	err := ioctlBuf(d.ctl, ioctlDestroyDev, name[:], nameMax, "VDUSE_DESTROY_DEV")
	unix.Close(d.ctl)
	return err
}

// Name returns the device name.
func (d *Device) Name() string { return d.opts.Name }

func (d *Device) logf(format string, args ...any) {
	if d.opts.Logf != nil {
		d.opts.Logf(format, args...)
	}
}

// Serve answers the kernel's requests until ctx ends (it returns ctx.Err())
// or the device is closed (ErrClosed). Every request gets a response.
func (d *Device) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { _ = d.file.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, sizeDevRequest)
	resp := make([]byte, sizeDevResponse)
	for {
		n, err := d.file.Read(buf)
		if err != nil {
			switch {
			case ctx.Err() != nil:
				return ctx.Err()
			case errors.Is(err, os.ErrClosed):
				return ErrClosed
			}
			return &OpError{Op: "read request", Err: err}
		}
		req, err := decodeRequest(buf[:n])
		if err != nil {
			// Without a whole request there is no id to answer.
			d.logf("vduse %s: %v", d.opts.Name, err)
			continue
		}
		result, vqIdx, st, packed := d.handle(req)
		encodeResponse(resp, req.ID, result, vqIdx, st, packed)
		if _, err := d.file.Write(resp); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return ErrClosed
			}
			return &OpError{Op: "write response", Err: err}
		}
	}
}

func (d *Device) handle(req request) (result, vqIdx uint32, st vring.QueueState, packed bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var err error
	packed = d.features.Has(virtio.FRingPacked)
	switch req.Type {
	case reqGetVQState:
		vqIdx = req.VQIndex
		st, err = d.vqStateLocked(int(req.VQIndex))
		d.logf("vduse %s: GET_VQ_STATE %d -> avail %#x used %#x (%v)", d.opts.Name, req.VQIndex, st.NextAvail, st.NextUsed, err)
	case reqSetStatus:
		err = d.setStatusLocked(virtio.Status(req.Status))
		d.logf("vduse %s: SET_STATUS %v (%v)", d.opts.Name, virtio.Status(req.Status), err)
	case reqUpdateIOTLB:
		err = d.updateIOTLBLocked(req.IOVAStart, req.IOVALast)
		d.logf("vduse %s: UPDATE_IOTLB [%#x, %#x] (%v)", d.opts.Name, req.IOVAStart, req.IOVALast, err)
	default:
		err = fmt.Errorf("%w: type %d", ErrBadRequest, req.Type)
		d.logf("vduse %s: %v", d.opts.Name, err)
	}
	if err != nil {
		return resultFailed, vqIdx, st, packed
	}
	return resultOK, vqIdx, st, packed
}

// vqStateLocked stops queue i if it runs (GET_VQ_STATE is the vhost
// GET_VRING_BASE path) and returns its state: the next available index
// of a split ring (NextUsed is not reported: the used ring holds it), both
// positions with their wrap counters for a packed one.
func (d *Device) vqStateLocked(i int) (vring.QueueState, error) {
	if i < 0 || i >= len(d.queues) {
		return vring.QueueState{}, fmt.Errorf("%w: queue %d of %d", ErrBadRequest, i, len(d.queues))
	}
	q := &d.queues[i]
	if q.running {
		if err := d.stopQueueLocked(i); err != nil {
			return vring.QueueState{}, err
		}
	}
	q.paused = false
	if q.stopped {
		return q.state, nil
	}
	info, err := d.vqInfo(i)
	if err != nil {
		return vring.QueueState{}, err
	}
	return info.state(d.features), nil
}

func (d *Device) vqInfo(i int) (vqInfo, error) {
	var b [sizeVQInfo]byte
	binary.LittleEndian.PutUint32(b[offVQInfoIndex:], uint32(i))
	if err := ioctlBuf(d.fd, ioctlVQGetInfo, b[:], sizeVQInfo, "VDUSE_VQ_GET_INFO"); err != nil {
		return vqInfo{}, err
	}
	return decodeVQInfo(b[:]), nil
}

func (d *Device) setStatusLocked(s virtio.Status) error {
	if s == 0 {
		d.resetLocked()
		return nil
	}
	added := s &^ d.status
	if added&virtio.StatusFeaturesOK != 0 {
		v, err := ioctlU64(d.fd, ioctlDevGetFeatures, 0, "VDUSE_DEV_GET_FEATURES")
		if err != nil {
			return err
		}
		f := virtio.Features(v)
		if err := d.h.SetFeatures(f); err != nil {
			return err
		}
		d.features = f
	}
	if added&virtio.StatusDriverOK != 0 {
		if err := d.startLocked(); err != nil {
			d.stopAllLocked()
			return err
		}
	}
	d.status = s
	return nil
}

func (d *Device) resetLocked() {
	d.stopAllLocked()
	d.h.Reset()
	for i := range d.queues {
		q := &d.queues[i]
		d.releaseEventFDs(i)
		*q = vq{maxSize: q.maxSize}
	}
	d.unmapLocked()
	d.status = 0
	d.features = 0
}

// startLocked maps the IOTLB and starts every ready queue.
func (d *Device) startLocked() error {
	if d.mem == nil {
		if err := d.mapLocked(); err != nil {
			return err
		}
	}
	for i := range d.queues {
		q := &d.queues[i]
		if q.running {
			continue
		}
		info, err := d.vqInfo(i)
		if err != nil {
			return err
		}
		if !info.Ready {
			continue
		}
		if info.Num == 0 || info.Num > uint32(q.maxSize) {
			return fmt.Errorf("%w: queue %d size %d (max %d)", ErrBadRequest, i, info.Num, q.maxSize)
		}
		q.layout = vring.Layout{Size: uint16(info.Num), Desc: vring.GuestAddr(info.DescAddr),
			Avail: vring.GuestAddr(info.DriverAddr), Used: vring.GuestAddr(info.DeviceAddr)}
		if !q.stopped && d.features.Has(virtio.FRingPacked) {
			// A fresh packed start: both positions with their wrap
			// counters, as the driver set them (virtio_vdpa sets
			// both counters to 1; vhost-vdpa's SET_VRING_BASE
			// splits its base word into them). A packed ring has
			// no index in guest memory to read.
			q.state = info.state(d.features)
		} else if !q.stopped {
			// A fresh start: the kernel's avail index (set by
			// SET_VRING_BASE on vhost-vdpa) and the used index the ring
			// holds (equal to it once every chain was completed).
			var u [2]byte
			if err := d.mem.Read(q.layout.Used+2, u[:]); err != nil {
				return fmt.Errorf("vduse: queue %d used ring: %w", i, err)
			}
			q.state = vring.QueueState{NextAvail: info.AvailIndex, NextUsed: binary.LittleEndian.Uint16(u[:])}
		}
		if err := d.startQueueLocked(i); err != nil {
			return err
		}
	}
	return nil
}

func (d *Device) startQueueLocked(i int) error {
	q := &d.queues[i]
	if q.kick == nil {
		kick, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		var b [sizeVQEventfd]byte
		binary.LittleEndian.PutUint32(b[offVQEventfdIndex:], uint32(i))
		binary.LittleEndian.PutUint32(b[offVQEventfdFd:], uint32(int32(kick.Fd())))
		if err := ioctlBuf(d.fd, ioctlVQSetupKickFD, b[:], sizeVQEventfd, "VDUSE_VQ_SETUP_KICKFD"); err != nil {
			kick.Close()
			return err
		}
		q.kick = kick
	}
	if q.call == nil {
		call, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		q.call = call
		q.irqDone = make(chan struct{})
		go d.forwardIRQ(i, call, q.irqDone)
	}
	dq, err := vring.NewDeviceQueue(d.mem, vring.DeviceQueueOptions{Index: i, Layout: q.layout,
		Features: d.features, State: q.state})
	if err != nil {
		return fmt.Errorf("vduse: queue %d: %w", i, err)
	}
	if err := d.h.StartQueue(i, dq, q.kick, q.call); err != nil {
		return fmt.Errorf("vduse: start queue %d: %w", i, err)
	}
	q.running = true
	return nil
}

// forwardIRQ turns the handler's call signals into VDUSE_VQ_INJECT_IRQ
// until the eventfd is closed.
func (d *Device) forwardIRQ(i int, call *vdpa.EventFD, done chan struct{}) {
	defer close(done)
	for {
		if _, err := call.Wait(context.Background()); err != nil {
			return
		}
		if err := ioctlU32(d.fd, ioctlVQInjectIRQ, uint32(i), "VDUSE_VQ_INJECT_IRQ"); err != nil {
			d.logf("vduse %s: queue %d: %v", d.opts.Name, i, err)
		}
	}
}

func (d *Device) stopQueueLocked(i int) error {
	q := &d.queues[i]
	if !q.running {
		return nil
	}
	st, err := d.h.StopQueue(i)
	q.running = false
	if err != nil {
		return err
	}
	q.state, q.stopped = st, true
	return nil
}

// stopAllLocked stops queues highest index first (transmit before receive).
func (d *Device) stopAllLocked() {
	for i := len(d.queues) - 1; i >= 0; i-- {
		if err := d.stopQueueLocked(i); err != nil {
			d.logf("vduse %s: stop queue %d: %v", d.opts.Name, i, err)
		}
	}
}

func (d *Device) releaseEventFDs(i int) {
	q := &d.queues[i]
	if q.kick != nil {
		var b [sizeVQEventfd]byte
		binary.LittleEndian.PutUint32(b[offVQEventfdIndex:], uint32(i))
		binary.LittleEndian.PutUint32(b[offVQEventfdFd:], eventfdDeassignU32)
		_ = ioctlBuf(d.fd, ioctlVQSetupKickFD, b[:], sizeVQEventfd, "VDUSE_VQ_SETUP_KICKFD")
		q.kick.Close()
		q.kick = nil
	}
	if q.call != nil {
		q.call.Close()
		<-q.irqDone
		q.call = nil
	}
}

// updateIOTLBLocked handles VDUSE_UPDATE_IOTLB for [start, last]: running
// queues whose memory is affected stop (keeping their exact state), the
// mappings are dropped, and once the kernel's IOTLB again covers the rings
// (vhost-vdpa sends one update for the unmap and another for the new map)
// the paused queues restart where they stopped.
func (d *Device) updateIOTLBLocked(start, last uint64) error {
	if d.mem != nil {
		overlaps := false
		for _, r := range d.mem.Regions() {
			if uint64(r.Base()) <= last && start <= uint64(r.End())-1 {
				overlaps = true
			}
		}
		if overlaps {
			for i := len(d.queues) - 1; i >= 0; i-- {
				if d.queues[i].running {
					if err := d.stopQueueLocked(i); err != nil {
						return err
					}
					d.queues[i].paused = true
				}
			}
			d.unmapLocked()
		}
	}
	if d.status&virtio.StatusDriverOK == 0 {
		return nil // mapped at DRIVER_OK
	}
	if err := d.resumePausedLocked(); err != nil {
		// Not an error of this update: the memory is incomplete until the
		// next one. The queues stay paused.
		d.logf("vduse %s: queues stay paused: %v", d.opts.Name, err)
	}
	return nil
}

// resumePausedLocked maps the IOTLB if needed and restarts paused queues.
func (d *Device) resumePausedLocked() error {
	any := false
	for i := range d.queues {
		any = any || d.queues[i].paused
	}
	if !any {
		return nil
	}
	if d.mem == nil {
		if err := d.mapLocked(); err != nil {
			return err
		}
	}
	for i := range d.queues {
		if !d.queues[i].paused {
			continue
		}
		if err := d.startQueueLocked(i); err != nil {
			return err
		}
		d.queues[i].paused = false
	}
	return nil
}

// The IOTLB is written by whoever drives the vDPA device (a VMM through
// vhost-vdpa, or the kernel's virtio_vdpa), and mapLocked maps every entry
// of it. The files behind the entries may be sparse, so the mappings need
// not cost memory, but they take this process's address space and its
// mapping count (vm.max_map_count, 65530 by default): bounded here, so that
// no IOTLB can make the Go runtime abort the process.
const (
	// maxIOVAMapped bounds the bytes mapped from one IOTLB: 16 TiB, above
	// any guest's memory and an eighth of a 47-bit address space.
	maxIOVAMapped = 16 << 40
	// maxIOTLBEntries bounds the entries mapped from one IOTLB: a VMM maps
	// its guest's RAM blocks (tens of entries), virtio_vdpa one bounce
	// area. A guest behind a vIOMMU has an entry per live DMA mapping of
	// its driver, possibly thousands; half of vm.max_map_count leaves the
	// rest to the process. Beyond it the memory is not mapped: the
	// queues stay paused (logged) until an IOTLB update brings it back
	// within the bound.
	maxIOTLBEntries = 32768
)

// iovaBudget counts what mapLocked has taken from the IOTLB.
type iovaBudget struct {
	bytes   uint64 // <= maxIOVAMapped
	entries int
}

// take accounts for entry e, or refuses it with an error matching
// ErrBadRequest when it would go beyond maxIOTLBEntries or maxIOVAMapped.
// An entry whose range is inverted is left for mapEntry to refuse.
func (b *iovaBudget) take(e iotlbEntry) error {
	if e.Last < e.Start {
		return nil
	}
	if b.entries >= maxIOTLBEntries {
		return fmt.Errorf("%w: IOTLB of more than %d entries", ErrBadRequest, maxIOTLBEntries)
	}
	size := e.Last - e.Start + 1 // 0: the whole 64-bit space
	if size == 0 || size > maxIOVAMapped-b.bytes {
		return fmt.Errorf("%w: IOTLB entries map more than %#x bytes (entry [%#x, %#x])", ErrBadRequest, uint64(maxIOVAMapped), e.Start, e.Last)
	}
	b.entries++
	b.bytes += size
	return nil
}

// mapLocked builds the IOVA memory from the kernel's IOTLB.
func (d *Device) mapLocked() error {
	var regions []*vring.Region
	var budget iovaBudget
	var domainFd = -1
	defer func() {
		if domainFd >= 0 {
			unix.Close(domainFd)
		}
	}()
	start := uint64(0)
	for {
		var b [sizeIOTLBEntry]byte
		e := iotlbEntry{Start: start, Last: ^uint64(0)}
		e.encode(b[:])
		fd, err := ioctlRetFD(d.fd, ioctlIOTLBGetFD, b[:], sizeIOTLBEntry, "VDUSE_IOTLB_GET_FD")
		if errors.Is(err, unix.EINVAL) {
			break // no mapping at or above start
		}
		if err != nil {
			d.unmapRegions(regions)
			return err
		}
		e = decodeIOTLBEntry(b[:])
		if err := budget.take(e); err != nil {
			unix.Close(fd)
			d.unmapRegions(regions)
			return err
		}
		r, err := d.mapEntry(fd, e)
		if err != nil {
			unix.Close(fd)
			d.unmapRegions(regions)
			return err
		}
		regions = append(regions, r)
		if domainFd < 0 {
			domainFd = fd
		} else {
			unix.Close(fd)
		}
		if e.Last == ^uint64(0) || e.Last < start {
			break
		}
		start = e.Last + 1
	}
	if r, err := d.mapBounce(domainFd, regions); err != nil {
		d.unmapRegions(regions)
		return err
	} else if r != nil {
		regions = append(regions, r)
	}
	mem, err := vring.NewMemory(regions...)
	if err != nil {
		d.unmapRegions(regions)
		return err
	}
	d.mem = mem
	return nil
}

func (d *Device) mapEntry(fd int, e iotlbEntry) (*vring.Region, error) {
	size := e.Last - e.Start + 1
	// size > math.MaxInt: on 32-bit an entry of 2 GiB or more, which
	// int(size) below would truncate to another length.
	if e.Last < e.Start || size == 0 || size > 1<<40 || size > uint64(math.MaxInt) ||
		e.Offset > 1<<62 || e.Offset%uint64(os.Getpagesize()) != 0 {
		return nil, fmt.Errorf("%w: IOTLB entry [%#x, %#x] offset %#x", ErrBadRequest, e.Start, e.Last, e.Offset)
	}
	// The file behind an IOVA range can be a VMM's memfd (vhost-vdpa
	// users): seal it against shrinking where it allows, so the mapping
	// cannot be truncated away. The kernel's own bounce-buffer file cannot
	// be sealed; accesses stay fault-guarded either way.
	sealed, _ := vring.SealShrink(fd)
	if err := checkFileSize(fd, e.Offset, size); err != nil {
		return nil, fmt.Errorf("%w: IOTLB entry [%#x, %#x] offset %#x: %w", ErrBadRequest, e.Start, e.Last, e.Offset, err)
	}
	prot := unix.PROT_READ | unix.PROT_WRITE
	m, err := unix.Mmap(fd, int64(e.Offset), int(size), prot, unix.MAP_SHARED)
	if err != nil && e.Perm == accessRO {
		m, err = unix.Mmap(fd, int64(e.Offset), int(size), unix.PROT_READ, unix.MAP_SHARED)
	}
	if err != nil {
		return nil, &OpError{Op: fmt.Sprintf("mmap IOVA [%#x, %#x]", e.Start, e.Last), Err: err}
	}
	r, err := vring.NewRegion(vring.GuestAddr(e.Start), m, &vring.RegionOptions{Name: "vduse-iova", Sealed: sealed})
	if err != nil {
		unix.Munmap(m)
		return nil, err
	}
	d.maps = append(d.maps, m)
	return r, nil
}

// checkFileSize refuses a regular file shorter than [offset, offset+size):
// every access to the part past its end would fault (SIGBUS). Checked
// after sealing, so a sealed file cannot shrink below it afterwards. The
// kernel's IOVA domain file is an anonymous inode whose size says nothing
// (its pages come from the domain, not the file): it is left alone, as
// are other non-regular files.
func checkFileSize(fd int, offset, size uint64) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fstat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err == nil && fs.Type == unix.ANON_INODE_FS_MAGIC {
		return nil
	}
	if st.Size < 0 || uint64(st.Size) < offset+size {
		return fmt.Errorf("file of %d bytes, mapping needs %#x at %#x", st.Size, size, offset)
	}
	return nil
}

// mapBounce maps the bounce-buffer area [0, bounce_size) of the kernel's
// IOVA domain (a device bound to virtio_vdpa) when the kernel has not put it
// in the IOTLB yet: it does so on the first streaming DMA mapping, without
// a VDUSE_UPDATE_IOTLB. fd is a descriptor the IOTLB returned; only when it
// is the domain file ("anon_inode:[vduse-domain]", which maps IOVA x at file
// offset x) is anything mapped. Under vhost_vdpa the IOTLB holds the user's
// own files instead and nothing is added.
func (d *Device) mapBounce(fd int, have []*vring.Region) (*vring.Region, error) {
	if fd < 0 {
		return nil, nil
	}
	target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil || target != "anon_inode:[vduse-domain]" {
		return nil, nil
	}
	size := uint64(64 << 20) // VDUSE_BOUNCE_SIZE, the default
	if b, err := os.ReadFile(filepath.Join(d.opts.SysfsRoot, "class/vduse", d.opts.Name, "bounce_size")); err == nil {
		if v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 0, 64); err == nil && v > 0 {
			size = v
		}
	}
	for _, r := range have {
		if uint64(r.Base()) < size {
			return nil, nil // the kernel already mapped (part of) it
		}
	}
	d.logf("vduse %s: mapping the bounce area [0, %#x] from the IOVA domain", d.opts.Name, size-1)
	return d.mapEntry(fd, iotlbEntry{Offset: 0, Start: 0, Last: size - 1, Perm: accessRW})
}

func (d *Device) unmapRegions(rs []*vring.Region) {
	for _, r := range rs {
		for k, m := range d.maps {
			if len(m) > 0 && &m[0] == &r.Bytes()[0] {
				unix.Munmap(m)
				d.maps = append(d.maps[:k], d.maps[k+1:]...)
				break
			}
		}
	}
}

func (d *Device) unmapLocked() {
	if d.mem != nil {
		d.mem.Close()
		d.mem = nil
	}
	for _, m := range d.maps {
		unix.Munmap(m)
	}
	d.maps = nil
}

// ConfigChanged re-reads the handler's configuration space, hands it to the
// kernel (VDUSE_DEV_SET_CONFIG) and raises a configuration change interrupt
// (VDUSE_DEV_INJECT_CONFIG_IRQ). Wire it to softnet.Options.OnConfigChange.
func (d *Device) ConfigChanged() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	n := d.h.ConfigSize()
	b := make([]byte, sizeConfigData+n)
	binary.LittleEndian.PutUint32(b[offConfigDataOffset:], 0)
	binary.LittleEndian.PutUint32(b[offConfigDataLength:], uint32(n))
	d.h.ReadConfig(0, b[offConfigDataBuffer:])
	if err := ioctlBuf(d.fd, ioctlDevSetConfig, b, sizeConfigData, "VDUSE_DEV_SET_CONFIG"); err != nil {
		return err
	}
	if d.status&virtio.StatusDriverOK == 0 {
		return nil // nobody to interrupt yet
	}
	return ioctlNoArg(d.fd, ioctlInjectConfigIRQ, "VDUSE_DEV_INJECT_CONFIG_IRQ")
}

// Status returns the device status the kernel last set.
func (d *Device) Status() virtio.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

// Close stops the queues, closes /dev/vduse/NAME (ending Serve) and
// destroys the device (VDUSE_DESTROY_DEV). Delete the vDPA device first
// (`vdpa dev del NAME`): the kernel refuses to destroy a device in use.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return ErrClosed
	}
	d.closed = true
	d.stopAllLocked()
	d.h.Reset()
	for i := range d.queues {
		d.releaseEventFDs(i)
	}
	d.unmapLocked()
	d.mu.Unlock()
	ferr := d.file.Close()
	derr := d.destroy()
	return errors.Join(ferr, derr)
}
