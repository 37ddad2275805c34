package softnet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/fuzzinput"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// FuzzReceiveRing lets the input be a hostile driver of one receive queue:
// it writes descriptors with any address, length, flags and link (or
// buffer id), makes any head available (or moves avail.idx anywhere),
// stops and restarts the queue, while frames of any size are delivered
// into it, with and without MRG_RXBUF, on split and packed rings. Whatever
// it writes:
//   - Deliver returns nil, ErrNoBuffer or ErrBufferTooSmall, or an error
//     that broke the queue (QueueErr then reports it); nothing panics;
//   - the receive stash stays consistent: the held chains lie inside it,
//     and the segment room it counts (segExtra) is the room its entries
//     have, within segMax and the room of a few of the longest chains
//     vring pops (popping chains ahead of a frame grows none of them);
//   - a split ring's descriptor table and available ring, which are the
//     driver's, are never written (unless the driver gave the device a
//     buffer there, or an indirect table that may name one);
//   - a queue stopped without an error has nothing in flight: every chain
//     it popped was used or given back (NextAvail == NextUsed);
//   - the used entries return the chains the device popped in the order
//     it popped them (a split ring's heads; a packed ring's buffer ids,
//     each used descriptor at the used position, skipping the rest of its
//     chain), and a stop gives back exactly the chains popped and not
//     used (splitOrder, packedOrder);
//   - the queue logs into a dirty log through a per-queue cache, as
//     vdpa.Local runs it: after each operation, once the cache's marks are
//     applied (by a stop, as vdpa.Local does, or by the test), every byte
//     of guest memory the device changed in it is marked, whatever the
//     driver wrote.
//
// Input: [0] configuration (bit 0 MRG_RXBUF, bit 1 packed, bit 2
// INDIRECT_DESC, bit 3 EVENT_IDX, bits 4-7 the size: 2<<(b%4) split,
// 1+b packed), then operations (see the switch).
func FuzzReceiveRing(f *testing.F) {
	// Seeds, op by op (see the switch): a descriptor i with a buffer at
	// data+5*off (so of any alignment) of 16*l bytes, flags fl and link
	// (or buffer id) nx; a chain made available; a frame of 14+8*n bytes;
	// a stop and restart.
	desc := func(i, off, l, fl, nx byte) []byte { return []byte{0, i, 0, off, l, fl, nx} }
	post := func(h byte) []byte { return []byte{1, h} }
	deliverOp := func(n byte) []byte { return []byte{2, n} }
	restart := []byte{3, 1}
	seed := func(cfg byte, ops ...[]byte) []byte {
		b := []byte{cfg}
		for _, op := range ops {
			b = append(b, op...)
		}
		return b
	}
	const w, nxt = 2, 1 // WRITE, NEXT
	fourBufs := [][]byte{desc(0, 0, 8, w, 0), desc(1, 32, 8, w, 1), desc(2, 64, 8, w, 2), desc(3, 96, 8, w, 3)}
	frames := [][]byte{deliverOp(2), deliverOp(20), deliverOp(2), restart, deliverOp(40)}
	// Mergeable split ring of 4: four 128-byte buffers, frames of 1 to 3.
	f.Add(seed(0x11, append(append(fourBufs, post(0), post(1), post(2), post(3)), frames...)...))
	// The same on a packed ring of 5.
	f.Add(seed(0x43, append(append(fourBufs, post(0), post(0), post(0), post(0)), frames...)...))
	// Split ring of 16, no MRG_RXBUF: one 2 KiB buffer.
	f.Add(seed(0x30, desc(0, 0, 128, w, 0), post(0), deliverOp(100), restart))
	// A chain of sixteen zero-length writable descriptors in every entry.
	var long [][]byte
	for i := range byte(16) {
		fl := byte(w | nxt)
		if i == 15 {
			fl = w
		}
		long = append(long, desc(i, 0, 0, fl, i+1))
	}
	for range 8 {
		long = append(long, post(0))
	}
	f.Add(seed(0x31, append(long, deliverOp(100), deliverOp(100), restart, deliverOp(1))...))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 1 {
			return
		}
		in := fuzzinput.New(data)
		next := in.Next
		cfg := next()
		mrg, packed := cfg&1 != 0, cfg&2 != 0
		feat := base1
		if mrg {
			feat = feat.With(virtio.NetFMrgRxbuf)
		}
		ringFeat := virtio.Features(0).With(virtio.FVersion1)
		if cfg&4 != 0 {
			ringFeat = ringFeat.With(virtio.FIndirectDesc)
		}
		if cfg&8 != 0 {
			ringFeat = ringFeat.With(virtio.FEventIdx)
		}
		var size uint16
		var layout vring.Layout
		var ringBytes uint64
		if packed {
			size = 1 + uint16(cfg>>4)
			ringFeat = ringFeat.With(virtio.FRingPacked)
			layout = vring.ContiguousPackedLayout(0, size)
			ringBytes = vring.ContiguousPackedLayoutBytes(size)
		} else {
			size = 2 << (cfg >> 4 % 4)
			layout = vring.ContiguousLayout(0, size)
			ringBytes = vring.ContiguousLayoutBytes(size)
		}
		const dataBytes = 1 << 16
		dataAt := (ringBytes + 4095) &^ 4095
		backing := make([]byte, dataAt+dataBytes)
		// The dirty log, and what guest memory held at the last check, kept
		// up to date with the driver's own writes: a byte that differs
		// from it the device wrote.
		mem, log := fuzzMemory(t, backing)
		mirror := make([]byte, len(backing))
		d, err := New(nil)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Reset()
		if err := d.SetFeatures(feat); err != nil {
			t.Fatal(err)
		}
		state := vring.InitialState(ringFeat)
		var dq *vring.DeviceQueue
		start := func() {
			dq = newFuzzQueue(t, mem, log, layout, ringFeat, state)
			if err := d.StartQueue(0, dq, nil, nil); err != nil {
				t.Fatal(err)
			}
		}
		start()
		ord := newUsedOrder(packed, size, state, false)
		// stop stops the queue as vdpa.Local does (applying the marks its
		// log cache holds), checks that nothing is left in flight and that
		// the log covers every page the device changed, and keeps the
		// position for a restart.
		stop := func() {
			st, err := d.StopQueue(0)
			if err != nil {
				t.Fatal(err)
			}
			if err := dq.FlushLog(); err != nil {
				t.Fatal(err)
			}
			if rx := d.queues[0]; rx.loadErr() == nil && st.NextAvail != st.NextUsed {
				t.Fatalf("stopped with chains in flight: %+v", st)
			}
			checkLogged(t, log, backing, mirror)
			ord.after(t, backing, layout, st, true, d.queues[0].loadErr() != nil)
			state = st
		}
		running := true
		rx := d.queues[0]
		drv := newHostileDriver(in, backing, mirror, layout, size, packed, dataAt, dataBytes)
		// The split ring's descriptor table and available ring, as the
		// driver wrote them.
		_, availBytes, _ := vring.SplitSizes(size)
		driverArea := func() []byte {
			if packed {
				return nil
			}
			return backing[layout.Desc : uint64(layout.Avail)+availBytes]
		}
		drv.shadow = append([]byte(nil), driverArea()...)
		ringLent := false // a descriptor named the rings' memory, or an indirect table
		frame := make([]byte, 14+255*8)
		for i := range frame {
			frame[i] = byte(i)
		}
		for in.More() {
			op := next() % 6
			if running {
				ord.before(backing, layout, ringLent || rx.loadErr() != nil)
			}
			switch op {
			case 0: // write a descriptor
				if drv.desc() {
					ringLent = true
				}
			case 1: // make a chain available
				drv.post()
			case 2: // deliver a frame
				if !running {
					break
				}
				deliver(t, d, frame[:14+int(next())*8])
			case 3: // stop and restart the queue
				if running {
					stop()
					running = false
				}
				if next()%4 != 0 {
					start()
					running = true
				}
			case 4: // a hostile avail.idx (split) or a burst of frames
				if !packed {
					drv.setAvailIdx()
					break
				}
				fallthrough
			case 5: // a burst of frames
				for range 1 + next()%8 {
					if running {
						deliver(t, d, frame[:14+int(next())*8])
					}
				}
			}
			if running && op != 3 {
				ord.after(t, backing, layout, dq.State(), false, rx.loadErr() != nil)
			}
			checkStash(t, rx, size)
			if area := driverArea(); !ringLent && string(area) != string(drv.shadow) {
				t.Fatal("the device wrote the descriptor table or the available ring")
			}
			if running {
				// This goroutine drives the receive queue (it has no
				// worker), so it may apply the cache's marks, and the
				// check sees each operation's writes alone.
				if err := dq.FlushLog(); err != nil {
					t.Fatal(err)
				}
				checkLogged(t, log, backing, mirror)
			}
		}
		if running {
			stop()
		}
	})
}

// checkLogged checks that log marks every page where guest memory differs
// from mirror (what it held at the last check, with the driver's writes
// since), then makes mirror current and clears log (FuzzReceiveRing,
// FuzzControlQueue).
func checkLogged(t *testing.T, log *dirty.Bitmap, mem, mirror []byte) {
	t.Helper()
	const chunk = 4096 // compared whole first: most are unchanged
	for c := 0; c < len(mem); c += chunk {
		end := min(c+chunk, len(mem))
		if bytes.Equal(mem[c:end], mirror[c:end]) {
			continue
		}
		for i := c; i < end; i++ {
			if mem[i] != mirror[i] && !log.PageDirty(log.PageOf(uint64(i))) {
				t.Fatalf("the device wrote guest address %#x (%#x to %#x) and the dirty log does not mark it", i, mirror[i], mem[i])
			}
		}
	}
	copy(mirror, mem)
	if err := log.Clear(); err != nil {
		t.Fatal(err)
	}
}

// splitOrder follows the heads a split ring's device pops, read from a
// copy of the available ring taken before each operation (the driver
// writes nothing during one), and checks that the used entries return
// them in the order they were popped (softnet uses chains in pop order)
// and that a stop gives back exactly the chains popped and not used
// (FuzzReceiveRing, FuzzTransmitRing). It stops checking for good once the
// driver lends the rings' memory as a buffer (the device may then write
// the available ring), and once the queue breaks.
type splitOrder struct {
	on     bool
	size   uint16
	state  vring.QueueState // the device's position at the last check
	popped []uint16         // heads popped and not yet used, in pop order
	snap   []uint16         // the available ring before the operation
}

func (o *splitOrder) before(mem []byte, l vring.Layout, off bool) {
	if off {
		o.on = false
	}
	if !o.on {
		return
	}
	o.snap = o.snap[:0]
	for i := range o.size {
		o.snap = append(o.snap, binary.LittleEndian.Uint16(mem[uint64(l.Avail)+4+2*uint64(i):]))
	}
}

// after checks the operation that left the device at st (a stop's state
// when stopped; broken when the queue broke in it).
func (o *splitOrder) after(t *testing.T, mem []byte, l vring.Layout, st vring.QueueState, stopped, broken bool) {
	t.Helper()
	if broken {
		o.on = false
	}
	if !o.on {
		return
	}
	if !stopped {
		n := st.NextAvail - o.state.NextAvail
		if n > o.size {
			t.Fatalf("NextAvail moved from %d to %d in one operation", o.state.NextAvail, st.NextAvail)
		}
		for i := range n {
			o.popped = append(o.popped, o.snap[(o.state.NextAvail+i)%o.size])
		}
	}
	for i := range st.NextUsed - o.state.NextUsed {
		at := uint64(l.Used) + 4 + 8*uint64((o.state.NextUsed+i)%o.size)
		id := binary.LittleEndian.Uint32(mem[at:])
		if len(o.popped) == 0 || id != uint32(o.popped[0]) {
			t.Fatalf("used entry %d is head %d; heads popped and not used: %v", o.state.NextUsed+i, id, o.popped)
		}
		o.popped = o.popped[1:]
	}
	if stopped {
		if back := o.state.NextAvail - st.NextAvail; int(back) != len(o.popped) {
			t.Fatalf("a stop gave back %d chains; popped and not used: %v", back, o.popped)
		}
		o.popped = o.popped[:0]
	}
	o.state = st
}

// newUsedOrder returns the used-order check for a ring of size starting at
// state: packedOrder on a packed ring, splitOrder otherwise. zeroLen (a
// transmit queue's) also requires every packed used length to be 0.
func newUsedOrder(packed bool, size uint16, state vring.QueueState, zeroLen bool) usedOrder {
	if packed {
		return &packedOrder{on: true, size: size, state: state, zeroLen: zeroLen}
	}
	return &splitOrder{on: true, size: size, state: state}
}

// usedOrder is splitOrder or packedOrder.
type usedOrder interface {
	before(mem []byte, l vring.Layout, off bool)
	after(t *testing.T, mem []byte, l vring.Layout, st vring.QueueState, stopped, broken bool)
	active() bool
}

func (o *splitOrder) active() bool { return o.on }

// packedOrder is splitOrder for a packed ring (FuzzReceiveRing,
// FuzzTransmitRing): it reads the chains the
// device popped (their descriptor counts and buffer ids, the id being the
// last descriptor's) from a copy of the descriptor ring taken before each
// operation, and checks that the used descriptors the device writes, each
// at the used position and skipping the rest of its chain's descriptors
// (§2.8.6), return their ids in pop order with the used wrap counter's
// AVAIL/USED bits (§2.8.1), and that a stop gives back exactly the
// descriptors of the chains popped and not used. Like splitOrder it stops
// checking once the rings' memory is lent as a buffer or the queue breaks.
type packedOrder struct {
	on      bool
	size    uint16
	zeroLen bool // used lengths must be 0 (a transmit queue's)
	state   vring.QueueState
	popped  []packedPopped
	snap    []byte // the descriptor ring before the operation
}

type packedPopped struct{ id, n uint16 }

func (o *packedOrder) active() bool { return o.on }

func (o *packedOrder) before(mem []byte, l vring.Layout, off bool) {
	if off {
		o.on = false
	}
	if !o.on {
		return
	}
	o.snap = append(o.snap[:0], mem[l.Desc:uint64(l.Desc)+16*uint64(o.size)]...)
}

// lin is a packed position (index, wrap counter in bit 15) as a count of
// descriptors modulo 2*size, for distances between positions.
func (o *packedOrder) lin(pos uint16) int {
	i := int(pos &^ vring.PackedWrapBit)
	if pos&vring.PackedWrapBit == 0 {
		i += int(o.size)
	}
	return i
}

// dist is how many descriptors lie from position a to position b.
func (o *packedOrder) dist(a, b uint16) int {
	return ((o.lin(b)-o.lin(a))%(2*int(o.size)) + 2*int(o.size)) % (2 * int(o.size))
}

func (o *packedOrder) after(t *testing.T, mem []byte, l vring.Layout, st vring.QueueState, stopped, broken bool) {
	t.Helper()
	if broken {
		o.on = false
	}
	if !o.on {
		return
	}
	size := int(o.size)
	if !stopped {
		// The chains popped: from the old position on, descriptors up to
		// one without NEXT (an indirect one stands alone).
		k, at := o.dist(o.state.NextAvail, st.NextAvail), o.lin(o.state.NextAvail)
		if k > size {
			t.Fatalf("NextAvail moved from %#x to %#x in one operation", o.state.NextAvail, st.NextAvail)
		}
		for k > 0 {
			c := packedPopped{}
			for {
				d := o.snap[16*(at%size):]
				c.n++
				k--
				at++
				if binary.LittleEndian.Uint16(d[14:])&vring.DescFNext == 0 {
					c.id = binary.LittleEndian.Uint16(d[12:])
					break
				}
				if k == 0 {
					t.Fatalf("the device popped part of a chain: NextAvail %#x to %#x", o.state.NextAvail, st.NextAvail)
				}
			}
			o.popped = append(o.popped, c)
		}
	}
	u, k := o.state.NextUsed, o.dist(o.state.NextUsed, st.NextUsed)
	for k > 0 {
		if len(o.popped) == 0 {
			t.Fatalf("used descriptors from %#x to %#x, more than the chains popped", o.state.NextUsed, st.NextUsed)
		}
		c := o.popped[0]
		at := uint64(l.Desc) + 16*uint64(u&^vring.PackedWrapBit)
		id := binary.LittleEndian.Uint16(mem[at+12:])
		flags := binary.LittleEndian.Uint16(mem[at+14:])
		want := uint16(0)
		if u&vring.PackedWrapBit != 0 {
			want = vring.DescFAvail | vring.DescFUsed
		}
		if id != c.id || flags&(vring.DescFAvail|vring.DescFUsed) != want {
			t.Fatalf("used descriptor at %#x: id %d, flags %#x; want id %d (popped and not used: %v), AVAIL/USED %#x",
				u, id, flags, c.id, o.popped, want)
		}
		if l := binary.LittleEndian.Uint32(mem[at+8:]); o.zeroLen && l != 0 {
			t.Fatalf("used descriptor at %#x: length %d, want 0", u, l)
		}
		if int(c.n) > k {
			t.Fatalf("NextUsed moved from %#x to %#x, into the chain of id %d (%d descriptors)", o.state.NextUsed, st.NextUsed, c.id, c.n)
		}
		k -= int(c.n)
		o.popped = o.popped[1:]
		u = o.advance(u, c.n)
	}
	if stopped {
		back, held := o.dist(st.NextAvail, o.state.NextAvail), 0
		for _, c := range o.popped {
			held += int(c.n)
		}
		if back != held {
			t.Fatalf("a stop gave back %d descriptors; popped and not used: %v", back, o.popped)
		}
		o.popped = o.popped[:0]
	}
	o.state = st
}

// advance moves packed position u on by n descriptors.
func (o *packedOrder) advance(u, n uint16) uint16 {
	i, w := u&^vring.PackedWrapBit+n, u&vring.PackedWrapBit
	if i >= o.size {
		i -= o.size
		w ^= vring.PackedWrapBit
	}
	return i | w
}

// deliver delivers frame and checks the outcome FuzzReceiveRing allows.
func deliver(t *testing.T, d *Device, frame []byte) {
	err := d.Deliver(0, frame)
	switch {
	case err == nil, errors.Is(err, ErrNoBuffer), errors.Is(err, ErrBufferTooSmall):
	default:
		if qerr := d.QueueErr(0); qerr == nil {
			t.Fatalf("Deliver: %v, and the queue is not broken", err)
		}
	}
}

// checkStash checks the receive stash's bookkeeping (FuzzReceiveRing).
func checkStash(t *testing.T, rx *queue, size uint16) {
	rx.mu.Lock()
	defer rx.mu.Unlock()
	if rx.stash == nil {
		return
	}
	if rx.sh < 0 || rx.nstash < 0 || rx.sh+rx.nstash > len(rx.stash) {
		t.Fatalf("held chains %d+%d outside a stash of %d", rx.sh, rx.nstash, len(rx.stash))
	}
	extra := 0
	for i := range rx.stash {
		extra += max(cap(rx.stash[i].Segs)-rxSegs, 0)
	}
	if extra != rx.segExtra {
		t.Fatalf("stash room %d, counted %d", extra, rx.segExtra)
	}
	if limit := rx.segMax + 4*vring.MaxChainSegments(size); extra > limit {
		t.Fatalf("stash room %d beyond %d (segMax %d)", extra, limit, rx.segMax)
	}
}
