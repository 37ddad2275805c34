package mgmt

import (
	"flag"
	"testing"

	"github.com/vdpakit/vdpakit/internal/vhostsys/cabi"
)

var update = flag.Bool("update", false, "rewrite testdata/abi-*.txt from the C headers")

const (
	golden61  = "testdata/abi-6.1.txt"
	golden612 = "testdata/abi-6.12.txt"
)

var headers = []string{"linux/vdpa.h", "linux/virtio_net.h"}

func goABI() []cabi.Entry {
	e := func(name string, v uint64, since string) cabi.Entry {
		return cabi.Entry{Name: name, Value: v, Since: since}
	}
	m := func(name string, v uint64) cabi.Entry {
		return cabi.Entry{Name: name, Value: v, Macro: true}
	}
	return []cabi.Entry{
		m("VDPA_GENL_VERSION", genlVersion),
		e("sizeof(VDPA_GENL_NAME) - 1", uint64(len(genlName)), ""),
		e("VDPA_CMD_MGMTDEV_NEW", cmdMgmtdevNew, ""),
		e("VDPA_CMD_MGMTDEV_GET", cmdMgmtdevGet, ""),
		e("VDPA_CMD_DEV_NEW", cmdDevNew, ""),
		e("VDPA_CMD_DEV_DEL", cmdDevDel, ""),
		e("VDPA_CMD_DEV_GET", cmdDevGet, ""),
		e("VDPA_CMD_DEV_CONFIG_GET", cmdDevConfigGet, ""),
		e("VDPA_CMD_DEV_VSTATS_GET", cmdDevVstatsGet, ""),
		e("VDPA_CMD_DEV_ATTR_SET", cmdDevAttrSet, "6.12"),
		e("VDPA_ATTR_PAD", attrPad, ""),
		e("VDPA_ATTR_MGMTDEV_BUS_NAME", attrMgmtdevBusName, ""),
		e("VDPA_ATTR_MGMTDEV_DEV_NAME", attrMgmtdevDevName, ""),
		e("VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", attrMgmtdevSupportedClasses, ""),
		e("VDPA_ATTR_DEV_NAME", attrDevName, ""),
		e("VDPA_ATTR_DEV_ID", attrDevID, ""),
		e("VDPA_ATTR_DEV_VENDOR_ID", attrDevVendorID, ""),
		e("VDPA_ATTR_DEV_MAX_VQS", attrDevMaxVQs, ""),
		e("VDPA_ATTR_DEV_MAX_VQ_SIZE", attrDevMaxVQSize, ""),
		e("VDPA_ATTR_DEV_MIN_VQ_SIZE", attrDevMinVQSize, ""),
		e("VDPA_ATTR_DEV_NET_CFG_MACADDR", attrDevNetCfgMACAddr, ""),
		e("VDPA_ATTR_DEV_NET_STATUS", attrDevNetStatus, ""),
		e("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", attrDevNetCfgMaxVQP, ""),
		e("VDPA_ATTR_DEV_NET_CFG_MTU", attrDevNetCfgMTU, ""),
		e("VDPA_ATTR_DEV_NEGOTIATED_FEATURES", attrDevNegotiatedFeatures, ""),
		e("VDPA_ATTR_DEV_MGMTDEV_MAX_VQS", attrDevMgmtdevMaxVQs, ""),
		e("VDPA_ATTR_DEV_SUPPORTED_FEATURES", attrDevSupportedFeatures, ""),
		e("VDPA_ATTR_DEV_QUEUE_INDEX", attrDevQueueIndex, ""),
		e("VDPA_ATTR_DEV_VENDOR_ATTR_NAME", attrDevVendorAttrName, ""),
		e("VDPA_ATTR_DEV_VENDOR_ATTR_VALUE", attrDevVendorAttrValue, ""),
		e("VDPA_ATTR_DEV_FEATURES", attrDevFeatures, ""),
		m("VIRTIO_NET_S_LINK_UP", netStatusLinkUp),
		m("VIRTIO_NET_S_ANNOUNCE", netStatusAnnounce),
	}
}

func TestABIMatchesHeaders(t *testing.T) {
	cabi.CheckHeaders(t, headers, goABI(), golden61, golden612, *update)
}

func TestABIMatchesGolden(t *testing.T) {
	cabi.CheckGolden(t, goABI(), golden61, golden612)
}
