package vhostuser

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/bits"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const testQueueSize = 256

// testDriver is the guest side of one front-end session: memory, driver
// queues and eventfds.
type testDriver struct {
	t        *testing.T
	fe       *Frontend
	mem      *vring.Memory
	layouts  [2]vring.Layout
	dqs      [2]*vring.DriverQueue
	kicks    [2]*vdpa.EventFD
	calls    [2]*vdpa.EventFD
	bufBase  vring.GuestAddr
	features virtio.Features
	hdrLen   int
	nextBuf  vring.GuestAddr
}

const bufSize = 4096 // one page each, so dirty-log checks can tell buffers apart

// startBackend serves a nethandler over one end of a socketpair and
// returns the other end and a channel with ServeConn's result.
func startBackend(t *testing.T, h vdpa.Handler, opts *BackendOptions) (*Backend, *net.UnixConn, <-chan error) {
	t.Helper()
	a, b := socketpair(t)
	be := NewBackend(h, opts)
	done := make(chan error, 1)
	finished := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Error("ServeConn did not return")
		}
	})
	go func() { done <- be.ServeConn(ctx, b); close(finished) }()
	return be, a, done
}

func newTestDriver(t *testing.T, uc *net.UnixConn, want virtio.Features) *testDriver {
	t.Helper()
	reg, err := vring.NewMemfdRegion(0x100000, 4<<20, nil)
	require.NoError(t, err)
	return newTestDriverOn(t, uc, want, reg)
}

// newTestDriverOn connects a front-end over uc, negotiates want, hands it
// guest memory made of reg (which must start at 0x100000 and hold 4 MiB) and
// the extra regions, and sets up the two driver rings at the start of reg.
func newTestDriverOn(t *testing.T, uc *net.UnixConn, want virtio.Features, reg *vring.Region, extra ...*vring.Region) *testDriver {
	t.Helper()
	return newTestDriverOpts(t, uc, want, nil, reg, extra...)
}

// newTestDriverOpts is newTestDriverOn with the Frontend's options.
func newTestDriverOpts(t *testing.T, uc *net.UnixConn, want virtio.Features, opts *FrontendOptions, reg *vring.Region, extra ...*vring.Region) *testDriver {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fe, err := NewFrontend(ctx, uc, opts)
	require.NoError(t, err)
	t.Cleanup(func() { fe.Close() })
	d := &testDriver{t: t, fe: fe}

	d.mem, err = vring.NewMemory(append([]*vring.Region{reg}, extra...)...)
	require.NoError(t, err)
	t.Cleanup(func() { d.mem.Close() })

	offered, err := fe.Features()
	require.NoError(t, err)
	d.features = offered & want
	d.hdrLen = virtio.NetHdrLen(d.features)
	require.NoError(t, fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver))
	require.NoError(t, fe.SetFeatures(d.features))
	require.NoError(t, fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	require.NoError(t, fe.SetMemory(d.mem))
	ringBytes := vring.ContiguousLayoutBytes(testQueueSize)
	for q := 0; q < 2; q++ {
		base := vring.GuestAddr(0x100000 + uint64(q)*((ringBytes+4095)&^4095))
		d.layouts[q] = vring.ContiguousLayout(base, testQueueSize)
		d.dqs[q], err = vring.NewDriverQueue(d.mem, vring.DriverQueueOptions{Index: q, Layout: d.layouts[q], Features: d.features})
		require.NoError(t, err)
		d.kicks[q], err = vdpa.NewEventFD()
		require.NoError(t, err)
		d.calls[q], err = vdpa.NewEventFD()
		require.NoError(t, err)
		k, c := d.kicks[q], d.calls[q]
		t.Cleanup(func() { k.Close(); c.Close() })
		d.bufBase = base + vring.GuestAddr((ringBytes+4095)&^4095)
	}
	d.nextBuf = d.bufBase
	return d
}

// startQueue configures and starts queue q in the spec's order.
func (d *testDriver) startQueue(q int) {
	t, fe := d.t, d.fe
	l := d.layouts[q]
	require.NoError(t, fe.SetQueueNum(q, l.Size))
	require.NoError(t, fe.SetQueueAddr(q, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}))
	require.NoError(t, fe.SetQueueBase(q, vring.InitialState(d.features)))
	require.NoError(t, fe.SetQueueCall(q, d.calls[q]))
	require.NoError(t, fe.SetQueueKick(q, d.kicks[q]))
	require.NoError(t, fe.EnableQueue(q, true))
}

func (d *testDriver) alloc() vring.GuestAddr {
	a := d.nextBuf
	d.nextBuf += bufSize
	return a
}

// postRx adds n writable receive buffers.
func (d *testDriver) postRx(n int) []vring.GuestAddr {
	var out []vring.GuestAddr
	for i := 0; i < n; i++ {
		a := d.alloc()
		_, err := d.dqs[0].Add([]vring.Buffer{{Addr: a, Len: bufSize, Writable: true}})
		require.NoError(d.t, err)
		out = append(out, a)
	}
	d.dqs[0].Publish()
	require.NoError(d.t, d.kicks[0].Signal())
	return out
}

// send transmits one frame from a fresh buffer.
func (d *testDriver) send(frame []byte) {
	a := d.alloc()
	b := make([]byte, d.hdrLen+len(frame))
	copy(b[d.hdrLen:], frame)
	require.NoError(d.t, d.mem.Write(a, b))
	_, err := d.dqs[1].Add([]vring.Buffer{{Addr: a, Len: uint32(len(b))}})
	require.NoError(d.t, err)
	d.dqs[1].Publish()
	require.NoError(d.t, d.kicks[1].Signal())
}

// reclaim waits on queue q's call eventfd until n used entries came back.
func (d *testDriver) reclaim(q, n int) [][2]uint32 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got [][2]uint32
	for len(got) < n {
		head, length, ok, err := d.dqs[q].Reclaim()
		require.NoError(d.t, err)
		if ok {
			got = append(got, [2]uint32{uint32(head), length})
			continue
		}
		_, err = d.calls[q].Wait(ctx)
		require.NoError(d.t, err, "waiting for %d used entries on queue %d, have %d", n, q, len(got))
	}
	return got
}

// ringFormats runs fn for split rings and for packed rings: want is the
// handler's features without or with RING_PACKED.
func ringFormats(t *testing.T, offered virtio.Features, fn func(t *testing.T, want virtio.Features)) {
	t.Run("split", func(t *testing.T) { fn(t, offered&^virtio.FRingPacked.Bit()) })
	t.Run("packed", func(t *testing.T) { fn(t, offered.With(virtio.FRingPacked)) })
}

// positionAfter is a queue position (vring.QueueState's field encoding)
// after n one-descriptor chains from a fresh ring of size testQueueSize:
// the free-running index for a split ring; for a packed ring the index
// n mod size with the wrap counter, which starts at 1 and flips per lap.
func positionAfter(f virtio.Features, n int) uint16 {
	if f.Has(virtio.FRingPacked) {
		return vring.PackedIndex(uint16(n%testQueueSize), (n/testQueueSize)%2 == 0)
	}
	return uint16(n)
}

func TestBackendFrontendLoopback(t *testing.T) {
	ringFormats(t, vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(), testBackendFrontendLoopback)
}

func testBackendFrontendLoopback(t *testing.T, want virtio.Features) {
	h := vhostusertest.New(vhostusertest.Loopback, [6]byte{2, 0, 0, 0, 0, 1})
	be, uc, _ := startBackend(t, h, nil)
	d := newTestDriver(t, uc, want)
	require.Equal(t, want.Has(virtio.FRingPacked), d.dqs[0].Packed())
	require.Equal(t, SupportedProtocolFeatures&^(1<<PFConfigureMemSlots), d.fe.ProtocolFeatures(), "all but CONFIGURE_MEM_SLOTS (the Frontend sends whole tables)")
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, d.fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))

	st, err := d.fe.Status()
	require.NoError(t, err)
	assert.Equal(t, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK, st)
	info := be.Info()
	assert.Equal(t, 2, info.RunningQueues)
	assert.Equal(t, d.features.With(virtio.FProtocolFeat), info.Features)

	rxBufs := d.postRx(8)
	const frames = 5
	for i := 0; i < frames; i++ {
		f := make([]byte, 60+i)
		f[0], f[59] = byte(i), 0xab
		d.send(f)
	}
	tx := d.reclaim(1, frames)
	assert.Len(t, tx, frames)
	rx := d.reclaim(0, frames)
	for i, u := range rx {
		assert.Equal(t, uint32(d.hdrLen+60+i), u[1], "rx %d length", i)
		b := make([]byte, u[1])
		require.NoError(t, d.mem.Read(rxBufs[u[0]], b))
		assert.Equal(t, byte(i), b[d.hdrLen], "frame %d first byte", i)
		assert.Equal(t, byte(0xab), b[d.hdrLen+59])
		if d.hdrLen == 12 {
			assert.Equal(t, uint16(1), binary.LittleEndian.Uint16(b[10:]), "num_buffers")
		}
	}
	c := h.Counters()
	assert.Equal(t, uint64(frames), c.TxFrames)
	assert.Equal(t, uint64(frames), c.RxFrames)

	// GET_VRING_BASE stops the ring and reports the next avail index.
	qs, err := d.fe.QueueBase(1)
	require.NoError(t, err)
	pos := positionAfter(d.features, frames)
	assert.Equal(t, vring.QueueState{NextAvail: pos, NextUsed: pos}, qs)
	assert.Equal(t, 1, be.Info().RunningQueues)
}

func TestBackendConfig(t *testing.T) {
	mac := [6]byte{2, 1, 2, 3, 4, 5}
	h := vhostusertest.New(vhostusertest.Sink, mac)
	_, uc, _ := startBackend(t, h, nil)
	d := newTestDriver(t, uc, h.Features())
	p := make([]byte, 6)
	require.NoError(t, d.fe.ReadConfig(virtio.NetCfgMAC, p))
	assert.Equal(t, mac[:], p)
	s := make([]byte, 2)
	require.NoError(t, d.fe.ReadConfig(virtio.NetCfgStatus, s))
	assert.Equal(t, virtio.NetSLinkUp, binary.LittleEndian.Uint16(s))
	// Reads past the config space fail with an empty reply (spec).
	err := d.fe.ReadConfig(200, make([]byte, 8))
	assert.ErrorIs(t, err, ErrReplyFailed)
	// The session survives a failed config read.
	require.NoError(t, d.fe.ReadConfig(0, p))
}

func TestBackendSuspendResume(t *testing.T) {
	ringFormats(t, vhostusertest.New(vhostusertest.Sink, [6]byte{}).Features(), testBackendSuspendResume)
}

func testBackendSuspendResume(t *testing.T, want virtio.Features) {
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	be, uc, _ := startBackend(t, h, nil)
	d := newTestDriver(t, uc, want)
	d.startQueue(0)
	d.startQueue(1)
	d.send(make([]byte, 64))
	d.reclaim(1, 1)
	require.NoError(t, d.fe.Suspend())
	assert.Equal(t, 0, be.Info().RunningQueues)
	st, err := d.fe.QueueBase(1)
	require.NoError(t, err)
	pos := positionAfter(d.features, 1)
	assert.Equal(t, vring.QueueState{NextAvail: pos, NextUsed: pos}, st)
	require.NoError(t, d.fe.Resume())
	assert.Equal(t, 2, be.Info().RunningQueues)
	d.send(make([]byte, 64))
	d.reclaim(1, 1)
	assert.Equal(t, uint64(2), h.Counters().TxFrames)
}

func TestBackendDirtyLog(t *testing.T) {
	ringFormats(t, vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(), testBackendDirtyLog)
}

func testBackendDirtyLog(t *testing.T, want virtio.Features) {
	h := vhostusertest.New(vhostusertest.Loopback, [6]byte{})
	_, uc, _ := startBackend(t, h, nil)
	d := newTestDriver(t, uc, want.With(virtio.FLogAll))
	bm, err := dirty.New(8<<20, &dirty.Options{Shared: true})
	require.NoError(t, err)
	t.Cleanup(func() { bm.Close() })
	require.NoError(t, d.fe.SetLog(bm))
	d.startQueue(0)
	d.startQueue(1)
	rx := d.postRx(1)
	d.send(make([]byte, 100))
	d.reclaim(0, 1)
	// The device wrote the receive buffer and both used rings (a packed
	// ring's used descriptors: in its descriptor ring): all logged.
	page := func(a vring.GuestAddr) uint64 { return uint64(a) / dirty.DefaultPageSize }
	assert.True(t, bm.PageDirty(page(rx[0])), "rx buffer page")
	if d.features.Has(virtio.FRingPacked) {
		assert.True(t, bm.PageDirty(page(d.layouts[0].Desc)), "rx descriptor ring page")
		assert.True(t, bm.PageDirty(page(d.layouts[1].Desc)), "tx descriptor ring page")
	} else {
		assert.True(t, bm.PageDirty(page(d.layouts[0].Used)), "rx used ring page")
		assert.True(t, bm.PageDirty(page(d.layouts[1].Used)), "tx used ring page")
	}
	assert.False(t, bm.PageDirty(page(d.bufBase+vring.GuestAddr(bufSize))), "tx buffer page is only read")
}

// TestBackendDirtyLogBeforeLogBase: with LOG_ALL negotiated, rings that
// run before SET_LOG_BASE arrives (QEMU's order when it attaches a back-end
// during a migration) still get every write into the log the front-end
// sends later. Turning LOG_ALL off first forgets those writes.
func TestBackendDirtyLogBeforeLogBase(t *testing.T) {
	page := func(a vring.GuestAddr) uint64 { return uint64(a) / dirty.DefaultPageSize }
	for _, tc := range []struct {
		name       string
		logAllOff  bool // SET_FEATURES without LOG_ALL before the log arrives
		wantLogged bool
	}{
		{"log arrives after traffic", false, true},
		{"LOG_ALL turned off before the log", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ringFormats(t, vhostusertest.New(vhostusertest.Loopback, [6]byte{}).Features(), func(t *testing.T, want virtio.Features) {
				h := vhostusertest.New(vhostusertest.Loopback, [6]byte{})
				_, uc, _ := startBackend(t, h, nil)
				d := newTestDriver(t, uc, want.With(virtio.FLogAll))
				require.True(t, d.features.Has(virtio.FLogAll))
				// Where the device's used-ring writes land: the used ring, or
				// a packed ring's descriptor ring.
				usedPage := func(q int) uint64 {
					if d.features.Has(virtio.FRingPacked) {
						return page(d.layouts[q].Desc)
					}
					return page(d.layouts[q].Used)
				}
				d.startQueue(0)
				d.startQueue(1)
				rx := d.postRx(2)
				d.send(make([]byte, 100))
				d.reclaim(1, 1)
				d.reclaim(0, 1)
				if tc.logAllOff {
					require.NoError(t, d.fe.SetFeatures(d.features&^virtio.FLogAll.Bit()))
					require.NoError(t, d.fe.SetFeatures(d.features))
				}
				bm, err := dirty.New(8<<20, &dirty.Options{Shared: true})
				require.NoError(t, err)
				t.Cleanup(func() { bm.Close() })
				require.NoError(t, d.fe.SetLog(bm))
				// Written before the log existed.
				assert.Equal(t, tc.wantLogged, bm.PageDirty(page(rx[0])), "rx buffer written before SET_LOG_BASE")
				if tc.wantLogged {
					// (Restarting a ring writes its used ring, so these are
					// dirty in the other case too.)
					assert.True(t, bm.PageDirty(usedPage(0)), "rx used ring")
					assert.True(t, bm.PageDirty(usedPage(1)), "tx used ring")
				}
				assert.False(t, bm.PageDirty(page(d.bufBase+vring.GuestAddr(2*bufSize))), "tx buffer page is only read")
				// Written after: in the log directly.
				require.NoError(t, bm.Clear())
				d.send(make([]byte, 100))
				d.reclaim(1, 1)
				d.reclaim(0, 1)
				assert.True(t, bm.PageDirty(page(rx[1])), "rx buffer written after SET_LOG_BASE")
				assert.True(t, bm.PageDirty(usedPage(0)), "rx used ring after SET_LOG_BASE")
			})
		})
	}
}

// TestBackendPendingLogForAFarRegion: a memory table with a region at a
// high guest address makes the pending dirty log (LOG_ALL before
// SET_LOG_BASE) span all of it: 512 MiB of bitmap for a region at 16 TiB
// (less where dirty.MemoryLimit is lower, as in the 1 GiB vmtest VM).
// Merging it into the front-end's log must cost what the rings wrote, not
// the span: it used to copy the whole bitmap into a fresh slice first (an
// allocation of the span's size, a quarter of RAM at the cap, for any
// front-end to ask for). A log that does not reach the pages the rings
// wrote is refused; one that covers them need not cover the far region.
func TestBackendPendingLogForAFarRegion(t *testing.T) {
	pendingBytes := uint64(1) << (bits.Len64(min(512<<20, dirty.MemoryLimit()/2)) - 1)
	farGPA := vring.GuestAddr(pendingBytes * 8 * dirty.DefaultPageSize)
	allocBound, rssBound := min(16<<20, pendingBytes/8), min(64<<20, pendingBytes/2)
	t.Logf("pending log %d MiB (region at %#x); bounds: %d MiB allocated, %d MiB resident", pendingBytes>>20, uint64(farGPA), allocBound>>20, rssBound>>20)
	page := func(a vring.GuestAddr) uint64 { return uint64(a) / dirty.DefaultPageSize }
	for _, tc := range []struct {
		name    string
		logSpan uint64
		wantErr bool
	}{
		{"log covering low memory only", 8 << 20, false},
		{"log ending below the pages written", 0x100000, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := vhostusertest.New(vhostusertest.Loopback, [6]byte{})
			_, uc, done := startBackend(t, h, nil)
			reg, err := vring.NewMemfdRegion(0x100000, 4<<20, nil)
			require.NoError(t, err)
			far, err := vring.NewMemfdRegion(farGPA, 1<<20, nil)
			require.NoError(t, err)
			d := newTestDriverOn(t, uc, h.Features().With(virtio.FLogAll), reg, far)
			require.True(t, d.features.Has(virtio.FLogAll))
			d.startQueue(0)
			d.startQueue(1)
			rx := d.postRx(1)
			d.send(make([]byte, 100))
			d.reclaim(1, 1)
			d.reclaim(0, 1)

			bm, err := dirty.New(tc.logSpan, &dirty.Options{Shared: true})
			require.NoError(t, err)
			t.Cleanup(func() { bm.Close() })
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			rss0 := vmRSS(t)
			err = d.fe.SetLog(bm)
			runtime.ReadMemStats(&after)
			assert.Less(t, after.TotalAlloc-before.TotalAlloc, allocBound, "bytes allocated by SET_LOG_BASE's merge")
			assert.Less(t, int64(vmRSS(t))-int64(rss0), int64(rssBound), "resident memory added by SET_LOG_BASE's merge")
			if tc.wantErr {
				require.Error(t, err)
				select {
				case serr := <-done:
					require.ErrorIs(t, serr, ErrProtocol)
					assert.Contains(t, serr.Error(), "does not cover pages the rings wrote")
				case <-time.After(10 * time.Second):
					t.Fatal("the session did not end")
				}
				return
			}
			require.NoError(t, err)
			assert.True(t, bm.PageDirty(page(rx[0])), "rx buffer written before SET_LOG_BASE")
			used := d.layouts[0].Used
			if d.features.Has(virtio.FRingPacked) {
				used = d.layouts[0].Desc // a packed ring's used descriptors
			}
			assert.True(t, bm.PageDirty(page(used)), "rx used ring")
		})
	}
}

// vmRSS is the process's resident memory in bytes.
func vmRSS(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	require.NoError(t, err)
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// TestBackendMaxGuestMemory: a memory table whose regions add up to more
// than BackendOptions.MaxGuestMemory is refused before anything is mapped
// (ErrBadRegion, the session ends, no mapping or descriptor is left); one
// at the bound is served.
func TestBackendMaxGuestMemory(t *testing.T) {
	const limit = 5 << 20
	for _, tc := range []struct {
		name  string
		extra uint64 // bytes of a second region beside the driver's 4 MiB
		want  error
	}{
		{"at the bound", 1 << 20, nil},
		{"a page beyond", 1<<20 + 4096, ErrBadRegion},
		{"far beyond", 1 << 30, ErrBadRegion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := openFdSet(t)
			h := vhostusertest.New(vhostusertest.Loopback, [6]byte{})
			a, b := socketpair(t)
			done := make(chan error, 1)
			go func() {
				done <- NewBackend(h, &BackendOptions{MaxGuestMemory: limit}).ServeConn(context.Background(), b)
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			fe, err := NewFrontend(ctx, a, nil)
			require.NoError(t, err)
			reg, err := vring.NewMemfdRegion(0x100000, 4<<20, nil)
			require.NoError(t, err)
			far, err := vring.NewMemfdRegion(1<<32, tc.extra, nil)
			require.NoError(t, err)
			mem, err := vring.NewMemory(reg, far)
			require.NoError(t, err)
			err = fe.SetMemory(mem)
			require.NoError(t, mem.Close())
			if tc.want == nil {
				require.NoError(t, err)
				_, err = fe.Features() // the session goes on
				require.NoError(t, err)
				require.NoError(t, fe.Close())
				require.NoError(t, <-done)
			} else {
				require.Error(t, err)
				select {
				case serr := <-done:
					require.ErrorIs(t, serr, tc.want)
					assert.Contains(t, serr.Error(), "MaxGuestMemory")
				case <-time.After(10 * time.Second):
					t.Fatal("the session did not end")
				}
				_ = fe.Close()
			}
			assert.Empty(t, leakedSince(t, before), "descriptors leaked")
		})
	}
}

// TestBackendReconnect: the back-end in client mode reconnects after the
// front-end goes away and serves the next one.
func TestBackendReconnect(t *testing.T) {
	path := t.TempDir() + "/vu.sock"
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	defer l.Close()
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	be := NewBackend(h, &BackendOptions{ReconnectInterval: 10 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- be.DialAndServe(ctx, path) }()
	for round := 0; round < 2; round++ {
		uc, err := l.AcceptUnix()
		require.NoError(t, err)
		d := newTestDriver(t, uc, h.Features())
		d.startQueue(1)
		d.send(make([]byte, 64))
		d.reclaim(1, 1)
		require.NoError(t, d.fe.Close())
	}
	assert.Equal(t, uint64(2), h.Counters().TxFrames)
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled)
	assert.GreaterOrEqual(t, be.Info().Sessions, 2)
}

// TestBackendServerMode: ListenAndServe accepts a front-end, and a second
// one after the first disconnects.
func TestBackendServerMode(t *testing.T) {
	path := t.TempDir() + "/vu.sock"
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	be := NewBackend(h, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- be.ListenAndServe(ctx, path) }()
	for round := 0; round < 2; round++ {
		var fe *Frontend
		require.Eventually(t, func() bool {
			var err error
			fe, err = Dial(ctx, path, nil)
			return err == nil
		}, 5*time.Second, 5*time.Millisecond)
		f, err := fe.Features()
		require.NoError(t, err)
		assert.True(t, f.Has(virtio.FVersion1))
		require.NoError(t, fe.Close())
	}
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled)
}

// badInput runs one hostile exchange against a fresh back-end session and
// checks the session ends with the typed error, the connection is closed,
// and no descriptor leaked.
func TestBackendBadInput(t *testing.T) {
	memfd := func(t *testing.T, size int64) int {
		fd, err := unix.MemfdCreate("t", unix.MFD_CLOEXEC)
		require.NoError(t, err)
		require.NoError(t, unix.Ftruncate(fd, size))
		return fd
	}
	type step struct {
		msg []byte
		fds func(t *testing.T) []int
	}
	m := func(r Request, p []byte) []byte { return rawMsg(r, Version, uint32(len(p)), p) }
	setup := []step{
		{msg: m(ReqSetOwner, nil)},
		{msg: m(ReqSetFeatures, u64p(uint64(virtio.Features(0).With(virtio.FVersion1, virtio.FProtocolFeat))))},
		{msg: m(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: 0x7f0000000000}})),
			fds: func(t *testing.T) []int { return []int{memfd(t, 1<<20)} }},
		{msg: m(ReqSetVringNum, VringState{Index: 1, Num: 256}.Encode())},
	}
	tests := []struct {
		name  string
		steps []step
		want  error
	}{
		{"truncated header", []step{{msg: []byte{1, 0, 0}}}, ErrTruncated},
		{"size above the cap", []step{{msg: rawMsg(ReqSetMemTable, Version, 1<<16, nil)}}, ErrPayloadTooLarge},
		{"bad version", []step{{msg: rawMsg(ReqGetFeatures, 3, 0, nil)}}, ErrBadVersion},
		{"SET_MEM_TABLE missing fd", []step{{msg: m(ReqSetMemTable, memTablePayload(2, 2)),
			fds: func(t *testing.T) []int { return []int{memfd(t, 1<<21)} }}}, ErrFdCount},
		{"too many fds", []step{{msg: m(ReqSetVringKick, u64p(0)),
			fds: func(t *testing.T) []int { return pipeFds(t, 3) }}}, ErrFdCount},
		{"call descriptor a pipe, not an eventfd", []step{{msg: m(ReqSetVringCall, u64p(0)),
			fds: func(t *testing.T) []int { return pipeFds(t, 1) }}}, vdpa.ErrNotEventFD},
		{"kick descriptor a memfd, not an eventfd", []step{{msg: m(ReqSetVringKick, u64p(1)),
			fds: func(t *testing.T) []int { return []int{memfd(t, 4096)} }}}, vdpa.ErrNotEventFD},
		{"fd on a request without fds", []step{{msg: m(ReqSetOwner, nil),
			fds: func(t *testing.T) []int { return pipeFds(t, 1) }}}, ErrFdCount},
		{"unknown request", []step{{msg: m(99, nil), fds: func(t *testing.T) []int { return pipeFds(t, 2) }}}, ErrUnknownRequest},
		{"nregions > 8", []step{{msg: m(ReqSetMemTable, memTablePayload(9, 8)),
			fds: func(t *testing.T) []int { return pipeFds(t, 8) }}}, ErrTooManyRegions},
		{"region larger than its file", []step{{msg: m(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{MemorySize: 1 << 21, UserspaceAddr: 0x1000}})),
			fds: func(t *testing.T) []int { return []int{memfd(t, 1<<20)} }}}, ErrBadRegion},
		{"regions beyond DefaultMaxGuestMemory (sparse files)", []step{{msg: m(ReqSetMemTable, EncodeMemTable([]MemoryRegion{
			{GuestPhysAddr: 0, MemorySize: 12 << 40, UserspaceAddr: 0x1000},
			{GuestPhysAddr: 12 << 40, MemorySize: 5 << 40, UserspaceAddr: 0x1000 + 12<<40}})),
			fds: func(t *testing.T) []int { return []int{memfd(t, 12<<40), memfd(t, 5<<40)} }}}, ErrBadRegion},
		{"region fd not a file", []step{{msg: m(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{MemorySize: 4096, UserspaceAddr: 0x1000}})),
			fds: func(t *testing.T) []int { return pipeFds(t, 1) }}}, ErrBadRegion},
		{"ring addr outside memory", append(append([]step{}, setup...),
			step{msg: m(ReqSetVringAddr, VringAddr{Index: 1, Desc: 0x7f0000000000, Avail: 0x7f0000001000, Used: 0x6000000}.Encode())}), ErrAddrNotMapped},
		{"ring straddling the end of memory", append(append([]step{}, setup...),
			step{msg: m(ReqSetVringAddr, VringAddr{Index: 1, Desc: 0x7f0000000000 + 1<<20 - 16, Avail: 0x7f0000001000, Used: 0x7f0000002000}.Encode())}), ErrAddrNotMapped},
		{"queue index beyond the device", []step{{msg: m(ReqSetVringNum, VringState{Index: 7, Num: 256}.Encode())}}, ErrBadQueue},
		{"queue size not a power of two", []step{{msg: m(ReqSetVringNum, VringState{Index: 0, Num: 100}.Encode())}}, ErrBadQueue},
		{"features not offered", []step{{msg: m(ReqSetFeatures, u64p(1<<virtio.FRingReset))}}, ErrProtocol},
		{"protocol features not offered", []step{{msg: m(ReqSetProtocolFeatures, u64p(1<<PFInbandNotifications))}}, ErrProtocol},
		{"SET_STATUS without the STATUS feature", []step{{msg: m(ReqSetStatus, u64p(1))}}, ErrUnsupported},
		{"log descriptor a device node, not a file", []step{
			{msg: m(ReqSetProtocolFeatures, u64p(uint64(ProtocolFeatures(0).With(PFLogShmfd))))},
			{msg: m(ReqSetLogBase, Log{MmapSize: 4096}.Encode()), fds: func(t *testing.T) []int {
				// Maps fine, but no size can be checked nor sealed.
				fd, err := unix.Open("/dev/zero", unix.O_RDWR|unix.O_CLOEXEC, 0)
				require.NoError(t, err)
				return []int{fd}
			}}}, ErrBadRegion},
		{"close inside the payload", []step{{msg: rawMsg(ReqSetVringAddr, Version, 40, make([]byte, 20))}}, ErrTruncated},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := openFdSet(t)
			h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
			a, b := socketpair(t)
			done := make(chan error, 1)
			go func() { done <- NewBackend(h, nil).ServeConn(context.Background(), b) }()
			// Sessions start with SET_OWNER, as QEMU's and DPDK's do.
			sendRaw(t, a, m(ReqSetOwner, nil), nil)
			for _, s := range tc.steps {
				var fds []int
				if s.fds != nil {
					fds = s.fds(t)
				}
				sendRaw(t, a, s.msg, fds)
				closeFds(fds)
			}
			if errors.Is(tc.want, ErrTruncated) {
				require.NoError(t, a.CloseWrite())
			}
			var err error
			select {
			case err = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("back-end did not end the session")
			}
			require.Error(t, err)
			assert.ErrorIs(t, err, tc.want)
			// The back-end closed its end: we read EOF.
			_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, rerr := io.ReadAll(a)
			assert.NoError(t, rerr)
			require.NoError(t, a.Close())
			_ = b.Close() // already closed by the back-end
			assert.Empty(t, leakedSince(t, before), "descriptors leaked")
		})
	}
}

// TestBackendReplyAckFailure: with REPLY_ACK a request that fails gets a
// non-zero acknowledgement before the session closes.
func TestBackendReplyAckFailure(t *testing.T) {
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
	_, uc, done := startBackend(t, h, nil)
	c := newConn(uc)
	require.NoError(t, c.write(Header{Request: ReqSetOwner, Flags: Version}, nil, nil))
	require.NoError(t, c.write(Header{Request: ReqSetProtocolFeatures, Flags: Version}, u64p(uint64(ProtocolFeatures(0).With(PFReplyAck))), nil))
	require.NoError(t, c.write(Header{Request: ReqSetVringNum, Flags: Version | FlagNeedReply}, VringState{Index: 9, Num: 8}.Encode(), nil))
	r, err := c.read()
	require.NoError(t, err)
	assert.Equal(t, ReqSetVringNum, r.Request)
	assert.True(t, r.IsReply())
	assert.NotZero(t, r.U64())
	assert.ErrorIs(t, <-done, ErrBadQueue)
}

// The back-end checks ring areas as large as the negotiated features make
// them (vring.RingSizes), as Linux vhost does: a used ring flush against
// the end of guest memory is accepted without EVENT_IDX and refused with
// it (the event field would lie past memory).
func TestBackendRingAtTheEndOfMemoryIsSizedByFeatures(t *testing.T) {
	const size = 8
	for _, tc := range []struct {
		name     string
		eventIdx bool
	}{{"without EVENT_IDX", false}, {"with EVENT_IDX", true}} {
		t.Run(tc.name, func(t *testing.T) {
			h := vhostusertest.New(vhostusertest.Loopback, [6]byte{2, 0, 0, 0, 0, 1})
			_, uc, _ := startBackend(t, h, nil)
			want := h.Features().With(virtio.FEventIdx) &^ virtio.FRingPacked.Bit()
			if !tc.eventIdx {
				want &^= virtio.FEventIdx.Bit()
			}
			d := newTestDriver(t, uc, want)
			require.Equal(t, tc.eventIdx, d.features.Has(virtio.FEventIdx))
			end := vring.GuestAddr(0x100000 + 4<<20)
			_, _, u := vring.RingSizes(size, 0)
			require.NoError(t, d.fe.SetQueueNum(0, size))
			err := d.fe.SetQueueAddr(0, vdpa.QueueAddr{Desc: 0x100000, Avail: 0x101000, Used: end - vring.GuestAddr(u)})
			if tc.eventIdx {
				assert.ErrorIs(t, err, ErrReplyFailed, "the back-end refuses it (REPLY_ACK)")
			} else {
				assert.NoError(t, err)
			}
		})
	}
}
