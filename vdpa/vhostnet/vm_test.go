package vhostnet_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/internal/vmrig"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/vhostnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const (
	memBase  = vring.GuestAddr(0x10_0000)
	memSize  = 4 << 20
	logSpan  = uint64(memBase) + memSize
	qsize    = 64
	pageSize = 4096
	rxRing   = memBase
	txRing   = memBase + 0x1000
	hdrLen   = virtio.NetHdrSize
)

// ringLayout: rx and tx rings, then one buffer per page, so the pages the
// kernel dirties name the buffers.
var ringLayout = vmrig.RingLayout{
	Ring:      [2]vring.GuestAddr{rxRing, txRing},
	Buf:       [2]vring.GuestAddr{memBase + 0x10_0000, memBase + 0x20_0000},
	BufSize:   pageSize,
	QueueSize: qsize,
}

var (
	guestMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x10}
	hostMAC  = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x20}
)

func requireVhostNet(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vhost_net")
	testenv.RequireFile(t, "/dev/vhost-net")
	testenv.RequireFile(t, "/dev/net/tun")
}

// rig is a vhost-net device on a tap, driven with the library's
// driver-side rings, plus an AF_PACKET socket on the tap (the "host" side).
type rig struct {
	*vmrig.Rings
	t    *testing.T
	dev  *vhostnet.Device
	sock int
	idx  int
}

func newRig(t *testing.T, name string) *rig {
	return newRigFeatures(t, name, virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMTU))
}

func newRigFeatures(t *testing.T, name string, want virtio.Features) *rig {
	requireVhostNet(t)
	dev, err := vhostnet.Open(&vhostnet.Options{TapName: name, MAC: guestMAC, MTU: 1500})
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	assert.Equal(t, name, dev.TapName())

	reg, err := vring.NewMemfdRegion(memBase, memSize, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })

	r := &rig{Rings: vmrig.NewRings(t, mem, ringLayout), t: t, dev: dev}
	r.setup(want)

	ifi, err := net.InterfaceByName(name)
	require.NoError(t, err)
	r.idx = ifi.Index
	s, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(s) })
	require.NoError(t, unix.Bind(s, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: r.idx}))
	// A safety net so a missing frame fails the test instead of hanging it.
	require.NoError(t, unix.SetsockoptTimeval(s, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 20}))
	r.sock = s
	return r
}

// setup negotiates want, installs the memory table and sets up both
// rings from scratch, then sets DRIVER_OK.
func (r *rig) setup(want virtio.Features) {
	t, dev := r.t, r.dev
	require.NoError(t, dev.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver))
	require.NoError(t, dev.SetFeatures(want))
	require.NoError(t, dev.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	require.NoError(t, dev.SetMemory(r.Mem))
	r.Setup(dev, want, vdpa.QueueState{}, vdpa.QueueState{})
	require.NoError(t, dev.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// hostSend transmits frame on the tap from the host side: the kernel hands
// it to vhost-net's receive ring.
func (r *rig) hostSend(frame []byte) {
	require.NoError(r.t, unix.Sendto(r.sock, frame, 0, &unix.SockaddrLinklayer{Ifindex: r.idx, Halen: 6,
		Addr: [8]byte{frame[0], frame[1], frame[2], frame[3], frame[4], frame[5]}}))
}

// hostRecv reads the next frame the tap received from the guest side
// (frames the host itself sent show up as PACKET_OUTGOING and are skipped).
func (r *rig) hostRecv() []byte {
	buf := make([]byte, 65536)
	for {
		n, from, err := unix.Recvfrom(r.sock, buf, 0)
		require.NoError(r.t, err, "no frame from the guest side")
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		return slices.Clone(buf[:n])
	}
}

func pageOf(a uint64) uint64 { return a / pageSize }

// pagesOf lists the pages [a, a+n) touches.
func pagesOf(a, n uint64) []uint64 {
	var ps []uint64
	for p := pageOf(a); p <= pageOf(a+n-1); p++ {
		ps = append(ps, p)
	}
	return ps
}

func harvest(t *testing.T, log *dirty.Bitmap) []uint64 {
	t.Helper()
	dst, err := dirty.New(log.Span(), nil)
	require.NoError(t, err)
	defer dst.Close()
	_, err = log.Harvest(dst)
	require.NoError(t, err)
	return slices.Collect(dst.DirtyPages())
}

// Frames cross vhost-net both ways byte for byte, and the pages the kernel
// marks in the dirty log are exactly the receive buffers it wrote and the
// used rings.
func TestFramesBothWaysAndDirtyLog(t *testing.T) {
	r := newRig(t, "vdpakit-vn0")
	log, err := dirty.New(logSpan, nil)
	require.NoError(t, err)
	defer log.Close()
	require.NoError(t, r.dev.SetLog(log))

	// Host -> guest: 3 frames into 8 posted buffers.
	r.PostRx(8)
	in := [][]byte{
		vmrig.UDPFrame(t, guestMAC, hostMAC, 1),
		vmrig.UDPFrame(t, guestMAC, hostMAC, 2),
		vmrig.UDPFrame(t, net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, hostMAC, 3),
	}
	for _, f := range in {
		r.hostSend(f)
	}
	got := r.Reclaim(vhostnet.RxQueue, len(in))
	want := map[uint64]bool{}
	for i, u := range got {
		require.Equal(t, hdrLen+len(in[i]), len(u.Data), "frame %d length", i)
		assert.True(t, bytes.Equal(in[i], u.Data[hdrLen:]), "frame %d differs", i)
		hdr, err := virtio.DecodeNetHdr(u.Data[:hdrLen], hdrLen)
		require.NoError(t, err)
		assert.Zero(t, hdr.Flags, "no offloads on the tap")
		assert.Equal(t, virtio.NetHdrGSONone, hdr.GSOType)
		for _, p := range pagesOf(uint64(u.Addr), uint64(len(u.Data))) {
			want[p] = true
		}
	}
	want[pageOf(uint64(vring.ContiguousLayout(rxRing, qsize).Used))] = true
	assert.Equal(t, sortedKeys(want), harvest(t, log), "dirty pages after receiving: the written rx buffers and the rx used ring")

	// Guest -> host.
	out := [][]byte{vmrig.UDPFrame(t, hostMAC, guestMAC, 4), vmrig.UDPFrame(t, hostMAC, guestMAC, 5)}
	r.Send(out...)
	for i := range out {
		assert.Equal(t, out[i], r.hostRecv(), "frame %d on the tap", i)
	}
	r.Reclaim(vhostnet.TxQueue, len(out))
	assert.Equal(t, []uint64{pageOf(uint64(vring.ContiguousLayout(txRing, qsize).Used))}, harvest(t, log),
		"dirty pages after transmitting: only the tx used ring (tx buffers are only read)")

	// Stopping the log: nothing more is marked.
	require.NoError(t, r.dev.SetLog(nil))
	r.hostSend(vmrig.UDPFrame(t, guestMAC, hostMAC, 6))
	r.Reclaim(vhostnet.RxQueue, 1)
	assert.Empty(t, harvest(t, log), "no marks with logging off")
}

func sortedKeys(m map[uint64]bool) []uint64 {
	ks := make([]uint64, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// Suspend drains and detaches the rings; QueueBase then reports the ring
// positions; frames sent meanwhile wait in the tap and arrive after Resume.
func TestSuspendResumeKeepsIndices(t *testing.T) {
	r := newRig(t, "vdpakit-vn1")
	r.PostRx(8)
	for i := range 3 {
		r.hostSend(vmrig.UDPFrame(t, guestMAC, hostMAC, i))
	}
	r.Reclaim(vhostnet.RxQueue, 3)
	require.NoError(t, r.dev.Suspend())
	st, err := r.dev.QueueBase(vhostnet.RxQueue)
	require.NoError(t, err)
	assert.Equal(t, vdpa.QueueState{NextAvail: 3, NextUsed: 3}, st)

	f := vmrig.UDPFrame(t, guestMAC, hostMAC, 9)
	r.hostSend(f)
	st, err = r.dev.QueueBase(vhostnet.RxQueue)
	require.NoError(t, err)
	assert.Equal(t, vdpa.QueueState{NextAvail: 3, NextUsed: 3}, st, "nothing received while suspended")

	require.NoError(t, r.dev.Resume())
	got := r.Reclaim(vhostnet.RxQueue, 1)
	assert.Equal(t, f, got[0].Data[hdrLen:])
	require.NoError(t, r.dev.Suspend())
	st, err = r.dev.QueueBase(vhostnet.RxQueue)
	require.NoError(t, err)
	assert.Equal(t, vdpa.QueueState{NextAvail: 4, NextUsed: 4}, st)
}

// The emulated config space carries Options' MAC, MTU and link status.
func TestEmulatedConfig(t *testing.T) {
	r := newRig(t, "vdpakit-vn2")
	raw := make([]byte, 12)
	require.NoError(t, r.dev.ReadConfig(0, raw))
	cfg, err := virtio.DecodeNetConfig(raw)
	require.NoError(t, err)
	assert.Equal(t, guestMAC, net.HardwareAddr(cfg.MAC[:]))
	assert.Equal(t, uint16(1500), cfg.MTU)
	assert.Equal(t, virtio.NetSLinkUp, cfg.Status)
	assert.Equal(t, uint16(1), binary.LittleEndian.Uint16(raw[virtio.NetCfgMaxVirtqueuePairs:]))
	f, err := r.dev.Features()
	require.NoError(t, err)
	assert.True(t, f.Has(virtio.FVersion1, virtio.FLogAll, virtio.NetFMAC, virtio.NetFMTU, virtio.NetFStatus), f.Format(virtio.DeviceNet))
	assert.False(t, f.Has(virtio.FAccessPlatform), "no device IOTLB")
}

// The virtio-net header on the receive ring has the size the negotiated
// features call for (virtio 1.2 §5.1.6: 12 bytes with VERSION_1 or
// MRG_RXBUF, 10 without), and with MRG_RXBUF num_buffers counts the
// buffers used.
func TestRxHeaderFollowsFeatures(t *testing.T) {
	for i, tc := range []struct {
		name     string
		features virtio.Features
		hdr      int
	}{
		{"VERSION_1: virtio_net_hdr_v1", virtio.Features(0).With(virtio.FVersion1), 12},
		{"MRG_RXBUF: num_buffers set", virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf), 12},
		{"legacy: virtio_net_hdr", virtio.Features(0), 10},
		// ANY_LAYOUT shares bit 27 with VHOST_NET_F_VIRTIO_NET_HDR; the
		// device must not pass it on, or vhost-net and the tap would both
		// handle the header and no frame would arrive.
		{"ANY_LAYOUT: same header, bit 27 kept from vhost", virtio.Features(0).With(virtio.FVersion1, virtio.FAnyLayout), 12},
		{"legacy ANY_LAYOUT|MRG_RXBUF", virtio.Features(0).With(virtio.FAnyLayout, virtio.NetFMrgRxbuf), 12},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRigFeatures(t, fmt.Sprintf("vdpakit-vh%d", i), tc.features)
			r.PostRx(2)
			f := vmrig.UDPFrame(t, guestMAC, hostMAC, 40+i)
			r.hostSend(f)
			got := r.Reclaim(vhostnet.RxQueue, 1)[0].Data
			require.Equal(t, tc.hdr+len(f), len(got))
			assert.Equal(t, f, got[tc.hdr:])
			if tc.features.Has(virtio.NetFMrgRxbuf) {
				h, err := virtio.DecodeNetHdr(got[:tc.hdr], tc.hdr)
				require.NoError(t, err)
				assert.Equal(t, uint16(1), h.NumBuffers)
			}
		})
	}
}

// A reset (status 0) detaches the rings and resets vhost-net's ownership;
// the device can then be set up from scratch and carries frames again.
func TestResetAndSetUpAgain(t *testing.T) {
	r := newRig(t, "vdpakit-vn3")
	r.hostToGuest(1)

	require.NoError(t, r.dev.SetStatus(0))
	st, err := r.dev.Status()
	require.NoError(t, err)
	assert.Equal(t, virtio.Status(0), st)

	r.setup(virtio.Features(0).With(virtio.FVersion1))
	r.hostToGuest(2)
	out := vmrig.UDPFrame(t, hostMAC, guestMAC, 3)
	r.Send(out)
	assert.Equal(t, out, r.hostRecv())
	r.Reclaim(vhostnet.TxQueue, 1)
	for q := range 2 {
		st, err := r.dev.QueueBase(q)
		require.NoError(t, err)
		assert.Equal(t, vdpa.QueueState{NextAvail: 1, NextUsed: 1}, st, "queue %d counts from the reset", q)
	}
}

// TestFailedSetLogLeavesTheKernelOffTheLog: a SetLog that fails part way
// (here the rings' memory is gone from the table, so the rings cannot be
// reprogrammed with the log flag) must leave the kernel writing into no
// log the caller was told is not in use, and the caller may close it. It
// used to leave the kernel's log base on the new log and LOG_ALL as set
// (found by a review). Going back fails here too (the rings cannot be
// reprogrammed without their memory), so the rings are detached, the error
// says so, and a reset sets the device up again.
func TestFailedSetLogLeavesTheKernelOffTheLog(t *testing.T) {
	r := newRig(t, "vdpakit-vn5")
	r.hostToGuest(1)

	other, err := vring.NewMemfdRegion(0x1_0000_0000, 1<<20, nil)
	require.NoError(t, err)
	elsewhere, err := vring.NewMemory(other)
	require.NoError(t, err)
	defer elsewhere.Close()
	require.NoError(t, r.dev.SetMemory(elsewhere), "the kernel takes any table")
	log, err := dirty.New(0x1_0000_0000+1<<20, nil)
	require.NoError(t, err)
	err = r.dev.SetLog(log)
	require.ErrorIs(t, err, vhostnet.ErrQueueLayout)
	assert.Contains(t, err.Error(), "rings are detached")
	require.NoError(t, log.Close(), "the caller may free the log SetLog refused")

	require.NoError(t, r.dev.SetStatus(0))
	r.setup(virtio.Features(0).With(virtio.FVersion1))
	r.hostToGuest(2)
}

// hostToGuest posts two receive buffers, sends a frame numbered seq from
// the host side and requires the guest to receive it byte for byte.
func (r *rig) hostToGuest(seq int) {
	r.t.Helper()
	r.PostRx(2)
	f := vmrig.UDPFrame(r.t, guestMAC, hostMAC, seq)
	r.hostSend(f)
	got := r.Reclaim(vhostnet.RxQueue, 1)
	assert.Equal(r.t, f, got[0].Data[hdrLen:])
}
