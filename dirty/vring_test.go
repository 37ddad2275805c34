package dirty_test

import (
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// A *Bitmap is a vring write logger as it is: no adapter, no import cycle.
var _ vring.WriteLogger = (*dirty.Bitmap)(nil)

func regionSize(t testing.TB, mem *vring.Memory) uint64 {
	rs := mem.Regions()
	require.Len(t, rs, 1)
	return uint64(rs[0].Base()) + rs[0].Size()
}

// TestVringLogsThroughBitmap checks the logging path end to end: a device
// queue with a Bitmap as its WriteLogger marks the pages of the used ring
// (entry and used.idx) and of the bytes it reports written, and nothing else.
func TestVringLogsThroughBitmap(t *testing.T) {
	h, err := vringtest.New(&vringtest.Options{Size: 16, SlotSize: 8192})
	require.NoError(t, err)
	defer h.Close()
	log := mustNew(t, regionSize(t, h.Mem))
	dev, err := vring.NewDeviceQueue(h.Mem, vring.DeviceQueueOptions{Layout: h.Layout, Log: log})
	require.NoError(t, err)

	_, err = log.Harvest(mustNew(t, log.Span())) // forget what queue setup logged
	require.NoError(t, err)
	// Readable 100 bytes, then 6000 writable bytes of which the device
	// writes 4500: from offset 100 of the slot across into its second page.
	_, _, err = h.Driver.Send([][]byte{make([]byte, 100)}, []uint32{6000})
	require.NoError(t, err)
	var c vring.Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, c.Segs, 2)
	w := c.Segs[1]
	require.True(t, w.Writable)
	const written = 4500
	require.NoError(t, dev.PushChain(&c, written))

	want := map[uint64]bool{}
	for a := uint64(w.Addr); a < uint64(w.Addr)+written; a++ {
		want[a/4096] = true
	}
	used := uint64(h.Layout.Used)
	want[(used+2)/4096] = true // used.idx
	want[(used+4)/4096] = true // used ring entry 0
	require.Len(t, want, 3, "test setup: used ring in one page, written bytes in two others")
	got := map[uint64]bool{}
	for p := range log.DirtyPages() {
		got[p] = true
	}
	assert.Equal(t, want, got)
}

// TestVringUsedLogAddr checks used-ring logging by guest address as vhost
// does it with VHOST_VRING_F_LOG and log_guest_addr: the used ring's writes
// are logged at UsedLogAddr, not where the ring happens to be addressed.
func TestVringUsedLogAddr(t *testing.T) {
	h, err := vringtest.New(&vringtest.Options{Size: 16})
	require.NoError(t, err)
	defer h.Close()
	const logGuestAddr = 0x4000_0000 // the ring's guest-physical address
	log := mustNew(t, 2*logGuestAddr)
	dev, err := vring.NewDeviceQueue(h.Mem, vring.DeviceQueueOptions{Layout: h.Layout, Log: log, UsedLogAddr: logGuestAddr})
	require.NoError(t, err)
	_, err = log.Harvest(mustNew(t, log.Span()))
	require.NoError(t, err)

	_, _, err = h.Driver.Send([][]byte{{1, 2, 3}}, nil)
	require.NoError(t, err)
	var c vring.Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.NoError(t, dev.PushChain(&c, 0))
	assert.Equal(t, []uint64{logGuestAddr / 4096}, collect(log))
}

// TestVringLogOutOfSpan checks that a write the log cannot record fails the
// queue operation instead of being dropped.
func TestVringLogOutOfSpan(t *testing.T) {
	h, err := vringtest.New(&vringtest.Options{Size: 16})
	require.NoError(t, err)
	defer h.Close()
	log := mustNew(t, 4096) // covers only page 0; the buffers lie beyond
	dev, err := vring.NewDeviceQueue(h.Mem, vring.DeviceQueueOptions{Layout: h.Layout, Log: log})
	require.NoError(t, err)
	_, _, err = h.Driver.Send(nil, []uint32{100})
	require.NoError(t, err)
	var c vring.Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	err = dev.PushChain(&c, 100)
	require.ErrorIs(t, err, dirty.ErrOutOfSpan)
	require.ErrorIs(t, err, vring.ErrLogWrite)
}

// ringBench is a queue pair in shared guest memory, with fixed buffers: each
// chain is one 64-byte readable segment and one 1536-byte writable segment
// of which the device reports 1500 bytes written (an RX-sized packet).
type ringBench struct {
	drv  *vring.DriverQueue
	dev  *vring.DeviceQueue
	bufs []vring.Buffer
	c    vring.Chain
}

func newRingBench(tb testing.TB, logged bool) *ringBench {
	h, err := vringtest.New(&vringtest.Options{Size: 256})
	require.NoError(tb, err)
	tb.Cleanup(func() { h.Close() })
	var logger vring.WriteLogger
	if logged {
		log := mustNew(tb, regionSize(tb, h.Mem))
		logger = log
	}
	dev, err := vring.NewDeviceQueue(h.Mem, vring.DeviceQueueOptions{Layout: h.Layout, Log: logger})
	require.NoError(tb, err)
	data := vring.GuestAddr(64 << 10) // past the ring, inside the driver's buffer area
	r := &ringBench{
		drv: h.Driver.Queue,
		dev: dev,
		bufs: []vring.Buffer{
			{Addr: data, Len: 64},
			{Addr: data + 0x840, Len: 1536, Writable: true},
		},
	}
	r.batch(tb, 1, func(bool) {}) // warm up: the chain's segment slice grows once
	return r
}

// batch makes n chains available (driver), then pops and pushes them
// (device, timed if b is not nil), then reclaims them (driver).
func (r *ringBench) batch(tb testing.TB, n int, timed func(on bool)) {
	for range n {
		if _, err := r.drv.Add(r.bufs); err != nil {
			tb.Fatal(err)
		}
	}
	r.drv.Publish()
	timed(true)
	for range n {
		ok, err := r.dev.Pop(&r.c)
		if err != nil || !ok {
			tb.Fatal(ok, err)
		}
		if err := r.dev.PushChain(&r.c, 1500); err != nil {
			tb.Fatal(err)
		}
	}
	timed(false)
	for range n {
		if _, _, ok, err := r.drv.Reclaim(); err != nil || !ok {
			tb.Fatal(ok, err)
		}
	}
}

// BenchmarkRingPopPush measures the device side of a split ring, Pop then
// PushChain (used entry, used.idx, and 1500 written bytes), without a
// logger and with a *Bitmap as the logger. The driver side runs with the
// timer stopped.
func BenchmarkRingPopPush(b *testing.B) {
	for _, logged := range []bool{false, true} {
		name := "unlogged"
		if logged {
			name = "logged"
		}
		b.Run(name, func(b *testing.B) {
			r := newRingBench(b, logged)
			b.ReportAllocs()
			timer := func(on bool) {
				if on {
					b.StartTimer()
				} else {
					b.StopTimer()
				}
			}
			b.ResetTimer() // forget the setup's time and allocations
			b.StopTimer()
			for done := 0; done < b.N; {
				n := min(b.N-done, 128)
				r.batch(b, n, timer)
				done += n
			}
		})
	}
}

// BenchmarkRingLogOverhead runs logged and unlogged pop+push batches
// alternately, so that load from other processes hits both alike, and
// reports the median cost per chain of each and the ratio of the medians,
// logged/unlogged (medians, because a shared machine's spikes would swamp
// means).
func BenchmarkRingLogOverhead(b *testing.B) {
	const batch = 128
	plain, logged := newRingBench(b, false), newRingBench(b, true)
	var tPlain, tLogged []time.Duration
	stopwatch := func(acc *[]time.Duration) func(bool) {
		var start time.Time
		return func(on bool) {
			if on {
				start = time.Now()
			} else {
				*acc = append(*acc, time.Since(start))
			}
		}
	}
	swPlain, swLogged := stopwatch(&tPlain), stopwatch(&tLogged)
	for b.Loop() {
		plain.batch(b, batch, swPlain)
		logged.batch(b, batch, swLogged)
	}
	median := func(ds []time.Duration) float64 {
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Nanoseconds()) / batch
	}
	mp, ml := median(tPlain), median(tLogged)
	b.ReportMetric(mp, "unlogged-ns/chain")
	b.ReportMetric(ml, "logged-ns/chain")
	b.ReportMetric(ml/mp, "logged/unlogged")
}
