//go:build linux

package vduse_test

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vduse"
)

// A software virtio-net device that answers ARP and ping for 192.0.2.1,
// served to the kernel through VDUSE. (Needs root and the vduse module, so
// it is compiled but not run by go test.)
func Example() {
	if err := vduse.Available(nil); err != nil {
		fmt.Println(err)
		return
	}
	peer, _ := softnet.NewResponder([6]byte{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}, netip.MustParseAddr("192.0.2.1"))
	dev, _ := softnet.New(&softnet.Options{AccessPlatform: true, NoCtrlVQ: true, Handler: peer})
	vd, err := vduse.Create(dev, &vduse.Options{Name: "vduse-net0"})
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- vd.Serve(ctx) }() // before the device joins the bus

	_ = exec.Command("vdpa", "dev", "add", "name", "vduse-net0", "mgmtdev", "vduse").Run()
	// ... bind it to virtio_vdpa, configure the interface, ping 192.0.2.1 ...
	_ = exec.Command("vdpa", "dev", "del", "vduse-net0").Run()

	cancel()
	<-done
	_ = vd.Close()
}
