// Package mdevtest is a test kit for package mdev: a guest-side virtio-net
// driver that drives an mdev.Device through its registers and keeps every
// bit of its state in guest memory — so that, like a real guest, it can be
// migrated by copying guest memory and resumed on the destination by
// Attach — plus a vCPU-like writer that dirties guest memory at a given
// rate. Both mark what they write in a dirty bitmap, as KVM's dirty log
// would for a real guest.
//
// The driver sends numbered frames to the broadcast address on transmitq0
// and counts, in a byte per frame number in guest memory, how many times
// each came back on receiveq0 (the software device loops frames back), so
// Verify can check that every frame sent was received exactly once.
//
// With VIRTIO_F_RING_PACKED in Options.Features (and offered by the device)
// the driver runs both queues as packed virtqueues (virtio 1.2 §2.8) of any
// size: its ring positions, kept in guest memory like the split ones, are
// packed positions (index | wrap counter << 15, vring.PackedIndex). It
// expects transmitted chains back in the order it made them available, as
// the software device returns them; a transmit completion out of that order
// is counted as corrupt.
package mdevtest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Errors.
var (
	// ErrLayout: guest memory is too small or not one region at 0.
	ErrLayout = errors.New("mdevtest: guest memory unsuitable")
	// ErrNotBooted: Attach found no driver state in guest memory.
	ErrNotBooted = errors.New("mdevtest: no guest driver state in memory")
	// ErrDevice: the device refused the driver (FEATURES_OK or NEEDS_RESET).
	ErrDevice = errors.New("mdevtest: device refused the driver")
	// ErrVerify: frames lost, duplicated or corrupted.
	ErrVerify = errors.New("mdevtest: traffic check failed")
)

// Guest memory layout.
const (
	stateAddr  = 0x0
	rxRingAddr = 0x1000
	txRingAddr = 0x11000
	bufAddr    = 0x100000
	bufSize    = 2048
	hdrLen     = 12                 // virtio-net header with VERSION_1
	stateMagic = 0x3154534756454d44 // "DMEVGST1"
	rxQ, txQ   = 0, 1
	etherType  = 0x88b5
	minFrame   = 14 + 8
)

// state page offsets
const (
	offMagic    = 0x00
	offSent     = 0x08
	offReceived = 0x10
	offDup      = 0x18
	offBad      = 0x20
	offRxUsed   = 0x28
	offTxUsed   = 0x2a
	offRxAvail  = 0x2c
	offTxAvail  = 0x2e
	offLimit    = 0x30
	offQSize    = 0x38
	offMaxFr    = 0x40
	offPacked   = 0x48 // 1: the queues are packed virtqueues
)

// Packed descriptor flags (virtio 1.2 §2.8.1): a descriptor is available
// when its AVAIL bit equals the driver's wrap counter and its USED bit
// does not; used when both equal the used wrap counter.
const (
	pdescWrite = 1 << 1
	pdescAvail = 1 << 7
	pdescUsed  = 1 << 15
)

// Options configure a Guest.
type Options struct {
	// QueueSize is the ring size (default 256).
	QueueSize uint16
	// MaxFrames is how many frames the driver can number (one byte of
	// guest memory each; default 1<<20).
	MaxFrames uint64
	// Features are accepted in addition to VERSION_1 when the device
	// offers them (vdpa_sim needs VIRTIO_F_ACCESS_PLATFORM, for example).
	// With VIRTIO_F_RING_PACKED accepted the queues are packed, and
	// QueueSize need not be a power of two.
	Features virtio.Features
}

// Guest is the driver. Step and Run must not be called concurrently.
type Guest struct {
	dev    *mdev.Device
	mem    *vring.Memory
	ram    []byte
	q      uint16
	maxF   uint64
	packed bool
	rx     vring.Layout
	tx     vring.Layout
	log    atomic.Pointer[dirty.Bitmap]

	rxAvail, rxUsed, txAvail, txUsed *uint32
	frame                            []byte
}

// Layout returns the guest-memory range [start, end) the driver does not
// use, which Dirtier may write.
func Layout(opts *Options) (scratchStart uint64) {
	o := withDefaults(opts)
	return (bufAddr + 2*uint64(o.QueueSize)*bufSize + o.MaxFrames + 4095) &^ 4095
}

func withDefaults(opts *Options) Options {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.QueueSize == 0 {
		o.QueueSize = 256
	}
	if o.MaxFrames == 0 {
		o.MaxFrames = 1 << 20
	}
	return o
}

func (g *Guest) countsAddr() uint64 { return bufAddr + 2*uint64(g.q)*bufSize }

// setup places the driver's rings; f are the features it will run with
// (only RING_PACKED matters here).
func setup(dev *mdev.Device, mem *vring.Memory, o Options, f virtio.Features) (*Guest, error) {
	rs := mem.Regions()
	if len(rs) == 0 || rs[0].Base() != 0 {
		return nil, fmt.Errorf("%w: need a region at guest address 0", ErrLayout)
	}
	// Each ring must fit below the next one.
	if !vring.ValidQueueSizeFor(o.QueueSize, f) || vring.LayoutBytesFor(o.QueueSize, f) > txRingAddr-rxRingAddr {
		return nil, fmt.Errorf("%w: queue size %d", ErrLayout, o.QueueSize)
	}
	g := &Guest{dev: dev, mem: mem, ram: rs[0].Bytes(), q: o.QueueSize, maxF: o.MaxFrames,
		packed: f.Has(virtio.FRingPacked), frame: make([]byte, bufSize)}
	if uint64(len(g.ram)) < Layout(&o) {
		return nil, fmt.Errorf("%w: %d bytes, need at least %d", ErrLayout, len(g.ram), Layout(&o))
	}
	g.rx = vring.LayoutFor(rxRingAddr, g.q, f)
	g.tx = vring.LayoutFor(txRingAddr, g.q, f)
	if g.packed {
		return g, nil // the packed driver publishes through each descriptor's id|flags word
	}
	var err error
	for _, w := range []struct {
		p    **uint32
		addr vring.GuestAddr
	}{{&g.rxAvail, g.rx.Avail}, {&g.rxUsed, g.rx.Used}, {&g.txAvail, g.tx.Avail}, {&g.txUsed, g.tx.Used}} {
		if *w.p, err = word32(g.ram, int(w.addr)); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// Boot resets dev, brings it up the way a guest driver does (virtio 1.2
// §3.1.1), with receiveq0 full of buffers, and returns the driver. limit is
// the number of frames to send (0: MaxFrames).
func Boot(dev *mdev.Device, mem *vring.Memory, limit uint64, opts *Options) (*Guest, error) {
	o := withDefaults(opts)
	feat := virtio.FVersion1.Bit() | o.Features&dev.OfferedFeatures()
	g, err := setup(dev, mem, o, feat)
	if err != nil {
		return nil, err
	}
	if limit == 0 || limit > o.MaxFrames {
		limit = o.MaxFrames
	}
	clear(g.ram[:g.countsAddr()+g.maxF])
	le := binary.LittleEndian
	le.PutUint64(g.ram[offMagic:], stateMagic)
	le.PutUint64(g.ram[offLimit:], limit)
	le.PutUint64(g.ram[offQSize:], uint64(g.q))
	le.PutUint64(g.ram[offMaxFr:], g.maxF)
	if g.packed {
		le.PutUint64(g.ram[offPacked:], 1)
		g.bootPacked()
	}
	for i := uint16(0); i < g.q && !g.packed; i++ {
		rd := g.ram[int(g.rx.Desc)+16*int(i):]
		le.PutUint64(rd, bufAddr+uint64(i)*bufSize)
		le.PutUint32(rd[8:], bufSize)
		le.PutUint16(rd[12:], 2) // VIRTQ_DESC_F_WRITE
		le.PutUint16(g.ram[int(g.rx.Avail)+4+2*int(i):], i)
		td := g.ram[int(g.tx.Desc)+16*int(i):]
		le.PutUint64(td, bufAddr+uint64(g.q+i)*bufSize)
	}
	if !g.packed {
		g.setU16(offRxAvail, g.q)
		store32(g.rxAvail, uint32(g.q)<<16)
	}

	w := func(off uint64, size int, v uint64) error { return dev.Write(mdev.RegionCommon, off, size, v) }
	st := func(s virtio.Status) error { return w(mdev.OffDeviceStatus, 1, uint64(s)) }
	steps := []error{
		st(0),
		st(virtio.StatusAcknowledge),
		st(virtio.StatusAcknowledge | virtio.StatusDriver),
		w(mdev.OffDriverFeatureSelect, 4, 0), w(mdev.OffDriverFeature, 4, uint64(feat)&0xffffffff),
		w(mdev.OffDriverFeatureSelect, 4, 1), w(mdev.OffDriverFeature, 4, uint64(feat)>>32),
		st(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK),
	}
	if err := errors.Join(steps...); err != nil {
		return nil, err
	}
	if dev.Status()&virtio.StatusFeaturesOK == 0 {
		return nil, fmt.Errorf("%w: FEATURES_OK refused", ErrDevice)
	}
	_ = w(mdev.OffMSIXConfig, 2, 0)
	for q, l := range []vring.Layout{g.rx, g.tx} {
		steps = []error{
			w(mdev.OffQueueSelect, 2, uint64(q)),
			w(mdev.OffQueueSize, 2, uint64(g.q)),
			w(mdev.OffQueueMSIXVector, 2, uint64(q+1)),
			w(mdev.OffQueueDesc, 8, uint64(l.Desc)),
			w(mdev.OffQueueDriver, 8, uint64(l.Avail)),
			w(mdev.OffQueueDevice, 8, uint64(l.Used)),
			w(mdev.OffQueueEnable, 2, 1),
		}
		if err := errors.Join(steps...); err != nil {
			return nil, err
		}
	}
	if err := st(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK); err != nil {
		return nil, err
	}
	if s := dev.Status(); s&virtio.StatusDeviceNeedsReset != 0 || s&virtio.StatusDriverOK == 0 {
		return nil, fmt.Errorf("%w: status %s: %v", ErrDevice, s, dev.Err())
	}
	g.kick(rxQ)
	return g, nil
}

// Attach resumes the driver whose state is in mem (after a migration).
func Attach(dev *mdev.Device, mem *vring.Memory) (*Guest, error) {
	rs := mem.Regions()
	if len(rs) == 0 || rs[0].Base() != 0 || rs[0].Size() < 4096 {
		return nil, fmt.Errorf("%w: need a region at guest address 0", ErrLayout)
	}
	ram := rs[0].Bytes()
	le := binary.LittleEndian
	if le.Uint64(ram[offMagic:]) != stateMagic {
		return nil, ErrNotBooted
	}
	o := Options{QueueSize: uint16(le.Uint64(ram[offQSize:])), MaxFrames: le.Uint64(ram[offMaxFr:])}
	var f virtio.Features
	if le.Uint64(ram[offPacked:]) == 1 {
		f = f.With(virtio.FRingPacked)
	}
	return setup(dev, mem, o, f)
}

// SetLog makes the driver mark everything it writes in log (nil: stop).
func (g *Guest) SetLog(log *dirty.Bitmap) { g.log.Store(log) }

func (g *Guest) mark(addr, n uint64) {
	if l := g.log.Load(); l != nil {
		_ = l.Mark(addr, n)
	}
}

func (g *Guest) u64(off int) uint64 { return binary.LittleEndian.Uint64(g.ram[off:]) }
func (g *Guest) setU64(off int, v uint64) {
	binary.LittleEndian.PutUint64(g.ram[off:], v)
	g.mark(uint64(off), 8)
}
func (g *Guest) u16(off int) uint16 { return binary.LittleEndian.Uint16(g.ram[off:]) }
func (g *Guest) setU16(off int, v uint16) {
	binary.LittleEndian.PutUint16(g.ram[off:], v)
	g.mark(uint64(off), 2)
}

func (g *Guest) kick(q int) {
	_ = g.dev.Write(mdev.RegionNotify, uint64(q*mdev.NotifyOffMultiplier), 2, uint64(q))
}

// Stats returns frames sent and received, duplicates and corrupt frames.
func (g *Guest) Stats() (sent, received, dup, bad uint64) {
	return g.u64(offSent), g.u64(offReceived), g.u64(offDup), g.u64(offBad)
}

// Done reports whether every frame up to the limit was sent and came back.
func (g *Guest) Done() bool {
	s, r, _, _ := g.Stats()
	return s == g.u64(offLimit) && r >= s
}

// Step does one round of driver work: reclaim transmitted chains, process
// received frames (re-posting their buffers), transmit more while fewer
// than QueueSize frames are on their way. It reports whether anything
// happened.
func (g *Guest) Step() bool {
	if g.packed {
		return g.stepPacked()
	}
	progress := false
	le := binary.LittleEndian
	// Transmit completions: the chains are reused in ring order.
	_, txUsedIdx := splitWord(load32(g.txUsed))
	if txUsed := g.u16(offTxUsed); txUsed != txUsedIdx {
		g.setU16(offTxUsed, txUsedIdx)
		progress = true
	}
	// Receive.
	_, rxUsedIdx := splitWord(load32(g.rxUsed))
	rxUsed, rxAvail := g.u16(offRxUsed), g.u16(offRxAvail)
	received, dup, bad := g.u64(offReceived), g.u64(offDup), g.u64(offBad)
	sent := g.u64(offSent)
	reposted := false
	for ; rxUsed != rxUsedIdx; rxUsed++ {
		e := g.ram[int(g.rx.Used)+4+8*int(rxUsed%g.q):]
		id, n := le.Uint32(e), le.Uint32(e[4:])
		if id >= uint32(g.q) {
			bad++
			continue
		}
		g.tally(id, n, sent, &received, &dup, &bad)
		slot := int(g.rx.Avail) + 4 + 2*int(rxAvail%g.q)
		le.PutUint16(g.ram[slot:], uint16(id))
		g.mark(uint64(slot), 2)
		rxAvail++
		reposted = true
	}
	if reposted {
		g.setU16(offRxUsed, rxUsed)
		g.setU16(offRxAvail, rxAvail)
		g.setU64(offReceived, received)
		g.setU64(offDup, dup)
		g.setU64(offBad, bad)
		store32(g.rxAvail, uint32(rxAvail)<<16)
		g.mark(uint64(g.rx.Avail), 4)
		g.kick(rxQ)
		progress = true
	}
	// Transmit.
	limit := g.u64(offLimit)
	txAvail, txUsed := g.u16(offTxAvail), g.u16(offTxUsed)
	added := false
	for sent < limit && sent-received < uint64(g.q) && uint16(txAvail-txUsed) < g.q {
		i := txAvail % g.q
		n := g.buildFrame(sent, bufAddr+uint64(g.q+i)*bufSize)
		d := int(g.tx.Desc) + 16*int(i) + 8
		le.PutUint32(g.ram[d:], uint32(hdrLen+n))
		g.mark(uint64(d), 4)
		slot := int(g.tx.Avail) + 4 + 2*int(i)
		le.PutUint16(g.ram[slot:], i)
		g.mark(uint64(slot), 2)
		txAvail++
		sent++
		added = true
	}
	if added {
		g.setU16(offTxAvail, txAvail)
		g.setU64(offSent, sent)
		store32(g.txAvail, uint32(txAvail)<<16)
		g.mark(uint64(g.tx.Avail), 4)
		g.kick(txQ)
		progress = true
	}
	return progress
}

// bootPacked fills receiveq0 with every buffer (ids 0..q-1 in ring order,
// so the avail position wraps to index 0 with wrap counter 0) and sets
// both queues' positions; the rings were cleared. The device is not
// running yet, so the order of the stores does not matter here.
func (g *Guest) bootPacked() {
	for i := uint16(0); i < g.q; i++ {
		g.postPacked(g.rx, i, i, bufAddr+uint64(i)*bufSize, bufSize, pdescWrite, true)
	}
	g.setU16(offRxAvail, vring.PackedIndex(0, false))
	g.setU16(offRxUsed, vring.PackedIndex(0, true))
	g.setU16(offTxAvail, vring.PackedIndex(0, true))
	g.setU16(offTxUsed, vring.PackedIndex(0, true))
}

// postPacked makes buffer id (one descriptor: addr, n bytes, flags) available
// at ring index idx of ring l for avail wrap counter wrap. The descriptor's
// addr and len are written first and its id|flags word last, with one atomic
// store: that store publishes the descriptor (§2.8.21.1), and the device's
// atomic load of the same word orders its reads of addr and len after it.
func (g *Guest) postPacked(l vring.Layout, idx, id uint16, addr uint64, n uint32, flags uint16, wrap bool) {
	if wrap {
		flags |= pdescAvail
	} else {
		flags |= pdescUsed
	}
	d := int(l.Desc) + 16*int(idx)
	le := binary.LittleEndian
	le.PutUint64(g.ram[d:], addr)
	le.PutUint32(g.ram[d+8:], n)
	w, err := word32(g.ram, d+12)
	if err != nil {
		panic(err) // the ring is 16-aligned in a page-aligned mapping (setup)
	}
	store32(w, uint32(id)|uint32(flags)<<16)
	g.mark(uint64(d), 16)
}

// usedPacked reports whether ring index idx of l holds a used descriptor
// for used wrap counter wrap, with its buffer id and written length. The
// atomic load of the id|flags word orders the read of len after it.
func (g *Guest) usedPacked(l vring.Layout, idx uint16, wrap bool) (id uint16, n uint32, ok bool) {
	d := int(l.Desc) + 16*int(idx)
	w, err := word32(g.ram, d+12)
	if err != nil {
		panic(err)
	}
	v := load32(w)
	flags := uint16(v >> 16)
	if (flags&pdescAvail != 0) != wrap || (flags&pdescUsed != 0) != wrap {
		return 0, 0, false
	}
	return uint16(v), binary.LittleEndian.Uint32(g.ram[d+8:]), true
}

// advance moves a packed position one descriptor on in a ring of q.
func advance(pos, q uint16) uint16 {
	idx, wrap := vring.PackedPosition(pos)
	if idx++; idx == q {
		idx, wrap = 0, !wrap
	}
	return vring.PackedIndex(idx, wrap)
}

// stepPacked is Step for packed rings. Transmit buffer ids are ring indexes:
// a chain made available at index i uses buffer q+i and id i, and its used
// descriptor is expected at index i too (in-order completion).
func (g *Guest) stepPacked() bool {
	progress := false
	// Transmit completions.
	txUsed, txAvail := g.u16(offTxUsed), g.u16(offTxAvail)
	bad := g.u64(offBad)
	badBefore := bad
	for txUsed != txAvail {
		idx, wrap := vring.PackedPosition(txUsed)
		id, _, ok := g.usedPacked(g.tx, idx, wrap)
		if !ok {
			break
		}
		if id != idx {
			bad++
		}
		txUsed = advance(txUsed, g.q)
		progress = true
	}
	if progress {
		g.setU16(offTxUsed, txUsed)
	}
	// Receive: every buffer is reposted at the avail position, which is
	// the index just consumed (the whole ring is posted: avail is one lap
	// ahead of used).
	rxUsed, rxAvail := g.u16(offRxUsed), g.u16(offRxAvail)
	received, dup := g.u64(offReceived), g.u64(offDup)
	sent := g.u64(offSent)
	reposted := false
	for {
		idx, wrap := vring.PackedPosition(rxUsed)
		id, n, ok := g.usedPacked(g.rx, idx, wrap)
		if !ok {
			break
		}
		rxUsed = advance(rxUsed, g.q)
		if id >= g.q {
			bad++
			continue
		}
		g.tally(uint32(id), n, sent, &received, &dup, &bad)
		aidx, awrap := vring.PackedPosition(rxAvail)
		g.postPacked(g.rx, aidx, id, bufAddr+uint64(id)*bufSize, bufSize, pdescWrite, awrap)
		rxAvail = advance(rxAvail, g.q)
		reposted = true
	}
	if reposted {
		g.setU16(offRxUsed, rxUsed)
		g.setU16(offRxAvail, rxAvail)
		g.setU64(offReceived, received)
		g.setU64(offDup, dup)
		g.kick(rxQ)
		progress = true
	}
	if bad != badBefore {
		g.setU64(offBad, bad)
	}
	// Transmit.
	limit := g.u64(offLimit)
	added := false
	inFlight := func() uint16 {
		n, _ := vring.QueueState{NextAvail: txAvail, NextUsed: txUsed}.PackedInFlight(g.q)
		return n
	}
	for sent < limit && sent-received < uint64(g.q) && inFlight() < g.q {
		idx, wrap := vring.PackedPosition(txAvail)
		addr := bufAddr + uint64(g.q+idx)*bufSize
		n := g.buildFrame(sent, addr)
		g.postPacked(g.tx, idx, idx, addr, uint32(hdrLen+n), 0, wrap)
		txAvail = advance(txAvail, g.q)
		sent++
		added = true
	}
	if added {
		g.setU16(offTxAvail, txAvail)
		g.setU64(offSent, sent)
		g.kick(txQ)
		progress = true
	}
	return progress
}

func splitWord(w uint32) (flags, idx uint16) { return uint16(w), uint16(w >> 16) }

func frameLen(seq uint64) int { return minFrame + int(seq*37%1000) }

// buildFrame writes frame seq (header included) at addr and returns the
// frame's length without the header.
func (g *Guest) buildFrame(seq uint64, addr uint64) int {
	n := frameLen(seq)
	b := g.ram[addr : addr+uint64(hdrLen+n)]
	clear(b[:hdrLen])
	f := b[hdrLen:]
	for i := 0; i < 6; i++ {
		f[i] = 0xff
	}
	copy(f[6:12], []byte{0x02, 0, 0, 0, 0, 0x02})
	binary.BigEndian.PutUint16(f[12:], etherType)
	binary.LittleEndian.PutUint64(f[14:], seq)
	for i := minFrame; i < n; i++ {
		f[i] = byte(seq*7 + uint64(i))
	}
	g.mark(addr, uint64(hdrLen+n))
	return n
}

// checkFrame validates the frame in receive buffer id (n bytes written).
// tally checks the frame received in buffer id (n bytes written) and
// counts it: received (and dup when its sequence number came before) or
// bad. Each sequence number's count lives in guest memory (logged dirty),
// so that a migrated guest keeps it.
func (g *Guest) tally(id, n uint32, sent uint64, received, dup, bad *uint64) {
	seq, ok := g.checkFrame(id, n, sent)
	if !ok {
		*bad++
		return
	}
	c := g.countsAddr() + seq
	if g.ram[c] != 0 {
		*dup++
	}
	if g.ram[c] < 255 {
		g.ram[c]++
		g.mark(c, 1)
	}
	*received++
}

func (g *Guest) checkFrame(id, n uint32, sent uint64) (uint64, bool) {
	if n < hdrLen+minFrame || n > bufSize {
		return 0, false
	}
	f := g.ram[bufAddr+uint64(id)*bufSize+hdrLen:][:n-hdrLen]
	if binary.BigEndian.Uint16(f[12:]) != etherType {
		return 0, false
	}
	seq := binary.LittleEndian.Uint64(f[14:])
	if seq >= sent || seq >= g.maxF || frameLen(seq) != len(f) {
		return 0, false
	}
	for i := minFrame; i < len(f); i++ {
		if f[i] != byte(seq*7+uint64(i)) {
			return 0, false
		}
	}
	return seq, true
}

// Run steps the driver until ctx ends or Done. When idle it consumes the
// receive interrupt and sleeps briefly: like a guest with interrupt
// coalescing, it never blocks on the eventfd, so it leaves no read deadline
// behind on a descriptor the VMM shares.
func (g *Guest) Run(ctx context.Context) error {
	call := g.dev.CallFD(rxQ)
	for ctx.Err() == nil {
		if g.Step() {
			continue
		}
		if g.Done() {
			return nil
		}
		if call != nil {
			if n, _ := call.TryWait(); n > 0 {
				continue
			}
		}
		time.Sleep(20 * time.Microsecond)
	}
	return nil
}

// Verify checks that every frame sent was received exactly once and none
// was corrupt.
func (g *Guest) Verify() error {
	sent, received, dup, bad := g.Stats()
	if dup != 0 || bad != 0 || received != sent {
		return fmt.Errorf("%w: sent %d, received %d, duplicates %d, corrupt %d", ErrVerify, sent, received, dup, bad)
	}
	c := g.ram[g.countsAddr():]
	for seq := uint64(0); seq < sent; seq++ {
		if c[seq] != 1 {
			return fmt.Errorf("%w: frame %d received %d times", ErrVerify, seq, c[seq])
		}
	}
	return nil
}

// Dirtier writes random pages of guest memory [start, end) at a rate, like
// a vCPU, marking each in log (when set).
type Dirtier struct {
	ram        []byte
	start, end uint64
	rate       float64 // pages per second
	rng        *rand.Rand
	log        atomic.Pointer[dirty.Bitmap]
	written    atomic.Uint64
}

// NewDirtier returns a writer over [start, end) of the region at guest
// address 0 of mem, at pagesPerSec.
func NewDirtier(mem *vring.Memory, start, end uint64, pagesPerSec float64, seed uint64) (*Dirtier, error) {
	rs := mem.Regions()
	if len(rs) == 0 || rs[0].Base() != 0 || end > rs[0].Size() || start >= end {
		return nil, fmt.Errorf("%w: dirty range %#x-%#x", ErrLayout, start, end)
	}
	return &Dirtier{ram: rs[0].Bytes(), start: start &^ 4095, end: end &^ 4095, rate: pagesPerSec,
		rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}, nil
}

// SetLog sets the bitmap the writes are marked in.
func (d *Dirtier) SetLog(log *dirty.Bitmap) { d.log.Store(log) }

// Written returns the number of page writes so far.
func (d *Dirtier) Written() uint64 { return d.written.Load() }

// Run writes pages until ctx ends, in bursts every millisecond.
func (d *Dirtier) Run(ctx context.Context) {
	if d.rate <= 0 || d.end <= d.start {
		<-ctx.Done()
		return
	}
	pages := (d.end - d.start) / 4096
	start := time.Now()
	var done float64
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		due := d.rate * time.Since(start).Seconds()
		for ; done < due; done++ {
			p := d.start + d.rng.Uint64N(pages)*4096
			v := d.rng.Uint64()
			binary.LittleEndian.PutUint64(d.ram[p+(v%512)*8:], v)
			if l := d.log.Load(); l != nil {
				_ = l.Mark(p, 4096)
			}
			d.written.Add(1)
		}
	}
}
