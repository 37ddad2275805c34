package main

import (
	"encoding/binary"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// packedImage is a FuzzPackedDeviceWalk input: size byte (size-1), mode
// bits, the initial position (index 0, wrap 1), then the two 4 KiB regions
// at 0x1000 after build ran a packed driver side over them (trailing zero
// bytes trimmed).
func packedImage(size uint16, mode byte, build func(drv *vring.DriverQueue)) []byte {
	backing := make([]byte, 0x2000)
	r1 := must(vring.NewRegion(0x1000, backing[:0x1000:0x1000], nil))
	r2 := must(vring.NewRegion(0x2000, backing[0x1000:], nil))
	mem := must(vring.NewMemory(r1, r2))
	feat := virtio.Features(0).With(virtio.FRingPacked)
	if mode&1 != 0 {
		feat = feat.With(virtio.FIndirectDesc)
	}
	if mode&4 != 0 {
		feat = feat.With(virtio.FInOrder)
	}
	drv := must(vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: vring.ContiguousPackedLayout(0x1000, size), Features: feat}))
	build(drv)
	drv.Publish()
	end := len(backing)
	for end > 0 && backing[end-1] == 0 {
		end--
	}
	return append([]byte{byte(size - 1), mode, 0, 0x80}, backing[:end]...)
}

func packedSeeds() []seed {
	var out []seed
	add := func(target, name string, data []byte) { out = append(out, seed{target, name, data}) }
	rw := []vring.Buffer{{Addr: 0x1800, Len: 32}, {Addr: 0x1900, Len: 64, Writable: true}}
	// Size 5: the 2+1+1 descriptors below leave one free.
	valid := packedImage(5, 3, func(drv *vring.DriverQueue) {
		must(drv.Add(rw))
		must(drv.AddIndirect(0x1c00, []vring.Buffer{{Addr: 0x1800, Len: 8}, {Addr: 0x1f00, Len: 0x200, Writable: true}}))
		must(drv.Add([]vring.Buffer{{Addr: 0x1ff0, Len: 0x40, Writable: true}})) // crosses regions
	})
	add("FuzzPackedDeviceWalk", "valid-direct-indirect-crossing", valid)
	full := packedImage(7, 1, func(drv *vring.DriverQueue) {
		for range 3 {
			must(drv.Add(rw))
		}
		must(drv.Add(rw[:1]))
	})
	add("FuzzPackedDeviceWalk", "valid-full-ring", full)
	for _, v := range []struct {
		name string
		img  []byte
	}{{"valid-direct-indirect-crossing-batch", valid}, {"valid-full-ring-batch-in-order", full}} {
		b := append([]byte(nil), v.img...)
		b[1] |= 8 | 4 // PopBatch/PushBatch, IN_ORDER
		add("FuzzPackedDeviceWalk", v.name, b)
	}
	// Mutations of descriptors 0 and 1 (at data offset 4).
	mut := func(name string, base []byte, f func(d []byte)) {
		b := append([]byte(nil), base...)
		f(b[4:])
		add("FuzzPackedDeviceWalk", name, b)
	}
	flags := func(d []byte, i int) uint16 { return binary.LittleEndian.Uint16(d[16*i+14:]) }
	setFlags := func(d []byte, i int, v uint16) { binary.LittleEndian.PutUint16(d[16*i+14:], v) }
	mut("chain-element-not-available", valid, func(d []byte) { setFlags(d, 1, flags(d, 1)&^vring.DescFAvail) })
	mut("chain-element-previous-lap", valid, func(d []byte) { setFlags(d, 1, flags(d, 1)^(vring.DescFAvail|vring.DescFUsed)) })
	mut("chain-longer-than-ring", valid, func(d []byte) {
		for i := range 5 {
			binary.LittleEndian.PutUint64(d[16*i:], 0x1800)
			binary.LittleEndian.PutUint32(d[16*i+8:], 8)
			setFlags(d, i, vring.DescFAvail|vring.DescFNext)
		}
	})
	mut("indirect-with-next", valid, func(d []byte) { setFlags(d, 2, flags(d, 2)|vring.DescFNext) })
	mut("indirect-in-next-list", valid, func(d []byte) { setFlags(d, 1, flags(d, 1)|vring.DescFIndirect) })
	mut("indirect-bad-size", valid, func(d []byte) { binary.LittleEndian.PutUint32(d[16*2+8:], 24) })
	mut("readable-after-writable", valid, func(d []byte) {
		setFlags(d, 0, flags(d, 0)|vring.DescFWrite)
		setFlags(d, 1, flags(d, 1)&^vring.DescFWrite)
	})
	mut("buffer-outside", valid, func(d []byte) { binary.LittleEndian.PutUint64(d[0:], 0xfffffffffffffff0) })
	mut("zero-length-past-end", valid, func(d []byte) {
		binary.LittleEndian.PutUint64(d[0:], 0x3001)
		binary.LittleEndian.PutUint32(d[8:], 0)
	})
	mut("buffer-id-out-of-range", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[16+12:], 5) })
	mut("buffer-id-in-flight", valid, func(d []byte) {
		binary.LittleEndian.PutUint16(d[16*2+12:], binary.LittleEndian.Uint16(d[16+12:]))
	})

	// FuzzPackedOps: config byte (size 1+cfg%9; 0x10 INDIRECT_DESC, 0x20
	// EVENT_IDX, 0x40 IN_ORDER), then operations (see the target).
	add("FuzzPackedOps", "add-publish-pop-push-reclaim", []byte{0x04, 0, 1, 0, 0, 2, 0, 2, 3, 3, 4, 0, 5, 0, 6, 6})
	add("FuzzPackedOps", "out-of-order", []byte{0x06, 0, 2, 1, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 2, 7, 5, 2, 1, 9, 9, 6, 6, 6})
	// out-of-order, reclaimed with ReclaimBatch (op 6 with the top bit set:
	// a batch of 1+(byte>>4)&3).
	add("FuzzPackedOps", "out-of-order-batches", []byte{0x06, 0, 2, 1, 0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 2, 7, 5, 2, 1, 9, 9, 0x96, 0xb6})
	add("FuzzPackedOps", "in-order-skips", []byte{0x46, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 5, 3, 0x80, 0x80, 0x80, 5, 6, 6, 6, 6})
	add("FuzzPackedOps", "indirect-eventidx-wrap", []byte{0x32, 1, 3, 1, 2, 3, 5, 0, 9, 6, 1, 2, 0, 2, 3, 5, 0, 9, 6, 0, 1, 0, 2, 3, 4, 9, 6, 7, 1, 7, 3})
	add("FuzzPackedOps", "notify-toggles", []byte{0x23, 7, 0, 7, 2, 0, 1, 1, 2, 7, 1, 3, 4, 0, 7, 3, 6, 6})
	return out
}
