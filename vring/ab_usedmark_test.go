package vring

import (
	"testing"
)

// packedWriteUsedUnmarked is packedWriteUsed as it was before used
// descriptors carried the used mark (usedMark): the A/B reference of
// BenchmarkABPackedUsedMark, kept here only to measure what the mark's
// store costs.
func (q *DeviceQueue) packedWriteUsedUnmarked(elems []UsedElem) error {
	p := q.pk
	ids, descs := p.ids, p.r.descs
	size := uint32(len(descs))
	start := uint32(p.nextUsed)
	pos, bits := start, p.usedBits
	var count uint32
	var firstWord uint32
	for i, e := range elems {
		ent := &ids[e.Head]
		if pos >= size {
			break
		}
		d := &descs[pos]
		d.len = e.Len
		w := uint32(e.Head) | uint32(usedFlags(bits, e.Len, ent.writable))<<16
		if i == 0 {
			firstWord = w
		} else {
			*descWord(d) = w
		}
		n := uint32(ent.ndesc)
		count += n
		if pos += n; pos >= size {
			pos -= size
			bits ^= availUsed
		}
	}
	storeRelease32(descWord(&descs[start]), firstWord)
	p.nextUsed, p.usedBits = uint16(pos), bits
	p.inflight -= uint16(count)
	p.sinceSignal += count
	return nil
}

// packedPopPushLoop is a packed ring's whole cycle, batches of 32
// one-descriptor chains: the driver adds and publishes them, the device
// pops them with PopBatch and uses them with one batch of used
// descriptors (marked: PushBatch; unmarked: the same id checks, then
// packedWriteUsedUnmarked), the driver reclaims them with ReclaimBatch.
func packedPopPushLoop(b *testing.B, marked bool) func(n int) {
	_, drv, dev := newPackedPair(b, 256, 0)
	bufs := []Buffer{{Addr: 0x10000, Len: 1500, Writable: true}}
	chains := make([]Chain, 32)
	for i := range chains {
		chains[i].Segs = make([]Segment, 0, 4)
	}
	var elems, got [32]UsedElem
	return func(n int) {
		for done := 0; done < n; done += len(chains) {
			for range chains {
				if _, err := drv.Add(bufs); err != nil {
					b.Fatal(err)
				}
			}
			drv.Publish()
			k, err := dev.PopBatch(chains)
			if err != nil || k != len(chains) {
				b.Fatal(k, err)
			}
			for i := range chains {
				elems[i] = UsedElem{Head: chains[i].Head, Len: 64}
			}
			if marked {
				err = dev.PushBatch(elems[:])
			} else {
				for _, e := range elems {
					dev.pk.ids[e.Head].inflight = false
				}
				err = dev.packedWriteUsedUnmarked(elems[:])
			}
			if err != nil {
				b.Fatal(err)
			}
			if k, err := drv.ReclaimBatch(got[:]); err != nil || k != len(got) {
				b.Fatal(k, err)
			}
		}
	}
}

// BenchmarkABPackedUsedMark: the whole pop+push+reclaim cycle of a packed
// ring with the used mark written into every used descriptor (A, the
// library) against without it (B). B/A below 1 is what the mark costs.
func BenchmarkABPackedUsedMark(b *testing.B) {
	benchAB(b, packedPopPushLoop(b, true), packedPopPushLoop(b, false))
}
