package mgmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/virtio"
)

// attrs walks the attributes of one reply, calling fn for each. Unknown
// attributes are skipped (newer kernels add some).
func attrs(data []byte, fn func(typ uint16, b []byte) error) error {
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	for ad.Next() {
		if err := fn(ad.Type(), ad.Bytes()); err != nil {
			return err
		}
	}
	if err := ad.Err(); err != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return nil
}

var attrNames = map[uint16]string{
	attrMgmtdevBusName: "VDPA_ATTR_MGMTDEV_BUS_NAME", attrMgmtdevDevName: "VDPA_ATTR_MGMTDEV_DEV_NAME",
	attrMgmtdevSupportedClasses: "VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", attrDevName: "VDPA_ATTR_DEV_NAME",
	attrDevID: "VDPA_ATTR_DEV_ID", attrDevVendorID: "VDPA_ATTR_DEV_VENDOR_ID", attrDevMaxVQs: "VDPA_ATTR_DEV_MAX_VQS",
	attrDevMaxVQSize: "VDPA_ATTR_DEV_MAX_VQ_SIZE", attrDevMinVQSize: "VDPA_ATTR_DEV_MIN_VQ_SIZE",
	attrDevNetCfgMACAddr: "VDPA_ATTR_DEV_NET_CFG_MACADDR", attrDevNetStatus: "VDPA_ATTR_DEV_NET_STATUS",
	attrDevNetCfgMaxVQP: "VDPA_ATTR_DEV_NET_CFG_MAX_VQP", attrDevNetCfgMTU: "VDPA_ATTR_DEV_NET_CFG_MTU",
	attrDevNegotiatedFeatures: "VDPA_ATTR_DEV_NEGOTIATED_FEATURES", attrDevMgmtdevMaxVQs: "VDPA_ATTR_DEV_MGMTDEV_MAX_VQS",
	attrDevSupportedFeatures: "VDPA_ATTR_DEV_SUPPORTED_FEATURES", attrDevQueueIndex: "VDPA_ATTR_DEV_QUEUE_INDEX",
	attrDevVendorAttrName: "VDPA_ATTR_DEV_VENDOR_ATTR_NAME", attrDevVendorAttrValue: "VDPA_ATTR_DEV_VENDOR_ATTR_VALUE",
	attrDevFeatures: "VDPA_ATTR_DEV_FEATURES",
}

func badLen(typ uint16, b []byte, want string) error {
	return fmt.Errorf("%w: %s has %d bytes, want %s", ErrMalformed, attrNames[typ], len(b), want)
}

// netlink attributes are in host byte order.
func u16(typ uint16, b []byte) (uint16, error) {
	if len(b) != 2 {
		return 0, badLen(typ, b, "2")
	}
	return binary.NativeEndian.Uint16(b), nil
}

func u32(typ uint16, b []byte) (uint32, error) {
	if len(b) != 4 {
		return 0, badLen(typ, b, "4")
	}
	return binary.NativeEndian.Uint32(b), nil
}

func u64(typ uint16, b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, badLen(typ, b, "8")
	}
	return binary.NativeEndian.Uint64(b), nil
}

// str decodes a NUL-terminated string attribute.
func str(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func missing(what string) error {
	return fmt.Errorf("%w: reply lacks %s", ErrMalformed, what)
}

func decodeMgmtdev(data []byte) (ManagementDevice, error) {
	var d ManagementDevice
	err := attrs(data, func(typ uint16, b []byte) error {
		var err error
		switch typ {
		case attrMgmtdevBusName:
			d.Bus = str(b)
		case attrMgmtdevDevName:
			d.Name = str(b)
		case attrMgmtdevSupportedClasses:
			var v uint64
			v, err = u64(typ, b)
			d.Classes = classes(v)
		case attrDevMgmtdevMaxVQs:
			d.MaxVQs, err = u32(typ, b)
		case attrDevSupportedFeatures:
			var v uint64
			v, err = u64(typ, b)
			d.SupportedFeatures = virtio.Features(v)
		}
		return err
	})
	if err == nil && d.Name == "" {
		err = missing("VDPA_ATTR_MGMTDEV_DEV_NAME")
	}
	return d, err
}

func decodeDevice(data []byte) (Device, error) {
	var d Device
	var haveID bool
	err := attrs(data, func(typ uint16, b []byte) error {
		var err error
		switch typ {
		case attrDevName:
			d.Name = str(b)
		case attrMgmtdevBusName:
			d.MgmtBus = str(b)
		case attrMgmtdevDevName:
			d.MgmtName = str(b)
		case attrDevID:
			var v uint32
			v, err = u32(typ, b)
			d.DeviceID, haveID = virtio.DeviceID(v), true
		case attrDevVendorID:
			d.VendorID, err = u32(typ, b)
		case attrDevMaxVQs:
			d.MaxVQs, err = u32(typ, b)
		case attrDevMaxVQSize:
			d.MaxVQSize, err = u16(typ, b)
		case attrDevMinVQSize:
			d.MinVQSize, err = u16(typ, b)
		}
		return err
	})
	switch {
	case err != nil:
	case d.Name == "":
		err = missing("VDPA_ATTR_DEV_NAME")
	case !haveID:
		err = missing("VDPA_ATTR_DEV_ID")
	}
	return d, err
}

func decodeConfig(data []byte) (DeviceConfig, error) {
	var c DeviceConfig
	var haveID bool
	err := attrs(data, func(typ uint16, b []byte) error {
		var err error
		switch typ {
		case attrDevName:
			c.Name = str(b)
		case attrDevID:
			var v uint32
			v, err = u32(typ, b)
			c.DeviceID, haveID = virtio.DeviceID(v), true
		case attrDevFeatures:
			var v uint64
			v, err = u64(typ, b)
			c.Features = virtio.Features(v)
		case attrDevNegotiatedFeatures:
			var v uint64
			v, err = u64(typ, b)
			c.Negotiated, c.HasNegotiated = virtio.Features(v), true
		case attrDevNetCfgMACAddr:
			if len(b) != 6 {
				return badLen(typ, b, "6")
			}
			c.MAC = net.HardwareAddr(bytes.Clone(b))
		case attrDevNetStatus:
			// u8 before Linux 6.0, u16 since.
			switch len(b) {
			case 1:
				c.Status = uint16(b[0])
			case 2:
				c.Status = binary.NativeEndian.Uint16(b)
			default:
				return badLen(typ, b, "1 or 2")
			}
			c.HasStatus = true
		case attrDevNetCfgMTU:
			c.MTU, err = u16(typ, b)
		case attrDevNetCfgMaxVQP:
			c.MaxVQPairs, err = u16(typ, b)
		}
		return err
	})
	switch {
	case err != nil:
	case c.Name == "":
		err = missing("VDPA_ATTR_DEV_NAME")
	case !haveID:
		err = missing("VDPA_ATTR_DEV_ID")
	}
	return c, err
}

func decodeStats(data []byte) (QueueStats, error) {
	var s QueueStats
	var pending *string
	var haveQueue bool
	err := attrs(data, func(typ uint16, b []byte) error {
		var err error
		switch typ {
		case attrDevName:
			s.Name = str(b)
		case attrDevID:
			var v uint32
			v, err = u32(typ, b)
			s.DeviceID = virtio.DeviceID(v)
		case attrDevNegotiatedFeatures:
			var v uint64
			v, err = u64(typ, b)
			s.Negotiated = virtio.Features(v)
		case attrDevNetCfgMaxVQP:
			s.MaxVQPairs, err = u16(typ, b)
		case attrDevQueueIndex:
			s.Queue, err = u32(typ, b)
			haveQueue = true
		case attrDevVendorAttrName:
			if pending != nil {
				return fmt.Errorf("%w: statistic %q has no value", ErrMalformed, *pending)
			}
			n := str(b)
			pending = &n
		case attrDevVendorAttrValue:
			if pending == nil {
				return fmt.Errorf("%w: statistic value without a name", ErrMalformed)
			}
			var v uint64
			if v, err = u64(typ, b); err == nil {
				s.Stats = append(s.Stats, Stat{Name: *pending, Value: v})
				pending = nil
			}
		}
		return err
	})
	switch {
	case err != nil:
	case pending != nil:
		err = fmt.Errorf("%w: statistic %q has no value", ErrMalformed, *pending)
	case s.Name == "":
		err = missing("VDPA_ATTR_DEV_NAME")
	case !haveQueue:
		err = missing("VDPA_ATTR_DEV_QUEUE_INDEX")
	}
	return s, err
}

func isNoDev(err error) bool { return errors.Is(err, unix.ENODEV) }
