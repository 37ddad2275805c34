package vring

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vdpakit/vdpakit/internal/fuzzinput"
	"github.com/vdpakit/vdpakit/virtio"
)

// FuzzDeviceWalk treats the input as guest memory holding a ring and lets
// the device side walk it: whatever the bytes, Pop must return chains whose
// every segment lies in guest memory, or a *QueueError after which the queue
// stays broken; it must never panic, loop forever, or touch memory outside
// the regions.
//
// Input: [0] size exponent, [1] features and mode bits (1 INDIRECT_DESC,
// 2 EVENT_IDX, 4 a 2-aligned available ring, 8 PopBatch, 16 Prefetch, 32
// PopBatchFit against Pop: popFitAgainstPop), [2:4] initial NextAvail,
// [4:] the contents of two adjacent 4 KiB regions at 0x1000 (the ring is
// at 0x1000; buffers may point anywhere).
func FuzzDeviceWalk(f *testing.F) {
	f.Add([]byte{2, 3, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		size := uint16(1) << (data[0] % 6)
		var feat virtio.Features
		if data[1]&1 != 0 {
			feat = feat.With(virtio.FIndirectDesc)
		}
		if data[1]&2 != 0 {
			feat = feat.With(virtio.FEventIdx)
		}
		start := binary.LittleEndian.Uint16(data[2:4])
		backing := make([]byte, 0x2000)
		copy(backing, data[4:])
		r1, _ := NewRegion(0x1000, backing[:0x1000:0x1000], nil)
		r2, _ := NewRegion(0x2000, backing[0x1000:], nil)
		mem, err := NewMemory(r1, r2)
		if err != nil {
			t.Fatal(err)
		}
		l := ContiguousLayout(0x1000, size)
		if data[1]&4 != 0 { // only 2-aligned available ring
			d, a, _ := SplitSizes(size)
			l.Avail += 2
			l.Used = (l.Desc + GuestAddr(d+a) + 2 + 3) &^ 3
		}
		opts := DeviceQueueOptions{Layout: l, Features: feat, State: QueueState{NextAvail: start, NextUsed: start}}
		dev, err := NewDeviceQueue(mem, opts)
		if err != nil {
			t.Fatal(err)
		}
		if data[1]&32 != 0 {
			popFitAgainstPop(t, dev, twinQueue(t, backing, opts), 2*int(size)+2)
			return
		}
		var cs [1]Chain
		c := &cs[0]
		batch := data[1]&8 != 0 // exercise PopBatch's own fast loop
		prefetch := data[1]&16 != 0
		for i := 0; i < 2*int(size)+2; i++ {
			var ok bool
			var err error
			if prefetch {
				checkPrefetch(t, dev, int(size))
			}
			if batch {
				var k int
				k, err = dev.PopBatch(cs[:])
				ok = k == 1
			} else {
				ok, err = dev.Pop(c)
			}
			if err != nil {
				var qe *QueueError
				if !errors.As(err, &qe) {
					t.Fatalf("error is not a *QueueError: %v", err)
				}
				if _, err2 := dev.Pop(c); !errors.Is(err2, ErrQueueBroken) || !errors.Is(err2, qe.Err) {
					t.Fatalf("queue not broken after %v: %v", err, err2)
				}
				return
			}
			if !ok {
				if _, err := dev.EnableNotify(); err != nil {
					var qe *QueueError
					if !errors.As(err, &qe) {
						t.Fatal(err)
					}
				}
				return
			}
			if c.Head >= size {
				t.Fatalf("head %d >= size %d", c.Head, size)
			}
			var rl, wl uint64
			for j, s := range c.Segs {
				if s.Writable != (j >= c.Readable) {
					t.Fatalf("segment %d writable=%v with %d readable", j, s.Writable, c.Readable)
				}
				if uint64(len(s.Buf)) != uint64(s.Len) {
					t.Fatalf("segment %d: len(Buf) %d != Len %d", j, len(s.Buf), s.Len)
				}
				if s.Len > 0 && !mem.Contains(s.Addr, uint64(s.Len)) {
					t.Fatalf("segment %d %v+%#x outside memory", j, s.Addr, s.Len)
				}
				// A zero-length one in a region or at the end of one.
				if s.Len == 0 && (s.Addr < 0x1000 || s.Addr > 0x3000) {
					t.Fatalf("empty segment %d at %v outside memory", j, s.Addr)
				}
				if s.Writable {
					wl += uint64(s.Len)
				} else {
					rl += uint64(s.Len)
				}
			}
			if rl != c.ReadableLen || wl != c.WritableLen {
				t.Fatalf("lengths %d/%d, chain says %d/%d", rl, wl, c.ReadableLen, c.WritableLen)
			}
			if err := dev.PushChain(c, uint32(min(wl, 7))); err != nil {
				t.Fatal(err)
			}
			dev.NeedsInterrupt()
		}
	})
}

// FuzzOps decodes the input as a sequence of driver and device operations
// and checks both sides against a FIFO model: the device sees exactly the
// chains the driver published, in order, and the driver reclaims exactly
// what the device pushed; free descriptors are never lost.
func FuzzOps(f *testing.F) {
	f.Add([]byte{0x13, 0, 1, 2, 3, 4, 6, 0, 0, 2, 3, 5, 6})
	// Five chains (1, 3, 1, indirect 2, 1 descriptors), then PopBatchFit
	// batches that stop before a chain too long for its room and before
	// the indirect one, then push and reclaim everything.
	f.Add([]byte{0x13, 0, 0, 1, 0, 2, 1, 0, 0, 0, 1, 1, 2, 0, 0, 1, 2,
		0xB3, 1, 2, 4, 4, 0xB3, 0, 4, 4, 4, 0x93, 1, 1, 5, 1, 1, 1, 1, 1, 6, 6, 6, 6, 6})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 {
			return
		}
		in := fuzzinput.New(data)
		next := in.Next
		cfg := next()
		size := uint16(2) << (cfg % 4)
		var feat virtio.Features
		if cfg&0x10 != 0 {
			feat = feat.With(virtio.FIndirectDesc)
		}
		if cfg&0x20 != 0 {
			feat = feat.With(virtio.FEventIdx)
		}
		backing := make([]byte, 0x10000)
		reg, _ := NewRegion(0, backing, nil)
		mem, _ := NewMemory(reg)
		l := ContiguousLayout(0, size)
		drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: feat})
		if err != nil {
			t.Fatal(err)
		}
		dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat})
		if err != nil {
			t.Fatal(err)
		}
		var added, popped, used []opsChain
		published := 0 // of added
		descInUse := 0
		var c Chain
		seq := 0
		for in.More() {
			raw := next()
			switch op := raw % 8; op {
			case 0, 1: // add / add indirect
				n := 1 + int(next()%4)
				nw := int(next()) % (n + 1)
				bufs := make([]Buffer, n)
				var w uint64
				for i := range bufs {
					bufs[i] = Buffer{Addr: GuestAddr(0x8000 + 64*(seq%64) + 8*i), Len: uint32(1 + i), Writable: i >= n-nw}
					if bufs[i].Writable {
						w += uint64(bufs[i].Len)
					}
				}
				ch := opsChain{bufs: bufs, ndesc: n, writable: w}
				var h uint16
				var err error
				if op == 1 && feat.Has(virtio.FIndirectDesc) {
					ch.ndesc, ch.indirect = 1, true
					h, err = drv.AddIndirect(GuestAddr(0x4000+64*(seq%64)), bufs)
					if n > int(size) {
						if !errors.Is(err, ErrBadChain) {
							t.Fatalf("indirect chain of %d in size-%d queue: %v", n, size, err)
						}
						continue
					}
				} else {
					h, err = drv.Add(bufs)
				}
				if size-uint16(descInUse) < uint16(ch.ndesc) {
					if !errors.Is(err, ErrNoSpace) {
						t.Fatalf("add with %d free: %v", size-uint16(descInUse), err)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				// Only a chain that was added consumes a buffer and table
				// slot: a failed add must not advance seq, or enough
				// failures would wrap it onto the slots of a chain still
				// waiting to be popped and rewrite its indirect table.
				seq++
				ch.head = h
				descInUse += ch.ndesc
				added = append(added, ch)
			case 2:
				drv.Publish()
				published = len(added)
				drv.NeedsKick()
			case 3: // pop, or with the op byte's top bit set PopBatchFit (opsPopFit)
				if raw >= 0x80 {
					opsPopFit(t, dev, raw, next, &added, &published, &popped, false)
					break
				}
				ok, err := dev.Pop(&c)
				if err != nil {
					t.Fatal(err)
				}
				if ok != (published > 0) {
					t.Fatalf("pop ok=%v with %d published", ok, published)
				}
				if !ok {
					continue
				}
				want := added[0]
				added, published = added[1:], published-1
				if c.Head != want.head || len(c.Segs) != len(want.bufs) {
					t.Fatalf("popped head %d with %d segs, want %d with %d", c.Head, len(c.Segs), want.head, len(want.bufs))
				}
				for i, s := range c.Segs {
					b := want.bufs[i]
					if s.Addr != b.Addr || s.Len != b.Len || s.Writable != b.Writable {
						t.Fatalf("segment %d: %+v, want %+v", i, s, b)
					}
				}
				popped = append(popped, want)
			case 4, 5: // push one, or push all as a batch
				if len(popped) == 0 {
					if err := dev.Push(0, 0); !errors.Is(err, ErrNotInFlight) {
						t.Fatalf("push with nothing in flight: %v", err)
					}
					continue
				}
				k := 1
				if op == 5 {
					k = len(popped)
				}
				elems := make([]UsedElem, k)
				for i := range k {
					popped[i].used = uint32(uint64(next()) % (popped[i].writable + 1))
					elems[i] = UsedElem{popped[i].head, popped[i].used}
				}
				if err := dev.PushBatch(elems); err != nil {
					t.Fatal(err)
				}
				used = append(used, popped[:k]...)
				popped = popped[k:]
				dev.NeedsInterrupt()
			case 6: // reclaim one, or a batch (opsReclaim)
				opsReclaim(t, drv, raw, &used, &descInUse)
			case 7: // notification toggles
				switch next() % 4 {
				case 0:
					dev.DisableNotify()
				case 1:
					if _, err := dev.EnableNotify(); err != nil {
						t.Fatal(err)
					}
				case 2:
					drv.DisableInterrupts()
				case 3:
					if _, err := drv.EnableInterrupts(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if drv.NumFree() != int(size)-descInUse {
				t.Fatalf("NumFree %d, model %d", drv.NumFree(), int(size)-descInUse)
			}
			if inFlight := dev.State().NextAvail - dev.State().NextUsed; int(inFlight) != len(popped) {
				t.Fatalf("device in flight %d, model %d", inFlight, len(popped))
			}
		}
	})
}

// opsChain is a chain of the FuzzOps and FuzzPackedOps models: its
// buffers, ring descriptors and writable bytes, its head (or buffer id)
// once added and the length the device reported once used.
type opsChain struct {
	head     uint16
	bufs     []Buffer
	indirect bool
	ndesc    int
	writable uint64
	used     uint32
}

// opsReclaim is op 6 of both ops fuzzers: one Reclaim, or with the op
// byte's top bit set a ReclaimBatch of 1+(raw>>4)&3. Whatever comes back
// must be the oldest chains of used, in order, with the lengths the device
// reported, and as many as were used (up to the batch); they leave used
// and give their descriptors back to *descInUse.
func opsReclaim(t *testing.T, drv *DriverQueue, raw byte, used *[]opsChain, descInUse *int) {
	var elems [4]UsedElem
	var got []UsedElem
	if raw >= 0x80 {
		b := 1 + int(raw>>4)&3
		k, err := drv.ReclaimBatch(elems[:b])
		if err != nil {
			t.Fatal(err)
		}
		if k != min(b, len(*used)) {
			t.Fatalf("reclaimed a batch of %d of %d with %d used", k, b, len(*used))
		}
		got = elems[:k]
	} else {
		h, n, ok, err := drv.Reclaim()
		if err != nil {
			t.Fatal(err)
		}
		if ok != (len(*used) > 0) {
			t.Fatalf("reclaim ok=%v with %d used", ok, len(*used))
		}
		if ok {
			elems[0] = UsedElem{h, n}
			got = elems[:1]
		}
	}
	for _, e := range got {
		u := (*used)[0]
		if e.Head != u.head || e.Len != u.used {
			t.Fatalf("reclaimed %d/%d, want %d/%d", e.Head, e.Len, u.head, u.used)
		}
		*descInUse -= u.ndesc
		*used = (*used)[1:]
	}
}

// opsPopFit is op 3 of both ops fuzzers with the op byte's top bit set: a
// PopBatchFit of 1+(raw>>4)&3 Chains, each with room for next()%5
// segments. It must pop the oldest published chains, in order, at least one
// when any is published; it may stop early only before a chain longer than
// the room of the Chain it would go into, or one that is not a plain run
// of direct descriptors (an indirect one, or on a packed ring one that
// runs past the ring's end); and it must not grow the Segs of any Chain
// but the first. What it popped leaves added for popped.
func opsPopFit(t *testing.T, dev *DeviceQueue, raw byte, next func() byte, added *[]opsChain, published *int, popped *[]opsChain, packed bool) {
	var cs [4]Chain
	var room [4]int
	b := 1 + int(raw>>4)&3
	for i := range b {
		room[i] = int(next() % 5)
		cs[i].Segs = make([]Segment, 0, room[i])
	}
	pos := dev.State().AvailIndex()
	k, err := dev.PopBatchFit(cs[:b])
	if err != nil {
		t.Fatal(err)
	}
	if k > *published || (k == 0) != (*published == 0) {
		t.Fatalf("PopBatchFit popped %d of %d with %d published", k, b, *published)
	}
	for i := range k {
		c, want := &cs[i], (*added)[i]
		if c.Head != want.head || len(c.Segs) != len(want.bufs) || (packed && int(c.Descs) != want.ndesc) {
			t.Fatalf("PopBatchFit chain %d: id %d with %d segs in %d descriptors, want %d with %d in %d",
				i, c.Head, len(c.Segs), c.Descs, want.head, len(want.bufs), want.ndesc)
		}
		for j, s := range c.Segs {
			if w := want.bufs[j]; s.Addr != w.Addr || s.Len != w.Len || s.Writable != w.Writable {
				t.Fatalf("PopBatchFit chain %d segment %d: %+v, want %+v", i, j, s, w)
			}
		}
		if i > 0 && cap(c.Segs) != room[i] {
			t.Fatalf("PopBatchFit grew chain %d's Segs", i)
		}
		pos += uint16(want.ndesc)
	}
	if k < b && k < *published {
		next := (*added)[k]
		wraps := packed && int(pos%dev.Size())+next.ndesc > int(dev.Size())
		if !next.indirect && len(next.bufs) <= room[k] && !wraps {
			t.Fatalf("PopBatchFit stopped at %d of %d before a chain of %d direct descriptors with room for %d",
				k, b, len(next.bufs), room[k])
		}
	}
	*popped = append(*popped, (*added)[:k]...)
	*added, *published = (*added)[k:], *published-k
}

// twinQueue is a device queue with opts over its own copy of a fuzz
// input's two regions (backing: 0x2000 bytes at 0x1000), for
// popFitAgainstPop.
func twinQueue(t *testing.T, backing []byte, opts DeviceQueueOptions) *DeviceQueue {
	b := append([]byte(nil), backing...)
	r1, _ := NewRegion(0x1000, b[:0x1000:0x1000], nil)
	r2, _ := NewRegion(0x2000, b[0x1000:], nil)
	mem, err := NewMemory(r1, r2)
	if err != nil {
		t.Fatal(err)
	}
	q, err := NewDeviceQueue(mem, opts)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// popFitAgainstPop is the device-walk fuzzers' PopBatchFit mode: dev pops
// with PopBatchFit into four Chains of 1-4 segments' room, ref (a twin
// over its own copy of the same memory) pops the same ring with Pop, and
// both push what they popped. PopBatchFit must give exactly Pop's chains,
// in order, without growing any Chain but the first; report the error
// Pop reports, once Pop reaches the chain that breaks a rule; and find
// the ring empty when Pop does.
func popFitAgainstPop(t *testing.T, dev, ref *DeviceQueue, rounds int) {
	var cs, rs [4]Chain
	for round := range rounds {
		var room [4]int
		for j := range cs {
			room[j] = 1 + (round+j)%4
			cs[j].Segs = make([]Segment, 0, room[j])
		}
		k, err := dev.PopBatchFit(cs[:])
		for j := range k {
			ok, rerr := ref.Pop(&rs[j])
			if rerr != nil || !ok {
				t.Fatalf("round %d: PopBatchFit popped chain %d, Pop: %v %v", round, j, ok, rerr)
			}
			c, r := &cs[j], &rs[j]
			if c.Head != r.Head || c.Descs != r.Descs || c.Readable != r.Readable ||
				c.ReadableLen != r.ReadableLen || c.WritableLen != r.WritableLen || len(c.Segs) != len(r.Segs) {
				t.Fatalf("round %d chain %d: PopBatchFit %+v, Pop %+v", round, j, *c, *r)
			}
			for i := range c.Segs {
				if a, b := c.Segs[i], r.Segs[i]; a.Addr != b.Addr || a.Len != b.Len || a.Writable != b.Writable {
					t.Fatalf("round %d chain %d segment %d: PopBatchFit %+v, Pop %+v", round, j, i, a, b)
				}
			}
			if j > 0 && cap(c.Segs) != room[j] {
				t.Fatalf("round %d: chain %d's Segs grew to %d", round, j, cap(c.Segs))
			}
		}
		if err != nil {
			var qe *QueueError
			if !errors.As(err, &qe) {
				t.Fatalf("error is not a *QueueError: %v", err)
			}
			// The same rule at the same index: the same message (the
			// two errors are distinct values).
			if _, rerr := ref.Pop(&rs[0]); rerr == nil || rerr.Error() != err.Error() {
				t.Fatalf("round %d: PopBatchFit: %v, Pop: %v", round, err, rerr)
			}
			return
		}
		if k == 0 {
			if ok, rerr := ref.Pop(&rs[0]); ok || rerr != nil {
				t.Fatalf("round %d: PopBatchFit found the ring empty, Pop: %v %v", round, ok, rerr)
			}
			return
		}
		for j := range k {
			w := uint32(min(cs[j].WritableLen, 7))
			if err := dev.PushChain(&cs[j], w); err != nil {
				t.Fatal(err)
			}
			if err := ref.PushChain(&rs[j], w); err != nil {
				t.Fatal(err)
			}
		}
	}
}
