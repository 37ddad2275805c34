package vring

import (
	"encoding/binary"
	"runtime"
	"testing"
	"time"

	"github.com/vdpakit/vdpakit/internal/abbench"
	"github.com/vdpakit/vdpakit/virtio"
)

// packedBenchRing is a size-256 packed ring whose driver side is
// pre-written: chains of nd descriptors, ids 0, nd, 2nd, .... Refilling a
// lap copies a prepared image of the ring (4 KiB, the lap's wrap bits)
// over the one the device used: about half a nanosecond per descriptor,
// included in the figures.
type packedBenchRing struct {
	dev    *DeviceQueue
	ring   []byte
	images [2][]byte
	lap    int
}

func newPackedBenchRing(b testing.TB, nd int, feat virtio.Features) *packedBenchRing {
	const size = 256
	if size%nd != 0 {
		b.Fatal("nd must divide 256")
	}
	r, err := NewMemfdRegion(0, 1<<20, nil)
	if err != nil {
		b.Fatal(err)
	}
	mem, _ := NewMemory(r)
	b.Cleanup(func() { mem.Close() })
	feat = feat.With(virtio.FRingPacked)
	l := ContiguousPackedLayout(0, size)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat, State: InitialState(feat)})
	if err != nil {
		b.Fatal(err)
	}
	dev.DisableNotify() // a polling device
	br := &packedBenchRing{dev: dev, ring: r.Bytes()[l.Desc : l.Desc+16*size]}
	for lap, bits := range []uint16{DescFAvail, DescFUsed} {
		img := make([]byte, 16*size)
		for h := 0; h < size; h += nd {
			for k := range nd {
				i := h + k
				flags := bits
				if k < nd-1 {
					flags |= DescFNext
				} else {
					flags |= DescFWrite
				}
				d := img[16*i:]
				binary.LittleEndian.PutUint64(d, 0x10000+uint64(i)*1500)
				binary.LittleEndian.PutUint32(d[8:], 1500)
				binary.LittleEndian.PutUint16(d[12:], uint16(h))
				binary.LittleEndian.PutUint16(d[14:], flags)
			}
		}
		br.images[lap] = img
	}
	return br
}

// refill makes the next lap's chains available (the whole ring: the
// device has consumed and pushed everything).
func (br *packedBenchRing) refill() {
	copy(br.ring, br.images[br.lap%2])
	br.lap++
}

func benchPackedPopPush(b *testing.B, nd, batch int) {
	br := newPackedBenchRing(b, nd, 0)
	cs := make([]Chain, batch)
	elems := make([]UsedElem, batch)
	perRing := 256 / nd
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := abbench.ThreadCPU()
	defer func() { b.ReportMetric(float64(abbench.ThreadCPU()-cpu0)/float64(b.N), "cpu-ns/op") }()
	done := 0
	for done < b.N {
		br.refill()
		for k := 0; k < perRing && done < b.N; {
			want := min(batch, perRing-k, b.N-done)
			if batch == 1 {
				ok, err := br.dev.Pop(&cs[0])
				if !ok || err != nil {
					b.Fatal(ok, err)
				}
				if err := br.dev.Push(cs[0].Head, 64); err != nil {
					b.Fatal(err)
				}
			} else {
				n, err := br.dev.PopBatch(cs[:want])
				if n != want || err != nil {
					b.Fatal(n, err)
				}
				for i := range n {
					elems[i] = UsedElem{cs[i].Head, 64}
				}
				if err := br.dev.PushBatch(elems[:n]); err != nil {
					b.Fatal(err)
				}
			}
			br.dev.NeedsInterrupt()
			k += want
			done += want
		}
	}
}

// Packed device side, as BenchmarkDevicePopPush*: pop a chain and push it
// back (plus the interrupt check), per chain; batched variants pop and
// push 32 chains at a time.
func BenchmarkPackedDevicePopPush1Desc(b *testing.B)        { benchPackedPopPush(b, 1, 1) }
func BenchmarkPackedDevicePopPush4Desc(b *testing.B)        { benchPackedPopPush(b, 4, 1) }
func BenchmarkPackedDevicePopPush1DescBatch32(b *testing.B) { benchPackedPopPush(b, 1, 32) }
func BenchmarkPackedDevicePopPush4DescBatch32(b *testing.B) { benchPackedPopPush(b, 4, 32) }

// BenchmarkPackedDriverAddReclaim is BenchmarkDriverAddReclaim for a
// packed ring: Add of a 2-buffer chain, Publish, NeedsKick and a reclaim
// per chain, in batches of 32, the device simulated by writing used
// descriptors directly (one per chain, at the chain's first slot); the
// loop of BenchmarkABPackedReclaimBatch's A side (packedAddReclaimLoop).
func BenchmarkPackedDriverAddReclaim(b *testing.B) {
	loop := packedAddReclaimLoop(b, 2, false)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := abbench.ThreadCPU()
	defer func() { b.ReportMetric(float64(abbench.ThreadCPU()-cpu0)/float64(b.N), "cpu-ns/op") }()
	loop(b.N)
}

// BenchmarkPackedCrossGoroutine is BenchmarkCrossGoroutine on a packed
// ring: throughput between a driver goroutine and a polling device
// goroutine (ring size 256, 1-descriptor chains, batches of up to 32), in
// Mpps.
func BenchmarkPackedCrossGoroutine(b *testing.B) {
	_, mem, _, data := trafficMemory(b, 256)
	defer mem.Close()
	l := ContiguousPackedLayout(0, 256)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: fPacked})
	if err != nil {
		b.Fatal(err)
	}
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: fPacked, State: InitialState(fPacked)})
	if err != nil {
		b.Fatal(err)
	}
	dev.DisableNotify()
	drv.DisableInterrupts()
	n := b.N
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		cs := make([]Chain, 32)
		elems := make([]UsedElem, 32)
		for got := 0; got < n; {
			k, err := dev.PopBatch(cs)
			if err != nil {
				done <- err
				return
			}
			if k == 0 {
				runtime.Gosched()
				continue
			}
			for i := range k {
				elems[i] = UsedElem{cs[i].Head, 64}
			}
			if err := dev.PushBatch(elems[:k]); err != nil {
				done <- err
				return
			}
			got += k
		}
		done <- nil
	}()
	bufs := []Buffer{{Addr: data, Len: 1500, Writable: true}}
	sent, recvd := 0, 0
	for recvd < n {
		added := 0
		for sent < n && added < 32 && drv.NumFree() > 0 {
			if _, err := drv.Add(bufs); err != nil {
				b.Fatal(err)
			}
			sent++
			added++
		}
		drv.Publish()
		got := 0
		for {
			_, _, ok, err := drv.Reclaim()
			if err != nil {
				b.Fatal(err)
			}
			if !ok {
				break
			}
			got++
		}
		recvd += got
		if added == 0 && got == 0 {
			runtime.Gosched()
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(n)/time.Since(start).Seconds()/1e6, "Mpps")
}
