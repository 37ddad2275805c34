package softnet_test

import (
	"net"
	"net/netip"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

func serialize(t *testing.T, ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...))
	return buf.Bytes()
}

func TestResponderARPAndEcho(t *testing.T) {
	peerMAC := [6]byte{0x02, 0xee, 0, 0, 0, 1}
	peerIP := netip.MustParseAddr("192.0.2.1")
	r, err := softnet.NewResponder(peerMAC, peerIP)
	require.NoError(t, err)
	s := newStack(t, stackOptions{features: base, dev: softnet.Options{Handler: r}})
	s.postRx(0, 8, 2048)
	me := s.dev.MAC()
	myIP := net.IP{192, 0, 2, 2}

	// ARP who-has 192.0.2.1.
	s.send(1, serialize(t,
		&layers.Ethernet{SrcMAC: me[:], DstMAC: bcast[:], EthernetType: layers.EthernetTypeARP},
		&layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: me[:], SourceProtAddress: myIP,
			DstHwAddress: make([]byte, 6), DstProtAddress: peerIP.AsSlice()}))
	_, got := s.recvFrame(0)
	p := gopacket.NewPacket(got, layers.LayerTypeEthernet, gopacket.Default)
	arp, ok := p.Layer(layers.LayerTypeARP).(*layers.ARP)
	require.True(t, ok, "reply is ARP")
	assert.Equal(t, uint16(layers.ARPReply), arp.Operation)
	assert.Equal(t, peerMAC[:], arp.SourceHwAddress)
	assert.Equal(t, peerIP.AsSlice(), arp.SourceProtAddress)
	assert.Equal(t, me[:], arp.DstHwAddress)
	assert.Equal(t, []byte(myIP), arp.DstProtAddress)

	// ICMP echo request to the peer.
	payload := []byte("vdpakit ping payload")
	s.send(1, serialize(t,
		&layers.Ethernet{SrcMAC: me[:], DstMAC: peerMAC[:], EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: myIP, DstIP: peerIP.AsSlice()},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 0x1234, Seq: 7},
		gopacket.Payload(payload)))
	_, got = s.recvFrame(0)
	p = gopacket.NewPacket(got, layers.LayerTypeEthernet, gopacket.Default)
	require.Nil(t, p.ErrorLayer())
	ip, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	require.True(t, ok)
	assert.Equal(t, peerIP.AsSlice(), []byte(ip.SrcIP.To4()))
	assert.Equal(t, []byte(myIP), []byte(ip.DstIP.To4()))
	icmp, ok := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	require.True(t, ok)
	assert.Equal(t, uint8(layers.ICMPv4TypeEchoReply), icmp.TypeCode.Type())
	assert.Equal(t, uint16(0x1234), icmp.Id)
	assert.Equal(t, uint16(7), icmp.Seq)
	assert.Equal(t, payload, icmp.Payload)
	// The checksums gopacket verifies on decode are not checked by default:
	// recompute them from the received bytes.
	re := serialize(t, &layers.Ethernet{SrcMAC: peerMAC[:], DstMAC: me[:], EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: ip.SrcIP, DstIP: ip.DstIP, Id: ip.Id, Flags: ip.Flags},
		&layers.ICMPv4{TypeCode: icmp.TypeCode, Id: icmp.Id, Seq: icmp.Seq}, gopacket.Payload(payload))
	assert.Equal(t, re, got, "reply carries correct IPv4 and ICMP checksums")

	// Not for the peer: ignored.
	s.send(1, frame(peerMAC, 1, 20))
	s.waitN(1, 3)
	assert.Equal(t, softnet.ResponderStats{ARPReplies: 1, EchoReplies: 1, Ignored: 1}, r.Stats())
	assert.Equal(t, uint64(2), s.dev.Stats().Rx().Frames)
}

func TestResponderRejectsBadConfig(t *testing.T) {
	_, err := softnet.NewResponder([6]byte{2}, netip.MustParseAddr("::1"))
	assert.Error(t, err)
	_, err = softnet.NewResponder([6]byte{1}, netip.MustParseAddr("10.0.0.1"))
	assert.Error(t, err)
}
