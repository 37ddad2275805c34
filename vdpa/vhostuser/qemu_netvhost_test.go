package vhostuser

// The baseline of the QEMU interop tests: the same guest, QEMU versions and
// scripts (ping, stop/cont, migration A→B→A) with DPDK's net_vhost as the
// vhost-user back-end instead of our Backend. Each back-end is a
// dpdk-testpmd (io forwarding) between net_vhost (the socket QEMU connects
// to) and net_tap, whose tap interface lives in a network namespace the
// test creates, holding the guest's peer address 10.0.2.2/24 with the
// responder's MAC: the namespace's kernel answers the guest's ARP and ICMP.
// Two back-ends (migration) are two testpmds, each with its own namespace
// holding the same address and MAC, so the guest keeps talking to
// "10.0.2.2" after the switch. The counts are printed in the same RESULT
// lines as the vdpakit tests', with "net_vhost" in the name, the namespace
// kernels' ICMP counters standing in for the responders'.
//
// Gate: VDPAKIT_QEMU=1 as for every QEMU test; then it needs dpdk-testpmd,
// ip(8) and network namespaces with tap devices, and skips saying which is
// missing, unless VDPAKIT_DPDK=1 is set too (then it fails).

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
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
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/qmp"
)

// netVhost is one DPDK net_vhost back-end: testpmd in its own network
// namespace.
type netVhost struct {
	name string
	ns   string // network namespace
	pmd  *testpmd
	mu   sync.Mutex
	last map[string]uint64 // the namespace's last /proc/net/snmp read
}

// netVhostGate returns dpdk-testpmd's path, or skips (fails with
// VDPAKIT_DPDK=1) when it, ip(8), tap devices or network namespaces are
// unavailable. Call it after qemuGate.
func netVhostGate(t *testing.T) string {
	t.Helper()
	must := os.Getenv("VDPAKIT_DPDK") == "1"
	skip := func(format string, args ...any) {
		t.Helper()
		msg := "DPDK net_vhost baseline: " + fmt.Sprintf(format, args...)
		if must {
			t.Fatal(msg + " (VDPAKIT_QEMU=1 and VDPAKIT_DPDK=1: the baseline must run)")
		}
		t.Skip(msg + " (VDPAKIT_DPDK=1 makes this a failure)")
	}
	if os.Getenv("VDPAKIT_DPDK") == "0" {
		t.Skip("DPDK net_vhost baseline: VDPAKIT_DPDK=0")
	}
	bin, err := exec.LookPath("dpdk-testpmd")
	if err != nil {
		skip("dpdk-testpmd is not on PATH (Debian package dpdk)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		skip("ip(8) is not on PATH (Debian package iproute2)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		skip("no /dev/net/tun: %v", err)
	}
	ns := "vdpakit-probe-" + randHex(4)
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		skip("cannot create a network namespace (needs CAP_SYS_ADMIN): %v: %s", err, out)
	}
	defer func() { _ = exec.Command("ip", "netns", "del", ns).Run() }()
	if out, err := exec.Command("ip", "-n", ns, "tuntap", "add", "mode", "tap", "name", "probe0").CombinedOutput(); err != nil {
		skip("cannot create a tap device in a network namespace (needs CAP_NET_ADMIN): %v: %s", err, out)
	}
	return bin
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// ipRun runs ip(8) (or, with "netns exec", a command in a namespace).
func ipRun(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	require.NoError(t, err, "ip %s: %s", strings.Join(args, " "), out)
}

// startNetVhost starts a net_vhost back-end listening on dir/<name>.sock
// (QEMU is the client, as with our rig) in a fresh network namespace whose
// tap holds qemuPeerIP/24 with qemuPeerMAC. The rig it returns works with
// bootServe, migrate, echoes, waitEchoes, checkPingRound and noWarnings.
func startNetVhost(t *testing.T, ctx context.Context, bin, dir, name string) *qemuRig {
	t.Helper()
	nv := &netVhost{name: name, ns: "vdpakit-" + name + "-" + randHex(4)}
	ipRun(t, "netns", "add", nv.ns)
	// Registered first, so it runs after testpmd's cleanup (quit, or a
	// kill of its process group): the tap goes with testpmd's fd.
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", nv.ns).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", nv.ns, err, out)
		}
	})
	ipRun(t, "-n", nv.ns, "link", "set", "lo", "up")
	// No IPv6 chatter (router solicitations, DAD) towards the guest, whose
	// kernel runs with ipv6.disable=1.
	for _, k := range []string{"all", "default"} {
		ipRun(t, "netns", "exec", nv.ns, "sh", "-c", "echo 1 >/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6 || true")
	}
	sock := filepath.Join(dir, name+".sock")
	mac := fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", qemuPeerMAC[0], qemuPeerMAC[1], qemuPeerMAC[2], qemuPeerMAC[3], qemuPeerMAC[4], qemuPeerMAC[5])
	// Both lcores on CPU 0 (DPDK runs its control threads, which answer
	// vhost-user messages, on the other CPUs), and the forwarding lcore,
	// which busy-polls, at nice 19 (below): this machine's CPUs are shared
	// with the TCG guests (and others).
	nv.pmd = startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "nv-"+name),
		vdev:  "net_vhost0,iface=" + sock + ",client=0,queues=1",
		vdevs: []string{"net_tap0,iface=dtap0,mac=" + mac},
		fwd:   "io", extra: []string{"--no-flush-rx"},
		wrap: []string{"ip", "netns", "exec", nv.ns, "nice", "-n", "19"}})
	require.NoError(t, nv.pmd.waitOutput(ctx, "testpmd>", 1))
	ipRun(t, "-n", nv.ns, "addr", "add", qemuPeerIP+"/24", "dev", "dtap0")
	ipRun(t, "-n", nv.ns, "link", "set", "dtap0", "address", mac, "up")
	nv.pmd.command("start")
	require.NoError(t, nv.pmd.waitOutput(ctx, "forwards packets on", 1))
	require.NoError(t, waitFile(ctx, sock))
	niceWorkers(t, nv.pmd.cmd.Process.Pid)
	return &qemuRig{name: name, sock: sock, nv: nv}
}

// niceWorkers sets DPDK's worker lcore threads (rte-worker-N in DPDK 22.11,
// lcore-worker-N later: the busy-polling forwarding loop) of process pid to nice 19.
func niceWorkers(t *testing.T, pid int) {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	require.NoError(t, err)
	n := 0
	for _, e := range tasks {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/comm", pid, e.Name()))
		if name := string(comm); err != nil || (!strings.HasPrefix(name, "rte-worker") && !strings.HasPrefix(name, "lcore-worker")) {
			continue
		}
		tid, err := strconv.Atoi(e.Name())
		require.NoError(t, err)
		require.NoError(t, unix.Setpriority(unix.PRIO_PROCESS, tid, 19))
		n++
	}
	require.Positive(t, n, "no worker lcore thread (rte-worker-N) in testpmd %d", pid)
}

// snmp reads the namespace's IP and ICMP counters (as the guest script's
// SNMP marker names them: icmp_InEchos, icmp_OutEchoReps, ...) through
// testpmd's /proc entry; once testpmd is gone it returns the last read.
func (nv *netVhost) snmp() map[string]uint64 {
	nv.mu.Lock()
	defer nv.mu.Unlock()
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/snmp", nv.pmd.cmd.Process.Pid))
	if err != nil {
		return nv.last
	}
	defer f.Close()
	m := map[string]uint64{}
	var head []string
	sc := bufio.NewScanner(f)
	for i := 0; sc.Scan(); i++ {
		fs := strings.Fields(sc.Text())
		if i%2 == 0 {
			head = fs
			continue
		}
		if len(fs) == 0 || (fs[0] != "Ip:" && fs[0] != "Icmp:") || len(head) != len(fs) {
			continue
		}
		p := strings.ToLower(strings.TrimSuffix(fs[0], ":"))
		for j := 1; j < len(fs); j++ {
			if v, err := strconv.ParseUint(fs[j], 10, 64); err == nil {
				m[p+"_"+head[j]] = v
			}
		}
	}
	select {
	case <-nv.pmd.done: // the read may have raced with the exit
		if nv.last != nil {
			return nv.last
		}
	default:
	}
	nv.last = m
	return m
}

// exited says, as an error, whether testpmd has ended.
func (nv *netVhost) exited() error {
	select {
	case <-nv.pmd.done:
		return fmt.Errorf("net_vhost testpmd %s exited", nv.name)
	default:
		return nil
	}
}

// kill ends testpmd as a crash would (SIGKILL to its process group: only
// what this test started).
func (nv *netVhost) kill() {
	nv.snmp()
	select {
	case <-nv.pmd.done:
		return
	default:
	}
	_ = syscall.Kill(-nv.pmd.cmd.Process.Pid, syscall.SIGKILL)
	<-nv.pmd.done
}

// checkNetVhostRound prints a round's counts in checkPingRound's format
// and checks what must hold whatever net_vhost drops: nothing duplicated
// or corrupt, and every frame counted on the far side of a hop was sent on
// the near side (the guest kernel sent at least the echo requests the
// namespaces received, the namespaces answered each, and the guest kernel
// received at most the replies they sent). Frames net_vhost loses (while a
// ring is stopped, e.g. during a migration's switch-over) are counted and
// printed as "lost", not failed on: this is the baseline to compare with,
// not the device under test.
func checkNetVhostRound(t *testing.T, what string, p pingTotals, rigs ...*qemuRig) {
	t.Helper()
	checkPingRound(t, what, p, true, rigs...)
	var in, out uint64
	for _, r := range rigs {
		m := r.nv.snmp()
		in += m["icmp_InEchos"]
		out += m["icmp_OutEchoReps"]
	}
	kOut, kIn := p.snmp["icmp_OutEchos"], p.snmp["icmp_InEchoReps"]
	t.Logf("COUNTS %s: guest kernel sent %d echo requests, the namespaces received %d and replied %d, guest kernel received %d replies; lost towards the namespaces %d, lost towards the guest %d; guest pingers lost %d",
		what, kOut, in, out, kIn, int64(kOut)-int64(in), int64(out)-int64(kIn), p.lost)
	assert.LessOrEqual(t, in, kOut, "%s: the namespaces received more echo requests than the guest sent (duplicated)", what)
	assert.Equal(t, in, out, "%s: the namespaces' kernels answer every echo request", what)
	assert.LessOrEqual(t, kIn, out, "%s: the guest received more replies than the namespaces sent (duplicated)", what)
}

// TestQEMUNetVhostBaseline runs the QEMU tests' scripts against DPDK's
// net_vhost (see the file comment), per QEMU version: ping (the
// TestQEMUVirtioNetPing guest), stop/cont twice under the paced stream
// (TestQEMUStopCont), and live migration A→B→A... with a destination that
// resumes (TestQEMUMigration: 2 hops on QEMU 7.2, 3 on QEMU 11). Checked:
// that the rig works (every echo of the ping script answered, traffic
// before any event, each migration completes, traffic resumes after each
// cont, the namespaces' kernels answer every request they get and the
// counters show no duplicate); what net_vhost loses or breaks is counted
// and printed, not failed on (checkNetVhostRound): frames lost at a stop
// or switch-over, guest pages that differ after a hop, and a hop after
// which the guest's traffic did not resume.
func TestQEMUNetVhostBaseline(t *testing.T) {
	qemuGate(t) // the QEMU gate first (testenv.QEMUInterop)
	bin := netVhostGate(t)
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		t.Run("ping", func(t *testing.T) { testNetVhostPing(t, q, helper, bin) })
		t.Run("stopcont", func(t *testing.T) { testNetVhostStopCont(t, q, helper, bin) })
		t.Run("migration", func(t *testing.T) { testNetVhostMigration(t, q, helper, bin) })
	})
}

func testNetVhostPing(t *testing.T, q qemuPeer, helper, bin string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	start := time.Now()
	g := buildGuest(t, ctx, helper, dir, "ping")
	rig := startNetVhost(t, ctx, bin, dir, "a")
	vm := startQEMUPeer(t, q, qemuConfig{name: q.name, guest: g, sock: rig.sock, timeout: 150 * time.Second})
	require.NoError(t, vm.wait(ctx), "QEMU (exit status 124: timed out)")
	console := vm.out.String()
	iface, ok := findMarker(console, g.nonce, "IFACE")
	require.True(t, ok, "no interface with MAC %s in the guest", qemuGuestMAC)
	require.Len(t, iface, 4)
	assert.Equal(t, "driver=virtio_net", iface[2])
	carrier, _ := findMarker(console, g.nonce, "CARRIER")
	assert.Equal(t, []string{"1"}, carrier, "link up")
	pingF, ok := findMarker(console, g.nonce, "PING")
	require.True(t, ok, "no PING marker")
	ping := kv(t, pingF)
	assert.Equal(t, map[string]uint64{"rc": 0, "transmitted": qemuPings, "received": qemuPings}, ping, "busybox ping: every echo request answered")
	ns := rig.nv.snmp()
	assert.Equal(t, uint64(qemuPings), ns["icmp_InEchos"], "echo requests the namespace received")
	assert.Equal(t, uint64(qemuPings), ns["icmp_OutEchoReps"], "echo replies the namespace sent")
	assert.NoError(t, rig.nv.exited(), "testpmd")
	t.Logf("RESULT %s net_vhost ping: guest ping %v, namespace echo requests %d replies %d, run time %v",
		q.name, pingF, ns["icmp_InEchos"], ns["icmp_OutEchoReps"], time.Since(start).Round(time.Millisecond))
}

func testNetVhostStopCont(t *testing.T, q qemuPeer, helper, bin string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	dir := t.TempDir()
	g := buildGuestEnv(t, ctx, helper, dir, "serve")
	rig := startNetVhost(t, ctx, bin, dir, "a")
	qmpPath := filepath.Join(dir, "qmp.sock")
	vm := bootServe(t, ctx, q, g, rig, qemuConfig{name: q.name, qmp: qmpPath}, 1)
	qm, err := qmp.Dial(ctx, qmpPath)
	require.NoError(t, err)
	defer qm.Close()
	for round := 1; round <= 2; round++ {
		_, err = qm.Do("stop", nil)
		require.NoError(t, err)
		time.Sleep(300 * time.Millisecond)
		e1 := echoes(rig)
		time.Sleep(700 * time.Millisecond)
		e2 := echoes(rig)
		assert.Equal(t, e1, e2, "round %d: echo requests answered while the VM was stopped", round)
		st, err := qm.Status()
		require.NoError(t, err)
		assert.Equal(t, "paused", st)
		_, err = qm.Do("cont", nil)
		require.NoError(t, err)
		took, err := waitEchoes(ctx, e2+20, 60*time.Second, rig)
		assert.NoError(t, err, "round %d: traffic after cont", round)
		t.Logf("round %d: %d echo replies before stop, traffic resumed %v after cont", round, e2, took.Round(time.Millisecond))
		if err != nil {
			break
		}
	}
	p := stopPingers(t, ctx, vm, g.nonce, "final")
	noWarnings(t, rig)
	checkNetVhostRound(t, q.name+" net_vhost stop/cont", p, rig)
	_, _ = qm.Do("quit", nil)
	t.Logf("RESULT %s net_vhost stop/cont: 2 stop/cont rounds, run time %v", q.name, time.Since(start).Round(time.Millisecond))
}

func testNetVhostMigration(t *testing.T, q qemuPeer, helper, bin string) {
	hops := 2
	if q.msix {
		hops = 3
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	netVhostRig := func(dir, name string) *qemuRig { return startNetVhost(t, ctx, bin, dir, name) }
	m := bootForMigration(t, ctx, q, helper, netVhostRig, qemuConfig{name: q.name + "-boot"}, 1)
	dir, g, a, b := m.dir, m.g, m.a, m.b

	var downtimes []int64
	var diffs []int
	dead := 0 // the hop after which traffic did not resume
	for n := 1; n <= hops; n++ {
		h := m.next(n)
		migrate(t, ctx, q, g, dir, h, 1<<30, false)
		before := echoes(a, b)
		downtimes = append(downtimes, h.info.Downtime)
		diffs = append(diffs, len(h.diffPages))
		took, err := waitEchoes(ctx, before+20, 60*time.Second, a, b)
		if err != nil {
			// Seen with QEMU 7.2: guest pages differ on the
			// destination, whose kernel then oopses. It was put down to
			// net_vhost; our back-end's runs on QEMU 7.2 show the same,
			// and there the differing page held the guest kernel's
			// timer nodes, outside everything a back-end writes: QEMU
			// lost the guest's own write, likely here too (without a
			// ring tracker classifyDiff cannot tell). Counted and
			// printed; the run ends there.
			dead = n
			t.Logf("hop %d: traffic did not resume on %s (%v); %d guest pages differ between source and destination (%d the back-end may have written); destination console:\n%s",
				n, h.to.name, err, len(h.diffPages), len(h.devicePages), consoleTail(h.dst.out.String(), 30))
			require.NoError(t, noNetVhostExit(a, b), "hop %d", n)
			break
		}
		t.Logf("hop %d: traffic resumed on %s within %v of cont", n, h.to.name, took.Round(time.Millisecond))
		m.moved(h)
	}
	what := fmt.Sprintf("%s net_vhost migration (%d hops)", q.name, hops)
	if dead == 0 {
		p := stopPingers(t, ctx, m.vm, g.nonce, "final")
		noWarnings(t, a, b)
		checkNetVhostRound(t, what, p, a, b)
		_, _ = m.qm.Do("quit", nil)
	} else {
		t.Logf("RESULT %s: NET_VHOST FAILED: guest traffic dead after hop %d of %d (no pinger counts: the guest no longer answers)", what, dead, hops)
	}
	t.Logf("RESULT %s net_vhost migration: %d hops, QEMU downtime per hop %v ms, guest pages differing per hop %v, traffic dead after hop %d (0: never), run time %v",
		q.name, len(downtimes), downtimes, diffs, dead, time.Since(start).Round(time.Millisecond))
}

// noNetVhostExit says, as an error, whether a net_vhost testpmd has ended.
func noNetVhostExit(rigs ...*qemuRig) error {
	for _, r := range rigs {
		if err := r.nv.exited(); err != nil {
			return err
		}
	}
	return nil
}

// consoleTail is the last n lines of a console.
func consoleTail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
