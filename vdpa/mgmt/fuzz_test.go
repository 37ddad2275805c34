package mgmt

import (
	"testing"

	"github.com/mdlayher/netlink"
)

// FuzzDecode feeds arbitrary attribute bytes to every reply decoder: they
// must return a value or an error, never panic.
func FuzzDecode(f *testing.F) {
	ae := netlink.NewAttributeEncoder()
	ae.String(attrDevName, "vdpa0")
	ae.Uint32(attrDevID, 1)
	ae.Uint64(attrDevFeatures, 1<<32)
	ae.Bytes(attrDevNetCfgMACAddr, []byte{2, 0, 0, 0, 0, 1})
	ae.Uint16(attrDevNetStatus, 1)
	ae.Uint32(attrDevQueueIndex, 0)
	ae.String(attrDevVendorAttrName, "received_desc")
	ae.Uint64(attrDevVendorAttrValue, 3)
	b, _ := ae.Encode()
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = decodeMgmtdev(data)
		_, _ = decodeDevice(data)
		_, _ = decodeConfig(data)
		_, _ = decodeStats(data)
	})
}
