// Command genseeds writes the seed corpora of the vring fuzz targets under
// testdata/fuzz (run it with go generate in package vring). The
// FuzzDeviceWalk and FuzzPackedDeviceWalk seeds are ring images built by
// the driver side (valid chains, indirect tables, chains crossing the
// region boundary) plus hostile mutations of them; the FuzzOps and
// FuzzPackedOps seeds are operation sequences.
//
// TestSeedsAreUpToDate checks that the committed corpora are what this
// program writes.
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

func main() {
	dir := flag.String("dir", filepath.Join("testdata", "fuzz"), "corpus root: one directory per fuzz target")
	flag.Parse()
	for _, s := range seeds() {
		if err := s.write(*dir); err != nil {
			log.Fatal(err)
		}
	}
}

// seed is one corpus file.
type seed struct {
	target, name string
	data         []byte
}

// file is the seed in the go test fuzz v1 format.
func (s seed) file() []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", s.data)
}

func (s seed) write(root string) error {
	dir := filepath.Join(root, s.target)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, s.name), s.file(), 0o644)
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// image is a FuzzDeviceWalk input: size exponent, mode bits, NextAvail 0,
// then the two 4 KiB regions at 0x1000 after build ran the driver side over
// them (trailing zero bytes trimmed).
func image(sizeExp, mode byte, build func(drv *vring.DriverQueue)) []byte {
	backing := make([]byte, 0x2000)
	r1 := must(vring.NewRegion(0x1000, backing[:0x1000:0x1000], nil))
	r2 := must(vring.NewRegion(0x2000, backing[0x1000:], nil))
	mem := must(vring.NewMemory(r1, r2))
	feat := virtio.Features(0)
	if mode&1 != 0 {
		feat = feat.With(virtio.FIndirectDesc)
	}
	drv := must(vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: vring.ContiguousLayout(0x1000, 1<<sizeExp), Features: feat}))
	build(drv)
	drv.Publish()
	end := len(backing)
	for end > 0 && backing[end-1] == 0 {
		end--
	}
	return append([]byte{sizeExp, mode, 0, 0}, backing[:end]...)
}

func seeds() []seed {
	var out []seed
	add := func(target, name string, data []byte) { out = append(out, seed{target, name, data}) }
	rw := []vring.Buffer{{Addr: 0x1800, Len: 32}, {Addr: 0x1900, Len: 64, Writable: true}}
	valid := image(2, 3, func(drv *vring.DriverQueue) {
		must(drv.Add(rw))
		must(drv.AddIndirect(0x1c00, []vring.Buffer{{Addr: 0x1800, Len: 8}, {Addr: 0x1f00, Len: 0x200, Writable: true}}))
		must(drv.Add([]vring.Buffer{{Addr: 0x1ff0, Len: 0x40, Writable: true}})) // crosses regions
	})
	add("FuzzDeviceWalk", "valid-direct-indirect-crossing", valid)
	full := image(3, 1, func(drv *vring.DriverQueue) {
		for range 4 {
			must(drv.Add(rw))
		}
	})
	add("FuzzDeviceWalk", "valid-full-ring", full)
	for _, v := range []struct {
		name string
		img  []byte
	}{{"valid-direct-indirect-crossing-batch", valid}, {"valid-full-ring-batch", full}} {
		b := append([]byte(nil), v.img...)
		b[1] |= 8 // PopBatch mode
		add("FuzzDeviceWalk", v.name, b)
	}
	// Mutations of the first descriptor (at data offset 4).
	mut := func(name string, base []byte, f func(d []byte)) {
		b := append([]byte(nil), base...)
		f(b[4:])
		add("FuzzDeviceWalk", name, b)
	}
	mut("loop", valid, func(d []byte) {
		binary.LittleEndian.PutUint16(d[14:], 0)
		binary.LittleEndian.PutUint16(d[12:], vring.DescFNext)
	})
	mut("next-out-of-range", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[14:], 99) })
	mut("indirect-with-next", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[12:], vring.DescFIndirect|vring.DescFNext) })
	mut("indirect-bad-size", valid, func(d []byte) {
		binary.LittleEndian.PutUint16(d[12:], vring.DescFIndirect)
		binary.LittleEndian.PutUint32(d[8:], 24)
	})
	mut("buffer-outside", valid, func(d []byte) { binary.LittleEndian.PutUint64(d[0:], 0xfffffffffffffff0) })
	// A zero-length buffer is in guest memory up to and including its end
	// (0x3000), and outside past it.
	mut("zero-length-at-end", valid, func(d []byte) {
		binary.LittleEndian.PutUint64(d[0:], 0x3000)
		binary.LittleEndian.PutUint32(d[8:], 0)
	})
	mut("zero-length-past-end", valid, func(d []byte) {
		binary.LittleEndian.PutUint64(d[0:], 0x3001)
		binary.LittleEndian.PutUint32(d[8:], 0)
	})
	mut("head-out-of-range", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[64+4:], 7) })
	mut("avail-idx-jump", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[64+2:], 200) })

	add("FuzzOps", "add-publish-pop-push-reclaim", []byte{0x00, 0, 1, 0, 0, 2, 0, 2, 3, 3, 4, 5, 6, 6})
	add("FuzzOps", "indirect-eventidx", []byte{0x31, 1, 3, 1, 0, 1, 2, 2, 2, 3, 3, 3, 5, 9, 9, 9, 6, 6, 6, 7, 1, 7, 3})
	add("FuzzOps", "fill-and-drain", []byte{0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 3, 3, 3, 3, 3, 5, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6, 0, 0, 0, 2, 3, 4, 1, 6})
	add("FuzzOps", "notify-toggles", []byte{0x22, 7, 0, 7, 2, 0, 1, 1, 2, 7, 1, 3, 4, 0, 7, 3, 6, 6})
	// fill-and-drain reclaiming with ReclaimBatch: an op byte 6 with the top
	// bit set reclaims a batch of 1+(byte>>4)&3 (0xb6: 4, 0x96: 2, 0x86: 1),
	// the last one finding fewer than it asks for.
	add("FuzzOps", "fill-and-drain-batches", []byte{0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 3, 3, 3, 3, 3, 5, 1, 2, 3, 4, 5, 0xb6, 0x96, 0x86, 0xb6, 0, 0, 0, 2, 3, 4, 1, 0x96})
	return append(out, packedSeeds()...)
}
