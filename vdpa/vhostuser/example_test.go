package vhostuser_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vdpakit/vdpakit/vdpa/vhostuser"
	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
)

func ExampleDecode() {
	// A GET_FEATURES request as a front-end sends it: request 1, flags
	// version 1, no payload.
	msg := vhostuser.Encode(nil, vhostuser.Header{Request: vhostuser.ReqGetFeatures, Flags: vhostuser.Version}, nil)
	m, err := vhostuser.Decode(msg, nil)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(m.Request, len(msg))

	// A truncated SET_FEATURES is rejected with a typed error.
	bad := vhostuser.Encode(nil, vhostuser.Header{Request: vhostuser.ReqSetFeatures, Flags: vhostuser.Version}, []byte{1, 2, 3, 4, 5, 6, 7, 8})
	_, err = vhostuser.Decode(bad[:15], nil)
	fmt.Println(err)
	// Output:
	// GET_FEATURES 12
	// vhost-user SET_FEATURES: vhost-user: truncated message: payload is 3 bytes, header says 8
}

func ExampleProtocolFeatures_String() {
	fmt.Println(vhostuser.SupportedProtocolFeatures)
	// Output:
	// 0x1a20b (MQ|LOG_SHMFD|REPLY_ACK|CONFIG|RESET_DEVICE|CONFIGURE_MEM_SLOTS|STATUS)
}

// A back-end serving a loopback virtio-net device on a socket that DPDK's
// virtio-user or QEMU connects to, and this package's front-end driving it.
func ExampleNewBackend() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "vdpakit-example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "vhost-user.sock")
	h := vhostusertest.New(vhostusertest.Loopback, [6]byte{2, 0, 0, 0, 0, 1})
	be := vhostuser.NewBackend(h, nil)
	go be.ListenAndServe(ctx, path)

	var fe *vhostuser.Frontend
	for ctx.Err() == nil {
		if fe, err = vhostuser.Dial(ctx, path, nil); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		fmt.Println(err)
		return
	}
	defer fe.Close()
	f, _ := fe.Features()
	fmt.Println(f.Has(virtio.FVersion1, virtio.FLogAll), fe.ProtocolFeatures())
	// Output:
	// true 0x1220b (MQ|LOG_SHMFD|REPLY_ACK|CONFIG|RESET_DEVICE|STATUS)
}

// A Frontend that outlives its back-end: the back-end's process restarts
// (here: its server ends and a new one listens on the same path), and the
// Frontend takes the session to it on its own.
func ExampleReconnectOptions() {
	dir, err := os.MkdirTemp("", "vdpakit-example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "vhost-user.sock")
	serve := func() (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		be := vhostuser.NewBackend(vhostusertest.New(vhostusertest.Loopback, [6]byte{2, 0, 0, 0, 0, 1}), nil)
		done := make(chan struct{})
		go func() { _ = be.ListenAndServe(ctx, path); close(done) }()
		return func() { cancel(); <-done }
	}
	stop := serve()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	opts := &vhostuser.FrontendOptions{Reconnect: &vhostuser.ReconnectOptions{Interval: 10 * time.Millisecond}}
	var fe *vhostuser.Frontend
	for ctx.Err() == nil {
		if fe, err = vhostuser.Dial(ctx, path, opts); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		fmt.Println(err)
		return
	}
	defer fe.Close()
	f, _ := fe.Features()
	if err := fe.SetFeatures(f & virtio.Features(0).With(virtio.FVersion1)); err != nil {
		fmt.Println(err)
		return
	}
	if err := fe.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK); err != nil {
		fmt.Println(err)
		return
	}

	stop() // the back-end's process dies...
	stop = serve()
	defer stop() // (after fe.Close: deferred calls run last first)
	for fe.Reconnects() == 0 && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	// The new back-end holds the session: the status it reports is the
	// one set before the restart.
	st, err := fe.Status()
	fmt.Println(fe.Reconnects(), st == virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK, err)
	// Output:
	// 1 true <nil>
}
