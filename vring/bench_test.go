package vring

import (
	"encoding/binary"
	"runtime"
	"testing"
	"time"

	"github.com/vdpakit/vdpakit/internal/abbench"
	"github.com/vdpakit/vdpakit/virtio"
)

// benchRing is a size-256 ring whose driver side is pre-written: chains of
// nd descriptors at heads 0, nd, 2nd, ... and an available ring that repeats
// them, so refilling costs one avail.idx store per ring's worth of chains.
type benchRing struct {
	mem     *Memory
	dev     *DeviceQueue
	region  []byte
	l       Layout
	availAt int
	avail   uint16
}

func newBenchRing(b *testing.B, nd int, feat virtio.Features) *benchRing {
	return newBenchRingOf(b, nd, feat, false)
}

// newBenchRingOf is newBenchRing; with scatter, a chain's descriptors are
// not consecutive in the table: chain h's k-th descriptor is h+k*256/nd
// (a driver whose free list was shuffled by out-of-order completions).
func newBenchRingOf(b *testing.B, nd int, feat virtio.Features, scatter bool) *benchRing {
	const size = 256
	r, err := NewMemfdRegion(0, 2<<20, nil)
	if err != nil {
		b.Fatal(err)
	}
	mem, _ := NewMemory(r)
	b.Cleanup(func() { mem.Close() })
	l := ContiguousLayout(0, size)
	g := r.Bytes()
	// The chains of the bench harness (bench/rings.go chainBuffers): 64-byte
	// buffers from 1 MiB on, the same for every chain; a 1-descriptor chain
	// is one readable buffer (a transmitted frame), a longer one half
	// readable, half writable (a request and its reply).
	slot := func(h, k int) int { return h*nd + k } // chain h's k-th descriptor
	if scatter {
		slot = func(h, k int) int { return h + k*size/nd }
	}
	for h := 0; h < size/nd; h++ {
		for k := range nd {
			var flags uint16
			next := 0
			if k < nd-1 {
				flags, next = DescFNext, slot(h, k+1)
			}
			if nd > 1 && k >= nd/2 {
				flags |= DescFWrite
			}
			writeDesc(g[l.Desc:], uint16(slot(h, k)), 1<<20+uint64(k)*64, 64, flags, uint16(next))
		}
	}
	for j := range size {
		binary.LittleEndian.PutUint16(g[int(l.Avail)+4+2*j:], uint16(slot(j%(size/nd), 0)))
	}
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat})
	if err != nil {
		b.Fatal(err)
	}
	dev.DisableNotify() // a polling device
	return &benchRing{mem: mem, dev: dev, region: g, l: l, availAt: int(l.Avail)}
}

// refill makes another ring's worth of chains available once the device
// has consumed (and pushed) everything.
func (br *benchRing) refill(nd int) {
	br.avail += uint16(256 / nd)
	binary.LittleEndian.PutUint16(br.region[br.availAt+2:], br.avail)
}

func benchPopPush(b *testing.B, nd, batch int) { benchPopPushOf(b, nd, batch, false) }

func benchPopPushOf(b *testing.B, nd, batch int, scatter bool) {
	br := newBenchRingOf(b, nd, 0, scatter)
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
		br.refill(nd)
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

// Device side: pop a chain and push it back (plus the interrupt check), per
// chain. Batched variants pop and push 32 chains at a time.
func BenchmarkDevicePopPush1Desc(b *testing.B)        { benchPopPush(b, 1, 1) }
func BenchmarkDevicePopPush4Desc(b *testing.B)        { benchPopPush(b, 4, 1) }
func BenchmarkDevicePopPush1DescBatch32(b *testing.B) { benchPopPush(b, 1, 32) }
func BenchmarkDevicePopPush4DescBatch32(b *testing.B) { benchPopPush(b, 4, 32) }

// The 4-descriptor chains again, their descriptors spread over the table.
func BenchmarkDevicePopPush4DescScattered(b *testing.B)        { benchPopPushOf(b, 4, 1, true) }
func BenchmarkDevicePopPush4DescScatteredBatch32(b *testing.B) { benchPopPushOf(b, 4, 32, true) }

// BenchmarkDriverAddReclaim measures the driver side per chain: Add of a
// 2-buffer chain, Publish, NeedsKick, and Reclaim, in batches of 32, with the
// device simulated by writing used entries directly. The Batch variant
// reclaims the 32 with one ReclaimBatch.
func BenchmarkDriverAddReclaim(b *testing.B)      { benchDriverAddReclaim(b, false) }
func BenchmarkDriverAddReclaimBatch(b *testing.B) { benchDriverAddReclaim(b, true) }

func benchDriverAddReclaim(b *testing.B, batched bool) {
	loop := driverAddReclaimLoop(b, 2, batched)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := abbench.ThreadCPU()
	defer func() { b.ReportMetric(float64(abbench.ThreadCPU()-cpu0)/float64(b.N), "cpu-ns/op") }()
	loop(b.N)
}

// BenchmarkCrossGoroutine is the split-ring throughput between a driver
// goroutine and a polling device goroutine (ring size 256, 1-descriptor
// chains, batches of up to 32), reported in Mpps.
func BenchmarkCrossGoroutine(b *testing.B) {
	_, mem, l, data := trafficMemory(b, 256)
	defer mem.Close()
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l})
	if err != nil {
		b.Fatal(err)
	}
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
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
