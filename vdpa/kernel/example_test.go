package kernel_test

import (
	"fmt"
	"log"

	"github.com/vdpakit/vdpakit/vdpa/kernel"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Open a vDPA device, negotiate features and map guest memory. (Needs a
// vDPA device bound to vhost_vdpa, so it is compiled but not run.)
func Example() {
	path, err := kernel.DevicePath("vdpa0")
	if err != nil {
		log.Fatal(err)
	}
	dev, err := kernel.Open(path, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer dev.Close()

	f, err := dev.Negotiate(virtio.Features(0).With(virtio.FVersion1, virtio.FAccessPlatform, virtio.NetFMAC))
	if err != nil {
		log.Fatal(err)
	}
	reg, err := vring.NewMemfdRegion(0x4000_0000, 16<<20, nil)
	if err != nil {
		log.Fatal(err)
	}
	mem, err := vring.NewMemory(reg)
	if err != nil {
		log.Fatal(err)
	}
	defer mem.Close()
	if err := dev.SetMemory(mem); err != nil { // IOTLB v2 updates, batched
		log.Fatal(err)
	}
	fmt.Println("negotiated", f.Format(virtio.DeviceNet), "backend", dev.BackendFeatures())
}

func ExampleBackendFeatures_String() {
	fmt.Println(kernel.BackendFeatures(0).With(kernel.BackendIOTLBMsgV2, kernel.BackendIOTLBBatch, kernel.BackendSuspend))
	// Output: 0x16 (IOTLB_MSG_V2|IOTLB_BATCH|SUSPEND)
}
