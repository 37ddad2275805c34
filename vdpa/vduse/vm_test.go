//go:build linux

package vduse_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/internal/vmrig"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vduse"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

var (
	devMAC  = [6]byte{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	peerMAC = [6]byte{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}
)

func requireVDUSE(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vduse")
	testenv.RequireFile(t, "/dev/vduse/control")
	testenv.RequireVM(t) // creates and binds kernel devices
}

// (a) The device bound to vhost_vdpa, driven by the library's kernel
// backend with driver-side rings: frames go through the Go device.
func TestVhostVDPADrivesGoDevice(t *testing.T) {
	t.Run("split", func(t *testing.T) { testVhostVDPADrivesGoDevice(t, false) })
	// vdpa_sim has no packed rings; a VDUSE device does, so this is where
	// vhost-vdpa's packed base word (avail | used << 16, wrap counters in
	// bit 15 of each) meets a real kernel: SET_VRING_BASE reaches the
	// device as VDUSE_VQ_GET_INFO's packed state, GET_VRING_BASE as
	// VDUSE_GET_VQ_STATE's.
	t.Run("packed", func(t *testing.T) { testVhostVDPADrivesGoDevice(t, true) })
}

func testVhostVDPADrivesGoDevice(t *testing.T, packed bool) {
	requireVDUSE(t)
	testenv.RequireModule(t, "vhost_vdpa")
	dev, err := softnet.New(&softnet.Options{MAC: devMAC, AccessPlatform: true, NoCtrlVQ: true, MaxQueueSize: 256})
	require.NoError(t, err)
	name := "vduse-vhost"
	if packed {
		name = "vduse-vhost-pk"
	}
	vd := vmrig.ServeVDUSE(t, name, dev)

	kd, err := kernel.Open(testenv.VhostVDPAPath(t, name), nil)
	require.NoError(t, err)
	defer kd.Close()
	want := virtio.Features(0).With(virtio.FVersion1, virtio.FAccessPlatform, virtio.NetFMAC, virtio.NetFMrgRxbuf)
	if packed {
		want = want.With(virtio.FRingPacked)
	}
	got, err := kd.Negotiate(want)
	require.NoError(t, err)
	require.Equal(t, want, got)

	const base, qsize = vring.GuestAddr(0x4000_0000), 64
	reg, err := vring.NewMemfdRegion(base, 4<<20, &vring.RegionOptions{Name: "vduse-test"})
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	defer mem.Close()
	require.NoError(t, kd.SetMemory(mem))
	var q [2]*vring.DriverQueue
	var kick, call [2]*vdpa.EventFD
	for i := range 2 {
		l := vring.LayoutFor(base+vring.GuestAddr(i)*0x10000, qsize, got)
		q[i], err = vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: i, Layout: l, Features: got})
		require.NoError(t, err)
		require.Equal(t, packed, q[i].Packed())
		kick[i], err = vdpa.NewEventFD()
		require.NoError(t, err)
		call[i], err = vdpa.NewEventFD()
		require.NoError(t, err)
		defer kick[i].Close()
		defer call[i].Close()
		require.NoError(t, kd.SetupQueue(i, l, vring.InitialState(got), kick[i], call[i]))
	}
	require.NoError(t, kd.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	assert.NotZero(t, vd.Status()&virtio.StatusDriverOK)

	rxBuf := base + 0x100000
	txBuf := base + 0x200000
	const n = 8
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	reclaim := func(qi int) (uint16, uint32) {
		for {
			head, length, ok, err := q[qi].Reclaim()
			require.NoError(t, err)
			if ok {
				return head, length
			}
			_, err = call[qi].Wait(ctx)
			require.NoError(t, err, "waiting for a used entry on queue %d", qi)
		}
	}
	round := func(r int) {
		rxAddr := map[uint16]vring.GuestAddr{}
		for i := range n {
			a := rxBuf + vring.GuestAddr(i*2048)
			h, err := q[0].Add([]vring.Buffer{{Addr: a, Len: 2048, Writable: true}})
			require.NoError(t, err)
			rxAddr[h] = a
		}
		q[0].Publish()
		require.NoError(t, kick[0].Signal())
		var sent [][]byte
		for i := range n {
			f := make([]byte, 14+100+i)
			copy(f, devMAC[:])
			copy(f[6:], peerMAC[:])
			binary.BigEndian.PutUint16(f[12:], 0x88b5)
			for k := 14; k < len(f); k++ {
				f[k] = byte(r + i + k)
			}
			pkt := append(make([]byte, virtio.NetHdrSize), f...)
			require.NoError(t, mem.Write(txBuf+vring.GuestAddr(i*2048), pkt))
			_, err := q[1].Add([]vring.Buffer{{Addr: txBuf + vring.GuestAddr(i*2048), Len: uint32(len(pkt))}})
			require.NoError(t, err)
			sent = append(sent, f)
		}
		q[1].Publish()
		require.NoError(t, kick[1].Signal())
		for i := range n {
			head, length := reclaim(0)
			b := make([]byte, length)
			require.NoError(t, mem.Read(rxAddr[head], b))
			h, err := virtio.DecodeNetHdr(b, virtio.NetHdrSize)
			require.NoError(t, err)
			assert.Equal(t, uint16(1), h.NumBuffers)
			assert.True(t, bytes.Equal(sent[i], b[virtio.NetHdrSize:]), "round %d frame %d differs", r, i)
		}
		for range n {
			_, length := reclaim(1)
			assert.Zero(t, length)
		}
	}
	round(0)
	// Re-mapping guest memory while the device runs: VDUSE_UPDATE_IOTLB
	// makes the server stop the queues, re-map and restart them at their
	// exact position.
	require.NoError(t, kd.SetMemory(mem))
	// Ten rounds of 8 one-descriptor chains: 80 > 64, so each ring wraps.
	const rounds = 10
	for r := 1; r < rounds; r++ {
		round(r)
	}
	st := dev.Stats()
	assert.Equal(t, uint64(rounds*n), st.Tx().Frames)
	assert.Equal(t, uint64(rounds*n), st.Rx().Frames)

	// GET_VRING_BASE reaches the device as VDUSE_GET_VQ_STATE: it stops the
	// queue and reports its exact position (every chain completed). Split:
	// the free-running index. Packed: index 80 mod 64 with the wrap
	// counter, which started at 1 and flipped once.
	pos := uint16(rounds * n)
	if packed {
		pos = vring.PackedIndex(rounds*n%qsize, (rounds*n/qsize)%2 == 0)
	}
	for qi := range 2 {
		st, err := kd.QueueBase(qi)
		require.NoError(t, err)
		assert.Equal(t, vdpa.QueueState{NextAvail: pos, NextUsed: pos}, st, "queue %d", qi)
	}
	_, err = dev.StopQueue(1)
	assert.ErrorIs(t, err, softnet.ErrQueueStopped, "GET_VQ_STATE stopped the queue, like vhost's GET_VRING_BASE")

	// Reset through vhost-vdpa reaches the handler.
	require.NoError(t, kd.SetStatus(0))
	assert.Zero(t, dev.NegotiatedFeatures())
}

// (b) The device bound to virtio_vdpa: the Linux virtio-net driver drives
// the Go device as a network interface; ARP and ICMP echo are answered by
// the responder, and both sides count the same frames. On split rings (the
// device does not offer RING_PACKED) and on packed rings (offered: the
// driver takes it, and the VDUSE queue state is the packed one).
func TestVirtioNetDriverPingsResponder(t *testing.T) {
	for _, packed := range []bool{false, true} {
		name := "split"
		if packed {
			name = "packed"
		}
		t.Run(name, func(t *testing.T) { testVirtioNetDriverPingsResponder(t, packed) })
	}
}

func testVirtioNetDriverPingsResponder(t *testing.T, packed bool) {
	requireVDUSE(t)
	testenv.RequireModule(t, "virtio_vdpa")
	testenv.RequireModule(t, "virtio_net")
	peerIP := netip.MustParseAddr("192.0.2.1")
	r, err := softnet.NewResponder(peerMAC, peerIP)
	require.NoError(t, err)
	var vd *vduse.Device
	var disable virtio.Features
	if !packed {
		disable = virtio.FRingPacked.Bit()
	}
	dev, err := softnet.New(&softnet.Options{MAC: devMAC, AccessPlatform: true, NoCtrlVQ: true, Handler: r, MaxQueueSize: 256,
		Disable: disable, OnConfigChange: func() { assert.NoError(t, vd.ConfigChanged()) }})
	require.NoError(t, err)
	name := "vduse-virtio"
	if packed {
		name = "vduse-virtio-pk"
	}
	vd = vmrig.ServeVDUSE(t, name, dev)
	testenv.BindVDPA(t, name, testenv.DriverVirtioVDPA)

	// The driver's features (/sys/bus/virtio/devices/*/features, one
	// character per bit from bit 0): bit 34 is RING_PACKED.
	ff, err := filepath.Glob(filepath.Join("/sys/bus/vdpa/devices", name, "virtio*", "features"))
	require.NoError(t, err)
	require.Len(t, ff, 1)
	fb, err := os.ReadFile(ff[0])
	require.NoError(t, err)
	bits := strings.TrimSpace(string(fb))
	require.Greater(t, len(bits), int(virtio.FRingPacked), "features %q", bits)
	assert.Equal(t, packed, bits[virtio.FRingPacked] == '1', "the virtio driver's RING_PACKED bit (features %s)", bits)
	assert.Equal(t, packed, dev.NegotiatedFeatures().Has(virtio.FRingPacked), "the device's negotiated RING_PACKED")

	ifaces, err := filepath.Glob(filepath.Join("/sys/bus/vdpa/devices", name, "virtio*", "net", "*"))
	require.NoError(t, err)
	require.Len(t, ifaces, 1, "virtio_net created one interface")
	ifc := filepath.Base(ifaces[0])
	testenv.Command(t, "ip", "addr", "add", "192.0.2.2/24", "dev", ifc)
	testenv.Command(t, "ip", "link", "set", ifc, "up")

	ping := []string{"ping", "-c", "3", "-W", "10", peerIP.String()}
	if _, err := exec.LookPath("ping"); err != nil {
		ping = append([]string{"busybox"}, ping...)
	}
	out := testenv.Command(t, ping[0], ping[1:]...)
	t.Logf("%s", out)
	assert.Contains(t, out, "3 packets received")

	rs := r.Stats()
	assert.GreaterOrEqual(t, rs.ARPReplies, uint64(1))
	assert.Equal(t, uint64(3), rs.EchoReplies)
	stat := func(n string) uint64 {
		b, err := os.ReadFile(filepath.Join("/sys/class/net", ifc, "statistics", n))
		require.NoError(t, err)
		v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		require.NoError(t, err)
		return v
	}
	ds := dev.Stats()
	assert.Equal(t, stat("tx_packets"), ds.Tx().Frames, "every frame the driver sent reached the device")
	assert.Equal(t, stat("rx_packets"), ds.Rx().Frames, "every frame the device delivered reached the driver")
	assert.GreaterOrEqual(t, ds.Rx().Frames, uint64(4), "an ARP reply and three echo replies")

	// Link down: VDUSE_DEV_SET_CONFIG + VDUSE_DEV_INJECT_CONFIG_IRQ make the
	// driver re-read the status field and drop the carrier.
	carrier := func() string {
		b, err := os.ReadFile(filepath.Join("/sys/class/net", ifc, "carrier"))
		require.NoError(t, err)
		return strings.TrimSpace(string(b))
	}
	assert.Equal(t, "1", carrier())
	dev.SetLinkUp(false)
	deadline := time.Now().Add(10 * time.Second)
	for carrier() != "0" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	assert.Equal(t, "0", carrier(), "config interrupt delivered the link state")
	dev.SetLinkUp(true)

	// The device handed from the kernel's virtio-net to vhost-vdpa (a VMM
	// taking it for a guest) and back: the unbound driver resets it
	// (VDUSE_SET_STATUS 0 reaches the handler), and a new virtio-net
	// negotiates, sets up fresh rings and moves frames again.
	before := ds
	testenv.BindVDPA(t, name, testenv.DriverVhostVDPA)
	assert.Zero(t, dev.NegotiatedFeatures(), "the unbound driver reset the device")
	testenv.BindVDPA(t, name, testenv.DriverVirtioVDPA)
	assert.Equal(t, packed, dev.NegotiatedFeatures().Has(virtio.FRingPacked), "RING_PACKED negotiated again")
	ifaces, err = filepath.Glob(filepath.Join("/sys/bus/vdpa/devices", name, "virtio*", "net", "*"))
	require.NoError(t, err)
	require.Len(t, ifaces, 1, "virtio_net created one interface again")
	ifc = filepath.Base(ifaces[0])
	testenv.Command(t, "ip", "addr", "add", "192.0.2.2/24", "dev", ifc)
	testenv.Command(t, "ip", "link", "set", ifc, "up")
	out = testenv.Command(t, ping[0], ping[1:]...)
	t.Logf("after the rebind: %s", out)
	assert.Contains(t, out, "3 packets received")
	assert.Equal(t, uint64(6), r.Stats().EchoReplies, "three more echo replies")
	ds = dev.Stats()
	assert.Equal(t, stat("tx_packets"), ds.Tx().Frames-before.Tx().Frames, "every frame the new driver sent reached the device")
	assert.Equal(t, stat("rx_packets"), ds.Rx().Frames-before.Rx().Frames, "every frame the device delivered reached the new driver")
}
