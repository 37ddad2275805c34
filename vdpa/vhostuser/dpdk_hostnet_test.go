package vhostuser

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/hostnet"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestDPDKCsumTSOToTap: DPDK testpmd's virtio-user port (net_virtio_user0)
// on our back-end (softnet with the offloads, a hostnet tap vq0 behind it in
// namespace A), forwarding with testpmd's csum engine from a net_tap port
// (dtap0 in namespace B, whose kernel runs a TCP sender) with
// "csum set ip hw", "csum set tcp hw" and "tso set 1400" on the virtio-user
// port: virtio-user hands our device partially checksummed GSO frames
// (NEEDS_CSUM, TCPV4, gso_size 1400), which must reach namespace A's kernel
// correct. With a tap that takes the offloads they go to it whole (counted
// as GSO writes, none refused); with one that does not, the device
// segments them, and a capture on vq0 checks every segment: IPv4 and TCP
// checksums valid, TCP payload at most 1400 bytes, some exactly 1400 (the
// kernel sent 1448-byte segments: only testpmd's TSO makes 1400). The
// stream arrives byte for byte either way.
func TestDPDKCsumTSOToTap(t *testing.T) {
	bin := requireTestpmd(t, dpdkInterop)
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces and a tap device")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2's ip for the test namespaces")
	}
	for _, tc := range []struct {
		name       string
		tapOffload bool
	}{{"tap takes the offloads", true}, {"device segments for a tap without offloads", false}} {
		t.Run(tc.name, func(t *testing.T) { testDPDKCsumTSO(t, bin, tc.tapOffload) })
	}
}

const (
	csumHostIP  = "10.78.0.1"
	csumPeerIP  = "10.78.0.2"
	csumTapMAC  = "02:78:00:00:00:01"
	csumDtapMAC = "02:78:00:00:00:02"
	csumMSS     = 1400
)

func testDPDKCsumTSO(t *testing.T, bin string, tapOffload bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	nsA, nsB := "vdpakit-csa-"+randHex(4), "vdpakit-csb-"+randHex(4)
	for _, ns := range []string{nsA, nsB} {
		ipRun(t, "netns", "add", ns)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
		ipRun(t, "-n", ns, "link", "set", "lo", "up")
		ipRun(t, "netns", "exec", ns, "sh", "-c", "echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6")
	}
	dev, err := softnet.New(&softnet.Options{Offload: true, FrontendCtrl: true, MaxQueueSize: 1024})
	require.NoError(t, err)
	tap, err := hostnet.OpenTap("vq0", &hostnet.TapOptions{NetNS: "/var/run/netns/" + nsA, NoOffload: !tapOffload})
	require.NoError(t, err)
	t.Cleanup(func() { _ = tap.Close(context.Background()) })
	require.NoError(t, tap.Attach(dev))
	ipRun(t, "-n", nsA, "link", "set", "vq0", "address", csumTapMAC)
	ipRun(t, "-n", nsA, "addr", "add", csumHostIP+"/24", "dev", "vq0")
	ipRun(t, "-n", nsA, "link", "set", "vq0", "up")
	ipRun(t, "-n", nsA, "neigh", "add", csumPeerIP, "lladdr", csumDtapMAC, "dev", "vq0")
	path, be := serveBackend(t, ctx, dev)

	p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "csum"),
		vdev: "net_virtio_user0,path=" + path + ",queues=1", vdevs: []string{"net_tap0,iface=dtap0"}, fwd: "csum",
		extra: []string{"--eth-peer=0," + csumTapMAC, "--eth-peer=1," + csumDtapMAC},
		wrap:  []string{"ip", "netns", "exec", nsB}})
	require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
	ipRun(t, "-n", nsB, "link", "set", "dtap0", "address", csumDtapMAC)
	ipRun(t, "-n", nsB, "addr", "add", csumPeerIP+"/24", "dev", "dtap0")
	ipRun(t, "-n", nsB, "link", "set", "dtap0", "up")
	ipRun(t, "-n", nsB, "neigh", "add", csumHostIP, "lladdr", csumTapMAC, "dev", "dtap0")
	for _, c := range []string{"port stop 0", "csum set ip hw 0", "csum set tcp hw 0", "tso set 1400 0", "port start 0", "start"} {
		p.command(c)
	}
	require.NoError(t, p.waitOutput(ctx, "forwards packets on", 1))
	info := be.Info()
	require.True(t, info.Features.Has(virtio.NetFCsum, virtio.NetFHostTSO4), "virtio-user negotiated %s", info.Features.Format(virtio.DeviceNet))

	// A capture on vq0 in namespace A: what the tap hands the kernel.
	var capMu sync.Mutex
	var segs [][]byte
	capFd := -1
	inNS(t, "/var/run/netns/"+nsA, func() {
		ifi, err := net.InterfaceByName("vq0")
		require.NoError(t, err)
		capFd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_IP)))
		require.NoError(t, err)
		require.NoError(t, unix.SetsockoptInt(capFd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1))
		require.NoError(t, unix.Bind(capFd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index}))
	})
	require.NoError(t, unix.SetsockoptTimeval(capFd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000}))
	capDone := make(chan struct{})
	stopCap := make(chan struct{})
	go func() {
		defer close(capDone)
		buf := make([]byte, 1<<17)
		for {
			select {
			case <-stopCap:
				return
			default:
			}
			n, _, err := unix.Recvfrom(capFd, buf, 0)
			// An Ethernet frame (SOCK_RAW): the IPv4 packet after 14 bytes.
			if err != nil || n < 14+20 || buf[14+9] != 6 {
				continue
			}
			capMu.Lock()
			segs = append(segs, append([]byte(nil), buf[14:n]...))
			capMu.Unlock()
		}
	}()
	defer func() { close(stopCap); <-capDone; unix.Close(capFd) }()

	var ln net.Listener
	inNS(t, "/var/run/netns/"+nsA, func() {
		ln, err = net.Listen("tcp4", csumHostIP+":0")
		require.NoError(t, err)
	})
	defer ln.Close()
	const size = 4 << 20
	data := make([]byte, size)
	_, _ = rand.Read(data)
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		h := sha256.New()
		_, _ = io.CopyN(h, c, size)
		var s [32]byte
		copy(s[:], h.Sum(nil))
		got <- s
	}()
	var c net.Conn
	inNS(t, "/var/run/netns/"+nsB, func() {
		c, err = net.DialTimeout("tcp4", ln.Addr().String(), 10*time.Second)
		require.NoError(t, err)
	})
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(90*time.Second)))
	_, err = c.Write(data)
	require.NoError(t, err)
	select {
	case s := <-got:
		assert.Equal(t, sha256.Sum256(data), s, "the stream arrived byte for byte")
	case <-ctx.Done():
		t.Fatalf("the stream did not arrive; tap %+v; device %+v", tap.Stats(), dev.Stats())
	}
	time.Sleep(200 * time.Millisecond) // the capture's last frames
	st := tap.Stats()
	ds := dev.Stats()
	t.Logf("tap %+v; device drops %v; negotiated %s", st, ds.Drops, info.Features.Format(virtio.DeviceNet))
	assert.Zero(t, ds.Drop(softnet.DropTxBadHeader), "virtio-user's headers are valid")
	assert.Zero(t, st.TxErrors, "the tap accepted every frame")
	if tapOffload {
		assert.NotZero(t, st.TxGSO, "virtio-user's TSO frames reached the tap whole")
		return
	}
	assert.Zero(t, st.TxGSO)
	capMu.Lock()
	defer capMu.Unlock()
	var data1400, checked int
	for _, s := range segs {
		ihl := int(s[0]&0xf) * 4
		if len(s) < ihl+20 || net.IP(s[12:16]).String() != csumPeerIP {
			continue // only the sender's segments
		}
		tcp := s[ihl:]
		thl := int(tcp[12]>>4) * 4
		payload := len(s) - ihl - thl
		require.Equal(t, 0xffff, int(refFold16(sum16(s[:ihl]))), "IPv4 header checksum")
		ph := sum16(s[12:20]) + 6 + uint32(len(tcp))
		require.Equal(t, 0xffff, int(refFold16(ph+sum16(tcp))), "TCP checksum of a %d-byte segment", len(s))
		require.LessOrEqual(t, payload, csumMSS, "segment payload")
		if payload == csumMSS {
			data1400++
		}
		checked++
	}
	t.Logf("capture: %d TCP segments from the sender checked, %d with a 1400-byte payload", checked, data1400)
	assert.NotZero(t, data1400, "testpmd's TSO (1400) made segments: the kernel sends 1448")
}

func sum16(b []byte) uint32 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func refFold16(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
