// CHECKED KERNEL ABI — every value in this file is compared with
// linux/vdpa.h (the 6.1 system header and, when available, the 6.12 one) by
// TestABIMatchesHeaders in abi_test.go. Values marked "6.12" are absent from
// the 6.1 header.

package mgmt

// The generic netlink family.
const (
	genlName    = "vdpa" // VDPA_GENL_NAME
	genlVersion = 1      // VDPA_GENL_VERSION
)

// enum vdpa_command.
const (
	cmdMgmtdevNew   = 1 // VDPA_CMD_MGMTDEV_NEW (the reply to MGMTDEV_GET)
	cmdMgmtdevGet   = 2 // VDPA_CMD_MGMTDEV_GET, can dump
	cmdDevNew       = 3 // VDPA_CMD_DEV_NEW
	cmdDevDel       = 4 // VDPA_CMD_DEV_DEL
	cmdDevGet       = 5 // VDPA_CMD_DEV_GET, can dump
	cmdDevConfigGet = 6 // VDPA_CMD_DEV_CONFIG_GET, can dump
	cmdDevVstatsGet = 7 // VDPA_CMD_DEV_VSTATS_GET
	cmdDevAttrSet   = 8 // VDPA_CMD_DEV_ATTR_SET (6.12)
)

// enum vdpa_attr.
const (
	attrPad                     = 0  // VDPA_ATTR_PAD
	attrMgmtdevBusName          = 1  // string
	attrMgmtdevDevName          = 2  // string
	attrMgmtdevSupportedClasses = 3  // u64
	attrDevName                 = 4  // string
	attrDevID                   = 5  // u32
	attrDevVendorID             = 6  // u32
	attrDevMaxVQs               = 7  // u32
	attrDevMaxVQSize            = 8  // u16
	attrDevMinVQSize            = 9  // u16
	attrDevNetCfgMACAddr        = 10 // binary
	attrDevNetStatus            = 11 // u8 in the header's comment, u16 on the wire since 6.0
	attrDevNetCfgMaxVQP         = 12 // u16
	attrDevNetCfgMTU            = 13 // u16
	attrDevNegotiatedFeatures   = 14 // u64
	attrDevMgmtdevMaxVQs        = 15 // u32
	attrDevSupportedFeatures    = 16 // u64
	attrDevQueueIndex           = 17 // u32
	attrDevVendorAttrName       = 18 // string
	attrDevVendorAttrValue      = 19 // u64
	attrDevFeatures             = 20 // u64
)

// The virtio-net status bits in VDPA_ATTR_DEV_NET_STATUS (virtio 1.2
// §5.1.4: VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_ANNOUNCE).
const (
	netStatusLinkUp   = 1
	netStatusAnnounce = 2
)
