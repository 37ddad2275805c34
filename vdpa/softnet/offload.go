package softnet

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// The virtio-net offloads (virtio 1.2 §5.1.6.2 and §5.1.6.4): checksum
// completion (NEEDS_CSUM with csum_start and csum_offset) and segmentation
// (gso_type with gso_size) of TCP over IPv4 and IPv6 and of UDP (USO).
//
// A header is validated against its frame before anything uses it: a header
// that lies is dropped and counted (DropTxBadHeader for what the driver
// transmits, DropRxBadHeader for what DeliverHdr is given), never trusted.
// Two fields are not grounds for a drop: flag bits other than NEEDS_CSUM
// in what the driver transmits are ignored (§5.1.6.2.2: the device MUST
// ignore flag bits it does not recognize; DATA_VALID and RSC_INFO the
// driver must not set), and hdr_len, a hint the device MUST NOT rely on
// (§5.1.6.2.2; GUEST_HDRLEN is not offered), is replaced by the length the
// device parsed: the headers of a GSO frame, zero for a hint longer than a
// frame without one. A header handed on (to an OffloadHandler or to the
// driver) thus never carries a hint a kernel would reject.
// Every value derived from a frame that may lie in guest memory is read once
// into a local, so a driver rewriting the frame while the device works on it
// can garble its own frame but not move a bound the device checked.

// ErrBadHeader: a virtio-net header that does not describe its frame. The
// errors below wrap it, one per lie.
var ErrBadHeader = errors.New("softnet: bad virtio-net header")

// Header lies, each matching ErrBadHeader.
var (
	ErrHdrFlags      = fmt.Errorf("%w: unknown flags", ErrBadHeader)
	ErrHdrCsum       = fmt.Errorf("%w: csum_start/csum_offset beyond the frame", ErrBadHeader)
	ErrHdrCsumFeat   = fmt.Errorf("%w: NEEDS_CSUM without VIRTIO_NET_F_CSUM", ErrBadHeader)
	ErrHdrGSOType    = fmt.Errorf("%w: unknown gso_type", ErrBadHeader)
	ErrHdrGSOFeat    = fmt.Errorf("%w: gso_type of a feature not negotiated", ErrBadHeader)
	ErrHdrGSOSize    = fmt.Errorf("%w: gso_size 0 with a gso_type", ErrBadHeader)
	ErrHdrGSOCsum    = fmt.Errorf("%w: gso_type without NEEDS_CSUM", ErrBadHeader)
	ErrHdrGSOPacket  = fmt.Errorf("%w: frame is not the packet its gso_type says", ErrBadHeader)
	ErrHdrGSOPayload = fmt.Errorf("%w: segmentation with no payload", ErrBadHeader)
)

// Offload features, by direction.
const (
	// HostOffloads are the driver→device offloads: the driver asks the
	// device to checksum (CSUM) or segment (HOST_TSO4, HOST_TSO6 with
	// HOST_ECN, HOST_USO) what it transmits. An OffloadHandler's
	// TxOffloads is a subset of them.
	HostOffloads = virtio.Features(1<<virtio.NetFCsum | 1<<virtio.NetFHostTSO4 | 1<<virtio.NetFHostTSO6 |
		1<<virtio.NetFHostECN | 1<<virtio.NetFHostUSO)
	// GuestOffloads are the device→driver offloads: the driver takes
	// partially checksummed (GUEST_CSUM) or unsegmented (GUEST_TSO4,
	// GUEST_TSO6 with GUEST_ECN, GUEST_USO4, GUEST_USO6) frames.
	GuestOffloads = virtio.Features(1<<virtio.NetFGuestCsum | 1<<virtio.NetFGuestTSO4 | 1<<virtio.NetFGuestTSO6 |
		1<<virtio.NetFGuestECN | 1<<virtio.NetFGuestUSO4 | 1<<virtio.NetFGuestUSO6)
)

// checkOffloadDeps returns an error naming the first broken offload
// dependency of virtio 1.2 §5.1.3.1.
func checkOffloadDeps(f virtio.Features) error {
	// Each feature needs one of the features listed after it.
	deps := [...]struct {
		f     virtio.Feature
		needs []virtio.Feature
	}{
		{virtio.NetFGuestTSO4, []virtio.Feature{virtio.NetFGuestCsum}},
		{virtio.NetFGuestTSO6, []virtio.Feature{virtio.NetFGuestCsum}},
		{virtio.NetFGuestUFO, []virtio.Feature{virtio.NetFGuestCsum}},
		{virtio.NetFGuestUSO4, []virtio.Feature{virtio.NetFGuestCsum}},
		{virtio.NetFGuestUSO6, []virtio.Feature{virtio.NetFGuestCsum}},
		{virtio.NetFGuestECN, []virtio.Feature{virtio.NetFGuestTSO4, virtio.NetFGuestTSO6}},
		{virtio.NetFHostTSO4, []virtio.Feature{virtio.NetFCsum}},
		{virtio.NetFHostTSO6, []virtio.Feature{virtio.NetFCsum}},
		{virtio.NetFHostUFO, []virtio.Feature{virtio.NetFCsum}},
		{virtio.NetFHostUSO, []virtio.Feature{virtio.NetFCsum}},
		{virtio.NetFHostECN, []virtio.Feature{virtio.NetFHostTSO4, virtio.NetFHostTSO6}},
	}
	for _, d := range deps {
		if !f.Has(d.f) {
			continue
		}
		ok := false
		for _, n := range d.needs {
			ok = ok || f.Has(n)
		}
		if !ok {
			return fmt.Errorf("%w: %s requires %s (§5.1.3.1)", ErrFeatures, d.f.Name(virtio.DeviceNet),
				d.needs[0].Name(virtio.DeviceNet))
		}
	}
	return nil
}

// Ethernet, IP and transport numbers used by the segmentation.
const (
	ethHdrLen    = 14
	etherIPv4    = 0x0800
	etherIPv6    = 0x86dd
	etherVLAN    = 0x8100
	etherQinQ    = 0x88a8
	ipProtoTCP   = 6
	ipProtoUDP   = 17
	tcpFlagFIN   = 0x01
	tcpFlagPSH   = 0x08
	tcpFlagCWR   = 0x80
	udpHdrLen    = 8
	tcpMinHdrLen = 20
)

// gsoPacket is the layout of a frame to segment, read once from the frame.
type gsoPacket struct {
	l3, l4, payload int // offsets of the IP header, transport header, payload
	v6, udp         bool
	ipID            uint16
	seq             uint32
	tcpFlags        uint8
}

// csumOff is the offset of the transport checksum field in the transport
// header: 6 in UDP's, 16 in TCP's.
func (p *gsoPacket) csumOff() int {
	if p.udp {
		return 6
	}
	return 16
}

// gsoKind returns the segmentation a header asks for (gso_type without the
// ECN bit).
func gsoKind(h *virtio.NetHdr) uint8 { return h.GSOType &^ virtio.NetHdrGSOECN }

// checkHdr validates h against frame. fromDriver applies the driver's rules
// of §5.1.6.2.1 (features negotiated in f; NEEDS_CSUM with every gso_type)
// and clears every flag but NEEDS_CSUM (§5.1.6.2.2); a header from a host
// back-end (DeliverHdr) needs no feature, since the device completes or
// segments in software what the driver did not negotiate, and may carry
// DATA_VALID but no unknown flag. hdr_len is set to what the device parsed
// (see above). For a gso_type it returns the parsed packet.
func checkHdr(h *virtio.NetHdr, frame []byte, f virtio.Features, fromDriver bool) (gsoPacket, error) {
	var p gsoPacket
	if fromDriver {
		h.Flags &= virtio.NetHdrFNeedsCsum
	} else if h.Flags&^(virtio.NetHdrFNeedsCsum|virtio.NetHdrFDataValid) != 0 {
		return p, ErrHdrFlags
	}
	n := len(frame)
	if h.Flags&virtio.NetHdrFNeedsCsum != 0 {
		if fromDriver && !f.Has(virtio.NetFCsum) {
			return p, ErrHdrCsumFeat
		}
		if int(h.CsumStart)+int(h.CsumOffset)+2 > n {
			return p, ErrHdrCsum
		}
	}
	kind := gsoKind(h)
	if kind == virtio.NetHdrGSONone {
		if h.GSOType != virtio.NetHdrGSONone {
			return p, ErrHdrGSOType // the ECN bit alone
		}
		if int(h.HdrLen) > n {
			h.HdrLen = 0
		}
		return p, nil
	}
	var need virtio.Feature
	switch kind {
	case virtio.NetHdrGSOTCPv4:
		need = virtio.NetFHostTSO4
	case virtio.NetHdrGSOTCPv6:
		need = virtio.NetFHostTSO6
	case virtio.NetHdrGSOUDPL4:
		need = virtio.NetFHostUSO
	default:
		return p, ErrHdrGSOType
	}
	if fromDriver {
		if !f.Has(need) || (h.GSOType&virtio.NetHdrGSOECN != 0 && !f.Has(virtio.NetFHostECN)) {
			return p, ErrHdrGSOFeat
		}
		if h.Flags&virtio.NetHdrFNeedsCsum == 0 {
			return p, ErrHdrGSOCsum
		}
	}
	if h.GSOSize == 0 {
		return p, ErrHdrGSOSize
	}
	if err := parseGSO(&p, kind, frame); err != nil {
		return p, err
	}
	if h.Flags&virtio.NetHdrFNeedsCsum != 0 && (int(h.CsumStart) != p.l4 || int(h.CsumOffset) != p.csumOff()) {
		// The partial checksum of a GSO frame is its transport
		// checksum: anything else would have a kernel taking the frame
		// (a tap) write the segments' sums over their payload.
		return p, ErrHdrGSOPacket
	}
	h.HdrLen = uint16(p.payload)
	return p, nil
}

// parseGSO reads the Ethernet (up to two VLAN tags), IP and TCP/UDP headers
// of a frame to segment. IPv6 extension headers and IPv4 fragments are not
// segmented (nor generated by Linux for GSO).
func parseGSO(p *gsoPacket, kind uint8, frame []byte) error {
	n := len(frame)
	off := 12
	var et uint16
	for i := 0; ; i++ {
		if off+2 > n {
			return ErrHdrGSOPacket
		}
		et = binary.BigEndian.Uint16(frame[off:])
		off += 2
		if (et != etherVLAN && et != etherQinQ) || i == 2 {
			break
		}
		off += 2 // the tag's TCI
	}
	p.l3 = off
	var proto uint8
	switch et {
	case etherIPv4:
		if kind == virtio.NetHdrGSOTCPv6 || off+20 > n {
			return ErrHdrGSOPacket
		}
		vihl := frame[off]
		ihl := int(vihl&0xf) * 4
		fragOff := binary.BigEndian.Uint16(frame[off+6:])
		if vihl>>4 != 4 || ihl < 20 || off+ihl > n || fragOff&0x3fff != 0 {
			return ErrHdrGSOPacket
		}
		proto = frame[off+9]
		p.ipID = binary.BigEndian.Uint16(frame[off+4:])
		p.l4 = off + ihl
	case etherIPv6:
		if kind == virtio.NetHdrGSOTCPv4 || off+40 > n || frame[off]>>4 != 6 {
			return ErrHdrGSOPacket
		}
		p.v6 = true
		proto = frame[off+6]
		p.l4 = off + 40
	default:
		return ErrHdrGSOPacket
	}
	if kind == virtio.NetHdrGSOUDPL4 {
		if proto != ipProtoUDP || p.l4+udpHdrLen > n {
			return ErrHdrGSOPacket
		}
		p.udp = true
		p.payload = p.l4 + udpHdrLen
	} else {
		if proto != ipProtoTCP || p.l4+tcpMinHdrLen > n {
			return ErrHdrGSOPacket
		}
		thl := int(frame[p.l4+12]>>4) * 4
		if thl < tcpMinHdrLen || p.l4+thl > n {
			return ErrHdrGSOPacket
		}
		p.seq = binary.BigEndian.Uint32(frame[p.l4+4:])
		p.tcpFlags = frame[p.l4+13]
		p.payload = p.l4 + thl
	}
	if p.payload == n {
		return ErrHdrGSOPayload
	}
	return nil
}

// csumAdd adds b to the 32-bit ones' complement accumulator sum, as 16-bit
// big-endian words (a trailing odd byte is padded with zero).
func csumAdd(sum uint64, b []byte) uint64 {
	for len(b) >= 8 {
		v := binary.BigEndian.Uint64(b)
		sum += v >> 32
		sum += v & 0xffffffff
		b = b[8:]
	}
	for len(b) >= 2 {
		sum += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint64(b[0]) << 8
	}
	return sum
}

// csumFold folds sum to 16 bits and complements it. A zero result is sent
// as 0xffff (the same value in ones' complement; UDP reserves 0 for "no
// checksum").
func csumFold(sum uint64) uint16 {
	for sum>>16 != 0 {
		sum = (sum & 0xffff) + sum>>16
	}
	c := ^uint16(sum)
	if c == 0 {
		c = 0xffff
	}
	return c
}

// completeCsum does what NEEDS_CSUM asks of the device (§5.1.6.2): the
// ones' complement sum from csum_start to the end of the frame (the field at
// csum_start+csum_offset holds the pseudo-header sum the driver put there),
// stored at csum_start+csum_offset. frame must be the device's copy; the
// header has been validated against it.
func completeCsum(h *virtio.NetHdr, frame []byte) {
	at := int(h.CsumStart) + int(h.CsumOffset)
	binary.BigEndian.PutUint16(frame[at:], csumFold(csumAdd(0, frame[h.CsumStart:])))
}

// segmenter cuts a GSO frame into the frames the same packet would have been
// on the wire: the headers repeated, IPv4 total length, identification and
// header checksum, IPv6 payload length, TCP sequence number and flags (FIN
// and PSH on the last segment only, CWR on the first only), UDP length, and
// every transport checksum computed in full. It allocates nothing: segments
// are built in a buffer of the caller's.
type segmenter struct {
	frame []byte
	p     gsoPacket
	mss   int
	off   int // payload offset of the next segment
	i     int // index of the next segment
}

func (s *segmenter) init(frame []byte, p gsoPacket, mss uint16) {
	*s = segmenter{frame: frame, p: p, mss: int(mss), off: p.payload}
}

// next builds the next segment in buf (which must hold p.payload+mss bytes)
// and returns it, or nil after the last one.
func (s *segmenter) next(buf []byte) []byte {
	if s.off >= len(s.frame) {
		return nil
	}
	p := &s.p
	take := min(s.mss, len(s.frame)-s.off)
	last := s.off+take == len(s.frame)
	seg := buf[:p.payload+take]
	copy(seg, s.frame[:p.payload])
	copy(seg[p.payload:], s.frame[s.off:s.off+take])
	l4len := len(seg) - p.l4
	if p.v6 {
		binary.BigEndian.PutUint16(seg[p.l3+4:], uint16(len(seg)-p.l3-40))
	} else {
		ip := seg[p.l3:p.l4]
		binary.BigEndian.PutUint16(ip[2:], uint16(len(seg)-p.l3))
		binary.BigEndian.PutUint16(ip[4:], p.ipID+uint16(s.i))
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], csumFold(csumAdd(0, ip)))
	}
	csumAt := p.l4 + p.csumOff()
	if p.udp {
		binary.BigEndian.PutUint16(seg[p.l4+4:], uint16(l4len))
	} else {
		binary.BigEndian.PutUint32(seg[p.l4+4:], p.seq+uint32(s.off-p.payload))
		fl := p.tcpFlags
		if !last {
			fl &^= tcpFlagFIN | tcpFlagPSH
		}
		if s.i > 0 {
			fl &^= tcpFlagCWR
		}
		seg[p.l4+13] = fl
	}
	seg[csumAt], seg[csumAt+1] = 0, 0
	sum := pseudoSum(seg, p, l4len)
	binary.BigEndian.PutUint16(seg[csumAt:], csumFold(csumAdd(sum, seg[p.l4:])))
	s.off += take
	s.i++
	return seg
}

// pseudoSum is the sum of the IPv4 or IPv6 pseudo-header.
func pseudoSum(seg []byte, p *gsoPacket, l4len int) uint64 {
	proto := uint64(ipProtoTCP)
	if p.udp {
		proto = ipProtoUDP
	}
	var sum uint64
	if p.v6 {
		sum = csumAdd(0, seg[p.l3+8:p.l3+40])
	} else {
		sum = csumAdd(0, seg[p.l3+12:p.l3+20])
	}
	return sum + proto + uint64(l4len)
}

// rxOffloadOK reports whether a driver with features f takes a frame with
// header h (already validated, packet p) as it is.
func rxOffloadOK(h *virtio.NetHdr, p *gsoPacket, f virtio.Features) bool {
	if h.Flags&virtio.NetHdrFNeedsCsum != 0 && !f.Has(virtio.NetFGuestCsum) {
		return false
	}
	kind := gsoKind(h)
	if kind != virtio.NetHdrGSONone && h.Flags&virtio.NetHdrFNeedsCsum == 0 {
		// A device that hands over a GSO frame MUST set NEEDS_CSUM
		// (§5.1.6.4.2); one from a host back-end without it has its
		// checksums unset or complete, so it is segmented instead.
		return false
	}
	switch kind {
	case virtio.NetHdrGSONone:
		return true
	case virtio.NetHdrGSOTCPv4:
		if !f.Has(virtio.NetFGuestTSO4) {
			return false
		}
	case virtio.NetHdrGSOTCPv6:
		if !f.Has(virtio.NetFGuestTSO6) {
			return false
		}
	case virtio.NetHdrGSOUDPL4:
		if (p.v6 && !f.Has(virtio.NetFGuestUSO6)) || (!p.v6 && !f.Has(virtio.NetFGuestUSO4)) {
			return false
		}
	}
	return h.GSOType&virtio.NetHdrGSOECN == 0 || f.Has(virtio.NetFGuestECN)
}

// txOffloadOK reports whether a handler that takes the transmit offloads
// acc takes a frame with header h as it is.
func txOffloadOK(h *virtio.NetHdr, acc virtio.Features) bool {
	if h.Flags&virtio.NetHdrFNeedsCsum != 0 && !acc.Has(virtio.NetFCsum) {
		return false
	}
	switch gsoKind(h) {
	case virtio.NetHdrGSONone:
		return true
	case virtio.NetHdrGSOTCPv4:
		if !acc.Has(virtio.NetFHostTSO4) {
			return false
		}
	case virtio.NetHdrGSOTCPv6:
		if !acc.Has(virtio.NetFHostTSO6) {
			return false
		}
	case virtio.NetHdrGSOUDPL4:
		if !acc.Has(virtio.NetFHostUSO) {
			return false
		}
	}
	return h.GSOType&virtio.NetHdrGSOECN == 0 || acc.Has(virtio.NetFHostECN)
}
