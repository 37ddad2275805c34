package softnet_test

import (
	"fmt"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// A loopback virtio-net device served in process by vdpa.Local, driven
// through the vdpa.Device interface with driver-side rings: the frame the
// driver transmits comes back on its receive queue.
func Example() {
	region, _ := vring.NewMemfdRegion(0, 1<<20, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close() // deferred first, so it runs after d.Close: the device stops using it first

	dev, _ := softnet.New(&softnet.Options{MaxQueueSize: 64})
	var d vdpa.Device = vdpa.NewLocal(dev, nil)
	defer d.Close()

	features := virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC)
	_ = d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	_ = d.SetFeatures(features)
	_ = d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	_ = d.SetMemory(mem)

	var drivers [2]*vringtest.Driver
	for q := range 2 { // receiveq0, transmitq0
		base := vring.GuestAddr(q) * 0x40000
		layout := vring.ContiguousLayout(base, 64)
		drivers[q], _ = vringtest.NewDriver(mem, vringtest.DriverOptions{Index: q, Layout: layout,
			Features: features, Data: base + 0x1000, SlotSize: 2048})
		_ = d.SetQueueNum(q, 64)
		_ = d.SetQueueAddr(q, vdpa.QueueAddr{Desc: layout.Desc, Avail: layout.Avail, Used: layout.Used})
		_ = d.EnableQueue(q, true)
	}
	// No kick eventfds: the device polls.
	_ = d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK)

	_, _, _ = drivers[0].Send(nil, []uint32{2048}) // a receive buffer
	mac := dev.MAC()
	frame := append(mac[:], 0x02, 0, 0, 0, 0, 0x09, 0x88, 0xb5, 'h', 'e', 'l', 'l', 'o')
	hdr := make([]byte, virtio.NetHdrLen(features))
	_, _, _ = drivers[1].Send([][]byte{hdr, frame}, nil)

	for {
		c, ok, _ := drivers[0].Receive()
		if ok {
			h, _ := virtio.DecodeNetHdr(c.Data, len(hdr))
			fmt.Printf("received %d bytes, num_buffers %d, payload %q\n", c.Len, h.NumBuffers, c.Data[len(hdr)+14:])
			break
		}
	}
	// Output:
	// received 31 bytes, num_buffers 1, payload "hello"
}

// Two busy-poll devices share one worker goroutine of a PollGroup. Each
// loops a frame back; the group serves both transmit queues while they run
// and ends its goroutine once both devices are closed.
func ExamplePollGroup() {
	region, _ := vring.NewMemfdRegion(0, 1<<20, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()

	group := softnet.NewPollGroup(&softnet.PollGroupOptions{Workers: 1})
	features := virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC)
	hdr := make([]byte, virtio.NetHdrLen(features))
	var devs []vdpa.Device
	var rx []*vringtest.Driver
	for i := range 2 {
		dev, _ := softnet.New(&softnet.Options{MaxQueueSize: 64, Mode: softnet.ModePoll, PollGroup: group})
		d := vdpa.NewLocal(dev, nil)
		_ = d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
		_ = d.SetFeatures(features)
		_ = d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
		_ = d.SetMemory(mem)
		var drivers [2]*vringtest.Driver
		for q := range 2 {
			base := vring.GuestAddr(2*i+q) * 0x40000
			layout := vring.ContiguousLayout(base, 64)
			drivers[q], _ = vringtest.NewDriver(mem, vringtest.DriverOptions{Index: q, Layout: layout,
				Features: features, Data: base + 0x1000, SlotSize: 2048})
			_ = d.SetQueueNum(q, 64)
			_ = d.SetQueueAddr(q, vdpa.QueueAddr{Desc: layout.Desc, Avail: layout.Avail, Used: layout.Used})
			_ = d.EnableQueue(q, true)
		}
		_ = d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK)
		_, _, _ = drivers[0].Send(nil, []uint32{2048})
		mac := dev.MAC()
		frame := append(mac[:], 0x02, 0, 0, 0, 0, 0x09, 0x88, 0xb5, byte('a'+i))
		_, _, _ = drivers[1].Send([][]byte{hdr, frame}, nil)
		devs, rx = append(devs, d), append(rx, drivers[0])
	}
	fmt.Println("queues per worker:", group.Queues(), "goroutines:", group.Running())
	for i, r := range rx {
		for {
			if c, ok, _ := r.Receive(); ok {
				fmt.Printf("device %d: payload %q\n", i, c.Data[len(hdr)+14:])
				break
			}
		}
	}
	for _, d := range devs {
		_ = d.Close()
	}
	fmt.Println("after close:", group.Queues(), "goroutines:", group.Running())
	// Output:
	// queues per worker: [2] goroutines: 1
	// device 0: payload "a"
	// device 1: payload "b"
	// after close: [0] goroutines: 0
}
