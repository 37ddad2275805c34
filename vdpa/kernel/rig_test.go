package kernel_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// addSim adds a vdpa_sim_net device (deleted when the test ends) and
// returns its /dev/vhost-vdpa-N. It runs only inside the real-kernel
// harness.
func addSim(t *testing.T, name string, args ...string) string {
	t.Helper()
	testenv.RequireVM(t)
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vhost_vdpa")
	testenv.RequireModule(t, "vdpa_sim_net")
	testenv.AddVDPA(t, name, "vdpasim_net", args...)
	return testenv.VhostVDPAPath(t, name)
}

// vdpaJSON runs iproute2's `vdpa -j ARGS...` and decodes its output. Keys
// are trimmed: iproute2 6.1 prints "link " and "link_announce " with a
// trailing space.
func vdpaJSON(t *testing.T, args ...string) map[string]any {
	t.Helper()
	out := testenv.Command(t, "vdpa", append([]string{"-j"}, args...)...)
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &v), "vdpa -j %s: %s", strings.Join(args, " "), out)
	return trimKeys(v).(map[string]any)
}

func trimKeys(v any) any {
	switch x := v.(type) {
	case map[string]any:
		m := map[string]any{}
		for k, e := range x {
			m[strings.TrimSpace(k)] = trimKeys(e)
		}
		return m
	case []any:
		for i := range x {
			x[i] = trimKeys(x[i])
		}
	}
	return v
}

// obj walks nested JSON objects by key.
func obj(t *testing.T, v map[string]any, keys ...string) map[string]any {
	t.Helper()
	for _, k := range keys {
		n, ok := v[k].(map[string]any)
		require.True(t, ok, "no object %q in %v", k, v)
		v = n
	}
	return v
}

// iproute2FeatureBits are the names iproute2's vdpa tool prints for feature
// bits (vdpa/vdpa.c: net_feature_strs and ext_feature_strs), with "bit_N"
// for the rest.
var iproute2FeatureBits = map[string]uint{
	"CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5, "GUEST_TSO4": 7,
	"GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11, "HOST_TSO6": 12, "HOST_ECN": 13,
	"HOST_UFO": 14, "MRG_RXBUF": 15, "STATUS": 16, "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19,
	"CTRL_RX_EXTRA": 20, "GUEST_ANNOUNCE": 21, "MQ": 22, "CTRL_MAC_ADDR": 23, "NOTIFY_ON_EMPTY": 24,
	"ANY_LAYOUT": 27, "RING_INDIRECT_DESC": 28, "RING_EVENT_IDX": 29, "VERSION_1": 32,
	"ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35, "ORDER_PLATFORM": 36, "SR_IOV": 37,
	"NOTIFICATION_DATA": 38, "RSC_EXT": 61, "STANDBY": 62, "SPEED_DUPLEX": 63, "HASH_REPORT": 57, "RSS": 60,
}

// featureList decodes an iproute2 feature-name array into a bitmask.
func featureList(t *testing.T, v any) virtio.Features {
	t.Helper()
	list, ok := v.([]any)
	require.True(t, ok, "feature list %v", v)
	var f virtio.Features
	for _, e := range list {
		s := strings.TrimSpace(e.(string))
		if b, ok := iproute2FeatureBits[s]; ok {
			f |= 1 << b
			continue
		}
		var n uint
		_, err := fmt.Sscanf(s, "bit_%d", &n)
		require.NoError(t, err, "unknown feature name %q", s)
		f |= 1 << n
	}
	return f
}

const (
	memBase   = vring.GuestAddr(0x4000_0000)
	memSize   = 4 << 20
	qsize     = 64
	bufSize   = 2048
	rxRing    = memBase
	txRing    = memBase + 0x10000
	rxBufBase = memBase + 0x100000
	txBufBase = memBase + 0x200000
	hdrLen    = virtio.NetHdrSize
	rxQ, txQ  = 0, 1
)

// rig drives a vdpa_sim_net device's rx and tx queues with the library's
// driver-side rings.
type rig struct {
	t    *testing.T
	dev  *kernel.Device
	mem  *vring.Memory
	q    [2]*vring.DriverQueue
	kick [2]*vdpa.EventFD
	call [2]*vdpa.EventFD
	bufs [2]map[uint16]vring.GuestAddr // head -> buffer
	free [2][]int                      // free buffer slots
}

func newRig(t *testing.T, path string, opts *kernel.Options, want virtio.Features) *rig {
	t.Helper()
	return newRigWith(t, path, opts, want, nil)
}

// newRigWith is newRig with a hook that runs after the rx and tx queues are
// set up and before DRIVER_OK (vhost-vdpa refuses ring addresses after it).
func newRigWith(t *testing.T, path string, opts *kernel.Options, want virtio.Features, beforeDriverOK func(*rig)) *rig {
	t.Helper()
	dev, err := kernel.Open(path, opts)
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	_, err = dev.Negotiate(want)
	require.NoError(t, err)

	reg, err := vring.NewMemfdRegion(memBase, memSize, &vring.RegionOptions{Name: "vdpakit-test"})
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	require.NoError(t, dev.SetMemory(mem))

	r := &rig{t: t, dev: dev, mem: mem}
	for i := range 2 {
		r.kick[i] = newEventFD(t)
		r.call[i] = newEventFD(t)
		r.bufs[i] = map[uint16]vring.GuestAddr{}
		for s := range qsize {
			r.free[i] = append(r.free[i], s)
		}
	}
	r.setupQueues(vdpa.QueueState{}, vdpa.QueueState{})
	if beforeDriverOK != nil {
		beforeDriverOK(r)
	}
	require.NoError(t, dev.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	return r
}

// setupQueues (re)creates the driver rings and programs the device.
func (r *rig) setupQueues(rx, tx vdpa.QueueState) {
	for i, base := range []vring.GuestAddr{rxRing, txRing} {
		l := vring.ContiguousLayout(base, qsize)
		dq, err := vring.NewDriverQueue(r.mem, vring.DriverQueueOptions{Index: i, Layout: l, Features: virtio.Features(0).With(virtio.FVersion1)})
		require.NoError(r.t, err)
		r.q[i] = dq
		st := []vdpa.QueueState{rx, tx}[i]
		require.NoError(r.t, r.dev.SetupQueue(i, l, st, r.kick[i], r.call[i]))
	}
}

func newEventFD(t *testing.T) *vdpa.EventFD {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { e.Close() })
	return e
}

// slot takes a free buffer slot of queue q.
func (r *rig) slot(q int) vring.GuestAddr {
	n := len(r.free[q])
	require.Positive(r.t, n, "queue %d has no free buffer slot", q)
	s := r.free[q][n-1]
	r.free[q] = r.free[q][:n-1]
	return []vring.GuestAddr{rxBufBase, txBufBase}[q] + vring.GuestAddr(s*bufSize)
}

// postRx adds n device-writable receive buffers and kicks.
func (r *rig) postRx(n int) {
	for range n {
		addr := r.slot(rxQ)
		head, err := r.q[rxQ].Add([]vring.Buffer{{Addr: addr, Len: bufSize, Writable: true}})
		require.NoError(r.t, err)
		r.bufs[rxQ][head] = addr
	}
	r.q[rxQ].Publish()
	if r.q[rxQ].NeedsKick() {
		require.NoError(r.t, r.kick[rxQ].Signal())
	}
}

// send writes each frame behind a zero virtio-net header into a transmit
// buffer, publishes them and kicks. It returns the bytes the device reads.
func (r *rig) send(frames ...[]byte) [][]byte {
	var out [][]byte
	for _, f := range frames {
		pkt := append(make([]byte, hdrLen), f...)
		addr := r.slot(txQ)
		require.NoError(r.t, r.mem.Write(addr, pkt))
		head, err := r.q[txQ].Add([]vring.Buffer{{Addr: addr, Len: uint32(len(pkt))}})
		require.NoError(r.t, err)
		r.bufs[txQ][head] = addr
		out = append(out, pkt)
	}
	r.q[txQ].Publish()
	if r.q[txQ].NeedsKick() {
		require.NoError(r.t, r.kick[txQ].Signal())
	}
	return out
}

// reclaim waits for n used entries on queue q and returns the bytes the
// device reported for each (rx: what it wrote; tx: nothing).
func (r *rig) reclaim(q, n int) [][]byte {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out [][]byte
	for len(out) < n {
		head, length, ok, err := r.q[q].Reclaim()
		require.NoError(r.t, err)
		if !ok {
			_, err := r.call[q].Wait(ctx)
			require.NoError(r.t, err, "waiting for %d used entries on queue %d, have %d", n, q, len(out))
			continue
		}
		addr, known := r.bufs[q][head]
		require.True(r.t, known, "queue %d: used head %d was never added", q, head)
		delete(r.bufs[q], head)
		r.free[q] = append(r.free[q], int(addr-[]vring.GuestAddr{rxBufBase, txBufBase}[q])/bufSize)
		b := make([]byte, length)
		if q == rxQ {
			require.LessOrEqual(r.t, length, uint32(bufSize))
			require.NoError(r.t, r.mem.Read(addr, b))
		}
		out = append(out, b)
	}
	return out
}

// usedIdx reads queue q's used.idx from guest memory.
func (r *rig) usedIdx(q int) uint16 {
	base := []vring.GuestAddr{rxRing, txRing}[q]
	l := vring.ContiguousLayout(base, qsize)
	var b [2]byte
	require.NoError(r.t, r.mem.Read(l.Used+2, b[:]))
	return uint16(b[0]) | uint16(b[1])<<8
}

// udpFrame builds an Ethernet/IPv4/UDP frame with gopacket.
func udpFrame(t *testing.T, dst, src net.HardwareAddr, seq int) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP,
		SrcIP: net.IPv4(192, 0, 2, 1), DstIP: net.IPv4(192, 0, 2, 2), Id: uint16(seq)}
	udp := &layers.UDP{SrcPort: 4000, DstPort: layers.UDPPort(5000 + seq)}
	require.NoError(t, udp.SetNetworkLayerForChecksum(ip))
	payload := make([]byte, 64+seq*7)
	for i := range payload {
		payload[i] = byte(seq*31 + i)
	}
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		eth, ip, udp, gopacket.Payload(payload)))
	return buf.Bytes()
}
