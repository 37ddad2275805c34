package vhostuser

// TestQEMUHostTap: a Linux guest under QEMU 11 (MSI-X) reaches a host
// network namespace through vdpakit: QEMU's -netdev vhost-user to the
// examples/vhost-user-net back-end (softnet with the offloads, vdpa/hostnet
// tap in a namespace the test creates), with and without the offloads, and,
// as the baseline in the same run, the same guest on QEMU's own
// -netdev tap,vhost=off. Per variant: ICMP, a bulk upload and download
// checked by SHA-256 (the host side is a Go listener in the namespace),
// upload throughput and frames/s, and for vdpakit the back-end's CPU time
// per gigabit. Gated like the other QEMU interop tests (qemuGate).

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/virtio"
)

const (
	hostTapPeer  = "10.77.0.1"
	hostTapGuest = "10.77.0.2/24"
	hostTapMB    = 16
)

// hostTapVariant is one way of attaching the guest's NIC to the namespace.
type hostTapVariant struct {
	name    string
	vdpakit bool // examples/vhost-user-net -tap; otherwise QEMU's tap netdev
	offload bool // vdpakit: -offload
}

// hostTapResult is what one variant measured.
type hostTapResult struct {
	variant     hostTapVariant
	upGbps      float64
	downGbps    float64
	framesPerS  float64 // guest tx_packets during the upload (GSO packets count once)
	cpuPerGbit  float64 // vdpakit: back-end CPU seconds per gigabit uploaded
	usrPerGbit  float64 // of which user time (the rest is the kernel, tap writes included)
	features    virtio.Features
	backendStat string
}

func TestQEMUHostTap(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		if !q.msix {
			t.Skip("runs on QEMU 11 (MSI-X); QEMU 7.2's vhost-user NIC needs INTx under TCG")
		}
		dir := t.TempDir()
		bin := filepath.Join(dir, "vhost-user-net")
		out, err := exec.Command("go", "build", "-o", bin, "../../examples/vhost-user-net").CombinedOutput()
		require.NoError(t, err, "go build examples/vhost-user-net: %s", out)
		var results []hostTapResult
		for _, v := range []hostTapVariant{
			{name: "vdpakit tap, offloads", vdpakit: true, offload: true},
			{name: "vdpakit tap, no offloads", vdpakit: true},
			{name: "QEMU tap netdev (vhost=off)"},
		} {
			t.Run(strings.NewReplacer(" ", "_", ",", "", "(", "", ")", "", "=", "-").Replace(v.name), func(t *testing.T) {
				results = append(results, runHostTap(t, q, helper, bin, v))
			})
		}
		for _, r := range results {
			cpu := "n/a (QEMU's tap runs in the emulator's threads)"
			if r.variant.vdpakit {
				cpu = fmt.Sprintf("%.2f s/Gbit (user %.2f)", r.cpuPerGbit, r.usrPerGbit)
			}
			t.Logf("FIGURES %-28s upload %.3f Gbit/s (%.0f frames/s), download %.3f Gbit/s, back-end CPU %s; USO negotiated: %v",
				r.variant.name, r.upGbps, r.framesPerS, r.downGbps, cpu, r.features.Has(virtio.NetFHostUSO))
		}
	})
}

func runHostTap(t *testing.T, q qemuPeer, helper, bin string, v hostTapVariant) hostTapResult {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res := hostTapResult{variant: v}
	dir := t.TempDir()
	ns := "vdpakit-qtap-" + randHex(4)
	ipRun(t, "netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	ipRun(t, "-n", ns, "link", "set", "lo", "up")
	for _, k := range []string{"all", "default"} {
		ipRun(t, "netns", "exec", ns, "sh", "-c", "echo 1 >/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6 || true")
	}
	nsPath := "/var/run/netns/" + ns

	// The host side: listeners in the namespace.
	var up, down net.Listener
	inNS(t, nsPath, func() {
		var err error
		// Any address of the namespace: the interface is not there yet.
		up, err = net.Listen("tcp4", ":0")
		require.NoError(t, err)
		down, err = net.Listen("tcp4", ":0")
		require.NoError(t, err)
	})
	defer up.Close()
	defer down.Close()
	type upload struct {
		sum    string
		dur    time.Duration
		start  time.Time
		cpu0   [2]time.Duration
		cpu1   [2]time.Duration
		err    error
		nbytes int64
	}
	var backendPid atomic.Int64 // set once the back-end starts, read by the upload goroutine
	upc := make(chan upload, 1)
	go func() {
		c, err := up.Accept()
		if err != nil {
			upc <- upload{err: err}
			return
		}
		defer c.Close()
		h := sha256.New()
		buf := make([]byte, 1<<16)
		var u upload
		n, err := io.ReadFull(c, buf[:1])
		u.start = time.Now()
		if pid := int(backendPid.Load()); pid != 0 {
			u.cpu0 = procCPU(pid)
		}
		if err == nil {
			h.Write(buf[:n])
			var m int64
			m, err = io.CopyBuffer(h, io.LimitReader(c, hostTapMB<<20-1), buf)
			u.nbytes = m + 1
		}
		u.dur = time.Since(u.start)
		if pid := int(backendPid.Load()); pid != 0 {
			u.cpu1 = procCPU(pid)
		}
		u.sum, u.err = hex.EncodeToString(h.Sum(nil)), err
		upc <- u
	}()
	downData := make([]byte, hostTapMB<<20)
	_, _ = rand.Read(downData)
	downSum := sha256.Sum256(downData)
	downDur := make(chan time.Duration, 1)
	go func() {
		c, err := down.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		start := time.Now()
		if _, err := c.Write(downData); err == nil {
			// The guest's nc exits when it has read everything and sees
			// the close; the write returned when the kernel took the data.
			_ = c.(*net.TCPConn).CloseWrite()
			_, _ = io.Copy(io.Discard, c)
			downDur <- time.Since(start)
		}
	}()

	g := buildHostTapGuest(t, ctx, helper, dir, up.Addr().(*net.TCPAddr).Port, down.Addr().(*net.TCPAddr).Port)
	var be *exec.Cmd
	beOut := &lockedBuffer{}
	sock := filepath.Join(dir, "vu.sock")
	var netdev []string
	var wrap []string
	if v.vdpakit {
		be = exec.Command(bin, "-socket", sock, "-tap", "vq0", "-netns", nsPath, "-mac", qemuGuestMAC,
			"-interval", "0", "-offload="+strconv.FormatBool(v.offload))
		be.Stdout, be.Stderr = beOut, beOut
		be.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		require.NoError(t, be.Start())
		backendPid.Store(int64(be.Process.Pid))
		beDone := make(chan struct{})
		go func() { _ = be.Wait(); close(beDone) }()
		t.Cleanup(func() {
			_ = be.Process.Signal(os.Interrupt)
			select {
			case <-beDone:
			case <-time.After(10 * time.Second):
				_ = syscall.Kill(-be.Process.Pid, syscall.SIGKILL)
				<-beDone
			}
			if t.Failed() {
				t.Logf("back-end output:\n%s", beOut.String())
			}
		})
		require.Eventually(t, func() bool {
			_, err := os.Stat(sock)
			return err == nil && exec.Command("ip", "-n", ns, "link", "show", "vq0").Run() == nil
		}, 20*time.Second, 20*time.Millisecond, "back-end socket and tap: %s", beOut)
		ipRun(t, "-n", ns, "addr", "add", hostTapPeer+"/24", "dev", "vq0")
		ipRun(t, "-n", ns, "link", "set", "vq0", "up")
		netdev = []string{"-chardev", "socket,id=chr0,path=" + sock, "-netdev", "type=vhost-user,id=net0,chardev=chr0"}
	} else {
		ipRun(t, "-n", ns, "tuntap", "add", "dev", "qt0", "mode", "tap")
		ipRun(t, "-n", ns, "addr", "add", hostTapPeer+"/24", "dev", "qt0")
		ipRun(t, "-n", ns, "link", "set", "qt0", "up")
		netdev = []string{"-netdev", "tap,id=net0,ifname=qt0,script=no,downscript=no,vhost=off"}
		wrap = []string{"ip", "netns", "exec", ns}
	}
	vm := startHostTapQEMU(t, q, g, netdev, wrap, 240*time.Second)
	require.NoError(t, vm.wait(ctx), "QEMU (exit status 124: timed out)")
	console := vm.out.String()
	iface, ok := findMarker(console, g.nonce, "IFACE")
	require.True(t, ok, "no interface with MAC %s in the guest", qemuGuestMAC)
	require.Len(t, iface, 4)
	res.features = guestFeatures(t, strings.TrimPrefix(iface[3], "features="))
	pingF, _ := findMarker(console, g.nonce, "PING")
	assert.Equal(t, map[string]uint64{"rc": 0, "transmitted": qemuPings, "received": qemuPings}, kv(t, pingF), "ICMP echo")
	upSum, ok := findMarker(console, g.nonce, "UPSUM")
	require.True(t, ok, "no UPSUM marker")
	var u upload
	select {
	case u = <-upc:
	case <-ctx.Done():
		t.Fatal("no upload")
	}
	require.NoError(t, u.err)
	assert.Equal(t, int64(hostTapMB<<20), u.nbytes)
	assert.Equal(t, upSum, []string{u.sum}, "SHA-256 of the upload: guest's file vs what the namespace received")
	downF, _ := findMarker(console, g.nonce, "DOWNSUM")
	assert.Equal(t, []string{hex.EncodeToString(downSum[:])}, downF, "SHA-256 of the download")
	exitF, _ := findMarker(console, g.nonce, "EXIT")
	assert.Equal(t, []string{"0"}, exitF, "guest script exit status")
	before, _ := findMarker(console, g.nonce, "BEFORE")
	after, _ := findMarker(console, g.nonce, "AFTER")
	b, a := kv(t, before), kv(t, after)
	res.upGbps = float64(u.nbytes) * 8 / u.dur.Seconds() / 1e9
	res.framesPerS = float64(a["tx_packets"]-b["tx_packets"]) / u.dur.Seconds()
	select {
	case d := <-downDur:
		res.downGbps = float64(len(downData)) * 8 / d.Seconds() / 1e9
	default:
	}
	statsF, _ := findMarker(console, g.nonce, "STATS")
	gs := kv(t, statsF)
	for _, k := range []string{"rx_dropped", "tx_dropped", "rx_errors", "tx_errors"} {
		assert.Zero(t, gs[k], "guest %s", k)
	}

	offl := []virtio.Feature{virtio.NetFCsum, virtio.NetFHostTSO4, virtio.NetFHostTSO6, virtio.NetFGuestCsum,
		virtio.NetFGuestTSO4, virtio.NetFGuestTSO6}
	switch {
	case v.vdpakit && v.offload:
		for _, f := range offl {
			assert.True(t, res.features.Has(f), "the guest driver negotiated %s", f.Name(virtio.DeviceNet))
		}
		// How many packets a 16 MiB upload with TSO takes depends on the
		// machine, not on the back-end: TCP sizes its TSO segments by its
		// pacing rate (tcp_tso_autosize), so a loaded host gets small ones.
		// CI counted 3927 packets in a run alone, 7136 beside other tests,
		// and 11622 (1179 of them GSO) under heavy load, where the run
		// without offloads counts about 15600. A bound on the count is
		// therefore not a check of the offload; the back-end's TxGSO and
		// RxGSO counts below are: a frame reaches them only with a GSO
		// header the tap accepted whole.
		t.Logf("guest tx_packets for the %d MiB upload: %d (%d at one MSS of 1448)",
			hostTapMB, a["tx_packets"]-b["tx_packets"], hostTapMB<<20/1448)
	case v.vdpakit:
		for _, f := range offl {
			assert.False(t, res.features.Has(f), "%s offered with -offload=false", f.Name(virtio.DeviceNet))
		}
	}
	if v.vdpakit {
		gbit := float64(u.nbytes) * 8 / 1e9
		res.usrPerGbit = (u.cpu1[0] - u.cpu0[0]).Seconds() / gbit
		res.cpuPerGbit = res.usrPerGbit + (u.cpu1[1]-u.cpu0[1]).Seconds()/gbit
		require.NoError(t, be.Process.Signal(os.Interrupt))
		require.Eventually(t, func() bool { return strings.Contains(beOut.String(), "host back-end:") }, 10*time.Second, 20*time.Millisecond)
		m := regexp.MustCompile(`host back-end: \{([^}]*)\}`).FindStringSubmatch(beOut.String())
		require.NotNil(t, m, "%s", beOut)
		res.backendStat = m[1]
		st := map[string]uint64{}
		for _, f := range strings.Fields(m[1]) {
			k, val, _ := strings.Cut(f, ":")
			st[k], _ = strconv.ParseUint(val, 10, 64)
		}
		t.Logf("back-end: %s", m[1])
		if v.offload {
			assert.NotZero(t, st["TxGSO"], "GSO frames went to the tap whole")
			assert.NotZero(t, st["RxGSO"], "the tap handed GSO frames to a guest with GUEST_TSO")
		} else {
			assert.Zero(t, st["TxGSO"]+st["RxGSO"], "no GSO frame without the offloads")
		}
		assert.Zero(t, st["TxErrors"], "the tap accepted every frame")
		// The device's drops by reason, from the example's summary. Some
		// are the network's doing and are logged: a frame from the tap
		// that finds the guest's receive ring full (rx_no_buffer: under
		// load the guest's TCP window can outgrow its 256 buffers, and the
		// SHA-256 above shows TCP resent it), one before the guest's
		// driver is up (rx_not_ready, link_down), one for an address the
		// guest did not ask for (filtered: the host's multicast). The
		// others mean a malformed frame or header on either side.
		require.Contains(t, beOut.String(), "  total: tx ", "the example's summary")
		if m := regexp.MustCompile(`dropped by reason: (.*)`).FindStringSubmatch(beOut.String()); m != nil {
			for _, r := range strings.Split(m[1], ", ") {
				reason, _, _ := strings.Cut(r, " ")
				switch reason {
				case "rx_no_buffer", "rx_not_ready", "link_down", "filtered":
					t.Logf("device drops: %s", r)
				default:
					assert.Fail(t, "device drop", "%s", r)
				}
			}
		}
	}
	t.Logf("%s: guest features %s; upload %.3f Gbit/s %.0f frames/s; download %.3f Gbit/s; CPU %.2f s/Gbit (user %.2f)",
		v.name, res.features.Format(virtio.DeviceNet), res.upGbps, res.framesPerS, res.downGbps, res.cpuPerGbit, res.usrPerGbit)
	return res
}

// procCPU returns the user and the system CPU time of process pid so far.
// The system time includes what the kernel does in the process's tap
// writes: the host stack receives a written frame in the writer's context.
func procCPU(pid int) [2]time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return [2]time.Duration{}
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return [2]time.Duration{}
	}
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return [2]time.Duration{time.Duration(ut) * time.Second / 100, time.Duration(st) * time.Second / 100} // USER_HZ
}

// inNS runs fn on a thread inside the network namespace at path; the thread
// is discarded afterwards.
func inNS(t *testing.T, path string, fn func()) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	done := make(chan error, 1)
	go func() {
		// fn may end this goroutine (a failed require calls
		// runtime.Goexit): the deferred send still reports it.
		err := errors.New("the function run in the namespace did not return")
		defer func() { done <- err }()
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			return
		}
		fn()
		err = nil
	}()
	require.NoError(t, <-done)
}

func buildHostTapGuest(t *testing.T, ctx context.Context, helper, dir string, upPort, downPort int) guestImage {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("testdata", "qemu", "hostnet.sh"))
	require.NoError(t, err)
	g := guestImage{initrd: filepath.Join(dir, "initrd.gz"), nonce: randHex(8)}
	out, err := exec.CommandContext(ctx, helper, "paths").Output()
	require.NoError(t, err, "vmtest/qemu-guest.sh paths: %s", exitStderr(err))
	for _, line := range strings.Split(string(out), "\n") {
		if k, ok := strings.CutPrefix(line, "KERNEL="); ok {
			g.kernel = k
		}
	}
	require.NotEmpty(t, g.kernel)
	b, err := exec.CommandContext(ctx, helper, "initramfs", "-o", g.initrd, "-script", script,
		"-env", "GUEST_NONCE="+g.nonce, "-env", "GUEST_MAC="+qemuGuestMAC, "-env", "GUEST_ADDR="+hostTapGuest,
		"-env", "PEER_IP="+hostTapPeer, "-env", "PING_COUNT="+strconv.Itoa(qemuPings),
		"-env", "BULK_MB="+strconv.Itoa(hostTapMB), "-env", "UP_PORT="+strconv.Itoa(upPort),
		"-env", "DOWN_PORT="+strconv.Itoa(downPort)).CombinedOutput()
	require.NoError(t, err, "vmtest/qemu-guest.sh initramfs: %s", b)
	return g
}

// startHostTapQEMU boots g with the given -netdev arguments (the device is
// virtio-net-pci with MSI-X on netdev net0), under wrap (e.g. ip netns exec).
func startHostTapQEMU(t *testing.T, q qemuPeer, g guestImage, netdev, wrap []string, timeout time.Duration) *qemuVM {
	t.Helper()
	args := append(append([]string{}, wrap...), "timeout", "-k", "5", strconv.Itoa(int(timeout/time.Second)), q.bin,
		"-accel", "tcg", "-cpu", "max", "-M", "q35,memory-backend=mem", "-smp", "1", "-m", "512M",
		"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
		"-kernel", g.kernel, "-initrd", g.initrd,
		"-append", "console=ttyS0 panic=-1 oops=panic ipv6.disable=1 loglevel=4",
		"-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none")
	args = append(args, netdev...)
	args = append(args, "-device", "virtio-net-pci,netdev=net0,mac="+qemuGuestMAC+",romfile=")
	cmd := exec.Command(args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	vm := &qemuVM{name: "qemu", cmd: cmd, out: out, stdin: stdin, done: make(chan struct{})}
	go func() { vm.err = cmd.Wait(); close(vm.done) }()
	t.Cleanup(func() {
		vm.kill()
		if t.Failed() {
			t.Logf("console:\n%s", out.String())
		}
	})
	return vm
}
