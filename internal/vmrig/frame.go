package vmrig

import (
	"net"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/require"
)

// UDPFrame builds an Ethernet/IPv4/UDP frame from src to dst with
// gopacket. seq makes it distinct: IP id, destination port, payload length
// (64+7·seq bytes) and contents all follow from it.
func UDPFrame(t testing.TB, dst, src net.HardwareAddr, seq int) []byte {
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
