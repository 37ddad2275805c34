package mdev

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FuzzGuestAccess drives a Device (in front of the fake back-end the unit
// tests use) with an arbitrary sequence of guest register accesses, host
// events and back-end failures, the way a hostile guest and a failing
// back-end can. A guest controls every access of its own; the device must
// answer each with success or one of this package's typed errors, must not
// panic, hang or leak, and must stay usable: after the hostile sequence a
// reset followed by the §3.1.1 initialisation sequence brings it live with
// exactly what that sequence programs, and Close releases everything.
//
// Input format (fuzzSeed builds it for the seeds):
//
//	byte 0    device configuration (fuzzConfig)
//	byte 1    back-end behaviour (fault to inject, concurrent reader, ...)
//	then      operations, each an op byte (kind in bits 5..7, argument in
//	          bits 0..4) followed by its operands; see fuzzGuest.step.
//
// A missing operand reads as 0, so every byte string is a valid input.
func FuzzGuestAccess(f *testing.F) {
	// Guest memory is shared by all inputs: the fake back-end never
	// touches it and the device only checks ring addresses against it.
	mem := testMemory(f)
	// The first pollable descriptor a process opens makes the runtime open
	// its poller's own, which stay open: open one before the first input,
	// whose descriptor count would otherwise be off.
	e, err := vdpa.NewEventFD()
	require.NoError(f, err)
	require.NoError(f, e.Close())
	for _, s := range fuzzSeeds() {
		f.Add([]byte(s.b))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) > fuzzMaxInput {
			// Long inputs only slow the fuzzer down: the device's state
			// is small and reachable in a few hundred operations.
			in = in[:fuzzMaxInput]
		}
		runGuestFuzz(t, mem, in)
	})
}

const (
	// fuzzMaxInput bounds the bytes of one input that are decoded.
	fuzzMaxInput = 1024
	// fuzzCallTimeout bounds every call into the device. Nothing in the
	// device waits for anything but its own locks and the (instant) fake
	// back-end, so a call that takes this long is a deadlock. Generous for
	// the race detector and a loaded machine.
	fuzzCallTimeout = 10 * time.Second
	// fuzzSettle bounds the wait for goroutines and descriptors to be
	// released after Close.
	fuzzSettle = 2 * time.Second
)

// Operation kinds (op byte bits 5..7).
const (
	fzRead       = iota // Read(region = arg&7, offset, size)
	fzWrite             // WriteContext(region = arg&7, offset, size, value)
	fzReadBAR           // ReadBAR(bar = arg&7, offset, size)
	fzWriteBAR          // WriteBARContext(bar = arg&7, offset, size, value)
	fzReadField         // Read of a common configuration field, natural width
	fzWriteField        // WriteContext of a common configuration field, value
	fzMacro             // a driver step made of several accesses
	fzHost              // a host-side event (config change, data-path failure)
)

// Driver macros (fzMacro, argument % 8).
const (
	fzmStatus   = iota // write device_status
	fzmReset           // write 0 to device_status
	fzmInit            // the whole §3.1.1 sequence (argument bit 3: packed)
	fzmFeatures        // driver_feature_select, driver_feature
	fzmQueue           // set up one queue (any index, size, vector, address)
	fzmNotify          // notify a queue through BAR 4
	fzmPCICfg          // an access through the VIRTIO_PCI_CAP_PCI_CFG window
	fzmMSIX            // program an MSI-X table entry
)

// fuzzSizes maps a size nibble to an access size: the four valid ones
// twice as often as the invalid ones (0, odd, too wide, negative).
var fuzzSizes = [16]int{1, 2, 4, 8, 1, 2, 4, 8, 0, 3, 5, 6, 7, 9, -1, 16}

// fuzzFields are the common configuration fields at their natural widths,
// 64-bit fields also as their two halves (§4.1.3.1).
var fuzzFields = []struct {
	off  uint64
	size int
}{
	{OffDeviceFeatureSelect, 4}, {OffDeviceFeature, 4}, {OffDriverFeatureSelect, 4}, {OffDriverFeature, 4},
	{OffMSIXConfig, 2}, {OffNumQueues, 2}, {OffDeviceStatus, 1}, {OffConfigGeneration, 1},
	{OffQueueSelect, 2}, {OffQueueSize, 2}, {OffQueueMSIXVector, 2}, {OffQueueEnable, 2}, {OffQueueNotifyOff, 2},
	{OffQueueDesc, 8}, {OffQueueDesc, 4}, {OffQueueDesc + 4, 4},
	{OffQueueDriver, 8}, {OffQueueDriver, 4}, {OffQueueDriver + 4, 4},
	{OffQueueDevice, 8}, {OffQueueDevice, 4}, {OffQueueDevice + 4, 4},
}

// fuzzFaults are fake back-end operations the input can make fail (byte 1,
// bits 0..4): the device must turn each into NEEDS_RESET or a refused
// FEATURES_OK, never into a broken device.
var fuzzFaults = []string{
	"", // none
	"SetFeatures",
	"SetMemory",
	"SetQueueNum(0)",
	"SetQueueAddr(1)",
	"SetQueueBase(0)",
	"SetQueueKick(0)",
	"SetQueueCall(1)",
	"EnableQueue(0)",
	"SetStatus(RESET)",
	"SetStatus(ACKNOWLEDGE|DRIVER)",
	"SetStatus(ACKNOWLEDGE|DRIVER|FEATURES_OK)",
	"SetStatus(ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK)",
}

// fuzzConfig is the device configuration an input selects.
type fuzzConfig struct {
	vectorMode  bool   // Options.Vector supplies per-vector irqfds
	intx        bool   // with vectorMode: Options.INTx set
	msixVectors int    // Options.MSIXVectors (0: default)
	maxQueue    uint16 // Options.MaxQueueSize (0: the back-end's)
	numQueues   int    // the fake back-end's queue count
	fault       string // fake back-end operation that fails
	refuseFOK   bool   // the fake back-end refuses FEATURES_OK
	concurrent  bool   // a second vCPU reads registers meanwhile
	packed      bool   // the final initialisation uses RING_PACKED
}

func decodeFuzzConfig(b0, b1 byte) fuzzConfig {
	return fuzzConfig{
		vectorMode:  b0&1 != 0,
		intx:        b0&2 != 0,
		msixVectors: []int{0, 1, 3, 2048}[b0>>2&3],
		maxQueue:    []uint16{0, 200, 1, 64}[b0>>4&3],
		numQueues:   []int{2, 1, 3, 2}[b0>>6&3],
		fault:       fuzzFaults[int(b1&0x1f)%len(fuzzFaults)],
		refuseFOK:   b1&0x20 != 0,
		concurrent:  b1&0x40 != 0,
		packed:      b1&0x80 != 0,
	}
}

// fuzzCall describes the call in progress, for the hang report.
type fuzzCall struct {
	what   string
	region Region
	bar    int
	off    uint64
	size   int
	value  uint64
}

// fuzzGuest runs one input against one device.
type fuzzGuest struct {
	t   *testing.T
	d   *Device
	f   *fakeBacking
	cfg fuzzConfig
	in  []byte

	// watchdog panics (failing the input with every goroutine's stack) if
	// a call does not return within fuzzCallTimeout; cur is that call.
	watchdog *time.Timer
	cur      atomic.Pointer[fuzzCall]

	// closed: the device was closed, accesses may end with ErrClosed.
	closed bool

	vecMu  sync.Mutex
	vecFDs map[uint16]*vdpa.EventFD // Options.Vector's irqfds
	intx   *vdpa.EventFD
}

// next consumes one input byte (0 once the input is exhausted).
func (g *fuzzGuest) next() byte {
	if len(g.in) == 0 {
		return 0
	}
	b := g.in[0]
	g.in = g.in[1:]
	return b
}

func (g *fuzzGuest) u16() uint16 { return uint16(g.next()) | uint16(g.next())<<8 }

func (g *fuzzGuest) u64() uint64 {
	var v uint64
	for i := 0; i < 8; i++ {
		v |= uint64(g.next()) << (8 * i)
	}
	return v
}

// value decodes a register value: one byte for the small values most
// registers take (status bits, selectors, indexes), else 1..8 bytes.
func (g *fuzzGuest) value() uint64 {
	h := g.next()
	if h < 0xe0 {
		return uint64(h)
	}
	var v uint64
	for i := 0; i < int(h&7)+1; i++ {
		v |= uint64(g.next()) << (8 * i)
	}
	return v
}

// sizeOffset decodes an access size and offset: a size nibble, and a 16-bit
// offset, or (bit 4) a full 64-bit one, or (bit 5) one at most 255 below
// 2^64, where offset+size wraps around: random 64-bit offsets rarely land
// there.
func (g *fuzzGuest) sizeOffset() (int, uint64) {
	sb := g.next()
	size := fuzzSizes[sb&0xf]
	switch {
	case sb&0x10 != 0:
		return size, g.u64()
	case sb&0x20 != 0:
		return size, -uint64(g.next())
	}
	return size, uint64(g.u16())
}

func (g *fuzzGuest) arm(c *fuzzCall) {
	if fuzzTrace {
		g.t.Logf("%+v", *c)
	}
	g.cur.Store(c)
	g.watchdog.Reset(fuzzCallTimeout)
}

// fuzzTrace (FUZZTRACE=1 go test -run FuzzGuestAccess/<input> -v) logs every
// call, to read what a failing input does.
var fuzzTrace = os.Getenv("FUZZTRACE") != ""

func (g *fuzzGuest) disarm() { g.watchdog.Stop() }

func (g *fuzzGuest) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), fuzzCallTimeout)
}

// hang reports the call that did not return, with every goroutine's stack
// (a panic prints only its own goroutine's). It runs on the timer's
// goroutine: panicking there stops the fuzzer, which records the input.
func (g *fuzzGuest) hang() {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	c := g.cur.Load()
	panic(fmt.Sprintf("mdev: %+v did not return within %v (deadlock?)\n%s", *c, fuzzCallTimeout, buf))
}

// vector is Options.Vector: one irqfd per MSI-X vector, made on first use.
func (g *fuzzGuest) vector(v uint16) *vdpa.EventFD {
	g.vecMu.Lock()
	defer g.vecMu.Unlock()
	if e, ok := g.vecFDs[v]; ok {
		return e
	}
	e, err := vdpa.NewEventFD()
	if err != nil {
		// Called with the device's lock held, from the guest's access:
		// no FailNow here. The nil irqfd is caught by the final checks.
		g.t.Errorf("irqfd for vector %d: %v", v, err)
		return nil
	}
	g.vecFDs[v] = e
	return e
}

func (g *fuzzGuest) closeFDs() {
	g.vecMu.Lock()
	defer g.vecMu.Unlock()
	for v, e := range g.vecFDs {
		_ = e.Close()
		delete(g.vecFDs, v)
	}
	if g.intx != nil {
		_ = g.intx.Close()
		g.intx = nil
	}
}

// fuzzTyped returns nil if err is nil or one of the errors a guest access
// may end with.
func fuzzTyped(err error) error {
	switch {
	case err == nil, errors.Is(err, ErrRegion), errors.Is(err, ErrAccessSize), errors.Is(err, ErrOutOfRange):
		return nil
	case errors.Is(err, ErrBacking) && errors.Is(err, errInjected):
		// The fake back-end fails only where the input told it to: any
		// other back-end error means the device handed it a request it
		// should have refused itself (an offset out of range, say).
		return nil
	}
	return fmt.Errorf("not one of the errors a guest access may return: %w", err)
}

// typed is fuzzTyped, allowing ErrClosed once the device is closed.
func (g *fuzzGuest) typed(err error) error {
	if g.closed && errors.Is(err, ErrClosed) {
		return nil
	}
	return fuzzTyped(err)
}

// checkAccess checks the error of a Read or Write: an *AccessError that
// names the access and wraps a typed error.
func (g *fuzzGuest) checkAccess(err error, r Region, off uint64, size int, write bool) {
	// The checks call require only when they fail: its bookkeeping
	// (t.Helper) would otherwise dominate the cost of an execution.
	if err == nil {
		if !validSize(size, 8) {
			require.Failf(g.t, "malformed access succeeded", "an access of %d bytes", size)
		}
		return
	}
	var ae *AccessError
	if !errors.As(err, &ae) || ae.Region != r || ae.Offset != off || ae.Size != size || ae.Write != write {
		require.Failf(g.t, "untyped error", "%+v: %v is not an *AccessError naming the access", fuzzCall{region: r, off: off, size: size}, err)
	}
	if err := g.typed(err); err != nil {
		require.NoError(g.t, err)
	}
}

// checkBAR checks the error of a ReadBAR or WriteBAR: an *AccessError as
// for Read and Write, or RegionAt's ErrOutOfRange for an offset no region
// covers.
func (g *fuzzGuest) checkBAR(err error, write bool) {
	if err == nil {
		return
	}
	var ae *AccessError
	if errors.As(err, &ae) {
		if ae.Write != write {
			require.Equal(g.t, write, ae.Write)
		}
	} else if !errors.Is(err, ErrOutOfRange) {
		require.ErrorIs(g.t, err, ErrOutOfRange, "a BAR offset RegionAt rejects")
	}
	if err := g.typed(err); err != nil {
		require.NoError(g.t, err)
	}
}

// checkRead checks what a successful read returned against the spec.
func (g *fuzzGuest) checkRead(r Region, off uint64, size int, v uint64) {
	if size < 8 && v>>(8*size) != 0 {
		require.Failf(g.t, "wide value", "a %d-byte read returned %#x", size, v)
	}
	// §4.1.5.1.2: a vector the device cannot use reads as NO_VECTOR.
	vectorOK := v == uint64(NoVector) || v < uint64(g.d.opts.MSIXVectors)
	switch {
	case r == RegionISR && v&^uint64(ISRQueue|ISRConfig) != 0:
		require.Failf(g.t, "ISR", "§4.1.4.5: ISR bits 2..7 are reserved, read %#x", v)
	case r != RegionCommon:
	case off == OffDeviceStatus && v&^uint64(statusKnown) != 0:
		require.Failf(g.t, "device_status", "device_status holds only the §2.1 bits, read %#x", v)
	case off == OffNumQueues && v != uint64(g.cfg.numQueues):
		require.EqualValues(g.t, g.cfg.numQueues, v, "num_queues")
	case off == OffQueueSize && v > uint64(g.d.maxQueue):
		require.Failf(g.t, "queue_size", "§4.1.4.3: queue_size %d exceeds the maximum %d", v, g.d.maxQueue)
	case (off == OffQueueMSIXVector || off == OffMSIXConfig) && !vectorOK:
		require.Failf(g.t, "vector", "vector %#x at %#x with %d MSI-X vectors", v, off, g.d.opts.MSIXVectors)
	}
}

func (g *fuzzGuest) read(r Region, off uint64, size int) (uint64, error) {
	g.arm(&fuzzCall{what: "Read", region: r, off: off, size: size})
	v, err := g.d.Read(r, off, size)
	g.disarm()
	g.checkAccess(err, r, off, size, false)
	if err == nil {
		g.checkRead(r, off, size, v)
	}
	return v, err
}

func (g *fuzzGuest) write(r Region, off uint64, size int, v uint64) error {
	ctx, cancel := g.ctx()
	defer cancel()
	g.arm(&fuzzCall{what: "WriteContext", region: r, off: off, size: size, value: v})
	err := g.d.WriteContext(ctx, r, off, size, v)
	g.disarm()
	g.checkAccess(err, r, off, size, true)
	if err == nil && r == RegionCommon && off == OffDeviceStatus && uint8(v) == 0 {
		// §2.4: writing 0 resets the device, and the reset is complete
		// when the write returns (§4.1.4.3.2).
		if st := g.d.Status(); st != 0 {
			require.Zero(g.t, st, "device_status after a reset")
		}
	}
	return err
}

func (g *fuzzGuest) readBAR(bar int, off uint64, size int) {
	g.arm(&fuzzCall{what: "ReadBAR", bar: bar, off: off, size: size})
	_, err := g.d.ReadBAR(bar, off, size)
	g.disarm()
	g.checkBAR(err, false)
}

func (g *fuzzGuest) writeBAR(bar int, off uint64, size int, v uint64) error {
	ctx, cancel := g.ctx()
	defer cancel()
	g.arm(&fuzzCall{what: "WriteBARContext", bar: bar, off: off, size: size, value: v})
	err := g.d.WriteBARContext(ctx, bar, off, size, v)
	g.disarm()
	g.checkBAR(err, true)
	return err
}

// step decodes and performs one operation.
func (g *fuzzGuest) step() {
	op := g.next()
	arg := op & 0x1f
	switch op >> 5 {
	case fzRead:
		size, off := g.sizeOffset()
		_, _ = g.read(Region(arg&7), off, size)
	case fzWrite:
		size, off := g.sizeOffset()
		_ = g.write(Region(arg&7), off, size, g.value())
	case fzReadBAR:
		size, off := g.sizeOffset()
		g.readBAR(int(arg&7), off, size)
	case fzWriteBAR:
		size, off := g.sizeOffset()
		_ = g.writeBAR(int(arg&7), off, size, g.value())
	case fzReadField:
		fl := fuzzFields[int(arg)%len(fuzzFields)]
		_, _ = g.read(RegionCommon, fl.off, fl.size)
	case fzWriteField:
		fl := fuzzFields[int(arg)%len(fuzzFields)]
		_ = g.write(RegionCommon, fl.off, fl.size, g.value())
	case fzMacro:
		g.macro(arg)
	case fzHost:
		g.host(arg)
	}
}

func (g *fuzzGuest) macro(arg byte) {
	c := func(off uint64, size int, v uint64) { _ = g.write(RegionCommon, off, size, v) }
	switch arg % 8 {
	case fzmStatus:
		c(OffDeviceStatus, 1, uint64(g.next()))
	case fzmReset:
		c(OffDeviceStatus, 1, 0)
	case fzmInit:
		g.initSequence(arg&8 != 0, false)
	case fzmFeatures:
		c(OffDriverFeatureSelect, 4, uint64(g.next()))
		c(OffDriverFeature, 4, g.value())
	case fzmQueue:
		// Queue index: mostly one that exists (or just past the last),
		// with bit 7 any index at all.
		qb := g.next()
		q := uint64(qb % 4)
		if qb&0x80 != 0 {
			q = uint64(qb)<<8 | uint64(g.next())
		}
		size, vec, skew := g.value(), g.value(), g.next()
		desc, drv, dev := fuzzRing(int(q%4), 256, arg&8 != 0)
		c(OffQueueSelect, 2, q)
		c(OffQueueSize, 2, size)
		c(OffQueueMSIXVector, 2, vec)
		// skew misaligns the rings (§2.7, §2.8.10.1) or moves them out
		// of guest memory.
		c(OffQueueDesc, 8, desc+uint64(skew&0x3))
		c(OffQueueDriver, 8, drv+uint64(skew>>2&0x3))
		c(OffQueueDevice, 8, dev+uint64(skew>>4&0x3)<<38)
		c(OffQueueEnable, 2, uint64(1+skew>>6))
	case fzmNotify:
		q := g.next()
		_ = g.writeBAR(ModernBAR, BarOffNotify+uint64(q%8)*NotifyOffMultiplier, 2, uint64(q))
	case fzmPCICfg:
		// §4.1.4.9: bar, offset and length select the access,
		// pci_cfg_data performs it.
		p := func(off uint64, size int, v uint64) { _ = g.write(RegionPCIConfig, off, size, v) }
		p(capOffPCICfg+4, 1, uint64(g.next()))
		p(capOffPCICfg+8, 4, uint64(g.u16()))
		p(capOffPCICfg+12, 4, uint64(g.next()%9))
		if arg&8 != 0 {
			p(capOffPCICfg+16, 4, g.value())
		} else {
			_, _ = g.read(RegionPCIConfig, capOffPCICfg+16, 4)
		}
	case fzmMSIX:
		base := uint64(g.next()) * msixTableEntrySize
		_ = g.writeBAR(MSIXBAR, base, 8, 0xfee00000)
		_ = g.writeBAR(MSIXBAR, base+8, 4, g.value())
		_ = g.writeBAR(MSIXBAR, base+12, 4, uint64(g.next()&1))
	}
}

// host performs a host-side event: what the back-end or the VMM does while
// the guest runs.
func (g *fuzzGuest) host(arg byte) {
	g.arm(&fuzzCall{what: fmt.Sprintf("host event %d", arg%6)})
	defer g.disarm()
	switch arg % 6 {
	case 0:
		g.d.ConfigChanged()
	case 1: // link status flips (virtio_net_config.status)
		g.f.mu.Lock()
		g.f.config[6] ^= 1
		g.f.mu.Unlock()
		g.d.ConfigChanged()
	case 2:
		ctx, cancel := g.ctx()
		defer cancel()
		require.NoError(g.t, fuzzTyped(g.d.VectorsChangedContext(ctx)))
	case 3:
		g.d.BackingFailed(errInjected)
	case 4:
		g.d.RaiseISR(g.next())
	case 5:
		q := int(int8(g.next()))
		in := q >= 0 && q < g.cfg.numQueues
		v := g.d.QueueVector(q)
		require.True(g.t, v == NoVector || int(v) < g.d.opts.MSIXVectors, "QueueVector(%d) = %d", q, v)
		require.Equal(g.t, in, g.d.KickFD(q) != nil, "KickFD(%d)", q)
		require.Equal(g.t, in && !g.cfg.vectorMode, g.d.CallFD(q) != nil, "CallFD(%d)", q)
		require.Zero(g.t, g.d.Status()&^statusKnown)
		if err := g.d.Err(); err != nil {
			require.True(g.t, errors.Is(err, ErrBacking) || errors.Is(err, ErrQueueLayout), "Err() = %v", err)
		}
	}
}

// fuzzRing returns a valid ring layout for queue q of size n in the test
// memory: split (§2.7) or packed (§2.8.10.1, event areas 4-aligned).
func fuzzRing(q int, n uint16, packed bool) (desc, drv, dev uint64) {
	if !packed {
		return ringAddrs(q, n)
	}
	base := uint64(0x10000 * (q + 1))
	return base, base + 0x1004, base + 0x2008
}

// fuzzQueueVector is the MSI-X vector the initialisation gives queue q.
func (g *fuzzGuest) fuzzQueueVector(q int) uint16 {
	if q+1 >= g.d.opts.MSIXVectors {
		return NoVector
	}
	return uint16(q + 1)
}

// initSequence performs the §3.1.1 initialisation: with strict, every
// access must succeed; otherwise it is one more hostile operation (the
// device may be in any state). It returns the features accepted and the
// queue size used.
func (g *fuzzGuest) initSequence(packed, strict bool) (virtio.Features, uint16) {
	feat, n := netFeatures, min(128, g.d.maxQueue)
	if packed {
		// §2.8: any size, not just a power of two.
		feat, n = feat.With(virtio.FRingPacked), max(1, g.d.maxQueue/4*3)
	}
	w := func(off uint64, size int, v uint64) {
		err := g.write(RegionCommon, off, size, v)
		if strict {
			require.NoError(g.t, err)
		}
	}
	r := func(off uint64, size int) uint64 {
		v, err := g.read(RegionCommon, off, size)
		if strict {
			require.NoError(g.t, err)
		}
		return v
	}
	w(OffDeviceStatus, 1, uint64(sAck))
	w(OffDeviceStatus, 1, uint64(sAck|sDrv))
	w(OffDeviceFeatureSelect, 4, 0)
	lo := r(OffDeviceFeature, 4)
	w(OffDeviceFeatureSelect, 4, 1)
	hi := r(OffDeviceFeature, 4)
	if strict {
		require.Equal(g.t, g.d.OfferedFeatures(), virtio.Features(hi<<32|lo), "device_feature")
	}
	w(OffDriverFeatureSelect, 4, 0)
	w(OffDriverFeature, 4, uint64(feat)&0xffffffff)
	w(OffDriverFeatureSelect, 4, 1)
	w(OffDriverFeature, 4, uint64(feat)>>32)
	w(OffDeviceStatus, 1, uint64(sAck|sDrv|sFOK))
	if strict {
		require.Equal(g.t, sAck|sDrv|sFOK, virtio.Status(r(OffDeviceStatus, 1)), "FEATURES_OK: %v", g.d.Err())
	}
	for q := 0; q < g.cfg.numQueues; q++ {
		desc, drv, dev := fuzzRing(q, n, packed)
		w(OffQueueSelect, 2, uint64(q))
		w(OffQueueSize, 2, uint64(n))
		w(OffQueueMSIXVector, 2, uint64(g.fuzzQueueVector(q)))
		w(OffQueueDesc, 4, desc&0xffffffff)
		w(OffQueueDesc+4, 4, desc>>32)
		w(OffQueueDriver, 8, drv)
		w(OffQueueDevice, 8, dev)
		w(OffQueueEnable, 2, 1)
		if strict {
			assert.EqualValues(g.t, n, r(OffQueueSize, 2))
			assert.EqualValues(g.t, g.fuzzQueueVector(q), r(OffQueueMSIXVector, 2))
			assert.EqualValues(g.t, 1, r(OffQueueEnable, 2))
		}
	}
	w(OffMSIXConfig, 2, 0)
	w(OffDeviceStatus, 1, uint64(sAck|sDrv|sFOK|sDOK))
	return feat, n
}

// startReader starts, if the input asks for it, a second vCPU that reads
// the registers that consult the back-end while the first one runs the
// sequence. The returned function stops it and returns the first untyped
// error it saw.
func (g *fuzzGuest) startReader() func() error {
	if !g.cfg.concurrent {
		return func() error { return nil }
	}
	quit, done := make(chan struct{}), make(chan error, 1)
	go func() {
		var first error
		for i := 0; ; i++ {
			select {
			case <-quit:
				done <- first
				return
			default:
			}
			var err error
			switch i % 4 {
			case 0:
				_, err = g.d.Read(RegionCommon, OffDeviceStatus, 1)
			case 1:
				_, err = g.d.Read(RegionCommon, OffConfigGeneration, 1)
			case 2:
				off := uint64(i/4) % uint64(g.d.cfgSize+1)
				_, err = g.d.Read(RegionDevice, off, 1<<(i/4%3))
			case 3:
				_, err = g.d.Read(RegionPCIConfig, capOffPCICfg+16, 4)
			}
			if err := fuzzTyped(err); err != nil && first == nil {
				first = err
			}
		}
	}()
	var once sync.Once
	var res error
	return func() error {
		once.Do(func() {
			close(quit)
			select {
			case res = <-done:
			case <-time.After(fuzzCallTimeout):
				g.cur.Store(&fuzzCall{what: "concurrent reader"})
				g.hang()
			}
		})
		return res
	}
}

// fuzzFDCount is the number of open file descriptors.
func fuzzFDCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}

// settleTo waits (up to fuzzSettle) for goroutines and descriptors released
// by Close to be gone: a goroutine that has been told to exit may not have
// yet.
func settleTo(t *testing.T, goroutines, fds int) {
	for deadline := time.Now().Add(fuzzSettle); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if runtime.NumGoroutine() <= goroutines && fuzzFDCount(t) <= fds {
			return
		}
	}
	require.LessOrEqual(t, runtime.NumGoroutine(), goroutines, "goroutines leaked")
	require.LessOrEqual(t, fuzzFDCount(t), fds, "file descriptors leaked")
}

func runGuestFuzz(t *testing.T, mem *vring.Memory, in []byte) {
	g := &fuzzGuest{t: t, in: in, vecFDs: map[uint16]*vdpa.EventFD{}}
	g.cfg = decodeFuzzConfig(g.next(), g.next())
	goroutines, fds := runtime.NumGoroutine(), fuzzFDCount(t)

	g.watchdog = time.AfterFunc(fuzzCallTimeout, g.hang)
	g.watchdog.Stop()
	defer g.watchdog.Stop()

	g.f = newFakeBacking()
	g.f.nq = g.cfg.numQueues
	opts := &Options{Memory: mem, MSIXVectors: g.cfg.msixVectors, MaxQueueSize: g.cfg.maxQueue}
	if g.cfg.vectorMode {
		opts.Vector = g.vector
		if g.cfg.intx {
			e, err := vdpa.NewEventFD()
			require.NoError(t, err)
			g.intx = e
			opts.INTx = e
		}
	}
	d, err := NewDevice(g.f, opts)
	require.NoError(t, err)
	g.d = d
	// On a failure below, still release everything (the fuzzer goes on
	// with the next input in the same process). After a panic the device
	// may be locked for good: then give up on it rather than hang.
	t.Cleanup(func() {
		closed := make(chan struct{})
		go func() { _ = d.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(fuzzCallTimeout):
		}
		g.closeFDs()
	})

	// The back-end fails as the input says while the hostile sequence runs.
	g.f.mu.Lock()
	if g.cfg.fault != "" {
		g.f.failOn[g.cfg.fault] = true
	}
	g.f.refuseFOK = g.cfg.refuseFOK
	g.f.mu.Unlock()

	stopReader := g.startReader()
	t.Cleanup(func() { _ = stopReader() })
	for ops := 0; len(g.in) > 0; ops++ {
		g.step()
	}
	require.NoError(t, stopReader(), "concurrent reader")

	g.f.mu.Lock()
	delete(g.f.failOn, g.cfg.fault)
	g.f.refuseFOK = false
	g.f.mu.Unlock()
	g.checkRecovers()

	g.arm(&fuzzCall{what: "Close"})
	require.NoError(t, d.Close())
	g.disarm()
	g.f.mu.Lock()
	st := g.f.status
	g.f.mu.Unlock()
	require.Zero(t, st, "Close leaves the back-end reset")

	// A vCPU may still trap into the device while the VMM tears it down.
	// Such an access must not restart the back-end: Close has released
	// the eventfds it would be given, and nothing would stop it again.
	ops := len(g.f.opsCopy())
	g.closed = true
	g.initSequence(false, false)
	_ = g.writeBAR(ModernBAR, BarOffNotify, 2, 0)
	require.Len(t, g.f.opsCopy(), ops, "back-end operations after Close: %v", g.f.opsCopy()[ops:])
	g.closeFDs()
	settleTo(t, goroutines, fds)
}

// checkRecovers checks that whatever the hostile sequence did, a reset and
// the §3.1.1 initialisation bring the device live with exactly what the
// driver programmed.
func (g *fuzzGuest) checkRecovers() {
	t, d := g.t, g.d
	// §2.4: writing 0 resets the device; every register returns to its
	// reset value (§4.1.4.3.1).
	require.NoError(t, g.write(RegionCommon, OffDeviceStatus, 1, 0))
	r := func(off uint64, size int) uint64 {
		v, err := g.read(RegionCommon, off, size)
		require.NoError(t, err)
		return v
	}
	require.Zero(t, r(OffDeviceStatus, 1), "device_status after reset")
	require.NoError(t, d.Err())
	assert.EqualValues(t, NoVector, r(OffMSIXConfig, 2))
	assert.Zero(t, d.DriverFeatures())
	for q := 0; q < g.cfg.numQueues; q++ {
		require.NoError(t, g.write(RegionCommon, OffQueueSelect, 2, uint64(q)))
		assert.EqualValues(t, d.maxQueue, r(OffQueueSize, 2), "queue %d size", q)
		assert.EqualValues(t, NoVector, r(OffQueueMSIXVector, 2), "queue %d vector", q)
		assert.Zero(t, r(OffQueueEnable, 2), "queue %d enable", q)
		assert.Zero(t, r(OffQueueDesc, 8), "queue %d desc", q)
		assert.Zero(t, r(OffQueueDriver, 8), "queue %d driver", q)
		assert.Zero(t, r(OffQueueDevice, 8), "queue %d device", q)
	}
	isr, err := g.read(RegionISR, 0, 1)
	require.NoError(t, err)
	assert.Zero(t, isr, "ISR after reset")

	// With per-vector irqfds the guest enables MSI-X, as Linux does
	// before it programs vectors, unless the input gave the device a line
	// interrupt: then it leaves MSI-X disabled (pci=nomsi) and every
	// interrupt must take the line (§4.1.5). The hostile sequence may
	// have left the bit either way; a device reset does not touch it.
	msixOn := g.cfg.vectorMode && !g.cfg.intx
	if g.cfg.vectorMode {
		ctl := uint64(0)
		if msixOn {
			ctl = msixCtlEnable
		}
		require.NoError(t, g.write(RegionPCIConfig, capOffMSIX+3, 1, ctl))
	}
	feat, n := g.initSequence(g.cfg.packed, true)
	require.Equal(t, sAck|sDrv|sFOK|sDOK, virtio.Status(r(OffDeviceStatus, 1)), "DRIVER_OK: %v", d.Err())
	require.NoError(t, d.Err())

	// The back-end got exactly what the driver programmed.
	f := g.f
	f.mu.Lock()
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, f.status)
	assert.Equal(t, feat, f.accepted)
	for q := 0; q < g.cfg.numQueues; q++ {
		desc, drv, dev := fuzzRing(q, n, g.cfg.packed)
		assert.EqualValues(t, n, f.num[q], "queue %d size", q)
		assert.Equal(t, vdpa.QueueAddr{Desc: vring.GuestAddr(desc), Avail: vring.GuestAddr(drv), Used: vring.GuestAddr(dev)},
			f.addr[q], "queue %d rings", q)
		assert.Equal(t, vring.InitialState(feat), f.base[q], "queue %d starts fresh", q)
		assert.True(t, f.enabled[q], "queue %d enabled", q)
		assert.Same(t, d.KickFD(q), f.kick[q], "queue %d kick", q)
		call := d.CallFD(q)
		if g.cfg.vectorMode {
			switch v := g.fuzzQueueVector(q); {
			case !msixOn:
				call = g.intx // the line, whatever the vector
			case v == NoVector:
				call = nil // §4.1.5.5: no interrupt for NO_VECTOR
			default:
				call = g.vector(v)
			}
		}
		assert.Same(t, call, f.call[q], "queue %d interrupt", q)
	}
	f.mu.Unlock()

	// §4.1.4.4: a notification reaches the queue's kick eventfd (going
	// live kicked every queue once: drain that first).
	for q := 0; q < g.cfg.numQueues; q++ {
		_, err := d.KickFD(q).TryWait()
		require.NoError(t, err)
		require.NoError(t, g.writeBAR(ModernBAR, BarOffNotify+uint64(q)*NotifyOffMultiplier, 2, uint64(q)))
		k, err := d.KickFD(q).TryWait()
		require.NoError(t, err)
		assert.EqualValues(t, 1, k, "queue %d kick", q)
	}

	// §4.1.4.5: a configuration change sets the ISR bit and raises the
	// configuration vector (msix_config 0).
	cfgFD := d.ConfigFD()
	if g.cfg.vectorMode {
		cfgFD = g.intx
		if msixOn {
			cfgFD = g.vector(0)
		}
	}
	if cfgFD != nil {
		_, err = cfgFD.TryWait()
		require.NoError(t, err)
	}
	f.mu.Lock()
	f.config[6] ^= 1
	f.mu.Unlock()
	g.arm(&fuzzCall{what: "ConfigChanged"})
	d.ConfigChanged()
	g.disarm()
	isr, err = g.read(RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, ISRConfig, isr)
	if cfgFD != nil { // nil: a line interrupt the input did not give
		k, err := cfgFD.TryWait()
		require.NoError(t, err)
		assert.EqualValues(t, 1, k, "configuration interrupt")
	}

	// And a reset stops the back-end.
	require.NoError(t, g.write(RegionCommon, OffDeviceStatus, 1, 0))
	f.mu.Lock()
	assert.Zero(t, f.status, "back-end reset")
	f.mu.Unlock()
}

// fuzzSeed is a named input; fzb builds inputs in FuzzGuestAccess's format.
type fuzzSeed struct {
	name string
	b    fzb
}

type fzb []byte

func fzNew(cfg, backend byte) fzb { return fzb{cfg, backend} }

func (b fzb) op(kind, arg byte, operands ...byte) fzb {
	return append(append(b, kind<<5|arg&0x1f), operands...)
}

func fzValue(v uint64) []byte {
	if v < 0xe0 {
		return []byte{byte(v)}
	}
	return binary.LittleEndian.AppendUint64([]byte{0xe7}, v)
}

func fzSizeOffset(off uint64, size int) []byte {
	n := byte(0xf) // 16: no size has the nibble
	for i, s := range fuzzSizes {
		if s == size {
			n = byte(i)
			break
		}
	}
	if off > 0xffff {
		return binary.LittleEndian.AppendUint64([]byte{n | 0x10}, off)
	}
	return binary.LittleEndian.AppendUint16([]byte{n}, uint16(off))
}

func fzField(off uint64, size int) byte {
	for i, fl := range fuzzFields {
		if fl.off == off && fl.size == size {
			return byte(i)
		}
	}
	panic(fmt.Sprintf("no common field %#x/%d", off, size))
}

func (b fzb) rd(r Region, off uint64, size int) fzb {
	return b.op(fzRead, byte(r), fzSizeOffset(off, size)...)
}

func (b fzb) wr(r Region, off uint64, size int, v uint64) fzb {
	return b.op(fzWrite, byte(r), append(fzSizeOffset(off, size), fzValue(v)...)...)
}

func (b fzb) rdBAR(bar int, off uint64, size int) fzb {
	return b.op(fzReadBAR, byte(bar), fzSizeOffset(off, size)...)
}

func (b fzb) wrBAR(bar int, off uint64, size int, v uint64) fzb {
	return b.op(fzWriteBAR, byte(bar), append(fzSizeOffset(off, size), fzValue(v)...)...)
}

func (b fzb) rf(off uint64, size int) fzb { return b.op(fzReadField, fzField(off, size)) }

func (b fzb) wf(off uint64, size int, v uint64) fzb {
	return b.op(fzWriteField, fzField(off, size), fzValue(v)...)
}

func (b fzb) status(s virtio.Status) fzb { return b.op(fzMacro, fzmStatus, byte(s)) }
func (b fzb) reset() fzb                 { return b.op(fzMacro, fzmReset) }

func (b fzb) init(packed bool) fzb {
	if packed {
		return b.op(fzMacro, fzmInit|8)
	}
	return b.op(fzMacro, fzmInit)
}

func (b fzb) features(sel byte, v uint64) fzb {
	return b.op(fzMacro, fzmFeatures, append([]byte{sel}, fzValue(v)...)...)
}

// queue sets up queue q (q < 4; see macro for other indexes).
func (b fzb) queue(q byte, size, vec uint64, skew byte) fzb {
	ops := append(append([]byte{q}, fzValue(size)...), fzValue(vec)...)
	return b.op(fzMacro, fzmQueue, append(ops, skew)...)
}

func (b fzb) notify(q byte) fzb { return b.op(fzMacro, fzmNotify, q) }

func (b fzb) pciCfg(bar byte, off uint16, length byte, write bool, v uint64) fzb {
	ops := []byte{bar, byte(off), byte(off >> 8), length}
	if write {
		return b.op(fzMacro, fzmPCICfg|8, append(ops, fzValue(v)...)...)
	}
	return b.op(fzMacro, fzmPCICfg, ops...)
}

func (b fzb) msix(entry byte, data uint64, ctrl byte) fzb {
	return b.op(fzMacro, fzmMSIX, append(append([]byte{entry}, fzValue(data)...), ctrl)...)
}

func (b fzb) host(event byte, operands ...byte) fzb { return b.op(fzHost, event, operands...) }

func fzFault(name string) byte {
	for i, f := range fuzzFaults {
		if f == name {
			return byte(i)
		}
	}
	panic("no fault " + name)
}

// fuzzSeeds are the inputs FuzzGuestAccess starts from: correct driver
// sequences to mutate, and the hostile cases the device must survive.
func fuzzSeeds() []fuzzSeed {
	feat := uint64(netFeatures)
	return []fuzzSeed{
		{"init", fzNew(0, 0).init(false).rf(OffDeviceStatus, 1).notify(0).notify(1).rd(RegionISR, 0, 1)},
		{"init-by-fields", fzNew(0, 0).
			wf(OffDeviceStatus, 1, uint64(sAck)).wf(OffDeviceStatus, 1, uint64(sAck|sDrv)).
			wf(OffDeviceFeatureSelect, 4, 0).rf(OffDeviceFeature, 4).wf(OffDeviceFeatureSelect, 4, 1).rf(OffDeviceFeature, 4).
			wf(OffDriverFeatureSelect, 4, 0).wf(OffDriverFeature, 4, feat&0xffffffff).
			wf(OffDriverFeatureSelect, 4, 1).wf(OffDriverFeature, 4, feat>>32).
			wf(OffDeviceStatus, 1, uint64(sAck|sDrv|sFOK)).rf(OffDeviceStatus, 1).
			wf(OffQueueSelect, 2, 0).wf(OffQueueSize, 2, 64).wf(OffQueueMSIXVector, 2, 1).
			wf(OffQueueDesc, 8, 0x10000).wf(OffQueueDriver, 8, 0x10400).wf(OffQueueDevice, 8, 0x18000).
			wf(OffQueueEnable, 2, 1).
			wf(OffDeviceStatus, 1, uint64(sAck|sDrv|sFOK|sDOK)).rf(OffDeviceStatus, 1).rf(OffConfigGeneration, 1)},
		{"reset-mid-init", fzNew(0, 0).status(sAck).status(sAck|sDrv).features(0, feat&0xffffffff).features(1, feat>>32).
			status(sAck|sDrv|sFOK).queue(0, 128, 1, 0).reset().queue(1, 128, 2, 0).status(sAck|sDrv|sFOK|sDOK).
			rf(OffDeviceStatus, 1).reset().init(false).reset()},
		{"queue-select-out-of-range", fzNew(0, 0).status(sAck).status(sAck|sDrv).
			wf(OffQueueSelect, 2, 2).rf(OffQueueSize, 2).wf(OffQueueSize, 2, 7).wf(OffQueueMSIXVector, 2, 5000).
			wf(OffQueueEnable, 2, 1).wf(OffQueueDesc, 8, 0x1234).rf(OffQueueMSIXVector, 2).rf(OffQueueDesc, 8).
			wf(OffQueueSelect, 2, 0xffff).rf(OffQueueNotifyOff, 2).rf(OffQueueEnable, 2).notify(5)},
		{"bad-queue-size-and-early-enable", fzNew(0, 0).status(sAck).status(sAck|sDrv).features(0, feat&0xffffffff).
			features(1, feat>>32).status(sAck|sDrv|sFOK).wf(OffQueueSelect, 2, 0).
			wf(OffQueueSize, 2, 0).wf(OffQueueSize, 2, 3).wf(OffQueueSize, 2, 257).wf(OffQueueSize, 2, 0xffff).
			wf(OffQueueEnable, 2, 1).wf(OffQueueEnable, 2, 0).wf(OffQueueSize, 2, 64).
			status(sAck|sDrv|sFOK|sDOK).rf(OffDeviceStatus, 1).rd(RegionISR, 0, 1)},
		{"hostile-while-live", fzNew(0, 0).init(false).
			wf(OffQueueSelect, 2, 0).wf(OffQueueMSIXVector, 2, 2).wf(OffQueueMSIXVector, 2, 99).
			wf(OffQueueSize, 2, 16).wf(OffQueueDesc, 8, 0x40).wf(OffQueueEnable, 2, 0).
			wf(OffDriverFeatureSelect, 4, 0).wf(OffDriverFeature, 4, 0).
			host(1).host(2).rf(OffConfigGeneration, 1).rd(RegionISR, 0, 1).host(3).rf(OffDeviceStatus, 1).
			status(sAck|sDrv|sFOK|sDOK).status(sAck).status(sF).host(5, 1).reset().init(true)},
		{"backing-fails-vector-irqfds", fzNew(0x03, fzFault("SetQueueAddr(1)")|0x40).init(false).rf(OffDeviceStatus, 1).
			host(5, 0).reset().init(false).host(2)},
		{"backing-refuses-features", fzNew(0xc4, 0x20|fzFault("SetFeatures")).init(false).rf(OffDeviceStatus, 1).
			features(2, 1).status(sAck | sDrv | sFOK)},
		{"pci-cfg-window", fzNew(0, 0).pciCfg(ModernBAR, OffDeviceStatus, 1, true, uint64(sAck)).
			pciCfg(ModernBAR, OffNumQueues, 2, false, 0).pciCfg(MSIXBAR, 12, 4, true, 0).
			pciCfg(ModernBAR, OffQueueDesc+1, 3, false, 0).pciCfg(ModernBAR, BarOffISR, 1, false, 0).
			pciCfg(9, 0, 4, true, 0).wr(RegionPCIConfig, 0x20, 4, 0xffffffff).rd(RegionPCIConfig, 0x20, 4)},
		{"malformed-accesses", fzNew(0, 0).
			rd(0, 0, 1).wr(7, 0, 1, 0).rd(RegionCommon, OffDeviceStatus, 0).wr(RegionCommon, OffQueueSelect, 3, 1).
			rd(RegionCommon, OffQueueDesc+2, 2).wr(RegionCommon, CommonCfgLen, 1, 0).rd(RegionCommon, OffMSIXConfig, 4).
			wr(RegionNotify, 1, 2, 0).wr(RegionNotify, 0, 1, 0).rd(RegionISR, 1, 1).rd(RegionISR, 0, 2).
			rd(RegionDevice, 10, 4).wr(RegionDevice, 0, 8, 0).rd(RegionPCIConfig, 0xfe, 4).wr(RegionPCIConfig, 1, 2, 0).
			rd(RegionMSIX, 4, 8).wr(RegionMSIX, 0xff8, 8, 1).rd(RegionMSIX, 0xfff, 1).
			rdBAR(0, 0, 4).rdBAR(ModernBAR, 0x1800, 1).wrBAR(ModernBAR, BarOffISR, 1, 3).rdBAR(MSIXBAR, 1<<20, 4).
			msix(0, 0x41, 0).msix(200, 0, 1)},
		{"offset-wraps-around", fzNew(0, 0).init(false).
			rd(RegionMSIX, ^uint64(7), 8).wr(RegionPCIConfig, ^uint64(1), 2, 0).rd(RegionDevice, ^uint64(1), 4).
			wr(RegionDevice, ^uint64(0), 1, 0).rd(RegionCommon, ^uint64(7), 8).rdBAR(ModernBAR, ^uint64(0), 1)},
		{"packed-small-max", fzNew(0x10, 0x80).init(true).queue(0, 100, 1, 0x15).host(0).reset().init(true)},
	}
}
