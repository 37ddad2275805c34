package softnet

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
)

// Responder is a FrameHandler that plays a host on the other end of the
// link: it answers ARP requests for IP with MAC and ICMP echo requests
// addressed to MAC and IP with echo replies. Every other frame is ignored
// (counted in Ignored). It is safe for use by many queue pairs at once.
type Responder struct {
	mac net.HardwareAddr
	ip  netip.Addr

	mu     sync.Mutex // guards the parser and the serialize buffer
	eth    layers.Ethernet
	arp    layers.ARP
	ip4    layers.IPv4
	icmp   layers.ICMPv4
	pl     gopacket.Payload
	parser *gopacket.DecodingLayerParser
	types  []gopacket.LayerType
	buf    gopacket.SerializeBuffer

	arpReplies  atomic.Uint64
	echoReplies atomic.Uint64
	ignored     atomic.Uint64
}

// NewResponder returns a responder for the IPv4 address ip at mac.
func NewResponder(mac [6]byte, ip netip.Addr) (*Responder, error) {
	if !ip.Is4() {
		return nil, fmt.Errorf("softnet: responder address %v is not IPv4", ip)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("softnet: responder MAC %x is multicast", mac)
	}
	r := &Responder{mac: net.HardwareAddr(mac[:]), ip: ip, buf: gopacket.NewSerializeBuffer()}
	r.parser = gopacket.NewDecodingLayerParser(layers.LayerTypeEthernet, &r.eth, &r.arp, &r.ip4, &r.icmp, &r.pl)
	r.parser.IgnoreUnsupported = true
	return r, nil
}

// ResponderStats counts what a Responder did.
type ResponderStats struct {
	ARPReplies, EchoReplies, Ignored uint64
}

// Stats returns the responder's counters.
func (r *Responder) Stats() ResponderStats {
	return ResponderStats{ARPReplies: r.arpReplies.Load(), EchoReplies: r.echoReplies.Load(), Ignored: r.ignored.Load()}
}

// HandleFrame implements FrameHandler.
func (r *Responder) HandleFrame(tx *Tx, frame []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.parser.DecodeLayers(frame, &r.types); err != nil {
		r.ignored.Add(1)
		return
	}
	var reply []byte
	switch {
	case r.has(layers.LayerTypeARP):
		reply = r.arpReply()
		if reply != nil {
			r.arpReplies.Add(1)
		}
	case r.has(layers.LayerTypeICMPv4):
		reply = r.echoReply()
		if reply != nil {
			r.echoReplies.Add(1)
		}
	}
	if reply == nil {
		r.ignored.Add(1)
		return
	}
	_ = tx.Reply(reply)
}

func (r *Responder) has(t gopacket.LayerType) bool {
	for _, x := range r.types {
		if x == t {
			return true
		}
	}
	return false
}

func (r *Responder) arpReply() []byte {
	a := &r.arp
	if a.Operation != layers.ARPRequest || a.AddrType != layers.LinkTypeEthernet ||
		a.Protocol != layers.EthernetTypeIPv4 || len(a.DstProtAddress) != 4 || len(a.SourceHwAddress) != 6 {
		return nil
	}
	if netip.AddrFrom4([4]byte(a.DstProtAddress)) != r.ip {
		return nil
	}
	eth := layers.Ethernet{SrcMAC: r.mac, DstMAC: net.HardwareAddr(a.SourceHwAddress), EthernetType: layers.EthernetTypeARP}
	ip := r.ip.As4()
	rep := layers.ARP{
		AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4,
		HwAddressSize: 6, ProtAddressSize: 4, Operation: layers.ARPReply,
		SourceHwAddress: r.mac, SourceProtAddress: ip[:],
		DstHwAddress: a.SourceHwAddress, DstProtAddress: a.SourceProtAddress,
	}
	return r.serialize(&eth, &rep)
}

func (r *Responder) echoReply() []byte {
	if string(r.eth.DstMAC) != string(r.mac) || r.icmp.TypeCode.Type() != layers.ICMPv4TypeEchoRequest {
		return nil
	}
	if dst, ok := netip.AddrFromSlice(r.ip4.DstIP.To4()); !ok || dst != r.ip {
		return nil
	}
	eth := layers.Ethernet{SrcMAC: r.mac, DstMAC: r.eth.SrcMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolICMPv4,
		SrcIP: r.ip4.DstIP, DstIP: r.ip4.SrcIP, Id: r.ip4.Id}
	icmp := layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoReply, 0),
		Id: r.icmp.Id, Seq: r.icmp.Seq}
	return r.serialize(&eth, &ip, &icmp, gopacket.Payload(r.icmp.Payload))
}

func (r *Responder) serialize(ls ...gopacket.SerializableLayer) []byte {
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(r.buf, opts, ls...); err != nil {
		return nil
	}
	return r.buf.Bytes()
}
