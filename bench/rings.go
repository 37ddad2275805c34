package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Ring benchmarks use one guest-memory region: the split ring at guest
// address 0, then a buffer area. Every chain points at the same buffers
// (the ring code under test never touches buffer contents beyond mapping
// them), so the measurement is the ring protocol itself.
const (
	ringBufBase = 1 << 20 // buffers start at 1 MiB
	ringBufLen  = 64      // bytes per descriptor buffer
	ringMemSize = 2 << 20
)

// chainBuffers returns the buffers of one chain with descs descriptors:
// a 1-descriptor chain is one readable buffer (a transmitted frame); a
// longer chain is half readable, half writable (a request and its reply).
func chainBuffers(descs int) []vring.Buffer {
	bufs := make([]vring.Buffer, descs)
	for i := range bufs {
		bufs[i] = vring.Buffer{Addr: vring.GuestAddr(ringBufBase + i*ringBufLen), Len: ringBufLen}
		if descs > 1 && i >= descs/2 {
			bufs[i].Writable = true
		}
	}
	return bufs
}

// writtenFor is what the device reports written for a chain of bufs.
func writtenFor(bufs []vring.Buffer) uint32 {
	var n uint32
	for _, b := range bufs {
		if b.Writable {
			n += b.Len
		}
	}
	return n
}

// ringEnv is guest memory with one split ring laid out in it.
type ringEnv struct {
	region *vring.Region
	mem    *vring.Memory
	layout vring.Layout
}

func newRingEnv(ringSize int) (*ringEnv, error) {
	if vring.ContiguousLayoutBytes(uint16(ringSize)) > ringBufBase {
		return nil, fmt.Errorf("ring size %d does not fit below the buffer area", ringSize)
	}
	r, err := vring.NewMemfdRegion(0, ringMemSize, &vring.RegionOptions{Name: "vdpakit-bench"})
	if err != nil {
		return nil, err
	}
	mem, err := vring.NewMemory(r)
	if err != nil {
		r.Close()
		return nil, err
	}
	return &ringEnv{region: r, mem: mem, layout: vring.ContiguousLayout(0, uint16(ringSize))}, nil
}

func (e *ringEnv) Close() { e.mem.Close() }

// idxField returns the 2-byte index field (avail.idx or used.idx) of a ring.
func (e *ringEnv) idxField(ringAddr vring.GuestAddr) ([]byte, error) {
	return e.mem.Slice(ringAddr+2, 2)
}

// benchDevice measures device-side pop+push per chain in one goroutine. The
// driver fills the whole ring once; afterwards each lap of size chains is
// replayed by advancing avail.idx by the queue size (the avail ring and the
// descriptors stay valid), so only device work is timed.
func benchDevice(ctx context.Context, d time.Duration, ringSize, descs, batch int, log vring.WriteLogger) (loopTiming, error) {
	e, err := newRingEnv(ringSize)
	if err != nil {
		return loopTiming{}, err
	}
	defer e.Close()
	drv, err := vring.NewDriverQueue(e.mem, vring.DriverQueueOptions{Layout: e.layout})
	if err != nil {
		return loopTiming{}, err
	}
	bufs := chainBuffers(descs)
	var heads []uint16
	for drv.NumFree() >= descs {
		h, err := drv.Add(bufs)
		if err != nil {
			return loopTiming{}, err
		}
		heads = append(heads, h)
	}
	// Fill every avail slot (chains of several descriptors leave slots
	// unused) so each lap of ringSize entries names valid chains.
	_, availSz, _ := vring.SplitSizes(uint16(ringSize))
	avail, err := e.mem.Slice(e.layout.Avail, availSz)
	if err != nil {
		return loopTiming{}, err
	}
	for i := 0; i < ringSize; i++ {
		binary.LittleEndian.PutUint16(avail[4+2*i:], heads[i%len(heads)])
	}
	laps := ringSize
	dev, err := vring.NewDeviceQueue(e.mem, vring.DeviceQueueOptions{Layout: e.layout, Log: log})
	if err != nil {
		return loopTiming{}, err
	}
	dev.DisableNotify()
	availIdx, err := e.idxField(e.layout.Avail)
	if err != nil {
		return loopTiming{}, err
	}
	written := writtenFor(bufs)
	chains := make([]vring.Chain, batch)
	elems := make([]vring.UsedElem, batch)
	var idx uint16 // avail.idx as last stored; the device starts at 0
	left := 0      // chains still available in the current lap
	f := func(n int) error {
		for done := 0; done < n; {
			if left == 0 {
				idx += uint16(laps)
				binary.LittleEndian.PutUint16(availIdx, idx)
				left = laps
			}
			want := min(batch, left, n-done)
			if batch == 1 {
				// One chain at a time: Pop, Push (PushChain when logging,
				// which logs the written bytes) and the interrupt check, as
				// a device serving one chain per kick does; the same loop
				// as vring's BenchmarkDevicePopPush1Desc.
				ok, err := dev.Pop(&chains[0])
				if err != nil {
					return err
				}
				if !ok {
					return errors.New("ring empty")
				}
				if log != nil {
					err = dev.PushChain(&chains[0], written)
				} else {
					err = dev.Push(chains[0].Head, written)
				}
				if err != nil {
					return err
				}
				dev.NeedsInterrupt()
				left--
				done++
				continue
			}
			k, err := dev.PopBatch(chains[:want])
			if err != nil {
				return err
			}
			if k != want {
				return fmt.Errorf("popped %d chains, want %d", k, want)
			}
			for i := 0; i < k && err == nil; i++ {
				if log != nil {
					err = logWritten(log, &chains[i], written)
				}
				elems[i] = vring.UsedElem{Head: chains[i].Head, Len: written}
			}
			if err == nil {
				err = dev.PushBatch(elems[:k])
			}
			if err != nil {
				return err
			}
			dev.NeedsInterrupt() // once per batch, as a device signals after a burst
			left -= k
			done += k
		}
		return nil
	}
	return timeLoopAllocs(ctx, d, f)
}

// logWritten logs the first written bytes of c's writable segments, as
// PushChain does, for a device that publishes with PushBatch.
func logWritten(log vring.WriteLogger, c *vring.Chain, written uint32) error {
	left := uint64(written)
	for i := c.Readable; i < len(c.Segs) && left > 0; i++ {
		k := min(uint64(c.Segs[i].Len), left)
		if err := log.LogWrite(uint64(c.Segs[i].Addr), k); err != nil {
			return err
		}
		left -= k
	}
	return nil
}

// benchDriver measures driver-side add+publish+reclaim per chain in one
// goroutine. A minimal in-line completer writes the used entries directly
// (two stores per chain), so the time is the driver's.
func benchDriver(ctx context.Context, d time.Duration, ringSize, descs, batch int) (loopTiming, error) {
	e, err := newRingEnv(ringSize)
	if err != nil {
		return loopTiming{}, err
	}
	defer e.Close()
	drv, err := vring.NewDriverQueue(e.mem, vring.DriverQueueOptions{Layout: e.layout})
	if err != nil {
		return loopTiming{}, err
	}
	bufs := chainBuffers(descs)
	written := writtenFor(bufs)
	_, _, usedSz := vring.SplitSizes(uint16(ringSize))
	used, err := e.mem.Slice(e.layout.Used, usedSz)
	if err != nil {
		return loopTiming{}, err
	}
	mask := uint16(ringSize - 1)
	var usedIdx uint16
	heads := make([]uint16, batch)
	elems := make([]vring.UsedElem, batch)
	f := func(n int) error {
		for done := 0; done < n; {
			want := min(batch, n-done, drv.NumFree()/descs)
			for i := 0; i < want; i++ {
				h, err := drv.Add(bufs)
				if err != nil {
					return err
				}
				heads[i] = h
			}
			drv.Publish()
			for i := 0; i < want; i++ {
				off := 4 + 8*int(usedIdx&mask)
				binary.LittleEndian.PutUint32(used[off:], uint32(heads[i]))
				binary.LittleEndian.PutUint32(used[off+4:], written)
				usedIdx++
			}
			binary.LittleEndian.PutUint16(used[2:], usedIdx)
			if batch == 1 {
				if _, _, ok, err := drv.Reclaim(); err != nil || !ok {
					return fmt.Errorf("reclaim: ok=%v err=%v", ok, err)
				}
			} else if k, err := drv.ReclaimBatch(elems[:want]); err != nil || k != want {
				return fmt.Errorf("reclaim: %d of %d, err=%v", k, want, err)
			}
			done += want
		}
		return nil
	}
	return timeLoopAllocs(ctx, d, f)
}

// loopTiming is what timeLoopAllocs measured: n operations per run, the
// fastest run's wall time, and the least thread CPU time of a run.
type loopTiming struct {
	N         int
	Wall, CPU time.Duration
}

// timeLoopAllocs is timeLoop calibrated to d/2 followed by two more runs of
// the same size, returning the fastest of the three by wall clock and the
// least thread CPU time (CLOCK_THREAD_CPUTIME_ID, the goroutine locked to
// its thread: what go test -bench reports as cpu-ns/op in vring's
// benchmarks); it fails if the timed loop allocates in steady state (the
// library promises zero allocations per chain). On a busy machine the wall
// time includes time spent descheduled and the CPU time does not; when the
// two differ much, the machine was not quiet.
func timeLoopAllocs(ctx context.Context, d time.Duration, fn func(n int) error) (loopTiming, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := fn(1024); err != nil { // warm up
		return loopTiming{}, err
	}
	ops := 0 // operations timed, for the allocation check
	f := func(n int) error { ops += n; return fn(n) }
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cpu0 := threadCPU()
	n, el, err := timeLoop(ctx, d/2, f)
	// timeLoop's last run is the calibrated one; its CPU time is
	// approximated by the whole calibration's when that is all there is.
	cpu := threadCPU() - cpu0
	// Two more runs of the calibrated size; the fastest of the three is
	// reported, filtering out interference from other processes.
	for i := 0; i < 2 && err == nil && ctx.Err() == nil; i++ {
		c0 := threadCPU()
		start := time.Now()
		err = f(n)
		el = min(el, time.Since(start))
		cpu = min(cpu, threadCPU()-c0)
	}
	runtime.ReadMemStats(&after)
	if allocs := after.Mallocs - before.Mallocs; err == nil && allocFailed(allocs, ops) {
		err = fmt.Errorf("hot path allocated: %d allocations over %d operations", allocs, ops)
	}
	return loopTiming{N: n, Wall: el, CPU: cpu}, err
}

// allocFailed reports whether a timed loop of ops operations allocated,
// given the process's allocations over it. The count is process-wide
// (runtime.MemStats), so the harness's other goroutines add to it: the
// CPU profiler's writer with -profile, the progress printer, the
// runtime. A loop that allocates per operation, or per batch of up to
// 1024, makes at least one allocation per 1024 operations; those few
// from elsewhere (tens over a run of millions) do not.
func allocFailed(allocs uint64, ops int) bool {
	return allocs > 64 && allocs*1024 >= uint64(ops)
}

// threadCPU is the calling thread's CPU time.
func threadCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// crossOptions configure a driver/device pair on two threads or processes.
type crossOptions struct {
	RingSize, Descs, Batch, Chains int
	HostCPU, GuestCPU              int
	Packed                         bool // a packed ring instead of a split one
}

// pinThread locks the calling goroutine to its OS thread and that thread to
// cpu. The returned function restores the thread's CPU mask and unlocks it;
// call it when the goroutine is done (threads must not exit, or child
// processes started with Pdeathsig from that thread would be killed).
func pinThread(cpu int) (unpin func(), err error) {
	runtime.LockOSThread()
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("read cpu mask: %w", err)
	}
	var set unix.CPUSet
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("pin to cpu %d: %w", cpu, err)
	}
	return func() {
		if unix.SchedSetaffinity(0, &old) == nil {
			runtime.UnlockOSThread()
		}
		// If the mask cannot be restored the thread stays locked and
		// exits with its goroutine.
	}, nil
}

// errAborted stops one side when the other failed.
var errAborted = errors.New("aborted: the other side failed")

// driveChains is the driver side of a cross-thread or cross-process run: it
// adds chains in batches, publishes each batch with one avail.idx store,
// and reclaims everything used, busy-polling, until n chains came back:
// one at a time with batches of 1 (Reclaim), in batches otherwise
// (ReclaimBatch), as the device side pops and pushes.
func driveChains(drv *vring.DriverQueue, bufs []vring.Buffer, batch, n int, abort *atomic.Bool, deadline time.Time) error {
	added, done, pending := 0, 0, 0
	elems := make([]vring.UsedElem, max(batch, 1))
	descs := len(bufs)
	for spins := 0; done < n; spins++ {
		for pending < batch && added < n && drv.NumFree() >= descs {
			if _, err := drv.Add(bufs); err != nil {
				return err
			}
			added++
			pending++
		}
		if pending > 0 && (pending >= batch || added == n || drv.NumFree() < descs) {
			drv.Publish()
			pending = 0
		}
		k, err := reclaimAll(drv, elems, batch == 1)
		done += k
		if err != nil {
			return err
		}
		if spins&0xffff == 0 {
			if abort.Load() {
				return errAborted
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("driver: %d of %d chains back after the deadline", done, n)
			}
		}
	}
	return nil
}

// serveChains is the device side: pop up to batch chains, push them with
// one used.idx store, busy-polling, until n chains were served.
func serveChains(dev *vring.DeviceQueue, batch, n int, written uint32, abort *atomic.Bool, deadline time.Time) error {
	chains := make([]vring.Chain, batch)
	elems := make([]vring.UsedElem, batch)
	done := 0
	for spins := 0; done < n; spins++ {
		k, err := dev.PopBatch(chains[:min(batch, n-done)])
		if err != nil {
			return err
		}
		if k == 0 {
			if spins&0xffff == 0 {
				if abort != nil && abort.Load() {
					return errAborted
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("device: %d of %d chains served by the deadline", done, n)
				}
			}
			continue
		}
		for i := 0; i < k; i++ {
			elems[i] = vring.UsedElem{Head: chains[i].Head, Len: written}
		}
		if err := dev.PushBatch(elems[:k]); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// reclaimAll reclaims every used entry pending: one Reclaim at a time
// when one is set, else with ReclaimBatch into elems until a short batch.
// It returns how many it took.
func reclaimAll(drv *vring.DriverQueue, elems []vring.UsedElem, one bool) (int, error) {
	n := 0
	for {
		if one {
			_, _, ok, err := drv.Reclaim()
			if err != nil || !ok {
				return n, err
			}
			n++
			continue
		}
		k, err := drv.ReclaimBatch(elems)
		n += k
		if err != nil || k < len(elems) {
			return n, err
		}
	}
}

// crossDeadline bounds a cross run so a stuck peer cannot hang the harness.
func crossDeadline(chains int) time.Time {
	return time.Now().Add(30*time.Second + time.Duration(chains)*2*time.Microsecond)
}

// libCrossThread runs opts.Chains chains between a driver goroutine pinned
// to GuestCPU and a device goroutine pinned to HostCPU, both busy-polling,
// and returns the wall time from start to the last reclaim.
func libCrossThread(ctx context.Context, o crossOptions) (time.Duration, error) {
	e, err := newRingEnv(o.RingSize)
	if err != nil {
		return 0, err
	}
	defer e.Close()
	var features virtio.Features
	if o.Packed {
		features = features.With(virtio.FRingPacked)
		e.layout = vring.ContiguousPackedLayout(0, uint16(o.RingSize))
	}
	drv, err := vring.NewDriverQueue(e.mem, vring.DriverQueueOptions{Layout: e.layout, Features: features})
	if err != nil {
		return 0, err
	}
	dev, err := vring.NewDeviceQueue(e.mem, vring.DeviceQueueOptions{Layout: e.layout, Features: features, State: vring.InitialState(features)})
	if err != nil {
		return 0, err
	}
	drv.DisableInterrupts()
	dev.DisableNotify()
	bufs := chainBuffers(o.Descs)
	written := writtenFor(bufs)
	deadline := crossDeadline(o.Chains)
	var abort atomic.Bool
	devErr := make(chan error, 1)
	ready := make(chan error, 1)
	go func() {
		unpin, err := pinThread(o.HostCPU)
		if err != nil {
			ready <- err
			devErr <- err
			return
		}
		defer unpin()
		ready <- nil
		err = serveChains(dev, o.Batch, o.Chains, written, &abort, deadline)
		if err != nil {
			abort.Store(true)
		}
		devErr <- err
	}()
	if err := <-ready; err != nil {
		return 0, err
	}
	type res struct {
		el  time.Duration
		err error
	}
	drvRes := make(chan res, 1)
	go func() {
		unpin, err := pinThread(o.GuestCPU)
		if err != nil {
			abort.Store(true)
			drvRes <- res{err: err}
			return
		}
		defer unpin()
		start := time.Now()
		err = driveChains(drv, bufs, o.Batch, o.Chains, &abort, deadline)
		el := time.Since(start)
		if err != nil {
			abort.Store(true)
		}
		drvRes <- res{el, err}
	}()
	stop := context.AfterFunc(ctx, func() { abort.Store(true) })
	defer stop()
	r := <-drvRes
	derr := <-devErr
	if r.err != nil {
		if errors.Is(r.err, errAborted) && derr != nil {
			return 0, fmt.Errorf("device: %w", derr)
		}
		return 0, fmt.Errorf("driver: %w", r.err)
	}
	if derr != nil {
		return 0, fmt.Errorf("device: %w", derr)
	}
	return r.el, nil
}

// Rings runs the ring suite.
func (h *Harness) Rings(ctx context.Context) {
	const suite = "rings"
	for _, descs := range []int{1, 4} {
		for _, b := range h.cfg.Batches {
			if ctx.Err() != nil {
				return
			}
			p := map[string]any{"kind": "device, same goroutine", "descs": descs, "batch": b, "ring_size": h.cfg.RingSize}
			name := fmt.Sprintf("device pop+push, %s, batch %d, same goroutine", chainLabel(descs), b)
			h.prog.Step("rings: %s", name)
			t, err := benchDevice(ctx, h.cfg.duration, h.cfg.RingSize, descs, b, nil)
			h.addLoop(suite, name, p, t, err)

			name = fmt.Sprintf("driver add+reclaim, %s, batch %d, same goroutine", chainLabel(descs), b)
			h.prog.Step("rings: %s", name)
			t, err = benchDriver(ctx, h.cfg.duration, h.cfg.RingSize, descs, b)
			p = copyParams(p)
			p["kind"] = "driver, same goroutine"
			h.addLoop(suite, name, p, t, err)
		}
	}
	for _, mode := range []string{"cross-goroutine", "cross-process"} {
		for _, descs := range []int{1, 4} {
			for _, b := range h.cfg.Batches {
				if ctx.Err() != nil {
					return
				}
				p := map[string]any{"kind": mode, "descs": descs, "batch": b, "ring_size": h.cfg.RingSize,
					"host_cpu": h.cfg.HostCPU, "guest_cpu": h.cfg.GuestCPU, "pinned": true, "busy_poll": true}
				name := fmt.Sprintf("%s driver->device, %s, batch %d", mode, chainLabel(descs), b)
				h.prog.Step("rings: %s", name)
				o := crossOptions{RingSize: h.cfg.RingSize, Descs: descs, Batch: b, HostCPU: h.cfg.HostCPU, GuestCPU: h.cfg.GuestCPU}
				runOnce := libCrossThread
				if mode == "cross-process" {
					runOnce = libCrossProcess
				}
				n, el, err := calibratedCross(ctx, h.cfg.duration, o, runOnce)
				p["chains"] = n
				h.addRate(suite, name, p, n, el, err)
			}
		}
	}
}

// calibratedCross runs a short calibration, then one run sized to last d.
func calibratedCross(ctx context.Context, d time.Duration, o crossOptions, f func(context.Context, crossOptions) (time.Duration, error)) (int, time.Duration, error) {
	o.Chains = 20000
	el, err := f(ctx, o)
	if err != nil {
		return 0, 0, err
	}
	n := int(float64(o.Chains) * d.Seconds() / el.Seconds())
	o.Chains = max(20000, min(n, 200_000_000))
	el, err = f(ctx, o)
	return o.Chains, el, err
}

// addRate records a per-chain measurement (or its failure).
// addLoop records a single-goroutine loop: wall ns/chain of the fastest
// run (the figure compared across runs), Mpps, and thread CPU ns/chain.
func (h *Harness) addLoop(suite, name string, p map[string]any, t loopTiming, err error) {
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return
		}
		h.fail(suite, name, p, err)
		return
	}
	p["chains"] = t.N
	h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{
		{Name: "ns_per_chain", Value: nsPer(t.N, t.Wall), Unit: "ns/chain"},
		{Name: "mpps", Value: mppsOf(t.N, t.Wall), Unit: "Mpps"},
		{Name: "cpu", Value: nsPer(t.N, t.CPU), Unit: "cpu-ns/chain"},
	}})
}

func (h *Harness) addRate(suite, name string, p map[string]any, n int, el time.Duration, err error) {
	if err != nil {
		if ctx := context.Canceled; errors.Is(err, ctx) {
			return
		}
		h.fail(suite, name, p, err)
		return
	}
	p["chains"] = n
	h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{
		{Name: "ns_per_chain", Value: nsPer(n, el), Unit: "ns/chain"},
		{Name: "mpps", Value: mppsOf(n, el), Unit: "Mpps"},
	}})
}
