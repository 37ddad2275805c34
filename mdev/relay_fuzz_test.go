package mdev

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/fuzzinput"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// The relay fuzzer's guest memory: the guest ring at 0, buffers in
// [relayFuzzBufs, relayFuzzSpan), the dirty log over all of it. The shadow
// ring lives in a region of its own above it, as program places it.
const (
	relayFuzzSpan    = 64 << 10
	relayFuzzBufs    = 16 << 10
	relayFuzzTables  = 8 << 10 // indirect tables: 64 of relayFuzzMaxBufs descriptors
	relayFuzzMaxBufs = 5       // buffers a chain of the script has at most
)

// relayFuzz is one relayQueue between a guest driver (a DriverQueue, which
// the script may also scribble over) and a backing device (a DeviceQueue on
// the shadow ring, which the script drives: it pops, writes and uses chains
// in any order, and may lie), with the record the checks need.
type relayFuzz struct {
	t            *testing.T
	r            *fuzzinput.Reader
	rq           *relayQueue
	guest        *vring.DriverQueue
	backing      *vring.DeviceQueue
	gmem         *vring.Memory
	region       []byte // guest memory
	shadow       []byte // the shadow region (at shadowAlign)
	shadowLayout vring.Layout
	log          *dirty.Bitmap
	layout       vring.Layout
	feat         virtio.Features
	// ringBytes is the size of the guest ring's areas (from 0).
	ringBytes int

	// hostileGuest lets the script write anything into the guest ring;
	// hostileBacking lets the backing device use chains it never popped
	// and report more bytes than a chain can hold. They only permit those
	// operations: the first one that runs turns the exact checks off
	// (scribbled, bogus, lied), and the checks that hold for any input
	// stay on.
	hostileGuest, hostileBacking bool
	// scribbled: the script wrote into the guest ring; bogus: into the
	// shadow used ring; lied: the backing device reported more bytes than
	// a chain holds. Each voids the exact checks; bogus also voids the
	// log check, since the uses recorded are no longer the ones the relay
	// saw (a backing device that misreports what it wrote defeats any
	// dirty tracking that relies on its reports).
	scribbled, bogus, lied bool

	added     []uint16 // guest heads added, not yet published, in order
	published []uint16 // guest heads published, in avail order
	consumed  int      // shadow chains the backing device popped (a prefix of published, in order)
	// bufs is the buffers each guest head was last added with.
	bufs map[uint16][]vring.Buffer
	// held is the chains the backing device popped and has not used yet.
	held []heldChain
	// want is the guest's used entries to come, in the backing device's
	// use order: the guest chain each shadow chain carried and the length
	// reported; completed is how many of them the relay delivered.
	want      []vring.UsedElem
	completed int
	reclaimed int
	// written is the guest byte ranges the backing device wrote, with the
	// index into want of the use that reported them: once the relay has
	// delivered that use, every page of the range must be in the log.
	written []relayWrite
	fill    byte // the next byte value the backing device writes
	// tables holds the guest head using each indirect table slot, -1
	// when free (from the guest's reclaim of that head on).
	tables [64]int

	// guestCall is the guest's interrupt. asleep: the guest reclaimed
	// everything, enabled interrupts and found nothing pending, so it
	// waits for an interrupt: the next delivery must signal it.
	guestCall *vdpa.EventFD
	asleep    bool

	// What the run did, for TestRelayFuzzSeeds: the relay's error, if it
	// failed, the rewind's, the chains the resumed queue popped, and the
	// wake-ups the guest waited for and got.
	failed, rewindErr error
	resumed           []uint16
	wakeups           int
}

// heldChain is a shadow chain the backing device holds, with the guest
// chain it must carry (while both sides behave: published[consumed] when
// it was popped; noHead otherwise).
type heldChain struct {
	c     vring.Chain
	guest uint16
}

const noHead = 0xffff

type relayWrite struct {
	addr vring.GuestAddr
	n    uint64
	use  int
}

func newRelayFuzz(t *testing.T, r *fuzzinput.Reader) *relayFuzz {
	b0, b1 := r.Next(), r.Next()
	packed := b0&1 != 0
	size := uint16(1) << (1 + (b0>>1)%6) // 2..64
	if packed {
		size = 2 + uint16(b0>>1)%63 // 2..64, any size (§2.8)
	}
	feat := virtio.Features(0).With(virtio.FVersion1)
	if packed {
		feat = feat.With(virtio.FRingPacked)
	}
	if b1&1 != 0 {
		feat = feat.With(virtio.FEventIdx)
	}
	if b1&8 != 0 {
		feat = feat.With(virtio.FIndirectDesc)
	}
	gl, ringBytes := vring.ContiguousLayout(0, size), vring.ContiguousLayoutBytes(size)
	if packed {
		gl, ringBytes = vring.ContiguousPackedLayout(0, size), vring.ContiguousPackedLayoutBytes(size)
	}
	gr, err := vring.NewMemfdRegion(0, relayFuzzSpan, nil)
	require.NoError(t, err)
	gmem, err := vring.NewMemory(gr)
	require.NoError(t, err)
	t.Cleanup(func() { gmem.Close() })
	ss := shadowSize(size)
	sl := vring.ContiguousLayout(shadowAlign, ss)
	sr, err := vring.NewMemfdRegion(shadowAlign, (vring.ContiguousLayoutBytes(ss)+4095)&^4095, nil)
	require.NoError(t, err)
	t.Cleanup(func() { sr.Close() })
	// The relay's memory, as program makes it: the guest's region and the
	// shadow one. It is not closed (that would close both regions, which
	// their own cleanups close).
	mem, err := vring.NewMemory(gr, sr)
	require.NoError(t, err)
	log, err := dirty.New(relayFuzzSpan, nil)
	require.NoError(t, err)
	t.Cleanup(func() { log.Close() })

	guest, err := vring.NewDriverQueue(gmem, vring.DriverQueueOptions{Layout: gl, Features: feat})
	require.NoError(t, err)
	gq, err := vring.NewDeviceQueue(gmem, vring.DeviceQueueOptions{Layout: gl, Features: feat, Log: log,
		State: vring.InitialState(feat)})
	require.NoError(t, err)
	sfeat := feat & virtio.FEventIdx.Bit() // as program: a split shadow ring
	sq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: sl, Features: sfeat})
	require.NoError(t, err)
	backing, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: sl, Features: sfeat})
	require.NoError(t, err)
	rq := newRelayQueue(0, gq, sq)
	rq.shadowKick, err = vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { rq.shadowKick.Close() })
	call, err := vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { call.Close() })
	rq.guestCall.Store(call)
	f := &relayFuzz{guestCall: call, t: t, r: r, rq: rq, guest: guest, backing: backing, gmem: gmem, region: gr.Bytes(),
		shadow: sr.Bytes(), shadowLayout: sl, log: log, layout: gl, feat: feat, ringBytes: int(ringBytes), hostileGuest: b1&2 != 0, hostileBacking: b1&4 != 0}
	for i := range f.tables {
		f.tables[i] = -1
	}
	f.bufs = map[uint16][]vring.Buffer{}
	return f
}

// exact reports whether both sides have behaved so far: the checks that
// compare what the guest gets with what the backing device did hold.
func (f *relayFuzz) exact() bool { return !f.scribbled && !f.bogus && !f.lied }

// next16 reads a little-endian uint16 from the script.
func (f *relayFuzz) next16() uint16 { return uint16(f.r.Next()) | uint16(f.r.Next())<<8 }

// relayErr checks an error the relay returned: always one of the typed
// errors a guest or a backing device can cause, and none at all while
// both behave.
func (f *relayFuzz) relayErr(op string, err error) {
	f.t.Helper()
	var qe *vring.QueueError
	typed := errors.As(err, &qe) || errors.Is(err, ErrRelayChain) ||
		errors.Is(err, vring.ErrUsedIDNotOutstanding) || errors.Is(err, vring.ErrWrittenTooLarge)
	f.failed = err
	require.True(f.t, typed, "%s: untyped error %v", op, err)
	require.False(f.t, f.exact(), "%s: error from a well-behaved guest and backing device: %v", op, err)
}

// step runs one operation of the script. It returns false when the relay
// has failed (as the device would, it is then torn down, not used again).
func (f *relayFuzz) step() bool {
	t := f.t
	switch op := f.r.Next() % 11; op {
	case 0: // the guest adds a chain: readable buffers, then writable ones
		nb := f.r.Next()
		n := 1 + int(nb&0x7f)%relayFuzzMaxBufs
		readable := int(f.r.Next()) % (n + 1)
		bufs := make([]vring.Buffer, n)
		for i := range bufs {
			at := relayFuzzBufs + vring.GuestAddr(f.next16())%(relayFuzzSpan-relayFuzzBufs)
			ln := 1 + uint32(f.r.Next())*8
			ln = min(ln, uint32(relayFuzzSpan-at))
			bufs[i] = vring.Buffer{Addr: at, Len: ln, Writable: i >= readable}
		}
		var h uint16
		var err error
		if slot := slices.Index(f.tables[:], -1); nb&0x80 != 0 && f.feat.Has(virtio.FIndirectDesc) && slot >= 0 {
			// An indirect table of its own, outside the buffers (which
			// the backing device writes): it must stay intact while
			// its chain may still be popped again after a rewind.
			h, err = f.guest.AddIndirect(relayFuzzTables+vring.GuestAddr(slot)*16*relayFuzzMaxBufs, bufs)
			if err == nil {
				f.tables[slot] = int(h)
			}
		} else {
			h, err = f.guest.Add(bufs)
		}
		if errors.Is(err, vring.ErrNoSpace) || errors.Is(err, vring.ErrBadChain) { // full; more than the ring allows
			return true
		}
		if err != nil && f.scribbled { // the guest broke its own driver (its used ring)
			return true
		}
		require.NoError(t, err)
		f.added = append(f.added, h)
		f.bufs[h] = bufs
	case 1: // the guest publishes
		f.guest.Publish()
		f.published = append(f.published, f.added...)
		f.added = f.added[:0]
	case 2, 3: // the relay's pass: forward and publish, or complete
		if op == 2 {
			if err := f.rq.forward(); err != nil {
				f.relayErr("forward", err)
				return false
			}
			if err := f.rq.publish(); err != nil {
				f.relayErr("publish", err)
				return false
			}
			if f.exact() {
				// The relay took every chain the guest published, or
				// stopped at one it holds back for room: the shadow
				// ring's avail.idx (one per chain) counts the published
				// chains before that one, and the backing device can
				// see all of them.
				idx := binary.LittleEndian.Uint16(f.shadow[f.shadowLayout.Avail-shadowAlign+2:])
				if !f.rq.hasPending {
					require.Equal(t, len(f.published), int(idx), "shadow avail.idx after the relay took every published chain")
				} else {
					require.Less(t, int(idx), len(f.published), "shadow avail.idx with a chain held back")
					require.Equal(t, f.published[idx], f.rq.pending.Head, "the chain held back is the next published one")
				}
			}
			return true
		}
		return f.complete()
	case 4: // the backing device pops a chain
		var c vring.Chain
		ok, err := f.backing.Pop(&c)
		if err != nil {
			// Only a bogus use breaks the shadow ring for the backing
			// device: the relay freed, and then reused, descriptors of
			// a chain the backing device had not popped.
			require.True(t, f.bogus, "the relay's shadow ring is well formed: %v", err)
			return false
		}
		if !ok {
			return true
		}
		g := uint16(noHead)
		if f.exact() {
			// The backing device takes the guest's chains in the order
			// the guest published them, with the guest's buffers.
			require.Less(t, f.consumed, len(f.published), "a chain the guest never published")
			g = f.published[f.consumed]
			require.Equal(t, g, f.rq.inflight[c.Head].Head, "the guest chain shadow chain %d carries", c.Head)
			var got []vring.Buffer
			for _, sg := range c.Segs {
				got = append(got, vring.Buffer{Addr: sg.Addr, Len: sg.Len, Writable: sg.Writable})
			}
			require.Equal(t, f.bufs[g], got, "the buffers of guest chain %d in the shadow ring", g)
		}
		f.held = append(f.held, heldChain{c: c, guest: g})
		f.consumed++
	case 5: // the backing device writes a chain and uses it
		if len(f.held) == 0 {
			return true
		}
		i := int(f.r.Next()) % len(f.held)
		h := f.held[i]
		f.held = slices.Delete(f.held, i, i+1)
		n := uint32(f.next16()) % uint32(h.c.WritableLen+1)
		if f.hostileBacking && f.r.Next()&1 != 0 {
			n = uint32(h.c.WritableLen) + 1 + uint32(f.r.Next())
			f.lied = true
		}
		f.use(h, n)
	case 6: // the guest reclaims what the relay delivered
		f.reclaim()
	case 7: // a hostile backing device uses a head it did not pop
		if !f.hostileBacking {
			return true
		}
		// Written into the shadow used ring directly: the backing
		// DeviceQueue pushes only chains it popped.
		head, n := f.next16()%f.backing.Size(), uint32(f.r.Next())
		st := f.backing.State()
		e := f.shadow[f.shadowLayout.Used-shadowAlign+4+8*vring.GuestAddr(st.NextUsed%f.backing.Size()):]
		binary.LittleEndian.PutUint32(e, uint32(head))
		binary.LittleEndian.PutUint32(e[4:], n)
		binary.LittleEndian.PutUint16(f.shadow[f.shadowLayout.Used-shadowAlign+2:], st.NextUsed+1)
		// The relay cannot tell this entry from a real one when the head
		// is outstanding, and the backing DeviceQueue, which does not
		// know of it, writes its next entry over it: from here on the
		// uses recorded are not what the relay sees.
		f.bogus = true
	case 9: // the guest goes to sleep: it reclaims, then enables interrupts
		f.reclaim()
		pending, err := f.guest.EnableInterrupts()
		if err != nil {
			require.True(t, f.scribbled, "EnableInterrupts: %v", err)
			return true
		}
		// With entries pending the guest would reclaim them rather than
		// sleep.
		f.asleep = !pending
	case 10: // the guest polls: interrupts off (a hint the relay may ignore)
		f.guest.DisableInterrupts()
		f.asleep = false
	case 8: // a hostile guest writes into its ring
		if !f.hostileGuest {
			return true
		}
		end := f.ringBytes
		at := int(f.next16()) % end
		k := 1 + int(f.r.Next()%8)
		for j := 0; j < k && at+j < end; j++ {
			f.region[at+j] = f.r.Next()
		}
		f.scribbled = true
	}
	return true
}

// use writes n bytes (a pattern) into h's writable segments, as a backing
// device's DMA does, without logging them, and pushes h with n.
func (f *relayFuzz) use(h heldChain, n uint32) {
	c := &h.c
	left := uint64(n)
	for _, s := range c.Segs[c.Readable:] {
		k := min(uint64(s.Len), left)
		if k == 0 {
			break
		}
		for j := range s.Buf[:k] {
			s.Buf[j] = f.fill
		}
		f.fill++
		f.written = append(f.written, relayWrite{addr: s.Addr, n: k, use: len(f.want)})
		left -= k
	}
	f.want = append(f.want, vring.UsedElem{Head: h.guest, Len: n})
	require.NoError(f.t, f.backing.Push(c.Head, n))
}

// complete runs the relay's complete and checks what it delivered.
func (f *relayFuzz) complete() bool {
	err := f.rq.complete()
	if err != nil {
		f.relayErr("complete", err)
		return false
	}
	prev := f.completed
	f.completed = len(f.want)
	f.checkLogged(prev)
	f.checkWoken(prev)
	return true
}

// checkWoken: a guest asleep on its interrupt when the relay delivered a
// chain (from use prev on) got the interrupt. Interrupts the guest did not
// wait for are allowed (the spec's suppression is a hint) and drained.
func (f *relayFuzz) checkWoken(prev int) {
	n, err := f.guestCall.TryWait()
	require.NoError(f.t, err)
	if !f.asleep || f.completed == prev {
		return
	}
	f.asleep = false
	if !f.exact() {
		// A scribbling guest's used_event or flags may be anything; a
		// bogus use may have been delivered (and its interrupt drained)
		// before the backing device's next push overwrote it, leaving
		// nothing new to deliver now.
		return
	}
	require.NotZero(f.t, n, "the relay delivered %d chains to a guest asleep on its interrupt without waking it", f.completed-prev)
	f.wakeups++
}

// checkLogged: every byte the backing device wrote for a use the relay
// has just delivered (from use prev on) is in the dirty log, and so is
// the guest's used ring if anything was. The log is then cleared, as a
// pre-copy round harvests it, so that each delivery is checked on marks
// of its own, not on pages an earlier one marked.
func (f *relayFuzz) checkLogged(prev int) {
	t := f.t
	if f.bogus {
		return
	}
	for _, w := range f.written {
		if w.use < prev || w.use >= f.completed {
			continue
		}
		for p := f.log.PageOf(uint64(w.addr)); p <= f.log.PageOf(uint64(w.addr)+w.n-1); p++ {
			require.True(t, f.log.PageDirty(p), "page %d of a write at %#x+%d delivered unlogged", p, uint64(w.addr), w.n)
		}
	}
	if f.completed > prev {
		// Split: used.idx's page; packed: the ring's, where used
		// descriptors are written.
		at := f.layout.Used
		if f.feat.Has(virtio.FRingPacked) {
			at = f.layout.Desc
		}
		require.True(t, f.log.PageDirty(f.log.PageOf(uint64(at))), "used ring not logged")
	}
	require.NoError(t, f.log.Clear())
}

// reclaim takes the guest's used entries and, while everyone behaved,
// checks them against the uses in order.
func (f *relayFuzz) reclaim() {
	for {
		head, n, ok, err := f.guest.Reclaim()
		if err != nil {
			require.True(f.t, f.scribbled, "the relay's used entries broke the guest driver: %v", err)
			return
		}
		if !ok {
			return
		}
		if i := slices.Index(f.tables[:], int(head)); i >= 0 {
			f.tables[i] = -1
		}
		if f.exact() {
			require.Less(f.t, f.reclaimed, f.completed, "a used entry the relay did not deliver")
			require.Equal(f.t, f.want[f.reclaimed], vring.UsedElem{Head: head, Len: n}, "use %d", f.reclaimed)
		}
		f.reclaimed++
	}
}

// stop is relay.stop without a device: the backing device, suspended,
// has used every chain it popped; the relay delivers them, and the guest
// queue's position is rewound over the chains the backing device never
// consumed. A new device queue started at that position must then pop
// exactly those chains and the ones the relay never took, in order:
// nothing lost, nothing done twice.
func (f *relayFuzz) stop() {
	t := f.t
	for len(f.held) != 0 {
		h := f.held[0]
		f.held = f.held[1:]
		f.use(h, uint32(f.r.Next())%uint32(h.c.WritableLen+1))
	}
	if !f.complete() {
		return
	}
	gs, err := f.rq.rewind()
	f.rewindErr = err
	if !f.exact() {
		if err != nil {
			require.ErrorIs(t, err, ErrInFlight)
		}
		return
	}
	require.NoError(t, err)
	f.reclaim()
	require.Equal(t, f.completed, f.reclaimed, "every use reached the guest")
	require.Equal(t, f.consumed, f.completed, "every chain consumed was used")

	resumed, err := vring.NewDeviceQueue(f.gmem, vring.DeviceQueueOptions{Layout: f.layout, Features: f.feat, State: gs})
	require.NoError(t, err, "the rewound state %+v", gs)
	var got []uint16
	for {
		var c vring.Chain
		ok, err := resumed.Pop(&c)
		require.NoError(t, err)
		if !ok {
			break
		}
		got = append(got, c.Head)
	}
	f.resumed = got
	want := f.published[f.consumed:]
	require.Equal(t, fmt.Sprint(want), fmt.Sprint(got),
		"after the rewind the guest's ring resumes with the chains the backing device never consumed")
}

func runRelayFuzz(t *testing.T, data []byte) { runRelayScript(t, data) }

func runRelayScript(t *testing.T, data []byte) *relayFuzz {
	r := fuzzinput.New(data)
	f := newRelayFuzz(t, r)
	for ops := 0; r.More() && ops < 400; ops++ {
		if !f.step() {
			return f
		}
	}
	f.stop()
	return f
}

// FuzzRelay drives the shadow-ring relay, the data path that tracks a
// device's writes when it cannot log them itself, between a guest driver
// and a backing device that the input script both controls: the guest
// adds and publishes chains, sleeps on its interrupt or polls (and, when
// the input allows, scribbles over its ring); the backing device pops
// chains, writes them and uses them in any order (and, when allowed, uses
// heads it never popped or reports more bytes than a chain holds). The
// relay's forward, publish and complete run in between. On a split or a packed guest ring of 2 to 64 entries, with
// or without EVENT_IDX and INDIRECT_DESC, it checks:
//
//   - the relay never panics, and fails only with typed errors, and only
//     when the guest or the backing device misbehaved;
//   - the backing device gets the guest's chains in the order the guest
//     published them, with the guest's buffers, and the relay publishes to
//     it every chain the guest published, up to the one it holds back for
//     room;
//   - every byte the backing device wrote is in the dirty log once the
//     relay has delivered its chain, and so is the used ring (each
//     delivery checked on its own marks: the log is cleared after it);
//   - the guest gets back its chains in the backing device's use order,
//     with the lengths the backing device reported;
//   - a guest that sleeps on its interrupt (it reclaimed everything,
//     enabled interrupts, plain or EVENT_IDX, and found nothing pending)
//     is woken by the next delivery: no lost wake-up;
//   - the stop sequence (the backing device uses what it popped, complete,
//     rewind) leaves a guest position from which a new device queue pops
//     exactly the chains not yet consumed, in order.
func FuzzRelay(f *testing.F) {
	for _, s := range relayFuzzSeeds {
		f.Add(s.data)
	}
	f.Fuzz(runRelayFuzz)
}

// relayScript builds FuzzRelay inputs.
type relayScript []byte

func newRelayScript(packed bool, size uint16, eventIdx, hostileGuest, hostileBacking, indirect bool) relayScript {
	b0 := byte(0)
	if packed {
		b0 = 1 | byte(size-2)<<1
	} else {
		for s := uint16(2); s < size; s <<= 1 {
			b0 += 2
		}
	}
	var b1 byte
	for i, on := range []bool{eventIdx, hostileGuest, hostileBacking, indirect} {
		if on {
			b1 |= 1 << i
		}
	}
	return relayScript{b0, b1}
}

// add: a chain of len(lens) buffers at 1 KiB steps from at, the first
// readable of them readable.
func (s relayScript) add(at uint16, readable int, lens ...byte) relayScript {
	return s.addOf(0, at, readable, lens)
}

// addIndirect: add, as an indirect table.
func (s relayScript) addIndirect(at uint16, readable int, lens ...byte) relayScript {
	return s.addOf(0x80, at, readable, lens)
}

func (s relayScript) addOf(mode byte, at uint16, readable int, lens []byte) relayScript {
	s = append(s, 0, mode|byte(len(lens)-1), byte(readable))
	for i, l := range lens {
		a := at + uint16(i)*1024
		s = append(s, byte(a), byte(a>>8), l)
	}
	return s
}
func (s relayScript) publish() relayScript  { return append(s, 1) }
func (s relayScript) forward() relayScript  { return append(s, 2) }
func (s relayScript) complete() relayScript { return append(s, 3) }
func (s relayScript) pop() relayScript      { return append(s, 4) }
func (s relayScript) reclaim() relayScript  { return append(s, 6) }
func (s relayScript) sleep() relayScript    { return append(s, 9) }
func (s relayScript) poll() relayScript     { return append(s, 10) }

// use: the backing device uses its i-th held chain with n bytes (modulo
// what the chain holds). Not on a hostileBacking script, whose uses carry
// a flag byte more (see lie).
func (s relayScript) use(i byte, n uint16) relayScript {
	return append(s, 5, i, byte(n), byte(n>>8))
}

// lie: on a hostileBacking script, the backing device uses its i-th held
// chain reporting one byte more than the chain holds.
func (s relayScript) lie(i byte) relayScript { return append(s, 5, i, 0, 0, 1, 0) }
func (s relayScript) bogusUse(head uint16) relayScript {
	return append(s, 7, byte(head), byte(head>>8), 9)
}
func (s relayScript) scribble(at uint16, b ...byte) relayScript {
	s = append(s, 8, byte(at), byte(at>>8), byte(len(b)-1))
	return append(s, b...)
}

// end: the stop sequence's lengths for chains still held (one byte each).
func (s relayScript) end(lens ...byte) []byte { return append(s, lens...) }

// manyUses: n one-buffer chains on a split ring of 64, each in a page
// quarter of its own, all relayed, popped and used before one complete.
func manyUses(n int) []byte {
	s := newRelayScript(false, 64, false, false, false, false)
	for i := range n {
		s = s.add(uint16(i)*1024, 0, 100)
	}
	s = s.publish().forward()
	for range n {
		s = s.pop()
	}
	for range n {
		s = s.use(0, 700)
	}
	return s.complete().reclaim().end()
}

// relayFuzzSeeds are FuzzRelay's seeds, with what each must do
// (TestRelayFuzzSeeds): the chains the relay delivered, the ones the
// resumed queue pops, and the error that ends a hostile run.
var relayFuzzSeeds = []struct {
	name               string
	data               []byte
	delivered, resumed int
	err                error
	// wakeups is how many times the guest slept on its interrupt and the
	// relay woke it.
	wakeups int
}{
	{"split: three chains, used out of order, one left in the shadow ring, one never taken",
		newRelayScript(false, 8, false, false, false, false).
			add(0, 1, 16, 200).add(8192, 0, 50).add(16384, 2, 8, 8, 100).publish().forward().
			add(24576, 0, 30).publish().
			pop().pop().use(1, 700).use(0, 160).complete().reclaim().end(),
		2, 2, nil, 0},
	{"split: 40 chains used at once, more than one reclaim batch of the relay's",
		manyUses(40), 40, 0, nil, 0},
	{"packed: chains across the wrap, event idx",
		newRelayScript(true, 3, true, false, false, false).
			add(0, 0, 10).add(100, 1, 4, 20).publish().forward().pop().pop().use(0, 80).use(0, 40).complete().reclaim().
			add(200, 0, 9).add(400, 0, 9).publish().forward().pop().use(0, 72).complete().end(),
		3, 1, nil, 0},
	{"split: an indirect chain fills the shadow ring; the chain held back for room and it are given back",
		newRelayScript(false, 4, false, false, false, true).
			addIndirect(0, 2, 1, 1, 1, 1).add(100, 0, 1).publish().forward().end(),
		0, 2, nil, 0},
	{"packed: an indirect chain fills the shadow ring; a chain of two descriptors held back for room",
		newRelayScript(true, 4, false, false, false, true).
			addIndirect(0, 0, 1, 1, 1, 1).add(100, 1, 1, 1).publish().forward().end(),
		0, 2, nil, 0},
	{"packed: indirect chains, one consumed, two given back",
		newRelayScript(true, 5, true, false, false, true).
			addIndirect(0, 1, 3, 3, 3).add(50, 0, 2).addIndirect(200, 0, 4, 4, 4).publish().forward().
			pop().use(0, 33).complete().reclaim().forward().end(),
		1, 2, nil, 0},
	{"split: the guest sleeps between deliveries, polls for one, sleeps again",
		newRelayScript(false, 8, false, false, false, false).
			sleep().add(0, 0, 10).add(2048, 0, 10).publish().forward().pop().use(0, 5).complete().
			sleep().pop().use(0, 6).complete().
			poll().add(4096, 0, 10).publish().forward().pop().use(0, 7).complete().
			sleep().add(6144, 0, 10).publish().forward().pop().use(0, 8).complete().reclaim().end(),
		4, 0, nil, 3},
	{"split, event idx: the guest sleeps, is woken, sleeps again past two deliveries",
		newRelayScript(false, 8, true, false, false, false).
			sleep().add(0, 0, 10).add(2048, 0, 10).add(4096, 0, 10).publish().forward().pop().use(0, 5).complete().
			pop().use(0, 6).complete().sleep().pop().use(0, 7).complete().reclaim().end(),
		3, 0, nil, 2},
	{"packed: the guest sleeps, polls, sleeps, across the wrap",
		newRelayScript(true, 3, false, false, false, false).
			sleep().add(0, 0, 10).add(100, 0, 10).publish().forward().pop().use(0, 5).complete().
			poll().pop().use(0, 6).complete().reclaim().
			sleep().add(200, 0, 9).add(400, 0, 9).publish().forward().pop().use(0, 72).complete().reclaim().end(),
		3, 1, nil, 2},
	{"packed, event idx: the guest sleeps twice",
		newRelayScript(true, 4, true, false, false, false).
			sleep().add(0, 0, 10).add(100, 0, 10).publish().forward().pop().pop().use(1, 5).complete().
			use(0, 6).complete().sleep().add(200, 0, 9).publish().forward().pop().use(0, 72).complete().reclaim().end(),
		3, 0, nil, 2},
	{"hostile backing: a head it never popped",
		newRelayScript(false, 4, false, false, true, false).
			add(0, 0, 10).publish().forward().bogusUse(3).complete().end(),
		0, 0, vring.ErrUsedIDNotOutstanding, 0},
	{"hostile backing: more bytes than the chain holds",
		newRelayScript(false, 4, false, false, true, false).
			add(0, 0, 10).publish().forward().pop().lie(0).complete().end(),
		0, 0, vring.ErrUsedLenTooLarge, 0},
	{"hostile guest: an avail index far ahead",
		newRelayScript(false, 4, true, true, false, false).
			add(0, 0, 10).publish().scribble(uint16(vring.ContiguousLayout(0, 4).Avail+2), 0x40, 0).forward().end(),
		0, 0, vring.ErrAvailIdxJump, 0},
	{"hostile guest: a packed descriptor made available with a bad next chain",
		newRelayScript(true, 4, false, true, false, false).
			scribble(14, 0x81, 0).scribble(30, 0x81, 0).scribble(46, 0x81, 0).scribble(62, 0x81, 0).forward().end(),
		0, 0, vring.ErrChainTooLong, 0},
}

// TestRelayFuzzSeeds pins what FuzzRelay's seeds do, so that the fuzzer's
// checks are known to run on chains delivered, rewound and resumed, and on
// the errors of a hostile guest and backing device.
func TestRelayFuzzSeeds(t *testing.T) {
	for _, s := range relayFuzzSeeds {
		t.Run(s.name, func(t *testing.T) {
			f := runRelayScript(t, s.data)
			if s.err != nil {
				require.ErrorIs(t, f.failed, s.err)
				return
			}
			require.NoError(t, f.failed)
			require.NoError(t, f.rewindErr)
			require.Equal(t, s.delivered, f.completed, "chains delivered")
			require.Equal(t, s.delivered, f.reclaimed, "chains the guest reclaimed")
			require.Len(t, f.resumed, s.resumed, "chains the resumed queue popped")
			require.Equal(t, s.wakeups, f.wakeups, "times the guest slept and was woken")
		})
	}
}
