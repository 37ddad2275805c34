package vring

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/vdpakit/vdpakit/internal/abbench"
)

// abSlice is the number of operations each side of an A/B benchmark runs
// before the other side runs.
const abSlice = 1024

// benchAB measures two loops that do the same work two ways with
// abbench.Run, alternating slices of abSlice operations: whatever the
// machine does meanwhile lands on both sides within milliseconds, so their
// ratio holds where two separate benchmark runs minutes apart can differ by
// half. It reports each side's median thread-CPU ns per operation
// (A-ns/op, B-ns/op) and the ratio of the medians (B/A); ns/op is for both
// sides together.
func benchAB(b *testing.B, a, bb func(n int)) {
	ma, mb := abbench.Run(b, abSlice, a, bb)
	b.ReportMetric(mb/ma, "B/A")
}

// driverAddReclaimLoop returns the loop of BenchmarkDriverAddReclaim with
// chains of nbuf buffers: add 32, publish, the device's used entries
// written directly, reclaim the 32 one at a time or with one ReclaimBatch.
func driverAddReclaimLoop(b *testing.B, nbuf int, batched bool) func(n int) {
	r, err := NewMemfdRegion(0, 1<<20, nil)
	if err != nil {
		b.Fatal(err)
	}
	mem, _ := NewMemory(r)
	b.Cleanup(func() { mem.Close() })
	l := ContiguousLayout(0, 256)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l})
	if err != nil {
		b.Fatal(err)
	}
	g := r.Bytes()
	bufs := []Buffer{{Addr: 0x10000, Len: 12}, {Addr: 0x10100, Len: 1500, Writable: true}}[2-nbuf:]
	var heads [32]uint16
	var elems [32]UsedElem
	var used uint16
	return func(n int) {
		for done := 0; done < n; done += len(heads) {
			for i := range heads {
				h, err := drv.Add(bufs)
				if err != nil {
					b.Fatal(err)
				}
				heads[i] = h
			}
			drv.Publish()
			drv.NeedsKick()
			for _, h := range heads {
				off := int(l.Used) + 4 + 8*int(used&255)
				binary.LittleEndian.PutUint32(g[off:], uint32(h))
				binary.LittleEndian.PutUint32(g[off+4:], 100)
				used++
			}
			binary.LittleEndian.PutUint16(g[int(l.Used)+2:], used)
			if batched {
				if k, err := drv.ReclaimBatch(elems[:]); k != len(elems) || err != nil {
					b.Fatal(k, err)
				}
				continue
			}
			for range heads {
				if _, _, ok, err := drv.Reclaim(); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		}
	}
}

// BenchmarkABControl runs the same loop on both sides (two instances, as
// the other A/B benchmarks have): what benchAB reports when there is no
// difference. B/A was 0.99-1.01 in 18 measurements of 19 here; the two
// instances' memory lies at different addresses, which moved one to 1.12
// (2026-12-05, 12:50 UTC), so a single run's ratio within about 0.1 of 1
// decides nothing.
func BenchmarkABControl(b *testing.B) {
	benchAB(b, driverAddReclaimLoop(b, 2, false), driverAddReclaimLoop(b, 2, false))
}

// BenchmarkABReclaimBatch: the driver loop reclaiming one entry at a time
// (A) against ReclaimBatch (B), for chains of 1 and 2 buffers.
func BenchmarkABReclaimBatch(b *testing.B) {
	for _, nbuf := range []int{1, 2} {
		b.Run(fmt.Sprintf("bufs=%d", nbuf), func(b *testing.B) {
			benchAB(b, driverAddReclaimLoop(b, nbuf, false), driverAddReclaimLoop(b, nbuf, true))
		})
	}
}

// abBatchLoop is the frame of the pop A/B benchmarks' sides: each pass
// pops want chains (up to len(cs)) of a 256-entry bench ring of nd
// descriptors a chain into cs[:want] with pop, pushes them back with one
// PushBatch, and calls refill once a ring's worth has gone round. pop is
// called once per batch; the per-chain loop inside it is spelled out by
// each side rather than shared through a function value called per chain,
// which would add a few nanoseconds to both sides and shrink the
// difference measured (it moved the packed 2-descriptor ratio from
// 0.83-0.88 to 0.87-1.00).
func abBatchLoop(b *testing.B, q *DeviceQueue, nd int, cs []Chain, refill func(), pop func(cs []Chain)) func(n int) {
	elems := make([]UsedElem, len(cs))
	perRing := 256 / nd
	k := perRing
	return func(n int) {
		for done := 0; done < n; {
			if k == perRing {
				refill()
				k = 0
			}
			want := min(len(cs), perRing-k)
			pop(cs[:want])
			for i := range want {
				elems[i] = UsedElem{cs[i].Head, 64}
			}
			if err := q.PushBatch(elems[:want]); err != nil {
				b.Fatal(err)
			}
			k += want
			done += want
		}
	}
}

// packedBy is how a packed A/B side pops a batch: packedWalk alone, or
// packedWalkDirect first (as packedPopBatch did per chain), or
// packedWalkRun (as packedPopBatch does now).
type packedBy int

const (
	packedByWalk packedBy = iota
	packedByDirect
	packedByRun
)

// packedWalkLoop pops the chains of a packed bench ring (nd descriptors
// each) the way by says and pushes them back 32 at a time.
func packedWalkLoop(b *testing.B, nd int, by packedBy) func(n int) {
	br := newPackedBenchRing(b, nd, 0)
	q := br.dev
	return abBatchLoop(b, q, nd, make([]Chain, 32), br.refill, func(cs []Chain) {
		for i := 0; i < len(cs); {
			if by == packedByRun {
				if got := q.packedWalkRun(cs[i:]); got > 0 {
					i += got
					continue
				}
			}
			// The first chain: the region cache is cold, and
			// the Chains have no Segs yet (packedWalk grows them).
			flags, ok := q.pk.headAvailable()
			if !ok {
				b.Fatal("no chain available")
			}
			if by != packedByDirect || !q.packedWalkDirect(&cs[i], flags) {
				if err := q.packedWalk(&cs[i], flags); err != nil {
					b.Fatal(err)
				}
			}
			i++
		}
	})
}

// BenchmarkABPackedWalkDirect: packed chains of 2 and 4 descriptors popped
// by packedWalk (A) against packedWalkDirect (B), each pushed back in
// batches of 32.
func BenchmarkABPackedWalkDirect(b *testing.B) {
	for _, nd := range []int{2, 4} {
		b.Run(fmt.Sprintf("descs=%d", nd), func(b *testing.B) {
			benchAB(b, packedWalkLoop(b, nd, packedByWalk), packedWalkLoop(b, nd, packedByDirect))
		})
	}
}

// splitWalkLoop pops the chains of a split bench ring (nd descriptors
// each) one by one with walkDirect, as PopBatch did for chains its
// one-descriptor loop does not take, or (run) with walkRun, as PopBatch
// does now, and pushes them back 32 at a time.
func splitWalkLoop(b *testing.B, nd int, run bool) func(n int) {
	br := newBenchRingOf(b, nd, 0, false)
	q := br.dev
	cs := make([]Chain, 32)
	for i := range cs {
		cs[i].Segs = make([]Segment, 0, 8)
	}
	refill := func() {
		br.refill(nd)
		if _, err := q.refresh(); err != nil {
			b.Fatal(err)
		}
	}
	return abBatchLoop(b, q, nd, cs, refill, func(cs []Chain) {
		for i := 0; i < len(cs); {
			if run {
				if got := q.walkRun(cs[i:]); got > 0 {
					i += got
					continue
				}
			}
			head := q.r.availEntry(q.lastAvail)
			if run || !q.walkDirect(head, &cs[i]) {
				if err := q.walk(head, &cs[i]); err != nil { // the first chain: the region cache is cold
					b.Fatal(err)
				}
			}
			q.lastAvail++
			i++
		}
	})
}

// BenchmarkABWalkDirect1vs4Desc: a chain of one descriptor (A) against one
// of four (B), both through walkDirect and pushed in batches of 32 (the
// ratio is what a 4-descriptor chain costs against a 1-descriptor one on
// the same path; PopBatch takes 1-descriptor chains on a faster one).
func BenchmarkABWalkDirect1vs4Desc(b *testing.B) {
	benchAB(b, splitWalkLoop(b, 1, false), splitWalkLoop(b, 4, false))
}

// BenchmarkABWalkRun: chains popped one walkDirect call each (A), as
// PopBatch did for chains popRun does not take, against walkRun (B), which
// pops a run of them in one loop; 2- and 4-descriptor chains, pushed in
// batches of 32.
func BenchmarkABWalkRun(b *testing.B) {
	for _, nd := range []int{2, 4} {
		b.Run(fmt.Sprintf("%d-desc", nd), func(b *testing.B) {
			benchAB(b, splitWalkLoop(b, nd, false), splitWalkLoop(b, nd, true))
		})
	}
}

// BenchmarkABPackedWalkRun: packed chains of 2 and 4 descriptors popped
// one packedWalkDirect call each (A), as packedPopBatch did, against
// packedWalkRun (B), each pushed back in batches of 32.
func BenchmarkABPackedWalkRun(b *testing.B) {
	for _, nd := range []int{2, 4} {
		b.Run(fmt.Sprintf("descs=%d", nd), func(b *testing.B) {
			benchAB(b, packedWalkLoop(b, nd, packedByDirect), packedWalkLoop(b, nd, packedByRun))
		})
	}
}

// popBatchLoop is BenchmarkDevicePopPush{1,4}DescBatch32's loop as a
// benchAB side: chains of nd descriptors popped with PopBatch and pushed
// with PushBatch, 32 at a time, with one interrupt check per batch.
func popBatchLoop(b *testing.B, nd int) func(n int) {
	br := newBenchRingOf(b, nd, 0, false)
	q := br.dev
	return abBatchLoop(b, q, nd, make([]Chain, 32), func() { br.refill(nd) }, func(cs []Chain) {
		q.NeedsInterrupt() // the previous batch's
		if got, err := q.PopBatch(cs); got != len(cs) || err != nil {
			b.Fatal(got, err)
		}
	})
}

// BenchmarkABPopBatch1vs4Desc: the 4-descriptor ratio as PopBatch
// users see it, in one binary: 1-descriptor chains (A, popRun's loop)
// against 4-descriptor ones (B, walkRun's), each popped and pushed in
// batches of 32. B/A is what a 4-descriptor chain costs against a
// 1-descriptor one.
func BenchmarkABPopBatch1vs4Desc(b *testing.B) {
	benchAB(b, popBatchLoop(b, 1), popBatchLoop(b, 4))
}

// packedAddReclaimLoop is BenchmarkPackedDriverAddReclaim's loop as an A/B
// side: add 32 chains of nbuf buffers, publish, the device's used
// descriptors written directly (one per chain, at its first slot), then
// reclaim the 32 with one ReclaimBatch (batched) or with packedReclaim
// once per chain (what packedReclaimBatch did before packedReclaimRun).
func packedAddReclaimLoop(b *testing.B, nbuf int, batched bool) func(n int) {
	r, err := NewMemfdRegion(0, 1<<20, nil)
	if err != nil {
		b.Fatal(err)
	}
	mem, _ := NewMemory(r)
	b.Cleanup(func() { mem.Close() })
	const size = 256
	l := ContiguousPackedLayout(0, size)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: fPacked})
	if err != nil {
		b.Fatal(err)
	}
	g := r.Bytes()[l.Desc:]
	bufs := []Buffer{{Addr: 0x10000, Len: 12}, {Addr: 0x10100, Len: 1500, Writable: true}}[2-nbuf:]
	var ids [32]uint16
	var elems [32]UsedElem
	used, wrap := 0, true
	return func(n int) {
		for done := 0; done < n; done += len(ids) {
			for i := range ids {
				id, err := drv.Add(bufs)
				if err != nil {
					b.Fatal(err)
				}
				ids[i] = id
			}
			drv.Publish()
			drv.NeedsKick()
			for _, id := range ids { // the "device"
				d := g[16*used:]
				fl := uint16(DescFWrite)
				if wrap {
					fl |= DescFAvail | DescFUsed
				}
				binary.LittleEndian.PutUint32(d[8:], 100)
				binary.LittleEndian.PutUint16(d[12:], id)
				binary.LittleEndian.PutUint16(d[14:], fl)
				if used += nbuf; used >= size {
					used -= size
					wrap = !wrap
				}
			}
			if batched {
				if k, err := drv.ReclaimBatch(elems[:]); k != len(elems) || err != nil {
					b.Fatal(k, err)
				}
				continue
			}
			for i := range elems {
				h, l, ok, err := drv.packedReclaim()
				if !ok || err != nil {
					b.Fatal(ok, err)
				}
				elems[i] = UsedElem{h, l}
			}
		}
	}
}

// BenchmarkABPackedReclaimBatch: a packed driver reclaiming 32 used chains
// by packedReclaim per chain (A, packedReclaimBatch's loop before
// packedReclaimRun) against ReclaimBatch (B), for chains of 1 and 2
// buffers.
func BenchmarkABPackedReclaimBatch(b *testing.B) {
	for _, nbuf := range []int{1, 2} {
		b.Run(fmt.Sprintf("bufs=%d", nbuf), func(b *testing.B) {
			benchAB(b, packedAddReclaimLoop(b, nbuf, false), packedAddReclaimLoop(b, nbuf, true))
		})
	}
}
