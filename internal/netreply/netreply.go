// Package netreply answers the two requests a host on the far end of a
// virtual link must answer for a guest to reach it: ARP requests (RFC 826)
// for its IPv4 address and ICMP echo requests (RFC 792) to it. It is the one
// responder behind softnet.Responder and vhostusertest's Responder mode.
//
// It parses and builds frames by hand, with no dependency and no
// allocation (Append writes into the caller's buffer), so library users do
// not pay for a packet library; the tests check it against gopacket.
package netreply

import "encoding/binary"

// Kind is what Append answered.
type Kind uint8

const (
	None Kind = iota // not a request for this host: no reply
	ARP              // an ARP reply
	Echo             // an ICMP echo reply
)

const (
	ethLen      = 14
	arpLen      = 28
	etherIPv4   = 0x0800
	etherARP    = 0x0806
	protoICMP   = 1
	icmpEchoReq = 8
	icmpEchoRep = 0
	ipFlagMF    = 0x2000
	ipOffMask   = 0x1fff
	replyTTL    = 64
	// minFrame is the shortest Ethernet frame (without its FCS): shorter
	// replies are zero-padded to it, as a host's NIC pads them.
	minFrame = 60
)

// Append appends to dst the reply of the host at mac and ip to the Ethernet
// frame (without a virtio-net header) and reports what it is:
//
//   - an ARP request (Ethernet/IPv4, hardware size 6, protocol size 4) for ip
//     gets an ARP reply from mac/ip to the requester's hardware and protocol
//     addresses;
//   - an ICMP echo request in an unfragmented IPv4 packet addressed to mac
//     and ip gets an echo reply with the same identifier, sequence number
//     and data, in an IPv4 packet without options (TTL 64, the request's
//     identification), both checksums computed.
//
// Replies shorter than 60 bytes are zero-padded to the Ethernet minimum.
// Anything else (including truncated or malformed frames) returns dst
// unchanged and None. Ethernet padding after the IPv4 total length is not
// echoed.
func Append(dst []byte, mac [6]byte, ip [4]byte, frame []byte) ([]byte, Kind) {
	if len(frame) < ethLen {
		return dst, None
	}
	be := binary.BigEndian
	switch be.Uint16(frame[12:]) {
	case etherARP:
		a := frame[ethLen:]
		if len(a) < arpLen || be.Uint16(a[0:]) != 1 || be.Uint16(a[2:]) != etherIPv4 ||
			a[4] != 6 || a[5] != 4 || be.Uint16(a[6:]) != 1 || [4]byte(a[24:28]) != ip {
			return dst, None
		}
		n := len(dst)
		dst = grow(dst, max(ethLen+arpLen, minFrame))
		r := dst[n:]
		clear(r[ethLen+arpLen:])
		copy(r[0:6], a[8:14]) // to the requester's hardware address
		copy(r[6:12], mac[:])
		be.PutUint16(r[12:], etherARP)
		ra := r[ethLen:]
		copy(ra[0:6], a[0:6]) // htype, ptype, hlen, plen
		be.PutUint16(ra[6:], 2)
		copy(ra[8:14], mac[:])
		copy(ra[14:18], ip[:])
		copy(ra[18:28], a[8:18]) // target: the requester's hardware and protocol address
		return dst, ARP
	case etherIPv4:
		if [6]byte(frame[0:6]) != mac {
			return dst, None
		}
		p := frame[ethLen:]
		if len(p) < 20 || p[0]>>4 != 4 {
			return dst, None
		}
		ihl := int(p[0]&0xf) * 4
		tot := int(be.Uint16(p[2:]))
		if ihl < 20 || tot < ihl+8 || tot > len(p) || p[9] != protoICMP || [4]byte(p[16:20]) != ip ||
			be.Uint16(p[6:])&(ipFlagMF|ipOffMask) != 0 {
			return dst, None
		}
		icmp := p[ihl:tot]
		if icmp[0] != icmpEchoReq || icmp[1] != 0 {
			return dst, None
		}
		n := len(dst)
		dst = grow(dst, max(ethLen+20+len(icmp), minFrame))
		r := dst[n:]
		clear(r[ethLen+20+len(icmp):])
		copy(r[0:6], frame[6:12])
		copy(r[6:12], mac[:])
		be.PutUint16(r[12:], etherIPv4)
		rp := r[ethLen : ethLen+20]
		rp[0], rp[1] = 0x45, 0
		be.PutUint16(rp[2:], uint16(20+len(icmp)))
		copy(rp[4:6], p[4:6]) // identification
		rp[6], rp[7] = 0, 0
		rp[8], rp[9] = replyTTL, protoICMP
		rp[10], rp[11] = 0, 0
		copy(rp[12:16], ip[:])
		copy(rp[16:20], p[12:16])
		be.PutUint16(rp[10:], Checksum(rp))
		ri := r[ethLen+20 : ethLen+20+len(icmp)]
		copy(ri, icmp)
		ri[0], ri[1] = icmpEchoRep, 0
		ri[2], ri[3] = 0, 0
		be.PutUint16(ri[2:], Checksum(ri))
		return dst, Echo
	}
	return dst, None
}

// grow extends dst by n bytes, reallocating only when its capacity is short.
func grow(dst []byte, n int) []byte {
	if cap(dst)-len(dst) < n {
		nd := make([]byte, len(dst), len(dst)+n)
		copy(nd, dst)
		dst = nd
	}
	return dst[:len(dst)+n]
}

// Checksum is the Internet checksum of b (RFC 1071): the one's complement
// of the one's-complement sum of its 16-bit big-endian words, an odd last
// byte padded with zero.
func Checksum(b []byte) uint16 {
	var s uint32
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
