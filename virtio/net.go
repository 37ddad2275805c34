package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The virtio-net wire formats (virtio 1.2 §5.1): the per-packet header, the
// device configuration layout and the control virtqueue commands.
//
// Every multi-byte field is little-endian. For a VERSION_1 device that is
// what the specification requires; for a legacy device the fields are in the
// guest's native order, which is little-endian on every platform vdpakit
// supports (amd64, arm64).

// Sizes of the virtio-net packet header.
const (
	// NetHdrLegacySize is struct virtio_net_hdr: used when neither
	// VERSION_1 nor MRG_RXBUF is negotiated.
	NetHdrLegacySize = 10
	// NetHdrSize is struct virtio_net_hdr_v1 (= virtio_net_hdr_mrg_rxbuf):
	// the header once VERSION_1 or MRG_RXBUF is negotiated.
	NetHdrSize = 12
)

// virtio_net_hdr flags.
const (
	NetHdrFNeedsCsum uint8 = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	NetHdrFDataValid uint8 = 2 // VIRTIO_NET_HDR_F_DATA_VALID
	NetHdrFRscInfo   uint8 = 4 // VIRTIO_NET_HDR_F_RSC_INFO
)

// virtio_net_hdr gso_type values.
const (
	NetHdrGSONone  uint8 = 0    // VIRTIO_NET_HDR_GSO_NONE
	NetHdrGSOTCPv4 uint8 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	NetHdrGSOUDP   uint8 = 3    // VIRTIO_NET_HDR_GSO_UDP
	NetHdrGSOTCPv6 uint8 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	NetHdrGSOUDPL4 uint8 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4
	NetHdrGSOECN   uint8 = 0x80 // VIRTIO_NET_HDR_GSO_ECN
)

// ErrNetShort is returned when a buffer is too short for the virtio-net
// structure being decoded.
var ErrNetShort = errors.New("virtio: net: buffer too short")

// NetHdrLen returns the size of the virtio-net header for the negotiated
// features: 12 bytes with VERSION_1 or MRG_RXBUF, 10 bytes otherwise
// (virtio 1.2 §5.1.6).
func NetHdrLen(f Features) int {
	if f.Has(FVersion1) || f.Has(NetFMrgRxbuf) {
		return NetHdrSize
	}
	return NetHdrLegacySize
}

// NetHdr is struct virtio_net_hdr_v1. NumBuffers only exists on the wire in
// the 12-byte form.
type NetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
	NumBuffers uint16
}

// Encode writes h into p in the given wire size (NetHdrLegacySize or
// NetHdrSize). It returns ErrNetShort when p is shorter than size and an
// error for any other size.
func (h *NetHdr) Encode(p []byte, size int) error {
	if size != NetHdrSize && size != NetHdrLegacySize {
		return fmt.Errorf("virtio: net header size %d: must be 10 or 12", size)
	}
	if len(p) < size {
		return fmt.Errorf("%w: net header needs %d bytes, have %d", ErrNetShort, size, len(p))
	}
	p[0] = h.Flags
	p[1] = h.GSOType
	binary.LittleEndian.PutUint16(p[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(p[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(p[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(p[8:], h.CsumOffset)
	if size == NetHdrSize {
		binary.LittleEndian.PutUint16(p[10:], h.NumBuffers)
	}
	return nil
}

// DecodeNetHdr reads a header of the given wire size from p. In the 10-byte
// form NumBuffers is zero.
func DecodeNetHdr(p []byte, size int) (NetHdr, error) {
	if size != NetHdrSize && size != NetHdrLegacySize {
		return NetHdr{}, fmt.Errorf("virtio: net header size %d: must be 10 or 12", size)
	}
	if len(p) < size {
		return NetHdr{}, fmt.Errorf("%w: net header needs %d bytes, have %d", ErrNetShort, size, len(p))
	}
	h := NetHdr{
		Flags:      p[0],
		GSOType:    p[1],
		HdrLen:     binary.LittleEndian.Uint16(p[2:]),
		GSOSize:    binary.LittleEndian.Uint16(p[4:]),
		CsumStart:  binary.LittleEndian.Uint16(p[6:]),
		CsumOffset: binary.LittleEndian.Uint16(p[8:]),
	}
	if size == NetHdrSize {
		h.NumBuffers = binary.LittleEndian.Uint16(p[10:])
	}
	return h, nil
}

// virtio-net status field bits (virtio_net_config.status).
const (
	NetSLinkUp   uint16 = 1 // VIRTIO_NET_S_LINK_UP
	NetSAnnounce uint16 = 2 // VIRTIO_NET_S_ANNOUNCE
)

// Offsets of the fields of struct virtio_net_config (packed, virtio 1.2
// §5.1.4) and its total size.
const (
	NetCfgMAC                         = 0  // u8 mac[6]
	NetCfgStatus                      = 6  // le16 status
	NetCfgMaxVirtqueuePairs           = 8  // le16 max_virtqueue_pairs
	NetCfgMTU                         = 10 // le16 mtu
	NetCfgSpeed                       = 12 // le32 speed
	NetCfgDuplex                      = 16 // u8 duplex
	NetCfgRSSMaxKeySize               = 17 // u8 rss_max_key_size
	NetCfgRSSMaxIndirectionLen        = 18 // le16 rss_max_indirection_table_length
	NetCfgSupportedHashTypes          = 20 // le32 supported_hash_types
	NetConfigSize                     = 24
	NetSpeedUnknown            uint32 = 0xffffffff
	NetDuplexHalf              uint8  = 0
	NetDuplexFull              uint8  = 1
	NetDuplexUnknown           uint8  = 0xff
)

// NetConfig is the virtio-net device configuration space.
type NetConfig struct {
	MAC                          [6]byte
	Status                       uint16
	MaxVirtqueuePairs            uint16
	MTU                          uint16
	Speed                        uint32 // Mb/s; NetSpeedUnknown if unknown
	Duplex                       uint8  // NetDuplex*
	RSSMaxKeySize                uint8
	RSSMaxIndirectionTableLength uint16
	SupportedHashTypes           uint32
}

// Encode writes c into p, which must hold NetConfigSize bytes.
func (c *NetConfig) Encode(p []byte) error {
	if len(p) < NetConfigSize {
		return fmt.Errorf("%w: net config needs %d bytes, have %d", ErrNetShort, NetConfigSize, len(p))
	}
	copy(p[NetCfgMAC:], c.MAC[:])
	binary.LittleEndian.PutUint16(p[NetCfgStatus:], c.Status)
	binary.LittleEndian.PutUint16(p[NetCfgMaxVirtqueuePairs:], c.MaxVirtqueuePairs)
	binary.LittleEndian.PutUint16(p[NetCfgMTU:], c.MTU)
	binary.LittleEndian.PutUint32(p[NetCfgSpeed:], c.Speed)
	p[NetCfgDuplex] = c.Duplex
	p[NetCfgRSSMaxKeySize] = c.RSSMaxKeySize
	binary.LittleEndian.PutUint16(p[NetCfgRSSMaxIndirectionLen:], c.RSSMaxIndirectionTableLength)
	binary.LittleEndian.PutUint32(p[NetCfgSupportedHashTypes:], c.SupportedHashTypes)
	return nil
}

// DecodeNetConfig reads a configuration space. A shorter p (a device
// exposing fewer fields) decodes the fields it covers completely and leaves
// the rest zero; p must cover at least the MAC.
func DecodeNetConfig(p []byte) (NetConfig, error) {
	var c NetConfig
	if len(p) < NetCfgStatus {
		return c, fmt.Errorf("%w: net config needs at least %d bytes, have %d", ErrNetShort, NetCfgStatus, len(p))
	}
	copy(c.MAC[:], p)
	if len(p) >= NetCfgStatus+2 {
		c.Status = binary.LittleEndian.Uint16(p[NetCfgStatus:])
	}
	if len(p) >= NetCfgMaxVirtqueuePairs+2 {
		c.MaxVirtqueuePairs = binary.LittleEndian.Uint16(p[NetCfgMaxVirtqueuePairs:])
	}
	if len(p) >= NetCfgMTU+2 {
		c.MTU = binary.LittleEndian.Uint16(p[NetCfgMTU:])
	}
	if len(p) >= NetCfgSpeed+4 {
		c.Speed = binary.LittleEndian.Uint32(p[NetCfgSpeed:])
	}
	if len(p) >= NetCfgDuplex+1 {
		c.Duplex = p[NetCfgDuplex]
	}
	if len(p) >= NetCfgRSSMaxKeySize+1 {
		c.RSSMaxKeySize = p[NetCfgRSSMaxKeySize]
	}
	if len(p) >= NetCfgRSSMaxIndirectionLen+2 {
		c.RSSMaxIndirectionTableLength = binary.LittleEndian.Uint16(p[NetCfgRSSMaxIndirectionLen:])
	}
	if len(p) >= NetCfgSupportedHashTypes+4 {
		c.SupportedHashTypes = binary.LittleEndian.Uint32(p[NetCfgSupportedHashTypes:])
	}
	return c, nil
}

// Control virtqueue command classes and commands (virtio 1.2 §5.1.6.5).
const (
	NetCtrlRx           uint8 = 0 // VIRTIO_NET_CTRL_RX
	NetCtrlRxPromisc    uint8 = 0
	NetCtrlRxAllMulti   uint8 = 1
	NetCtrlRxAllUni     uint8 = 2
	NetCtrlRxNoMulti    uint8 = 3
	NetCtrlRxNoUni      uint8 = 4
	NetCtrlRxNoBcast    uint8 = 5
	NetCtrlMAC          uint8 = 1 // VIRTIO_NET_CTRL_MAC
	NetCtrlMACTableSet  uint8 = 0
	NetCtrlMACAddrSet   uint8 = 1
	NetCtrlVLAN         uint8 = 2 // VIRTIO_NET_CTRL_VLAN
	NetCtrlVLANAdd      uint8 = 0
	NetCtrlVLANDel      uint8 = 1
	NetCtrlAnnounce     uint8 = 3 // VIRTIO_NET_CTRL_ANNOUNCE
	NetCtrlAnnounceAck  uint8 = 0
	NetCtrlMQ           uint8 = 4 // VIRTIO_NET_CTRL_MQ
	NetCtrlMQVQPairsSet uint8 = 0
	NetCtrlMQRSSConfig  uint8 = 1
	NetCtrlMQHashConfig uint8 = 2
	NetCtrlGuestOffload uint8 = 5 // VIRTIO_NET_CTRL_GUEST_OFFLOADS
	NetCtrlGuestOffSet  uint8 = 0

	// NetCtrlMQPairsMin and NetCtrlMQPairsMax bound VQ_PAIRS_SET and
	// max_virtqueue_pairs.
	NetCtrlMQPairsMin uint16 = 1
	NetCtrlMQPairsMax uint16 = 0x8000

	// Acknowledgement values written by the device.
	NetCtrlOK  uint8 = 0 // VIRTIO_NET_OK
	NetCtrlErr uint8 = 1 // VIRTIO_NET_ERR
)

// Errors from the control command parser. All wrap ErrNetCtrl.
var (
	ErrNetCtrl          = errors.New("virtio: net control command")
	ErrNetCtrlShort     = fmt.Errorf("%w: truncated", ErrNetCtrl)
	ErrNetCtrlLength    = fmt.Errorf("%w: wrong data length", ErrNetCtrl)
	ErrNetCtrlUnknown   = fmt.Errorf("%w: unknown class or command", ErrNetCtrl)
	ErrNetCtrlBadValue  = fmt.Errorf("%w: value out of range", ErrNetCtrl)
	ErrNetCtrlMACTable  = fmt.Errorf("%w: malformed MAC table", ErrNetCtrl)
	ErrNetCtrlMulticast = fmt.Errorf("%w: MAC address is multicast", ErrNetCtrl)
)

// NetCtrl is a decoded control virtqueue command: the device-readable part
// of struct virtio_net_ctrl (class, command, command-specific data). The
// trailing ack byte lives in the device-writable part and is not included.
//
// Data aliases the buffer given to ParseNetCtrl.
type NetCtrl struct {
	Class   uint8
	Command uint8
	Data    []byte
}

// ParseNetCtrl decodes the readable bytes of a control command and checks
// the data length of every command it knows. Unknown classes or commands
// return ErrNetCtrlUnknown along with the decoded class and command so the
// device can still answer VIRTIO_NET_ERR.
func ParseNetCtrl(p []byte) (NetCtrl, error) {
	if len(p) < 2 {
		return NetCtrl{}, fmt.Errorf("%w: %d bytes, need class and command", ErrNetCtrlShort, len(p))
	}
	c := NetCtrl{Class: p[0], Command: p[1], Data: p[2:]}
	want := -1 // -1: variable length checked below
	switch c.Class {
	case NetCtrlRx:
		if c.Command > NetCtrlRxNoBcast {
			return c, c.unknown()
		}
		want = 1
	case NetCtrlMAC:
		switch c.Command {
		case NetCtrlMACAddrSet:
			want = 6
		case NetCtrlMACTableSet:
			if _, _, err := c.macTable(nil, nil, false); err != nil {
				return c, err
			}
		default:
			return c, c.unknown()
		}
	case NetCtrlVLAN:
		if c.Command > NetCtrlVLANDel {
			return c, c.unknown()
		}
		want = 2
	case NetCtrlAnnounce:
		if c.Command != NetCtrlAnnounceAck {
			return c, c.unknown()
		}
		want = 0
	case NetCtrlMQ:
		switch c.Command {
		case NetCtrlMQVQPairsSet:
			want = 2
		case NetCtrlMQRSSConfig, NetCtrlMQHashConfig:
			// Variable-length structures of features vdpakit does not offer.
		default:
			return c, c.unknown()
		}
	case NetCtrlGuestOffload:
		if c.Command != NetCtrlGuestOffSet {
			return c, c.unknown()
		}
		want = 8
	default:
		return c, c.unknown()
	}
	if want >= 0 && len(c.Data) != want {
		return c, fmt.Errorf("%w: class %d command %d carries %d bytes, want %d",
			ErrNetCtrlLength, c.Class, c.Command, len(c.Data), want)
	}
	return c, nil
}

func (c NetCtrl) unknown() error {
	return fmt.Errorf("%w: class %d command %d", ErrNetCtrlUnknown, c.Class, c.Command)
}

// OnOff returns the 1-byte on/off argument of an RX mode command.
func (c NetCtrl) OnOff() (bool, error) {
	if c.Class != NetCtrlRx || len(c.Data) != 1 {
		return false, fmt.Errorf("%w: not an RX mode command", ErrNetCtrlLength)
	}
	return c.Data[0] != 0, nil
}

// MACAddr returns the address of a MAC_ADDR_SET command. A multicast
// address (I/G bit set) cannot be a station address and is rejected.
func (c NetCtrl) MACAddr() ([6]byte, error) {
	var m [6]byte
	if c.Class != NetCtrlMAC || c.Command != NetCtrlMACAddrSet || len(c.Data) != 6 {
		return m, fmt.Errorf("%w: not a MAC_ADDR_SET command", ErrNetCtrlLength)
	}
	copy(m[:], c.Data)
	if m[0]&1 != 0 {
		return m, fmt.Errorf("%w: %x", ErrNetCtrlMulticast, m)
	}
	return m, nil
}

// VQPairs returns the argument of MQ VQ_PAIRS_SET, checked against
// [1, max] where max is the device's max_virtqueue_pairs.
func (c NetCtrl) VQPairs(max uint16) (uint16, error) {
	if c.Class != NetCtrlMQ || c.Command != NetCtrlMQVQPairsSet || len(c.Data) != 2 {
		return 0, fmt.Errorf("%w: not a VQ_PAIRS_SET command", ErrNetCtrlLength)
	}
	n := binary.LittleEndian.Uint16(c.Data)
	if n < NetCtrlMQPairsMin || n > max || n > NetCtrlMQPairsMax {
		return n, fmt.Errorf("%w: %d queue pairs, device supports 1..%d", ErrNetCtrlBadValue, n, max)
	}
	return n, nil
}

// MACTable decodes a MAC_TABLE_SET command: two struct virtio_net_ctrl_mac
// (le32 entries, then entries*6 bytes), unicast first, then multicast. The
// addresses are appended to uni and multi, which are returned.
func (c NetCtrl) MACTable(uni, multi [][6]byte) ([][6]byte, [][6]byte, error) {
	if c.Class != NetCtrlMAC || c.Command != NetCtrlMACTableSet {
		return uni, multi, fmt.Errorf("%w: not a MAC_TABLE_SET command", ErrNetCtrlLength)
	}
	return c.macTable(uni, multi, true)
}

func (c NetCtrl) macTable(uni, multi [][6]byte, collect bool) ([][6]byte, [][6]byte, error) {
	p := c.Data
	var err error
	if uni, p, err = appendMACs(uni, p, "unicast", collect); err != nil {
		return uni, multi, err
	}
	if multi, p, err = appendMACs(multi, p, "multicast", collect); err != nil {
		return uni, multi, err
	}
	if len(p) != 0 {
		return uni, multi, fmt.Errorf("%w: %d trailing bytes", ErrNetCtrlMACTable, len(p))
	}
	return uni, multi, nil
}

func appendMACs(dst [][6]byte, p []byte, which string, collect bool) ([][6]byte, []byte, error) {
	if len(p) < 4 {
		return dst, p, fmt.Errorf("%w: %s entry count truncated", ErrNetCtrlMACTable, which)
	}
	n := uint64(binary.LittleEndian.Uint32(p))
	p = p[4:]
	if n*6 > uint64(len(p)) {
		return dst, p, fmt.Errorf("%w: %s table claims %d entries, %d bytes left", ErrNetCtrlMACTable, which, n, len(p))
	}
	if collect {
		for i := uint64(0); i < n; i++ {
			var m [6]byte
			copy(m[:], p[i*6:])
			dst = append(dst, m)
		}
	}
	return dst, p[n*6:], nil
}
