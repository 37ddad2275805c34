package kernel_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/vmrig"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/vdpa/mgmt"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

var (
	simMAC  = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}
	peerMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x02}
	// vdpa_sim_net compares MACs with strncmp (6.12), which stops at the
	// first NUL: 02:00:00:00:00:99 would pass as 02:00:00:00:00:01. Differ
	// before any zero byte.
	otherMAC = net.HardwareAddr{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}
	bcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
)

// netFeatures are what the tests negotiate: vdpa_sim needs
// ACCESS_PLATFORM, VERSION_1 gives the 12-byte header.
var netFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.FAccessPlatform, virtio.NetFMAC,
	virtio.NetFStatus, virtio.NetFMTU)

// Every query ioctl of a vdpa_sim_net device answers what the kernel's own
// management interface (iproute2's vdpa tool) says about the device.
func TestProbeMatchesVdpaTool(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-probe", "mac", simMAC.String(), "mtu", "1400")
	dev, err := kernel.Open(path, nil)
	require.NoError(t, err)
	defer dev.Close()

	show := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "show", "vdpa-probe"), "dev", "vdpa-probe")
	assert.Equal(t, "network", show["type"])
	assert.Equal(t, "vdpasim_net", show["mgmtdev"])

	id, err := dev.DeviceID()
	require.NoError(t, err)
	assert.Equal(t, virtio.DeviceNet, id, "VHOST_VDPA_GET_DEVICE_ID vs vdpa dev show type")

	nq, err := dev.NumQueues()
	require.NoError(t, err)
	assert.EqualValues(t, show["max_vqs"], nq, "VHOST_VDPA_GET_VQS_COUNT vs max_vqs")

	maxq, err := dev.MaxQueueSize()
	require.NoError(t, err)
	assert.EqualValues(t, show["max_vq_size"], maxq, "VHOST_VDPA_GET_VRING_NUM vs max_vq_size")
	// vdpa_sim implements get_vq_size only in its non-batching ops; with
	// batch_mapping=1 (the default) vhost-vdpa answers EOPNOTSUPP.
	batch := strings.TrimSpace(readFile(t, "/sys/module/vdpa_sim/parameters/batch_mapping"))
	for q := range nq {
		n, err := dev.QueueSize(q)
		if batch == "1" {
			assert.ErrorIs(t, err, unix.EOPNOTSUPP, "VHOST_VDPA_GET_VRING_SIZE(%d) with batch_mapping=1", q)
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, maxq, n, "VHOST_VDPA_GET_VRING_SIZE(%d) before DRIVER_OK", q)
	}

	mgmtdev := vmrig.Obj(t, vmrig.VdpaJSON(t, "mgmtdev", "show", "vdpasim_net"), "mgmtdev", "vdpasim_net")
	feat, err := dev.Features()
	require.NoError(t, err)
	assert.Equal(t, vmrig.FeatureList(t, mgmtdev["dev_features"]).Format(virtio.DeviceNet), feat.Format(virtio.DeviceNet),
		"VHOST_GET_FEATURES vs mgmtdev dev_features")
	assert.True(t, feat.Has(virtio.FAccessPlatform, virtio.FVersion1))

	// vdpa_sim (6.12): IOTLB v2, batching and ASIDs from vhost-vdpa;
	// SUSPEND and RESUME from its ops; ENABLE_AFTER_DRIVER_OK from its
	// get_backend_features; IOTLB_PERSIST because it has reset_map.
	assert.Equal(t, kernel.BackendFeatures(0).With(kernel.BackendIOTLBMsgV2, kernel.BackendIOTLBBatch,
		kernel.BackendIOTLBASID, kernel.BackendSuspend, kernel.BackendResume,
		kernel.BackendEnableAfterDriverOK, kernel.BackendIOTLBPersist).String(), dev.OfferedBackendFeatures().String())
	assert.Equal(t, dev.OfferedBackendFeatures(), dev.BackendFeatures(), "everything offered is negotiated")

	cfgSize, err := dev.ConfigSize()
	require.NoError(t, err)
	require.GreaterOrEqual(t, cfgSize, virtio.NetCfgMTU+2)
	raw := make([]byte, cfgSize)
	require.NoError(t, dev.ReadConfig(0, raw))
	cfg, err := virtio.DecodeNetConfig(raw)
	require.NoError(t, err)
	cshow := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "config", "show", "vdpa-probe"), "config", "vdpa-probe")
	assert.Equal(t, cshow["mac"], net.HardwareAddr(cfg.MAC[:]).String(), "config mac vs vdpa dev config show")
	assert.EqualValues(t, cshow["mtu"], cfg.MTU, "config mtu vs vdpa dev config show")
	assert.Equal(t, cshow["link"] == "up", cfg.Status&virtio.NetSLinkUp != 0, "config status vs link")
	assert.EqualValues(t, 1400, cfg.MTU)
	// A partial read at an offset sees the same bytes.
	part := make([]byte, 2)
	require.NoError(t, dev.ReadConfig(virtio.NetCfgMTU, part))
	assert.Equal(t, raw[virtio.NetCfgMTU:virtio.NetCfgMTU+2], part)

	ng, err := dev.NumGroups()
	require.NoError(t, err)
	nas, err := dev.NumAddressSpaces()
	require.NoError(t, err)
	assert.Equal(t, 2, ng, "vdpa_sim_net: data queues and the control queue in two groups")
	assert.Equal(t, 2, nas)
	for q, want := range []int{0, 0, 1} {
		g, err := dev.QueueGroup(q)
		require.NoError(t, err)
		assert.Equal(t, want, g, "VHOST_VDPA_GET_VRING_GROUP(%d)", q)
	}
	_, err = dev.QueueDescGroup(0)
	assert.ErrorIs(t, err, unix.EOPNOTSUPP, "vdpa_sim has no separate descriptor groups")

	first, last := dev.IOVARange()
	assert.Equal(t, vring.GuestAddr(0), first)
	assert.Equal(t, ^vring.GuestAddr(0), last)

	st, err := dev.Status()
	require.NoError(t, err)
	assert.Equal(t, virtio.Status(0), st, "opening resets the device")

	// Negotiation shows up in the kernel's view of the device.
	got, err := dev.Negotiate(netFeatures)
	require.NoError(t, err)
	assert.Equal(t, netFeatures, got)
	st, err = dev.Status()
	require.NoError(t, err)
	assert.Equal(t, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK, st)
	cshow = vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "config", "show", "vdpa-probe"), "config", "vdpa-probe")
	assert.Equal(t, got.Format(virtio.DeviceNet), vmrig.FeatureList(t, cshow["negotiated_features"]).Format(virtio.DeviceNet))

	nl, err := mgmt.Dial(nil)
	require.NoError(t, err)
	defer nl.Close()
	ncfg, err := nl.DeviceConfig(context.Background(), "vdpa-probe")
	require.NoError(t, err)
	assert.True(t, ncfg.HasNegotiated)
	assert.Equal(t, got, ncfg.Negotiated)
	assert.Equal(t, feat, ncfg.Features)
}

// The kernel's refusals reach the caller named and errors.Is-able.
func TestKernelErrorsNameTheIoctl(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-errs", "mac", simMAC.String())
	dev, err := kernel.Open(path, nil)
	require.NoError(t, err)
	defer dev.Close()
	_, err = dev.Negotiate(netFeatures)
	require.NoError(t, err)

	err = dev.SetFeatures(netFeatures)
	assert.ErrorIs(t, err, unix.EBUSY, "features are frozen after FEATURES_OK")
	assert.Contains(t, err.Error(), "VHOST_SET_FEATURES: ")

	err = dev.SetStatus(virtio.StatusAcknowledge)
	assert.ErrorIs(t, err, unix.EINVAL, "clearing status bits without a reset")
	var oe *kernel.OpError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, "VHOST_VDPA_SET_STATUS", oe.Op)

	assert.ErrorIs(t, dev.SetFeatures(virtio.Features(0).With(virtio.FRingPacked)), kernel.ErrFeatures)

	reg, err := vring.NewMemfdRegion(memBase, 1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	defer mem.Close()
	require.NoError(t, dev.SetMemory(mem))
	// Overlapping an existing mapping: the kernel refuses (EEXIST inside,
	// EFAULT on the write, as vhost reports every IOTLB refusal).
	err = dev.MapDMA(kernel.Mapping{IOVA: memBase + 0x1000, Size: 0x1000, UAddr: reg.HostAddr(), Perm: kernel.PermRW})
	assert.ErrorIs(t, err, unix.EFAULT)
	assert.Contains(t, err.Error(), "VHOST_IOTLB_UPDATE")
	// An address space the device does not have.
	err = dev.MapDMA(kernel.Mapping{ASID: 5, IOVA: 0x1000, Size: 0x1000, UAddr: reg.HostAddr(), Perm: kernel.PermRW})
	assert.ErrorIs(t, err, unix.EFAULT)
	assert.Len(t, dev.Mappings(), 1, "only SetMemory's mapping remains")
	// Unmapping and mapping again is accepted.
	require.NoError(t, dev.UnmapDMA(0, memBase, 1<<20))
	assert.Empty(t, dev.Mappings())
	require.NoError(t, dev.SetMemory(mem))
	require.NoError(t, dev.SetMemory(mem), "SetMemory replaces its own earlier mappings")
	assert.Len(t, dev.Mappings(), 1)
}

// Frames built with gopacket go out on the transmit queue of vdpa_sim_net
// and come back on the receive queue byte for byte; frames for another
// unicast MAC are dropped by the device.
func TestTrafficLoopsBackByteIdentical(t *testing.T) {
	for i, opts := range []*kernel.Options{
		nil, // everything offered: batched IOTLB updates
		{BackendFeatures: kernel.BackendIOTLBMsgV2.Bit()}, // one update per message, no batching
	} {
		t.Run(fmt.Sprintf("backend=%d", i), func(t *testing.T) { testTraffic(t, fmt.Sprintf("vdpa-traffic%d", i), opts) })
	}
}

func testTraffic(t *testing.T, name string, opts *kernel.Options) {
	path := vmrig.AddSimNet(t, name, "mac", simMAC.String())
	r := newRig(t, path, opts, netFeatures)
	if opts != nil {
		require.Equal(t, opts.BackendFeatures, r.dev.BackendFeatures())
	}
	r.PostRx(16)

	frames := [][]byte{
		vmrig.UDPFrame(t, bcastMAC, peerMAC, 1),
		vmrig.UDPFrame(t, simMAC, peerMAC, 2),
		vmrig.UDPFrame(t, net.HardwareAddr{0x01, 0x00, 0x5e, 0x00, 0x00, 0x01}, peerMAC, 3), // multicast
		vmrig.UDPFrame(t, simMAC, peerMAC, 4),
	}
	sent := r.Send(frames...)
	got := r.Reclaim(rxQ, len(frames))
	for i := range sent {
		assert.True(t, bytes.Equal(sent[i], got[i].Data), "frame %d came back different:\nsent %x\ngot  %x", i, sent[i], got[i].Data)
	}
	r.Reclaim(txQ, len(frames))

	// A frame for someone else is consumed from tx and never received.
	r.Send(vmrig.UDPFrame(t, otherMAC, peerMAC, 5))
	r.Reclaim(txQ, 1)
	r.Send(vmrig.UDPFrame(t, bcastMAC, peerMAC, 6))
	got = r.Reclaim(rxQ, 1)
	assert.Equal(t, vmrig.UDPFrame(t, bcastMAC, peerMAC, 6), got[0].Data[hdrLen:], "the next received frame is the broadcast one")
	r.Reclaim(txQ, 1)

	nl, err := mgmt.Dial(nil)
	require.NoError(t, err)
	defer nl.Close()
	rx, err := nl.QueueStats(context.Background(), name, rxQ)
	require.NoError(t, err)
	stat := func(s mgmt.QueueStats, name string) uint64 {
		v, ok := s.Get(name)
		require.True(t, ok, "no %q in %v", name, s.Stats)
		return v
	}
	assert.EqualValues(t, 5, stat(rx, "rx packets"))
	assert.EqualValues(t, 1, stat(rx, "rx drops"), "the frame for another MAC")
	tx, err := nl.QueueStats(context.Background(), name, txQ)
	require.NoError(t, err)
	assert.EqualValues(t, 6, stat(tx, "tx packets"))
	var bytesSent uint64
	for _, f := range append(frames, vmrig.UDPFrame(t, otherMAC, peerMAC, 5), vmrig.UDPFrame(t, bcastMAC, peerMAC, 6)) {
		bytesSent += uint64(hdrLen + len(f))
	}
	assert.Equal(t, bytesSent, stat(tx, "tx bytes"))
}

// Suspending stops the device with its ring positions intact; what is
// queued while suspended is processed after Resume, and the positions
// continue from where they were.
func TestSuspendResumeKeepsRingIndices(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-suspend", "mac", simMAC.String())
	r := newRig(t, path, nil, netFeatures)
	r.PostRx(32)
	const first = 5
	for i := range first {
		r.Send(vmrig.UDPFrame(t, simMAC, peerMAC, i))
	}
	r.Reclaim(rxQ, first)
	r.Reclaim(txQ, first)

	require.NoError(t, r.dev.Suspend())
	for q := range 2 {
		st, err := r.dev.QueueBase(q)
		require.NoError(t, err)
		assert.Equal(t, vdpa.QueueState{NextAvail: first, NextUsed: first}, st, "queue %d after %d frames", q, first)
	}

	const more = 3
	for i := range more {
		r.Send(vmrig.UDPFrame(t, bcastMAC, peerMAC, 10+i))
	}
	for q := range 2 {
		st, err := r.dev.QueueBase(q)
		require.NoError(t, err)
		assert.Equal(t, vdpa.QueueState{NextAvail: first, NextUsed: first}, st, "queue %d while suspended", q)
		assert.Equal(t, uint16(first), r.UsedIdx(q), "queue %d used.idx moved while suspended", q)
	}

	require.NoError(t, r.dev.Resume())
	got := r.Reclaim(rxQ, more)
	for i := range more {
		assert.Equal(t, vmrig.UDPFrame(t, bcastMAC, peerMAC, 10+i), got[i].Data[hdrLen:])
	}
	r.Reclaim(txQ, more)
	require.NoError(t, r.dev.Suspend())
	for q := range 2 {
		st, err := r.dev.QueueBase(q)
		require.NoError(t, err)
		assert.Equal(t, vdpa.QueueState{NextAvail: first + more, NextUsed: first + more}, st, "queue %d after resume", q)
	}
	require.NoError(t, r.dev.Resume())
}

// Without IOTLB_PERSIST a reset drops the device's translations; the
// Device replays its mappings, so after a reset and a new setup traffic
// flows again through the same IOVAs.
func TestResetWithoutPersistReplaysMappings(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-reset", "mac", simMAC.String())
	opts := &kernel.Options{BackendFeatures: kernel.Supported &^ kernel.BackendIOTLBPersist.Bit()}
	r := newRig(t, path, opts, netFeatures)
	require.False(t, r.dev.BackendFeatures().Has(kernel.BackendIOTLBPersist))
	r.PostRx(4)
	r.Send(vmrig.UDPFrame(t, simMAC, peerMAC, 1))
	r.Reclaim(rxQ, 1)
	r.Reclaim(txQ, 1)

	require.NoError(t, r.dev.SetStatus(0))
	neg, err := r.dev.Negotiate(netFeatures)
	require.NoError(t, err)
	r.Setup(r.dev, neg, vdpa.QueueState{}, vdpa.QueueState{})
	require.NoError(t, r.dev.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	r.PostRx(4)
	f := vmrig.UDPFrame(t, simMAC, peerMAC, 2)
	r.Send(f)
	got := r.Reclaim(rxQ, 1)
	assert.Equal(t, f, got[0].Data[hdrLen:])
}

// The control queue lives in its own group; bound to address space 1 with
// its memory mapped only there, a MAC_ADDR_SET command reaches the device,
// which proves VHOST_VDPA_SET_GROUP_ASID and the per-ASID IOTLB did what
// they claim.
func TestControlQueueInSecondAddressSpace(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-asid", "mac", simMAC.String())
	want := netFeatures.With(virtio.NetFCtrlVQ, virtio.NetFCtrlMACAddr)

	const ctlBase = vring.GuestAddr(0x8000_0000)
	reg, err := vring.NewMemfdRegion(ctlBase, 1<<20, &vring.RegionOptions{Name: "vdpakit-cvq"})
	require.NoError(t, err)
	ctl, err := vring.NewMemory(reg)
	require.NoError(t, err)
	defer ctl.Close()
	l := vring.ContiguousLayout(ctlBase, 16)
	kick, call := vmrig.NewEventFD(t), vmrig.NewEventFD(t)
	var cq *vring.DriverQueue

	// rx/tx in ASID 0; the control queue's group in ASID 1, set up before
	// DRIVER_OK.
	r := newRigWith(t, path, nil, want, func(r *rig) {
		dev := r.dev
		g, err := dev.QueueGroup(2)
		require.NoError(t, err)
		require.NoError(t, dev.SetGroupASID(uint32(g), 1))
		require.NoError(t, dev.MapMemory(1, ctl))
		for _, m := range dev.Mappings() {
			if m.ASID == 1 {
				assert.Equal(t, ctlBase, m.IOVA)
			} else {
				assert.Equal(t, memBase, m.IOVA, "data memory stays in ASID 0 only")
			}
		}
		cq, err = vring.NewDriverQueue(ctl, vring.DriverQueueOptions{Index: 2, Layout: l, Features: want})
		require.NoError(t, err)
		require.NoError(t, dev.SetupQueue(2, l, vdpa.QueueState{}, kick, call))
	})
	dev := r.dev

	newMAC := net.HardwareAddr{0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee}
	cmd := ctlBase + 0x10000
	ack := ctlBase + 0x10100
	require.NoError(t, ctl.Write(cmd, append([]byte{virtio.NetCtrlMAC, virtio.NetCtrlMACAddrSet}, newMAC...)))
	require.NoError(t, ctl.Write(ack, []byte{0xff}))
	_, err = cq.Add([]vring.Buffer{{Addr: cmd, Len: 2}, {Addr: cmd + 2, Len: 6}, {Addr: ack, Len: 1, Writable: true}})
	require.NoError(t, err)
	cq.Publish()
	require.NoError(t, kick.Signal())

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		_, _, ok, err := cq.Reclaim()
		require.NoError(t, err)
		if ok {
			break
		}
		_, err = call.Wait(ctx)
		require.NoError(t, err, "control command never completed")
	}
	var a [1]byte
	require.NoError(t, ctl.Read(ack, a[:]))
	assert.Equal(t, byte(0), a[0], "VIRTIO_NET_OK")

	raw := make([]byte, 6)
	require.NoError(t, dev.ReadConfig(virtio.NetCfgMAC, raw))
	assert.Equal(t, newMAC, net.HardwareAddr(raw))
	cshow := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "config", "show", "vdpa-asid"), "config", "vdpa-asid")
	assert.Equal(t, newMAC.String(), cshow["mac"])

	// The data path still works in ASID 0, to the new MAC.
	r.PostRx(2)
	f := vmrig.UDPFrame(t, newMAC, peerMAC, 9)
	r.Send(f)
	got := r.Reclaim(rxQ, 1)
	assert.Equal(t, f, got[0].Data[hdrLen:])
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func TestDevicePathMatchesSysfsNode(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-path", "mac", simMAC.String())
	got, err := kernel.DevicePath("vdpa-path")
	require.NoError(t, err)
	assert.Equal(t, path, got)
}

// VHOST_VDPA_SET_CONFIG reaches the device's config space: a MAC written
// through it is what the device, and iproute2, report afterwards.
func TestConfigWriteReachesDevice(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-cfgw", "mac", simMAC.String())
	dev, err := kernel.Open(path, nil)
	require.NoError(t, err)
	defer dev.Close()
	newMAC := net.HardwareAddr{0x02, 0x5e, 0x4d, 0x3c, 0x2b, 0x1a}
	require.NoError(t, dev.WriteConfig(virtio.NetCfgMAC, newMAC))
	got := make([]byte, 6)
	require.NoError(t, dev.ReadConfig(virtio.NetCfgMAC, got))
	assert.Equal(t, newMAC, net.HardwareAddr(got))
	cshow := vmrig.Obj(t, vmrig.VdpaJSON(t, "dev", "config", "show", "vdpa-cfgw"), "config", "vdpa-cfgw")
	assert.Equal(t, newMAC.String(), cshow["mac"])
	assert.ErrorIs(t, dev.WriteConfig(virtio.NetCfgMAC, make([]byte, 64)), kernel.ErrConfigRange)

	ev := vmrig.NewEventFD(t)
	require.NoError(t, dev.SetConfigCall(ev))
	require.NoError(t, dev.SetConfigCall(nil))
}

// The queue size and virtqueue group limits are checked against the
// device's own: vdpa_sim_net's queues hold at most 256 entries (the kernel
// itself only checks for a power of two), and its groups are numbered below
// VHOST_VDPA_GET_GROUP_NUM (the kernel answers ENOBUFS past them). Both
// errors are typed, the size one as vdpa.NewLocal's.
func TestQueueSizeAndGroupAreCheckedAgainstTheDevice(t *testing.T) {
	path := vmrig.AddSimNet(t, "vdpa-limits", "mac", simMAC.String())
	dev, err := kernel.Open(path, nil)
	require.NoError(t, err)
	defer dev.Close()

	maxSize, err := dev.MaxQueueSize()
	require.NoError(t, err)
	require.Equal(t, uint16(256), maxSize, "vdpa_sim_net's queue size")
	require.NoError(t, dev.SetQueueNum(0, maxSize), "the maximum itself")
	err = dev.SetQueueNum(0, 2*maxSize)
	assert.ErrorIs(t, err, vdpa.ErrBadQueue, "twice the maximum")
	assert.ErrorIs(t, err, kernel.ErrQueueLayout)

	groups, err := dev.NumGroups()
	require.NoError(t, err)
	require.Positive(t, groups)
	require.True(t, dev.BackendFeatures().Has(kernel.BackendIOTLBASID), "vdpa_sim offers IOTLB_ASID")
	require.NoError(t, dev.SetGroupASID(uint32(groups-1), 0), "the last group")
	for _, g := range []uint32{uint32(groups), uint32(groups) + 1, ^uint32(0)} {
		err := dev.SetGroupASID(g, 0)
		assert.ErrorIs(t, err, kernel.ErrGroupIndex, "group %d of %d", g, groups)
		assert.NotErrorIs(t, err, unix.ENOBUFS, "checked before the kernel")
	}
}
