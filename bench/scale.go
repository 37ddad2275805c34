package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// The scale suite measures what one more device costs, with the public API
// in one process: softnet devices behind vdpa.NewLocal, and vhost-user
// sessions (a vhostuser.Backend serving softnet, driven by a
// vhostuser.Frontend over a socketpair). For each count it creates and
// starts every device (status, features, memory, two queues with their
// eventfds, DRIVER_OK), sends one frame through each and receives it back,
// then closes everything and checks that goroutines and descriptors return
// to where they were. Then the frames/s one device moves across N queue
// pairs, against one pair per core.

// scaleQueueSize is the ring size of every queue the suite sets up.
const scaleQueueSize = 256

// procUsage is a snapshot of what the process holds.
type procUsage struct {
	goroutines int
	fds        int
	rss, shmem uint64 // VmRSS, RssShmem
	heap       uint64 // Go heap in use (live objects after a GC)
}

func takeUsage() procUsage {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	u := procUsage{goroutines: runtime.NumGoroutine(), fds: countFds(), heap: ms.HeapAlloc}
	u.rss, u.shmem = procStatusKB("VmRSS")<<10, procStatusKB("RssShmem")<<10
	return u
}

func countFds() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents) - 1 // the directory's own descriptor
}

func procStatusKB(field string) uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && k == field {
			n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// settle waits (up to 5 s) for the goroutine count to come back to want,
// and returns the last count.
func settle(want int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// raiseNofile raises RLIMIT_NOFILE's soft limit to its hard limit (Go
// does this at start-up already) and, where the process may, the hard
// limit to fs.nr_open. It returns what it did, for the report.
func raiseNofile() (limit uint64, note string) {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 0, "getrlimit: " + err.Error()
	}
	before := r
	refused := ""
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n > r.Max {
			want := unix.Rlimit{Cur: n, Max: n}
			if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &want); err == nil {
				r = want
			} else {
				refused = fmt.Sprintf(" (raising the hard limit to fs.nr_open %d: %v)", n, err)
			}
		}
	}
	if r.Cur < r.Max {
		r.Cur = r.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
			r.Cur = before.Cur
		}
	}
	_ = unix.Getrlimit(unix.RLIMIT_NOFILE, &r)
	// Go's os package raised the soft limit to the hard one at start-up.
	note = fmt.Sprintf("RLIMIT_NOFILE %d/%d (soft/hard) at start, now %d/%d", before.Cur, before.Max, r.Cur, r.Max)
	if r.Max > before.Max {
		note += " (hard limit raised to fs.nr_open)"
	}
	note += refused
	return r.Cur, note
}

// scaleDev is one device the suite set up, with what the embedder made
// for it: guest memory, the driver side of its two queues, and three
// eventfds (a kick per queue, which vhost-user needs to start a ring, and
// the receive queue's interrupt; the driver polls for transmit
// completions).
type scaleDev struct {
	dev     vdpa.Device
	sw      *softnet.Device
	mem     *vring.Memory
	efds    []*vdpa.EventFD
	rx, tx  *vring.DriverQueue
	kick    *vdpa.EventFD
	closers []func() error
}

var scaleFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC)

// startDevice runs the virtio initialization sequence on d for one queue
// pair over fresh memfd guest memory, then DRIVER_OK.
func startDevice(sd *scaleDev) error {
	d := sd.dev
	region, err := vring.NewMemfdRegion(0, 2*scaleStride, nil)
	if err != nil {
		return err
	}
	mem, err := vring.NewMemory(region)
	if err != nil {
		region.Close()
		return err
	}
	sd.mem = mem
	st := virtio.StatusAcknowledge | virtio.StatusDriver
	if err := errors.Join(d.SetStatus(st), d.SetFeatures(scaleFeatures), d.SetStatus(st|virtio.StatusFeaturesOK), d.SetMemory(mem)); err != nil {
		return err
	}
	for q := range 2 {
		base := vring.GuestAddr(q) * scaleStride
		layout := vring.ContiguousLayout(base, scaleQueueSize)
		dq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: q, Layout: layout, Features: scaleFeatures})
		if err != nil {
			return err
		}
		kick, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		sd.efds = append(sd.efds, kick)
		bind := d.SetQueueKick(q, kick)
		if q == 0 {
			// The receive queue's interrupt; transmit completions are
			// polled.
			call, err := vdpa.NewEventFD()
			if err != nil {
				return err
			}
			sd.efds = append(sd.efds, call)
			bind = errors.Join(bind, d.SetQueueCall(q, call))
			sd.rx = dq
		} else {
			sd.tx, sd.kick = dq, kick
		}
		if err := errors.Join(bind, d.SetQueueNum(q, scaleQueueSize),
			d.SetQueueAddr(q, vdpa.QueueAddr{Desc: layout.Desc, Avail: layout.Avail, Used: layout.Used}),
			d.EnableQueue(q, true)); err != nil {
			return err
		}
	}
	return d.SetStatus(st | virtio.StatusFeaturesOK | virtio.StatusDriverOK)
}

// scaleStride is the guest memory of one queue of startDevice: the ring
// (16 KiB), then one buffer page.
const scaleStride = 0x5000

// ping sends one frame through the device and waits for its loopback.
func (sd *scaleDev) ping(ctx context.Context, seq uint32) error {
	rxBuf := vring.GuestAddr(0x4000)
	txBuf := scaleStride + vring.GuestAddr(0x4000)
	mac := sd.sw.MAC()
	frame := make([]byte, virtio.NetHdrLen(scaleFeatures), 80)
	frame = append(frame, mac[:]...)
	frame = append(frame, 0x02, 0, 0, 0, 0, 0x09, 0x88, 0xb5, byte(seq>>24), byte(seq>>16), byte(seq>>8), byte(seq))
	if err := sd.mem.Write(txBuf, frame); err != nil {
		return err
	}
	if _, err := sd.rx.Add([]vring.Buffer{{Addr: rxBuf, Len: 512, Writable: true}}); err != nil {
		return err
	}
	sd.rx.Publish()
	if _, err := sd.tx.Add([]vring.Buffer{{Addr: txBuf, Len: uint32(len(frame))}}); err != nil {
		return err
	}
	sd.tx.Publish()
	if err := sd.kick.Signal(); err != nil {
		return err
	}
	for _, q := range []*vring.DriverQueue{sd.rx, sd.tx} {
		for {
			_, n, ok, err := q.Reclaim()
			if err != nil {
				return err
			}
			if ok {
				if q == sd.rx {
					got := make([]byte, n)
					if err := sd.mem.Read(rxBuf, got); err != nil {
						return err
					}
					hdr := virtio.NetHdrLen(scaleFeatures)
					if len(got) != len(frame) || string(got[hdr:]) != string(frame[hdr:]) {
						return fmt.Errorf("frame %d came back as %x", seq, got)
					}
				}
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("frame %d: queue %d not completed: %w", seq, map[bool]int{true: 0, false: 1}[q == sd.rx], ctx.Err())
			}
			time.Sleep(20 * time.Microsecond)
		}
	}
	return nil
}

// close releases the device and everything made for it, device first.
func (sd *scaleDev) close() error {
	var errs []error
	if sd.dev != nil {
		errs = append(errs, sd.dev.Close())
	}
	for i := len(sd.closers) - 1; i >= 0; i-- {
		errs = append(errs, sd.closers[i]())
	}
	for _, e := range sd.efds {
		errs = append(errs, e.Close())
	}
	if sd.mem != nil {
		errs = append(errs, sd.mem.Close())
	}
	return errors.Join(errs...)
}

// newLocalDevice is a softnet device behind vdpa.NewLocal.
func newLocalDevice(context.Context, int) (*scaleDev, error) {
	sw, err := softnet.New(&softnet.Options{MaxQueueSize: scaleQueueSize})
	if err != nil {
		return nil, err
	}
	return &scaleDev{sw: sw, dev: vdpa.NewLocal(sw, nil)}, nil
}

// groupedDevices returns a maker of busy-poll softnet devices behind
// vdpa.NewLocal whose queues all run on one softnet.PollGroup of
// GOMAXPROCS workers.
func groupedDevices() func(context.Context, int) (*scaleDev, error) {
	g := softnet.NewPollGroup(nil)
	return func(context.Context, int) (*scaleDev, error) {
		sw, err := softnet.New(&softnet.Options{MaxQueueSize: scaleQueueSize, Mode: softnet.ModePoll, PollGroup: g})
		if err != nil {
			return nil, err
		}
		return &scaleDev{sw: sw, dev: vdpa.NewLocal(sw, nil)}, nil
	}
}

// newVhostSession is a vhost-user back-end serving a softnet device, and a
// Frontend driving it, over the two ends of a socketpair: the per-session
// cost, without a listening socket per back-end.
func newVhostSession(ctx context.Context, i int) (*scaleDev, error) {
	sw, err := softnet.New(&softnet.Options{MaxQueueSize: scaleQueueSize})
	if err != nil {
		return nil, err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ends := [2]*net.UnixConn{}
	for k, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("vhost-user-%d-%d", i, k))
		c, err := net.FileConn(f) // a duplicate of fd
		f.Close()
		if err != nil {
			if k == 1 {
				ends[0].Close()
			} else {
				unix.Close(fds[1])
			}
			return nil, err
		}
		ends[k] = c.(*net.UnixConn)
	}
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- vhostuser.NewBackend(sw, nil).ServeConn(sctx, ends[1]) }()
	sd := &scaleDev{sw: sw}
	sd.closers = append(sd.closers, func() error {
		// The Frontend was closed first: the session ends with the
		// connection (nil), or with the cancelled context.
		cancel()
		if err := <-served; err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
		return nil
	})
	f, err := vhostuser.NewFrontend(ctx, ends[0], &vhostuser.FrontendOptions{MaxQueueSize: scaleQueueSize})
	if err != nil {
		ends[0].Close()
		sd.close()
		return nil, err
	}
	sd.dev = f
	return sd, nil
}

// Scale runs the scale suite.
func (h *Harness) Scale(ctx context.Context) {
	limit, note := raiseNofile()
	h.prog.Warn("scale: %s", note)
	h.add(Result{Suite: "scale", Name: "descriptor limit", Metrics: []Metric{{Name: "RLIMIT_NOFILE", Value: float64(limit), Unit: "fds"}}, Note: note})
	for _, n := range h.cfg.scaleDevices {
		if ctx.Err() != nil {
			return
		}
		h.scaleCount(ctx, "softnet devices (vdpa.NewLocal)", n, 4, limit, newLocalDevice)
	}
	for _, n := range h.cfg.scaleDevices {
		if ctx.Err() != nil {
			return
		}
		h.scaleCount(ctx, "busy-poll softnet devices on one PollGroup (vdpa.NewLocal)", n, 4, limit, groupedDevices())
	}
	for _, n := range h.cfg.scaleSessions {
		if ctx.Err() != nil {
			return
		}
		h.scaleCount(ctx, "vhost-user sessions (Backend + Frontend)", n, 9, limit, newVhostSession)
	}
	h.scaleThroughput(ctx)
}

// scaleCount creates, starts, pings and closes n devices made by mk.
// scaleIdleWindow is how long scaleCount leaves its devices idle to
// measure what they cost doing nothing.
const scaleIdleWindow = 500 * time.Millisecond

// eventFDWatchdogSettle is waited before the idle window: more than
// vdpa.EventFD's 100 ms watchdog interval, so that the watchdogs the last
// signals armed have fired and disarmed.
const eventFDWatchdogSettle = 150 * time.Millisecond

func (h *Harness) scaleCount(ctx context.Context, what string, n, fdsEach int, limit uint64,
	mk func(context.Context, int) (*scaleDev, error)) {
	const suite = "scale"
	name := fmt.Sprintf("%s ×%d", what, n)
	params := map[string]any{"count": n, "queue_size": scaleQueueSize}
	if need := uint64(n*fdsEach + 64); limit != 0 && need > limit {
		h.skip(suite, name, params, fmt.Sprintf("needs about %d descriptors, RLIMIT_NOFILE is %d", need, limit))
		return
	}
	h.prog.Step("scale: %s", name)
	before := takeUsage()
	devs := make([]*scaleDev, 0, n)
	closeAll := func() error {
		var errs []error
		for _, d := range devs {
			errs = append(errs, d.close())
		}
		devs = devs[:0]
		return errors.Join(errs...)
	}
	start := time.Now()
	for i := range n {
		sd, err := mk(ctx, i)
		if err == nil {
			devs = append(devs, sd)
			err = startDevice(sd)
		}
		if err != nil {
			closeAll()
			h.fail(suite, name, params, fmt.Errorf("device %d: %w", i, err))
			return
		}
	}
	el := time.Since(start)
	up := takeUsage()
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	for i, d := range devs {
		if err := d.ping(pctx, uint32(i)); err != nil {
			cancel()
			closeAll()
			h.fail(suite, name, params, fmt.Errorf("device %d: %w", i, err))
			return
		}
	}
	cancel()
	// Idle cost: the process's CPU time while every device is up and no
	// frame moves (timers, watchers, pollers that wake with nothing to do).
	// It starts once the eventfd watchdogs the pings armed have run (each
	// once, vdpa.EventFD's watchInterval after its last signal): the cost
	// of the traffic just ended, not of idling.
	select {
	case <-ctx.Done():
	case <-time.After(eventFDWatchdogSettle):
	}
	idle0, idleStart := cpuTime(), time.Now()
	select {
	case <-ctx.Done():
	case <-time.After(scaleIdleWindow):
	}
	idleCPU, idleEl := cpuTime()-idle0, time.Since(idleStart)
	closeStart := time.Now()
	if err := closeAll(); err != nil {
		h.fail(suite, name, params, fmt.Errorf("close: %w", err))
		return
	}
	closeEl := time.Since(closeStart)
	g := settle(before.goroutines)
	after := takeUsage()
	per := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) }
	r := Result{Suite: suite, Name: name, Params: params, Metrics: []Metric{
		{Name: "create+start", Value: nsPer(n, el) / 1e6, Unit: "ms/dev"},
		{Name: "goroutines", Value: per(uint64(up.goroutines), uint64(before.goroutines)), Unit: "/dev"},
		{Name: "fds", Value: per(uint64(up.fds), uint64(before.fds)), Unit: "/dev"},
		{Name: "Go heap", Value: per(up.heap, before.heap) / 1024, Unit: "KiB/dev"},
		{Name: "outside Go heap (shared memory: guest memory, rings)", Value: per(up.shmem, before.shmem) / 1024, Unit: "KiB/dev"},
		{Name: "idle CPU", Value: float64(idleCPU.Nanoseconds()) / idleEl.Seconds() / float64(n) / 1e3, Unit: "µs/s/dev"},
		{Name: "close", Value: nsPer(n, closeEl) / 1e6, Unit: "ms/dev"},
		{Name: "leaked goroutines", Value: float64(g - before.goroutines), Unit: ""},
		{Name: "leaked fds", Value: float64(after.fds - before.fds), Unit: ""},
	}}
	if n >= 64 {
		// With a few devices the runtime's own heap growth and release
		// swamp the difference.
		r.Metrics = append(r.Metrics, Metric{Name: "RSS", Value: per(up.rss, before.rss) / 1024, Unit: "KiB/dev"})
	}
	if g > before.goroutines || after.fds > before.fds {
		h.failed++
		r.Note = "FAILED: leaked after close"
	}
	h.add(r)
}

// scaleThroughput measures the frames/s and CPU per frame of one device
// with N queue pairs, one driver goroutine per pair, against one pair per
// core: the same device with as many pairs as GOMAXPROCS, in interleaved
// rounds (reference, N pairs, reference, ...) so that the machine's load
// hits both alike. Both sides are event-driven (softnet ModeEvent waiting
// on kicks, the driver on receive interrupts) or both busy-poll (ModePoll,
// the driver yielding when idle), the device's queues each on a goroutine
// of its own or all on a softnet.PollGroup of one worker per core.
func (h *Harness) scaleThroughput(ctx context.Context) {
	const suite = "scale"
	procs := runtime.GOMAXPROCS(0)
	defer runtime.GOMAXPROCS(procs)
	d := 2 * h.cfg.duration
	cores := []int{1}
	if procs > 1 {
		cores = append(cores, procs)
	}
	for _, sm := range scaleModes {
		mode := sm.mode
		for _, p := range cores {
			runtime.GOMAXPROCS(p)
			for _, pairs := range h.cfg.scalePairs {
				if ctx.Err() != nil {
					return
				}
				if pairs <= p {
					continue
				}
				name := fmt.Sprintf("%s mode, %d pairs against %d on %d core(s)", sm.name, pairs, p, p)
				params := map[string]any{"pairs": pairs, "reference_pairs": p, "gomaxprocs": p, "frame_bytes": 64,
					"mode": mode.String(), "poll_group_workers": sm.workers(p), "driver_goroutines": driverGoroutines(sm, pairs, p), "driver_batch": 32, "rx_buffers_per_pair": h.cfg.ScaleRxSlots, "seconds_per_run": d.Seconds()}
				h.prog.Step("scale: %s", name)
				// In poll-group mode each round also runs the same pairs with
				// a goroutine per queue (poll mode), so that the group is
				// compared with what it replaces in the same minutes.
				var ref, test, own []tpResult
				var err error
				for r := 0; r < h.cfg.PeerRounds && err == nil && ctx.Err() == nil; r++ {
					var a, b, c tpResult
					if a, err = pairThroughput(ctx, sm, p, h.cfg.ScaleRxSlots, d); err == nil {
						b, err = pairThroughput(ctx, sm, pairs, h.cfg.ScaleRxSlots, d)
					}
					if err == nil && sm.group {
						c, err = pairThroughput(ctx, scaleMode{"poll", softnet.ModePoll, false, sm.coreDrivers}, pairs, h.cfg.ScaleRxSlots, d)
						own = append(own, c)
					}
					ref, test = append(ref, a), append(test, b)
				}
				if err != nil {
					h.fail(suite, name, params, err)
					continue
				}
				col := func(rs []tpResult, f func(tpResult) float64) []float64 {
					out := make([]float64, len(rs))
					for i, r := range rs {
						out[i] = f(r)
					}
					return out
				}
				mfps := func(r tpResult) float64 { return r.fps / 1e6 }
				cpu := func(r tpResult) float64 { return r.cpuNs }
				ms := []Metric{
					spreadMetric(fmt.Sprintf("%d pairs", pairs), "Mfps", spreadOf(col(test, mfps))),
					spreadMetric(fmt.Sprintf("%d pair(s)", p), "Mfps", spreadOf(col(ref, mfps))),
					spreadMetric(fmt.Sprintf("CPU, %d pairs", pairs), "ns/frame", spreadOf(col(test, cpu))),
					spreadMetric(fmt.Sprintf("CPU, %d pair(s)", p), "ns/frame", spreadOf(col(ref, cpu))),
				}
				if mode == softnet.ModeEvent {
					perKick := func(r tpResult) float64 { return r.perKick }
					ms = append(ms, spreadMetric(fmt.Sprintf("frames per kick, %d pairs", pairs), "", spreadOf(col(test, perKick))),
						spreadMetric(fmt.Sprintf("frames per kick, %d pair(s)", p), "", spreadOf(col(ref, perKick))))
				}
				h.add(Result{Suite: suite, Name: name, Params: params, Metrics: ms})
				perCPU := func(r tpResult) float64 { return 1e9 / r.cpuNs }
				h.addComparison(suite, name+": frames/s ratio", params, Compare(col(test, mfps), col(ref, mfps)), "")
				h.addComparison(suite, name+": frames per CPU-second ratio", params, Compare(col(test, perCPU), col(ref, perCPU)), "")
				if sm.group {
					vs := fmt.Sprintf("poll group against a goroutine per queue, %d pairs on %d core(s)", pairs, p)
					if sm.coreDrivers {
						vs += ", driver per core"
					}
					h.add(Result{Suite: suite, Name: vs, Params: params, Metrics: []Metric{
						spreadMetric("poll group", "Mfps", spreadOf(col(test, mfps))),
						spreadMetric("goroutine per queue", "Mfps", spreadOf(col(own, mfps))),
						spreadMetric("CPU, poll group", "ns/frame", spreadOf(col(test, cpu))),
						spreadMetric("CPU, goroutine per queue", "ns/frame", spreadOf(col(own, cpu))),
					}})
					h.addComparison(suite, vs+": frames/s ratio", params, Compare(col(test, mfps), col(own, mfps)), "")
					h.addComparison(suite, vs+": frames per CPU-second ratio", params, Compare(col(test, perCPU), col(own, perCPU)), "")
				}
			}
		}
	}
}

// scaleMode is how the device of a pair comparison processes its queues,
// and how its driver side runs.
type scaleMode struct {
	name string
	mode softnet.Mode
	// group: ModePoll with the transmit queues on a softnet.PollGroup of
	// one worker per core, rather than a goroutine per queue.
	group bool
	// coreDrivers: the pairs' drivers run on one busy-polling goroutine per
	// core, each driving its share of the pairs in turn (as a guest's vCPUs
	// run the NAPI polls of the queues they own), rather than on a
	// goroutine per pair. Poll mode only: such a driver takes no
	// interrupts.
	coreDrivers bool
}

// workers is the poll group's worker count on cores cores (0: no group).
func (m scaleMode) workers(cores int) int {
	if !m.group {
		return 0
	}
	return cores
}

// drivers is how many driver goroutines share the pairs on cores cores (0:
// one per pair).
func (m scaleMode) drivers(cores int) int {
	if !m.coreDrivers {
		return 0
	}
	return cores
}

// driverGoroutines is how many driver goroutines a run of pairs pairs on
// cores cores has in mode m.
func driverGoroutines(m scaleMode, pairs, cores int) int {
	if n := m.drivers(cores); n > 0 {
		return min(n, pairs)
	}
	return pairs
}

// scaleModes are the modes the pair comparison runs in.
var scaleModes = []scaleMode{
	{"event", softnet.ModeEvent, false, false},
	{"poll", softnet.ModePoll, false, false},
	{"poll-group", softnet.ModePoll, true, false},
	{"poll-group, driver per core", softnet.ModePoll, true, true},
}

// throughputPair is one queue pair's driver side.
type throughputPair struct {
	rx, tx     *vring.DriverQueue
	kick, call *vdpa.EventFD // transmitq's kick, receiveq's interrupt
	rxData     vring.GuestAddr
	rxSlots    int // receive buffers the driver cycles through
	txBuf      []vring.Buffer
	rxBuf      [1]vring.Buffer // the next receive buffer to add
	slot       int             // receive buffers added so far
	frames     uint64          // frames received
	kicks      uint64          // kicks sent
}

// pairThroughput runs one device with pairs queue pairs (loopback,
// EVENT_IDX) for d, with a driver goroutine per pair (or per core, see
// scaleMode.coreDrivers) sending 64-byte frames and reclaiming their
// loopback, and returns frames/s received.
func pairThroughput(ctx context.Context, sm scaleMode, pairs, rxSlots int, d time.Duration) (tpResult, error) {
	mode := sm.mode
	if sm.coreDrivers && mode != softnet.ModePoll {
		return tpResult{}, fmt.Errorf("scale mode %q: a driver per core busy-polls and needs a polling device", sm.name)
	}
	var group *softnet.PollGroup
	if n := sm.workers(runtime.GOMAXPROCS(0)); n > 0 {
		group = softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: n})
	}
	sw, err := softnet.New(&softnet.Options{MaxQueuePairs: uint16(pairs), MaxQueueSize: scaleQueueSize,
		FrontendCtrl: pairs > 1, NoCtrlVQ: true, Mode: mode, PollGroup: group})
	if err != nil {
		return tpResult{}, err
	}
	dev := vdpa.NewLocal(sw, nil)
	defer dev.Close()
	f := virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx, virtio.NetFMAC)
	if pairs > 1 {
		f = f.With(virtio.NetFMQ)
	}
	// Each queue's ring (16 KiB) then its buffers: rxSlots receive
	// buffers of 512 bytes, or the transmit frame.
	stride := vring.GuestAddr(0x4000 + (rxSlots*512+4095)&^4095)
	region, err := vring.NewMemfdRegion(0, uint64(2*pairs)*uint64(stride), nil)
	if err != nil {
		return tpResult{}, err
	}
	mem, err := vring.NewMemory(region)
	if err != nil {
		region.Close()
		return tpResult{}, err
	}
	defer mem.Close()
	st := virtio.StatusAcknowledge | virtio.StatusDriver
	for _, err := range []error{dev.SetStatus(st), dev.SetFeatures(f), dev.SetStatus(st | virtio.StatusFeaturesOK), dev.SetMemory(mem)} {
		if err != nil {
			return tpResult{}, err
		}
	}
	ps := make([]throughputPair, pairs)
	hdr := virtio.NetHdrLen(f)
	mac := sw.MAC()
	for i := range ps {
		for _, q := range []int{2 * i, 2*i + 1} {
			base := vring.GuestAddr(q) * stride
			layout := vring.ContiguousLayout(base, scaleQueueSize)
			dq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: q, Layout: layout, Features: f})
			if err != nil {
				return tpResult{}, err
			}
			efd, err := vdpa.NewEventFD()
			if err != nil {
				return tpResult{}, err
			}
			defer efd.Close()
			var bind error
			if q%2 == 0 {
				bind = dev.SetQueueCall(q, efd)
			} else {
				bind = dev.SetQueueKick(q, efd)
			}
			for _, err := range []error{bind, dev.SetQueueNum(q, scaleQueueSize),
				dev.SetQueueAddr(q, vdpa.QueueAddr{Desc: layout.Desc, Avail: layout.Avail, Used: layout.Used}),
				dev.EnableQueue(q, true)} {
				if err != nil {
					return tpResult{}, err
				}
			}
			data := base + 0x4000
			if q%2 == 0 {
				ps[i].rx, ps[i].rxData, ps[i].call, ps[i].rxSlots = dq, data, efd, rxSlots
				ps[i].rxBuf[0] = vring.Buffer{Len: 512, Writable: true}
				continue
			}
			ps[i].tx, ps[i].kick = dq, efd
			frame := make([]byte, hdr+64)
			copy(frame[hdr:], mac[:])
			if err := mem.Write(data, frame); err != nil {
				return tpResult{}, err
			}
			ps[i].txBuf = []vring.Buffer{{Addr: data, Len: uint32(len(frame))}}
		}
	}
	if err := dev.SetStatus(st | virtio.StatusFeaturesOK | virtio.StatusDriverOK); err != nil {
		return tpResult{}, err
	}
	var stop atomic.Bool
	var total, kicks atomic.Uint64
	var wg sync.WaitGroup
	errc := make(chan error, pairs)
	start := make(chan struct{})
	if drivers := sm.drivers(runtime.GOMAXPROCS(0)); drivers > 0 {
		sets := make([][]*throughputPair, min(drivers, pairs))
		for i := range ps {
			sets[i%len(sets)] = append(sets[i%len(sets)], &ps[i])
		}
		for _, set := range sets {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				n, k, err := driveAll(set, &stop)
				total.Add(n)
				kicks.Add(k)
				if err != nil {
					errc <- err
				}
			}()
		}
	} else {
		for i := range ps {
			wg.Add(1)
			go func(p *throughputPair) {
				defer wg.Done()
				<-start
				n, k, err := p.drive(mode == softnet.ModeEvent, &stop)
				total.Add(n)
				kicks.Add(k)
				if err != nil {
					errc <- err
				}
			}(&ps[i])
		}
	}
	cpu0 := cpuTime()
	t0 := time.Now()
	close(start)
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
	stop.Store(true)
	for i := range ps {
		_ = ps[i].call.Signal() // wake drivers waiting for an interrupt
	}
	wg.Wait()
	el := time.Since(t0)
	cpu := cpuTime() - cpu0
	close(errc)
	if err := <-errc; err != nil {
		return tpResult{}, err
	}
	for q := range 2 * pairs {
		if err := sw.QueueErr(q); err != nil {
			return tpResult{}, fmt.Errorf("queue %d: %w", q, err)
		}
	}
	n := float64(total.Load())
	return tpResult{fps: n / el.Seconds(), cpuNs: float64(cpu.Nanoseconds()) / n, perKick: n / float64(max(kicks.Load(), 1))}, ctx.Err()
}

// tpResult is one throughput run: frames/s received, and CPU time of the
// whole process (driver and device) per frame.
type tpResult struct{ fps, cpuNs, perKick float64 }

// cpuTime is the process's user+system CPU time (getrusage).
func cpuTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// drive is one pair's driver: it keeps half the receive ring stocked,
// transmits in batches of 32 with a kick when the device asks for one, and
// reclaims both rings. With nothing to reclaim it waits for a receive
// interrupt (wait) or yields. It returns the frames received and the kicks
// it sent.
func (p *throughputPair) drive(wait bool, stop *atomic.Bool) (frames, kicks uint64, err error) {
	p.rx.DisableInterrupts()
	p.tx.DisableInterrupts()
	for !stop.Load() {
		progress, err := p.step()
		if err != nil {
			return p.frames, p.kicks, err
		}
		if progress {
			continue
		}
		if !wait {
			runtime.Gosched()
			continue
		}
		pending, err := p.rx.EnableInterrupts()
		if err != nil {
			return p.frames, p.kicks, err
		}
		if !pending {
			if _, err := p.call.Wait(context.Background()); err != nil {
				return p.frames, p.kicks, err
			}
		}
		p.rx.DisableInterrupts()
	}
	return p.frames, p.kicks, nil
}

// driveAll is the driver of several pairs on one goroutine, as a guest's
// vCPU runs the NAPI polls of the queues it owns: one step of each pair in
// turn, yielding when a whole round made no progress. It busy-polls (no
// interrupts) and returns the frames received and the kicks sent.
func driveAll(ps []*throughputPair, stop *atomic.Bool) (frames, kicks uint64, err error) {
	for _, p := range ps {
		p.rx.DisableInterrupts()
		p.tx.DisableInterrupts()
	}
	defer func() {
		for _, p := range ps {
			frames += p.frames
			kicks += p.kicks
		}
	}()
	for !stop.Load() {
		progress := false
		for _, p := range ps {
			ok, err := p.step()
			if err != nil {
				return 0, 0, err
			}
			progress = progress || ok
		}
		if !progress {
			runtime.Gosched()
		}
	}
	return 0, 0, nil
}

// step is one pass of a pair's driver: stock the receive ring to half,
// transmit up to a batch of 32 (kicking when the device asks), and reclaim
// both rings. It reports whether anything was reclaimed.
func (p *throughputPair) step() (progress bool, err error) {
	const batch = 32
	rx, tx := p.rx, p.tx
	size := int(rx.Size())
	for rx.Outstanding() < size/2 {
		p.rxBuf[0].Addr = p.rxData + vring.GuestAddr(p.slot%p.rxSlots)*512
		p.slot++
		if _, err := rx.Add(p.rxBuf[:]); err != nil {
			return false, err
		}
	}
	rx.Publish()
	added := 0
	for added < batch && tx.Outstanding() < size/2 {
		if _, err := tx.Add(p.txBuf); err != nil {
			return false, err
		}
		added++
	}
	if added > 0 {
		tx.Publish()
		if tx.NeedsKick() {
			p.kicks++
			if err := p.kick.Signal(); err != nil {
				return false, err
			}
		}
	}
	for {
		_, _, ok, err := tx.Reclaim()
		if err != nil {
			return false, err
		}
		if !ok {
			break
		}
		progress = true
	}
	for {
		_, _, ok, err := rx.Reclaim()
		if err != nil {
			return false, err
		}
		if !ok {
			break
		}
		p.frames++
		progress = true
	}
	return progress, nil
}
