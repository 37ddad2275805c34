package vhostuser

// Interop tests against DPDK 22.11's dpdk-testpmd (Debian package dpdk):
// net_virtio_user is a vhost-user front-end that drives our Backend, and
// net_vhost is a vhost-user back-end our Frontend drives. They run without
// hugepages.
//
// When they run (requireTestpmd):
//   - VDPAKIT_DPDK unset: the interop tests run wherever dpdk-testpmd is on
//     PATH (they skip, saying so, where it is not) and skip with -short.
//     Together they take about 20 s on a 2-core VM, so `go test ./...` on a
//     machine with DPDK installed still finishes in a few minutes.
//     TestDPDKThroughput, a ~25 s measurement that asserts only that frames
//     flowed and whose figures mean nothing while other packages' tests
//     share the cores, is left out: the benchmark harness (bench/) makes
//     the comparisons that count.
//   - VDPAKIT_DPDK=1: every DPDK test must run, -short or not, and fails
//     when dpdk-testpmd is missing (CI's DPDK step).
//   - VDPAKIT_DPDK=0: every DPDK test skips.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// dpdkTest says whether a DPDK test is a measurement (run only when asked
// for with VDPAKIT_DPDK=1) or an interop test (run where the tool is).
type dpdkTest int

const (
	dpdkInterop dpdkTest = iota
	dpdkMeasurement
)

// requireTestpmd returns dpdk-testpmd's path or skips (fails with
// VDPAKIT_DPDK=1) as the file comment describes.
func requireTestpmd(t *testing.T, kind dpdkTest) string {
	t.Helper()
	env := os.Getenv("VDPAKIT_DPDK")
	switch env {
	case "", "0", "1":
	default:
		t.Fatalf("VDPAKIT_DPDK=%q: want 1 (must run), 0 (skip) or unset (run where dpdk-testpmd is installed)", env)
	}
	if env == "0" {
		t.Skip("DPDK interop test: VDPAKIT_DPDK=0")
	}
	p, err := exec.LookPath("dpdk-testpmd")
	if env == "1" {
		if err != nil {
			t.Fatalf("VDPAKIT_DPDK=1 but dpdk-testpmd is not installed (apt-get install dpdk): %v", err)
		}
		return p
	}
	if err != nil {
		t.Skip("DPDK interop test: dpdk-testpmd is not on PATH (install Debian's dpdk package; VDPAKIT_DPDK=1 makes this a failure)")
	}
	if kind == dpdkMeasurement {
		t.Skip("DPDK throughput measurement: runs only with VDPAKIT_DPDK=1 (about 25 s of busy-polling; the bench harness makes the comparisons)")
	}
	if testing.Short() {
		t.Skip("DPDK interop test: skipped with -short (dpdk-testpmd is installed; about 5 s each)")
	}
	return p
}

// lockedBuffer collects a process's output.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testpmd is one interactive dpdk-testpmd process in its own process group.
type testpmd struct {
	t       *testing.T
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	out     *lockedBuffer
	done    chan struct{}
	waitErr error // how the process ended, once done is closed
}

// state says whether testpmd still runs, or how it ended (a signal shows
// as such: a crash of the peer, not a failure of ours to read).
func (p *testpmd) state() string {
	select {
	case <-p.done:
		if p.waitErr != nil {
			return "testpmd ended: " + p.waitErr.Error()
		}
		return "testpmd exited normally"
	default:
		return "testpmd running"
	}
}

type testpmdConfig struct {
	lcores string // --lcores, e.g. "0@0,1@0"
	prefix string // --file-prefix, unique per process
	vdev   string
	fwd    string // forward mode
	extra  []string
	vdevs  []string // more --vdev arguments, after vdev
	// wrap runs testpmd under these commands (each execs the next, so the
	// process is testpmd's), e.g. ip netns exec NS nice -n 19.
	wrap []string
}

func startTestpmd(t *testing.T, bin string, c testpmdConfig) *testpmd {
	t.Helper()
	args := []string{"--lcores", c.lcores, "--no-pci", "--no-huge", "-m", "256", "--file-prefix=" + c.prefix,
		"--vdev", c.vdev}
	for _, v := range c.vdevs {
		args = append(args, "--vdev", v)
	}
	args = append(args, "--", "-i", "--nb-cores=1", "--no-mlockall", "--total-num-mbufs=16384",
		"--forward-mode="+c.fwd)
	args = append(args, c.extra...)
	// testpmd's stdout is a pipe here, which stdio fully buffers; stdbuf
	// makes it line-buffered so statistics arrive when printed.
	argv := append([]string{bin}, args...)
	if sb, err := exec.LookPath("stdbuf"); err == nil {
		argv = append([]string{sb, "-oL", "-eL"}, argv...)
	}
	argv = append(slices.Clone(c.wrap), argv...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &testpmd{t: t, cmd: cmd, stdin: stdin, out: out, done: make(chan struct{})}
	go func() { p.waitErr = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		st := p.state() // before quit: how it was when the test ended
		p.quit()
		if t.Failed() {
			t.Logf("testpmd %s (%s at the end of the test) output:\n%s", c.prefix, st, out.String())
		}
	})
	return p
}

func (p *testpmd) command(s string) {
	_, _ = io.WriteString(p.stdin, s+"\n")
}

// quit asks testpmd to exit and kills its process group (only the
// processes this test started) if it does not within 10s.
func (p *testpmd) quit() {
	select {
	case <-p.done:
		return
	default:
	}
	p.command("quit")
	_ = p.stdin.Close()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// waitOutput waits until the output contains s at least n times.
func (p *testpmd) waitOutput(ctx context.Context, s string, n int) error {
	for {
		if bytes.Count([]byte(p.out.String()), []byte(s)) >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %q x%d: %w", s, n, ctx.Err())
		case <-p.done:
			return fmt.Errorf("testpmd exited while waiting for %q", s)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

var (
	nicStatsRe = regexp.MustCompile(`(?s)NIC statistics for port 0.*?RX-packets:\s+(\d+).*?TX-packets:\s+(\d+)`)
	fwdStatsRe = regexp.MustCompile(`(?s)Forward statistics for port 0.*?RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+).*?TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)`)
)

// portStats runs "show port stats 0" and returns the RX and TX packet
// counters of the NIC statistics it prints.
func (p *testpmd) portStats(ctx context.Context) (rx, tx uint64, err error) {
	n := bytes.Count([]byte(p.out.String()), []byte("NIC statistics for port 0"))
	p.command("show port stats 0")
	if err := p.waitOutput(ctx, "Throughput (since last show)", n+1); err != nil {
		return 0, 0, err
	}
	all := nicStatsRe.FindAllStringSubmatch(p.out.String(), -1)
	if len(all) == 0 {
		return 0, 0, fmt.Errorf("no port statistics in testpmd output")
	}
	m := all[len(all)-1]
	rx, _ = strconv.ParseUint(m[1], 10, 64)
	tx, _ = strconv.ParseUint(m[2], 10, 64)
	return rx, tx, nil
}

// stopForwarding runs "stop" and returns the forward statistics of port 0:
// received, dropped on receive, transmitted, dropped on transmit.
func (p *testpmd) stopForwarding(ctx context.Context) (rx, rxDrop, tx, txDrop uint64, err error) {
	const statsEnd = "Accumulated forward statistics"
	n := bytes.Count([]byte(p.out.String()), []byte(statsEnd))
	p.command("stop")
	if err := p.waitOutput(ctx, statsEnd, n+1); err != nil {
		return 0, 0, 0, 0, err
	}
	all := fwdStatsRe.FindAllStringSubmatch(p.out.String(), -1)
	if len(all) == 0 {
		return 0, 0, 0, 0, fmt.Errorf("no forward statistics in testpmd output")
	}
	m := all[len(all)-1] // this stop's (start resets them)
	v := make([]uint64, 4)
	for i := range v {
		v[i], _ = strconv.ParseUint(m[i+1], 10, 64)
	}
	return v[0], v[1], v[2], v[3], nil
}

func waitFile(ctx context.Context, path string) error {
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func waitCond(ctx context.Context, f func() bool) bool {
	for !f() {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return true
}

// waitProgress waits until cond holds, like waitCond, but gives up early
// when progress (a counter) has not moved for stall: a stall watchdog, so
// that a stuck test reports the state it is stuck in (both sides' counters
// and rings) while that state is still there.
func waitProgress(ctx context.Context, cond func() bool, progress func() uint64, stall time.Duration) bool {
	last, since := progress(), time.Now()
	for !cond() {
		if p := progress(); p != last {
			last, since = p, time.Now()
		} else if time.Since(since) > stall {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return true
}

func uniquePrefix(t *testing.T, what string) string {
	return fmt.Sprintf("vdpakit-%s-%d-%d", what, os.Getpid(), time.Now().UnixNano()%1e9)
}

// serveBackend runs our back-end in server mode at a fresh socket path.
func serveBackend(t *testing.T, ctx context.Context, h vdpa.Handler) (string, *Backend) {
	path := filepath.Join(t.TempDir(), "vu.sock")
	be := NewBackend(h, nil)
	done := make(chan error, 1)
	sctx, cancel := context.WithCancel(ctx)
	go func() { done <- be.ListenAndServe(sctx, path) }()
	t.Cleanup(func() { cancel(); <-done })
	require.NoError(t, waitFile(ctx, path))
	return path, be
}

// TestDPDKVirtioUserTxonly: DPDK's virtio-user front-end transmits to our
// back-end (server mode) as fast as it can; every frame testpmd counts as
// transmitted is counted by our handler, none lost.
func TestDPDKVirtioUserTxonly(t *testing.T) {
	bin := requireTestpmd(t, dpdkInterop)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{2, 0, 0, 0, 0, 1})
	path, be := serveBackend(t, ctx, h)
	p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "txonly"),
		vdev: "net_virtio_user0,path=" + path + ",queues=1", fwd: "txonly"})
	require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
	p.command("start")
	require.True(t, waitCond(ctx, func() bool { return h.Counters().TxFrames > 100000 }), "no frames arrived")
	_, _, tx, _, err := p.stopForwarding(ctx)
	require.NoError(t, err)
	require.NotZero(t, tx)
	assert.True(t, waitCond(ctx, func() bool { return h.Counters().TxFrames == tx }),
		"testpmd transmitted %d, back-end counted %d", tx, h.Counters().TxFrames)
	info := be.Info()
	assert.True(t, info.Features.Has(virtio.FVersion1, virtio.FProtocolFeat), "features %s", info.Features.Format(virtio.DeviceNet))
	t.Logf("testpmd TX %d = back-end received %d; negotiated %s, protocol %v", tx, h.Counters().TxFrames,
		info.Features.Format(virtio.DeviceNet), info.ProtocolFeatures)
}

// TestDPDKVirtioUserBothDirections: our back-end runs in client mode
// against testpmd's virtio-user in server mode, forwarding in io mode: we
// inject N frames on the receive queue at a paced rate, testpmd receives
// each and sends it back on its transmit queue, and both sides count all N
// in both directions.
func TestDPDKVirtioUserBothDirections(t *testing.T) {
	bin := requireTestpmd(t, dpdkInterop)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	path := filepath.Join(t.TempDir(), "vu.sock")
	p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "io"),
		vdev: "net_virtio_user0,path=" + path + ",queues=1,server=1", fwd: "io",
		// --no-flush-rx: "start" first prints its "forwards packets on"
		// banner and then drains and frees whatever its receive queues
		// hold, for as long as frames keep arriving; frames injected in
		// that window were counted by the port but never forwarded, and
		// the test waited for them forever.
		extra: []string{"--port-topology=loop", "--no-flush-rx"}})
	require.NoError(t, waitFile(ctx, path))

	h := vhostusertest.New(vhostusertest.Sink, [6]byte{2, 0, 0, 0, 0, 1})
	be := NewBackend(h, &BackendOptions{ReconnectInterval: 20 * time.Millisecond})
	sctx, scancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- be.DialAndServe(sctx, path) }()
	defer func() { scancel(); <-done }()

	require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
	require.True(t, waitCond(ctx, func() bool { return be.Info().RunningQueues == 2 }), "rings did not start")
	// Retry transmits for up to 100ms when testpmd's transmit ring is full
	// (a starved process on busy shared CPUs) instead of dropping.
	p.command("set burst tx delay 10 retry 10000")
	p.command("set fwd io retry")
	p.command("start")
	// Inject once forwarding has started (with --no-flush-rx, frames
	// arriving earlier would wait in the receive ring, not be lost).
	require.NoError(t, p.waitOutput(ctx, "forwards packets on", 1))

	const frames = 20000
	frame := make([]byte, 64)
	copy(frame, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5})
	for i := 0; i < frames; i++ {
		if err := h.Inject(ctx, frame); err != nil {
			rx, tx, _ := p.portStats(context.Background())
			t.Fatalf("inject frame %d: %v; back-end %+v; testpmd rx %d tx %d", i, err, h.Counters(), rx, tx)
		}
		if i%32 == 31 {
			// Pace: at most 64 frames in flight through testpmd.
			if !waitProgress(ctx, func() bool { c := h.Counters(); return c.TxFrames+64 >= c.RxFrames },
				func() uint64 { c := h.Counters(); return c.TxFrames + c.RxFrames }, 20*time.Second) {
				rings := h.Rings()
				rx, tx, _ := p.portStats(context.Background())
				frx, rxDrop, ftx, txDrop, _ := p.stopForwarding(context.Background())
				t.Fatalf("frames stopped coming back after %d: back-end %+v; testpmd port rx %d tx %d, forwarding engine rx %d (dropped %d) tx %d (dropped %d); "+
					"back-end's view of the receive ring %v, transmit ring %v",
					i, h.Counters(), rx, tx, frx, rxDrop, ftx, txDrop, rings[0], rings[1])
			}
		}
	}
	ok := waitCond(ctx, func() bool { c := h.Counters(); return c.RxFrames == frames && c.TxFrames == frames })
	c := h.Counters()
	require.True(t, ok, "back-end delivered %d and got back %d of %d", c.RxFrames, c.TxFrames, frames)
	rx, rxDrop, tx, txDrop, err := p.stopForwarding(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint64(frames), rx, "testpmd received")
	assert.Equal(t, uint64(frames), tx, "testpmd transmitted")
	assert.Zero(t, rxDrop+txDrop, "testpmd dropped")
	t.Logf("back-end delivered %d, testpmd rx %d tx %d, back-end received %d", c.RxFrames, rx, tx, c.TxFrames)
}

// TestDPDKFrontendNetVhost: our front-end drives DPDK's net_vhost back-end
// in macswap mode: frames we transmit are counted by testpmd and come back
// on our receive queue with the MAC addresses swapped.
func TestDPDKFrontendNetVhost(t *testing.T) { testDPDKFrontendNetVhost(t, false) }

// testDPDKFrontendNetVhost is TestDPDKFrontendNetVhost on split rings or,
// with packed, on packed rings (RING_PACKED negotiated with net_vhost).
func testDPDKFrontendNetVhost(t *testing.T, packed bool) {
	bin := requireTestpmd(t, dpdkInterop)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	path := filepath.Join(t.TempDir(), "vhost.sock")
	p := startMacswapNetVhost(t, ctx, bin, path, "vhost")

	fe, err := Dial(ctx, path, nil)
	require.NoError(t, err)
	defer fe.Close()
	t.Logf("net_vhost protocol features %v", fe.ProtocolFeatures())
	offered, err := fe.Features()
	require.NoError(t, err)
	// Dirty logging with DPDK's vhost library as the peer: a shared log
	// (LOG_SHMFD) and LOG_ALL, so every write net_vhost makes into our
	// memory must show up in the bitmap.
	require.True(t, offered.Has(virtio.FLogAll), "net_vhost offers %s", offered.Format(virtio.DeviceNet))
	require.True(t, fe.ProtocolFeatures().Has(PFLogShmfd))
	bm, err := dirty.New(0x100000+8<<20, &dirty.Options{Shared: true})
	require.NoError(t, err)
	defer bm.Close()
	d, rxAddr, txAddr := netVhostDriver(t, fe, packed, bm)
	src, dst := macswapSrc, macswapDst
	const frames = 20000
	txDone, received := pumpMacswap(t, d, rxAddr, txAddr, src, dst, frames, 60*time.Second)
	require.Equal(t, frames, txDone, "transmitted frames completed by net_vhost")
	require.Equal(t, frames, received, "frames returned by macswap")
	rx, _, tx, _, err := p.stopForwarding(ctx)
	require.NoError(t, err)
	assert.Equal(t, uint64(frames), rx, "testpmd received")
	assert.Equal(t, uint64(frames), tx, "testpmd transmitted")
	t.Logf("front-end sent %d, testpmd rx %d tx %d, front-end received %d", frames, rx, tx, received)

	// net_vhost wrote both used rings and every receive buffer (all were
	// used: 20000 frames through 256 buffers); it only read the transmit
	// buffers. A packed ring's used descriptors are written into the
	// descriptor ring: every page of it was written (20000 frames wrap the
	// ring many times) and must be logged.
	page := func(a vring.GuestAddr) uint64 { return uint64(a) / dirty.DefaultPageSize }
	if packed {
		for q := 0; q < 2; q++ {
			ds, _, _ := vring.RingSizes(testQueueSize, d.features)
			for pg := page(d.layouts[q].Desc); pg <= page(d.layouts[q].Desc+vring.GuestAddr(ds)-1); pg++ {
				assert.True(t, bm.PageDirty(pg), "queue %d: descriptor ring page %#x (used descriptors) logged", q, pg*dirty.DefaultPageSize)
			}
		}
	} else {
		assert.True(t, bm.PageDirty(page(d.layouts[0].Used)), "receive used ring logged")
		assert.True(t, bm.PageDirty(page(d.layouts[1].Used)), "transmit used ring logged")
	}
	for head, a := range rxAddr {
		if !bm.PageDirty(page(a)) {
			t.Errorf("receive buffer %d at %v not logged", head, a)
			break
		}
	}
	for _, a := range txAddr {
		assert.False(t, bm.PageDirty(page(a)), "transmit buffer at %v is only read", a)
	}

	// Suspend and resume through net_vhost's GET_VRING_BASE and
	// SET_VRING_BASE. Every chain was completed, so both rings stopped
	// after `frames` chains: the position is the same on both sides (a
	// split ring's NextUsed comes from used.idx; net_vhost answers a
	// packed ring's base with bits 0..15 only, read as used = avail).
	require.NoError(t, fe.Suspend())
	want := positionAfter(d.features, frames)
	for q := 0; q < 2; q++ {
		st, err := fe.QueueBase(q)
		require.NoError(t, err)
		assert.Equal(t, vring.QueueState{NextAvail: want, NextUsed: want}, st, "queue %d stopped at the position after %d chains", q, frames)
	}
	require.NoError(t, fe.Resume())
	p.command("start")
	require.NoError(t, p.waitOutput(ctx, "forwards packets on", 2))
	const more = 64
	for i := 0; i < more; i++ {
		_, err := d.dqs[1].Add([]vring.Buffer{{Addr: txAddr[i%len(txAddr)], Len: uint32(d.hdrLen + 64)}})
		require.NoError(t, err)
	}
	d.dqs[1].Publish()
	require.NoError(t, d.kicks[1].Signal())
	txBack, rxBack := 0, 0
	deadline := time.Now().Add(30 * time.Second)
	for (txBack < more || rxBack < more) && time.Now().Before(deadline) {
		if _, _, ok, err := d.dqs[1].Reclaim(); err == nil && ok {
			txBack++
			continue
		}
		if head, _, ok, err := d.dqs[0].Reclaim(); err == nil && ok {
			rxBack++
			h2, err := d.dqs[0].Add([]vring.Buffer{{Addr: rxAddr[head], Len: bufSize, Writable: true}})
			require.NoError(t, err)
			rxAddr[h2] = rxAddr[head]
			d.dqs[0].Publish()
			require.NoError(t, d.kicks[0].Signal())
			continue
		}
		time.Sleep(100 * time.Microsecond)
	}
	assert.Equal(t, more, txBack, "transmitted after the resume")
	assert.Equal(t, more, rxBack, "returned by macswap after the resume")
}

// measureTxMpps starts forwarding on a virtio-user testpmd, lets it warm
// up, and returns the rate of its TX-packets counter (frames the back-end
// accepted) over window.
func measureTxMpps(t *testing.T, ctx context.Context, p *testpmd, window time.Duration) float64 {
	t.Helper()
	p.command("start")
	require.NoError(t, p.waitOutput(ctx, "forwards packets on", 1))
	time.Sleep(time.Second)
	_, tx1, err := p.portStats(ctx)
	require.NoError(t, err)
	t1 := time.Now()
	time.Sleep(window)
	_, tx2, err := p.portStats(ctx)
	require.NoError(t, err)
	dt := time.Since(t1)
	_, _, _, _, err = p.stopForwarding(ctx)
	require.NoError(t, err)
	require.Greater(t, tx2, tx1, "no frames transmitted during the window")
	return float64(tx2-tx1) / dt.Seconds() / 1e6
}

// TestDPDKThroughput reports (t.Log) the rate DPDK's virtio-user reaches in
// txonly mode against our back-end and against DPDK's own net_vhost
// back-end (testpmd rxonly), measured one after the other in the same run
// with the same testpmd options. virtio-user runs on CPU 0; net_vhost's
// testpmd on CPU 1; our back-end's goroutines are not pinned. It asserts
// only that frames flowed: the figures depend on the machine.
func TestDPDKThroughput(t *testing.T) {
	bin := requireTestpmd(t, dpdkMeasurement)
	// Split rings, then packed rings (virtio-user packed_vq=1; DPDK's
	// net_vhost and our back-end both offer RING_PACKED), in the same run.
	for _, ring := range []struct{ name, vdev string }{{"split", ""}, {"packed", ",packed_vq=1"}} {
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		ours, soft, dpdk := dpdkThroughput(t, ctx, bin, ring.vdev)
		cancel()
		t.Logf("%s rings: virtio-user txonly (64-byte frames, burst 32) -> vdpakit back-end, vhostusertest sink: %.2f Mpps", ring.name, ours)
		t.Logf("%s rings: virtio-user txonly (64-byte frames, burst 32) -> vdpakit back-end, softnet (poll):   %.2f Mpps", ring.name, soft)
		t.Logf("%s rings: virtio-user txonly (64-byte frames, burst 32) -> DPDK net_vhost (testpmd rxonly):    %.2f Mpps", ring.name, dpdk)
		fmt.Printf("DPDK-THROUGHPUT ring=%s vdpakit=%.2fMpps vdpakit+softnet=%.2fMpps net_vhost=%.2fMpps\n", ring.name, ours, soft, dpdk)
	}
}

// dpdkThroughput measures virtio-user's txonly rate, with vdevArgs added to
// its vdev, against our back-end with the vhostusertest sink, against our
// back-end with softnet, and against DPDK's net_vhost.
func dpdkThroughput(t *testing.T, ctx context.Context, bin, vdevArgs string) (ours, soft, dpdk float64) {
	const window = 3 * time.Second
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{2, 0, 0, 0, 0, 1})
	path, _ := serveBackend(t, ctx, h)
	p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "perf-ours"),
		vdev: "net_virtio_user0,path=" + path + ",queues=1" + vdevArgs, fwd: "txonly"})
	require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
	ours = measureTxMpps(t, ctx, p, window)
	p.quit()

	// The full software device (vdpa/softnet, busy-poll mode, frames
	// dropped by its handler) behind the same back-end.
	sn, err := softnet.New(&softnet.Options{Mode: softnet.ModePoll, MaxQueueSize: 1024,
		Handler: softnet.FrameHandlerFunc(func(*softnet.Tx, []byte) {})})
	require.NoError(t, err)
	spath, _ := serveBackend(t, ctx, sn)
	sp := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "perf-softnet"),
		vdev: "net_virtio_user0,path=" + spath + ",queues=1" + vdevArgs, fwd: "txonly"})
	require.NoError(t, sp.waitOutput(ctx, "testpmd>", 1))
	soft = measureTxMpps(t, ctx, sp, window)
	sp.quit()

	vpath := filepath.Join(t.TempDir(), "vhost.sock")
	v := startTestpmd(t, bin, testpmdConfig{lcores: "0@1,1@1", prefix: uniquePrefix(t, "perf-vhost"),
		vdev: "net_vhost0,iface=" + vpath + ",queues=1", fwd: "rxonly"})
	require.NoError(t, v.waitOutput(ctx, "testpmd>", 1))
	require.NoError(t, waitFile(ctx, vpath))
	v.command("start")
	u := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "perf-vu"),
		vdev: "net_virtio_user0,path=" + vpath + ",queues=1" + vdevArgs, fwd: "txonly"})
	require.NoError(t, u.waitOutput(ctx, "testpmd>", 1))
	dpdk = measureTxMpps(t, ctx, u, window)
	u.quit()
	v.quit()
	return ours, soft, dpdk
}

// TestDPDKReconnect: our back-end in client mode survives the front-end
// restarting: a second testpmd (virtio-user in server mode at the same
// path) gets served after the first quits, and traffic flows both times.
func TestDPDKReconnect(t *testing.T) {
	bin := requireTestpmd(t, dpdkInterop)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	path := filepath.Join(t.TempDir(), "vu.sock")
	h := vhostusertest.New(vhostusertest.Sink, [6]byte{2, 0, 0, 0, 0, 1})
	be := NewBackend(h, &BackendOptions{ReconnectInterval: 20 * time.Millisecond})
	sctx, scancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- be.DialAndServe(sctx, path) }()
	defer func() { scancel(); <-done }()

	var total uint64
	for round := 1; round <= 2; round++ {
		p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, fmt.Sprintf("reconnect%d", round)),
			vdev: "net_virtio_user0,path=" + path + ",queues=1,server=1", fwd: "txonly"})
		require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
		require.True(t, waitCond(ctx, func() bool { i := be.Info(); return i.Sessions == round && i.RunningQueues == 2 }),
			"round %d: back-end did not (re)connect: %+v", round, be.Info())
		p.command("start")
		require.True(t, waitCond(ctx, func() bool { return h.Counters().TxFrames > total+10000 }), "round %d: no traffic", round)
		_, _, tx, _, err := p.stopForwarding(ctx)
		require.NoError(t, err)
		total += tx
		assert.True(t, waitCond(ctx, func() bool { return h.Counters().TxFrames == total }),
			"round %d: testpmd sent %d in total, back-end counted %d", round, total, h.Counters().TxFrames)
		p.quit()
		_ = os.Remove(path)
	}
}

// pumpMacswap sends frames from the transmit pool txAddr (ring 1) and takes
// them back on ring 0, where rxAddr maps a receive head to its buffer
// (re-posted as frames come back), with at most 200 frames out, until all
// came back or timeout passes. Each returned frame must have its MAC
// addresses swapped (testpmd's macswap). It returns the transmit chains
// completed and the frames received.
func pumpMacswap(t *testing.T, d *testDriver, rxAddr map[uint16]vring.GuestAddr, txAddr []vring.GuestAddr, src, dst [6]byte, frames int, timeout time.Duration) (txDone, received int) {
	t.Helper()
	sent, inFlight := 0, 0
	deadline := time.Now().Add(timeout)
	for (txDone < frames || received < frames) && time.Now().Before(deadline) {
		progress := false
		for sent < frames && inFlight < len(txAddr) && sent-received < 200 {
			_, err := d.dqs[1].Add([]vring.Buffer{{Addr: txAddr[sent%len(txAddr)], Len: uint32(d.hdrLen + 64)}})
			require.NoError(t, err)
			sent++
			inFlight++
			progress = true
		}
		d.dqs[1].Publish()
		if d.dqs[1].NeedsKick() {
			require.NoError(t, d.kicks[1].Signal())
		}
		for {
			_, _, ok, err := d.dqs[1].Reclaim()
			require.NoError(t, err)
			if !ok {
				break
			}
			txDone++
			inFlight--
			progress = true
		}
		for {
			head, n, ok, err := d.dqs[0].Reclaim()
			require.NoError(t, err)
			if !ok {
				break
			}
			b := make([]byte, n)
			require.NoError(t, d.mem.Read(rxAddr[head], b))
			require.GreaterOrEqual(t, int(n), d.hdrLen+14)
			assert.Equal(t, src[:], b[d.hdrLen:d.hdrLen+6], "macswap destination")
			assert.Equal(t, dst[:], b[d.hdrLen+6:d.hdrLen+12], "macswap source")
			received++
			h2, err := d.dqs[0].Add([]vring.Buffer{{Addr: rxAddr[head], Len: bufSize, Writable: true}})
			require.NoError(t, err)
			rxAddr[h2] = rxAddr[head]
			progress = true
		}
		d.dqs[0].Publish()
		if d.dqs[0].NeedsKick() {
			require.NoError(t, d.kicks[0].Signal())
		}
		if !progress {
			time.Sleep(50 * time.Microsecond)
		}
	}
	return txDone, received
}

// The addresses of the frames pumpMacswap sends (testpmd swaps them).
var macswapSrc, macswapDst = [6]byte{2, 0, 0, 0, 0, 0xaa}, [6]byte{2, 0, 0, 0, 0, 0xbb}

// netVhostDriver sets up a test driver on fe (a Frontend of net_vhost):
// 8 MiB of guest memory, VERSION_1 (and RING_PACKED with packed; LOG_ALL
// and the log with log), both rings of testQueueSize started with every
// receive buffer posted, DRIVER_OK. It returns the driver, the receive
// buffers by head and a pool of 128 transmit frames (macswapSrc to
// macswapDst).
func netVhostDriver(t *testing.T, fe *Frontend, packed bool, log *dirty.Bitmap) (*testDriver, map[uint16]vring.GuestAddr, []vring.GuestAddr) {
	t.Helper()
	d := &testDriver{t: t, fe: fe}
	reg, err := vring.NewMemfdRegion(0x100000, 8<<20, nil)
	require.NoError(t, err)
	d.mem, err = vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { d.mem.Close() })
	offered, err := fe.Features()
	require.NoError(t, err)
	require.True(t, offered.Has(virtio.FVersion1), "net_vhost offers %s", offered.Format(virtio.DeviceNet))
	d.features = virtio.Features(0).With(virtio.FVersion1)
	if log != nil {
		d.features = d.features.With(virtio.FLogAll)
	}
	if packed {
		require.True(t, offered.Has(virtio.FRingPacked), "net_vhost offers %s", offered.Format(virtio.DeviceNet))
		d.features = d.features.With(virtio.FRingPacked)
	}
	d.hdrLen = virtio.NetHdrLen(d.features)
	require.NoError(t, fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver))
	require.NoError(t, fe.SetFeatures(d.features))
	require.NoError(t, fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	require.NoError(t, fe.SetMemory(d.mem))
	if log != nil {
		require.NoError(t, fe.SetLog(log))
	}
	ringBytes := (vring.LayoutBytesFor(testQueueSize, d.features) + 4095) &^ 4095
	for q := 0; q < 2; q++ {
		d.layouts[q] = vring.LayoutFor(vring.GuestAddr(0x100000+uint64(q)*ringBytes), testQueueSize, d.features)
		d.dqs[q], err = vring.NewDriverQueue(d.mem, vring.DriverQueueOptions{Index: q, Layout: d.layouts[q], Features: d.features})
		require.NoError(t, err)
		require.Equal(t, packed, d.dqs[q].Packed())
		d.kicks[q], err = vdpa.NewEventFD()
		require.NoError(t, err)
		d.calls[q], err = vdpa.NewEventFD()
		require.NoError(t, err)
		k, c := d.kicks[q], d.calls[q]
		t.Cleanup(func() { k.Close(); c.Close() })
	}
	d.bufBase = vring.GuestAddr(0x100000 + 2*ringBytes)
	d.nextBuf = d.bufBase
	// Receive buffers: a fixed pool, re-posted as they come back.
	rxAddr := map[uint16]vring.GuestAddr{}
	for i := 0; i < testQueueSize; i++ {
		a := d.alloc()
		head, err := d.dqs[0].Add([]vring.Buffer{{Addr: a, Len: bufSize, Writable: true}})
		require.NoError(t, err)
		rxAddr[head] = a
	}
	d.dqs[0].Publish()
	d.startQueue(0)
	d.startQueue(1)
	require.NoError(t, fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))

	// Transmit buffers: a fixed pool of 128 frames.
	txAddr := make([]vring.GuestAddr, 128)
	for i := range txAddr {
		txAddr[i] = d.alloc()
		b := make([]byte, d.hdrLen+64)
		copy(b[d.hdrLen:], macswapDst[:])
		copy(b[d.hdrLen+6:], macswapSrc[:])
		b[d.hdrLen+12], b[d.hdrLen+13] = 0x88, 0xb5
		require.NoError(t, d.mem.Write(txAddr[i], b))
	}
	return d, rxAddr, txAddr
}

// startMacswapNetVhost starts testpmd with a net_vhost port listening at
// path, forwarding in macswap mode, and waits until it forwards.
func startMacswapNetVhost(t *testing.T, ctx context.Context, bin, path, prefix string) *testpmd {
	t.Helper()
	p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, prefix),
		vdev: "net_vhost0,iface=" + path + ",queues=1", fwd: "macswap",
		// --no-flush-rx: see TestDPDKVirtioUserBothDirections; frames we
		// send while "start" still drains the receive queue would be lost.
		extra: []string{"--port-topology=loop", "--no-flush-rx"}})
	require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
	require.NoError(t, waitFile(ctx, path))
	p.command("start")
	require.NoError(t, p.waitOutput(ctx, "forwards packets on", 1))
	return p
}
