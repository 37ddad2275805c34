package vhostuser

// Interop tests against QEMU (Debian bookworm's 7.2) and the Linux 6.12
// virtio-net driver: QEMU is the vhost-user front-end of our Backend, which
// serves a softnet device whose frame handler answers ARP and ICMP echo; the
// guest's virtio_net driver pings through it, and a migration to a sink
// makes QEMU turn on vhost-user dirty logging. The guest is the real-kernel
// harness's cached Debian kernel (vmtest/qemu-guest.sh builds its initramfs
// around testdata/qemu/guest.sh). Gated by VDPAKIT_QEMU=1: skipped without it
// (and inside the harness VM, where the CI line leaves it out with
// -test.skip QEMU), failed when it is set and QEMU or the kernel cache is
// missing.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

const (
	qemuGuestMAC = "52:54:00:12:34:56"
	qemuGuestIP  = "10.0.2.15/24"
	qemuPeerIP   = "10.0.2.2"
	qemuPings    = 5
)

// qemuPeerMAC is the responder's (the "host" at qemuPeerIP) address.
var qemuPeerMAC = [6]byte{0x02, 0, 0, 0, 0, 0x02}

func requireQEMU(t *testing.T) (qemu, helper string) {
	t.Helper()
	if os.Getenv("VDPAKIT_QEMU") != "1" {
		if os.Getenv("VDPAKIT_VMTEST") == "1" {
			t.Skip("QEMU interop test: runs on the host, not inside the real-kernel harness VM (leave it out with -test.skip QEMU)")
		}
		t.Skip("QEMU interop test: set VDPAKIT_QEMU=1 to run it (needs qemu-system-x86_64 and vmtest's kernel cache, which vmtest/qemu-guest.sh fills)")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("VDPAKIT_QEMU=1 but qemu-system-x86_64 is not installed: %v", err)
	}
	helper, err = filepath.Abs(filepath.Join("..", "..", "vmtest", "qemu-guest.sh"))
	require.NoError(t, err)
	if _, err := os.Stat(helper); err != nil {
		t.Fatalf("VDPAKIT_QEMU=1 but the guest helper is missing: %v", err)
	}
	return qemu, helper
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
}

func (r *msgRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *msgRecorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *msgRecorder) WithGroup(string) slog.Handler            { return r }

func (r *msgRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rec.Level >= slog.LevelWarn {
		var sb strings.Builder
		sb.WriteString(rec.Message)
		rec.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&sb, " %s=%v", a.Key, a.Value); return true })
		r.warns = append(r.warns, sb.String())
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

func (r *msgRecorder) snapshot() ([]msgRecord, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]msgRecord(nil), r.msgs...), append([]string(nil), r.warns...)
}

// qemuRig is a softnet device with a Responder served by our Backend on a
// unix socket that QEMU connects to.
type qemuRig struct {
	dev    *softnet.Device
	resp   *softnet.Responder
	be     *Backend
	rec    *msgRecorder
	sock   string
	served chan error
}

func startQEMURig(t *testing.T, ctx context.Context, dir string) *qemuRig {
	t.Helper()
	resp, err := softnet.NewResponder(qemuPeerMAC, netip.MustParseAddr(qemuPeerIP))
	require.NoError(t, err)
	hw, err := net.ParseMAC(qemuGuestMAC)
	require.NoError(t, err)
	dev, err := softnet.New(&softnet.Options{MAC: [6]byte(hw), Handler: resp, MaxQueueSize: 1024})
	require.NoError(t, err)
	rec := &msgRecorder{}
	be := NewBackend(dev, &BackendOptions{Logger: slog.New(rec)})
	r := &qemuRig{dev: dev, resp: resp, be: be, rec: rec, sock: filepath.Join(dir, "vu.sock"), served: make(chan error, 1)}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: r.sock, Net: "unix"})
	require.NoError(t, err)
	sctx, cancel := context.WithCancel(ctx)
	go func() { r.served <- be.Serve(sctx, l) }()
	t.Cleanup(func() {
		if t.Failed() {
			msgs, warns := rec.snapshot()
			var names []string
			for _, m := range msgs {
				names = append(names, fmt.Sprintf("%v/%d", m.Req, m.Fds))
			}
			t.Logf("back-end requests (name/fds): %s\nback-end warnings: %q", strings.Join(names, " "), warns)
		}
		cancel()
		select {
		case <-r.served:
		case <-time.After(10 * time.Second):
			t.Errorf("back-end did not stop within 10s of its context ending")
		}
	})
	return r
}

// guestImage is the kernel and an initramfs running testdata/qemu/guest.sh.
type guestImage struct {
	kernel, initrd, nonce string
}

func buildGuest(t *testing.T, ctx context.Context, helper, dir, mode string) guestImage {
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
		"-env", "PEER_IP="+qemuPeerIP, "-env", "PING_COUNT="+strconv.Itoa(qemuPings), "-env", "GUEST_MODE="+mode)
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
	cmd  *exec.Cmd
	out  *lockedBuffer
	done chan struct{}
	err  error // Wait's result, set before done closes
}

type qemuConfig struct {
	guest   guestImage
	sock    string // vhost-user socket (QEMU is the client)
	qmp     string // QMP socket QEMU listens on, or ""
	timeout time.Duration
}

func startQEMU(t *testing.T, bin string, c qemuConfig) *qemuVM {
	t.Helper()
	secs := strconv.Itoa(int(c.timeout / time.Second))
	args := []string{"-k", "5", secs, bin,
		// One vCPU: TCG's static-key boot race (vmtest/README.md) needs two.
		"-accel", "tcg", "-cpu", "max", "-M", "q35", "-smp", "1", "-m", "512M",
		// vhost-user needs the guest's RAM in a shareable fd.
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
		"-kernel", c.guest.kernel, "-initrd", c.guest.initrd,
		"-append", "console=ttyS0 panic=-1 oops=panic ipv6.disable=1 loglevel=4",
		"-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none",
		// QEMU is the vhost-user client; our back-end listens.
		"-chardev", "socket,id=chr0,path=" + c.sock,
		"-netdev", "type=vhost-user,id=net0,chardev=chr0",
		// vectors=0: INTx instead of MSI-X. QEMU 7.2 under TCG (no KVM
		// irqfd) segfaults in msix_set_vector_notifiers, called from
		// vhost_net_start when the guest driver sets DRIVER_OK on a
		// vhost-user NIC with MSI-X (seen with gdb on this machine).
		// romfile=: no option ROM, the kernel is booted directly.
		"-device", "virtio-net-pci,netdev=net0,mac=" + qemuGuestMAC + ",romfile=,vectors=0",
	}
	if c.qmp != "" {
		args = append(args, "-qmp", "unix:"+c.qmp+",server=on,wait=off")
	}
	cmd := exec.Command("timeout", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	vm := &qemuVM{cmd: cmd, out: out, done: make(chan struct{})}
	go func() { vm.err = cmd.Wait(); close(vm.done) }()
	t.Cleanup(func() {
		vm.kill()
		if t.Failed() {
			t.Logf("QEMU console:\n%s", out.String())
		}
	})
	return vm
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
	for {
		if f, ok := findMarker(vm.out.String(), nonce, word); ok {
			return f, nil
		}
		select {
		case <-vm.done:
			if f, ok := findMarker(vm.out.String(), nonce, word); ok {
				return f, nil
			}
			return nil, fmt.Errorf("QEMU exited (%v) before the guest printed %s", vm.err, word)
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %s: %w", word, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func findMarker(console, nonce, word string) ([]string, bool) {
	prefix := "QEMUGUEST-" + nonce + " " + word
	sc := bufio.NewScanner(strings.NewReader(console))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if line == prefix || strings.HasPrefix(line, prefix+" ") {
			return strings.Fields(line)[2:], true
		}
	}
	return nil, false
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
	qemu, helper := requireQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	start := time.Now()
	g := buildGuest(t, ctx, helper, dir, "ping")
	t.Logf("guest image ready in %v", time.Since(start).Round(time.Millisecond))
	rig := startQEMURig(t, ctx, dir)
	vm := startQEMU(t, qemu, qemuConfig{guest: g, sock: rig.sock, timeout: 150 * time.Second})

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
	for _, f := range []virtio.Feature{virtio.FEventIdx, virtio.FIndirectDesc, virtio.NetFMrgRxbuf} {
		assert.Equal(t, gf.Has(f), dev.Has(f), "%v: guest driver and back-end agree", f)
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
	for _, r := range []Request{ReqSetOwner, ReqGetFeatures, ReqGetProtocolFeatures, ReqSetProtocolFeatures,
		ReqSetFeatures, ReqSetMemTable} {
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
	assert.Less(t, first[ReqSetMemTable], first[ReqSetVringKick], "memory table before the first ring starts")
	assert.Less(t, first[ReqSetFeatures], first[ReqSetVringKick], "features before the first ring starts")
	assert.Less(t, first[ReqSetVringKick], first[ReqGetVringBase], "rings started before they are stopped")
	for i, m := range msgs {
		switch m.Req {
		case ReqSetMemTable:
			assert.Positive(t, m.Fds, "SET_MEM_TABLE #%d carries the regions' descriptors", i)
		case ReqSetVringKick, ReqSetVringCall:
			assert.LessOrEqual(t, m.Fds, 1, "%v #%d", m.Req, i)
		case ReqGetFeatures, ReqSetFeatures, ReqSetVringNum, ReqSetVringAddr, ReqSetVringBase, ReqGetVringBase:
			assert.Zero(t, m.Fds, "%v #%d carries no descriptor", m.Req, i)
		}
	}
}

// qmpClient speaks QEMU's machine protocol (JSON lines) on a unix socket.
type qmpClient struct {
	c  net.Conn
	rd *bufio.Reader
}

func dialQMP(ctx context.Context, path string) (*qmpClient, error) {
	var d net.Dialer
	var c net.Conn
	var err error
	for {
		if c, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	q := &qmpClient{c: c, rd: bufio.NewReader(c)}
	if _, err := q.rd.ReadBytes('\n'); err != nil { // greeting
		c.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if _, err := q.do("qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

// do runs one command and returns its "return" value; events that arrive
// meanwhile are skipped.
func (q *qmpClient) do(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		line, err := q.rd.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: reply %q: %w", cmd, line, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

// logMapping finds the back-end's mapping of QEMU's dirty log (a memfd QEMU
// names "vhost-log") in this process and returns its address and length.
func logMapping() (addr, size uint64, ok bool) {
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return 0, 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, "memfd:vhost-log") {
			continue
		}
		rng, _, _ := strings.Cut(line, " ")
		lo, hi, _ := strings.Cut(rng, "-")
		l, err1 := strconv.ParseUint(lo, 16, 64)
		h, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 == nil && err2 == nil && h > l {
			return l, h - l, true
		}
	}
	return 0, 0, false
}

// TestQEMUDirtyLog migrates the guest (to a sink: exec:cat >/dev/null)
// while it pings through our back-end. QEMU enables vhost-user dirty
// logging for the migration: the back-end must get LOG_ALL and SET_LOG_BASE
// (LOG_SHMFD: the log as a memfd) and mark the pages it writes (receive
// buffers, used rings) in QEMU's log, which QEMU harvests and clears while
// the migration runs. The test reads the log through the back-end's own
// mapping of it (/proc/self/mem) while traffic runs and wants marked pages,
// all inside guest RAM.
func TestQEMUDirtyLog(t *testing.T) {
	qemu, helper := requireQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	dir := t.TempDir()
	start := time.Now()
	g := buildGuest(t, ctx, helper, dir, "stream")
	rig := startQEMURig(t, ctx, dir)
	qmpPath := filepath.Join(dir, "qmp.sock")
	vm := startQEMU(t, qemu, qemuConfig{guest: g, sock: rig.sock, qmp: qmpPath, timeout: 150 * time.Second})

	_, err := vm.waitMarker(ctx, g.nonce, "STREAMING")
	require.NoError(t, err)
	_, warns := rig.rec.snapshot()
	require.Empty(t, warns, "back-end warnings (a session error)")
	require.Eventually(t, func() bool { return rig.resp.Stats().EchoReplies >= 3 }, 30*time.Second, 20*time.Millisecond,
		"no echo traffic before the migration")
	q, err := dialQMP(ctx, qmpPath)
	require.NoError(t, err)
	defer q.c.Close()
	// A slow migration: traffic keeps flowing, and the back-end keeps
	// logging, for a few seconds.
	_, err = q.do("migrate-set-parameters", map[string]any{"max-bandwidth": 16 << 20})
	require.NoError(t, err)
	_, err = q.do("migrate", map[string]any{"uri": "exec:cat >/dev/null"})
	require.NoError(t, err)

	mem, err := os.Open("/proc/self/mem")
	require.NoError(t, err)
	defer mem.Close()
	const ramPages = 512 << 20 >> 12
	marked := map[uint64]bool{}
	var sawLogAll bool
	var status string
	var buf []byte
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if rig.be.Info().Features.Has(virtio.FLogAll) {
			sawLogAll = true
		}
		if addr, size, ok := logMapping(); ok {
			if uint64(len(buf)) != size {
				buf = make([]byte, size)
			}
			if n, err := mem.ReadAt(buf, int64(addr)); err == nil && n == len(buf) {
				for i, b := range buf {
					for bit := 0; bit < 8; bit++ {
						if b&(1<<bit) != 0 {
							marked[uint64(i)*8+uint64(bit)] = true
						}
					}
				}
			}
		}
		r, err := q.do("query-migrate", nil)
		require.NoError(t, err)
		var st struct {
			Status string `json:"status"`
		}
		require.NoError(t, json.Unmarshal(r, &st))
		status = st.Status
		if status == "completed" || status == "failed" || status == "cancelled" {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	require.Equal(t, "completed", status, "migration status")
	echoes := rig.resp.Stats().EchoReplies
	_, err = q.do("quit", nil)
	require.NoError(t, err)
	require.NoError(t, vm.wait(ctx))
	t.Logf("migration and quit after %v; %d echo replies; %d distinct pages seen marked in the log",
		time.Since(start).Round(time.Millisecond), echoes, len(marked))

	require.Eventually(t, func() bool { return !rig.be.Info().Connected }, 10*time.Second, 20*time.Millisecond)
	msgs, warns := rig.rec.snapshot()
	assert.Empty(t, warns, "back-end warnings (a session error)")
	var logBase int
	for _, m := range msgs {
		if m.Req == ReqSetLogBase {
			logBase++
			assert.Equal(t, 1, m.Fds, "SET_LOG_BASE carries the log memfd (LOG_SHMFD)")
		}
	}
	assert.Positive(t, logBase, "SET_LOG_BASE sent")
	assert.True(t, sawLogAll, "LOG_ALL negotiated during the migration")
	assert.NotEmpty(t, marked, "the back-end marked pages it wrote in QEMU's log")
	for p := range marked {
		assert.Less(t, p, uint64(ramPages), "marked page %#x outside the guest's 512 MiB", p)
	}
}
