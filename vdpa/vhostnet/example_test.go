package vhostnet_test

import (
	"fmt"
	"log"
	"net"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa/vhostnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// A vhost-net device on a new tap, with guest memory and a dirty log for
// live migration. (Needs /dev/vhost-net and root, so it is compiled but not
// run.)
func Example() {
	dev, err := vhostnet.Open(&vhostnet.Options{TapName: "tap-vm0", MAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 1}})
	if err != nil {
		log.Fatal(err)
	}
	defer dev.Close()
	reg, err := vring.NewMemfdRegion(0, 64<<20, nil)
	if err != nil {
		log.Fatal(err)
	}
	mem, err := vring.NewMemory(reg)
	if err != nil {
		log.Fatal(err)
	}
	defer mem.Close()
	if err := dev.SetFeatures(virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC)); err != nil {
		log.Fatal(err)
	}
	if err := dev.SetMemory(mem); err != nil {
		log.Fatal(err)
	}
	log2, err := dirty.New(64<<20, nil)
	if err != nil {
		log.Fatal(err)
	}
	if err := dev.SetLog(log2); err != nil { // VHOST_SET_LOG_BASE + LOG_ALL
		log.Fatal(err)
	}
	fmt.Println("tap", dev.TapName())
}
