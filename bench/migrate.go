package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vring"
)

// migNode is one side of a migration: guest memory and a mediated
// virtio-net device backed by the in-process software device.
type migNode struct {
	mem *vring.Memory
	dev *mdev.Device
	sw  *softnet.Device
}

func newMigNode(size uint64, mode mdev.DirtyMode) (*migNode, error) {
	r, err := vring.NewMemfdRegion(0, size, &vring.RegionOptions{Name: "vdpakit-bench-guest"})
	if err != nil {
		return nil, err
	}
	mem, err := vring.NewMemory(r)
	if err != nil {
		r.Close()
		return nil, err
	}
	sw, err := softnet.New(&softnet.Options{NoCtrlVQ: true})
	if err != nil {
		mem.Close()
		return nil, err
	}
	dev, err := mdev.NewDevice(vdpa.NewLocal(sw, nil), &mdev.Options{Memory: mem, Backend: "software", DirtyMode: mode})
	if err != nil {
		mem.Close()
		return nil, err
	}
	return &migNode{mem: mem, dev: dev, sw: sw}, nil
}

func (n *migNode) Close() {
	n.dev.Close()
	n.mem.Close()
}

// runningGuest is the guest driver and a vCPU-like memory writer, running
// until stopped.
type runningGuest struct {
	g      *mdevtest.Guest
	d      *mdevtest.Dirtier
	cancel context.CancelFunc
	wg     sync.WaitGroup
	err    error
}

func startGuest(g *mdevtest.Guest, d *mdevtest.Dirtier) *runningGuest {
	ctx, cancel := context.WithCancel(context.Background())
	rg := &runningGuest{g: g, d: d, cancel: cancel}
	rg.wg.Add(1)
	go func() {
		defer rg.wg.Done()
		rg.err = g.Run(ctx)
	}()
	if d != nil {
		rg.wg.Add(1)
		go func() {
			defer rg.wg.Done()
			d.Run(ctx)
		}()
	}
	return rg
}

// stop pauses the guest like stopping its vCPUs: every writer has returned
// when it does.
func (rg *runningGuest) stop() error {
	rg.cancel()
	rg.wg.Wait()
	return rg.err
}

// linkBandwidth measures TCP loopback throughput with 1 MiB writes: the
// migration link's bandwidth the pre-copy tracker plans with.
func linkBandwidth(ctx context.Context) (float64, error) {
	a, b, err := tcpPair(ctx)
	if err != nil {
		return 0, err
	}
	defer a.Close()
	defer b.Close()
	const total = 256 << 20
	buf := make([]byte, 1<<20)
	done := make(chan error, 1)
	go func() {
		_, err := io.CopyN(io.Discard, b, total)
		done <- err
	}()
	start := time.Now()
	for sent := 0; sent < total; sent += len(buf) {
		if _, err := a.Write(buf); err != nil {
			return 0, err
		}
	}
	if err := <-done; err != nil {
		return 0, err
	}
	return total / time.Since(start).Seconds(), nil
}

// tcpPair returns both ends of a TCP connection on the loopback address.
func tcpPair(ctx context.Context) (net.Conn, net.Conn, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	type res struct {
		c   net.Conn
		err error
	}
	acc := make(chan res, 1)
	go func() {
		c, err := l.Accept()
		acc <- res{c, err}
	}()
	var d net.Dialer
	a, err := d.DialContext(ctx, "tcp", l.Addr().String())
	if err != nil {
		return nil, nil, err
	}
	r := <-acc
	if r.err != nil {
		a.Close()
		return nil, nil, r.err
	}
	return a, r.c, nil
}

// migResult is what one migration measured.
type migResult struct {
	mode              mdev.DirtyMode
	rounds            int
	downtime, total   time.Duration
	totalBytes        uint64
	finalPages        uint64
	decision          dirty.Decision
	dirtyRate         float64 // bytes/s observed by the tracker in the last pre-copy round
	framesBefore      uint64  // frames the guest had received on the source
	framesAfter       uint64  // frames received on the destination after resuming
	written           uint64  // pages written by the vCPU writer
	stateBytes        int
	precopyRoundPages []uint64
	breakdown         map[string]float64 // downtime phases, ms
}

// migrateOnce boots a guest with traffic on a source device, dirties its
// memory at rate bytes/s, migrates it over TCP loopback to a destination
// with mdev.MigrateSource/MigrateDestination, and lets it run there
// briefly to check that traffic continues with no frame lost or repeated.
func migrateOnce(ctx context.Context, size uint64, mode mdev.DirtyMode, rate float64, bandwidth float64, target, warm time.Duration) (*migResult, error) {
	src, err := newMigNode(size, mode)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	dst, err := newMigNode(size, mode)
	if err != nil {
		return nil, err
	}
	defer dst.Close()
	log, err := dirty.New(size, nil)
	if err != nil {
		return nil, err
	}
	defer log.Close()

	// One byte of guest memory counts each frame number: a quarter of the
	// guest keeps the driver sending for the whole run.
	gopts := &mdevtest.Options{MaxFrames: size / 4}
	g, err := mdevtest.Boot(src.dev, src.mem, 0, gopts)
	if err != nil {
		return nil, fmt.Errorf("boot guest: %w", err)
	}
	g.SetLog(log)
	dirtier, err := mdevtest.NewDirtier(src.mem, mdevtest.Layout(gopts), size, rate/4096, 7)
	if err != nil {
		return nil, err
	}
	dirtier.SetLog(log)
	rg := startGuest(g, dirtier)
	stopped := false
	defer func() {
		if !stopped {
			rg.stop()
		}
	}()
	select { // traffic flowing before migration starts
	case <-time.After(warm):
	case <-ctx.Done():
		return nil, ctx.Err()
	}

	a, b, err := tcpPair(ctx)
	if err != nil {
		return nil, err
	}
	defer a.Close()
	defer b.Close()

	var dstGuest *runningGuest
	type dres struct {
		rep *mdev.DestReport
		err error
	}
	dch := make(chan dres, 1)
	go func() {
		rep, err := mdev.MigrateDestination(ctx, b, mdev.DestOptions{Device: dst.dev, Memory: dst.mem,
			StartGuest: func() error {
				g2, err := mdevtest.Attach(dst.dev, dst.mem)
				if err != nil {
					return err
				}
				dstGuest = startGuest(g2, nil)
				return nil
			}})
		dch <- dres{rep, err}
	}()
	var before uint64
	start := time.Now()
	rep, err := mdev.MigrateSource(ctx, a, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: log,
		Tracker: dirty.TrackerOptions{Bandwidth: bandwidth, DowntimeTarget: target},
		StopGuest: func() error {
			stopped = true
			err := rg.stop()
			_, before, _, _ = g.Stats()
			return err
		},
	})
	total := time.Since(start)
	if err != nil {
		a.Close()
		d := <-dch
		return nil, errors.Join(fmt.Errorf("source: %w", err), d.err)
	}
	d := <-dch
	if d.err != nil {
		return nil, fmt.Errorf("destination: %w", d.err)
	}
	if dstGuest == nil {
		return nil, errors.New("destination did not start the guest")
	}
	// Traffic must go on at the destination.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if _, r, _, _ := dstGuest.g.Stats(); r > before+64 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err := dstGuest.stop(); err != nil {
		return nil, fmt.Errorf("destination guest: %w", err)
	}
	_, after, dup, bad := dstGuest.g.Stats()
	if dup != 0 || bad != 0 {
		return nil, fmt.Errorf("after migration: %d duplicate and %d corrupt frames", dup, bad)
	}
	if after <= before && !dstGuest.g.Done() {
		return nil, fmt.Errorf("no traffic on the destination (received %d before, %d after)", before, after)
	}
	res := &migResult{precopyRoundPages: []uint64{}, mode: rep.Mode, rounds: len(rep.Rounds), downtime: rep.Downtime, total: total,
		totalBytes: rep.TotalBytes, finalPages: rep.Final.Pages, decision: rep.Final.Decision,
		framesBefore: before, framesAfter: after - before, written: dirtier.Written(), stateBytes: rep.StateBytes}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
	res.breakdown = map[string]float64{"stop_guest_ms": ms(rep.StopGuest), "stop_device_ms": ms(rep.StopDevice),
		"final_copy_ms": ms(rep.FinalCopy), "resume_ms": ms(rep.Resume)}
	for _, r := range rep.Rounds[1:] {
		res.precopyRoundPages = append(res.precopyRoundPages, r.Pages)
		res.dirtyRate = r.ByteRate
	}
	return res, nil
}

// trafficRate runs the guest's traffic through a mediated device for d with
// dirty tracking off, or on in the given mode, and returns frames/s.
func trafficRate(ctx context.Context, mode mdev.DirtyMode, track bool, d time.Duration) (float64, error) {
	const size = 64 << 20
	n, err := newMigNode(size, mode)
	if err != nil {
		return 0, err
	}
	defer n.Close()
	g, err := mdevtest.Boot(n.dev, n.mem, 0, nil)
	if err != nil {
		return 0, err
	}
	if track {
		log, err := dirty.New(size, nil)
		if err != nil {
			return 0, err
		}
		defer log.Close()
		got, err := n.dev.StartDirtyTrackingContext(ctx, log)
		if err != nil {
			return 0, err
		}
		if got != mode {
			return 0, fmt.Errorf("dirty tracking runs in %s mode, want %s", got, mode)
		}
		defer func() { _ = n.dev.StopDirtyTrackingContext(context.WithoutCancel(ctx)) }()
	}
	rg := startGuest(g, nil)
	time.Sleep(min(d/4, 50*time.Millisecond))
	_, r0, _, _ := g.Stats()
	t0 := time.Now()
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
	_, r1, _, _ := g.Stats()
	el := time.Since(t0)
	if err := rg.stop(); err != nil {
		return 0, err
	}
	if _, _, dup, bad := g.Stats(); dup != 0 || bad != 0 {
		return 0, fmt.Errorf("%d duplicate and %d corrupt frames", dup, bad)
	}
	return float64(r1-r0) / el.Seconds(), ctx.Err()
}

// Migrate runs the migration suite: pre-copy migration of a guest with
// traffic and a memory writer, against dirty rate and guest size, in both
// dirty-tracking modes; and the guest's traffic rate with the data path
// passed through, relayed and device-logged.
func (h *Harness) Migrate(ctx context.Context) {
	const suite = "migrate"
	h.prog.Step("migrate: measuring the TCP loopback link")
	bw, err := linkBandwidth(ctx)
	if err != nil {
		h.fail(suite, "link bandwidth", nil, err)
		return
	}
	h.add(Result{Suite: suite, Name: "TCP loopback link (pre-copy planning bandwidth)", Params: map[string]any{"transfer": "256MiB"},
		Metrics: []Metric{{Name: "bandwidth", Value: bw / 1e9, Unit: "GB/s"}}})
	warm := 50 * time.Millisecond
	modes := []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay}
	for _, size := range h.cfg.guestSize {
		for _, mode := range modes {
			for _, rate := range h.cfg.rates {
				if ctx.Err() != nil {
					return
				}
				name := fmt.Sprintf("pre-copy %s guest, %s MiB/s dirty, %s", formatSize(size), formatValue(rate), mode)
				p := map[string]any{"guest_size": formatSize(size), "guest_bytes": size, "dirty_rate_mibs": rate, "mode": mode.String(),
					"link": "TCP loopback", "planning_bandwidth_Bps": bw, "downtime_target": h.cfg.downtime.String(), "traffic": "loopback frames"}
				h.prog.Step("migrate: %s", name)
				res, err := migrateOnce(ctx, size, mode, rate*(1<<20), bw, h.cfg.downtime, warm)
				if err != nil {
					if !errors.Is(err, context.Canceled) {
						h.fail(suite, name, p, err)
					}
					continue
				}
				p["rounds"] = res.rounds
				p["precopy_round_pages"] = res.precopyRoundPages
				p["final_pages"] = res.finalPages
				p["stop_reason"] = res.decision.String()
				p["total_bytes"] = res.totalBytes
				p["state_bytes"] = res.stateBytes
				p["pages_written_by_guest"] = res.written
				p["frames_before"] = res.framesBefore
				p["frames_after_on_destination"] = res.framesAfter
				p["downtime_breakdown"] = res.breakdown
				h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{
					{Name: "downtime", Value: float64(res.downtime.Microseconds()) / 1e3, Unit: "ms"},
					{Name: "total", Value: float64(res.total.Microseconds()) / 1e3, Unit: "ms"},
					{Name: "rounds", Value: float64(res.rounds), Unit: ""},
				}})
			}
		}
	}
	// Data-path cost of each dirty-tracking mode, as guest frames/s.
	d := max(h.cfg.duration, 100*time.Millisecond)
	type run struct {
		name  string
		mode  mdev.DirtyMode
		track bool
	}
	runs := []run{{"passthrough (no tracking)", mdev.DirtyDeviceLog, false}, {"device logging", mdev.DirtyDeviceLog, true}, {"shadow relay", mdev.DirtyRelay, true}}
	rates := map[string][]float64{}
	rounds := 3
	if h.cfg.Short {
		rounds = 1
	}
	for r := 0; r < rounds && ctx.Err() == nil; r++ {
		for _, x := range runs {
			h.prog.Step("migrate: guest traffic, %s, round %d/%d", x.name, r+1, rounds)
			v, err := trafficRate(ctx, x.mode, x.track, d)
			if err != nil {
				if !errors.Is(err, context.Canceled) {
					h.fail(suite, "guest traffic, "+x.name, nil, err)
				}
				return
			}
			rates[x.name] = append(rates[x.name], v)
		}
	}
	base := median(rates[runs[0].name])
	for _, x := range runs {
		m := median(rates[x.name])
		p := map[string]any{"mode": x.name, "rounds": rounds, "duration": d.String(), "queue_size": 256, "frame_bytes": "22-1021"}
		ms := []Metric{{Name: "mpps", Value: m / 1e6, Unit: "Mpps"}}
		if x.track {
			ms = append(ms, Metric{Name: "vs passthrough", Value: ratio(m, base), Unit: "x"})
		}
		h.add(Result{Suite: suite, Name: "guest traffic, " + x.name, Params: p, Metrics: ms})
	}
}
