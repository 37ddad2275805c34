package vhostuser

// Interop tests against QEMU and the Linux 6.12 virtio-net driver, on two
// QEMU versions: Debian bookworm's 7.2 (qemu-system-x86_64 from PATH) and
// 11.1 (vmtest/qemu11.sh, Debian trixie-backports in a cached tree). QEMU is
// the vhost-user front-end of our Backend, which serves a softnet device
// whose frame handler answers ARP and ICMP echo; the guest's virtio_net
// driver pings through it. The guest is the real-kernel harness's cached
// Debian kernel (vmtest/qemu-guest.sh builds its initramfs around
// testdata/qemu/guest.sh).
//
// Gate (testenv.QEMUInterop): VDPAKIT_QEMU=1 runs them and fails when a
// QEMU or the kernel cache is missing (CI's interop step). Otherwise they
// skip, saying how to run them and what is missing: they boot dozens of
// TCG guests per QEMU version (tens of minutes on a shared 2-core machine,
// more than go test's default timeout), so the default go test ./... does
// not run them even where QEMU and the guest kernel are cached.
// VDPAKIT_QEMU_VERSIONS=7.2 or 11 narrows the table.
// Inside the harness VM (VDPAKIT_VMTEST=1) they always skip; the harness's
// CI line leaves them out with -test.skip QEMU.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const (
	qemuGuestMAC = "52:54:00:12:34:56"
	qemuGuestIP  = "10.0.2.15/24"
	qemuPeerIP   = "10.0.2.2"
	qemuPings    = 5
)

// qemuPeerMAC is the responder's (the "host" at qemuPeerIP) address.
var qemuPeerMAC = [6]byte{0x02, 0, 0, 0, 0, 0x02}

// qemuPeer is one QEMU version the interop tests run against.
type qemuPeer struct {
	name string // subtest name: "qemu7.2", "qemu11"
	bin  string
	// msix: vhost-user with MSI-X works under TCG. QEMU 7.2 segfaults in
	// msix_set_vector_notifiers (from vhost_net_start, when the guest
	// driver sets DRIVER_OK) on a vhost-user NIC with MSI-X and no KVM
	// irqfd (seen with gdb on this machine): it runs with vectors=0 (INTx).
	msix bool
	// reconnect is the -chardev socket option that makes QEMU redial a
	// lost back-end every second (reconnect-ms since QEMU 9.2; 7.2 knows
	// only reconnect, in seconds).
	reconnect string
}

// qemuGate applies testenv.QEMUInterop: the test runs with VDPAKIT_QEMU=1
// (failing on anything missing); otherwise it skips, saying how to run it
// and what is missing. It returns the guest helper's path and whether the
// run is required.
func qemuGate(t *testing.T) (helper string, required bool) {
	t.Helper()
	helper, err := filepath.Abs(filepath.Join("..", "..", "vmtest", "qemu-guest.sh"))
	require.NoError(t, err)
	var missing []string
	if !testenv.GuestKernelCached() {
		missing = append(missing, "the guest kernel (vmtest/run.sh --prepare)")
	}
	_, err7 := exec.LookPath("qemu-system-x86_64")
	if err7 != nil && testenv.QEMU11Cached() == "" {
		missing = append(missing, "QEMU (qemu-system-x86_64 7.2, or QEMU 11 from vmtest/qemu11.sh prepare)")
	}
	required = testenv.QEMUInterop(t, missing)
	if _, err := os.Stat(helper); err != nil {
		t.Fatalf("the guest helper is missing: %v", err)
	}
	return helper, required
}

// forEachQEMU runs fn as a subtest per QEMU version (VDPAKIT_QEMU_VERSIONS,
// e.g. "7.2" or "11", narrows the table). With VDPAKIT_QEMU=1 a version
// whose QEMU cannot be found or built fails its subtest; without it, a
// version that is not installed (QEMU 11: not in vmtest/qemu11.sh's cache)
// skips its subtest.
func forEachQEMU(t *testing.T, fn func(t *testing.T, q qemuPeer, helper string)) {
	helper, required := qemuGate(t)
	want := os.Getenv("VDPAKIT_QEMU_VERSIONS")
	for _, v := range []string{"7.2", "11"} {
		if want != "" && !slices.Contains(strings.Fields(strings.ReplaceAll(want, ",", " ")), v) {
			continue
		}
		t.Run("qemu"+v, func(t *testing.T) {
			var q qemuPeer
			switch v {
			case "7.2":
				bin, err := exec.LookPath("qemu-system-x86_64")
				if err != nil && !required {
					t.Skip("QEMU 7.2 (qemu-system-x86_64) is not installed")
				}
				if err != nil {
					t.Fatalf("VDPAKIT_QEMU=1 but qemu-system-x86_64 (QEMU 7.2) is not installed: %v", err)
				}
				q = qemuPeer{name: "qemu7.2", bin: bin, reconnect: "reconnect=1"}
			case "11":
				if !required && testenv.QEMU11Cached() == "" {
					t.Skip("QEMU 11 is not prepared (vmtest/qemu11.sh prepare)")
				}
				script, err := filepath.Abs(filepath.Join("..", "..", "vmtest", "qemu11.sh"))
				require.NoError(t, err)
				out, err := exec.Command(script, "path").Output()
				if err != nil {
					t.Fatalf("VDPAKIT_QEMU=1 but vmtest/qemu11.sh path failed: %v: %s", err, exitStderr(err))
				}
				q = qemuPeer{name: "qemu11", bin: strings.TrimSpace(string(out)), msix: true, reconnect: "reconnect-ms=1000"}
			}
			fn(t, q, helper)
		})
	}
}

// msgRecord is one request the back-end received, as its debug log says.
type msgRecord struct {
	Req Request
	Fds int
}

// msgRecorder is a slog.Handler that keeps the back-end's per-message debug
// records and every warning (a session that ended with an error).
type msgRecorder struct {
	mu    sync.Mutex
	msgs  []msgRecord
	warns []string
	infos []string // info-level notes (e.g. the pending dirty log merged)
	// fixture, when set (VDPAKIT_RECORD_DIR), gets every request and
	// reply in the testdata/lifecycle fixture format: one request a line,
	// its reply as a "# -> " comment, connects, disconnects and the test's
	// event marks as comments.
	fixture *os.File
	pending string // the last request's line, until its reply or the next record
}

func (r *msgRecorder) flushLocked() {
	if r.fixture != nil && r.pending != "" {
		fmt.Fprintln(r.fixture, r.pending)
	}
	r.pending = ""
}

// mark writes a comment line to the fixture recording, if any.
func (r *msgRecorder) mark(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fixture == nil {
		return
	}
	r.flushLocked()
	fmt.Fprintf(r.fixture, "# === "+format+"\n", args...)
}

func (r *msgRecorder) closeFixture() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fixture != nil {
		r.flushLocked()
		_ = r.fixture.Close()
		r.fixture = nil
	}
}

func (r *msgRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *msgRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *msgRecorder) WithGroup(string) slog.Handler            { return r }

func (r *msgRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rec.Level >= slog.LevelInfo && !strings.HasPrefix(rec.Message, "vhost-user front-end") {
		var sb strings.Builder
		sb.WriteString(rec.Message)
		rec.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&sb, " %s=%v", a.Key, a.Value); return true })
		if rec.Level >= slog.LevelWarn {
			r.warns = append(r.warns, sb.String())
		} else {
			r.infos = append(r.infos, sb.String())
		}
	}
	if r.fixture != nil {
		var desc string
		rec.Attrs(func(a slog.Attr) bool {
			if a.Key == "msg" {
				desc = a.Value.String()
			}
			return true
		})
		switch {
		case rec.Message == "vhost-user request":
			r.flushLocked()
			r.pending = desc
		case rec.Message == "vhost-user reply" && r.pending != "":
			r.pending += "  # -> " + desc
			r.flushLocked()
		case rec.Level >= slog.LevelInfo:
			r.flushLocked()
			fmt.Fprintf(r.fixture, "# back-end: %v %s\n", rec.Level, rec.Message)
		}
	}
	if rec.Message != "vhost-user request" {
		return nil
	}
	var m msgRecord
	rec.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "req":
			m.Req, _ = a.Value.Any().(Request)
		case "fds":
			m.Fds = int(a.Value.Int64())
		}
		return true
	})
	r.msgs = append(r.msgs, m)
	return nil
}

// notes returns the info-level notes so far.
func (r *msgRecorder) notes() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.infos...)
}

func (r *msgRecorder) snapshot() ([]msgRecord, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]msgRecord(nil), r.msgs...), append([]string(nil), r.warns...)
}

// qemuRig is a softnet device with a Responder served by our Backend on a
// unix socket that QEMU connects to. The device sits behind a ringTracker
// that records every queue start and stop with its ring positions.
type qemuRig struct {
	name   string
	dev    *softnet.Device
	resp   *softnet.Responder
	ring   *ringTracker
	be     *Backend
	rec    *msgRecorder
	sock   string
	served chan error
	cancel context.CancelFunc
	closed bool
	// logged records the pages the back-end logged, when the test gave
	// no log hook of its own.
	logged *logTee
	// echo records the echo requests the responder received.
	echo *echoTap
	// nv, when set, is the back-end kind "DPDK net_vhost" (the baseline,
	// qemu_netvhost_test.go): then dev, resp, ring, be and rec are nil and
	// the peer at qemuPeerIP is the kernel of nv's network namespace.
	nv *netVhost
}

type rigOptions struct {
	name  string // socket file name without ".sock"; "vu" if empty
	pairs int    // queue pairs (softnet MaxQueuePairs); 1 if zero
	// pollGroup, when set, makes the device busy-poll (ModePoll) with
	// its transmit queues on this softnet.PollGroup.
	pollGroup *softnet.PollGroup
	// logHook is installed as the Backend's logHook.
	logHook func(queue int, l vring.WriteLogger) vring.WriteLogger
	// offload offers softnet's checksum and segmentation offloads.
	offload bool
	// proto, when non-zero, restricts the protocol features offered
	// (BackendOptions.ProtocolFeatures).
	proto ProtocolFeatures
	// client makes the back-end dial the socket QEMU listens on
	// (Backend.DialAndServe; qemuConfig.server) instead of listening.
	client bool
}

func startRig(t *testing.T, ctx context.Context, dir string, o rigOptions) *qemuRig {
	t.Helper()
	if o.name == "" {
		o.name = "vu"
	}
	if o.pairs == 0 {
		o.pairs = 1
	}
	resp, err := softnet.NewResponder(qemuPeerMAC, netip.MustParseAddr(qemuPeerIP))
	require.NoError(t, err)
	hw, err := net.ParseMAC(qemuGuestMAC)
	require.NoError(t, err)
	// FrontendCtrl: QEMU runs the control queue itself and passes MQ and
	// CTRL_RX/CTRL_MAC_ADDR/CTRL_VLAN on without CTRL_VQ.
	echo := &echoTap{h: resp, seen: map[[2]uint16]int{}}
	opts := softnet.Options{MAC: [6]byte(hw), Handler: echo, MaxQueueSize: 1024,
		MaxQueuePairs: uint16(o.pairs), FrontendCtrl: true, Offload: o.offload}
	if o.pollGroup != nil {
		opts.Mode, opts.PollGroup = softnet.ModePoll, o.pollGroup
	}
	dev, err := softnet.New(&opts)
	require.NoError(t, err)
	rec := &msgRecorder{}
	if d := os.Getenv("VDPAKIT_RECORD_DIR"); d != "" {
		// Test-only recording hook (testdata/lifecycle/README.md): this
		// back-end's requests and replies in the fixture format.
		name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()) + "-" + o.name + ".log"
		f, err := os.Create(filepath.Join(d, name))
		require.NoError(t, err)
		rec.fixture = f
		t.Cleanup(rec.closeFixture)
	}
	ring := &ringTracker{Device: dev}
	be := NewBackend(ring, &BackendOptions{Logger: slog.New(rec), ProtocolFeatures: o.proto})
	r := &qemuRig{name: o.name, dev: dev, resp: resp, echo: echo, ring: ring, be: be, rec: rec,
		sock: filepath.Join(dir, o.name+".sock"), served: make(chan error, 1)}
	be.logHook = o.logHook
	if be.logHook == nil {
		// Every page the back-end logs is also recorded, so that a page
		// that differs after a migration can be told apart: logged or
		// not (explainDiff).
		r.logged = newLogTee(t, 1<<30, false)
		be.logHook = r.logged.hook
	}
	sctx, cancel := context.WithCancel(ctx)
	r.cancel = cancel
	if o.client {
		go func() { r.served <- be.DialAndServe(sctx, r.sock) }()
	} else {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: r.sock, Net: "unix"})
		require.NoError(t, err)
		l.SetUnlinkOnClose(true)
		go func() { r.served <- be.Serve(sctx, l) }()
	}
	t.Cleanup(func() {
		if t.Failed() {
			msgs, warns := rec.snapshot()
			var names []string
			for _, m := range msgs {
				names = append(names, fmt.Sprintf("%v/%d", m.Req, m.Fds))
			}
			t.Logf("back-end %s requests (name/fds): %s\nback-end %s warnings: %q\nback-end %s rings: %s",
				r.name, strings.Join(names, " "), r.name, warns, r.name, ring.String())
		}
		r.kill(t)
	})
	return r
}

// echoTap is the rig's frame handler: it counts the ICMP echo requests
// (by identifier and sequence number) that reach the responder behind
// it, which tells a request the guest's driver transmitted twice (a ring
// position replayed) from a reply delivered twice.
type echoTap struct {
	h    softnet.FrameHandler
	mu   sync.Mutex
	seen map[[2]uint16]int
}

func (e *echoTap) HandleFrame(tx *softnet.Tx, frame []byte) {
	p := gopacket.NewPacket(frame, layers.LayerTypeEthernet, gopacket.DecodeOptions{NoCopy: true, Lazy: true})
	if l, ok := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4); ok && l.TypeCode.Type() == layers.ICMPv4TypeEchoRequest {
		e.mu.Lock()
		e.seen[[2]uint16{l.Id, l.Seq}]++
		e.mu.Unlock()
	}
	e.h.HandleFrame(tx, frame)
}

// repeatedEchoRequests returns the echo requests (identifier/sequence)
// that reached the rigs' responders more than once, in total. The counts
// cover the rigs' whole lives: a guest that reboots runs its pingers with
// the same identifiers again, so this is not for rigs that served a
// reboot (TestQEMUSystemReset checks counters instead).
func repeatedEchoRequests(rigs ...*qemuRig) []string {
	all := map[[2]uint16]int{}
	for _, r := range rigs {
		if r.echo == nil {
			continue
		}
		r.echo.mu.Lock()
		for k, n := range r.echo.seen {
			all[k] += n
		}
		r.echo.mu.Unlock()
	}
	var rep []string
	for k, n := range all {
		if n > 1 {
			rep = append(rep, fmt.Sprintf("id %d seq %d: %d times", k[0], k[1], n))
		}
	}
	slices.Sort(rep)
	return rep
}

// mark writes an event comment into the back-end's fixture recording
// (VDPAKIT_RECORD_DIR), if any.
func (r *qemuRig) mark(format string, args ...any) {
	if r.rec != nil {
		r.rec.mark(format, args...)
	}
}

// kill ends the back-end as a crash would, for the front-end: its listener
// and session close, every queue stops and every descriptor it received is
// closed.
func (r *qemuRig) kill(t *testing.T) {
	t.Helper()
	if r.closed {
		return
	}
	r.closed = true
	if r.nv != nil {
		r.nv.kill()
		return
	}
	r.cancel()
	select {
	case <-r.served:
	case <-time.After(10 * time.Second):
		var b strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&b, 2)
		t.Errorf("back-end %s did not stop within 10s of its context ending; goroutines:\n%s", r.name, b.String())
	}
}

// ringEvent is one queue start or stop the back-end asked of the device,
// with the ring positions (next avail, next used) at that point.
type ringEvent struct {
	start  bool
	packed bool // the started ring is a packed one (starts only)
	q      int
	st     vring.QueueState
	layout vring.Layout // the ring's guest addresses (starts only)
}

func (e ringEvent) String() string {
	w := "stop"
	if e.start {
		w = "start"
	}
	return fmt.Sprintf("%s q%d avail=%d used=%d", w, e.q, e.st.NextAvail, e.st.NextUsed)
}

// ringTracker is the softnet device as the back-end's vdpa.Handler,
// recording every queue start and stop.
type ringTracker struct {
	*softnet.Device
	mu     sync.Mutex
	events []ringEvent
}

func (r *ringTracker) StartQueue(q int, dq *vring.DeviceQueue, kick, call *vdpa.EventFD) error {
	st := dq.State()
	if err := r.Device.StartQueue(q, dq, kick, call); err != nil {
		return err
	}
	r.mu.Lock()
	r.events = append(r.events, ringEvent{start: true, packed: dq.Packed(), q: q, st: st, layout: dq.Layout()})
	r.mu.Unlock()
	return nil
}

func (r *ringTracker) StopQueue(q int) (vring.QueueState, error) {
	st, err := r.Device.StopQueue(q)
	if err == nil {
		r.mu.Lock()
		r.events = append(r.events, ringEvent{q: q, st: st})
		r.mu.Unlock()
	}
	return st, err
}

func (r *ringTracker) snapshot() []ringEvent {
	if r == nil { // a net_vhost rig
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.events)
}

func (r *ringTracker) String() string {
	var b []string
	for _, e := range r.snapshot() {
		b = append(b, e.String())
	}
	return strings.Join(b, ", ")
}

// last returns each queue's last recorded state and whether it is running.
func lastRing(ev []ringEvent) map[int]ringEvent {
	m := map[int]ringEvent{}
	for _, e := range ev {
		m[e.q] = e
	}
	return m
}

// checkRingContinuity checks that every queue restarted where it stopped:
// in ev (one back-end's events from some point on), each start of a queue
// after a stop of that queue has the stop's ring positions.
func checkRingContinuity(t *testing.T, what string, ev []ringEvent) {
	t.Helper()
	stopped := map[int]ringEvent{}
	for _, e := range ev {
		if !e.start {
			stopped[e.q] = e
			continue
		}
		if s, ok := stopped[e.q]; ok {
			assert.Equal(t, s.st, e.st, "%s: queue %d restarted at other ring positions than it stopped at (%v, then %v)", what, e.q, s, e)
			delete(stopped, e.q)
		}
	}
}

// guestImage is the kernel and an initramfs running testdata/qemu/guest.sh.
type guestImage struct {
	kernel, initrd, nonce string
}

func buildGuest(t *testing.T, ctx context.Context, helper, dir, mode string) guestImage {
	t.Helper()
	return buildGuestEnv(t, ctx, helper, dir, mode)
}

// qemuPingInterval paces the serve mode's pingers: 20 echo requests a
// second each.
const qemuPingInterval = "0.05"

func buildGuestEnv(t *testing.T, ctx context.Context, helper, dir, mode string, env ...string) guestImage {
	t.Helper()
	return buildGuestBins(t, ctx, helper, dir, mode, nil, env...)
}

// buildGuestBins is buildGuestEnv with static executables put into the
// guest's /bin (vmtest/qemu-guest.sh -bin).
func buildGuestBins(t *testing.T, ctx context.Context, helper, dir, mode string, bins []string, env ...string) guestImage {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("testdata", "qemu", "guest.sh"))
	require.NoError(t, err)
	var nb [8]byte
	_, _ = rand.Read(nb[:])
	g := guestImage{initrd: filepath.Join(dir, "initrd.gz"), nonce: hex.EncodeToString(nb[:])}
	out, err := exec.CommandContext(ctx, helper, "paths").Output()
	require.NoError(t, err, "vmtest/qemu-guest.sh paths (it prepares the kernel cache): %s", exitStderr(err))
	for _, line := range strings.Split(string(out), "\n") {
		if k, ok := strings.CutPrefix(line, "KERNEL="); ok {
			g.kernel = k
		}
	}
	require.NotEmpty(t, g.kernel, "no KERNEL= in %q", out)
	cmd := exec.CommandContext(ctx, helper, "initramfs", "-o", g.initrd, "-script", script,
		"-env", "GUEST_NONCE="+g.nonce, "-env", "GUEST_MAC="+qemuGuestMAC, "-env", "GUEST_ADDR="+qemuGuestIP,
		"-env", "PEER_IP="+qemuPeerIP, "-env", "PING_COUNT="+strconv.Itoa(qemuPings), "-env", "GUEST_MODE="+mode,
		"-env", "PING_INTERVAL="+qemuPingInterval)
	for _, e := range env {
		cmd.Args = append(cmd.Args, "-env", e)
	}
	for _, b := range bins {
		cmd.Args = append(cmd.Args, "-bin", b)
	}
	b, err := cmd.CombinedOutput()
	require.NoError(t, err, "vmtest/qemu-guest.sh initramfs: %s", b)
	return g
}

func exitStderr(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}

// qemuVM is one QEMU process (under timeout(1), in its own process group).
type qemuVM struct {
	name  string
	cmd   *exec.Cmd
	out   *lockedBuffer
	stdin io.WriteCloser // the guest's serial console input
	done  chan struct{}
	err   error // Wait's result, set before done closes
}

type qemuConfig struct {
	name    string // for logs; "qemu" if empty
	guest   guestImage
	sock    string // vhost-user socket (QEMU is the client)
	qmp     string // QMP socket QEMU listens on, or ""
	timeout time.Duration
	mem     string // guest RAM; "512M" if empty
	ramFile string // guest RAM in this file (memory-backend-file) instead of a memfd
	smp     int    // vCPUs; 1 if zero (more: TCG single-threaded, see below)
	pairs   int    // queue pairs; 1 if zero
	// incoming is a migration URI to wait on (-incoming); paused adds -S
	// (the destination stays paused after the migration until cont).
	incoming  string
	paused    bool
	reconnect bool // redial a lost back-end (qemuPeer.reconnect)
	// server makes QEMU the vhost-user server (server=on,wait=off): it
	// listens on sock, and a back-end in client mode (rigOptions.client,
	// Backend.DialAndServe) connects, at start-up and again after it was
	// lost, as OVS-DPDK's dpdkvhostuserclient ports do.
	server bool
	packed bool // virtio-net-pci,packed=on: offer the guest packed rings
	// reboot lets a reset (QMP system_reset) reboot the guest; without it
	// QEMU runs with -no-reboot, which turns a reset into an exit.
	reboot bool
	// devProps are more virtio-net-pci properties ("mrg_rxbuf=off,...").
	devProps string
	// maxmem, when set, gives the machine memory hotplug slots up to this
	// size (-m SIZE,slots=2,maxmem=MAXMEM): DIMMs can be plugged with QMP.
	maxmem string
}

func startQEMUPeer(t *testing.T, q qemuPeer, c qemuConfig) *qemuVM {
	t.Helper()
	if c.name == "" {
		c.name = "qemu"
	}
	if c.mem == "" {
		c.mem = "512M"
	}
	if c.smp == 0 {
		c.smp = 1
	}
	if c.pairs == 0 {
		c.pairs = 1
	}
	secs := strconv.Itoa(int(c.timeout / time.Second))
	// One vCPU where it will do: TCG's static-key boot race
	// (vmtest/README.md) needs two running in parallel. With more, one
	// host thread runs them all (thread=single), which avoids the race.
	accel := "tcg"
	if c.smp > 1 {
		accel = "tcg,thread=single"
	}
	// vhost-user needs the guest's RAM in a shareable fd: a memfd, or a
	// file the test can read (the migration tests compare the source's
	// RAM with the destination's).
	memObj := "memory-backend-memfd,id=mem,size=" + c.mem + ",share=on"
	if c.ramFile != "" {
		memObj = "memory-backend-file,id=mem,size=" + c.mem + ",mem-path=" + c.ramFile + ",share=on"
	}
	chardev := "socket,id=chr0,path=" + c.sock
	if c.reconnect {
		chardev += "," + q.reconnect
	}
	if c.server {
		chardev += ",server=on,wait=off"
	}
	netdev := "type=vhost-user,id=net0,chardev=chr0"
	// romfile=: no option ROM, the kernel is booted directly.
	device := "virtio-net-pci,netdev=net0,mac=" + qemuGuestMAC + ",romfile="
	if c.packed {
		device += ",packed=on"
	}
	if c.devProps != "" {
		device += "," + c.devProps
	}
	if c.pairs > 1 {
		netdev += ",queues=" + strconv.Itoa(c.pairs)
		device += ",mq=on"
	}
	switch {
	case !q.msix:
		device += ",vectors=0" // INTx: see qemuPeer.msix
	case c.pairs > 1:
		device += ",vectors=" + strconv.Itoa(2*c.pairs+2)
	}
	mem := c.mem
	if c.maxmem != "" {
		mem += ",slots=2,maxmem=" + c.maxmem
	}
	args := []string{"-k", "5", secs, q.bin,
		"-accel", accel, "-cpu", "max", "-M", "q35,memory-backend=mem", "-smp", strconv.Itoa(c.smp), "-m", mem,
		"-object", memObj,
		"-kernel", c.guest.kernel, "-initrd", c.guest.initrd,
		"-append", "console=ttyS0 panic=-1 oops=panic ipv6.disable=1 loglevel=4",
		"-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none",
		// QEMU is the vhost-user client; our back-end listens.
		"-chardev", chardev, "-netdev", netdev, "-device", device,
	}
	if !c.reboot {
		args = append(args, "-no-reboot")
	}
	if c.qmp != "" {
		args = append(args, "-qmp", "unix:"+c.qmp+",server=on,wait=off")
	}
	if c.incoming != "" {
		args = append(args, "-incoming", c.incoming)
	}
	if c.paused {
		args = append(args, "-S")
	}
	cmd := exec.Command("timeout", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	vm := &qemuVM{name: c.name, cmd: cmd, out: out, stdin: stdin, done: make(chan struct{})}
	go func() { vm.err = cmd.Wait(); close(vm.done) }()
	t.Cleanup(func() {
		vm.kill()
		if t.Failed() {
			t.Logf("%s console:\n%s", vm.name, out.String())
		}
	})
	return vm
}

// send writes one command line to the guest's serial console.
func (vm *qemuVM) send(line string) error {
	_, err := io.WriteString(vm.stdin, line+"\n")
	return err
}

// kill ends this QEMU's process group (timeout and QEMU, nothing else) if
// it is still running.
func (vm *qemuVM) kill() {
	select {
	case <-vm.done:
		return
	default:
	}
	_ = syscall.Kill(-vm.cmd.Process.Pid, syscall.SIGKILL)
	<-vm.done
}

// wait waits for QEMU to exit or ctx to end.
func (vm *qemuVM) wait(ctx context.Context) error {
	select {
	case <-vm.done:
		return vm.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitMarker waits until the console shows the marker line "QEMUGUEST-<nonce> <word> ..."
// and returns its fields after the word.
func (vm *qemuVM) waitMarker(ctx context.Context, nonce, word string) ([]string, error) {
	return waitMarkerN(ctx, vm, nonce, word, 1)
}

// waitMarkerN waits for the n-th (1-based) marker word and returns its
// fields.
func waitMarkerN(ctx context.Context, vm *qemuVM, nonce, word string, n int) ([]string, error) {
	for {
		if all := findMarkers(vm.out.String(), nonce, word); len(all) >= n {
			return all[n-1], nil
		}
		select {
		case <-vm.done:
			if all := findMarkers(vm.out.String(), nonce, word); len(all) >= n {
				return all[n-1], nil
			}
			return nil, fmt.Errorf("%s exited (%v) before the guest printed %s #%d", vm.name, vm.err, word, n)
		case <-ctx.Done():
			return nil, fmt.Errorf("%s: waiting for %s #%d: %w", vm.name, word, n, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func findMarker(console, nonce, word string) ([]string, bool) {
	if all := findMarkers(console, nonce, word); len(all) > 0 {
		return all[0], true
	}
	return nil, false
}

// findMarkers returns the fields after the word of every marker line
// "QEMUGUEST-<nonce> <word> ...". Only complete lines count: the console
// is read while the guest writes it, and a marker cut after its word
// would read as one without fields.
func findMarkers(console, nonce, word string) [][]string {
	prefix := "QEMUGUEST-" + nonce + " " + word
	console = console[:strings.LastIndexByte(console, '\n')+1]
	var all [][]string
	for _, line := range strings.Split(console, "\n") {
		line = strings.TrimRight(line, "\r")
		if line == prefix || strings.HasPrefix(line, prefix+" ") {
			all = append(all, strings.Fields(line)[2:])
		}
	}
	return all
}

// kv turns "name=value" fields into a map of numbers (non-numbers are left out).
func kv(t *testing.T, fields []string) map[string]uint64 {
	t.Helper()
	m := map[string]uint64{}
	for _, f := range fields {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(v, 10, 64); err == nil {
			m[k] = n
		}
	}
	return m
}

// guestFeatures parses /sys/bus/virtio/devices/*/features: one '0' or '1'
// per feature bit, bit 0 first.
func guestFeatures(t *testing.T, s string) virtio.Features {
	t.Helper()
	require.Regexp(t, regexp.MustCompile(`^[01]{1,64}$`), s)
	var f virtio.Features
	for i, c := range s {
		if c == '1' {
			f |= 1 << uint(i)
		}
	}
	return f
}

// TestQEMUVirtioNetPing boots a Linux guest under QEMU with a vhost-user
// virtio-net NIC served by our Backend (softnet + Responder at 10.0.2.2);
// the guest's virtio_net driver pings the responder. Checks: every echo
// answered, the guest's interface counters equal the device's, features
// negotiated by the guest driver reach the back-end, and the back-end saw
// QEMU's whole set-up and tear-down sequence with no session error.
func TestQEMUVirtioNetPing(t *testing.T) {
	forEachQEMU(t, testQEMUVirtioNetPing)
}

func testQEMUVirtioNetPing(t *testing.T, q qemuPeer, helper string) {
	testQEMUVirtioNetPingWith(t, q, helper, pingVariant{})
}

// pingVariant is a TestQEMUVirtioNetPing configuration.
type pingVariant struct {
	packed  bool   // virtio-net-pci,packed=on
	offload bool   // the device offers softnet's offloads
	props   string // more virtio-net-pci properties
	// queueSize, when set, is the size every ring the device starts must
	// have (rx_queue_size and tx_queue_size in props).
	queueSize uint16
	// mem is the guest's RAM (qemuConfig.mem). At 5G, q35 maps 2 GiB of
	// it above 4 GiB: QEMU hands the back-end two regions, and
	// ringsAbove4G asks that the guest put its rings in the upper one.
	mem          string
	ringsAbove4G bool
}

// TestQEMUFeatureVariants is TestQEMUVirtioNetPing with the device
// features and virtio-net-pci properties that change how the guest driver
// uses the rings: offloads negotiated, with mergeable receive buffers or
// without (the driver's "big packets" mode: one chain of 19 descriptors per
// receive buffer, indirect, or direct with indirect_desc=off), small
// receive buffers (no MRG_RXBUF and no guest offloads), and no EVENT_IDX
// (notifications by the flags alone), and rings of 1024 descriptors
// (rx_queue_size, tx_queue_size; QEMU allows 1024 transmit descriptors for
// vhost-user only), split and packed, and a guest of 5 GiB whose rings lie
// in the memory region above 4 GiB. Every variant runs to the same
// checks: every echo answered, counters equal on both sides, and the
// features the guest driver negotiated are the back-end's.
func TestQEMUFeatureVariants(t *testing.T) {
	for _, v := range []struct {
		name string
		pingVariant
	}{
		{"offloads-mergeable", pingVariant{offload: true}},
		{"offloads-big-packets-indirect", pingVariant{offload: true, props: "mrg_rxbuf=off"}},
		{"offloads-big-packets-direct-no-event-idx", pingVariant{offload: true, props: "mrg_rxbuf=off,indirect_desc=off,event_idx=off"}},
		{"small-buffers", pingVariant{props: "mrg_rxbuf=off"}},
		{"packed-offloads-big-packets", pingVariant{packed: true, offload: true, props: "mrg_rxbuf=off"}},
		{"queues-1024", pingVariant{offload: true, props: "rx_queue_size=1024,tx_queue_size=1024", queueSize: 1024}},
		{"packed-queues-1024", pingVariant{packed: true, offload: true, props: "rx_queue_size=1024,tx_queue_size=1024", queueSize: 1024}},
		{"memory-above-4g", pingVariant{offload: true, mem: "5G", ringsAbove4G: true}},
	} {
		t.Run(v.name, func(t *testing.T) {
			forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
				testQEMUVirtioNetPingWith(t, q, helper, v.pingVariant)
			})
		})
	}
}

// testQEMUVirtioNetPingWith is testQEMUVirtioNetPing in variant v; with
// packed, the guest driver and the back-end must both have negotiated
// RING_PACKED.
func testQEMUVirtioNetPingWith(t *testing.T, q qemuPeer, helper string, v pingVariant) {
	packed := v.packed
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	start := time.Now()
	g := buildGuest(t, ctx, helper, dir, "ping")
	t.Logf("guest image ready in %v", time.Since(start).Round(time.Millisecond))
	rig := startRig(t, ctx, dir, rigOptions{offload: v.offload})
	vm := startQEMUPeer(t, q, qemuConfig{guest: g, sock: rig.sock, timeout: 150 * time.Second, packed: packed, devProps: v.props, mem: v.mem})

	require.NoError(t, vm.wait(ctx), "QEMU (exit status 124: timed out)")
	t.Logf("QEMU ran %v", time.Since(start).Round(time.Millisecond))
	// A session error is the likeliest root cause of anything below.
	_, warns := rig.rec.snapshot()
	assert.Empty(t, warns, "back-end warnings (a session error)")
	console := vm.out.String()
	_, ok := findMarker(console, g.nonce, "BOOTED")
	require.True(t, ok, "guest init never ran")
	_, bad := findMarker(console, g.nonce, "MODULE-FAIL")
	require.False(t, bad, "a guest module failed to load")
	iface, ok := findMarker(console, g.nonce, "IFACE")
	require.True(t, ok, "no interface with MAC %s in the guest", qemuGuestMAC)
	require.Len(t, iface, 4)
	assert.Equal(t, "driver=virtio_net", iface[2])
	carrier, _ := findMarker(console, g.nonce, "CARRIER")
	assert.Equal(t, []string{"1"}, carrier, "link up (VIRTIO_NET_S_LINK_UP)")
	pingF, ok := findMarker(console, g.nonce, "PING")
	require.True(t, ok, "no PING marker")
	ping := kv(t, pingF)
	assert.Equal(t, map[string]uint64{"rc": 0, "transmitted": qemuPings, "received": qemuPings}, ping, "busybox ping: every echo request answered")
	statsF, ok := findMarker(console, g.nonce, "STATS")
	require.True(t, ok, "no STATS marker")
	gs := kv(t, statsF)
	exitF, _ := findMarker(console, g.nonce, "EXIT")
	assert.Equal(t, []string{"0"}, exitF, "guest script exit status")

	// QEMU has exited: the session ends (EOF) and the device keeps its counters.
	require.Eventually(t, func() bool { return !rig.be.Info().Connected }, 10*time.Second, 20*time.Millisecond,
		"back-end still connected after QEMU exited")
	if v.ringsAbove4G {
		var descs []vring.GuestAddr
		for _, e := range rig.ring.snapshot() {
			if e.start {
				descs = append(descs, e.layout.Desc)
			}
		}
		assert.True(t, slices.ContainsFunc(descs, func(a vring.GuestAddr) bool { return a >= 1<<32 }),
			"a ring in guest memory above 4 GiB (the second region): descriptor tables at %v", descs)
	}
	if v.queueSize != 0 {
		var sizes []uint16
		for _, e := range rig.ring.snapshot() {
			if e.start {
				sizes = append(sizes, e.layout.Size)
			}
		}
		require.NotEmpty(t, sizes, "rings started")
		for _, n := range sizes {
			assert.Equal(t, v.queueSize, n, "ring sizes the device started: %v", sizes)
		}
	}
	ds := rig.dev.Stats()
	rs := rig.resp.Stats()
	t.Logf("guest: %v; device: tx %+v rx %+v; responder %+v", statsF, ds.Tx(), ds.Rx(), rs)
	assert.Equal(t, gs["tx_packets"], ds.Tx().Frames, "frames the guest sent = frames the device took from its transmit queue")
	assert.Equal(t, gs["tx_bytes"], ds.Tx().Bytes, "transmitted bytes")
	assert.Equal(t, gs["rx_packets"], ds.Rx().Frames, "frames the guest received = frames the device delivered")
	assert.Equal(t, gs["rx_bytes"], ds.Rx().Bytes, "received bytes")
	for _, k := range []string{"rx_dropped", "tx_dropped", "rx_errors", "tx_errors"} {
		assert.Zero(t, gs[k], "guest %s", k)
	}
	assert.Equal(t, [len(ds.Drops)]uint64{}, ds.Drops, "device drops by reason")
	assert.Equal(t, uint64(qemuPings), rs.EchoReplies, "echo replies")
	assert.GreaterOrEqual(t, rs.ARPReplies, uint64(1), "ARP replies")
	assert.Equal(t, rs.ARPReplies+rs.EchoReplies+rs.Ignored, ds.Tx().Frames, "every transmitted frame reached the responder")
	assert.Equal(t, rs.ARPReplies+rs.EchoReplies, ds.Rx().Frames, "every reply was delivered")

	// Features: QEMU passes the guest driver's acknowledgement on; the
	// back-end's device features are all ones the driver negotiated.
	info := rig.be.Info()
	gf := guestFeatures(t, strings.TrimPrefix(iface[3], "features="))
	dev := info.Features &^ virtio.FProtocolFeat.Bit() &^ virtio.FLogAll.Bit()
	t.Logf("guest driver features %s; back-end features %s; protocol %v", gf.Format(virtio.DeviceNet),
		info.Features.Format(virtio.DeviceNet), info.ProtocolFeatures)
	assert.True(t, gf.Has(virtio.FVersion1), "guest driver negotiated VERSION_1")
	assert.True(t, info.Features.Has(virtio.FVersion1), "back-end got VERSION_1")
	assert.True(t, info.Features.Has(virtio.FProtocolFeat), "QEMU uses PROTOCOL_FEATURES")
	assert.False(t, info.Features.Has(virtio.FLogAll), "no LOG_ALL outside migration")
	assert.Zero(t, dev&^gf, "back-end features %s not negotiated by the guest driver", (dev &^ gf).Format(virtio.DeviceNet))
	assert.Equal(t, packed, gf.Has(virtio.FRingPacked), "guest driver negotiated RING_PACKED (bit 34 of its features)")
	assert.Equal(t, packed, info.Features.Has(virtio.FRingPacked), "back-end got RING_PACKED")
	for _, f := range []virtio.Feature{virtio.FEventIdx, virtio.FIndirectDesc, virtio.NetFMrgRxbuf, virtio.FRingPacked} {
		assert.Equal(t, gf.Has(f), dev.Has(f), "%v: guest driver and back-end agree", f)
	}
	// The variant's features are the ones negotiated.
	assert.Equal(t, v.offload, gf.Has(virtio.NetFGuestTSO4) && dev.Has(virtio.NetFGuestTSO4), "guest TSO negotiated with the offloads offered")
	assert.Equal(t, v.offload, gf.Has(virtio.NetFCsum) && dev.Has(virtio.NetFCsum), "CSUM negotiated with the offloads offered")
	for prop, f := range map[string]virtio.Feature{"mrg_rxbuf=off": virtio.NetFMrgRxbuf, "event_idx=off": virtio.FEventIdx, "indirect_desc=off": virtio.FIndirectDesc} {
		assert.Equal(t, !strings.Contains(v.props, prop), gf.Has(f), "%v with device properties %q", f, v.props)
	}
	assert.True(t, info.ProtocolFeatures.Has(PFReplyAck), "protocol features %v", info.ProtocolFeatures)
	assert.Equal(t, 1, info.Sessions)

	msgs, _ := rig.rec.snapshot() // with the tear-down
	checkQEMUSequence(t, msgs)
}

// checkQEMUSequence checks the requests QEMU 7.2 sends a vhost-user net
// back-end over a guest's life: set-up at connect, memory table (with one
// descriptor per region) and both rings (receiveq 0, transmitq 0) before
// the driver's data moves, and the rings stopped (GET_VRING_BASE) at the end.
func checkQEMUSequence(t *testing.T, msgs []msgRecord) {
	t.Helper()
	var names []string
	first := map[Request]int{}
	count := map[Request]int{}
	for i, m := range msgs {
		names = append(names, fmt.Sprintf("%v/%d", m.Req, m.Fds))
		if _, ok := first[m.Req]; !ok {
			first[m.Req] = i
		}
		count[m.Req]++
	}
	t.Logf("requests (name/fds): %s", strings.Join(names, " "))
	// The memory comes as whole tables, or region by region when the
	// back-end offers CONFIGURE_MEM_SLOTS (as it does by default): then
	// QEMU asks for the slot count first and never sends SET_MEM_TABLE.
	memReq := ReqSetMemTable
	if count[ReqAddMemReg] > 0 {
		memReq = ReqAddMemReg
		assert.Zero(t, count[ReqSetMemTable], "SET_MEM_TABLE beside ADD_MEM_REG")
		assert.Positive(t, count[ReqGetMaxMemSlots], "GET_MAX_MEM_SLOTS sent")
	}
	for _, r := range []Request{ReqSetOwner, ReqGetFeatures, ReqGetProtocolFeatures, ReqSetProtocolFeatures,
		ReqSetFeatures, memReq} {
		assert.Positive(t, count[r], "%v sent", r)
	}
	for _, r := range []Request{ReqSetVringNum, ReqSetVringBase, ReqSetVringAddr, ReqSetVringKick, ReqSetVringCall,
		ReqSetVringEnable, ReqGetVringBase} {
		assert.GreaterOrEqual(t, count[r], 2, "%v for receiveq and transmitq", r)
	}
	if t.Failed() {
		return
	}
	assert.Less(t, first[ReqGetFeatures], first[ReqSetFeatures], "GET_FEATURES before SET_FEATURES")
	assert.Less(t, first[ReqGetProtocolFeatures], first[ReqSetProtocolFeatures])
	assert.Less(t, first[memReq], first[ReqSetVringKick], "memory before the first ring starts")
	if memReq == ReqAddMemReg {
		assert.Less(t, first[ReqGetMaxMemSlots], first[ReqAddMemReg], "the slot count asked before the first region")
	}
	assert.Less(t, first[ReqSetFeatures], first[ReqSetVringKick], "features before the first ring starts")
	assert.Less(t, first[ReqSetVringKick], first[ReqGetVringBase], "rings started before they are stopped")
	for i, m := range msgs {
		switch m.Req {
		case ReqSetMemTable:
			assert.Positive(t, m.Fds, "SET_MEM_TABLE #%d carries the regions' descriptors", i)
		case ReqAddMemReg:
			assert.Equal(t, 1, m.Fds, "ADD_MEM_REG #%d carries its region's descriptor", i)
		case ReqSetVringKick, ReqSetVringCall:
			assert.LessOrEqual(t, m.Fds, 1, "%v #%d", m.Req, i)
		case ReqGetFeatures, ReqSetFeatures, ReqSetVringNum, ReqSetVringAddr, ReqSetVringBase, ReqGetVringBase:
			assert.Zero(t, m.Fds, "%v #%d carries no descriptor", m.Req, i)
		}
	}
}
