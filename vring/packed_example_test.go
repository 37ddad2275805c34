package vring_test

import (
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Example_packed moves requests through a packed virtqueue
// (VIRTIO_F_RING_PACKED): the same DeviceQueue and DriverQueue, built on a
// packed layout (descriptor ring, driver and device event suppression
// areas) and started from InitialState (wrap counters 1). The size need
// not be a power of two. Chain.Head is the buffer id; the device may
// complete chains in any order.
func Example_packed() {
	region, err := vring.NewMemfdRegion(0, 1<<20, &vring.RegionOptions{Name: "example-packed"})
	if err != nil {
		panic(err)
	}
	mem, err := vring.NewMemory(region)
	if err != nil {
		panic(err)
	}
	defer mem.Close()
	feat := virtio.Features(0).With(virtio.FRingPacked, virtio.FEventIdx)
	layout := vring.ContiguousPackedLayout(0, 6)

	drv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout, Features: feat})
	if err != nil {
		panic(err)
	}
	dev, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout, Features: feat,
		State: vring.InitialState(feat)})
	if err != nil {
		panic(err)
	}
	fmt.Println("packed:", dev.Packed(), drv.Packed())

	// Driver: two requests, each a readable and a writable buffer (two
	// ring descriptors each).
	for i, q := range []string{"6*7?", "1+1?"} {
		req := vring.GuestAddr(0x10000 + 0x100*i)
		_ = mem.Write(req, []byte(q))
		if _, err := drv.Add([]vring.Buffer{{Addr: req, Len: 4}, {Addr: req + 0x80, Len: 16, Writable: true}}); err != nil {
			panic(err)
		}
	}
	drv.Publish()
	fmt.Println("kick:", drv.NeedsKick())

	// Device: pop both, answer the second first.
	var cs [2]vring.Chain
	n, err := dev.PopBatch(cs[:])
	if n != 2 || err != nil {
		panic(err)
	}
	for _, i := range []int{1, 0} {
		c := &cs[i]
		req := make([]byte, c.ReadableLen)
		c.Gather(req)
		ans := map[string]string{"6*7?": "42", "1+1?": "2"}[string(req)]
		k := c.Scatter([]byte(ans))
		if err := dev.PushChain(c, uint32(k)); err != nil {
			panic(err)
		}
		fmt.Printf("device: id %d (%d descriptors) %q -> %q\n", c.Head, c.Descs, req, ans)
	}
	st := dev.State()
	fmt.Printf("state: next avail %d wrap %v, next used %d wrap %v, interrupt: %v\n",
		st.AvailIndex(), st.AvailWrap(), st.UsedIndex(), st.UsedWrap(), dev.NeedsInterrupt())

	// Driver: reclaim in completion order.
	for {
		id, length, ok, err := drv.Reclaim()
		if err != nil {
			panic(err)
		}
		if !ok {
			break
		}
		resp := make([]byte, length)
		_ = mem.Read(vring.GuestAddr(0x10080+0x100*int(id)), resp)
		fmt.Printf("driver: id %d response %q\n", id, resp)
	}
	// Output:
	// packed: true true
	// kick: true
	// device: id 1 (2 descriptors) "1+1?" -> "2"
	// device: id 0 (2 descriptors) "6*7?" -> "42"
	// state: next avail 4 wrap true, next used 4 wrap true, interrupt: true
	// driver: id 1 response "2"
	// driver: id 0 response "42"
}
