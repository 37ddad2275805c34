package vfiouser_test

// The real peer: QEMU 11's vfio-user client (-device vfio-user-pci) attaches
// our server, and the Debian 6.12 guest kernel's virtio_pci and virtio_net
// drivers drive the mediated device. Gated like the vhost-user QEMU tests:
// VDPAKIT_QEMU=1 runs them (and then a missing QEMU 11 or kernel cache is a
// failure; vmtest/qemu11.sh and vmtest/qemu-guest.sh fill the caches).

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/qmp"
	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

const (
	qGuestMAC = "52:54:00:12:34:56"
	qGuestIP  = "10.0.2.15/24"
	qPeerIP   = "10.0.2.2"
	qMTU      = 1400
	qPings    = 5
)

func requireQEMU11(t *testing.T) (qemu, helper string) {
	t.Helper()
	// testenv.QEMUInterop: VDPAKIT_QEMU=1 must run (failing on anything
	// missing); otherwise it skips, saying how to run it.
	var missing []string
	if testenv.QEMU11Cached() == "" {
		missing = append(missing, "QEMU 11 (vmtest/qemu11.sh prepare)")
	}
	if !testenv.GuestKernelCached() {
		missing = append(missing, "the guest kernel (vmtest/run.sh --prepare)")
	}
	testenv.QEMUInterop(t, missing)
	helper, err := filepath.Abs(filepath.Join("..", "..", "vmtest", "qemu-guest.sh"))
	require.NoError(t, err)
	q11, err := filepath.Abs(filepath.Join("..", "..", "vmtest", "qemu11.sh"))
	require.NoError(t, err)
	out, err := exec.Command(q11, "path").Output()
	if err != nil {
		t.Fatalf("VDPAKIT_QEMU=1 but QEMU 11 is not available (vmtest/qemu11.sh path): %v %s", err, exitStderr(err))
	}
	return strings.TrimSpace(string(out)), helper
}

func exitStderr(err error) string {
	if ee, ok := err.(*exec.ExitError); ok {
		return string(ee.Stderr)
	}
	return ""
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type vm struct {
	cmd   *exec.Cmd
	out   *lockedBuf
	done  chan struct{}
	err   error
	nonce string
}

// bootQEMU builds the guest image for mode and boots it with a vfio-user-pci
// device on sock.
func bootQEMU(t *testing.T, ctx context.Context, qemu, helper, sock, mode string, intx bool) *vm {
	t.Helper()
	return bootQEMUWith(t, ctx, qemu, helper, sock, mode, bootOpts{intx: intx})
}

// bootOpts are bootQEMUWith's options.
type bootOpts struct {
	intx bool // pci=nomsi: the guest uses the line interrupt
	// qmp, if set, is the path of a QMP socket QEMU listens on.
	qmp string
	// reboot lets a reset (QMP system_reset) reboot the guest; otherwise
	// QEMU runs with -no-reboot, which makes any reset an exit.
	reboot bool
	// smp is the number of vCPUs (1 if zero).
	smp int
	// bins are static executables put into the guest's /bin
	// (vmtest/qemu-guest.sh -bin).
	bins []string
}

// bootQEMUWith is bootQEMU with options.
func bootQEMUWith(t *testing.T, ctx context.Context, qemu, helper, sock, mode string, o bootOpts) *vm {
	t.Helper()
	intx := o.intx
	dir := t.TempDir()
	script, err := filepath.Abs(filepath.Join("testdata", "qemu", "guest.sh"))
	require.NoError(t, err)
	var nb [8]byte
	_, _ = rand.Read(nb[:])
	nonce := hex.EncodeToString(nb[:])
	out, err := exec.CommandContext(ctx, helper, "paths").Output()
	require.NoError(t, err, "vmtest/qemu-guest.sh paths: %s", exitStderr(err))
	var kernel string
	for _, line := range strings.Split(string(out), "\n") {
		if k, ok := strings.CutPrefix(line, "KERNEL="); ok {
			kernel = k
		}
	}
	require.NotEmpty(t, kernel)
	initrd := filepath.Join(dir, "initrd.gz")
	ia := []string{"initramfs", "-o", initrd, "-script", script,
		"-env", "GUEST_NONCE=" + nonce, "-env", "GUEST_MAC=" + qGuestMAC, "-env", "GUEST_ADDR=" + qGuestIP,
		"-env", "PEER_IP=" + qPeerIP, "-env", "PING_COUNT=" + strconv.Itoa(qPings), "-env", "GUEST_MODE=" + mode}
	for _, bin := range o.bins {
		ia = append(ia, "-bin", bin)
	}
	b, err := exec.CommandContext(ctx, helper, ia...).CombinedOutput()
	require.NoError(t, err, "initramfs: %s", b)
	smp := max(o.smp, 1)
	// More than one vCPU: one host thread runs them all (thread=single),
	// which avoids TCG's static-key boot race (vmtest/README.md).
	accel := "tcg"
	if smp > 1 {
		accel = "tcg,thread=single"
	}
	appendLine := "console=ttyS0 panic=-1 oops=panic ipv6.disable=1 loglevel=4"
	if intx {
		appendLine += " pci=nomsi"
	}
	dev := fmt.Sprintf(`{"driver":"vfio-user-pci","id":"n0","socket":{"path":%q,"type":"unix"}}`, sock)
	args := []string{"-k", "5", "170", qemu,
		"-accel", accel, "-cpu", "max", "-M", "q35,memory-backend=mem", "-smp", strconv.Itoa(smp), "-m", "512M",
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-kernel", kernel, "-initrd", initrd, "-append", appendLine,
		"-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none",
		"-device", dev}
	if !o.reboot {
		args = append(args, "-no-reboot")
	}
	if o.qmp != "" {
		args = append(args, "-qmp", "unix:"+o.qmp+",server=on,wait=off")
	}
	cmd := exec.Command("timeout", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	v := &vm{cmd: cmd, out: &lockedBuf{}, done: make(chan struct{}), nonce: nonce}
	cmd.Stdout, cmd.Stderr = v.out, v.out
	require.NoError(t, cmd.Start())
	go func() { v.err = cmd.Wait(); close(v.done) }()
	t.Cleanup(func() {
		select {
		case <-v.done:
		default:
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-v.done
		}
		if t.Failed() {
			t.Logf("QEMU console:\n%s", v.out.String())
		}
	})
	return v
}

// markers returns the fields of every "QEMUGUEST-<nonce> word ..." line.
func (v *vm) markers(word string) [][]string {
	prefix := "QEMUGUEST-" + v.nonce + " " + word
	// Only complete lines: the console is read while the guest writes it,
	// and a marker cut after its word would read as one without fields.
	out := v.out.String()
	out = out[:strings.LastIndexByte(out, '\n')+1]
	var all [][]string
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if line == prefix || strings.HasPrefix(line, prefix+" ") {
			all = append(all, strings.Fields(line)[2:])
		}
	}
	return all
}

// wait waits for the n-th marker word (1-based).
func (v *vm) wait(ctx context.Context, word string, n int) ([]string, error) {
	for {
		if m := v.markers(word); len(m) >= n {
			return m[n-1], nil
		}
		select {
		case <-v.done:
			if m := v.markers(word); len(m) >= n {
				return m[n-1], nil
			}
			return nil, fmt.Errorf("QEMU exited (%v) before the guest printed %s #%d", v.err, word, n)
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %s: %w", word, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func kvs(fields []string) map[string]uint64 {
	m := map[string]uint64{}
	for _, f := range fields {
		if k, v, ok := strings.Cut(f, "="); ok {
			if n, err := strconv.ParseUint(v, 10, 64); err == nil {
				m[k] = n
			}
		}
	}
	return m
}

type qemuRig struct {
	sn  *softnet.Device
	srv *vfiouser.Server
	// restart, with a vhost-user backing, ends the back-end's session as
	// its process dying would and serves a new back-end (a fresh softnet
	// device, made as the first) on the same socket.
	restart func()
	// snMade counts the softnet devices made (one more per restart);
	// last is the latest.
	snMade int
	last   *softnet.Device
}

// sn2Frames is the frames the latest softnet device took from the guest.
func (r *qemuRig) sn2Frames() uint64 { return r.last.Stats().Tx().Frames }

func startServer(t *testing.T, ctx context.Context, sock string, pairs int) *qemuRig {
	return startServerBacking(t, ctx, sock, pairs, backingOpts{})
}

// backingOpts configure startServerBacking's device.
type backingOpts struct {
	// vhostUser puts the software device behind a vhost-user back-end the
	// server reaches through vhostuser.Frontend.
	vhostUser bool
	// split masks VIRTIO_F_RING_PACKED: the software device offers it, and
	// the guest's virtio_pci then runs packed rings.
	split bool
	// offload offers softnet's checksum and segmentation offloads.
	offload bool
	// mask removes more features from the device's offer.
	mask virtio.Features
	// reconnect (with vhostUser) gives the Frontend ReconnectOptions and
	// the rig a restart.
	reconnect bool
}

// startServerBacking is startServer with the device o describes.
func startServerBacking(t *testing.T, ctx context.Context, sock string, pairs int, o backingOpts) *qemuRig {
	t.Helper()
	r := &qemuRig{}
	resp, err := softnet.NewResponder([6]byte{0x02, 0, 0, 0, 0, 0x02}, netip.MustParseAddr(qPeerIP))
	require.NoError(t, err)
	mac, _ := net.ParseMAC(qGuestMAC)
	var m [6]byte
	copy(m[:], mac)
	// Behind vhost-user the control queue stays out of the data path (as
	// QEMU's own vhost-user front-end keeps it): no CTRL_VQ.
	newSN := func() *softnet.Device {
		sn, err := softnet.New(&softnet.Options{MAC: m, MTU: qMTU, MaxQueuePairs: uint16(pairs), Handler: resp, NoCtrlVQ: o.vhostUser, Offload: o.offload,
			OnConfigChange: func() {
				if r.srv != nil {
					r.srv.Device().ConfigChanged()
				}
			}})
		require.NoError(t, err)
		r.snMade++
		r.last = sn
		return sn
	}
	sn := newSN()
	r.sn = sn
	var backing vdpa.Device
	kind := "software"
	if o.vhostUser && o.reconnect {
		backing, r.restart = restartableVhostUser(t, sn, newSN)
		kind = "vhost-user"
	} else if o.vhostUser {
		backing, kind = vhostUserFrontend(t, sn), "vhost-user"
	} else {
		l := vdpa.NewLocal(sn, nil)
		t.Cleanup(func() { _ = l.Close() })
		backing = l
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	devOpts := mdev.Options{Backend: kind}
	if mask := o.mask; o.split || mask != 0 {
		if o.split {
			mask |= virtio.FRingPacked.Bit()
		}
		devOpts.Features = ^mask
	}
	r.srv, err = vfiouser.New(backing, &vfiouser.Options{Device: devOpts, Logger: log})
	require.NoError(t, err)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	require.NoError(t, err)
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { _ = r.srv.Serve(sctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done; _ = r.srv.Close() })
	return r
}

// checkCounts compares the guest's interface counters with softnet's
// (minus base, the device's counts when the guest's counters started).
func checkCounts(t *testing.T, v *vm, r *qemuRig, which string, base [2]uint64) {
	t.Helper()
	var ping, stats []string
	for _, m := range v.markers("PING") {
		if len(m) > 0 && m[0] == which {
			ping = m
		}
	}
	for _, m := range v.markers("STATS") {
		if len(m) > 0 && m[0] == which {
			stats = m
		}
	}
	require.NotNil(t, ping, "PING %s marker", which)
	require.NotNil(t, stats, "STATS %s marker", which)
	p, s := kvs(ping), kvs(stats)
	assert.Equal(t, uint64(6*qPings), p["transmitted"], "pings sent")
	assert.Equal(t, p["transmitted"], p["received"], "every echo answered")
	tx, rx := softnetCounts(r.sn)
	tx, rx = tx-base[0], rx-base[1]
	t.Logf("%s: guest tx_packets=%d rx_packets=%d, device took %d and delivered %d frames; pings %d/%d",
		which, s["tx_packets"], s["rx_packets"], tx, rx, p["received"], p["transmitted"])
	assert.Equal(t, s["tx_packets"], tx, "guest tx = frames the device took")
	assert.Equal(t, s["rx_packets"], rx, "guest rx = frames the device delivered")
	assert.Zero(t, s["rx_errors"]+s["tx_errors"]+s["rx_dropped"]+s["tx_dropped"])
}

// TestQEMUMSIXConfigSpaceAndLink runs on split rings (the device does not
// offer RING_PACKED) and on packed rings (it does, and the guest's
// virtio_pci negotiates it: virtio 1.2 §2.8 on the guest's own driver).
func TestQEMUMSIXConfigSpaceAndLink(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	for _, tc := range []struct {
		name string
		o    backingOpts
	}{
		{"split", backingOpts{split: true}},
		{"packed", backingOpts{}},
		// The guest driver's "big packets" receive chains (offloads
		// without MRG_RXBUF), and packed rings with the offloads.
		{"split-offloads-big-packets", backingOpts{split: true, offload: true, mask: virtio.NetFMrgRxbuf.Bit()}},
		{"packed-offloads", backingOpts{offload: true}},
	} {
		t.Run(tc.name, func(t *testing.T) { qemuMSIXConfigSpaceAndLink(t, qemu, helper, tc.o) })
	}
}

func qemuMSIXConfigSpaceAndLink(t *testing.T, qemu, helper string, o backingOpts) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "vfu.sock")
	split := o.split
	r := startServerBacking(t, ctx, sock, 1, o)
	v := bootQEMU(t, ctx, qemu, helper, sock, "link", false)

	iface, err := v.wait(ctx, "IFACE", 1)
	require.NoError(t, err)
	// What QEMU maps, against the defaults of Options.MaxDMAWindows and
	// DMABudget.
	t.Logf("QEMU's DMA windows: %d (max_dma_maps %d), %d MiB mapped (budget %d MiB)",
		r.srv.DMAWindows(), vfiouser.DefaultMaxDMAWindows, r.srv.DMAReserved()>>20, vfiouser.DefaultDMABudget()>>20)
	f := kvs(iface)
	assert.Contains(t, iface, "driver=virtio_net")
	// The guest's negotiated features (sysfs: one character per bit) and
	// the device's agree on the ring format.
	var guestFeatures string
	for _, kv := range iface {
		if v, ok := strings.CutPrefix(kv, "features="); ok {
			guestFeatures = v
		}
	}
	require.Greater(t, len(guestFeatures), int(virtio.FRingPacked), "features %q", guestFeatures)
	assert.Equal(t, !split, guestFeatures[virtio.FRingPacked] == '1', "guest RING_PACKED: features %s", guestFeatures)
	assert.Equal(t, !split, r.srv.Device().DriverFeatures().Has(virtio.FRingPacked))
	for _, c := range []struct {
		f    virtio.Feature
		want bool
	}{
		{virtio.NetFCsum, o.offload}, {virtio.NetFGuestTSO4, o.offload},
		{virtio.NetFMrgRxbuf, !o.mask.Has(virtio.NetFMrgRxbuf)},
	} {
		assert.Equal(t, c.want, guestFeatures[c.f] == '1', "guest %v: features %s", c.f, guestFeatures)
		assert.Equal(t, c.want, r.srv.Device().DriverFeatures().Has(c.f), "device %v", c.f)
	}
	assert.Equal(t, uint64(qMTU), f["mtu"], "the configured MTU")

	// The configuration space as the guest reads it from sysfs.
	cfgm, err := v.wait(ctx, "CONFIG", 1)
	require.NoError(t, err)
	cfg, err := hex.DecodeString(strings.Join(cfgm, ""))
	require.NoError(t, err)
	require.Len(t, cfg, 256)
	caps, msix, err := vfiousertest.ParseCaps(cfg)
	require.NoError(t, err)
	l := r.srv.Device().Layout()
	require.Len(t, caps, len(l.Capabilities))
	for i, c := range l.Capabilities {
		assert.Equal(t, c.ConfigOffset, caps[i].Offset)
		assert.Equal(t, c.CfgType, caps[i].CfgType)
		assert.Equal(t, c.Bar, caps[i].Bar)
		assert.Equal(t, c.Offset, caps[i].BarOffset)
		assert.Equal(t, c.Length, caps[i].Length)
		assert.Equal(t, c.NotifyOffMultiplier, caps[i].NotifyOffMultiplier)
	}
	require.NotZero(t, msix, "MSI-X capability")
	ctrl := uint16(cfg[msix+2]) | uint16(cfg[msix+3])<<8
	assert.Equal(t, l.MSIXVectors-1, int(ctrl&0x7ff), "MSI-X table size")
	assert.NotZero(t, ctrl&0x8000, "MSI-X enabled by the guest")
	// QEMU writes the guest's MSI-X enable through to the device's own
	// configuration space (the device routes interrupts by it, §4.1.5).
	own, err := r.srv.Device().Read(mdev.RegionPCIConfig, uint64(msix+3), 1)
	require.NoError(t, err)
	assert.NotZero(t, own&0x80, "MSI-X Enable in the device's configuration space")
	table := uint32(cfg[msix+4]) | uint32(cfg[msix+5])<<8 | uint32(cfg[msix+6])<<16 | uint32(cfg[msix+7])<<24
	pba := uint32(cfg[msix+8]) | uint32(cfg[msix+9])<<8 | uint32(cfg[msix+10])<<16 | uint32(cfg[msix+11])<<24
	assert.Equal(t, l.MSIXTable|mdev.MSIXBAR, table)
	assert.Equal(t, l.MSIXPBA|mdev.MSIXBAR, pba)
	irq, err := v.wait(ctx, "IRQ", 1)
	require.NoError(t, err)
	// Linux asks for a vector per queue with a callback (not the control
	// queue) plus one for configuration changes.
	assert.Equal(t, uint64(1+2*1), kvs(irq)["msix"], "MSI-X vectors in use")

	_, err = v.wait(ctx, "STATS", 1)
	require.NoError(t, err)
	checkCounts(t, v, r, "first", [2]uint64{})

	// Link down and up reach the guest as configuration interrupts.
	_, err = v.wait(ctx, "WAIT-LINK", 1)
	require.NoError(t, err)
	r.sn.SetLinkUp(false)
	down, err := v.wait(ctx, "CARRIER-DOWN", 1)
	require.NoError(t, err)
	assert.Equal(t, []string{"0"}, down)
	r.sn.SetLinkUp(true)
	up, err := v.wait(ctx, "CARRIER-UP", 1)
	require.NoError(t, err)
	assert.Equal(t, []string{"1"}, up)
	_, err = v.wait(ctx, "DONE", 1)
	require.NoError(t, err)
	checkCounts(t, v, r, "again", [2]uint64{})
}

// rebindCounts checks both traffic rounds of the rebind mode: the guest's
// counters restart with the re-probed interface.
func rebindCounts(t *testing.T, ctx context.Context, v *vm, r *qemuRig) {
	t.Helper()
	_, err := v.wait(ctx, "UNBOUND", 1)
	require.NoError(t, err)
	tx, rx := softnetCounts(r.sn)
	checkCounts(t, v, r, "first", [2]uint64{})
	_, err = v.wait(ctx, "DONE", 1)
	require.NoError(t, err)
	checkCounts(t, v, r, "again", [2]uint64{tx, rx})
}

func TestQEMUINTxRebind(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "vfu.sock")
	r := startServer(t, ctx, sock, 1)
	v := bootQEMU(t, ctx, qemu, helper, sock, "rebind", true)
	irq, err := v.wait(ctx, "IRQ", 1)
	require.NoError(t, err)
	assert.Zero(t, kvs(irq)["msix"], "pci=nomsi: the line interrupt")
	rebindCounts(t, ctx, v, r)
	assert.NotZero(t, r.srv.Stats().IntxTriggers)
	assert.True(t, r.srv.Device().DriverFeatures().Has(virtio.FRingPacked), "the guest runs packed rings")
}

func TestQEMUMultiQueueRebind(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "vfu.sock")
	r := startServer(t, ctx, sock, 2)
	v := bootQEMU(t, ctx, qemu, helper, sock, "rebind", false)
	rebindCounts(t, ctx, v, r)
	// One vCPU: virtio_net sets up both pairs (5 vectors) but enables
	// one, through the control queue, which therefore works over vfio-user.
	assert.Equal(t, 1, r.sn.ActivePairs(), "MQ_VQ_PAIRS_SET from the guest")
	assert.NotZero(t, r.sn.Stats().CtrlOK, "control commands acknowledged")
	irq, err := v.wait(ctx, "IRQ", 1)
	require.NoError(t, err)
	assert.Equal(t, uint64(1+2*2), kvs(irq)["msix"], "MSI-X vectors in use")
}

// TestQEMUSystemReset resets the machine (QMP system_reset, a guest reboot
// as a VMM drives it) after the guest's driver has run traffic on the
// mediated device: QEMU resets the device over vfio-user, the firmware and
// the guest kernel enumerate it again, and the rebooted guest's virtio_pci
// and virtio_net set it up from scratch, with MSI-X, on split and on packed
// rings, and with the data path in a vhost-user back-end. The rebooted guest's traffic must be counted exactly as the first
// boot's, the session must survive the reset without an error reply, and
// the reset must leave the server no more DMA windows than before it.
func TestQEMUSystemReset(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	t.Run("split", func(t *testing.T) { qemuSystemReset(t, qemu, helper, backingOpts{split: true}) })
	t.Run("packed", func(t *testing.T) { qemuSystemReset(t, qemu, helper, backingOpts{}) })
	// The device's data path in a vhost-user back-end (packed rings): the
	// reset stops its rings through the front-end, the reboot starts them
	// again.
	t.Run("vhost-user-backing", func(t *testing.T) { qemuSystemReset(t, qemu, helper, backingOpts{vhostUser: true}) })
}

func qemuSystemReset(t *testing.T, qemu, helper string, o backingOpts) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	sock, qmpPath := filepath.Join(dir, "vfu.sock"), filepath.Join(dir, "qmp.sock")
	split := o.split
	r := startServerBacking(t, ctx, sock, 1, o)
	v := bootQEMUWith(t, ctx, qemu, helper, sock, "reset", bootOpts{qmp: qmpPath, reboot: true})
	_, err := v.wait(ctx, "DONE", 1)
	require.NoError(t, err)
	checkCounts(t, v, r, "first", [2]uint64{})
	assert.Equal(t, !split, r.srv.Device().DriverFeatures().Has(virtio.FRingPacked), "first boot's ring format")
	windows, reserved := r.srv.DMAWindows(), r.srv.DMAReserved()
	before := r.srv.Stats()

	q, err := qmp.Dial(ctx, qmpPath)
	require.NoError(t, err)
	defer q.Close()
	tx, rx := softnetCounts(r.sn)
	// The device must be reset between the two boots: its status, watched
	// until the rebooted guest has found the device, drops DRIVER_OK.
	watch, stopWatch := context.WithCancel(ctx)
	reset := make(chan bool, 1)
	go func() {
		seen := false
		for watch.Err() == nil {
			seen = seen || r.srv.Device().Status()&virtio.StatusDriverOK == 0
			time.Sleep(time.Millisecond)
		}
		reset <- seen
	}()
	_, err = q.Do("system_reset", nil)
	require.NoError(t, err)
	iface, err := v.wait(ctx, "IFACE", 2)
	stopWatch()
	require.NoError(t, err, "the rebooted guest found the device again")
	assert.True(t, <-reset, "the device's status never dropped DRIVER_OK across the reset")
	assert.Contains(t, iface, "driver=virtio_net")
	irq, err := v.wait(ctx, "IRQ", 2)
	require.NoError(t, err)
	assert.Equal(t, uint64(1+2*1), kvs(irq)["msix"], "MSI-X vectors in use after the reboot")
	_, err = v.wait(ctx, "DONE", 2)
	require.NoError(t, err)
	// checkCounts reads the last "first" round: the rebooted guest's,
	// whose counters started at zero with its kernel.
	checkCounts(t, v, r, "first", [2]uint64{tx, rx})
	assert.Equal(t, !split, r.srv.Device().DriverFeatures().Has(virtio.FRingPacked), "rebooted guest's ring format")
	assert.NotZero(t, r.srv.Device().Status()&virtio.StatusDriverOK, "the rebooted guest's driver runs the device")
	after := r.srv.Stats()
	assert.Equal(t, before.Sessions, after.Sessions, "QEMU kept its session across the reset")
	assert.Equal(t, before.Errors, after.Errors, "error replies during the reset and reboot")
	assert.Equal(t, windows, r.srv.DMAWindows(), "DMA windows after the reboot")
	assert.Equal(t, reserved, r.srv.DMAReserved(), "DMA bytes reserved after the reboot")
	assert.Zero(t, r.srv.RetiredWindows(), "windows held for a data path that was reset")
	// Two boots: a guest that panicked after the reset would have
	// rebooted again (QEMU runs without -no-reboot here).
	assert.Len(t, v.markers("IFACE"), 2, "the guest booted twice")
	t.Logf("RESULT system_reset (%s): %d messages across the reset and reboot, %d DMA windows before and after",
		t.Name(), after.Messages-before.Messages, windows)
}

// TestQEMUVhostUserBacking: the data path of the guest's NIC runs in a
// vhost-user back-end; the server hands it the guest memory QEMU mapped and
// the MSI-X eventfds QEMU registered.
// TestQEMUVhostUserBackendRestart: the device's data path is a vhost-user
// back-end, and its process restarts while the guest pings through it. The
// server's Frontend (ReconnectOptions) hands the session to the new
// back-end, so the guest's virtio-net never sees its device fail: no
// DEVICE_NEEDS_RESET, and its pings are answered again. Pings sent while
// no back-end ran may be lost; on packed rings (the guest's choice) the
// rings resume where the old back-end's used descriptors say it stopped.
func TestQEMUVhostUserBackendRestart(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "vfu.sock")
	r := startServerBacking(t, ctx, sock, 1, backingOpts{vhostUser: true, reconnect: true})
	v := bootQEMU(t, ctx, qemu, helper, sock, "restart", false)
	first, err := v.wait(ctx, "PING", 1)
	require.NoError(t, err)
	pf := kvs(first[1:])
	assert.Positive(t, pf["transmitted"])
	assert.Equal(t, pf["transmitted"], pf["received"], "pings before the restart: %v", first)
	_, err = v.wait(ctx, "WAIT-RESTART", 1)
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond) // the second round of pings under way
	start := time.Now()
	r.restart()
	_, err = v.wait(ctx, "DONE", 1)
	require.NoError(t, err)
	var ping []string
	for _, m := range v.markers("PING") {
		if len(m) > 0 && m[0] == "again" {
			ping = m
		}
	}
	require.NotNil(t, ping, "no PING again marker")
	p := kvs(ping[1:])
	t.Logf("pings through the restart: %v (restart at %v)", ping, start.Format("15:04:05.000"))
	assert.Positive(t, p["transmitted"])
	// A restart takes well under a second: at 20 pings a second, at most
	// a handful of the 6*PING_COUNT are sent while no back-end runs.
	assert.GreaterOrEqual(t, p["received"]+10, p["transmitted"], "pings answered through the restart")
	assert.Equal(t, 2, r.snMade, "a second back-end served")
	assert.Positive(t, r.sn2Frames(), "the second back-end's device carried the guest's frames")
	dev := r.srv.Device()
	assert.NoError(t, dev.Err())
	assert.Zero(t, dev.Status()&virtio.StatusDeviceNeedsReset, "device status %v", dev.Status())
	assert.True(t, dev.DriverFeatures().Has(virtio.FRingPacked), "the guest runs packed rings")
}

func TestQEMUVhostUserBacking(t *testing.T) {
	qemu, helper := requireQEMU11(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "vfu.sock")
	r := startServerBacking(t, ctx, sock, 1, backingOpts{vhostUser: true})
	v := bootQEMU(t, ctx, qemu, helper, sock, "rebind", false)
	rebindCounts(t, ctx, v, r)
	// The device offered RING_PACKED (the vhost-user back-end does): the
	// guest runs packed rings over the vhost-user backing.
	assert.True(t, r.srv.Device().DriverFeatures().Has(virtio.FRingPacked))
}
