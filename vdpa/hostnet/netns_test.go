package hostnet_test

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// requireNetAdmin skips a test that needs to create network namespaces
// and tap devices when this process cannot.
func requireNetAdmin(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and tap devices")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip to configure the test namespaces")
	}
}

var nsSeq atomic.Int32

// netns is a network namespace the test created (ip netns add), deleted
// at the end of the test. Traffic of the tests stays inside such
// namespaces.
type netns struct {
	t    testing.TB
	name string
	path string
}

func newNetNS(t testing.TB) *netns {
	t.Helper()
	name := fmt.Sprintf("vdpakit-hn-%d-%d", os.Getpid(), nsSeq.Add(1))
	out, err := exec.Command("ip", "netns", "add", name).CombinedOutput()
	if err != nil {
		t.Skipf("cannot create a network namespace (ip netns add): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	// iproute2 keeps the namespace file in its NETNS_RUN_DIR: /var/run/netns
	// or /run/netns, the same directory where /var/run links to /run (not
	// so in the real-kernel harness's initramfs).
	var path string
	for _, dir := range []string{"/run/netns/", "/var/run/netns/"} {
		if _, err := os.Stat(dir + name); err == nil {
			path = dir + name
			break
		}
	}
	require.NotEmpty(t, path, "ip netns add %s made no file under /run/netns or /var/run/netns", name)
	n := &netns{t: t, name: name, path: path}
	n.ip("link", "set", "lo", "up")
	return n
}

// ip runs "ip -n NS args...".
func (n *netns) ip(args ...string) {
	n.t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", n.name}, args...)...).CombinedOutput()
	require.NoError(n.t, err, "ip -n %s %s: %s", n.name, strings.Join(args, " "), out)
}

// mac returns the hardware address of interface ifname in the namespace.
func (n *netns) mac(ifname string) string {
	n.t.Helper()
	o, err := n.exec("cat", "/sys/class/net/"+ifname+"/address")
	require.NoError(n.t, err, "%s: %s", ifname, o)
	return strings.TrimSpace(o)
}

// exec runs a command inside the namespace and returns its output.
func (n *netns) exec(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.name}, args...)...).CombinedOutput()
	return string(out), err
}

// run calls fn on a thread inside the namespace (sockets it creates stay
// there). The thread is discarded afterwards.
func (n *netns) run(fn func()) {
	n.t.Helper()
	f, err := os.Open(n.path)
	require.NoError(n.t, err)
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
	require.NoError(n.t, <-done)
}

// ping sends count ICMP echo requests from the namespace to dst over a raw
// socket and returns how many were answered (each waited for up to 5 s).
func (n *netns) ping(dst string, count int) int {
	n.t.Helper()
	return n.pingWait(dst, count, 5*time.Second)
}

// pingWait is ping with each reply waited for up to wait.
func (n *netns) pingWait(dst string, count int, wait time.Duration) int {
	n.t.Helper()
	var c net.PacketConn
	n.run(func() {
		var err error
		c, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		require.NoError(n.t, err)
	})
	defer c.Close()
	id := uint16(os.Getpid())
	answered := 0
	buf := make([]byte, 1500)
	for seq := 1; seq <= count; seq++ {
		req := serializeICMP(n.t, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0),
			Id: id, Seq: uint16(seq)}, []byte("vdpakit hostnet ping"))
		_, err := c.WriteTo(req, &net.IPAddr{IP: net.ParseIP(dst)})
		require.NoError(n.t, err)
		require.NoError(n.t, c.SetReadDeadline(time.Now().Add(wait)))
		for {
			k, _, err := c.ReadFrom(buf)
			if err != nil {
				break
			}
			p := gopacket.NewPacket(buf[:k], layers.LayerTypeICMPv4, gopacket.Default)
			if e, ok := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4); ok &&
				e.TypeCode.Type() == layers.ICMPv4TypeEchoReply && e.Id == id && e.Seq == uint16(seq) {
				answered++
				break
			}
		}
	}
	return answered
}

func serializeICMP(t testing.TB, l *layers.ICMPv4, payload []byte) []byte {
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, l, gopacket.Payload(payload)))
	return buf.Bytes()
}
