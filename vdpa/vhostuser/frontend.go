package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FrontendOptions configure a Frontend. A nil *FrontendOptions means all
// defaults.
type FrontendOptions struct {
	// DeviceID is the device type behind the socket (vhost-user does not
	// carry it); virtio.DeviceNet if zero.
	DeviceID virtio.DeviceID
	// ProtocolFeatures restricts the protocol features negotiated (zero:
	// every one this package supports).
	ProtocolFeatures ProtocolFeatures
	// NumQueues is the number of virtqueues when the back-end does not
	// offer MQ (2 if zero: one receive/transmit pair).
	NumQueues int
	// MaxQueueSize is reported by MaxQueueSize (vhost-user has no query);
	// 1024 if zero.
	MaxQueueSize uint16
	// ConfigSize is the device configuration size (vhost-user has no
	// message that reports it, and a back-end answers GET_CONFIG only for
	// reads within its configuration space). Zero means the size of the
	// device type's configuration layout where this package knows it
	// (virtio.NetConfigSize for virtio.DeviceNet); for other types, when
	// CONFIG is negotiated, the size is probed once: the longest read
	// from offset 0 the back-end answers (at most MaxConfigSize).
	ConfigSize int
	// Timeout bounds each request/reply exchange (10s if zero).
	Timeout time.Duration
}

// Frontend drives a vhost-user back-end (DPDK's net_vhost, a vhost-user
// switch, this package's Backend) as a vdpa.Device: we are the VMM. It also
// implements vdpa.Suspender (GET_VRING_BASE stops each ring; Resume restores
// SET_VRING_BASE and kicks it back to life) and vdpa.Logger (SET_LOG_BASE
// with a shared dirty.Bitmap's memfd).
//
// Ring addresses cross the socket as this process's virtual addresses,
// translated from guest addresses through the Memory given to SetMemory,
// whose regions must be fd-backed (vring.NewMemfdRegion).
//
// Control methods are serialized internally; like any vdpa.Device the
// caller should not interleave configuration sequences from several
// goroutines.
type Frontend struct {
	mu      sync.Mutex
	c       *conn
	opts    FrontendOptions
	devF    virtio.Features // back-end's offer
	proto   ProtocolFeatures
	acked   virtio.Features
	status  virtio.Status
	nq      int
	mem     *vring.Memory
	log     *dirty.Bitmap
	queues  []feQueue
	closed  bool
	suspend bool
	cfgSize int // probed configuration size, -1 until probed
}

type feQueue struct {
	num      uint16
	addr     vdpa.QueueAddr
	addrSet  bool
	kick     *vdpa.EventFD
	kickSet  bool
	enabled  bool
	suspSt   vring.QueueState
	suspOK   bool
	lastBase uint16
}

var (
	_ vdpa.Device    = (*Frontend)(nil)
	_ vdpa.Suspender = (*Frontend)(nil)
	_ vdpa.Logger    = (*Frontend)(nil)
)

// Dial connects to a back-end listening at path and performs the session
// start: SET_OWNER, GET_FEATURES, protocol feature negotiation and, with
// MQ, GET_QUEUE_NUM.
func Dial(ctx context.Context, path string, opts *FrontendOptions) (*Frontend, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: dial %s: %w", path, err)
	}
	f, err := NewFrontend(ctx, c.(*net.UnixConn), opts)
	if err != nil {
		c.Close()
		return nil, err
	}
	return f, nil
}

// NewFrontend starts a session on an established connection (for example
// one accepted from a back-end running in client mode). On error the
// caller still owns uc.
func NewFrontend(ctx context.Context, uc *net.UnixConn, opts *FrontendOptions) (*Frontend, error) {
	f := &Frontend{c: newConn(uc), cfgSize: -1}
	if opts != nil {
		f.opts = *opts
	}
	if f.opts.DeviceID == 0 {
		f.opts.DeviceID = virtio.DeviceNet
	}
	if f.opts.NumQueues == 0 {
		f.opts.NumQueues = 2
	}
	if f.opts.MaxQueueSize == 0 {
		f.opts.MaxQueueSize = 1024
	}
	if f.opts.Timeout == 0 {
		f.opts.Timeout = 10 * time.Second
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = uc.SetDeadline(dl)
		defer uc.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { _ = uc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := f.handshake(); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	return f, nil
}

func (f *Frontend) handshake() error {
	if err := f.send(ReqSetOwner, nil, nil, false); err != nil {
		return err
	}
	v, err := f.getU64(ReqGetFeatures)
	if err != nil {
		return err
	}
	f.devF = virtio.Features(v)
	f.nq = f.opts.NumQueues
	if f.devF.Has(virtio.FProtocolFeat) {
		p, err := f.getU64(ReqGetProtocolFeatures)
		if err != nil {
			return err
		}
		want := SupportedProtocolFeatures
		if f.opts.ProtocolFeatures != 0 {
			want &= f.opts.ProtocolFeatures
		}
		// Sent before REPLY_ACK is in effect (as QEMU and DPDK do): no
		// acknowledgement is asked for this one.
		proto := ProtocolFeatures(p) & want
		if err := f.send(ReqSetProtocolFeatures, putU64(uint64(proto)), nil, false); err != nil {
			return err
		}
		f.proto = proto
		if f.proto.Has(PFMQ) {
			n, err := f.getU64(ReqGetQueueNum)
			if err != nil {
				return err
			}
			if f.opts.DeviceID == virtio.DeviceNet {
				n *= 2 // queue pairs
			}
			if n == 0 || n > MaxQueues {
				return msgErr(ReqGetQueueNum, ErrProtocol, "back-end reports %d queues", n)
			}
			f.nq = int(n)
		}
	}
	f.queues = make([]feQueue, f.nq)
	return nil
}

// ProtocolFeatures returns the negotiated protocol features.
func (f *Frontend) ProtocolFeatures() ProtocolFeatures { return f.proto }

// exchange sends a request and, when want is true or REPLY_ACK applies,
// reads its reply. It holds no lock; callers hold f.mu.
func (f *Frontend) exchange(r Request, payload []byte, fds []int, want bool) (*Message, error) {
	if f.closed {
		return nil, vdpa.ErrClosed
	}
	ack := !want && f.proto.Has(PFReplyAck)
	h := Header{Request: r, Flags: Version}
	if ack {
		h.Flags |= FlagNeedReply
	}
	f.c.setDeadline(time.Now().Add(f.opts.Timeout))
	defer f.c.setDeadline(time.Time{})
	if err := f.c.write(h, payload, fds); err != nil {
		return nil, &MessageError{Request: r, Err: err}
	}
	if !want && !ack {
		return nil, nil
	}
	m, err := f.c.read()
	if err != nil {
		return nil, &MessageError{Request: r, Err: err}
	}
	if len(m.Fds) > 0 {
		m.Close()
		return nil, msgErr(r, ErrFdCount, "reply carries %d descriptors", len(m.Fds))
	}
	if !m.IsReply() || m.Request != r {
		return nil, msgErr(r, ErrUnexpectedReply, "got %v flags %#x", m.Request, uint32(m.Flags))
	}
	if ack {
		if len(m.Payload) != u64Size {
			return nil, msgErr(r, ErrBadSize, "ack payload %d bytes", len(m.Payload))
		}
		if v := m.U64(); v != 0 {
			return nil, msgErr(r, ErrReplyFailed, "status %d", v)
		}
		return nil, nil
	}
	return m, nil
}

func (f *Frontend) send(r Request, payload []byte, fds []int, _ bool) error {
	_, err := f.exchange(r, payload, fds, false)
	return err
}

func (f *Frontend) getU64(r Request) (uint64, error) {
	m, err := f.exchange(r, nil, nil, true)
	if err != nil {
		return 0, err
	}
	if len(m.Payload) != u64Size {
		return 0, msgErr(r, ErrBadSize, "reply payload %d bytes", len(m.Payload))
	}
	return m.U64(), nil
}

func (f *Frontend) queue(q int) (*feQueue, error) {
	if q < 0 || q >= len(f.queues) {
		return nil, fmt.Errorf("%w: queue %d of %d", ErrBadQueue, q, len(f.queues))
	}
	return &f.queues[q], nil
}

// DeviceID implements vdpa.Device.
func (f *Frontend) DeviceID() (virtio.DeviceID, error) { return f.opts.DeviceID, nil }

// Features returns the back-end's features without the vhost-user-only
// PROTOCOL_FEATURES bit (managed here). LOG_ALL is kept: set it with
// SetFeatures to turn dirty logging on.
func (f *Frontend) Features() (virtio.Features, error) {
	return f.devF &^ virtio.FProtocolFeat.Bit(), nil
}

// SetFeatures sends SET_FEATURES (plus PROTOCOL_FEATURES when the back-end
// offers it). Toggling LOG_ALL re-sends the ring addresses so their log
// flag follows.
func (f *Frontend) SetFeatures(fs virtio.Features) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fs&^f.devF != 0 {
		return fmt.Errorf("%w: features %#x not offered", ErrProtocol, uint64(fs&^f.devF))
	}
	if f.devF.Has(virtio.FProtocolFeat) {
		fs = fs.With(virtio.FProtocolFeat)
	}
	if err := f.send(ReqSetFeatures, putU64(uint64(fs)), nil, false); err != nil {
		return err
	}
	logChanged := f.acked.Has(virtio.FLogAll) != fs.Has(virtio.FLogAll)
	f.acked = fs
	if logChanged {
		return f.resendAddrs()
	}
	return nil
}

// Status implements vdpa.Device: GET_STATUS with the STATUS protocol
// feature, else the last status set.
func (f *Frontend) Status() (virtio.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.proto.Has(PFStatus) {
		v, err := f.getU64(ReqGetStatus)
		return virtio.Status(v), err
	}
	return f.status, nil
}

// SetStatus implements vdpa.Device. Status 0 resets the device: SET_STATUS
// 0 with the STATUS feature, RESET_DEVICE with that feature, else every
// ring is stopped with GET_VRING_BASE.
func (f *Frontend) SetStatus(st virtio.Status) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.proto.Has(PFStatus):
		if err := f.send(ReqSetStatus, putU64(uint64(st)), nil, false); err != nil {
			return err
		}
	case st == 0 && f.proto.Has(PFResetDevice):
		if err := f.send(ReqResetDevice, nil, nil, false); err != nil {
			return err
		}
	case st == 0:
		for i := len(f.queues) - 1; i >= 0; i-- { // highest first, as Suspend
			if f.queues[i].kickSet {
				if _, err := f.getBase(i); err != nil {
					return err
				}
			}
		}
	}
	f.status = st
	if st == 0 {
		for i := range f.queues {
			q := &f.queues[i]
			*q = feQueue{kick: q.kick}
		}
		f.suspend = false
	}
	return nil
}

// knownConfigSize is the size of a device type's configuration layout,
// or 0 when this package does not know it.
func knownConfigSize(id virtio.DeviceID) int {
	if id == virtio.DeviceNet {
		return virtio.NetConfigSize
	}
	return 0
}

// ConfigSize implements vdpa.Device: FrontendOptions.ConfigSize, else the
// device type's configuration size, else (CONFIG negotiated) the probed
// size; 0 without CONFIG.
func (f *Frontend) ConfigSize() (int, error) {
	if f.opts.ConfigSize > 0 {
		return f.opts.ConfigSize, nil
	}
	if !f.proto.Has(PFConfig) {
		return 0, nil
	}
	if n := knownConfigSize(f.opts.DeviceID); n > 0 {
		return n, nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cfgSize < 0 {
		n, err := f.probeConfigSize()
		if err != nil {
			return 0, err
		}
		f.cfgSize = n
	}
	return f.cfgSize, nil
}

// probeConfigSize finds the longest GET_CONFIG read from offset 0 the
// back-end answers, by bisection over [0, MaxConfigSize]: a back-end
// answers every read within its configuration space and fails (an empty
// or wrongly sized reply) every read beyond it. Errors other than a failed
// read (the connection broke) are returned.
func (f *Frontend) probeConfigSize() (int, error) {
	var buf [MaxConfigSize]byte
	lo, hi := 0, MaxConfigSize+1 // a read of lo bytes succeeds, of hi fails
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		err := f.readConfig(0, buf[:mid])
		switch {
		case err == nil:
			lo = mid
		case errors.Is(err, ErrReplyFailed) || errors.Is(err, ErrBadSize):
			hi = mid
		default:
			return 0, err
		}
	}
	return lo, nil
}

// ReadConfig implements vdpa.Device with GET_CONFIG.
func (f *Frontend) ReadConfig(off int, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.readConfig(off, p)
}

func (f *Frontend) readConfig(off int, p []byte) error {
	if !f.proto.Has(PFConfig) {
		return fmt.Errorf("%w: CONFIG not negotiated", ErrUnsupported)
	}
	if off < 0 || len(p) > MaxConfigSize || off > 1<<31 {
		return fmt.Errorf("%w: config read %d+%d", ErrProtocol, off, len(p))
	}
	m, err := f.exchange(ReqGetConfig, Config{Offset: uint32(off), Data: make([]byte, len(p))}.Encode(), nil, true)
	if err != nil {
		return err
	}
	c, err := DecodeConfig(m.Payload)
	if err != nil || len(m.Payload) == configHeaderSize && len(p) > 0 {
		return msgErr(ReqGetConfig, ErrReplyFailed, "empty or malformed config reply")
	}
	if len(c.Data) != len(p) {
		return msgErr(ReqGetConfig, ErrBadSize, "reply %d bytes, asked %d", len(c.Data), len(p))
	}
	copy(p, c.Data)
	return nil
}

// WriteConfig implements vdpa.Device with SET_CONFIG.
func (f *Frontend) WriteConfig(off int, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.proto.Has(PFConfig) {
		return fmt.Errorf("%w: CONFIG not negotiated", ErrUnsupported)
	}
	if off < 0 || len(p) > MaxConfigSize || off > 1<<31 {
		return fmt.Errorf("%w: config write %d+%d", ErrProtocol, off, len(p))
	}
	return f.send(ReqSetConfig, Config{Offset: uint32(off), Flags: ConfigFlagWritable, Data: p}.Encode(), nil, false)
}

// NumQueues implements vdpa.Device.
func (f *Frontend) NumQueues() (int, error) { return f.nq, nil }

// MaxQueueSize implements vdpa.Device (FrontendOptions.MaxQueueSize).
func (f *Frontend) MaxQueueSize() (uint16, error) { return f.opts.MaxQueueSize, nil }

// SetMemory sends the memory table: each region's guest address, size,
// this process's address and its fd and offset.
func (f *Frontend) SetMemory(mem *vring.Memory) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	regs := mem.Regions()
	if len(regs) > MaxRegions {
		return fmt.Errorf("%w: %d regions", ErrTooManyRegions, len(regs))
	}
	rs := make([]MemoryRegion, len(regs))
	fds := make([]int, len(regs))
	for i, r := range regs {
		if r.Fd() < 0 {
			return fmt.Errorf("%w: region %v has no file descriptor to share", ErrBadRegion, r)
		}
		rs[i] = MemoryRegion{GuestPhysAddr: uint64(r.Base()), MemorySize: r.Size(),
			UserspaceAddr: uint64(r.HostAddr()), MmapOffset: r.FdOffset()}
		fds[i] = r.Fd()
	}
	if err := f.send(ReqSetMemTable, EncodeMemTable(rs), fds, false); err != nil {
		return err
	}
	f.mem = mem
	return nil
}

// SetQueueNum implements vdpa.Device.
func (f *Frontend) SetQueueNum(q int, size uint16) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.send(ReqSetVringNum, VringState{Index: uint32(q), Num: uint32(size)}.Encode(), nil, false); err != nil {
		return err
	}
	fq.num = size
	return nil
}

func (f *Frontend) vringAddr(q int, a vdpa.QueueAddr) (VringAddr, error) {
	if f.mem == nil {
		return VringAddr{}, fmt.Errorf("%w: SetMemory first", ErrProtocol)
	}
	tr := func(g vring.GuestAddr) (uint64, error) {
		h, err := f.mem.GuestToHost(g)
		if err != nil {
			return 0, fmt.Errorf("%w: queue %d ring at %v: %w", ErrAddrNotMapped, q, g, err)
		}
		return uint64(h), nil
	}
	var va VringAddr
	var err error
	va.Index = uint32(q)
	if va.Desc, err = tr(a.Desc); err != nil {
		return va, err
	}
	if va.Avail, err = tr(a.Avail); err != nil {
		return va, err
	}
	if va.Used, err = tr(a.Used); err != nil {
		return va, err
	}
	va.Log = uint64(a.Used)
	if f.acked.Has(virtio.FLogAll) && f.log != nil {
		va.Flags = VringFLog
	}
	return va, nil
}

// SetQueueAddr sends the ring addresses as this process's addresses.
func (f *Frontend) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	va, err := f.vringAddr(q, a)
	if err != nil {
		return err
	}
	if err := f.send(ReqSetVringAddr, va.Encode(), nil, false); err != nil {
		return err
	}
	fq.addr, fq.addrSet = a, true
	return nil
}

func (f *Frontend) resendAddrs() error {
	for i := range f.queues {
		if !f.queues[i].addrSet {
			continue
		}
		va, err := f.vringAddr(i, f.queues[i].addr)
		if err != nil {
			return err
		}
		if err := f.send(ReqSetVringAddr, va.Encode(), nil, false); err != nil {
			return err
		}
	}
	return nil
}

// SetQueueBase sends SET_VRING_BASE with st.NextAvail (vhost-user carries
// no used index; the used ring in memory holds it).
func (f *Frontend) SetQueueBase(q int, st vdpa.QueueState) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.queue(q); err != nil {
		return err
	}
	return f.send(ReqSetVringBase, VringState{Index: uint32(q), Num: uint32(st.NextAvail)}.Encode(), nil, false)
}

func (f *Frontend) getBase(q int) (vring.QueueState, error) {
	fq := &f.queues[q]
	m, err := f.exchange(ReqGetVringBase, VringState{Index: uint32(q)}.Encode(), nil, true)
	if err != nil {
		return vring.QueueState{}, err
	}
	st, err := DecodeVringState(m.Payload)
	if err != nil || st.Index != uint32(q) || st.Num > 0xffff {
		return vring.QueueState{}, msgErr(ReqGetVringBase, ErrUnexpectedReply, "reply %+v for queue %d", st, q)
	}
	out := vring.QueueState{NextAvail: uint16(st.Num)}
	if fq.addrSet && f.mem != nil {
		var b [2]byte
		if err := f.mem.Read(fq.addr.Used+2, b[:]); err == nil {
			out.NextUsed = uint16(b[0]) | uint16(b[1])<<8
		}
	}
	fq.kickSet = false
	fq.lastBase = out.NextAvail
	return out, nil
}

// QueueBase sends GET_VRING_BASE, which stops the ring; NextUsed is read
// from the used ring.
func (f *Frontend) QueueBase(q int) (vdpa.QueueState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.queue(q); err != nil {
		return vdpa.QueueState{}, err
	}
	if fq := &f.queues[q]; f.suspend && fq.suspOK {
		return fq.suspSt, nil
	}
	return f.getBase(q)
}

func (f *Frontend) setFd(r Request, q int, e *vdpa.EventFD) error {
	v := uint64(q)
	var fds []int
	if e == nil {
		v |= VringNoFd
	} else {
		fds = []int{e.Fd()}
	}
	return f.send(r, putU64(v), fds, false)
}

// SetQueueKick sends SET_VRING_KICK (a nil kick asks the back-end to poll).
// The back-end starts the ring on it.
func (f *Frontend) SetQueueKick(q int, kick *vdpa.EventFD) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if err := f.setFd(ReqSetVringKick, q, kick); err != nil {
		return err
	}
	fq.kick, fq.kickSet = kick, true
	return nil
}

// SetQueueCall sends SET_VRING_CALL (nil: the driver polls).
func (f *Frontend) SetQueueCall(q int, call *vdpa.EventFD) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.queue(q); err != nil {
		return err
	}
	return f.setFd(ReqSetVringCall, q, call)
}

// SetQueueErr sends SET_VRING_ERR: the back-end signals err when the ring
// fails.
func (f *Frontend) SetQueueErr(q int, e *vdpa.EventFD) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.queue(q); err != nil {
		return err
	}
	return f.setFd(ReqSetVringErr, q, e)
}

// EnableQueue sends SET_VRING_ENABLE. Without PROTOCOL_FEATURES rings are
// enabled from the start and cannot be disabled.
func (f *Frontend) EnableQueue(q int, enable bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fq, err := f.queue(q)
	if err != nil {
		return err
	}
	if !f.acked.Has(virtio.FProtocolFeat) {
		if !enable {
			return fmt.Errorf("%w: SET_VRING_ENABLE needs PROTOCOL_FEATURES", ErrUnsupported)
		}
		fq.enabled = true
		return nil
	}
	var n uint32
	if enable {
		n = 1
	}
	if err := f.send(ReqSetVringEnable, VringState{Index: uint32(q), Num: n}.Encode(), nil, false); err != nil {
		return err
	}
	fq.enabled = enable
	return nil
}

// Suspend stops every started ring with GET_VRING_BASE and remembers its
// state; QueueBase then returns it without stopping again.
//
// The rings stop from the highest index down: a virtio-net back-end that
// answers transmitted frames on the receive queue (a loopback, a responder,
// a switch port looped back) completes a transmit chain only after placing
// the reply, so with transmitq k stopped before receiveq k no frame is
// transmitted into a receive ring that is already stopped.
func (f *Frontend) Suspend() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.suspend {
		return nil
	}
	for i := range f.queues {
		f.queues[i].suspOK = false
	}
	for i := len(f.queues) - 1; i >= 0; i-- {
		fq := &f.queues[i]
		if !fq.kickSet {
			continue
		}
		st, err := f.getBase(i)
		if err != nil {
			return err
		}
		fq.suspSt, fq.suspOK = st, true
	}
	f.suspend = true
	return nil
}

// Resume restarts the rings Suspend stopped: SET_VRING_BASE with the saved
// index, then SET_VRING_KICK with the same kick descriptor.
func (f *Frontend) Resume() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.suspend {
		return nil
	}
	for i := range f.queues {
		fq := &f.queues[i]
		if !fq.suspOK {
			continue
		}
		if err := f.send(ReqSetVringBase, VringState{Index: uint32(i), Num: uint32(fq.suspSt.NextAvail)}.Encode(), nil, false); err != nil {
			return err
		}
		if err := f.setFd(ReqSetVringKick, i, fq.kick); err != nil {
			return err
		}
		fq.kickSet, fq.suspOK = true, false
	}
	f.suspend = false
	return nil
}

// SetLog hands the back-end a shared dirty bitmap (dirty.New with
// Options.Shared) with SET_LOG_BASE. The back-end logs while LOG_ALL is
// negotiated (SetFeatures). nil stops used-ring logging on every ring
// (vhost-user has no message to withdraw the log itself).
func (f *Frontend) SetLog(log *dirty.Bitmap) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if log == nil {
		f.log = nil
		return f.resendAddrs()
	}
	if !f.proto.Has(PFLogShmfd) {
		return fmt.Errorf("%w: LOG_SHMFD not negotiated", ErrUnsupported)
	}
	if log.Fd() < 0 {
		return fmt.Errorf("%w: dirty bitmap is not shared (dirty.Options.Shared)", ErrBadRegion)
	}
	m, err := f.exchange(ReqSetLogBase, Log{MmapSize: uint64(log.Size()), MmapOffset: log.FdOffset()}.Encode(),
		[]int{log.Fd()}, true)
	if err != nil {
		return err
	}
	if len(m.Payload) == u64Size && m.U64() != 0 {
		return msgErr(ReqSetLogBase, ErrReplyFailed, "status %d", m.U64())
	}
	f.log = log
	return f.resendAddrs()
}

// Close closes the connection; the back-end stops its rings and releases
// the memory.
func (f *Frontend) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return vdpa.ErrClosed
	}
	f.closed = true
	err := f.c.close()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
