package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Peers runs the peer comparisons selected with -peers.
func (h *Harness) Peers(ctx context.Context) {
	if len(h.cfg.Peers) == 0 {
		h.skip("peers", "all", nil, "no peers selected (-peers \"\")")
		return
	}
	for _, p := range h.cfg.Peers {
		if ctx.Err() != nil {
			return
		}
		switch p {
		case "ringtest":
			h.peerRingtest(ctx)
		case "dpdk":
			h.peerDPDK(ctx)
		}
	}
}

// peerTime is how long one peer run should last.
func (h *Harness) peerTime() time.Duration {
	if h.cfg.Short {
		return 150 * time.Millisecond
	}
	d := 4 * h.cfg.duration
	if d < time.Second {
		d = time.Second
	}
	return d
}

// peerRingtest compares the library's cross-thread split ring with the
// kernel's tools/virtio/ringtest: the same CPUs, ring size and number of
// chains, in interleaved rounds (kernel, library, kernel, library, ...) so
// that load from other processes on a shared machine hits both alike. Each
// comparison reports the median and range of both sides and of the
// per-round ratio, and says when it is inconclusive (see Compare).
func (h *Harness) peerRingtest(ctx context.Context) {
	const suite = "peers"
	base := map[string]any{"ring_size": h.cfg.RingSize, "host_cpu": h.cfg.HostCPU, "guest_cpu": h.cfg.GuestCPU,
		"pinning": fmt.Sprintf("device/host thread on CPU %d, driver/guest thread on CPU %d, both sides", h.cfg.HostCPU, h.cfg.GuestCPU)}
	h.prog.Step("peers: preparing the kernel's tools/virtio/ringtest")
	dir, err := ensureRingtest(ctx, h.cfg.CacheDir, h.prog)
	if err != nil {
		for _, p := range ringtestPrograms {
			h.skip(suite, "kernel ringtest "+p, base, "ringtest unavailable: "+err.Error())
		}
		return
	}
	v09 := filepath.Join(dir, "virtio_ring_0_9")
	// Calibrate the run length on the kernel's ring so one run lasts about
	// peerTime(); the library runs exactly as many chains.
	args := RingtestArgs{HostCPU: h.cfg.HostCPU, GuestCPU: h.cfg.GuestCPU, RingSize: h.cfg.RingSize, Batch: 1, RunCycles: 100000}
	h.prog.Step("peers: calibrating ringtest run length")
	el, err := runRingtest(ctx, v09, args)
	if err != nil {
		h.fail(suite, "kernel ringtest virtio_ring_0_9", base, err)
		return
	}
	n := int(float64(args.RunCycles) * h.peerTime().Seconds() / el.Seconds())
	n = max(50000, min(n, 50_000_000))
	args.RunCycles = n

	// Each kernel program is paired with the library run it is compared
	// with: virtio_ring_0_9 (the virtio layout, one buffer published at a
	// time) with the library publishing per chain, and ring (no virtio
	// layout: the cross-core limit) with the library batching.
	batchN := max(1, maxInt(h.cfg.Batches))
	// A packed ring, batched, is compared with ring too: its layout is
	// ring's (descriptors the two sides hand back and forth in place).
	pairs := []struct {
		prog   string
		batch  int
		packed bool
	}{{"virtio_ring_0_9", 1, false}, {"ring", batchN, false}, {"ring", batchN, true}}
	libName := func(batch int, packed bool) string {
		if packed {
			return fmt.Sprintf("vdpakit cross-thread packed, batch %d", batch)
		}
		return fmt.Sprintf("vdpakit cross-thread, batch %d", batch)
	}
	kernel := map[string][]float64{}
	lib := map[string][]float64{}
	var libErr error
	for r := 0; r < h.cfg.PeerRounds && ctx.Err() == nil; r++ {
		for i, pr := range pairs {
			// ring runs once a round; both of its library partners are
			// paired with that run.
			if i == 0 || pairs[i-1].prog != pr.prog {
				h.prog.Step("peers: round %d/%d kernel ringtest %s, %d chains", r+1, h.cfg.PeerRounds, pr.prog, n)
				el, err := runRingtest(ctx, filepath.Join(dir, pr.prog), args)
				if err != nil {
					h.fail(suite, "kernel ringtest "+pr.prog, base, err)
					return
				}
				kernel[pr.prog] = append(kernel[pr.prog], mppsOf(n, el))
			}
			if libErr != nil {
				continue
			}
			name := libName(pr.batch, pr.packed)
			h.prog.Step("peers: round %d/%d %s, %d chains", r+1, h.cfg.PeerRounds, name, n)
			el, err := libCrossThread(ctx, crossOptions{
				RingSize: h.cfg.RingSize, Descs: 1, Batch: pr.batch, Chains: n,
				HostCPU: h.cfg.HostCPU, GuestCPU: h.cfg.GuestCPU, Packed: pr.packed,
			})
			if err != nil {
				libErr = err
				continue
			}
			// Round r of the kernel program and of its library partners
			// are sample r of each side: one pair per round.
			lib[name] = append(lib[name], mppsOf(n, el))
		}
	}
	params := func(extra map[string]any) map[string]any {
		p := map[string]any{"run_cycles": n}
		for k, v := range base {
			p[k] = v
		}
		for k, v := range extra {
			p[k] = v
		}
		return p
	}
	for i, pr := range pairs {
		if i == 0 || pairs[i-1].prog != pr.prog {
			ks := spreadOf(kernel[pr.prog])
			h.add(Result{Suite: suite, Name: "kernel ringtest " + pr.prog,
				Params:  params(map[string]any{"batch": 1, "program": pr.prog, "samples_mpps": kernel[pr.prog]}),
				Metrics: []Metric{spreadMetric("mpps", "Mpps", ks)},
				Note:    "C, busy-polling, one thread per CPU"})
		}
		name := libName(pr.batch, pr.packed)
		format := map[bool]string{false: "split", true: "packed"}[pr.packed]
		if libErr != nil {
			h.skip(suite, name, params(map[string]any{"batch": pr.batch, "format": format}), libErr.Error())
			continue
		}
		c := Compare(lib[name], kernel[pr.prog])
		h.add(Result{Suite: suite, Name: name, Params: params(map[string]any{"batch": pr.batch, "descs": 1, "format": format, "samples_mpps": lib[name]}),
			Metrics: []Metric{spreadMetric("mpps", "Mpps", c.A)}})
		note := ""
		if pr.batch > 1 {
			note = "ringtest publishes each buffer; vdpakit batches"
		}
		ratio := fmt.Sprintf("ratio vdpakit(batch %d) / kernel %s", pr.batch, pr.prog)
		if pr.packed {
			ratio = fmt.Sprintf("ratio vdpakit(packed, batch %d) / kernel %s", pr.batch, pr.prog)
		}
		h.addComparison(suite, ratio, params(map[string]any{"batch": pr.batch, "format": format}), c, note)
	}
}

// addComparison records the per-round ratio of a comparison, with its
// range and verdict.
func (h *Harness) addComparison(suite, name string, params map[string]any, c Comparison, note string) {
	p := copyParams(params)
	p["verdict"] = c.Verdict()
	p["inconclusive"] = c.Inconclusive
	if c.Why != "" {
		p["inconclusive_why"] = c.Why
	}
	p["round_pairs"] = c.Ratio.N
	if !math.IsNaN(c.Overlap) {
		p["range_overlap"] = c.Overlap
		p["median_gap"] = c.Gap
	}
	if c.Ratio.N == 0 {
		h.fail(suite, name, p, errors.New("no round produced both sides"))
		return
	}
	v := "conclusive"
	if c.Inconclusive {
		v = "INCONCLUSIVE: " + c.Why
	}
	if note != "" {
		v = note + "; " + v
	}
	h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{spreadMetric("ratio", "x", c.Ratio)}, Note: v})
}

func maxInt(v []int) int {
	m := 0
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

// vhostBackend is a vhost-user back-end that dpdk-testpmd's virtio-user
// front-end connects to: DPDK's own net_vhost, or the library's.
type vhostBackend interface {
	Name() string
	// Start listens on sock (server mode) with sc.queues queue pairs,
	// every thread of the back-end pinned to cpu. sc.loopback selects
	// whether frames the front-end transmits come back on its receive
	// queue (io forward) or are consumed and dropped (rxonly); the ring
	// format is the front-end's choice (both back-ends offer both).
	Start(ctx context.Context, sock string, sc scenario, cpu int) error
	// Pid is the back-end's process id while it runs.
	Pid() int
	// Alive returns an error if the back-end has died.
	Alive() error
	// Stop ends the back-end and reports frames it received and sent.
	Stop() (rx, tx uint64, err error)
}

// dpdkVhost is testpmd with a net_vhost vdev.
type dpdkVhost struct {
	bin  string
	p    *testpmdProc
	seq  int
	fwd  string
	sock string
}

func (d *dpdkVhost) Name() string { return "DPDK net_vhost" }

func (d *dpdkVhost) Pid() int { return d.p.cmd.Process.Pid }

func (d *dpdkVhost) Start(ctx context.Context, sock string, sc scenario, cpu int) error {
	d.seq++
	d.fwd = "rxonly"
	if sc.loopback {
		d.fwd = "io"
	}
	p, err := startTestpmd(d.bin, TestpmdArgs{
		CPU:        cpu,
		FilePrefix: fmt.Sprintf("vdpakit-bench-%d-be%d", os.Getpid(), d.seq),
		Vdev:       fmt.Sprintf("net_vhost0,iface=%s,queues=%d", sock, sc.queues),
		Forward:    d.fwd,
		Queues:     sc.queues,
	})
	if err != nil {
		return err
	}
	d.p = p
	d.sock = sock
	return nil
}

func (d *dpdkVhost) Alive() error {
	if ok, err := d.p.exited(); ok {
		return fmt.Errorf("testpmd net_vhost exited (%v): %s", err, tailLines(d.p.output(), 5))
	}
	return nil
}

func (d *dpdkVhost) Stop() (uint64, uint64, error) {
	out := d.p.stop(10 * time.Second)
	st := ParseTestpmd(out)
	if !st.HaveFwd {
		return 0, 0, fmt.Errorf("testpmd net_vhost printed no forward statistics: %s", tailLines(out, 5))
	}
	return st.FwdRx, st.FwdTx, nil
}

// scenario is one testpmd virtio-user run: the mode, the number of queue
// pairs and the ring format (packed: virtio-user packed_vq=1; both
// back-ends offer RING_PACKED); a loopback's frames in circulation per
// queue pair (testpmd's --burst; 0 and defaultLoopbackFrames are testpmd's
// default).
type scenario struct {
	loopback bool
	queues   int
	packed   bool
	frames   int
}

// defaultLoopbackFrames is testpmd's default burst: the frames --tx-first
// sends, and so those a macswap loopback keeps in circulation.
const defaultLoopbackFrames = 32

func (sc scenario) mode() string {
	m := "txonly"
	if sc.loopback {
		m = "macswap loopback"
		if sc.frames != 0 && sc.frames != defaultLoopbackFrames {
			m += fmt.Sprintf(" %d frames", sc.frames)
		}
	}
	if sc.packed {
		m += " packed"
	}
	return m
}

// peerScenarios lists the testpmd runs of the peers suite: for every
// queue-pair count, txonly and a loopback per frame count, on split
// rings; then the same for one pair on packed rings.
func peerScenarios(queuePairs, loopbackFrames []int) []scenario {
	var out []scenario
	add := func(q int, packed bool) {
		out = append(out, scenario{queues: q, packed: packed})
		for _, n := range loopbackFrames {
			out = append(out, scenario{loopback: true, queues: q, packed: packed, frames: n})
		}
	}
	for _, q := range queuePairs {
		add(q, false)
	}
	add(1, true)
	return out
}

// scenarioRun is what one run measured: the front-end's steady rate and
// where the threads of both processes were allowed to run.
type scenarioRun struct {
	mpps              float64
	frontPin, backPin string
}

// dpdkScenario runs testpmd's virtio-user front-end against a back-end for
// runFor and returns the front-end's steady rate in Mpps: transmit rate in
// txonly mode, receive rate in macswap loopback mode. The back-end is
// pinned (every thread) to hostCPU, the front-end to guestCPU.
func dpdkScenario(ctx context.Context, bin string, be vhostBackend, sc scenario, runFor time.Duration, hostCPU, guestCPU int, seq int) (scenarioRun, error) {
	var run scenarioRun
	dir, err := os.MkdirTemp("", "vdpakit-bench-vu-")
	if err != nil {
		return run, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "vhost.sock")
	if err := be.Start(ctx, sock, sc, hostCPU); err != nil {
		return run, fmt.Errorf("%s: %w", be.Name(), err)
	}
	beStopped := false
	defer func() {
		if !beStopped {
			be.Stop()
		}
	}()
	if err := waitForSocket(ctx, sock, 15*time.Second, be.Alive); err != nil {
		return run, fmt.Errorf("%s: %w", be.Name(), err)
	}
	fa := TestpmdArgs{
		CPU:        guestCPU,
		FilePrefix: fmt.Sprintf("vdpakit-bench-%d-fe%d", os.Getpid(), seq),
		Vdev:       fmt.Sprintf("net_virtio_user0,path=%s,queues=%d", sock, sc.queues) + map[bool]string{true: ",packed_vq=1"}[sc.packed],
		Forward:    "txonly",
		Queues:     sc.queues,
	}
	if sc.loopback {
		fa.Forward, fa.TxFirst = "macswap", true
		if sc.frames != defaultLoopbackFrames {
			fa.Burst = sc.frames
		}
	}
	fe, err := startTestpmd(bin, fa)
	if err != nil {
		return run, err
	}
	// The run is timed from when the front-end starts forwarding: on a
	// loaded machine EAL initialisation and the vhost-user handshake can
	// take seconds, which must not come out of the measured window.
	if err := waitForOutput(ctx, fe, "start packet forwarding", 30*time.Second); err != nil {
		fe.stop(10 * time.Second)
		return run, err
	}
	// Record where every thread may run once both sides are up (half-way
	// through the run): the pinning is printed with the result.
	half := time.After(runFor / 2)
	end := time.After(runFor)
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case <-half:
			if m, err := cpusAllowed(fe.cmd.Process.Pid); err == nil {
				run.frontPin = pinSummary(m)
			}
			if m, err := cpusAllowed(be.Pid()); err == nil {
				run.backPin = pinSummary(m)
			}
		case <-end:
			break wait
		case err := <-fe.done:
			fe.done <- err
			break wait
		}
	}
	early, _ := fe.exited()
	out := fe.stop(10 * time.Second)
	beStopped = true
	rx, tx, beErr := be.Stop()
	if ctx.Err() != nil {
		return run, ctx.Err()
	}
	if early {
		return run, fmt.Errorf("testpmd virtio-user exited early: %s", tailLines(out, 8))
	}
	st := ParseTestpmd(out)
	samples := st.TxPPS
	if sc.loopback {
		samples = st.RxPPS
	}
	if beErr != nil {
		return run, fmt.Errorf("%s: %w", be.Name(), beErr)
	}
	rate := SteadyRate(samples)
	if rate == 0 {
		// No full period with traffic (a starved run on a loaded machine):
		// fall back to the front-end's total over the whole run, a lower
		// bound.
		total := st.FwdTx
		if sc.loopback {
			total = st.FwdRx
		}
		rate = float64(total) / runFor.Seconds()
	}
	if rate == 0 {
		return run, fmt.Errorf("no traffic against %s (back-end rx %d tx %d): %s", be.Name(), rx, tx, tailLines(out, 8))
	}
	run.mpps = rate / 1e6
	return run, nil
}

// peerDPDK measures testpmd's virtio-user against DPDK's net_vhost and
// against the library's vhost-user back-end, interleaved: in every round,
// for every mode and queue-pair count, net_vhost and then vdpakit, with the
// same pinning and duration.
func (h *Harness) peerDPDK(ctx context.Context) {
	const suite = "peers"
	bin, err := exec.LookPath("dpdk-testpmd")
	if err != nil {
		h.skip(suite, "DPDK testpmd", nil, "dpdk-testpmd not installed (Debian package dpdk-dev)")
		return
	}
	runFor := 2500 * time.Millisecond
	if !h.cfg.Short {
		runFor = max(3500*time.Millisecond, 12*h.cfg.duration)
	}
	dpdk := &dpdkVhost{bin: bin}
	lib, libErr := newLibVhost(h.cfg.ProfileDir)
	if lib != nil {
		lib.pollGroup = h.cfg.VhostPollGroup
	}
	// Packed rings (one queue pair, both modes) are interleaved with the
	// split runs round by round, so the formats compare in the same run.
	scenarios := peerScenarios(h.cfg.QueuePairs, h.cfg.LoopbackFrames)
	key := func(sc scenario, be vhostBackend) string {
		return fmt.Sprintf("%s|%d|%s", sc.mode(), sc.queues, be.Name())
	}
	// rates[key] has one entry per round (NaN when that run failed), so
	// index r of both back-ends is round r.
	rates := map[string][]float64{}
	// probes[key] has the cross-CPU round trip (ns) measured just before
	// each round's run, index r for round r, as rates.
	probes := map[string][]float64{}
	pins := map[string]scenarioRun{}
	failed := map[string]error{}
	seq := 0
	for r := 0; r < h.cfg.PeerRounds && ctx.Err() == nil; r++ {
		for _, sc := range scenarios {
			bes := []vhostBackend{dpdk}
			if libErr == nil {
				bes = append(bes, lib)
			}
			for _, be := range bes {
				k := key(sc, be)
				if failed[k] != nil {
					rates[k] = append(rates[k], math.NaN())
					probes[k] = append(probes[k], math.NaN())
					continue
				}
				probes[k] = append(probes[k], probeState(h.cfg.HostCPU, h.cfg.GuestCPU))
				seq++
				h.prog.Step("peers: round %d/%d testpmd virtio-user %s, %d queue pair(s), against %s (%v)", r+1, h.cfg.PeerRounds, sc.mode(), sc.queues, be.Name(), runFor)
				run, err := dpdkScenario(ctx, bin, be, sc, runFor, h.cfg.HostCPU, h.cfg.GuestCPU, seq)
				if err != nil {
					failed[k] = err
					rates[k] = append(rates[k], math.NaN())
					continue
				}
				rates[k] = append(rates[k], run.mpps)
				pins[k] = run
			}
		}
	}
	for _, sc := range scenarios {
		params := map[string]any{"mode": sc.mode(), "queues": sc.queues, "packed": sc.packed, "run_for": runFor.String(),
			"frontend_cpu": h.cfg.GuestCPU, "backend_cpu": h.cfg.HostCPU, "frame_bytes": 64}
		if sc.loopback {
			params["frames_in_circulation"] = sc.frames
		}
		if h.cfg.VhostPollGroup {
			params["vdpakit_polling"] = "every queue on one softnet.PollGroup worker"
		} else {
			params["vdpakit_polling"] = "a goroutine per transmit queue"
		}
		label := fmt.Sprintf("testpmd %s, %dq", sc.mode(), sc.queues)
		one := func(be vhostBackend) (Spread, bool) {
			k := key(sc, be)
			p := copyParams(params)
			p["backend"] = be.Name()
			p["samples_mpps"] = finite(rates[k])
			p["xcpu_round_trip_ns"] = finite(probes[k])
			if run, ok := pins[k]; ok {
				p["pinning"] = fmt.Sprintf("front-end testpmd: %s; back-end: %s", run.frontPin, run.backPin)
			}
			if err := failed[k]; err != nil && !errors.Is(err, context.Canceled) {
				h.fail(suite, label+" vs "+be.Name(), p, err)
				return Spread{}, false
			}
			s := spreadOf(rates[k])
			if s.N == 0 {
				return s, false
			}
			h.add(Result{Suite: suite, Name: label + " vs " + be.Name(), Params: p, Metrics: []Metric{spreadMetric("mpps", "Mpps", s)}})
			return s, true
		}
		_, dpdkOK := one(dpdk)
		if libErr != nil {
			h.skip(suite, label+" vs vdpakit vhost-user", params, libErr.Error())
			continue
		}
		if _, ok := one(lib); ok && dpdkOK {
			c := Compare(rates[key(sc, lib)], rates[key(sc, dpdk)])
			// Rounds that ran in different machine states (see xcpu.go)
			// compare nothing: the state moves both sides by more than
			// the difference being measured.
			changed, span := stateChanged(probes[key(sc, lib)], probes[key(sc, dpdk)])
			p := copyParams(params)
			p["xcpu_round_trip"] = span
			if changed && !c.Inconclusive {
				c.Inconclusive = true
				c.Why = fmt.Sprintf("the machine changed state between rounds (%s, more than %.1fx)", span, stateShift)
			}
			note := span
			if bs := byState(rates[key(sc, lib)], rates[key(sc, dpdk)], probes[key(sc, lib)], probes[key(sc, dpdk)]); bs != "" {
				note += "; " + bs
				p["by_state"] = bs
			}
			h.addComparison(suite, "ratio "+label+": vdpakit / DPDK net_vhost", p, c, note)
		}
	}
}

// finite returns v without its NaN entries (rounds that did not run), for
// the JSON report.
func finite(v []float64) []float64 {
	out := make([]float64, 0, len(v))
	for _, x := range v {
		if !math.IsNaN(x) {
			out = append(out, x)
		}
	}
	return out
}

func copyParams(p map[string]any) map[string]any {
	out := make(map[string]any, len(p)+2)
	for k, v := range p {
		out[k] = v
	}
	return out
}

// waitForOutput waits until testpmd p has printed marker, p exits, the
// context ends or timeout passes.
func waitForOutput(ctx context.Context, p *testpmdProc, marker string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !bytes.Contains(p.output(), []byte(marker)) {
		if ok, err := p.exited(); ok {
			return fmt.Errorf("testpmd virtio-user exited before forwarding (%v): %s", err, tailLines(p.output(), 8))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testpmd virtio-user did not start forwarding within %v: %s", timeout, tailLines(p.output(), 8))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}
