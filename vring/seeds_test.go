package vring

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestWriteFuzzSeeds regenerates the seed corpora under testdata/fuzz when
// VRING_WRITE_SEEDS=1. The FuzzDeviceWalk seeds are ring images built by
// the driver side (valid chains, indirect tables, chains crossing the region
// boundary) plus hostile mutations of them.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("VRING_WRITE_SEEDS") != "1" {
		t.Skip("set VRING_WRITE_SEEDS=1 to regenerate testdata/fuzz seed corpora")
	}
	write := func(target, name string, data []byte) {
		dir := filepath.Join("testdata", "fuzz", target)
		require.NoError(t, os.MkdirAll(dir, 0o755))
		body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644))
	}
	image := func(sizeExp, mode byte, build func(drv *DriverQueue, backing []byte)) []byte {
		backing := make([]byte, 0x2000)
		r1, _ := NewRegion(0x1000, backing[:0x1000:0x1000], nil)
		r2, _ := NewRegion(0x2000, backing[0x1000:], nil)
		mem, err := NewMemory(r1, r2)
		require.NoError(t, err)
		feat := virtio.Features(0)
		if mode&1 != 0 {
			feat = feat.With(virtio.FIndirectDesc)
		}
		drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: ContiguousLayout(0x1000, 1<<sizeExp), Features: feat})
		require.NoError(t, err)
		build(drv, backing)
		drv.Publish()
		end := len(backing)
		for end > 0 && backing[end-1] == 0 {
			end--
		}
		return append([]byte{sizeExp, mode, 0, 0}, backing[:end]...)
	}
	rw := []Buffer{{Addr: 0x1800, Len: 32}, {Addr: 0x1900, Len: 64, Writable: true}}
	valid := image(2, 3, func(drv *DriverQueue, _ []byte) {
		_, err := drv.Add(rw)
		require.NoError(t, err)
		_, err = drv.AddIndirect(0x1c00, []Buffer{{Addr: 0x1800, Len: 8}, {Addr: 0x1f00, Len: 0x200, Writable: true}})
		require.NoError(t, err)
		_, err = drv.Add([]Buffer{{Addr: 0x1ff0, Len: 0x40, Writable: true}}) // crosses regions
		require.NoError(t, err)
	})
	write("FuzzDeviceWalk", "valid-direct-indirect-crossing", valid)
	full := image(3, 1, func(drv *DriverQueue, _ []byte) {
		for range 4 {
			_, err := drv.Add(rw)
			require.NoError(t, err)
		}
	})
	write("FuzzDeviceWalk", "valid-full-ring", full)
	for name, img := range map[string][]byte{"valid-direct-indirect-crossing-batch": valid, "valid-full-ring-batch": full} {
		b := append([]byte(nil), img...)
		b[1] |= 8 // PopBatch mode
		write("FuzzDeviceWalk", name, b)
	}
	// Hostile mutations of the first descriptor (at data offset 4).
	mut := func(name string, base []byte, f func(d []byte)) {
		b := append([]byte(nil), base...)
		f(b[4:])
		write("FuzzDeviceWalk", name, b)
	}
	mut("loop", valid, func(d []byte) {
		binary.LittleEndian.PutUint16(d[14:], 0)
		binary.LittleEndian.PutUint16(d[12:], DescFNext)
	})
	mut("next-out-of-range", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[14:], 99) })
	mut("indirect-with-next", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[12:], DescFIndirect|DescFNext) })
	mut("indirect-bad-size", valid, func(d []byte) {
		binary.LittleEndian.PutUint16(d[12:], DescFIndirect)
		binary.LittleEndian.PutUint32(d[8:], 24)
	})
	mut("buffer-outside", valid, func(d []byte) { binary.LittleEndian.PutUint64(d[0:], 0xfffffffffffffff0) })
	mut("head-out-of-range", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[64+4:], 7) })
	mut("avail-idx-jump", valid, func(d []byte) { binary.LittleEndian.PutUint16(d[64+2:], 200) })

	write("FuzzOps", "add-publish-pop-push-reclaim", []byte{0x00, 0, 1, 0, 0, 2, 0, 2, 3, 3, 4, 5, 6, 6})
	write("FuzzOps", "indirect-eventidx", []byte{0x31, 1, 3, 1, 0, 1, 2, 2, 2, 3, 3, 3, 5, 9, 9, 9, 6, 6, 6, 7, 1, 7, 3})
	write("FuzzOps", "fill-and-drain", []byte{0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 3, 3, 3, 3, 3, 5, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6, 0, 0, 0, 2, 3, 4, 1, 6})
	write("FuzzOps", "notify-toggles", []byte{0x22, 7, 0, 7, 2, 0, 1, 1, 2, 7, 1, 3, 4, 0, 7, 3, 6, 6})
}
