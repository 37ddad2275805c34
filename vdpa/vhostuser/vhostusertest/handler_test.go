package vhostusertest

import (
	"net"
	"runtime"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

var (
	devMAC  = [6]byte{2, 0, 0, 0, 0, 1}
	peerMAC = net.HardwareAddr{2, 0, 0, 0, 0, 2}
	devIP   = net.IP{10, 0, 0, 1}
	peerIP  = net.IP{10, 0, 0, 2}
)

func serialize(t *testing.T, ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...))
	return buf.Bytes()
}

func newResponder() *Handler {
	h := New(Responder, devMAC)
	h.SetIPv4([4]byte(devIP))
	return h
}

// RFC 826: a request for our address gets a reply with our hardware address,
// sent to the requester.
func TestResponderAnswersARPRequest(t *testing.T) {
	req := serialize(t,
		&layers.Ethernet{SrcMAC: peerMAC, DstMAC: layers.EthernetBroadcast, EthernetType: layers.EthernetTypeARP},
		&layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: peerMAC, SourceProtAddress: peerIP,
			DstHwAddress: make([]byte, 6), DstProtAddress: devIP})
	rep := newResponder().respond(req)
	require.NotNil(t, rep)
	p := gopacket.NewPacket(rep, layers.LayerTypeEthernet, gopacket.Default)
	eth := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	assert.Equal(t, peerMAC, eth.DstMAC)
	assert.Equal(t, net.HardwareAddr(devMAC[:]), eth.SrcMAC)
	arp := p.Layer(layers.LayerTypeARP).(*layers.ARP)
	assert.Equal(t, uint16(layers.ARPReply), arp.Operation)
	assert.Equal(t, []byte(devMAC[:]), arp.SourceHwAddress)
	assert.Equal(t, []byte(devIP), arp.SourceProtAddress)
	assert.Equal(t, []byte(peerMAC), arp.DstHwAddress)
	assert.Equal(t, []byte(peerIP), arp.DstProtAddress)

	// A request for another address is not answered.
	other := append([]byte(nil), req...)
	other[14+24+3] = 99
	assert.Nil(t, newResponder().respond(other))
}

// RFC 792: an echo request to our address gets an echo reply with the same
// identifier, sequence and data, and valid IPv4 and ICMP checksums.
func TestResponderAnswersICMPEcho(t *testing.T) {
	payload := []byte("vdpakit ping payload")
	req := serialize(t,
		&layers.Ethernet{SrcMAC: peerMAC, DstMAC: net.HardwareAddr(devMAC[:]), EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: peerIP, DstIP: devIP, Id: 7},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 0x1234, Seq: 9},
		gopacket.Payload(payload))
	rep := newResponder().respond(req)
	require.NotNil(t, rep)
	p := gopacket.NewPacket(rep, layers.LayerTypeEthernet, gopacket.Default)
	require.Nil(t, p.ErrorLayer())
	ip := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	assert.Equal(t, devIP.To4(), ip.SrcIP.To4())
	assert.Equal(t, peerIP.To4(), ip.DstIP.To4())
	icmp := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	assert.Equal(t, uint8(layers.ICMPv4TypeEchoReply), icmp.TypeCode.Type())
	assert.Equal(t, uint16(0x1234), icmp.Id)
	assert.Equal(t, uint16(9), icmp.Seq)
	assert.Equal(t, payload, icmp.Payload)

	// Checksums: a correct header sums to 0xffff (folded to zero here).
	ipHdr := rep[14 : 14+20]
	assert.Equal(t, uint16(0), checksumOK(ipHdr), "IPv4 header checksum")
	assert.Equal(t, uint16(0), checksumOK(rep[14+20:]), "ICMP checksum")

	// Not for us: no reply.
	ip2 := serialize(t,
		&layers.Ethernet{SrcMAC: peerMAC, DstMAC: net.HardwareAddr(devMAC[:]), EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: peerIP, DstIP: net.IP{10, 0, 0, 9}},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0)})
	assert.Nil(t, newResponder().respond(ip2))
}

// checksumOK folds the one's-complement sum over b: zero when b carries a
// correct Internet checksum (an independent check, RFC 1071 §1).
func checksumOK(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// newTxWorker builds a worker over an in-process transmit queue, with the
// driver side to feed it.
func newTxWorker(t testing.TB, mode Mode) (*worker, *vring.DriverQueue, *vring.DeviceQueue) {
	reg, err := vring.NewMemfdRegion(0, 1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	l := vring.ContiguousLayout(0, 256)
	f := virtio.Features(0).With(virtio.FVersion1)
	drv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: 1, Layout: l, Features: f})
	require.NoError(t, err)
	dev, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: 1, Layout: l, Features: f})
	require.NoError(t, err)
	h := New(mode, devMAC)
	w := &worker{h: h, tx: &queue{dq: dev}, hdrLen: 12, wake: make(chan struct{}, 1)}
	return w, drv, dev
}

// The transmit path (pop a burst, count, publish with one used.idx store)
// allocates nothing.
func TestSinkTransmitPathAllocatesNothing(t *testing.T) {
	w, drv, _ := newTxWorker(t, Sink)
	burst := func() {
		for i := 0; i < 32; i++ {
			if _, err := drv.Add([]vring.Buffer{{Addr: vring.GuestAddr(0x10000 + i*128), Len: 76}}); err != nil {
				t.Fatal(err)
			}
		}
		drv.Publish()
		if n := w.poll(); n != 32 {
			t.Fatalf("polled %d", n)
		}
		for i := 0; i < 32; i++ {
			if _, _, ok, err := drv.Reclaim(); !ok || err != nil {
				t.Fatalf("reclaim %d: %v %v", i, ok, err)
			}
		}
	}
	allocs := testing.AllocsPerRun(100, burst)
	assert.Zero(t, allocs)
	assert.Equal(t, uint64(101*32), w.h.Counters().TxFrames)
}

func BenchmarkSinkTransmit(b *testing.B) {
	w, drv, _ := newTxWorker(b, Sink)
	bufs := make([][]vring.Buffer, 32)
	for i := range bufs {
		bufs[i] = []vring.Buffer{{Addr: vring.GuestAddr(0x10000 + i*128), Len: 76}}
	}
	b.ReportAllocs()
	for b.Loop() {
		for i := 0; i < 32; i++ {
			_, _ = drv.Add(bufs[i])
		}
		drv.Publish()
		w.poll()
		for i := 0; i < 32; i++ {
			_, _, _, _ = drv.Reclaim()
		}
	}
	b.ReportMetric(float64(b.N*32)/b.Elapsed().Seconds()/1e6, "Mframes/s")
}

// TestResponderBoundsPendingReplies: a peer that transmits echo requests
// and never starts its receive queue gets MaxPendingReplies replies kept
// for when it does and the rest dropped and counted, not queued without
// bound (each reply copies its request's payload).
func TestResponderBoundsPendingReplies(t *testing.T) {
	const frames = 3 * MaxPendingReplies
	f := virtio.Features(0).With(virtio.FVersion1)
	h := newResponder()
	drv := startTxOnly(t, h, f, 256)

	req := serialize(t,
		&layers.Ethernet{SrcMAC: peerMAC, DstMAC: net.HardwareAddr(devMAC[:]), EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: peerIP, DstIP: devIP},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 1},
		gopacket.Payload(make([]byte, 1400)))
	hdr := make([]byte, virtio.NetHdrLen(f))
	for sent := 0; sent < frames; {
		// Keep the ring from filling: reclaim what the device returned.
		for {
			_, ok, err := drv.Receive()
			require.NoError(t, err)
			if !ok {
				break
			}
		}
		if _, err := drv.Add([][]byte{hdr, req}, nil); err != nil {
			runtime.Gosched()
			continue
		}
		drv.Queue.Publish()
		sent++
	}
	waitFor(t, func() bool { return h.Counters().TxFrames == frames })
	c := h.Counters()
	assert.EqualValues(t, frames-MaxPendingReplies, c.RxDropped, "replies beyond MaxPendingReplies")
	assert.Zero(t, c.RxFrames, "no receive queue")
}
