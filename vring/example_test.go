package vring_test

import (
	"errors"
	"fmt"
	"slices"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Example moves one request through a ring: the driver side adds a chain
// with a readable request and a writable response buffer, the device side
// pops it, answers, and pushes it back.
func Example() {
	region, err := vring.NewMemfdRegion(0, 1<<20, &vring.RegionOptions{Name: "example"})
	if err != nil {
		panic(err)
	}
	mem, err := vring.NewMemory(region)
	if err != nil {
		panic(err)
	}
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 16)
	feat := virtio.Features(0).With(virtio.FEventIdx)

	drv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout, Features: feat})
	if err != nil {
		panic(err)
	}
	dev, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout, Features: feat})
	if err != nil {
		panic(err)
	}

	// Driver: request at 0x10000, 64 bytes of response space at 0x20000.
	_ = mem.Write(0x10000, []byte("what is 6*7?"))
	head, _ := drv.Add([]vring.Buffer{
		{Addr: 0x10000, Len: 12},
		{Addr: 0x20000, Len: 64, Writable: true},
	})
	drv.Publish()
	fmt.Println("kick:", drv.NeedsKick())

	// Device: pop, read, answer, push.
	var c vring.Chain
	ok, err := dev.Pop(&c)
	if !ok || err != nil {
		panic(err)
	}
	req := make([]byte, c.ReadableLen)
	c.Gather(req)
	n := c.Scatter([]byte("42"))
	_ = dev.PushChain(&c, uint32(n))
	fmt.Printf("device: head %d, request %q, interrupt: %v\n", c.Head, req, dev.NeedsInterrupt())

	// Driver: reclaim.
	h, length, _, _ := drv.Reclaim()
	resp := make([]byte, length)
	_ = mem.Read(0x20000, resp)
	fmt.Printf("driver: head %d (added %d), response %q\n", h, head, resp)
	// Output:
	// kick: true
	// device: head 0, request "what is 6*7?", interrupt: true
	// driver: head 0 (added 0), response "42"
}

// ExampleDeviceQueue_Pop shows what a hostile chain does to a device queue:
// a typed error naming the queue and descriptor, then a broken queue until
// Reset.
func ExampleDeviceQueue_Pop() {
	region, _ := vring.NewMemfdRegion(0, 1<<16, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 4)
	dev, _ := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: 1, Layout: layout})

	// A guest writes descriptor 0 pointing at itself with NEXT, and
	// makes it available.
	desc := []byte{0, 0x10, 0, 0, 0, 0, 0, 0 /* addr */, 8, 0, 0, 0 /* len */, 1, 0 /* NEXT */, 0, 0 /* next=0 */}
	_ = mem.Write(layout.Desc, desc)
	_ = mem.Write(layout.Avail+2, []byte{1, 0}) // avail.idx = 1

	var c vring.Chain
	_, err := dev.Pop(&c)
	fmt.Println(err)
	fmt.Println(errors.Is(err, vring.ErrChainLoop))
	_, err = dev.Pop(&c)
	fmt.Println(errors.Is(err, vring.ErrQueueBroken), errors.Is(err, vring.ErrChainLoop))
	// Output:
	// vring: queue 1 index 0: loop in descriptor chain
	// true
	// true true
}

// ExampleMemory_Slice shows bounds-checked zero-copy translation.
func ExampleMemory_Slice() {
	low, _ := vring.NewMemfdRegion(0, 0x1000, nil)
	high, _ := vring.NewMemfdRegion(0x1000, 0x1000, nil)
	mem, _ := vring.NewMemory(low, high)
	defer mem.Close()

	b, err := mem.Slice(0x800, 16)
	fmt.Println(len(b), err)
	_, err = mem.Slice(0xff8, 16) // crosses into the adjacent region
	fmt.Println(errors.Is(err, vring.ErrSpansRegions))
	fmt.Println(mem.Write(0xff8, make([]byte, 16))) // copying may cross
	_, err = mem.Slice(0x1ff8, 16)                  // runs past the end of memory
	fmt.Println(errors.Is(err, vring.ErrOutOfRange))
	// Output:
	// 16 <nil>
	// true
	// <nil>
	// true
}

// ExampleDeviceQueue_EnableNotify is the wait loop of a device that sleeps
// between bursts: enable notifications, and only sleep if the re-check
// finds nothing.
func ExampleDeviceQueue_EnableNotify() {
	region, _ := vring.NewMemfdRegion(0, 1<<16, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 8)
	drv, _ := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout})
	dev, _ := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout})

	dev.DisableNotify() // busy processing: no kicks wanted
	_, _ = drv.Add([]vring.Buffer{{Addr: 0x8000, Len: 4}})
	drv.Publish()
	fmt.Println("driver kicks:", drv.NeedsKick())

	pending, _ := dev.EnableNotify() // about to sleep: re-check first
	fmt.Println("pending after enable:", pending)
	// Output:
	// driver kicks: false
	// pending after enable: true
}

// ExampleDeviceQueue_Prefetch shows a device that works in batches asking
// for a batch's buffers before it copies any of them. Prefetch counts the
// chains it found and leaves them for Pop.
func ExampleDeviceQueue_Prefetch() {
	region, _ := vring.NewMemfdRegion(0, 1<<20, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 64)
	drv, _ := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout})
	dev, _ := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout})

	// The driver (on another CPU, in a real deployment) transmits five
	// frames.
	for i := range 5 {
		_, _ = drv.Add([]vring.Buffer{{Addr: vring.GuestAddr(0x10000 + 0x800*i), Len: 76}})
	}
	drv.Publish()

	const batch = 32
	fmt.Println("found:", dev.Prefetch(batch))
	var c vring.Chain
	popped := 0
	for popped < batch {
		if ok, err := dev.Pop(&c); !ok || err != nil {
			break
		}
		// ... read the frame in c.Segs[0].Buf ...
		_ = dev.Push(c.Head, 0)
		popped++
	}
	fmt.Println("popped:", popped)
	// Output:
	// found: 5
	// popped: 5
}

// ExampleChain_PrefetchReadable is a transmit loop that pops frames a few
// at a time and asks for each one's first line of data (after its 12-byte
// virtio-net header) before it handles the first, so that with the driver
// on another CPU the lines travel together.
func ExampleChain_PrefetchReadable() {
	region, _ := vring.NewMemfdRegion(0, 1<<20, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 64)
	drv, _ := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout})
	dev, _ := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout})

	// Ten frames of 64 bytes, each behind a 12-byte header in one buffer.
	for i := range 10 {
		_, _ = drv.Add([]vring.Buffer{{Addr: vring.GuestAddr(0x10000 + 0x800*i), Len: 12 + 64}})
	}
	drv.Publish()

	const hdrLen = 12
	group := make([]vring.Chain, 4)
	for i := range group {
		group[i].Segs = make([]vring.Segment, 0, 8)
	}
	frames := 0
	for {
		n, err := dev.PopBatch(group)
		for i := range n {
			group[i].PrefetchReadable(hdrLen)
		}
		for i := range n {
			// ... read the frame: group[i]'s readable bytes after hdrLen ...
			frames++
			_ = dev.Push(group[i].Head, 0)
		}
		if err != nil || n < len(group) {
			break
		}
	}
	fmt.Println("frames:", frames)
	// Output:
	// frames: 10
}

// ExampleDriverQueue_ReclaimBatch is a driver's completion loop: it takes
// the used entries in batches, in the order the device used them, until a
// short batch says none is pending. With the device on another CPU,
// ReclaimBatch also asks ahead for the cache lines it reads and for the
// descriptors the next Adds will write (split rings).
func ExampleDriverQueue_ReclaimBatch() {
	region, _ := vring.NewMemfdRegion(0, 1<<20, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 16)
	drv, _ := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout})
	dev, _ := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout})
	drv.DisableInterrupts() // polling

	// Six receive buffers; the device fills them and returns them in
	// another order than they were added.
	var heads []uint16
	for i := range 6 {
		h, _ := drv.Add([]vring.Buffer{{Addr: vring.GuestAddr(0x10000 + 0x800*i), Len: 2048, Writable: true}})
		heads = append(heads, h)
	}
	drv.Publish()
	chains := make([]vring.Chain, 6)
	n, _ := dev.PopBatch(chains)
	used := make([]vring.UsedElem, 0, n)
	for _, i := range []int{2, 0, 1, 5, 3, 4} {
		used = append(used, vring.UsedElem{Head: chains[i].Head, Len: uint32(60 + i)})
	}
	_ = dev.PushBatch(used)

	out := make([]vring.UsedElem, 4)
	for {
		k, err := drv.ReclaimBatch(out)
		if err != nil {
			fmt.Println(err) // a device that broke the rules
			return
		}
		for _, e := range out[:k] {
			fmt.Printf("buffer %d: %d bytes\n", slices.Index(heads, e.Head), e.Len)
		}
		if k < len(out) {
			break // none pending
		}
	}
	fmt.Println("outstanding:", drv.Outstanding())
	// Output:
	// buffer 2: 62 bytes
	// buffer 0: 60 bytes
	// buffer 1: 61 bytes
	// buffer 5: 65 bytes
	// buffer 3: 63 bytes
	// buffer 4: 64 bytes
	// outstanding: 0
}

// ExampleDeviceQueue_PopBatchFit pops receive buffers ahead of the frames
// that will fill them, into Chains with room for two segments each: the
// batch stops before a chain that would not fit, which the next call takes
// first, as Pop would (growing that Chain's Segs).
func ExampleDeviceQueue_PopBatchFit() {
	region, _ := vring.NewMemfdRegion(0, 1<<16, nil)
	mem, _ := vring.NewMemory(region)
	defer mem.Close()
	layout := vring.ContiguousLayout(0, 8)
	drv, _ := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: layout})
	dev, _ := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout})

	// The driver posts two one-buffer chains, then one of three buffers.
	_, _ = drv.Add([]vring.Buffer{{Addr: 0x8000, Len: 1500, Writable: true}})
	_, _ = drv.Add([]vring.Buffer{{Addr: 0x9000, Len: 1500, Writable: true}})
	_, _ = drv.Add([]vring.Buffer{{Addr: 0xa000, Len: 64, Writable: true},
		{Addr: 0xb000, Len: 64, Writable: true}, {Addr: 0xc000, Len: 64, Writable: true}})
	drv.Publish()

	held := make([]vring.Chain, 4)
	for i := range held {
		held[i].Segs = make([]vring.Segment, 0, 2)
	}
	n, err := dev.PopBatchFit(held)
	fmt.Println(n, err)
	n, err = dev.PopBatchFit(held)
	fmt.Println(n, err, len(held[0].Segs))
	n, err = dev.PopBatchFit(held)
	fmt.Println(n, err)
	// Output:
	// 2 <nil>
	// 1 <nil> 3
	// 0 <nil>
}
