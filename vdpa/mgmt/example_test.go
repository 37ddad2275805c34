package mgmt_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"

	"github.com/vdpakit/vdpakit/vdpa/mgmt"
	"github.com/vdpakit/vdpakit/virtio"
)

// List management devices and add a simulated net device, as
// `vdpa mgmtdev show` and `vdpa dev add` do. (Needs the kernel's vdpa
// module, so it is compiled but not run.)
func Example() {
	c, err := mgmt.Dial(nil)
	if errors.Is(err, mgmt.ErrNotAvailable) {
		fmt.Println("no vDPA on this machine")
		return
	}
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	ms, err := c.ManagementDevices(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for _, m := range ms {
		fmt.Println(m.Handle(), m.Classes, m.MaxVQs, m.SupportedFeatures.Format(virtio.DeviceNet))
	}
	err = c.AddDevice(ctx, mgmt.DeviceSpec{Name: "vdpa0", MgmtDev: "vdpasim_net",
		MAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 1}, MTU: 1500})
	if err != nil {
		log.Fatal(err)
	}
	cfg, err := c.DeviceConfig(ctx, "vdpa0")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(cfg.MAC, cfg.MTU, cfg.LinkUp())
}
