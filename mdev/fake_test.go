package mdev

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

var errInjected = errors.New("injected failure")

// fakeBacking is a vdpa.Device that records what it is told, for asserting
// on exactly what the mediated device programs.
type fakeBacking struct {
	mu        sync.Mutex
	id        virtio.DeviceID
	features  virtio.Features
	accepted  virtio.Features
	status    virtio.Status
	config    []byte
	nq        int
	maxq      uint16
	mem       *vring.Memory
	num       map[int]uint16
	addr      map[int]vdpa.QueueAddr
	base      map[int]vring.QueueState
	kick      map[int]*vdpa.EventFD
	call      map[int]*vdpa.EventFD
	enabled   map[int]bool
	failOn    map[string]bool
	ops       []string
	suspended bool
	refuseFOK bool
}

func newFakeBacking() *fakeBacking {
	return &fakeBacking{
		id: virtio.DeviceNet,
		features: virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx, virtio.FIndirectDesc,
			virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMTU, virtio.FRingPacked, virtio.FLogAll),
		config: []byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0xdc, 0x05},
		nq:     2, maxq: 256,
		failOn: map[string]bool{},
	}
}

func (f *fakeBacking) op(name string) error {
	f.ops = append(f.ops, name)
	if f.failOn[name] {
		return fmt.Errorf("%s: %w", name, errInjected)
	}
	return nil
}

func (f *fakeBacking) opsCopy() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.ops...)
}

func (f *fakeBacking) DeviceID() (virtio.DeviceID, error) { return f.id, nil }
func (f *fakeBacking) Features() (virtio.Features, error) { return f.features, nil }
func (f *fakeBacking) SetFeatures(x virtio.Features) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.op("SetFeatures"); err != nil {
		return err
	}
	if x&^f.features != 0 {
		return errors.New("not a subset")
	}
	f.accepted = x
	return nil
}
func (f *fakeBacking) Status() (virtio.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status, nil
}
func (f *fakeBacking) SetStatus(s virtio.Status) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.op(fmt.Sprintf("SetStatus(%s)", s)); err != nil {
		return err
	}
	if s == 0 {
		f.status = 0
		f.accepted = 0
		f.num, f.addr, f.base = map[int]uint16{}, map[int]vdpa.QueueAddr{}, map[int]vring.QueueState{}
		f.kick, f.call, f.enabled = map[int]*vdpa.EventFD{}, map[int]*vdpa.EventFD{}, map[int]bool{}
		f.suspended = false
		return nil
	}
	if f.refuseFOK {
		s &^= virtio.StatusFeaturesOK
	}
	f.status = s
	return nil
}
func (f *fakeBacking) ConfigSize() (int, error) { return len(f.config), nil }
func (f *fakeBacking) ReadConfig(off int, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off < 0 || off+len(p) > len(f.config) {
		return errors.New("config out of range")
	}
	copy(p, f.config[off:])
	return nil
}
func (f *fakeBacking) WriteConfig(off int, p []byte) error { return nil }
func (f *fakeBacking) setConfig(off int, p []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	copy(f.config[off:], p)
}
func (f *fakeBacking) NumQueues() (int, error)       { return f.nq, nil }
func (f *fakeBacking) MaxQueueSize() (uint16, error) { return f.maxq, nil }
func (f *fakeBacking) SetMemory(m *vring.Memory) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mem = m
	return f.op("SetMemory")
}
func (f *fakeBacking) SetQueueNum(q int, n uint16) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.num[q] = n
	return f.op(fmt.Sprintf("SetQueueNum(%d)", q))
}
func (f *fakeBacking) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.addr[q] = a
	return f.op(fmt.Sprintf("SetQueueAddr(%d)", q))
}
func (f *fakeBacking) SetQueueBase(q int, st vring.QueueState) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.base[q] = st
	return f.op(fmt.Sprintf("SetQueueBase(%d)", q))
}
func (f *fakeBacking) QueueBase(q int) (vring.QueueState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.base[q], f.op(fmt.Sprintf("QueueBase(%d)", q))
}
func (f *fakeBacking) SetQueueKick(q int, e *vdpa.EventFD) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kick[q] = e
	return f.op(fmt.Sprintf("SetQueueKick(%d)", q))
}
func (f *fakeBacking) SetQueueCall(q int, e *vdpa.EventFD) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.call[q] = e
	return f.op(fmt.Sprintf("SetQueueCall(%d)", q))
}
func (f *fakeBacking) EnableQueue(q int, en bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.enabled[q] = en
	return f.op(fmt.Sprintf("EnableQueue(%d)", q))
}
func (f *fakeBacking) Close() error { return nil }
func (f *fakeBacking) Suspend() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.suspended = true
	return f.op("Suspend")
}
func (f *fakeBacking) Resume() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.suspended = false
	return f.op("Resume")
}

var _ vdpa.Suspender = (*fakeBacking)(nil)

// testMemory returns 1 MiB of guest memory at guest address 0.
func testMemory(t testing.TB) *vring.Memory {
	t.Helper()
	r, err := vring.NewMemfdRegion(0, 1<<20, nil)
	require.NoError(t, err)
	m, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func newTestDevice(t testing.TB, f *fakeBacking, opts *Options) *Device {
	t.Helper()
	if opts == nil {
		opts = &Options{}
	}
	if opts.Memory == nil {
		opts.Memory = testMemory(t)
	}
	d, err := NewDevice(f, opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// driver performs the guest driver's side of register accesses.
type driver struct {
	t testing.TB
	d *Device
}

func (g driver) r(off uint64, size int) uint64 {
	g.t.Helper()
	v, err := g.d.Read(RegionCommon, off, size)
	require.NoError(g.t, err)
	return v
}

func (g driver) w(off uint64, size int, v uint64) {
	g.t.Helper()
	require.NoError(g.t, g.d.Write(RegionCommon, off, size, v))
}

func (g driver) status() virtio.Status     { return virtio.Status(g.r(OffDeviceStatus, 1)) }
func (g driver) setStatus(s virtio.Status) { g.w(OffDeviceStatus, 1, uint64(s)) }

func (g driver) writeFeatures(f virtio.Features) {
	g.w(OffDriverFeatureSelect, 4, 0)
	g.w(OffDriverFeature, 4, uint64(f)&0xffffffff)
	g.w(OffDriverFeatureSelect, 4, 1)
	g.w(OffDriverFeature, 4, uint64(f)>>32)
}

func (g driver) readFeatures() virtio.Features {
	g.w(OffDeviceFeatureSelect, 4, 0)
	lo := g.r(OffDeviceFeature, 4)
	g.w(OffDeviceFeatureSelect, 4, 1)
	hi := g.r(OffDeviceFeature, 4)
	return virtio.Features(hi<<32 | lo)
}

// ringAddrs is a valid ring layout for queue q of size n in test memory.
func ringAddrs(q int, n uint16) (desc, drv, dev uint64) {
	base := uint64(0x10000 * (q + 1))
	return base, base + 16*uint64(n), base + 0x8000
}

func (g driver) setupQueue(q int, n uint16, vector uint16) {
	g.w(OffQueueSelect, 2, uint64(q))
	g.w(OffQueueSize, 2, uint64(n))
	g.w(OffQueueMSIXVector, 2, uint64(vector))
	desc, drv, dev := ringAddrs(q, n)
	for _, a := range []struct {
		off uint64
		v   uint64
	}{{OffQueueDesc, desc}, {OffQueueDriver, drv}, {OffQueueDevice, dev}} {
		g.w(a.off, 4, a.v&0xffffffff)
		g.w(a.off+4, 4, a.v>>32)
	}
	g.w(OffQueueEnable, 2, 1)
}

// bringUp runs the §3.1.1 initialization sequence with both queues.
func (g driver) bringUp(f virtio.Features) {
	g.setStatus(virtio.StatusAcknowledge)
	g.setStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	g.writeFeatures(f)
	g.setStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	require.NotZero(g.t, g.status()&virtio.StatusFeaturesOK, "FEATURES_OK refused")
	for q := 0; q < g.d.NumQueues(); q++ {
		g.setupQueue(q, 128, uint16(q+1))
	}
	g.setStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK)
}

var netFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx, virtio.NetFMAC)

type eventfdT = vdpa.EventFD

func mustEventFD(t testing.TB) *vdpa.EventFD {
	t.Helper()
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e
}

func isErr(err, target error) bool { return errors.Is(err, target) }

func stateAt(avail, used uint16) vring.QueueState {
	return vring.QueueState{NextAvail: avail, NextUsed: used}
}
