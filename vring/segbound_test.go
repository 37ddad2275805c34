package vring

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// Guest memory for the segment-bound tests: one region at 0 holding the
// ring and an indirect table, followed by segPieces adjacent regions of
// segPiece bytes each from segData, as a peer that maps many tiny DMA
// windows lays them out. A buffer of k*segPiece bytes at a piece boundary
// crosses k-1 region boundaries and becomes k segments.
const (
	segSize    = 256 // queue size
	segRingAt  = 0x1000
	segTable   = 0x8000 // indirect table (segSize entries at most: 4 KiB)
	segData    = 0x10000
	segPiece   = 64
	segPieces  = 8192
	segMaxSegs = 2*segSize + 64 // MaxChainSegments(segSize)
)

type segRing struct {
	packed, indirect bool
	dev              *DeviceQueue
	head             []byte // the ring region's bytes
}

// segBuf is one descriptor's buffer: pieces*segPiece bytes from piece
// first (pieces 0: a zero-length buffer at that piece).
type segBuf struct {
	first, pieces int
	writable      bool
}

func newSegRing(t testing.TB, packed, indirect bool) *segRing {
	t.Helper()
	ring := make([]byte, segData)
	regions := []*Region{}
	r0, err := NewRegion(0, ring, nil)
	require.NoError(t, err)
	regions = append(regions, r0)
	data := make([]byte, segPieces*segPiece)
	for i := range segPieces {
		r, err := NewRegion(GuestAddr(segData+i*segPiece), data[i*segPiece:(i+1)*segPiece:(i+1)*segPiece], nil)
		require.NoError(t, err)
		regions = append(regions, r)
	}
	mem, err := NewMemory(regions...)
	require.NoError(t, err)
	feat := virtio.Features(0).With(virtio.FIndirectDesc, virtio.FEventIdx)
	l := ContiguousLayout(segRingAt, segSize)
	if packed {
		feat = feat.With(virtio.FRingPacked)
		l = ContiguousPackedLayout(segRingAt, segSize)
	}
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Index: 2, Layout: l, Features: feat, State: InitialState(feat)})
	require.NoError(t, err)
	return &segRing{packed: packed, indirect: indirect, dev: dev, head: ring}
}

// put writes a 16-byte descriptor: split (addr, len, flags, next) or
// packed (addr, len, id, flags).
func (r *segRing) put(table, i int, addr uint64, n uint32, a, b uint16) {
	d := r.head[table+16*i:]
	binary.LittleEndian.PutUint64(d, addr)
	binary.LittleEndian.PutUint32(d[8:], n)
	binary.LittleEndian.PutUint16(d[12:], a)
	binary.LittleEndian.PutUint16(d[14:], b)
}

// publish makes bufs available as one chain (buffer id / head 0 on a
// packed ring is the last descriptor's id, 7), direct or through an
// indirect table, at the start of a fresh (or Reset) queue.
func (r *segRing) publish(bufs []segBuf) {
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	table, last := segRingAt, len(bufs)-1
	if r.indirect {
		table = segTable
	}
	for i, b := range bufs {
		addr, n := uint64(segData+b.first*segPiece), uint32(b.pieces*segPiece)
		var flags uint16
		if b.writable {
			flags = W
		}
		switch {
		case r.packed && r.indirect: // the table's flags: WRITE only
			r.put(table, i, addr, n, 0, flags)
		case r.packed: // ring descriptors, first lap
			id := uint16(0)
			if i < last {
				flags |= N
			} else {
				id = 7
			}
			r.put(table, i, addr, n, id, flags|DescFAvail)
		default:
			if i < last {
				flags |= N
			}
			r.put(table, i, addr, n, flags, uint16(i+1))
		}
	}
	if r.indirect {
		n := uint32(16 * len(bufs))
		if r.packed {
			r.put(segRingAt, 0, segTable, n, 7, I|DescFAvail)
		} else {
			r.put(segRingAt, 0, segTable, n, I, 0)
		}
	}
	if !r.packed {
		avail := segRingAt + 16*segSize
		binary.LittleEndian.PutUint16(r.head[avail+4:], 0) // ring[0] = head 0
		binary.LittleEndian.PutUint16(r.head[avail+2:], 1) // avail.idx
	}
}

// span is n descriptors that each cover pieces pieces, one after another
// from piece first (wrapping around the pieces).
func span(n, first, pieces int, writable bool) []segBuf {
	bufs := make([]segBuf, n)
	for i := range bufs {
		bufs[i] = segBuf{(first + i*pieces) % (segPieces - pieces + 1), pieces, writable}
	}
	return bufs
}

func cat(parts ...[]segBuf) []segBuf {
	var all []segBuf
	for _, p := range parts {
		all = append(all, p...)
	}
	return all
}

var segLayouts = []struct {
	name             string
	packed, indirect bool
}{
	{"split direct", false, false},
	{"split indirect", false, true},
	{"packed direct", true, false},
	{"packed indirect", true, true},
}

func TestMaxChainSegments(t *testing.T) {
	assert.Equal(t, segMaxSegs, MaxChainSegments(segSize))
	assert.Equal(t, 66, MaxChainSegments(1))
	assert.Equal(t, 65600, MaxChainSegments(32768))
	assert.ErrorIs(t, ErrTooManySegments, ErrChainTooLong)
}

// Chains at the bound (and legitimate shapes below it) are popped whole.
func TestChainSegmentsWithinBound(t *testing.T) {
	tests := []struct {
		name string
		bufs []segBuf
		segs int
	}{
		{"every descriptor crosses one boundary", span(segSize, 0, 2, false), 2 * segSize},
		{"one descriptor across the bound's worth of regions", span(1, 0, segMaxSegs, true), segMaxSegs},
		// 575 segments through the region table, then one inside the
		// region it cached: the inline fast path adds the last.
		{"slow path, then the fast path up to the bound", cat(
			span(1, 0, segMaxSegs-1, false),
			[]segBuf{{segMaxSegs - 2, 1, true}}), segMaxSegs},
		{"a zero-length buffer as the last segment", cat(
			span(1, 0, segMaxSegs-1, false),
			[]segBuf{{100, 0, true}}), segMaxSegs},
	}
	for _, lo := range segLayouts {
		for _, tc := range tests {
			t.Run(lo.name+"/"+tc.name, func(t *testing.T) {
				r := newSegRing(t, lo.packed, lo.indirect)
				r.publish(tc.bufs)
				var c Chain
				ok, err := r.dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				require.Len(t, c.Segs, tc.segs)
				assert.LessOrEqual(t, cap(c.Segs), segMaxSegs, "Segs grown past the bound")
				var total uint64
				for _, b := range tc.bufs {
					total += uint64(b.pieces * segPiece)
				}
				assert.Equal(t, total, c.ReadableLen+c.WritableLen)
				require.NoError(t, r.dev.PushChain(&c, 0))
			})
		}
	}
}

// A chain whose segments would exceed MaxChainSegments is refused with
// ErrTooManySegments (matching ErrChainTooLong) at the descriptor that
// would take it past the bound, having built at most the bound's worth of
// segments, and breaks the queue like any other malformed chain.
func TestChainSegmentsPastBound(t *testing.T) {
	tests := []struct {
		name  string
		bufs  []segBuf
		index uint16 // descriptor (ring or table) index of the failure
	}{
		// The attack: every descriptor of a full-size chain across all
		// 8192 regions (2.1 million segments without the bound).
		{"every descriptor across every region", span(segSize, 0, segPieces, false), 0},
		{"one descriptor one region too many", span(1, 0, segMaxSegs+1, true), 0},
		{"second descriptor through the region table", cat(
			span(1, 0, segMaxSegs-6, false),
			[]segBuf{{0, 7, true}}), 1},
		{"third descriptor through the inline fast path", cat(
			span(1, 0, segMaxSegs-1, false),
			[]segBuf{{segMaxSegs - 2, 1, false}, {segMaxSegs - 2, 1, true}}), 2},
		{"zero-length descriptor past the bound", cat(
			span(1, 0, segMaxSegs, false),
			[]segBuf{{3, 0, true}}), 1},
	}
	for _, lo := range segLayouts {
		for _, tc := range tests {
			t.Run(lo.name+"/"+tc.name, func(t *testing.T) {
				r := newSegRing(t, lo.packed, lo.indirect)
				r.publish(tc.bufs)
				var c Chain
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				ok, err := r.dev.Pop(&c)
				runtime.ReadMemStats(&after)
				require.Error(t, err)
				assert.False(t, ok)
				assert.ErrorIs(t, err, ErrTooManySegments)
				assert.ErrorIs(t, err, ErrChainTooLong)
				assert.NotErrorIs(t, err, ErrBufferOutOfRange)
				var qe *QueueError
				require.ErrorAs(t, err, &qe)
				assert.Equal(t, 2, qe.Queue)
				assert.Equal(t, tc.index, qe.Index)
				assert.Equal(t, lo.indirect, qe.Indirect)
				assert.LessOrEqual(t, cap(c.Segs), segMaxSegs, "Segs grown past the bound")
				// No more than growing Segs to the bound by doubling: the
				// final array (the bound), at most twice that for the
				// smaller ones before it, plus the error.
				limit := uint64(3*segMaxSegs)*uint64(unsafe.Sizeof(Segment{})) + 4096
				assert.Less(t, after.TotalAlloc-before.TotalAlloc, limit, "bytes allocated by the refused Pop")

				// Broken: every call fails with ErrQueueBroken and the cause.
				_, err = r.dev.Pop(&c)
				assert.ErrorIs(t, err, ErrQueueBroken)
				assert.ErrorIs(t, err, ErrTooManySegments)
				_, err = r.dev.PopBatch(make([]Chain, 2))
				assert.ErrorIs(t, err, ErrQueueBroken)
				assert.ErrorIs(t, r.dev.Push(7, 0), ErrQueueBroken)
				assert.ErrorIs(t, r.dev.PushBatch([]UsedElem{{}}), ErrQueueBroken)
				_, err = r.dev.EnableNotify()
				assert.ErrorIs(t, err, ErrQueueBroken)
				assert.ErrorIs(t, r.dev.Err(), ErrTooManySegments)
				assert.False(t, r.dev.NeedsInterrupt())
				st := r.dev.State()
				assert.Equal(t, st.NextUsed, st.NextAvail, "the refused chain is not taken")

				// Reset, then a chain within the bound works again.
				r.dev.Reset()
				require.NoError(t, r.dev.Err())
				r.publish(span(2, 0, 3, false))
				ok, err = r.dev.Pop(&c)
				require.NoError(t, err)
				require.True(t, ok)
				assert.Len(t, c.Segs, 6)
			})
		}
	}
}

// PopBatch refuses the chain the same way and returns the chains before it.
func TestChainSegmentsPastBoundPopBatch(t *testing.T) {
	for _, lo := range segLayouts {
		t.Run(lo.name, func(t *testing.T) {
			r := newSegRing(t, lo.packed, lo.indirect)
			r.publish(span(segSize, 0, segPieces, true))
			cs := make([]Chain, 4)
			n, err := r.dev.PopBatch(cs)
			assert.Zero(t, n)
			assert.ErrorIs(t, err, ErrTooManySegments)
			for i := range cs {
				assert.LessOrEqual(t, cap(cs[i].Segs), segMaxSegs, fmt.Sprint("chain ", i))
			}
			_, err = r.dev.PopBatch(cs)
			assert.ErrorIs(t, err, ErrQueueBroken)
		})
	}
}
