package vfiouser_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

// A software virtio-net device served over vfio-user; the client test kit
// plays QEMU.
func Example() {
	sn, _ := softnet.New(nil)
	backing := vdpa.NewLocal(sn, nil)
	defer backing.Close()
	srv, err := vfiouser.New(backing, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Close()
	dir, _ := os.MkdirTemp("", "vfu")
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "vfu.sock")
	ln, _ := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = srv.Serve(ctx, ln); close(done) }()
	defer func() { cancel(); <-done }()

	c, _ := vfiousertest.Dial(ctx, sock)
	defer c.Close()
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer d.Close()
	frame := make([]byte, 64)
	copy(frame, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	_ = d.SendFrames([][]byte{frame, frame})
	_ = d.Receive(ctx, 2, nil)
	fmt.Printf("vendor %04x, sent %d, received %d\n", uint16(d.Config[0])|uint16(d.Config[1])<<8, d.Sent, d.Received)
	// Output:
	// vendor 1af4, sent 2, received 2
}
