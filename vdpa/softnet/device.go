package softnet

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Mode selects how queue goroutines wait for work.
type Mode int

const (
	// ModeEvent sleeps on the kick eventfd with driver notifications
	// enabled. It uses no CPU when idle.
	ModeEvent Mode = iota
	// ModePoll keeps driver notifications disabled and polls the rings:
	// PollSpins empty polls, then as many runtime.Gosched rounds, then
	// sleeps of PollSleep between polls until work appears (or, with
	// PollNoSleep, runtime.Gosched rounds for good).
	ModePoll
)

func (m Mode) String() string {
	switch m {
	case ModeEvent:
		return "event"
	case ModePoll:
		return "poll"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Options configure a Device. The zero value (or nil) is a single queue
// pair loopback device with a control queue, MTU 1500 and MAC
// 02:00:00:00:00:01.
type Options struct {
	// MAC is the device's station address (config mac). Zero means
	// 02:00:00:00:00:01.
	MAC [6]byte
	// MTU is the config mtu advice. Zero means 1500.
	MTU uint16
	// MaxQueuePairs is max_virtqueue_pairs. Zero means 1. More than one
	// offers VIRTIO_NET_F_MQ, which needs the control queue.
	MaxQueuePairs uint16
	// MaxQueueSize bounds every queue's size. Zero means 256.
	MaxQueueSize uint16
	// MaxQueueMemory bounds, in bytes, the queue state the device may
	// allocate: what it holds once the driver has started every queue at
	// MaxQueueSize (per receive queue entry a chain and its segments, per
	// transmit and control queue a gather buffer of a whole frame, and with
	// Offload a segment buffer per receive and transmit queue). The
	// state is allocated when a queue starts and released on Reset, so a
	// device with many pairs costs little until they are used; New refuses
	// MaxQueuePairs × MaxQueueSize beyond this bound with an error matching
	// ErrTooLarge, so that no configuration can make the process run out
	// of memory later. Zero means a quarter of the machine's physical
	// memory (1 GiB where it cannot be read). See QueueMemory.
	MaxQueueMemory uint64
	// FrontendCtrl says the driver-facing control queue is run by the
	// front-end between the driver and this device, as QEMU and DPDK's
	// virtio-user do for a vhost-user back-end: they negotiate MQ,
	// CTRL_RX, CTRL_MAC_ADDR and CTRL_VLAN with the guest, handle its
	// control commands themselves, and pass those features on without
	// CTRL_VQ. With FrontendCtrl, SetFeatures accepts them without
	// CTRL_VQ (CTRL_VLAN is offered too), and with MQ every queue pair
	// is active: the front-end enables and disables pairs itself
	// (SET_VRING_ENABLE), and what a pair transmits is answered on the
	// receive queue of the same pair. Without it (a driver that talks to
	// the device directly: mdev, VDUSE, vdpa.Local) the virtio-net feature
	// dependencies of virtio 1.2 §5.1.3.1 are enforced. The
	// examples/vhost-user-net back-end sets it.
	FrontendCtrl bool
	// NoCtrlVQ removes the control queue and the features that need it
	// (CTRL_VQ, CTRL_RX, CTRL_MAC_ADDR, MQ): VDUSE before Linux 6.13
	// refuses net devices with a control queue.
	NoCtrlVQ bool
	// AccessPlatform offers VIRTIO_F_ACCESS_PLATFORM (buffer addresses are
	// IOVAs): required by VDUSE.
	AccessPlatform bool
	// InOrder offers VIRTIO_F_IN_ORDER. Every queue of this device
	// completes chains in the order it took them (receive chains held for
	// a later frame are the newest ones and are pushed before any newer
	// chain), which is what the feature promises the driver.
	InOrder bool
	// Offload offers the checksum and segmentation offloads in both
	// directions (HostOffloads and GuestOffloads: CSUM, HOST_TSO4/6,
	// HOST_ECN, HOST_USO, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN,
	// GUEST_USO4/6), with their dependencies of virtio 1.2 §5.1.3.1
	// enforced in SetFeatures. Transmitted headers are validated and
	// reach an OffloadHandler; what the handler does not take (and every
	// offload, for a plain FrameHandler) the device does in software. On
	// receive, DeliverHdr does in software what the driver did not
	// negotiate. Disable removes single offloads.
	Offload bool
	// Disable removes features from the offer.
	Disable virtio.Features
	// LinkDown starts the device with the link down.
	LinkDown bool
	// Handler receives transmitted frames. Nil means Loopback.
	Handler FrameHandler
	// Mode selects event-driven or busy-poll processing.
	Mode Mode
	// PollSpins is the number of empty polls before a ModePoll queue
	// starts yielding and then sleeping. Zero means 64, or 1 with
	// PollNoSleep.
	PollSpins int
	// PollSleep is the sleep between idle polls in ModePoll, bounded to
	// [1µs, 1ms]. Zero means 20µs.
	PollSleep time.Duration
	// PollNoSleep keeps an idle ModePoll queue polling for good: after
	// PollSpins empty polls it yields (runtime.Gosched) between polls and
	// never sleeps, so a device given its own CPU polls continuously, as
	// DPDK's lcores do. A timer sleep lasts well over PollSleep (timer
	// slack, scheduler wake-up), long enough for a fast driver to fill
	// the ring meanwhile; PollNoSleep trades that for a CPU kept busy.
	PollNoSleep bool
	// PollGroup, with ModePoll, runs the device's transmit and control
	// queues on the group's worker goroutines instead of one goroutine
	// per queue (see PollGroup); the group's idle policy then applies,
	// not PollSpins, PollSleep and PollNoSleep. Nil gives each queue its
	// own goroutine.
	PollGroup *PollGroup
	// BatchSize is the most chains a queue goroutine processes before it
	// signals interrupts and checks for a stop. Zero means 64. A queue
	// takes at most half its ring in one batch, whatever BatchSize says:
	// a transmit queue returns a batch's chains together at its end, and
	// a batch near the ring's size leaves the driver without free
	// transmit descriptors until then (testpmd's macswap loopback, which
	// drops what it cannot send, fell from 9 to 1 Mpps with 255 on a
	// packed ring of 256 and stopped with 256 before that bound;
	// docs/performance). 16 to 128 moved about as many frames as 64; 8
	// about 5 % fewer.
	BatchSize int
	// OnConfigChange is called (from the goroutine changing it) after the
	// configuration space changed on the device's initiative (link state),
	// so a server can raise a configuration change interrupt.
	OnConfigChange func()
}

// Errors returned by Device and its FrameHandler helpers.
var (
	// ErrFeatures: SetFeatures got features that were not offered or
	// break a dependency of virtio 1.2 §5.1.3.1.
	ErrFeatures = errors.New("softnet: invalid feature set")
	// ErrQueueIndex: a queue index outside the device's queues.
	ErrQueueIndex = errors.New("softnet: no such queue")
	// ErrQueueRunning: StartQueue on a queue that is already started.
	ErrQueueRunning = errors.New("softnet: queue already started")
	// ErrQueueStopped: StopQueue on a queue that is not started.
	ErrQueueStopped = errors.New("softnet: queue not started")
	// ErrNoBuffer: the receive queue had no (or not enough) buffers.
	ErrNoBuffer = errors.New("softnet: no receive buffer")
	// ErrBufferTooSmall: without MRG_RXBUF, a receive chain cannot hold
	// the header and the frame; with it, one cannot hold the header, or
	// the frame's chains have too many segments (DropRxTooSmall,
	// DropRxFragmented).
	ErrBufferTooSmall = errors.New("softnet: receive buffer too small")
	// ErrRxNotReady: the receive queue is not started.
	ErrRxNotReady = errors.New("softnet: receive queue not started")
	// ErrFiltered: the receive filter rejected the frame.
	ErrFiltered = errors.New("softnet: frame filtered by receive mode")
	// ErrLinkDown: the link is down.
	ErrLinkDown = errors.New("softnet: link down")
	// ErrFrameTooBig: a frame larger than MaxFrame.
	ErrFrameTooBig = errors.New("softnet: frame too big")
	// ErrTooLarge: New got MaxQueuePairs × MaxQueueSize whose queue state
	// would exceed Options.MaxQueueMemory.
	ErrTooLarge = errors.New("softnet: queue state larger than the memory bound")
)

// MaxFrame is the largest frame (without the virtio-net header) the device
// transmits or receives, whatever the MTU advice: a GSO frame of the
// largest IPv6 packet without jumbo payload (40 + 65535 bytes) behind an
// Ethernet header with a VLAN tag (18 bytes).
const MaxFrame = 18 + 40 + 65535

// rx mode bits.
const (
	rxPromisc uint32 = 1 << iota
	rxAllMulti
	rxAllUni
	rxNoMulti
	rxNoUni
	rxNoBcast
)

// MACTableEntries is how many addresses each of the unicast and the
// multicast MAC filter tables holds. A MAC_TABLE_SET with more entries of
// a kind than that turns filtering of that kind off (every unicast, or
// every multicast, frame is accepted), as QEMU's virtio-net does past its
// 64 entries: the filter may let through more than the driver asked for
// (the driver's own stack filters again), never less, and a frame's check
// never scans more than this many entries. A driver may otherwise send
// over ten thousand addresses in one command.
const MACTableEntries = 64

// macTables are the MAC filter tables of the last MAC_TABLE_SET; allUni and
// allMulti are set when that kind had more than MACTableEntries entries.
type macTables struct {
	uni, multi       [][6]byte
	allUni, allMulti bool
}

// newMACTables keeps uni and multi as filter tables, or a kind's overflow.
func newMACTables(uni, multi [][6]byte) *macTables {
	t := &macTables{uni: uni, multi: multi}
	if len(uni) > MACTableEntries {
		t.uni, t.allUni = nil, true
	}
	if len(multi) > MACTableEntries {
		t.multi, t.allMulti = nil, true
	}
	return t
}

// Device is the software virtio-net device. It implements vdpa.Handler.
type Device struct {
	opts    Options
	offered virtio.Features
	cfgMAC  [6]byte

	handler atomic.Pointer[handlerBox]

	ctl      sync.Mutex // serializes control calls (Start/Stop/Reset/SetFeatures)
	features atomic.Uint64
	hdrLen   atomic.Int32
	mrg      atomic.Bool

	mac         atomic.Uint64 // current station address, 6 bytes little-endian
	rxMode      atomic.Uint32
	tables      atomic.Pointer[macTables]
	activePairs atomic.Uint32
	steerWake   atomic.Pointer[steerWake]
	linkUp      atomic.Bool

	queues  []*queue
	errNote chan struct{} // QueueErrNotify
	drops   dropCounters
	ctrlOK  atomic.Uint64
	ctrlEr  atomic.Uint64
}

type handlerBox struct{ h FrameHandler }

var (
	_ vdpa.Handler          = (*Device)(nil)
	_ vdpa.QueueErrNotifier = (*Device)(nil)
)

// New returns a device configured by opts (nil means defaults).
func New(opts *Options) (*Device, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.MAC == ([6]byte{}) {
		o.MAC = [6]byte{0x02, 0, 0, 0, 0, 0x01}
	}
	if o.MAC[0]&1 != 0 {
		return nil, fmt.Errorf("softnet: MAC %x is a multicast address", o.MAC)
	}
	if o.MTU == 0 {
		o.MTU = 1500
	}
	if o.MTU < 68 {
		return nil, fmt.Errorf("softnet: MTU %d below the IPv4 minimum 68", o.MTU)
	}
	if o.MaxQueuePairs == 0 {
		o.MaxQueuePairs = 1
	}
	if o.MaxQueuePairs > virtio.NetCtrlMQPairsMax {
		return nil, fmt.Errorf("softnet: %d queue pairs, at most %d", o.MaxQueuePairs, virtio.NetCtrlMQPairsMax)
	}
	if o.MaxQueuePairs > 1 && o.NoCtrlVQ && !o.FrontendCtrl {
		return nil, fmt.Errorf("softnet: %d queue pairs need the control queue (MQ depends on CTRL_VQ)", o.MaxQueuePairs)
	}
	if o.MaxQueueSize == 0 {
		o.MaxQueueSize = 256
	}
	if !vring.ValidQueueSize(o.MaxQueueSize) {
		return nil, fmt.Errorf("softnet: max queue size %d: %w", o.MaxQueueSize, vring.ErrQueueSize)
	}
	if o.PollSpins <= 0 {
		o.PollSpins = 64
		if o.PollNoSleep {
			// A poller that never sleeps gains nothing by spinning before
			// it yields, and delays the device's other pollers that share
			// its CPU: with GOMAXPROCS=1 and two queue pairs, yielding at
			// once moved 12 % more frames (testpmd macswap loopback).
			o.PollSpins = 1
		}
	}
	if o.PollSleep == 0 {
		o.PollSleep = 20 * time.Microsecond
	}
	o.PollSleep = min(max(o.PollSleep, time.Microsecond), time.Millisecond)
	if o.BatchSize <= 0 {
		o.BatchSize = 64
	}
	if o.Mode != ModeEvent && o.Mode != ModePoll {
		return nil, fmt.Errorf("softnet: unknown mode %v", o.Mode)
	}
	if o.PollGroup != nil && o.Mode != ModePoll {
		return nil, fmt.Errorf("%w: mode %v", ErrPollGroup, o.Mode)
	}

	f := virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx, virtio.FIndirectDesc, virtio.FRingPacked,
		virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMTU, virtio.NetFMrgRxbuf)
	if o.AccessPlatform {
		f = f.With(virtio.FAccessPlatform)
	}
	if o.InOrder {
		f = f.With(virtio.FInOrder)
	}
	if !o.NoCtrlVQ {
		f = f.With(virtio.NetFCtrlVQ, virtio.NetFCtrlRx, virtio.NetFCtrlMACAddr)
	}
	if o.FrontendCtrl {
		f = f.With(virtio.NetFCtrlRx, virtio.NetFCtrlMACAddr, virtio.NetFCtrlVLAN)
	}
	if o.MaxQueuePairs > 1 && (!o.NoCtrlVQ || o.FrontendCtrl) {
		f = f.With(virtio.NetFMQ)
	}
	if o.Offload {
		f |= HostOffloads | GuestOffloads
	}
	f &^= o.Disable

	need := QueueMemory(o.MaxQueuePairs, o.MaxQueueSize, !o.NoCtrlVQ, o.Offload)
	limit := o.MaxQueueMemory
	if limit == 0 {
		limit = defaultQueueMemory()
	}
	if need > limit {
		return nil, fmt.Errorf("%w: %d queue pairs of size %d need up to %d bytes, bound %d (Options.MaxQueueMemory)",
			ErrTooLarge, o.MaxQueuePairs, o.MaxQueueSize, need, limit)
	}

	d := &Device{opts: o, offered: f, cfgMAC: o.MAC}
	h := o.Handler
	if h == nil {
		h = Loopback
	}
	d.handler.Store(&handlerBox{h})
	d.steerWake.Store(newSteerWake())
	n := 2 * int(o.MaxQueuePairs)
	if !o.NoCtrlVQ {
		n++
	}
	d.queues = make([]*queue, n)
	d.errNote = make(chan struct{}, 1)
	for i := range d.queues {
		d.queues[i] = &queue{idx: i, note: d.errNote}
	}
	d.linkUp.Store(!o.LinkDown)
	d.resetState()
	return d, nil
}

// resetState returns negotiated and driver-programmed state to its
// initial values.
func (d *Device) resetState() {
	d.features.Store(0)
	d.hdrLen.Store(virtio.NetHdrLegacySize)
	d.mrg.Store(false)
	d.mac.Store(macToU64(d.cfgMAC[:]))
	// Promiscuous until the driver says otherwise, as QEMU's device does:
	// a driver without CTRL_RX has no way to turn filtering on, and one with
	// it programs the mode when the interface comes up.
	d.rxMode.Store(rxPromisc)
	d.tables.Store(&macTables{})
	d.activePairs.Store(1)
}

// steerWake's ctx ends when the queue pairs in use change
// (VQ_PAIRS_SET): the transmit workers held on a stopped receive queue
// (wait) sleep on it as well as on their kick, since their replies may now
// go to a running receive queue, and no kick comes then.
type steerWake struct {
	ctx    context.Context
	cancel context.CancelFunc
}

func newSteerWake() *steerWake {
	ctx, cancel := context.WithCancel(context.Background())
	return &steerWake{ctx: ctx, cancel: cancel}
}

// setActivePairs changes the queue pairs in use, waking the held transmit
// workers when it changes them.
func (d *Device) setActivePairs(n uint32) {
	if d.activePairs.Swap(n) == n {
		return
	}
	if old := d.steerWake.Swap(newSteerWake()); old != nil {
		old.cancel()
	}
}

func macToU64(m []byte) uint64 {
	_ = m[5]
	return uint64(m[0]) | uint64(m[1])<<8 | uint64(m[2])<<16 | uint64(m[3])<<24 | uint64(m[4])<<32 | uint64(m[5])<<40
}

func u64ToMAC(v uint64) [6]byte {
	return [6]byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24), byte(v >> 32), byte(v >> 40)}
}

// DeviceID implements vdpa.Handler.
func (d *Device) DeviceID() virtio.DeviceID { return virtio.DeviceNet }

// Features implements vdpa.Handler: the offered features.
func (d *Device) Features() virtio.Features { return d.offered }

// NegotiatedFeatures returns the features set by SetFeatures.
func (d *Device) NegotiatedFeatures() virtio.Features { return virtio.Features(d.features.Load()) }

// SetFeatures implements vdpa.Handler. It rejects features that were not
// offered and, unless Options.FrontendCtrl is set, combinations the
// virtio-net feature dependencies forbid.
func (d *Device) SetFeatures(f virtio.Features) error {
	d.ctl.Lock()
	defer d.ctl.Unlock()
	if extra := f &^ d.offered; extra != 0 {
		return fmt.Errorf("%w: not offered: %s", ErrFeatures, extra.Format(virtio.DeviceNet))
	}
	if !d.opts.FrontendCtrl {
		for _, dep := range []virtio.Feature{virtio.NetFCtrlRx, virtio.NetFMQ, virtio.NetFCtrlMACAddr, virtio.NetFCtrlVLAN} {
			if f.Has(dep) && !f.Has(virtio.NetFCtrlVQ) {
				return fmt.Errorf("%w: %s requires CTRL_VQ", ErrFeatures, dep.Name(virtio.DeviceNet))
			}
		}
	}
	// The offload dependencies hold behind a front-end too: it negotiated
	// them with a driver that obeys them.
	if err := checkOffloadDeps(f); err != nil {
		return err
	}
	for _, q := range d.queues {
		if q.isRunning() {
			return fmt.Errorf("%w: queue %d is running", ErrQueueRunning, q.idx)
		}
	}
	d.features.Store(uint64(f))
	if f.Has(virtio.NetFMQ) && !f.Has(virtio.NetFCtrlVQ) {
		// The front-end runs the control queue: no VQ_PAIRS_SET will
		// come, every pair is in use (FrontendCtrl).
		d.activePairs.Store(uint32(d.opts.MaxQueuePairs))
	}
	d.hdrLen.Store(int32(virtio.NetHdrLen(f)))
	d.mrg.Store(f.Has(virtio.NetFMrgRxbuf))
	return nil
}

// ConfigSize implements vdpa.Handler: struct virtio_net_config.
func (d *Device) ConfigSize() int { return virtio.NetConfigSize }

// Config returns the current configuration space contents.
func (d *Device) Config() virtio.NetConfig {
	c := virtio.NetConfig{
		MAC:               u64ToMAC(d.mac.Load()),
		MaxVirtqueuePairs: d.opts.MaxQueuePairs,
		MTU:               d.opts.MTU,
		Speed:             virtio.NetSpeedUnknown,
		Duplex:            virtio.NetDuplexUnknown,
	}
	if d.linkUp.Load() {
		c.Status = virtio.NetSLinkUp
	}
	return c
}

// ReadConfig implements vdpa.Handler. Bytes outside the configuration
// space read as zero.
func (d *Device) ReadConfig(off int, p []byte) {
	clear(p)
	var buf [virtio.NetConfigSize]byte
	c := d.Config()
	_ = c.Encode(buf[:])
	if off < 0 || off >= len(buf) {
		return
	}
	copy(p, buf[off:])
}

// WriteConfig implements vdpa.Handler. The virtio-net configuration space
// is read-only for a VERSION_1 driver (the MAC is changed with the control
// queue), so writes are ignored.
func (d *Device) WriteConfig(off int, p []byte) error { return nil }

// NumQueues implements vdpa.Handler: 2 per queue pair plus the control
// queue.
func (d *Device) NumQueues() int { return len(d.queues) }

// MaxQueueSize implements vdpa.Handler.
func (d *Device) MaxQueueSize() uint16 { return d.opts.MaxQueueSize }

// ctrlIndex is the control queue's index under the negotiated features,
// or -1 when there is none.
func (d *Device) ctrlIndex() int {
	f := d.NegotiatedFeatures()
	if !f.Has(virtio.NetFCtrlVQ) {
		return -1
	}
	if f.Has(virtio.NetFMQ) {
		return 2 * int(d.opts.MaxQueuePairs)
	}
	return 2
}

type queueKind int

const (
	kindRx queueKind = iota
	kindTx
	kindCtrl
)

func (d *Device) kindOf(q int) (queueKind, error) {
	if q < 0 || q >= len(d.queues) {
		return 0, fmt.Errorf("%w: %d (device has %d)", ErrQueueIndex, q, len(d.queues))
	}
	if q == d.ctrlIndex() {
		return kindCtrl, nil
	}
	if !d.NegotiatedFeatures().Has(virtio.NetFMQ) && q >= 2 {
		return 0, fmt.Errorf("%w: %d without MQ (queues 0, 1 and control queue 2)", ErrQueueIndex, q)
	}
	if q == len(d.queues)-1 && !d.opts.NoCtrlVQ {
		return 0, fmt.Errorf("%w: %d is the control queue, not negotiated", ErrQueueIndex, q)
	}
	if q%2 == 0 {
		return kindRx, nil
	}
	return kindTx, nil
}

// StartQueue implements vdpa.Handler.
func (d *Device) StartQueue(q int, dq *vring.DeviceQueue, kick, call *vdpa.EventFD) error {
	d.ctl.Lock()
	defer d.ctl.Unlock()
	kind, err := d.kindOf(q)
	if err != nil {
		return err
	}
	if dq == nil {
		return fmt.Errorf("softnet: queue %d: nil DeviceQueue", q)
	}
	qu := d.queues[q]
	if qu.isRunning() {
		return fmt.Errorf("%w: %d", ErrQueueRunning, q)
	}
	switch kind {
	case kindRx:
		// Features cannot change while a queue runs (SetFeatures), so
		// the chains one frame may take are fixed until the next start.
		chains := int(dq.Size())
		if !d.mrg.Load() {
			chains = 1
		}
		qu.startRx(dq, call, chains)
		if qu.rxHeld.Swap(false) {
			// Transmit workers held while this queue was stopped sleep on
			// their kick: wake them (a spurious kick is harmless). They
			// read rxHeld after waking, so none misses the restart.
			d.kickTx()
		}
	case kindTx:
		qu.startWorker(d, dq, kick, call, d.txBatch)
	case kindCtrl:
		qu.startWorker(d, dq, kick, call, d.ctrlBatch)
	}
	return nil
}

// StopQueue implements vdpa.Handler. Every chain the queue popped has been
// completed (or, for receive chains held for a later frame, given back by
// moving NextAvail back) when it returns, so the state restarts the queue
// exactly. Stopping a receive queue also holds the transmit queues that
// reply into it until it starts again (package documentation, "Receive
// queue stopped").
func (d *Device) StopQueue(q int) (vring.QueueState, error) {
	d.ctl.Lock()
	defer d.ctl.Unlock()
	if q < 0 || q >= len(d.queues) {
		return vring.QueueState{}, fmt.Errorf("%w: %d (device has %d)", ErrQueueIndex, q, len(d.queues))
	}
	qu := d.queues[q]
	if !qu.isRunning() {
		return vring.QueueState{}, fmt.Errorf("%w: %d", ErrQueueStopped, q)
	}
	if kind, err := d.kindOf(q); err == nil && kind == kindRx {
		// Hold the transmit queues that reply here before the receive
		// queue stops: a batch that started before rxHeld was set ends
		// first (its replies are delivered), later ones consume nothing
		// until StartQueue of this queue.
		qu.rxHeld.Store(true)
		d.waitTxBatches()
	}
	return qu.stop(), nil
}

// waitTxBatches waits for the batch each running transmit worker is in.
func (d *Device) waitTxBatches() {
	for _, t := range d.queues {
		if kind, err := d.kindOf(t.idx); err == nil && kind == kindTx && t.isRunning() {
			t.batchMu.Lock()
			//lint:ignore SA2001 the empty critical section waits for the worker's batch
			t.batchMu.Unlock()
		}
	}
}

// kickTx wakes every running transmit worker that sleeps on a kick.
func (d *Device) kickTx() {
	for _, t := range d.queues {
		if kind, err := d.kindOf(t.idx); err == nil && kind == kindTx && t.isRunning() && t.kick != nil {
			_ = t.kick.Signal()
		}
	}
}

// Reset implements vdpa.Handler: it stops every queue and returns the
// device to its initial state (negotiated features, MAC, receive mode,
// active queue pairs). Counters are kept.
func (d *Device) Reset() {
	d.ctl.Lock()
	defer d.ctl.Unlock()
	// Highest index first, as everywhere else: a transmit queue stops
	// before the receive queue its loopback replies go to. (A reset
	// discards every frame anyway; the order keeps the workers from
	// seeing a half-stopped pair.)
	for i := len(d.queues) - 1; i >= 0; i-- {
		if q := d.queues[i]; q.isRunning() {
			q.stop()
		}
	}
	for _, q := range d.queues {
		q.rxHeld.Store(false)
		q.release()
	}
	d.resetState()
}

// QueueErrNotify implements vdpa.QueueErrNotifier: the returned channel
// receives after a queue stops on an error (QueueErr then reports it).
// Announcements made while one waits merge into it.
func (d *Device) QueueErrNotify() <-chan struct{} { return d.errNote }

// QueueErr returns the error that stopped queue q's processing (a ring
// rule broken by the driver, a failed dirty-log write), or nil.
func (d *Device) QueueErr(q int) error {
	if q < 0 || q >= len(d.queues) {
		return fmt.Errorf("%w: %d", ErrQueueIndex, q)
	}
	return d.queues[q].loadErr()
}

// SetHandler replaces the frame handler. Every frame the driver makes
// available after SetHandler returns goes to h (nil means Loopback); frames
// already in a handler call finish with the old one, and frames made
// available before may go to either.
func (d *Device) SetHandler(h FrameHandler) {
	if h == nil {
		h = Loopback
	}
	d.handler.Store(&handlerBox{h})
}

// MAC returns the current station address (the configured one, or the one
// the driver set with MAC_ADDR_SET).
func (d *Device) MAC() [6]byte { return u64ToMAC(d.mac.Load()) }

// ActivePairs returns the number of queue pairs in use (VQ_PAIRS_SET).
func (d *Device) ActivePairs() int { return int(d.activePairs.Load()) }

// Promisc and AllMulti report the receive mode set over the control queue.
func (d *Device) Promisc() bool  { return d.rxMode.Load()&rxPromisc != 0 }
func (d *Device) AllMulti() bool { return d.rxMode.Load()&rxAllMulti != 0 }

// LinkUp reports the link state.
func (d *Device) LinkUp() bool { return d.linkUp.Load() }

// SetLinkUp changes the link state (config status LINK_UP) and calls
// Options.OnConfigChange when it changed.
func (d *Device) SetLinkUp(up bool) {
	if d.linkUp.Swap(up) != up && d.opts.OnConfigChange != nil {
		d.opts.OnConfigChange()
	}
}
