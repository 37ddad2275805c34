package netreply

import (
	"encoding/binary"
	"net"
	"os/exec"
	"strings"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	hostMAC  = [6]byte{0x02, 0xee, 0, 0, 0, 1}
	hostIP   = [4]byte{192, 0, 2, 1}
	guestMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x10}
	guestIP  = net.IP{192, 0, 2, 2}
)

func serialize(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...))
	return append([]byte(nil), buf.Bytes()...)
}

func arpRequest(t testing.TB, target [4]byte) []byte {
	return serialize(t,
		&layers.Ethernet{SrcMAC: guestMAC, DstMAC: layers.EthernetBroadcast, EthernetType: layers.EthernetTypeARP},
		&layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
			Operation: layers.ARPRequest, SourceHwAddress: guestMAC, SourceProtAddress: guestIP,
			DstHwAddress: make([]byte, 6), DstProtAddress: target[:]})
}

func echoRequest(t testing.TB, payload []byte) []byte {
	return serialize(t,
		&layers.Ethernet{SrcMAC: guestMAC, DstMAC: hostMAC[:], EthernetType: layers.EthernetTypeIPv4},
		&layers.IPv4{Version: 4, IHL: 5, TTL: 63, Protocol: layers.IPProtocolICMPv4, SrcIP: guestIP, DstIP: hostIP[:], Id: 0x4242,
			Flags: layers.IPv4DontFragment},
		&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 0x1234, Seq: 7},
		gopacket.Payload(payload))
}

func TestARPRequestGetsReply(t *testing.T) {
	prefix := []byte("kept")
	rep, k := Append(append([]byte(nil), prefix...), hostMAC, hostIP, arpRequest(t, hostIP))
	require.Equal(t, ARP, k)
	require.Equal(t, prefix, rep[:4], "Append appends")
	p := gopacket.NewPacket(rep[4:], layers.LayerTypeEthernet, gopacket.Default)
	require.Nil(t, p.ErrorLayer())
	eth := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	assert.Equal(t, guestMAC, eth.DstMAC)
	assert.Equal(t, net.HardwareAddr(hostMAC[:]), eth.SrcMAC)
	arp := p.Layer(layers.LayerTypeARP).(*layers.ARP)
	assert.Equal(t, uint16(layers.ARPReply), arp.Operation)
	assert.Equal(t, layers.LinkTypeEthernet, arp.AddrType)
	assert.Equal(t, layers.EthernetTypeIPv4, arp.Protocol)
	assert.Equal(t, hostMAC[:], arp.SourceHwAddress)
	assert.Equal(t, hostIP[:], arp.SourceProtAddress)
	assert.Equal(t, []byte(guestMAC), arp.DstHwAddress)
	assert.Equal(t, []byte(guestIP), arp.DstProtAddress)
}

func TestEchoRequestGetsReply(t *testing.T) {
	for _, payload := range [][]byte{nil, []byte("x"), []byte("vdpakit ping payload"), make([]byte, 1472)} {
		rep, k := Append(nil, hostMAC, hostIP, echoRequest(t, payload))
		require.Equal(t, Echo, k)
		p := gopacket.NewPacket(rep, layers.LayerTypeEthernet, gopacket.Default)
		require.Nil(t, p.ErrorLayer())
		eth := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
		assert.Equal(t, guestMAC, eth.DstMAC)
		assert.Equal(t, net.HardwareAddr(hostMAC[:]), eth.SrcMAC)
		ip := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		icmp := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
		assert.Equal(t, uint8(layers.ICMPv4TypeEchoReply), icmp.TypeCode.Type())
		assert.Equal(t, uint16(0x1234), icmp.Id)
		assert.Equal(t, uint16(7), icmp.Seq)
		assert.Equal(t, len(payload), len(icmp.Payload))
		// The exact reply, checksums included, as gopacket builds it.
		want := serialize(t,
			&layers.Ethernet{SrcMAC: hostMAC[:], DstMAC: guestMAC, EthernetType: layers.EthernetTypeIPv4},
			&layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: hostIP[:], DstIP: guestIP, Id: 0x4242},
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoReply, 0), Id: 0x1234, Seq: 7},
			gopacket.Payload(payload))
		assert.Equal(t, want, rep, "payload %d bytes", len(payload))
		assert.Equal(t, ip.Checksum, binary.BigEndian.Uint16(want[14+10:]))
	}
}

// Everything that is not a well-formed request for this host is ignored,
// and never read past the frame.
func TestNotARequestForThisHost(t *testing.T) {
	arp := arpRequest(t, hostIP)
	echo := echoRequest(t, []byte("ping"))
	mut := func(b []byte, f func(b []byte)) []byte {
		c := append([]byte(nil), b...)
		f(c)
		return c
	}
	be := binary.BigEndian
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"empty", nil},
		{"shorter than an Ethernet header", arp[:13]},
		{"unknown ethertype", mut(arp, func(b []byte) { be.PutUint16(b[12:], 0x86dd) })},
		{"ARP for another address", arpRequest(t, [4]byte{192, 0, 2, 9})},
		{"ARP truncated", arp[:14+27]},
		{"ARP reply", mut(arp, func(b []byte) { be.PutUint16(b[14+6:], 2) })},
		{"ARP not Ethernet", mut(arp, func(b []byte) { be.PutUint16(b[14:], 6) })},
		{"ARP not IPv4", mut(arp, func(b []byte) { be.PutUint16(b[14+2:], 0x86dd) })},
		{"ARP hardware size not 6", mut(arp, func(b []byte) { b[14+4] = 8 })},
		{"ARP protocol size not 4", mut(arp, func(b []byte) { b[14+5] = 16 })},
		{"echo to another MAC", mut(echo, func(b []byte) { b[5] ^= 1 })},
		{"echo to another IP", mut(echo, func(b []byte) { b[14+19] = 9 })},
		{"IPv6 version", mut(echo, func(b []byte) { b[14] = 0x65 })},
		{"IHL below 5", mut(echo, func(b []byte) { b[14] = 0x44 })},
		{"IHL past the packet", mut(echo, func(b []byte) { b[14] = 0x4f })},
		{"total length past the frame", mut(echo, func(b []byte) { be.PutUint16(b[14+2:], uint16(len(b))) })},
		{"total length shorter than ICMP header", mut(echo, func(b []byte) { be.PutUint16(b[14+2:], 27) })},
		{"IP truncated", echo[:14+19]},
		{"not ICMP", mut(echo, func(b []byte) { b[14+9] = 17 })},
		{"more fragments", mut(echo, func(b []byte) { b[14+6] |= 0x20 })},
		{"fragment offset", mut(echo, func(b []byte) { b[14+7] = 1 })},
		{"echo reply", mut(echo, func(b []byte) { b[14+20] = 0 })},
		{"echo request with a code", mut(echo, func(b []byte) { b[14+21] = 1 })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := []byte("x")
			got, k := Append(dst, hostMAC, hostIP, tc.frame)
			assert.Equal(t, None, k)
			assert.Equal(t, dst, got)
		})
	}
}

// Ethernet padding of a short echo request is not echoed.
func TestEchoIgnoresEthernetPadding(t *testing.T) {
	echo := echoRequest(t, []byte("hi"))
	padded := append(append([]byte(nil), echo...), make([]byte, 60-len(echo))...)
	a, k := Append(nil, hostMAC, hostIP, echo)
	require.Equal(t, Echo, k)
	b, k := Append(nil, hostMAC, hostIP, padded)
	require.Equal(t, Echo, k)
	assert.Equal(t, a, b)
}

func TestAppendAllocatesNothingWithRoom(t *testing.T) {
	arp, echo := arpRequest(t, hostIP), echoRequest(t, make([]byte, 1000))
	buf := make([]byte, 0, 2048)
	allocs := testing.AllocsPerRun(100, func() {
		buf, _ = Append(buf[:0], hostMAC, hostIP, arp)
		buf, _ = Append(buf[:0], hostMAC, hostIP, echo)
	})
	assert.Zero(t, allocs)
}

func TestChecksum(t *testing.T) {
	// RFC 1071 §3's example: the sum of 0001 f203 f4f5 f6f7 is ddf2.
	assert.Equal(t, ^uint16(0xddf2), Checksum([]byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}))
	assert.Equal(t, ^uint16(0x0100), Checksum([]byte{0x01}), "odd length pads with zero")
	assert.Equal(t, uint16(0xffff), Checksum(nil))
}

// The library's responder does not bring a packet library into programs
// that use it: gopacket is for tests only.
func TestLibraryDoesNotImportGopacket(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("needs the go command")
	}
	for _, pkg := range []string{"github.com/vdpakit/vdpakit/vdpa/softnet", "github.com/vdpakit/vdpakit/internal/netreply"} {
		out, err := exec.Command("go", "list", "-deps", pkg).CombinedOutput()
		require.NoError(t, err, "%s", out)
		for _, dep := range strings.Fields(string(out)) {
			assert.False(t, strings.HasPrefix(dep, "github.com/google/gopacket"), "%s imports %s", pkg, dep)
		}
	}
}
