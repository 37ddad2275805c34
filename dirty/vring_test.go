package dirty_test

import (
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/virtio"
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
	// With burst > 0, batch pops burst chains at a time, logs each with
	// LogChain and returns them with one PushBatch, as softnet's receive
	// path does.
	burst int
	cs    []vring.Chain
	elems []vring.UsedElem
}

// The loggers of a ringBench.
const (
	unlogged = iota
	logged   // a *Bitmap
	cached   // a *Cache on a Bitmap
)

func newRingBench(tb testing.TB, mode int) *ringBench {
	h, err := vringtest.New(&vringtest.Options{Size: 256})
	require.NoError(tb, err)
	tb.Cleanup(func() { h.Close() })
	var logger vring.WriteLogger
	switch mode {
	case logged:
		logger = mustNew(tb, regionSize(tb, h.Mem))
	case cached:
		logger = mustNew(tb, regionSize(tb, h.Mem)).NewCache()
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
	for k := 0; k < n && r.burst == 0; k++ {
		ok, err := r.dev.Pop(&r.c)
		if err != nil || !ok {
			tb.Fatal(ok, err)
		}
		if err := r.dev.PushChain(&r.c, 1500); err != nil {
			tb.Fatal(err)
		}
	}
	for k := 0; k < n && r.burst > 0; {
		cs := r.cs[:min(r.burst, n-k)]
		got, err := r.dev.PopBatch(cs)
		if err != nil || got != len(cs) {
			tb.Fatal(got, err)
		}
		for i := range cs {
			if err := r.dev.LogChain(&cs[i], 1500); err != nil {
				tb.Fatal(err)
			}
			r.elems[i] = vring.UsedElem{Head: cs[i].Head, Len: 1500}
		}
		if err := r.dev.PushBatch(r.elems[:len(cs)]); err != nil {
			tb.Fatal(err)
		}
		k += len(cs)
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
// logger, with a *Bitmap as the logger, and with a *Cache. The driver side
// runs with the timer stopped.
func BenchmarkRingPopPush(b *testing.B) {
	for mode, name := range []string{"unlogged", "logged", "cached"} {
		b.Run(name, func(b *testing.B) {
			r := newRingBench(b, mode)
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
	b.Run("per-chain", func(b *testing.B) { benchLogOverhead(b, 0) })
	b.Run("burst32", func(b *testing.B) { benchLogOverhead(b, 32) })
}

func benchLogOverhead(b *testing.B, burst int) {
	const batch = 128
	rings := []*ringBench{newRingBench(b, unlogged), newRingBench(b, logged), newRingBench(b, cached)}
	for _, r := range rings {
		r.burst, r.cs, r.elems = burst, make([]vring.Chain, burst), make([]vring.UsedElem, burst)
		r.batch(b, batch, func(bool) {}) // warm up the chains' segment slices
	}
	times := make([][]time.Duration, len(rings))
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
	sws := make([]func(bool), len(rings))
	for i := range rings {
		sws[i] = stopwatch(&times[i])
	}
	for b.Loop() {
		for i, r := range rings {
			r.batch(b, batch, sws[i])
		}
	}
	median := func(ds []time.Duration) float64 {
		slices.Sort(ds)
		return float64(ds[len(ds)/2].Nanoseconds()) / batch
	}
	mp, ml, mc := median(times[0]), median(times[1]), median(times[2])
	b.ReportMetric(mp, "unlogged-ns/chain")
	b.ReportMetric(ml, "logged-ns/chain")
	b.ReportMetric(mc, "cached-ns/chain")
	b.ReportMetric(ml/mp, "logged/unlogged")
	b.ReportMetric(mc/mp, "cached/unlogged")
}

// TestVringCacheFlushesAtPublication checks a device queue whose logger is
// a dirty.Cache, split and packed: the queue's setup leaves nothing cached;
// LogChain's marks wait in the cache until the push that publishes the
// chain (or FlushLog), and that push applies them together with the ring's
// own writes; notification changes flush their marks; and a flush into a
// log closed meanwhile fails with ErrLogWrite and breaks the queue rather
// than dropping the marks silently.
func TestVringCacheFlushesAtPublication(t *testing.T) {
	for _, packed := range []bool{false, true} {
		name := "split"
		var f virtio.Features
		if packed {
			name, f = "packed", virtio.FRingPacked.Bit()|virtio.FEventIdx.Bit()
		}
		t.Run(name, func(t *testing.T) {
			h, err := vringtest.New(&vringtest.Options{Size: 16, SlotSize: 8192, Features: f, NoDevice: true})
			require.NoError(t, err)
			defer h.Close()
			log, err := dirty.New(regionSize(t, h.Mem), &dirty.Options{Shared: true})
			require.NoError(t, err)
			cache := log.NewCache()
			dev, err := vring.NewDeviceQueue(h.Mem, vring.DeviceQueueOptions{
				Layout: h.Layout, Features: f, Log: cache, State: vring.InitialState(f)})
			require.NoError(t, err)
			require.Zero(t, cache.Pending(), "queue setup left marks cached")
			_, err = log.Harvest(mustNew(t, log.Span()))
			require.NoError(t, err)

			pagesOf := func(s vring.Segment, n uint64) []uint64 {
				var ps []uint64
				for p := uint64(s.Addr) / 4096; p <= (uint64(s.Addr)+n-1)/4096; p++ {
					ps = append(ps, p)
				}
				return ps
			}
			pop := func() vring.Chain {
				_, _, err := h.Driver.Send([][]byte{make([]byte, 10)}, []uint32{6000})
				require.NoError(t, err)
				var c vring.Chain
				ok, err := dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				require.Len(t, c.Segs, 2)
				return c
			}

			// LogChain, then PushBatch.
			c := pop()
			const written = 5000
			require.NoError(t, dev.LogChain(&c, written))
			assert.NotZero(t, cache.Pending())
			assert.Zero(t, log.Count(), "LogChain's marks reached the log before the push")
			require.NoError(t, dev.PushBatch([]vring.UsedElem{{Head: c.Head, Len: written}}))
			assert.Zero(t, cache.Pending())
			got := collect(log)
			for _, p := range pagesOf(c.Segs[1], written) {
				assert.Contains(t, got, p, "written page missing after the push")
			}
			ringPage := uint64(h.Layout.Desc) / 4096 // packed: used descriptors
			if !packed {
				ringPage = uint64(h.Layout.Used) / 4096
			}
			assert.Contains(t, got, ringPage, "ring write missing after the push")
			_, err = log.Harvest(mustNew(t, log.Span()))
			require.NoError(t, err)

			// LogChain, then FlushLog (a queue stopped before the push).
			c = pop()
			require.NoError(t, dev.LogChain(&c, 100))
			require.NoError(t, dev.FlushLog())
			assert.Equal(t, pagesOf(c.Segs[1], 100), collect(log))
			require.NoError(t, dev.PushChain(&c, 100))
			assert.Zero(t, cache.Pending())

			// Notification changes flush what they wrote.
			_, err = dev.EnableNotify()
			require.NoError(t, err)
			assert.Zero(t, cache.Pending())
			dev.DisableNotify()
			assert.Zero(t, cache.Pending())

			// The log closes with marks cached: the flush that would apply
			// them fails loudly and breaks the queue, and so does a later
			// push (its own marks are refused by the closed log).
			c = pop()
			require.NoError(t, dev.LogChain(&c, 100))
			require.NotZero(t, cache.Pending())
			require.NoError(t, log.Close())
			err = dev.FlushLog()
			require.ErrorIs(t, err, vring.ErrLogWrite)
			require.ErrorIs(t, err, dirty.ErrClosed)
			require.ErrorIs(t, dev.Err(), vring.ErrLogWrite, "the queue is broken")
			require.ErrorIs(t, dev.PushChain(&c, 100), vring.ErrQueueBroken)
		})
	}
}
