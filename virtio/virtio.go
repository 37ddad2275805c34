// Package virtio holds the wire-level constants of the virtio 1.x specification
// that every other vdpakit package shares: feature bits, device status bits,
// device IDs, the virtio-net header and the virtio-net device configuration
// layout. It has no behaviour beyond naming and encoding those facts.
package virtio

import (
	"fmt"
	"math/bits"
	"strings"
)

// Feature is a virtio feature bit number (0..63).
type Feature uint

// Features is a set of negotiated or offered feature bits.
type Features uint64

// Device-independent feature bits (virtio 1.2 §6 "Reserved Feature Bits").
const (
	FNotifyOnEmpty    Feature = 24 // VIRTIO_F_NOTIFY_ON_EMPTY (legacy)
	FLogAll           Feature = 26 // VHOST_F_LOG_ALL (vhost only, not virtio)
	FAnyLayout        Feature = 27 // VIRTIO_F_ANY_LAYOUT (legacy)
	FIndirectDesc     Feature = 28 // VIRTIO_F_INDIRECT_DESC
	FEventIdx         Feature = 29 // VIRTIO_F_EVENT_IDX
	FProtocolFeat     Feature = 30 // VHOST_USER_F_PROTOCOL_FEATURES (vhost-user only)
	FVersion1         Feature = 32 // VIRTIO_F_VERSION_1
	FAccessPlatform   Feature = 33 // VIRTIO_F_ACCESS_PLATFORM
	FRingPacked       Feature = 34 // VIRTIO_F_RING_PACKED
	FInOrder          Feature = 35 // VIRTIO_F_IN_ORDER
	FOrderPlatform    Feature = 36 // VIRTIO_F_ORDER_PLATFORM
	FSRIOV            Feature = 37 // VIRTIO_F_SR_IOV
	FNotificationData Feature = 38 // VIRTIO_F_NOTIFICATION_DATA
	FRingReset        Feature = 40 // VIRTIO_F_RING_RESET
)

// virtio-net feature bits (virtio 1.2 §5.1.3).
const (
	NetFCsum              Feature = 0
	NetFGuestCsum         Feature = 1
	NetFCtrlGuestOffloads Feature = 2
	NetFMTU               Feature = 3
	NetFMAC               Feature = 5
	NetFGuestTSO4         Feature = 7
	NetFGuestTSO6         Feature = 8
	NetFGuestECN          Feature = 9
	NetFGuestUFO          Feature = 10
	NetFHostTSO4          Feature = 11
	NetFHostTSO6          Feature = 12
	NetFHostECN           Feature = 13
	NetFHostUFO           Feature = 14
	NetFMrgRxbuf          Feature = 15
	NetFStatus            Feature = 16
	NetFCtrlVQ            Feature = 17
	NetFCtrlRx            Feature = 18
	NetFCtrlVLAN          Feature = 19
	NetFGuestAnnounce     Feature = 21
	NetFMQ                Feature = 22
	NetFCtrlMACAddr       Feature = 23
	NetFCtrlRxExtra       Feature = 20 // VIRTIO_NET_F_CTRL_RX_EXTRA
	NetFVQNotfCoal        Feature = 52 // VIRTIO_NET_F_VQ_NOTF_COAL
	NetFNotfCoal          Feature = 53 // VIRTIO_NET_F_NOTF_COAL
	NetFGuestUSO4         Feature = 54 // VIRTIO_NET_F_GUEST_USO4
	NetFGuestUSO6         Feature = 55 // VIRTIO_NET_F_GUEST_USO6
	NetFHostUSO           Feature = 56 // VIRTIO_NET_F_HOST_USO
	NetFHashReport        Feature = 57 // VIRTIO_NET_F_HASH_REPORT
	NetFRSS               Feature = 60 // VIRTIO_NET_F_RSS
	NetFRSCExt            Feature = 61 // VIRTIO_NET_F_RSC_EXT
	NetFSpeedDuplex       Feature = 63
)

// Bit returns the mask of f.
func (f Feature) Bit() Features { return 1 << f }

// Has reports whether every feature in fs is set.
func (s Features) Has(fs ...Feature) bool {
	for _, f := range fs {
		if s&f.Bit() == 0 {
			return false
		}
	}
	return true
}

// With returns s with the given features set.
func (s Features) With(fs ...Feature) Features {
	for _, f := range fs {
		s |= f.Bit()
	}
	return s
}

var commonNames = map[Feature]string{
	FNotifyOnEmpty: "NOTIFY_ON_EMPTY", FLogAll: "LOG_ALL", FAnyLayout: "ANY_LAYOUT",
	FIndirectDesc: "INDIRECT_DESC", FEventIdx: "EVENT_IDX", FProtocolFeat: "PROTOCOL_FEATURES",
	FVersion1: "VERSION_1", FAccessPlatform: "ACCESS_PLATFORM", FRingPacked: "RING_PACKED",
	FInOrder: "IN_ORDER", FOrderPlatform: "ORDER_PLATFORM", FSRIOV: "SR_IOV",
	FNotificationData: "NOTIFICATION_DATA", FRingReset: "RING_RESET",
}

var netNames = map[Feature]string{
	NetFCsum: "CSUM", NetFGuestCsum: "GUEST_CSUM", NetFCtrlGuestOffloads: "CTRL_GUEST_OFFLOADS",
	NetFMTU: "MTU", NetFMAC: "MAC", NetFGuestTSO4: "GUEST_TSO4", NetFGuestTSO6: "GUEST_TSO6",
	NetFGuestECN: "GUEST_ECN", NetFGuestUFO: "GUEST_UFO", NetFHostTSO4: "HOST_TSO4",
	NetFHostTSO6: "HOST_TSO6", NetFHostECN: "HOST_ECN", NetFHostUFO: "HOST_UFO",
	NetFMrgRxbuf: "MRG_RXBUF", NetFStatus: "STATUS", NetFCtrlVQ: "CTRL_VQ", NetFCtrlRx: "CTRL_RX",
	NetFCtrlVLAN: "CTRL_VLAN", NetFGuestAnnounce: "GUEST_ANNOUNCE", NetFMQ: "MQ",
	NetFCtrlMACAddr: "CTRL_MAC_ADDR", NetFGuestUSO4: "GUEST_USO4", NetFGuestUSO6: "GUEST_USO6",
	NetFHostUSO: "HOST_USO", NetFSpeedDuplex: "SPEED_DUPLEX", NetFCtrlRxExtra: "CTRL_RX_EXTRA",
	NetFVQNotfCoal: "VQ_NOTF_COAL", NetFNotfCoal: "NOTF_COAL", NetFRSS: "RSS", NetFRSCExt: "RSC_EXT", NetFHashReport: "HASH_REPORT",
}

// Name returns the feature's specification name for a device of the given
// type (net names for DeviceNet), or "BIT_n" when it has none.
func (f Feature) Name(dev DeviceID) string {
	if n, ok := commonNames[f]; ok {
		return n
	}
	if dev == DeviceNet {
		if n, ok := netNames[f]; ok {
			return n
		}
	}
	return fmt.Sprintf("BIT_%d", uint(f))
}

// Names decodes s into specification names, lowest bit first.
func (s Features) Names(dev DeviceID) []string {
	var out []string
	for v := uint64(s); v != 0; v &= v - 1 {
		out = append(out, Feature(bits.TrailingZeros64(v)).Name(dev))
	}
	return out
}

// Format renders s as "0x... (NAME|NAME)".
func (s Features) Format(dev DeviceID) string {
	return fmt.Sprintf("%#x (%s)", uint64(s), strings.Join(s.Names(dev), "|"))
}

// Status is the virtio device status byte (virtio 1.2 §2.1).
type Status uint8

// Device status bits.
const (
	StatusAcknowledge      Status = 1
	StatusDriver           Status = 2
	StatusDriverOK         Status = 4
	StatusFeaturesOK       Status = 8
	StatusDeviceNeedsReset Status = 64
	StatusFailed           Status = 128
)

func (s Status) String() string {
	if s == 0 {
		return "RESET"
	}
	var parts []string
	for _, b := range []struct {
		bit  Status
		name string
	}{{StatusAcknowledge, "ACKNOWLEDGE"}, {StatusDriver, "DRIVER"}, {StatusFeaturesOK, "FEATURES_OK"},
		{StatusDriverOK, "DRIVER_OK"}, {StatusDeviceNeedsReset, "NEEDS_RESET"}, {StatusFailed, "FAILED"}} {
		if s&b.bit != 0 {
			parts = append(parts, b.name)
			s &^= b.bit
		}
	}
	if s != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint8(s)))
	}
	return strings.Join(parts, "|")
}

// DeviceID is a virtio device type (virtio 1.2 §5).
type DeviceID uint32

// Device types used by vdpakit.
const (
	DeviceNet     DeviceID = 1
	DeviceBlock   DeviceID = 2
	DeviceConsole DeviceID = 3
)

func (d DeviceID) String() string {
	switch d {
	case DeviceNet:
		return "net"
	case DeviceBlock:
		return "block"
	case DeviceConsole:
		return "console"
	}
	return fmt.Sprintf("device(%d)", uint32(d))
}
