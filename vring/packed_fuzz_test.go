package vring

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vdpakit/vdpakit/internal/fuzzinput"
	"github.com/vdpakit/vdpakit/virtio"
)

// FuzzPackedDeviceWalk treats the input as guest memory holding a packed
// ring and lets the device side walk it: whatever the bytes, Pop must
// return chains whose every segment lies in guest memory, with a buffer id
// below the queue size and a ring descriptor count that keeps the used
// position where the driver expects it, or a *QueueError after which the
// queue stays broken; it must never panic, loop forever, or touch memory
// outside the regions.
//
// Input: [0] size (1 + data[0]%16: sizes that are not powers of two
// included), [1] features and mode bits (1 INDIRECT_DESC, 2 EVENT_IDX,
// 4 IN_ORDER, 8 PopBatch/PushBatch, 16 Prefetch, 32 PopBatchFit against
// Pop: popFitAgainstPop), [2:4] the initial position (index
// mod size, bit 15 the wrap counter; NextUsed = NextAvail), [4:] the
// contents of two adjacent 4 KiB regions at 0x1000 (the descriptor ring is
// at 0x1000; buffers may point anywhere).
func FuzzPackedDeviceWalk(f *testing.F) {
	f.Add([]byte{3, 3, 0, 0x80})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 4 {
			return
		}
		size := 1 + uint16(data[0]%16)
		feat := virtio.Features(0).With(virtio.FRingPacked)
		if data[1]&1 != 0 {
			feat = feat.With(virtio.FIndirectDesc)
		}
		if data[1]&2 != 0 {
			feat = feat.With(virtio.FEventIdx)
		}
		if data[1]&4 != 0 {
			feat = feat.With(virtio.FInOrder)
		}
		batch := data[1]&8 != 0
		prefetch := data[1]&16 != 0
		raw := binary.LittleEndian.Uint16(data[2:4])
		start := PackedIndex((raw&^PackedWrapBit)%size, raw&PackedWrapBit != 0)
		backing := make([]byte, 0x2000)
		copy(backing, data[4:])
		r1, _ := NewRegion(0x1000, backing[:0x1000:0x1000], nil)
		r2, _ := NewRegion(0x2000, backing[0x1000:], nil)
		mem, err := NewMemory(r1, r2)
		if err != nil {
			t.Fatal(err)
		}
		l := ContiguousPackedLayout(0x1000, size)
		opts := DeviceQueueOptions{Layout: l, Features: feat, State: QueueState{NextAvail: start, NextUsed: start}}
		dev, err := NewDeviceQueue(mem, opts)
		if err != nil {
			t.Fatal(err)
		}
		if data[1]&32 != 0 {
			popFitAgainstPop(t, dev, twinQueue(t, backing, opts), 2*int(size)+2)
			return
		}
		var cs [2]Chain
		for i := 0; i < 2*int(size)+2; i++ {
			var k int
			var err error
			if prefetch {
				checkPrefetch(t, dev, int(size))
			}
			if batch {
				k, err = dev.PopBatch(cs[:])
			} else {
				var ok bool
				ok, err = dev.Pop(&cs[0])
				if ok {
					k = 1
				}
			}
			if err != nil {
				var qe *QueueError
				if !errors.As(err, &qe) {
					t.Fatalf("error is not a *QueueError: %v", err)
				}
				if _, err2 := dev.Pop(&cs[0]); !errors.Is(err2, ErrQueueBroken) || !errors.Is(err2, qe.Err) {
					t.Fatalf("queue not broken after %v: %v", err, err2)
				}
				if dev.NeedsInterrupt() {
					t.Fatal("a broken queue asks for an interrupt")
				}
				return
			}
			if k == 0 {
				if _, err := dev.EnableNotify(); err != nil {
					var qe *QueueError
					if !errors.As(err, &qe) {
						t.Fatal(err)
					}
				}
				return
			}
			var descs uint16
			elems := make([]UsedElem, k)
			for j := range k {
				c := &cs[j]
				checkChain(t, mem, c, size)
				descs += c.Descs
				elems[j] = UsedElem{Head: c.Head, Len: uint32(min(c.WritableLen, 7))}
			}
			if n, ok := dev.State().PackedInFlight(size); !ok || n != descs {
				t.Fatalf("in flight %d (%v), popped chains hold %d descriptors", n, ok, descs)
			}
			if batch {
				err = dev.PushBatch(elems)
			} else {
				err = dev.PushChain(&cs[0], elems[0].Len)
			}
			if err != nil {
				t.Fatal(err)
			}
			if st := dev.State(); st.NextAvail != st.NextUsed {
				t.Fatalf("state %+v after pushing everything", st)
			}
			dev.NeedsInterrupt()
		}
	})
}

// checkChain checks a popped chain against guest memory.
func checkChain(t *testing.T, mem *Memory, c *Chain, size uint16) {
	t.Helper()
	if c.Head >= size {
		t.Fatalf("buffer id %d >= size %d", c.Head, size)
	}
	if c.Descs == 0 || c.Descs > size {
		t.Fatalf("chain of %d ring descriptors in a size-%d ring", c.Descs, size)
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
}

// FuzzPackedOps decodes the input as a sequence of driver and device
// operations on a packed ring and checks both sides against a model: the
// device sees exactly the chains the driver published, in order, with the
// driver's buffer ids; the device may complete them in any order (in pop
// order only with IN_ORDER, where PushBatch may skip used descriptors);
// the driver reclaims exactly what the device pushed, in push order, with
// the lengths it pushed; free descriptors and ids are never lost, and the
// device's in-flight count matches the model.
func FuzzPackedOps(f *testing.F) {
	f.Add([]byte{0x13, 0, 1, 2, 3, 4, 6, 0, 0, 2, 3, 5, 6})
	// Five chains (1, 3, 1, indirect 2, 1 descriptors), then PopBatchFit
	// batches that stop before a chain too long for its room and before
	// the indirect one, then push and reclaim everything.
	f.Add([]byte{0x18, 0, 0, 1, 0, 2, 1, 0, 0, 0, 1, 1, 2, 0, 0, 1, 2,
		0xB3, 1, 2, 4, 4, 0xB3, 0, 4, 4, 4, 0x93, 1, 1, 5, 1, 1, 1, 1, 1, 6, 6, 6, 6, 6})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 {
			return
		}
		in := fuzzinput.New(data)
		next := in.Next
		cfg := next()
		size := 1 + uint16(cfg%9)
		feat := virtio.Features(0).With(virtio.FRingPacked)
		if cfg&0x10 != 0 {
			feat = feat.With(virtio.FIndirectDesc)
		}
		if cfg&0x20 != 0 {
			feat = feat.With(virtio.FEventIdx)
		}
		inOrder := cfg&0x40 != 0
		if inOrder {
			feat = feat.With(virtio.FInOrder)
		}
		backing := make([]byte, 0x10000)
		reg, _ := NewRegion(0, backing, nil)
		mem, _ := NewMemory(reg)
		l := ContiguousPackedLayout(0, size)
		drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: feat})
		if err != nil {
			t.Fatal(err)
		}
		dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: feat, State: InitialState(feat)})
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
				if int(size)-descInUse < ch.ndesc {
					if !errors.Is(err, ErrNoSpace) {
						t.Fatalf("add with %d free: %v", int(size)-descInUse, err)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				seq++
				for _, o := range append(append(append([]opsChain(nil), added...), popped...), used...) {
					if o.head == h {
						t.Fatalf("buffer id %d given out twice", h)
					}
				}
				ch.head = h
				descInUse += ch.ndesc
				added = append(added, ch)
			case 2:
				drv.Publish()
				published = len(added)
				drv.NeedsKick()
			case 3: // pop, or with the op byte's top bit set PopBatchFit (opsPopFit)
				if raw >= 0x80 {
					opsPopFit(t, dev, raw, next, &added, &published, &popped, true)
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
				if c.Head != want.head || len(c.Segs) != len(want.bufs) || int(c.Descs) != want.ndesc {
					t.Fatalf("popped id %d with %d segs in %d descriptors, want %d with %d in %d",
						c.Head, len(c.Segs), c.Descs, want.head, len(want.bufs), want.ndesc)
				}
				for i, s := range c.Segs {
					b := want.bufs[i]
					if s.Addr != b.Addr || s.Len != b.Len || s.Writable != b.Writable {
						t.Fatalf("segment %d: %+v, want %+v", i, s, b)
					}
				}
				popped = append(popped, want)
			case 4, 5: // push one (any of the popped), or a batch
				if len(popped) == 0 {
					if err := dev.Push(0, 0); !errors.Is(err, ErrNotInFlight) {
						t.Fatalf("push with nothing in flight: %v", err)
					}
					continue
				}
				var pick []int
				if op == 4 {
					i := 0
					if !inOrder {
						i = int(next()) % len(popped)
					}
					pick = []int{i}
				} else {
					k := 1 + int(next())%len(popped)
					for i := range k {
						pick = append(pick, i)
					}
					if !inOrder && k > 1 && next()&1 != 0 { // reverse: out of order
						for i, j := 0, k-1; i < j; i, j = i+1, j-1 {
							pick[i], pick[j] = pick[j], pick[i]
						}
					}
				}
				elems := make([]UsedElem, len(pick))
				for i, pi := range pick {
					v := next()
					u := uint32(uint64(v) % (popped[pi].writable + 1))
					if v&0x80 != 0 {
						u = uint32(popped[pi].writable) // used completely: skippable with IN_ORDER
					}
					popped[pi].used = u
					elems[i] = UsedElem{popped[pi].head, u}
				}
				if err := dev.PushBatch(elems); err != nil {
					t.Fatal(err)
				}
				for _, pi := range pick {
					used = append(used, popped[pi])
				}
				keep := popped[:0]
				for i, ch := range popped {
					taken := false
					for _, pi := range pick {
						taken = taken || pi == i
					}
					if !taken {
						keep = append(keep, ch)
					}
				}
				popped = keep
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
			var inFlight int
			for _, ch := range popped {
				inFlight += ch.ndesc
			}
			if n, ok := dev.State().PackedInFlight(size); !ok || int(n) != inFlight {
				t.Fatalf("device in flight %d (%v), model %d", n, ok, inFlight)
			}
			if drv.Outstanding() != len(added)+len(popped)+len(used) {
				t.Fatalf("outstanding %d, model %d", drv.Outstanding(), len(added)+len(popped)+len(used))
			}
		}
	})
}
