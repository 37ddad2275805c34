package main

import (
	"context"
	"errors"
	"fmt"
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
// kernel's tools/virtio/ringtest: the same CPUs, ring size, batch and number
// of chains, rounds interleaved so that load from other processes on a
// shared machine hits both alike; the median of the rounds is reported.
func (h *Harness) peerRingtest(ctx context.Context) {
	const suite = "peers"
	base := map[string]any{"ring_size": h.cfg.RingSize, "host_cpu": h.cfg.HostCPU, "guest_cpu": h.cfg.GuestCPU}
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

	batches := []int{1}
	if mb := maxInt(h.cfg.Batches); mb > 1 {
		batches = append(batches, mb)
	}
	kernel := map[string][]float64{}
	lib := map[int][]float64{}
	var libErr error
	for r := 0; r < h.cfg.PeerRounds && ctx.Err() == nil; r++ {
		for _, p := range ringtestPrograms {
			h.prog.Step("peers: round %d/%d kernel ringtest %s, %d chains", r+1, h.cfg.PeerRounds, p, n)
			el, err := runRingtest(ctx, filepath.Join(dir, p), args)
			if err != nil {
				h.fail(suite, "kernel ringtest "+p, base, err)
				return
			}
			kernel[p] = append(kernel[p], mppsOf(n, el))
		}
		if libErr != nil {
			continue
		}
		for _, b := range batches {
			h.prog.Step("peers: round %d/%d vdpakit cross-thread batch %d, %d chains", r+1, h.cfg.PeerRounds, b, n)
			el, err := libCrossThread(ctx, crossOptions{
				RingSize: h.cfg.RingSize, Descs: 1, Batch: b, Chains: n,
				HostCPU: h.cfg.HostCPU, GuestCPU: h.cfg.GuestCPU,
			})
			if err != nil {
				libErr = err
				break
			}
			lib[b] = append(lib[b], mppsOf(n, el))
		}
	}
	params := func(extra map[string]any) map[string]any {
		p := map[string]any{"run_cycles": n, "rounds": len(kernel["virtio_ring_0_9"])}
		for k, v := range base {
			p[k] = v
		}
		for k, v := range extra {
			p[k] = v
		}
		return p
	}
	for _, p := range ringtestPrograms {
		m := median(kernel[p])
		h.add(Result{Suite: suite, Name: "kernel ringtest " + p, Params: params(map[string]any{"batch": 1, "program": p, "samples_mpps": kernel[p]}),
			Metrics: []Metric{{"mpps", m, "Mpps"}, {"ns_per_chain", 1e3 / m, "ns/chain"}},
			Note:    "C, busy-polling, one thread per CPU"})
	}
	for _, b := range batches {
		name := fmt.Sprintf("vdpakit cross-thread, batch %d", b)
		if libErr != nil {
			h.skip(suite, name, params(map[string]any{"batch": b}), libErr.Error())
			continue
		}
		m := median(lib[b])
		h.add(Result{Suite: suite, Name: name, Params: params(map[string]any{"batch": b, "descs": 1, "samples_mpps": lib[b]}),
			Metrics: []Metric{{"mpps", m, "Mpps"}, {"ns_per_chain", 1e3 / m, "ns/chain"}}})
		for _, p := range ringtestPrograms {
			note := ""
			if b > 1 {
				note = "ringtest publishes each buffer; vdpakit batches"
			}
			h.add(Result{Suite: suite, Name: fmt.Sprintf("ratio vdpakit(batch %d) / kernel %s", b, p), Params: params(map[string]any{"batch": b}),
				Metrics: []Metric{{"ratio", ratio(m, median(kernel[p])), "x"}}, Note: note})
		}
	}
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
	// Start listens on sock (server mode). loopback selects whether frames
	// the front-end transmits come back on its receive queue (io forward)
	// or are consumed and dropped (rxonly).
	Start(ctx context.Context, sock string, loopback bool, cpu int) error
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

func (d *dpdkVhost) Start(ctx context.Context, sock string, loopback bool, cpu int) error {
	d.seq++
	d.fwd = "rxonly"
	if loopback {
		d.fwd = "io"
	}
	p, err := startTestpmd(d.bin, TestpmdArgs{
		CPU:        cpu,
		FilePrefix: fmt.Sprintf("vdpakit-bench-%d-be%d", os.Getpid(), d.seq),
		Vdev:       fmt.Sprintf("net_vhost0,iface=%s,queues=1", sock),
		Forward:    d.fwd,
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

// dpdkScenario runs testpmd's virtio-user front-end against a back-end for
// runFor and returns the front-end's steady rate in Mpps: transmit rate in
// txonly mode, receive rate in macswap loopback mode.
func dpdkScenario(ctx context.Context, bin string, be vhostBackend, loopback bool, runFor time.Duration, hostCPU, guestCPU int, seq int) (float64, error) {
	dir, err := os.MkdirTemp("", "vdpakit-bench-vu-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "vhost.sock")
	if err := be.Start(ctx, sock, loopback, hostCPU); err != nil {
		return 0, fmt.Errorf("%s: %w", be.Name(), err)
	}
	beStopped := false
	defer func() {
		if !beStopped {
			be.Stop()
		}
	}()
	if err := waitForSocket(ctx, sock, 15*time.Second, be.Alive); err != nil {
		return 0, fmt.Errorf("%s: %w", be.Name(), err)
	}
	fa := TestpmdArgs{
		CPU:        guestCPU,
		FilePrefix: fmt.Sprintf("vdpakit-bench-%d-fe%d", os.Getpid(), seq),
		Vdev:       fmt.Sprintf("net_virtio_user0,path=%s,queues=1", sock),
		Forward:    "txonly",
	}
	if loopback {
		fa.Forward, fa.TxFirst = "macswap", true
	}
	fe, err := startTestpmd(bin, fa)
	if err != nil {
		return 0, err
	}
	select {
	case <-ctx.Done():
	case <-time.After(runFor):
	case <-fe.done:
		fe.done <- nil
	}
	early, _ := fe.exited()
	out := fe.stop(10 * time.Second)
	beStopped = true
	rx, tx, beErr := be.Stop()
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	if early {
		return 0, fmt.Errorf("testpmd virtio-user exited early: %s", tailLines(out, 8))
	}
	st := ParseTestpmd(out)
	samples := st.TxPPS
	if loopback {
		samples = st.RxPPS
	}
	if beErr != nil {
		return 0, fmt.Errorf("%s: %w", be.Name(), beErr)
	}
	rate := SteadyRate(samples)
	if rate == 0 {
		// No full period with traffic (a starved run on a loaded machine):
		// fall back to the front-end's total over the whole run, a lower
		// bound.
		total := st.FwdTx
		if loopback {
			total = st.FwdRx
		}
		rate = float64(total) / runFor.Seconds()
	}
	if rate == 0 {
		return 0, fmt.Errorf("no traffic against %s (back-end rx %d tx %d): %s", be.Name(), rx, tx, tailLines(out, 8))
	}
	return rate / 1e6, nil
}

// peerDPDK measures testpmd's virtio-user against DPDK's net_vhost and
// against the library's vhost-user back-end, interleaved round by round.
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
	backends := []vhostBackend{&dpdkVhost{bin: bin}}
	lib, libErr := newLibVhost()
	if libErr == nil {
		backends = append(backends, lib)
	}
	modes := []struct {
		name     string
		loopback bool
	}{{"txonly", false}, {"macswap loopback", true}}
	rates := map[string][]float64{}
	failed := map[string]error{}
	seq := 0
	for r := 0; r < h.cfg.PeerRounds && ctx.Err() == nil; r++ {
		for _, m := range modes {
			for _, be := range backends {
				key := m.name + "|" + be.Name()
				if failed[key] != nil {
					continue
				}
				seq++
				h.prog.Step("peers: round %d/%d testpmd virtio-user %s against %s (%v)", r+1, h.cfg.PeerRounds, m.name, be.Name(), runFor)
				v, err := dpdkScenario(ctx, bin, be, m.loopback, runFor, h.cfg.HostCPU, h.cfg.GuestCPU, seq)
				if err != nil {
					failed[key] = err
					continue
				}
				rates[key] = append(rates[key], v)
			}
		}
	}
	for _, m := range modes {
		params := map[string]any{"mode": m.name, "run_for": runFor.String(), "frontend_cpu": h.cfg.GuestCPU, "backend_cpu": h.cfg.HostCPU, "frame_bytes": 64, "queues": 1}
		var dpdkRate float64
		for i, be := range append(backends, nil) {
			var name string
			if be == nil {
				if libErr == nil {
					continue
				}
				name = "vdpakit vhost-user"
				h.skip(suite, "testpmd "+m.name+" vs "+name, params, libErr.Error())
				continue
			}
			name = be.Name()
			key := m.name + "|" + name
			p := copyParams(params)
			p["backend"] = name
			p["rounds"] = len(rates[key])
			if err := failed[key]; err != nil {
				if errors.Is(err, context.Canceled) {
					continue
				}
				h.fail(suite, "testpmd "+m.name+" vs "+name, p, err)
				continue
			}
			v := median(rates[key])
			p["samples_mpps"] = rates[key]
			h.add(Result{Suite: suite, Name: "testpmd " + m.name + " vs " + name, Params: p, Metrics: []Metric{{"mpps", v, "Mpps"}}})
			if i == 0 {
				dpdkRate = v
			} else if dpdkRate > 0 {
				h.add(Result{Suite: suite, Name: "ratio " + m.name + ": " + name + " / DPDK net_vhost", Params: p,
					Metrics: []Metric{{"ratio", ratio(v, dpdkRate), "x"}}})
			}
		}
	}
}

func copyParams(p map[string]any) map[string]any {
	out := make(map[string]any, len(p)+2)
	for k, v := range p {
		out[k] = v
	}
	return out
}
