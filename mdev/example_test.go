package mdev_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// A VMM puts a mediated device in front of the software virtio-net device
// and forwards the guest's register accesses to it.
func ExampleNewDevice() {
	r, _ := vring.NewMemfdRegion(0, 1<<20, nil)
	mem, _ := vring.NewMemory(r)
	defer mem.Close()
	sn, _ := softnet.New(nil)
	backing := vdpa.NewLocal(sn, nil)
	defer backing.Close()
	dev, err := mdev.NewDevice(backing, &mdev.Options{Memory: mem})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer dev.Close()

	vendor, _ := dev.Read(mdev.RegionPCIConfig, 0x00, 2)
	device, _ := dev.Read(mdev.RegionPCIConfig, 0x02, 2)
	queues, _ := dev.Read(mdev.RegionCommon, mdev.OffNumQueues, 2)
	fmt.Printf("PCI %04x:%04x, %d queues\n", vendor, device, queues)

	// The driver acknowledges the device and accepts features.
	_ = dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, uint64(virtio.StatusAcknowledge|virtio.StatusDriver))
	_ = dev.Write(mdev.RegionCommon, mdev.OffDriverFeatureSelect, 4, 1)
	_ = dev.Write(mdev.RegionCommon, mdev.OffDriverFeature, 4, 1) // VERSION_1 (bit 32)
	_ = dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1,
		uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	st, _ := dev.Read(mdev.RegionCommon, mdev.OffDeviceStatus, 1)
	fmt.Println(virtio.Status(st))
	// Output:
	// PCI 1af4:1041, 3 queues
	// ACKNOWLEDGE|DRIVER|FEATURES_OK
}

// MigrationPath shows the arcs the device walks for a combined
// transition, as the kernel's vfio_mig_get_next_state would.
func ExampleMigrationPath() {
	path, _ := mdev.MigrationPath(mdev.MigPreCopy, mdev.MigStopCopy)
	fmt.Println(path)
	path, _ = mdev.MigrationPath(mdev.MigRunning, mdev.MigResuming)
	fmt.Println(path)
	_, err := mdev.MigrationPath(mdev.MigStopCopy, mdev.MigPreCopy)
	fmt.Println(err)
	// Output:
	// [PRE_COPY_P2P STOP_COPY]
	// [RUNNING_P2P STOP RESUMING]
	// mdev: no migration path from STOP_COPY to PRE_COPY
}

// A truncated device state stream is rejected whole.
func ExampleDecodeState() {
	b, _ := mdev.EncodeState(&mdev.State{Backend: "software", DeviceID: virtio.DeviceNet})
	_, err := mdev.DecodeState(b[:len(b)-1])
	fmt.Println(err)
	s, _ := mdev.DecodeState(b)
	fmt.Println(s.Backend, s.DeviceID)
	// Output:
	// mdev: device state truncated: stream: 73 of 74 bytes
	// software net
}

// Sysfs lists the mediated-device types of a parent (here a fake sysfs
// tree; NewSysfs("") uses /sys).
func ExampleSysfs() {
	root, _ := os.MkdirTemp("", "sysfs")
	defer os.RemoveAll(root)
	typ := filepath.Join(root, "class/mdev_bus/0000:65:00.0/mdev_supported_types/vdpa-net")
	_ = os.MkdirAll(typ, 0o755)
	_ = os.WriteFile(filepath.Join(typ, "device_api"), []byte("vfio-pci\n"), 0o644)
	_ = os.WriteFile(filepath.Join(typ, "available_instances"), []byte("4\n"), 0o644)
	_ = os.WriteFile(filepath.Join(typ, "create"), nil, 0o644)

	s := mdev.NewSysfs(root)
	parents, _ := s.Parents()
	types, _ := s.Types(parents[0])
	fmt.Println(parents[0], types[0].ID, types[0].DeviceAPI, types[0].AvailableInstances)
	// Output:
	// 0000:65:00.0 vdpa-net vfio-pci 4
}
