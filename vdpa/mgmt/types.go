package mgmt

import (
	"fmt"
	"net"

	"github.com/vdpakit/vdpakit/virtio"
)

// ManagementDevice is a parent that can create vDPA devices
// (VDPA_CMD_MGMTDEV_GET).
type ManagementDevice struct {
	// Bus is the parent's bus ("pci" for a NIC function); empty for a
	// bus-less software parent such as vdpasim_net.
	Bus string
	// Name is the parent's device name ("vdpasim_net", "0000:65:00.2").
	Name string
	// Classes are the virtio device types it can create.
	Classes []virtio.DeviceID
	// MaxVQs is the largest number of virtqueues one device may have
	// (VDPA_ATTR_DEV_MGMTDEV_MAX_VQS).
	MaxVQs uint32
	// SupportedFeatures are the virtio features it can provision
	// (VDPA_ATTR_DEV_SUPPORTED_FEATURES).
	SupportedFeatures virtio.Features
}

// Handle is the name iproute2 shows and AddDevice takes: "bus/name", or
// "name" without a bus.
func (m ManagementDevice) Handle() string { return handle(m.Bus, m.Name) }

func handle(bus, name string) string {
	if bus == "" {
		return name
	}
	return bus + "/" + name
}

// Device is a vDPA device (VDPA_CMD_DEV_GET).
type Device struct {
	Name string
	// MgmtBus and MgmtName identify the management device that created it.
	MgmtBus, MgmtName string
	// DeviceID is the virtio device type.
	DeviceID virtio.DeviceID
	VendorID uint32
	// MaxVQs is the number of virtqueues; MaxVQSize and MinVQSize bound
	// their sizes (MinVQSize 0: not reported).
	MaxVQs    uint32
	MaxVQSize uint16
	MinVQSize uint16
}

// MgmtHandle is the management device's handle ("bus/name" or "name").
func (d Device) MgmtHandle() string { return handle(d.MgmtBus, d.MgmtName) }

// DeviceConfig is a vDPA device's configuration as the kernel reports it
// (VDPA_CMD_DEV_CONFIG_GET). The net fields are filled for net devices
// when the device offers the matching feature.
type DeviceConfig struct {
	Name     string
	DeviceID virtio.DeviceID
	// Features are the device's offered features (VDPA_ATTR_DEV_FEATURES).
	Features virtio.Features
	// Negotiated holds the driver's features once FEATURES_OK is set;
	// HasNegotiated says whether the kernel reported them.
	Negotiated    virtio.Features
	HasNegotiated bool
	// MAC is the device MAC (VIRTIO_NET_F_MAC), nil when not reported.
	MAC net.HardwareAddr
	// Status is the virtio-net status word (VIRTIO_NET_F_STATUS);
	// HasStatus says whether it was reported.
	Status    uint16
	HasStatus bool
	// MTU (VIRTIO_NET_F_MTU) and MaxVQPairs (VIRTIO_NET_F_MQ or RSS) are
	// zero when not reported.
	MTU        uint16
	MaxVQPairs uint16
}

// LinkUp reports VIRTIO_NET_S_LINK_UP.
func (c DeviceConfig) LinkUp() bool { return c.Status&netStatusLinkUp != 0 }

// Announce reports VIRTIO_NET_S_ANNOUNCE.
func (c DeviceConfig) Announce() bool { return c.Status&netStatusAnnounce != 0 }

// DeviceSpec describes a device for AddDevice. Zero-valued optional fields
// are left to the management device's defaults.
type DeviceSpec struct {
	// Name of the new device (for example "vdpa0"); required.
	Name string
	// MgmtDev is the management device handle, "bus/name" or "name";
	// required.
	MgmtDev string
	// MAC, MTU and MaxVQPairs provision the net config space.
	MAC        net.HardwareAddr
	MTU        uint16
	MaxVQPairs uint16
	// Features, when non-nil, provisions the device features
	// (VDPA_ATTR_DEV_FEATURES): the device offers exactly these.
	Features *virtio.Features
}

func (s DeviceSpec) validate() error {
	if s.Name == "" {
		return fmt.Errorf("%w: device name is empty", ErrInvalidSpec)
	}
	if s.MgmtDev == "" {
		return fmt.Errorf("%w: management device is empty", ErrInvalidSpec)
	}
	if s.MAC != nil && len(s.MAC) != 6 {
		return fmt.Errorf("%w: MAC %v is not 6 bytes", ErrInvalidSpec, s.MAC)
	}
	if s.MTU != 0 && s.MTU < 68 {
		return fmt.Errorf("%w: MTU %d is below the minimum of 68", ErrInvalidSpec, s.MTU)
	}
	return nil
}

// Stat is one vendor statistic of a queue.
type Stat struct {
	Name  string
	Value uint64
}

// QueueStats are one queue's vendor statistics (VDPA_CMD_DEV_VSTATS_GET).
type QueueStats struct {
	Name     string
	DeviceID virtio.DeviceID
	Queue    uint32
	// Negotiated are the driver features; MaxVQPairs is reported when MQ
	// is negotiated (0 otherwise).
	Negotiated virtio.Features
	MaxVQPairs uint16
	// Stats are the device's name/value pairs, in the order it sent them.
	Stats []Stat
}

// Get returns the value of the named statistic.
func (q QueueStats) Get(name string) (uint64, bool) {
	for _, s := range q.Stats {
		if s.Name == name {
			return s.Value, true
		}
	}
	return 0, false
}
