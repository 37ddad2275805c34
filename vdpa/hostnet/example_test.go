package hostnet_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/vdpakit/vdpakit/vdpa/hostnet"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

// A softnet device with the offloads, connected to tap device vu0: serve the
// device to a driver (vhost-user, VDUSE, vdpa.Local) and the driver's
// frames reach the host's network stack through vu0, 64 KiB TCP segments
// included. It needs CAP_NET_ADMIN, so it compiles but does not run here.
func Example_tap() {
	dev, err := softnet.New(&softnet.Options{Offload: true, FrontendCtrl: true})
	if err != nil {
		log.Fatal(err)
	}
	tap, err := hostnet.OpenTap("vu0", nil)
	if err != nil {
		log.Fatal(err)
	}
	if err := tap.Attach(dev); err != nil {
		log.Fatal(err)
	}
	// ... serve dev, e.g. vhostuser.NewBackend(dev, nil).ListenAndServe(ctx, path) ...
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tap.Close(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%+v\n", tap.Stats())
}
