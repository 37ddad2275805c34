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

// txRecorder is FuzzTransmitRing's handler: it keeps a copy of every frame
// (and header, as an OffloadHandler) it is handed.
type txRecorder struct {
	offload virtio.Features // TxOffloads; zero: a plain FrameHandler's calls only
	frames  [][]byte
	hdrs    []virtio.NetHdr
}

func (r *txRecorder) HandleFrame(_ *Tx, frame []byte) {
	r.frames = append(r.frames, append([]byte(nil), frame...))
	r.hdrs = append(r.hdrs, virtio.NetHdr{})
}

// txOffloadRecorder is a txRecorder that is an OffloadHandler.
type txOffloadRecorder struct{ *txRecorder }

func (r txOffloadRecorder) TxOffloads() virtio.Features { return r.offload }
func (r txOffloadRecorder) HandleOffload(_ *Tx, hdr virtio.NetHdr, frame []byte) {
	r.frames = append(r.frames, append([]byte(nil), frame...))
	r.hdrs = append(r.hdrs, hdr)
}

// FuzzTransmitRing lets the input be a hostile driver of one transmit
// queue: it writes descriptors with any address, length, flags and link
// (or buffer id), and any bytes into its buffers, makes any head available
// (or moves avail.idx anywhere), restarts the queue from its state, and
// turns the link on and off, while the transmit worker's batch (txBatch,
// called here on this goroutine instead of the worker's) consumes the
// ring, on split and packed rings, with and without offloads, into a plain
// FrameHandler or an OffloadHandler. Whatever it writes:
//   - a batch returns without an error or with the *vring.QueueError that
//     broke the queue; nothing panics; it takes at most batchSize chains;
//   - the device writes nothing in guest memory but its own parts of the
//     ring (a split ring's used ring; a packed ring's descriptors and
//     device event area): transmit buffers are the driver's, even those
//     that lie in the ring or are marked device-writable;
//   - every byte it writes is marked in the dirty log it logs into
//     through a per-queue cache;
//   - each batch leaves nothing in flight and returns the chains it
//     popped in pop order with a used length of 0: a split ring's heads
//     (splitOrder), a packed ring's buffer ids, each used descriptor at
//     the used position and skipping the rest of its chain (packedOrder);
//   - without offloads, the frames the handler gets are, in order, the
//     readable bytes of the chains after the virtio-net header (the oracle
//     walks the descriptors and indirect tables the test wrote, a split
//     ring's from its available ring, a packed ring's in ring order from
//     the device's position while they are available; a chain it does not
//     follow, one outside memory or one vring refuses, skips that batch's
//     check), and a chain shorter than the header, longer than MaxFrame
//     or sent while the link is down is a drop of that reason, not a
//     frame;
//   - an OffloadHandler gets only headers its documentation promises (a
//     checksum inside the frame, a known GSO type with a size, NEEDS_CSUM
//     or no flags, no num_buffers); every frame, handled in software or
//     not, is at most MaxFrame bytes;
//   - the chains the worker keeps between groups hold no more segment
//     room than txKeepSegs each, and the first no more than the longest
//     chain vring pops.
//
// Input: [0] configuration (bit 0 packed, bit 1 INDIRECT_DESC, bit 2
// EVENT_IDX, bit 3 offloads offered and negotiated, bit 4 the handler an
// OffloadHandler taking them), [1] the size (split 2<<(b&7), packed
// 1+(b&7)+60*(b>>3&3)) and Options.BatchSize (1+10*(b>>5)), then
// operations (see the switch).
func FuzzTransmitRing(f *testing.F) {
	for _, s := range txFuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) { fuzzTransmitRing(t, data) })
}

// Operation encodings of FuzzTransmitRing.
const (
	txOpDesc     = iota // i, a, b, l, fl, nx: descriptor i (see the switch)
	txOpPost            // b: make a chain available
	txOpBatch           // run one transmit batch
	txOpRestart         // restart the queue from its state
	txOpIdx             // lo, hi: avail.idx (split), or a batch (packed)
	txOpWrite           // offhi, offlo, n, n bytes: write into the buffers' area
	txOpLink            // b: link up (b odd) or down
	txOpChain           // i, n, a, b, l, w: descriptors i.. linked, n+1 of them (see the switch)
	txOpIndirect        // i, n, a, b, l: an indirect table of n+1 entries, and descriptor i naming it
	txOps
)

// txFuzzSeeds are FuzzTransmitRing's built-in seeds.
func txFuzzSeeds() [][]byte {
	desc := func(i, off, l, fl, nx byte) []byte { return []byte{txOpDesc, i, 0, off, l, fl, nx} }
	post := func(h byte) []byte { return []byte{txOpPost, h} }
	batch := []byte{txOpBatch}
	seed := func(cfg, size byte, ops ...[]byte) []byte {
		b := []byte{cfg, size}
		for _, op := range ops {
			b = append(b, op...)
		}
		return b
	}
	const nxt, w, ind = 1, 2, 4
	var seeds [][]byte
	// Split ring of 8, batches of 4: a one-descriptor frame, a chain of
	// two descriptors, a chain shorter than the header, a restart.
	seeds = append(seeds, seed(0x00, 0xc2,
		desc(0, 0, 8, 0, 0), desc(1, 40, 1, nxt, 2), desc(2, 60, 4, 0, 0), desc(3, 80, 0, 0, 0),
		post(0), post(1), post(3), batch, []byte{txOpRestart}, post(0), batch))
	// The same on a packed ring of 5 (ids in nx).
	seeds = append(seeds, seed(0x01, 0xc4,
		desc(0, 0, 8, 0, 0), desc(1, 40, 1, nxt, 1), desc(2, 60, 4, 0, 1), desc(3, 80, 0, 0, 3),
		post(0), post(0), post(0), post(0), batch, []byte{txOpRestart}, batch))
	// Writable and readable descriptors in one chain, then readable after
	// writable (a broken queue).
	seeds = append(seeds, seed(0x00, 0xc2,
		desc(0, 0, 4, nxt, 1), desc(1, 20, 4, w, 0), desc(2, 40, 2, w|nxt, 3), desc(3, 60, 2, 0, 0),
		post(0), batch, post(2), batch))
	// More chains than a batch takes (batch size 1; heads 0 and 1 made
	// available twice, each used before its second turn), the link down
	// for one batch.
	seeds = append(seeds, seed(0x00, 3,
		desc(0, 0, 8, 0, 0), desc(1, 40, 8, 0, 0), post(0), post(1), post(0), post(1),
		[]byte{txOpLink, 0}, batch, []byte{txOpLink, 1}, batch, batch, batch))
	// An indirect descriptor without the feature and with it (a table of
	// one entry, whatever the buffer's bytes say).
	for _, cfg := range []byte{0x00, 0x02} {
		seeds = append(seeds, seed(cfg, 0xc2, desc(4, 0, 1, ind, 0), post(4), batch))
	}
	// Long chains: on a split ring of 128, a chain of 2 descriptors and one
	// of 100 in one group; on a packed ring of 68 (whose every descriptor
	// is made available one by one), a chain of 66.
	chain := func(i, n, a, b, l, w byte) []byte { return []byte{txOpChain, i, n, a, b, l, w} }
	seeds = append(seeds, seed(0x00, 0xc6, chain(120, 1, 0, 0, 4, 255), chain(0, 99, 1, 0, 1, 255), post(120), post(0), batch))
	packedLong := []byte{}
	for range 66 {
		packedLong = append(packedLong, post(0)...)
	}
	seeds = append(seeds, seed(0x01, 0xcf, chain(0, 65, 0, 0, 1, 255), packedLong, batch))
	// An indirect table of 5 entries of 32 bytes, split and packed.
	indirect := func(i byte) []byte { return []byte{txOpIndirect, i, 4, 0x10, 0, 2} }
	seeds = append(seeds, seed(0x02, 0xc2, indirect(1), post(1), batch))
	seeds = append(seeds, seed(0x03, 0xc4, indirect(0), post(0), batch))
	// The Loopback replying into a receive queue: the first seed's chains
	// (split, packed); then 40 frames of 116 bytes in one batch against
	// 32 receive buffers.
	seeds = append(seeds, append([]byte{0x20}, seeds[0][1:]...), append([]byte{0x21}, seeds[1][1:]...))
	var many [][]byte
	for i := range byte(40) {
		many = append(many, desc(i, 2*i, 8, 0, 0), post(i))
	}
	seeds = append(seeds, seed(0x20, 0xc6, append(many, batch)...))
	// A TCP/IPv4 frame with a GSO header, through the software offloads,
	// through an OffloadHandler and through the Loopback.
	frame := tsoSeedFrame()
	write := append([]byte{txOpWrite, 0, 0, byte(len(frame))}, frame...)
	for _, cfg := range []byte{0x08, 0x18, 0x09, 0x19, 0x28, 0x29} {
		seeds = append(seeds, seed(cfg, 0xc2, write, desc(0, 0, 0x60, 0, 0), post(0), batch))
	}
	return seeds
}

// tsoSeedFrame is a virtio-net header (12 bytes: NEEDS_CSUM, GSO TCPV4,
// gso_size 500) and the headers of an Ethernet/IPv4/TCP frame that fills
// the rest of a 1536-byte buffer: its payload is whatever the buffer holds
// after them.
func tsoSeedFrame() []byte {
	b := make([]byte, 12+14+20+20)
	b[0] = virtio.NetHdrFNeedsCsum
	b[1] = virtio.NetHdrGSOTCPv4
	binary.LittleEndian.PutUint16(b[2:], 54)    // hdr_len
	binary.LittleEndian.PutUint16(b[4:], 500)   // gso_size
	binary.LittleEndian.PutUint16(b[6:], 14+20) // csum_start
	binary.LittleEndian.PutUint16(b[8:], 16)    // csum_offset
	e := b[12:]
	copy(e[0:6], []byte{2, 0, 0, 0, 0, 1})
	copy(e[6:12], []byte{2, 0, 0, 0, 0, 2})
	binary.BigEndian.PutUint16(e[12:], 0x0800)
	ip := e[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], 0x60*16-12-14) // the buffer's 1536 bytes, less header and Ethernet
	ip[8], ip[9] = 64, 6
	copy(ip[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], 1234)
	binary.BigEndian.PutUint16(tcp[2:], 80)
	tcp[12] = 5 << 4
	tcp[13] = 0x18 // PSH|ACK
	return b
}

// txFuzzRun is what one FuzzTransmitRing input did, for the tests that
// check the fuzzer's checks run at all.
type txFuzzRun struct {
	batches, checked int // batches run; of them, frames compared with the oracle
	frames           int // frames the handler got
	gso              int // of them, with a GSO header (an OffloadHandler's)
	broken           bool
}

// fuzzTransmitRing runs one FuzzTransmitRing input.
func fuzzTransmitRing(t *testing.T, data []byte) (run txFuzzRun) {
	if len(data) < 2 {
		return run
	}
	in := fuzzinput.New(data)
	next := in.Next
	cfg, sz := next(), next()
	packed, offload, offHandler, loop := cfg&1 != 0, cfg&8 != 0, cfg&0x18 == 0x18, cfg&0x20 != 0
	ringFeat := virtio.Features(0).With(virtio.FVersion1)
	if cfg&2 != 0 {
		ringFeat = ringFeat.With(virtio.FIndirectDesc)
	}
	if cfg&4 != 0 {
		ringFeat = ringFeat.With(virtio.FEventIdx)
	}
	var (
		size      uint16
		layout    vring.Layout
		ringBytes uint64
	)
	if packed {
		size = 1 + uint16(sz&7) + uint16(sz>>3&3)*60
		ringFeat = ringFeat.With(virtio.FRingPacked)
		layout = vring.ContiguousPackedLayout(0, size)
		ringBytes = vring.ContiguousPackedLayoutBytes(size)
	} else {
		size = 2 << (sz & 7)
		layout = vring.ContiguousLayout(0, size)
		ringBytes = vring.ContiguousLayoutBytes(size)
	}
	const dataBytes = 1 << 16
	dataAt := (ringBytes + 4095) &^ 4095
	// With the Loopback handler, the receive queue the replies go to
	// (the same ring format, a well-behaved driver) and its buffers
	// follow the transmit buffers.
	const rxSize, rxBufs, rxBufLen = 64, 32, 2048
	rxFeat := virtio.Features(0).With(virtio.FVersion1) | ringFeat&virtio.FRingPacked.Bit()
	rxAt := dataAt + dataBytes
	rxBufAt := (rxAt + vring.LayoutBytesFor(rxSize, rxFeat) + 4095) &^ 4095
	end := rxAt
	if loop {
		end = rxBufAt + rxBufs*rxBufLen
	}
	backing := make([]byte, end)
	for i := range dataBytes {
		backing[dataAt+uint64(i)] = byte(i*7 + i>>8)
	}
	mirror := append([]byte(nil), backing...)
	mem, log := fuzzMemory(t, backing)

	batchSize := 1 + int(sz>>5)*10
	d, err := New(&Options{Offload: offload, NoCtrlVQ: true, BatchSize: batchSize})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Reset()
	feat := virtio.Features(0).With(virtio.FVersion1)
	if offload {
		feat |= HostOffloads
	}
	if err := d.SetFeatures(feat); err != nil {
		t.Fatal(err)
	}
	rec := &txRecorder{}
	switch {
	case loop:
		d.SetHandler(Loopback)
	case offHandler:
		rec.offload = HostOffloads
		d.SetHandler(txOffloadRecorder{rec})
	default:
		d.SetHandler(rec)
	}
	var rx *txLoopRx
	if loop {
		rx = startLoopRx(t, d, mem, log, backing, mirror, vring.LayoutFor(vring.GuestAddr(rxAt), rxSize, rxFeat), rxFeat, rxAt, rxBufAt, rxBufs, rxBufLen)
	}
	hdrLen := int(d.hdrLen.Load())
	q := d.queues[1]
	state := vring.InitialState(ringFeat)
	var dq *vring.DeviceQueue
	// start sets the queue up as StartQueue does for its worker, without
	// starting one: this goroutine runs the batches.
	start := func() {
		dq = newFuzzQueue(t, mem, log, layout, ringFeat, state)
		if q.gather == nil {
			q.gather = make([]byte, gatherInit)
		}
		q.dq = dq
		q.tx = Tx{dev: d, pair: 0, q: q}
	}
	start()

	// What the device may write: a split ring's used ring, a packed
	// ring's descriptors and device event area.
	deviceArea := func(a uint64) bool {
		if a >= rxAt { // the receive queue's ring and buffers
			return true
		}
		if packed {
			return a < uint64(layout.Desc)+16*uint64(size) || (a >= uint64(layout.Used) && a < uint64(layout.Used)+4)
		}
		_, _, usedBytes := vring.SplitSizes(size)
		return a >= uint64(layout.Used) && a < uint64(layout.Used)+usedBytes
	}
	drv := newHostileDriver(in, backing, mirror, layout, size, packed, dataAt, dataBytes)
	ord := newUsedOrder(packed, size, state, true)
	linkUp := true
	chk := txFuzzCheck{
		backing: backing, mirror: mirror, log: log, deviceArea: deviceArea, hdrLen: hdrLen,
		offload: offload, offHandler: offHandler, indirect: ringFeat.Has(virtio.FIndirectDesc), rx: rx,
		size: size, batch: min(batchSize, max(int(size)/2, 1)), layout: layout, ord: ord,
	}
	for in.More() && !run.broken {
		switch next() % txOps {
		case txOpDesc:
			drv.desc()
		case txOpPost:
			drv.post()
		case txOpIdx:
			if packed { // a batch
				chk.linkUp = linkUp
				run.broken = txFuzzBatch(t, d, q, dq, rec, &run, chk)
				break
			}
			drv.setAvailIdx()
		case txOpBatch:
			chk.linkUp = linkUp
			run.broken = txFuzzBatch(t, d, q, dq, rec, &run, chk)
		case txOpRestart:
			if err := dq.FlushLog(); err != nil {
				t.Fatal(err)
			}
			state = dq.State()
			if state.NextAvail != state.NextUsed {
				t.Fatalf("chains in flight between batches: %+v", state)
			}
			start()
		case txOpWrite:
			off := (uint64(next())<<8 | uint64(next())) % dataBytes
			n := uint64(next())
			for i := range n {
				if !in.More() || off+i >= dataBytes {
					break
				}
				backing[dataAt+off+i] = next()
				mirror[dataAt+off+i] = backing[dataAt+off+i]
			}
		case txOpLink:
			linkUp = next()&1 != 0
			d.SetLinkUp(linkUp)
		case txOpChain:
			// n+1 descriptors from i on, each linked to the next entry
			// (split) or following it (packed), buffers of 16*l bytes
			// one after the other from (a, b); those from the w-th on
			// device-writable.
			i, n, a, b, l, w := uint16(next()), uint16(next()), next(), next(), next(), uint16(next())
			addr := dataAt + (uint64(a)<<8|uint64(b))%dataBytes
			for k := range n + 1 {
				j := (i + k) % size
				var flags uint16
				if k < n {
					flags |= vring.DescFNext
				}
				if k >= w {
					flags |= vring.DescFWrite
				}
				buf := (addr - dataAt + uint64(k)*16*uint64(l)) % dataBytes
				if packed {
					drv.writeDesc(j, dataAt+buf, 16*uint32(l), i, flags|binary.LittleEndian.Uint16(backing[uint64(layout.Desc)+16*uint64(j)+14:])&(vring.DescFAvail|vring.DescFUsed))
				} else {
					drv.writeDesc(j, dataAt+buf, 16*uint32(l), flags, (j+1)%size)
				}
			}
		case txOpIndirect:
			// A table of n+1 readable entries linked in order, buffers of
			// 16*l bytes from data offset 0 on, at (a, b) in the data
			// area, and descriptor i naming it.
			i, n, a, b, l := uint16(next())%size, uint64(next()), next(), next(), next()
			table := (uint64(a)<<8 | uint64(b)) % dataBytes &^ 15
			if table+16*(n+1) > dataBytes {
				table = 0
			}
			for k := range n + 1 {
				at := dataAt + table + 16*k
				binary.LittleEndian.PutUint64(backing[at:], dataAt+(k*16*uint64(l))%dataBytes)
				binary.LittleEndian.PutUint32(backing[at+8:], 16*uint32(l))
				switch {
				case packed: // id and flags 0: a packed table is walked in order (§2.8.19)
					binary.LittleEndian.PutUint32(backing[at+12:], 0)
				case k < n:
					binary.LittleEndian.PutUint16(backing[at+12:], vring.DescFNext)
					binary.LittleEndian.PutUint16(backing[at+14:], uint16(k+1))
				default:
					binary.LittleEndian.PutUint32(backing[at+12:], 0)
				}
				copy(mirror[at:at+16], backing[at:at+16])
			}
			if packed {
				drv.writeDesc(i, dataAt+table, uint32(16*(n+1)), i, vring.DescFIndirect|binary.LittleEndian.Uint16(backing[uint64(layout.Desc)+16*uint64(i)+14:])&(vring.DescFAvail|vring.DescFUsed))
			} else {
				drv.writeDesc(i, dataAt+table, uint32(16*(n+1)), vring.DescFIndirect, 0)
			}
		}
	}
	return run
}

// txFuzzCheck is what txFuzzBatch checks a batch against.
type txFuzzCheck struct {
	backing, mirror []byte
	log             *dirty.Bitmap
	deviceArea      func(uint64) bool
	hdrLen          int
	linkUp          bool
	offload         bool
	offHandler      bool
	indirect        bool      // INDIRECT_DESC negotiated
	rx              *txLoopRx // the Loopback's receive queue, or nil
	size            uint16
	batch           int // the most chains a batch may take
	layout          vring.Layout
	ord             usedOrder
}

// txFuzzBatch runs one transmit batch and checks it (FuzzTransmitRing). It
// reports whether the batch broke the queue.
func txFuzzBatch(t *testing.T, d *Device, q *queue, dq *vring.DeviceQueue, rec *txRecorder, run *txFuzzRun, c txFuzzCheck) bool {
	t.Helper()
	before := dq.State()
	c.ord.before(c.backing, c.layout, false)
	// The oracle: the chains this batch may pop and what each should
	// give the handler, as far as it can tell (no offloads).
	var want []txWant
	split, _ := c.ord.(*splitOrder)
	oracle := c.ord.active() && !c.offload
	switch {
	case oracle && split != nil:
		avail := binary.LittleEndian.Uint16(c.backing[uint64(c.layout.Avail)+2:])
		for i := range min(avail-before.NextAvail, c.size) {
			head := binary.LittleEndian.Uint16(c.backing[uint64(c.layout.Avail)+4+2*uint64((before.NextAvail+i)%c.size):])
			w, ok := txOracle(c.backing, c.layout, c.size, head, c.hdrLen, c.indirect)
			if !ok {
				oracle = false
				break
			}
			want = append(want, w)
		}
	case oracle:
		want, oracle = txPackedOracle(c.backing, c.layout, c.size, before.NextAvail, c.batch, c.hdrLen, c.indirect)
	}
	stats := d.Stats()
	drops := stats.Drops
	rec.frames, rec.hdrs = rec.frames[:0], rec.hdrs[:0]
	n, err := d.txBatch(q)
	run.batches++
	run.frames += len(rec.frames)
	for _, h := range rec.hdrs {
		if h.GSOType != virtio.NetHdrGSONone {
			run.gso++
		}
	}
	broken := false
	if err != nil {
		var qe *vring.QueueError
		if !errors.As(err, &qe) {
			t.Fatalf("txBatch: %v, not a QueueError", err)
		}
		broken = true
	}
	if n > c.batch {
		t.Fatalf("a batch took %d chains, more than %d", n, c.batch)
	}
	// The room the worker's chains keep (keepGroupRoom).
	for i, ch := range q.chains {
		limit := txKeepSegs
		if i == 0 {
			limit = max(workerSegs, vring.MaxChainSegments(c.size))
		}
		if cap(ch.Segs) > limit {
			t.Fatalf("worker chain %d keeps room for %d segments, more than %d", i, cap(ch.Segs), limit)
		}
	}
	if err := dq.FlushLog(); err != nil && !broken {
		t.Fatal(err)
	}
	if c.rx != nil {
		if err := c.rx.dq.FlushLog(); err != nil {
			t.Fatal(err)
		}
	}
	const chunk = 4096 // compared whole first: most are unchanged
	for at := 0; at < len(c.backing); at += chunk {
		end := min(at+chunk, len(c.backing))
		if bytes.Equal(c.backing[at:end], c.mirror[at:end]) {
			continue
		}
		for i := at; i < end; i++ {
			if c.backing[i] != c.mirror[i] && !c.deviceArea(uint64(i)) {
				t.Fatalf("the device wrote guest address %#x (%#x to %#x), outside its part of the ring", i, c.mirror[i], c.backing[i])
			}
		}
	}
	checkLogged(t, c.log, c.backing, c.mirror)
	var replies [][]byte
	if c.rx != nil {
		replies = c.rx.collect(t)
		run.frames += len(replies)
		// Every frame the Loopback got was replied to: received, or
		// dropped by the receive side for want of a buffer that holds it.
		// (With offloads a reply may be segmented into several.)
		s2 := d.Stats()
		handed := s2.Queues[1].Frames - stats.Queues[1].Frames
		lost := s2.Drops[DropRxNoBuffer] - drops[DropRxNoBuffer] + s2.Drops[DropRxTooSmall] - drops[DropRxTooSmall]
		if !c.offload && uint64(len(replies))+lost != handed {
			t.Fatalf("the Loopback got %d frames; %d replies were received and %d dropped", handed, len(replies), lost)
		}
		if c.offload {
			// A reply segmented in software ends as several frames, each
			// received or dropped; none ends as nothing.
			var rxLost uint64
			for _, r := range []DropReason{DropRxNoBuffer, DropRxTooSmall, DropRxTooBig, DropRxBadHeader, DropRxFragmented, DropRxNotReady, DropFiltered, DropLinkDown} {
				rxLost += s2.Drops[r] - drops[r]
			}
			if uint64(len(replies))+rxLost < handed {
				t.Fatalf("the Loopback got %d frames; only %d replies were received and %d dropped", handed, len(replies), rxLost)
			}
		}
	}
	after := dq.State()
	c.ord.after(t, c.backing, c.layout, after, false, broken)
	if !broken && after.NextAvail != after.NextUsed {
		t.Fatalf("a batch of %d chains left chains in flight: %+v to %+v", n, before, after)
	}
	if split != nil && split.on {
		if int(after.NextUsed-before.NextUsed) != n {
			t.Fatalf("a batch of %d chains moved the queue from %+v to %+v", n, before, after)
		}
		for i := range n {
			at := uint64(c.layout.Used) + 4 + 8*uint64((before.NextUsed+uint16(i))%c.size) + 4
			if l := binary.LittleEndian.Uint32(c.backing[at:]); l != 0 {
				t.Fatalf("a transmit chain returned with used length %d", l)
			}
		}
	}
	for i, fr := range rec.frames {
		if len(fr) > MaxFrame {
			t.Fatalf("the handler got a frame of %d bytes", len(fr))
		}
		if c.offHandler {
			checkOffloadHdr(t, rec.hdrs[i], fr)
		}
	}
	if !oracle || broken {
		return broken
	}
	if n > len(want) {
		t.Fatalf("a batch took %d chains, %d were available", n, len(want))
	}
	want = want[:n]
	after2 := d.Stats().Drops
	var got [][]byte
	wantDrops := map[DropReason]uint64{}
	for _, w := range want {
		switch {
		case w.short:
			wantDrops[DropTxShort]++
		case len(w.frame) > MaxFrame:
			wantDrops[DropTxTooBig]++
		case !c.linkUp:
			wantDrops[DropLinkDown]++
		default:
			got = append(got, w.frame)
		}
	}
	if c.rx != nil {
		// The replies are the frames, in order, less those dropped.
		i := 0
		for _, r := range replies {
			for i < len(got) && !bytes.Equal(got[i], r) {
				i++
			}
			if i == len(got) {
				t.Fatalf("a reply of %d bytes %x... is not one of the batch's frames, in order", len(r), r[:min(16, len(r))])
			}
			i++
		}
		run.checked++
		return false
	}
	if len(got) != len(rec.frames) {
		t.Fatalf("%d chains should have given %d frames, the handler got %d", n, len(got), len(rec.frames))
	}
	for i := range got {
		if !bytes.Equal(got[i], rec.frames[i]) {
			t.Fatalf("frame %d of the batch: got %d bytes %x..., want %d bytes %x...", i, len(rec.frames[i]),
				rec.frames[i][:min(16, len(rec.frames[i]))], len(got[i]), got[i][:min(16, len(got[i]))])
		}
	}
	for _, r := range []DropReason{DropTxShort, DropTxTooBig, DropLinkDown} {
		if after2[r]-drops[r] != wantDrops[r] {
			t.Fatalf("%v drops: %d, want %d", r, after2[r]-drops[r], wantDrops[r])
		}
	}
	run.checked++
	return false
}

// txLoopRx is the receive queue the Loopback's replies go to, with a
// well-behaved driver that keeps every buffer it gets back posted.
type txLoopRx struct {
	drv           *vring.DriverQueue
	dq            *vring.DeviceQueue
	mem, mirror   []byte
	ringAt, bufAt uint64 // the ring's and the buffers' areas
	bufLen        uint64
	bufOf         map[uint16]uint64 // head (or buffer id) -> buffer address
	free          []uint64
}

// startLoopRx starts receive queue 0 of d on a ring at l and posts bufs
// buffers of bufLen bytes from bufAt on.
func startLoopRx(t *testing.T, d *Device, mem *vring.Memory, log *dirty.Bitmap, backing, mirror []byte, l vring.Layout,
	f virtio.Features, ringAt, bufAt uint64, bufs int, bufLen uint64) *txLoopRx {
	t.Helper()
	drv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: l, Features: f})
	if err != nil {
		t.Fatal(err)
	}
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: l, Features: f, State: vring.InitialState(f),
		Log: log.NewCache()})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.StartQueue(0, dq, nil, nil); err != nil {
		t.Fatal(err)
	}
	rx := &txLoopRx{drv: drv, dq: dq, mem: backing, mirror: mirror, ringAt: ringAt, bufAt: bufAt, bufLen: bufLen,
		bufOf: map[uint16]uint64{}}
	for i := range bufs {
		rx.free = append(rx.free, bufAt+uint64(i)*bufLen)
	}
	rx.refill(t)
	return rx
}

// refill posts the free buffers; the driver's writes go into the mirror.
func (rx *txLoopRx) refill(t *testing.T) {
	t.Helper()
	for _, a := range rx.free {
		head, err := rx.drv.Add([]vring.Buffer{{Addr: vring.GuestAddr(a), Len: uint32(rx.bufLen), Writable: true}})
		if err != nil {
			t.Fatal(err)
		}
		rx.bufOf[head] = a
	}
	rx.free = rx.free[:0]
	rx.drv.Publish()
	copy(rx.mirror[rx.ringAt:rx.bufAt], rx.mem[rx.ringAt:rx.bufAt])
}

// collect takes the frames the device wrote into the receive buffers (the
// bytes after the virtio-net header), and posts the buffers again.
func (rx *txLoopRx) collect(t *testing.T) [][]byte {
	t.Helper()
	var frames [][]byte
	for {
		head, length, ok, err := rx.drv.Reclaim()
		if err != nil {
			t.Fatalf("the receive queue's device broke the rules: %v", err)
		}
		if !ok {
			break
		}
		a, known := rx.bufOf[head]
		if !known || uint64(length) > rx.bufLen || (length > 0 && length < virtio.NetHdrSize) {
			t.Fatalf("receive buffer %d returned with length %d", head, length)
		}
		if length > 0 { // 0: given back empty, its frame too large for it (DropRxTooSmall)
			frames = append(frames, append([]byte(nil), rx.mem[a+virtio.NetHdrSize:a+uint64(length)]...))
		}
		delete(rx.bufOf, head)
		rx.free = append(rx.free, a)
	}
	rx.refill(t)
	return frames
}

// txWant is what the oracle expects of one transmit chain.
type txWant struct {
	short bool   // shorter than the header
	frame []byte // the readable bytes after the header
}

// txOracle follows the split ring's chain at head as the test wrote it,
// as the device should: ok is false for what it does not model (buffers
// outside the memory, chains vring refuses). An indirect descriptor is
// followed into its table when indirect is set (INDIRECT_DESC
// negotiated).
func txOracle(mem []byte, l vring.Layout, size, head uint16, hdrLen int, indirect bool) (txWant, bool) {
	var readable []byte
	table, entries := uint64(l.Desc), uint64(size) // the descriptors being walked
	i, n, sawWrite, inTable := uint64(head), 0, false, false
	for {
		if i >= entries || n >= int(size) {
			return txWant{}, false
		}
		n++
		at := table + 16*i
		addr := binary.LittleEndian.Uint64(mem[at:])
		length := uint64(binary.LittleEndian.Uint32(mem[at+8:]))
		flags := binary.LittleEndian.Uint16(mem[at+12:])
		if addr+length > uint64(len(mem)) || addr+length < addr {
			return txWant{}, false
		}
		if flags&vring.DescFIndirect != 0 {
			if !indirect || inTable || flags&vring.DescFNext != 0 || length == 0 || length%16 != 0 {
				return txWant{}, false
			}
			// The table's entries count in the chain's length, not the
			// indirect descriptor itself.
			table, entries, i, inTable = addr, length/16, 0, true
			n--
			continue
		}
		if flags&vring.DescFWrite != 0 {
			sawWrite = true
		} else if sawWrite {
			return txWant{}, false
		} else {
			readable = append(readable, mem[addr:addr+length]...)
		}
		if flags&vring.DescFNext == 0 {
			break
		}
		i = uint64(binary.LittleEndian.Uint16(mem[at+14:]))
	}
	if len(readable) < hdrLen {
		return txWant{short: true}, true
	}
	return txWant{frame: readable[hdrLen:]}, true
}

// txPackedOracle is txOracle for a packed ring: it follows the chains
// available from the device's position next (index and wrap counter) as
// the test wrote them, as the device should, up to limit chains, each
// descriptor available (its AVAIL bit the wrap counter, its USED bit not),
// chains of NEXT-linked ring descriptors or one indirect descriptor whose
// table is walked in order (§2.8.7), with a buffer id (the last
// descriptor's) in range and not taken by an earlier chain of the batch,
// and no more descriptors in all than the ring holds. ok is false for
// what it does not model (buffers outside the memory, chains vring
// refuses); it stops at the first descriptor not available.
func txPackedOracle(mem []byte, l vring.Layout, size, next uint16, limit, hdrLen int, indirect bool) ([]txWant, bool) {
	const avail, used = vring.DescFAvail, vring.DescFUsed
	pos, wrap := next&^vring.PackedWrapBit, next&vring.PackedWrapBit != 0
	isAvail := func(flags uint16) bool { return (flags&avail != 0) == wrap && (flags&used != 0) != wrap }
	desc := func(table uint64, i uint64) (addr, length uint64, id, flags uint16) {
		at := table + 16*i
		return binary.LittleEndian.Uint64(mem[at:]), uint64(binary.LittleEndian.Uint32(mem[at+8:])),
			binary.LittleEndian.Uint16(mem[at+12:]), binary.LittleEndian.Uint16(mem[at+14:])
	}
	inMem := func(addr, length uint64) bool { return addr+length >= addr && addr+length <= uint64(len(mem)) }
	var want []txWant
	ids := map[uint16]bool{}
	descs := 0 // ring descriptors the batch's chains take
	for len(want) < limit {
		var readable []byte
		sawWrite := false
		// take adds a buffer to the chain: its bytes when readable;
		// false for a readable one after a writable one (vring refuses
		// the chain).
		take := func(addr, length uint64, flags uint16) bool {
			switch {
			case flags&vring.DescFWrite != 0:
				sawWrite = true
			case sawWrite:
				return false
			default:
				readable = append(readable, mem[addr:addr+length]...)
			}
			return true
		}
		var id uint16
		for n := 0; ; n++ {
			addr, length, did, flags := desc(uint64(l.Desc), uint64(pos))
			if !isAvail(flags) {
				if n == 0 {
					return want, true // the end of what the driver made available
				}
				return nil, false // a chain running into a descriptor not available
			}
			if descs++; descs > int(size) {
				return nil, false
			}
			if pos++; pos == size {
				pos, wrap = 0, !wrap
			}
			id = did
			if !inMem(addr, length) {
				return nil, false
			}
			if flags&vring.DescFIndirect != 0 {
				if !indirect || n > 0 || flags&vring.DescFNext != 0 || length == 0 || length%16 != 0 || length/16 > uint64(size) {
					return nil, false
				}
				for k := range length / 16 {
					a, ln, _, fl := desc(addr, k)
					if fl&vring.DescFIndirect != 0 || !inMem(a, ln) || !take(a, ln, fl) {
						return nil, false
					}
				}
				break
			}
			if !take(addr, length, flags) {
				return nil, false
			}
			if flags&vring.DescFNext == 0 {
				break
			}
		}
		if id >= size || ids[id] {
			return nil, false
		}
		ids[id] = true
		if len(readable) < hdrLen {
			want = append(want, txWant{short: true})
		} else {
			want = append(want, txWant{frame: readable[hdrLen:]})
		}
	}
	return want, true
}

// checkOffloadHdr checks a header an OffloadHandler got against what
// OffloadHandler's documentation promises.
func checkOffloadHdr(t *testing.T, h virtio.NetHdr, frame []byte) {
	t.Helper()
	if h.NumBuffers != 0 {
		t.Fatalf("num_buffers %d", h.NumBuffers)
	}
	if h.Flags&^virtio.NetHdrFNeedsCsum != 0 {
		t.Fatalf("flags %#x", h.Flags)
	}
	if h.Flags&virtio.NetHdrFNeedsCsum != 0 && int(h.CsumStart)+int(h.CsumOffset)+2 > len(frame) {
		t.Fatalf("checksum at %d+%d outside a frame of %d bytes", h.CsumStart, h.CsumOffset, len(frame))
	}
	switch h.GSOType &^ virtio.NetHdrGSOECN {
	case virtio.NetHdrGSONone:
	case virtio.NetHdrGSOTCPv4, virtio.NetHdrGSOTCPv6, virtio.NetHdrGSOUDPL4:
		if h.GSOSize == 0 {
			t.Fatal("GSO with gso_size 0")
		}
	default:
		t.Fatalf("gso_type %#x", h.GSOType)
	}
}

// The seeds do what they are there for, so FuzzTransmitRing's checks are
// not vacuous: the oracle compares frames, drops of each reason occur, and
// a GSO frame is segmented in software or reaches an OffloadHandler whole.
func TestTransmitFuzzSeeds(t *testing.T) {
	seeds := txFuzzSeeds()
	for _, c := range []struct {
		name string
		seed []byte
		want txFuzzRun
	}{
		// Chains of 116 and 68 frame bytes and one shorter than the
		// header in one batch; one frame after the restart.
		{"split", seeds[0], txFuzzRun{batches: 2, checked: 2, frames: 3}},
		// The same chains on a packed ring; nothing new after the
		// restart.
		{"packed", seeds[1], txFuzzRun{batches: 2, checked: 2, frames: 2}},
		// A chain with a writable descriptor after its readable one gives
		// its readable bytes (52 after the header); readable after
		// writable breaks the queue.
		{"writable", seeds[2], txFuzzRun{batches: 2, checked: 1, frames: 1, broken: true}},
		// One chain a batch: a drop while the link is down, then three
		// frames.
		{"link", seeds[3], txFuzzRun{batches: 4, checked: 4, frames: 3}},
		// A chain of 2 descriptors of 64 bytes (116 frame bytes) and
		// one of 100 of 16 bytes (1588).
		{"long split", seeds[6], txFuzzRun{batches: 1, checked: 1, frames: 2}},
		{"long packed", seeds[7], txFuzzRun{batches: 1, checked: 1, frames: 1}},
		// 5 entries of 32 bytes: 148 frame bytes.
		{"indirect split", seeds[8], txFuzzRun{batches: 1, checked: 1, frames: 1}},
		{"indirect packed", seeds[9], txFuzzRun{batches: 1, checked: 1, frames: 1}},
		// Replies: the frames of "split" and "packed" come back.
		{"loopback split", seeds[10], txFuzzRun{batches: 2, checked: 2, frames: 3}},
		{"loopback packed", seeds[11], txFuzzRun{batches: 2, checked: 2, frames: 2}},
		// 32 of 40 replies fit the receive buffers.
		{"loopback overflow", seeds[12], txFuzzRun{batches: 1, checked: 1, frames: 32}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := fuzzTransmitRing(t, c.seed)
			if got != c.want {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
	// 1536-byte buffer: 12 header bytes, a 1524-byte frame whose TCP
	// payload (1470 bytes) is cut at gso_size 500 into three segments by
	// the device, or handed to an OffloadHandler whole (the Loopback's
	// reply is then cut on the receive side).
	for i, want := range []txFuzzRun{
		{batches: 1, frames: 3}, {batches: 1, frames: 1, gso: 1}, {batches: 1, frames: 3}, {batches: 1, frames: 1, gso: 1},
		{batches: 1, frames: 3}, {batches: 1, frames: 3}, // the Loopback's reply, segmented for a driver without GUEST_TSO4
	} {
		got := fuzzTransmitRing(t, seeds[13+i])
		if got != want {
			t.Fatalf("GSO seed %d: got %+v, want %+v", i, got, want)
		}
	}
}
