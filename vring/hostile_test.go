package vring

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// rawRing is a ring whose driver side is written byte by byte, so tests can
// build exactly the (hostile) contents they want.
type rawRing struct {
	t      testing.TB
	mem    *Memory
	l      Layout
	dev    *DeviceQueue
	region []byte
}

const (
	rawSize   = 8
	rawRingAt = 0x1000
	rawData   = 0x4000 // buffers
	rawTable  = 0x8000 // indirect tables
	rawMem    = 0x10000
)

func newRawRing(t testing.TB, feat virtio.Features) *rawRing {
	t.Helper()
	reg, err := NewMemfdRegion(0, rawMem, nil)
	require.NoError(t, err)
	mem, err := NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	l := ContiguousLayout(rawRingAt, rawSize)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Index: 3, Layout: l, Features: feat})
	require.NoError(t, err)
	return &rawRing{t: t, mem: mem, l: l, dev: dev, region: reg.Bytes()}
}

func (r *rawRing) desc(table GuestAddr, i int, addr uint64, n uint32, flags, next uint16) {
	b := r.region[int(table)+16*i:]
	binary.LittleEndian.PutUint64(b, addr)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

// publish puts heads into the avail ring from slot `from` and sets avail.idx.
func (r *rawRing) publish(from uint16, heads ...uint16) {
	for i, h := range heads {
		slot := (int(from) + i) % rawSize
		binary.LittleEndian.PutUint16(r.region[int(r.l.Avail)+4+2*slot:], h)
	}
	r.setAvailIdx(from + uint16(len(heads)))
}

func (r *rawRing) setAvailIdx(v uint16) {
	binary.LittleEndian.PutUint16(r.region[int(r.l.Avail)+2:], v)
}

var allFeat = virtio.Features(0).With(virtio.FIndirectDesc, virtio.FEventIdx)

func TestHostileDeviceInput(t *testing.T) {
	const d = rawRingAt // descriptor table
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	tests := []struct {
		name     string
		feat     virtio.Features
		build    func(r *rawRing)
		want     error
		index    uint16
		indirect bool
	}{
		{"2.7.6 avail ring entry (head) must be < queue size", allFeat, func(r *rawRing) {
			r.publish(0, rawSize)
		}, ErrHeadOutOfRange, 0, false},
		{"2.7.5 next must be < queue size", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawData, 8, N, rawSize)
			r.publish(0, 0)
		}, ErrNextOutOfRange, 0, false},
		{"2.7.5.3.2 next within indirect table must be < table size", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 32, I, 0)
			r.desc(rawTable, 0, rawData, 8, N, 1)
			r.desc(rawTable, 1, rawData, 8, N, 2)
			r.publish(0, 0)
		}, ErrNextOutOfRange, 1, true},
		{"2.7.5 a chain must not loop", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawData, 8, N, 1)
			r.desc(d, 1, rawData, 8, N, 0)
			r.publish(0, 0)
		}, ErrChainLoop, 0, false},
		{"2.7.5 a descriptor must not chain to itself", allFeat, func(r *rawRing) {
			r.desc(d, 5, rawData, 8, N, 5)
			r.publish(0, 5)
		}, ErrChainLoop, 5, false},
		{"2.7.5.3.2 an indirect table must not loop", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 48, I, 0)
			r.desc(rawTable, 0, rawData, 8, N, 1)
			r.desc(rawTable, 1, rawData, 8, N, 2)
			r.desc(rawTable, 2, rawData, 8, N, 1)
			r.publish(0, 0)
		}, ErrChainLoop, 1, true},
		{"2.7.5.3.1 chain must not be longer than queue size (indirect table too big)", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 16*(rawSize+1), I, 0)
			r.publish(0, 0)
		}, ErrChainTooLong, 0, false},
		{"2.7.5.3.1 chain must not be longer than queue size (direct + indirect)", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawData, 8, N, 1)
			r.desc(d, 1, rawTable, 16*rawSize, I, 0)
			r.publish(0, 0)
		}, ErrChainTooLong, 1, false},
		{"2.7.5.3.1 no INDIRECT inside an indirect table", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 32, I, 0)
			r.desc(rawTable, 0, rawData, 8, N, 1)
			r.desc(rawTable, 1, rawTable, 16, I, 0)
			r.publish(0, 0)
		}, ErrNestedIndirect, 1, true},
		{"2.7.5.3.1 INDIRECT and NEXT must not both be set", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 16, I|N, 1)
			r.publish(0, 0)
		}, ErrIndirectWithNext, 0, false},
		{"2.7.5.3 indirect table length must not be zero", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 0, I, 0)
			r.publish(0, 0)
		}, ErrIndirectSize, 0, false},
		{"2.7.5.3 indirect table length must be a multiple of 16", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 24, I, 0)
			r.publish(0, 0)
		}, ErrIndirectSize, 0, false},
		{"2.7.5.3.1 INDIRECT only with VIRTIO_F_INDIRECT_DESC", 0, func(r *rawRing) {
			r.desc(d, 0, rawTable, 16, I, 0)
			r.publish(0, 0)
		}, ErrIndirectNotNegotiated, 0, false},
		{"2.7.4.2 readable descriptors must precede writable ones", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawData, 8, W|N, 1)
			r.desc(d, 1, rawData, 8, 0, 0)
			r.publish(0, 0)
		}, ErrReadableAfterWritable, 1, false},
		{"2.7.4.2 readable before writable inside an indirect table", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 32, I, 0)
			r.desc(rawTable, 0, rawData, 8, W|N, 1)
			r.desc(rawTable, 1, rawData, 8, 0, 0)
			r.publish(0, 0)
		}, ErrReadableAfterWritable, 1, true},
		{"buffer must lie in guest memory", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawMem-4, 8, 0, 0)
			r.publish(0, 0)
		}, ErrOutOfRange, 0, false},
		{"zero-length buffer must not lie past the end of guest memory", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawMem+1, 0, 0, 0)
			r.publish(0, 0)
		}, ErrOutOfRange, 0, false},
		{"zero-length buffer far outside guest memory", allFeat, func(r *rawRing) {
			r.desc(d, 0, 0xdeadbeef00000000, 0, 0, 0)
			r.publish(0, 0)
		}, ErrOutOfRange, 0, false},
		{"zero-length writable buffer past guest memory after a readable one", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawData, 8, N, 1)
			r.desc(d, 1, ^uint64(0), 0, W, 0)
			r.publish(0, 0)
		}, ErrOutOfRange, 1, false},
		{"zero-length buffer past guest memory inside an indirect table", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawTable, 32, I, 0)
			r.desc(rawTable, 0, rawData, 8, N, 1)
			r.desc(rawTable, 1, 2*rawMem, 0, W, 0)
			r.publish(0, 0)
		}, ErrOutOfRange, 1, true},
		{"buffer address plus length must not overflow", allFeat, func(r *rawRing) {
			r.desc(d, 0, ^uint64(0)-2, 8, 0, 0)
			r.publish(0, 0)
		}, ErrOverflow, 0, false},
		{"indirect table must lie in guest memory", allFeat, func(r *rawRing) {
			r.desc(d, 0, rawMem-16, 32, I, 0)
			r.publish(0, 0)
		}, ErrOutOfRange, 0, false},
		{"avail.idx must not be more than queue size ahead", allFeat, func(r *rawRing) {
			r.setAvailIdx(rawSize + 1)
		}, ErrAvailIdxJump, rawSize + 1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newRawRing(t, tc.feat)
			tc.build(r)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.Error(t, err)
			assert.False(t, ok)
			assert.ErrorIs(t, err, tc.want)
			var qe *QueueError
			require.ErrorAs(t, err, &qe)
			assert.Equal(t, 3, qe.Queue)
			assert.Equal(t, tc.index, qe.Index)
			assert.Equal(t, tc.indirect, qe.Indirect)
			if errors.Is(tc.want, ErrOutOfRange) || errors.Is(tc.want, ErrOverflow) {
				assert.ErrorIs(t, err, ErrBufferOutOfRange)
			}

			// Broken: every call fails with ErrQueueBroken and the cause.
			_, err = r.dev.Pop(&c)
			assert.ErrorIs(t, err, ErrQueueBroken)
			assert.ErrorIs(t, err, tc.want)
			assert.ErrorIs(t, r.dev.Push(0, 0), ErrQueueBroken)
			_, err = r.dev.PopBatch(make([]Chain, 2))
			assert.ErrorIs(t, err, ErrQueueBroken)
			_, err = r.dev.EnableNotify()
			assert.ErrorIs(t, err, ErrQueueBroken)
			assert.ErrorIs(t, r.dev.Err(), tc.want)
			assert.False(t, r.dev.NeedsInterrupt())

			// Reset, then a valid chain at index 0 works again.
			r.dev.Reset()
			require.NoError(t, r.dev.Err())
			r.desc(d, 0, rawData, 8, 0, 0)
			r.publish(0, 0)
			ok, err = r.dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			assert.Equal(t, uint16(0), c.Head)
		})
	}
}

func TestValidDeviceInput(t *testing.T) {
	const d = rawRingAt
	const N, W, I = DescFNext, DescFWrite, DescFIndirect
	t.Run("2.7.6 avail.idx exactly queue size ahead is a full ring", func(t *testing.T) {
		r := newRawRing(t, allFeat)
		heads := make([]uint16, rawSize)
		for i := range heads {
			heads[i] = uint16(i)
			r.desc(d, i, rawData+uint64(i)*8, 8, 0, 0)
		}
		r.publish(0, heads...)
		cs := make([]Chain, rawSize+1)
		n, err := r.dev.PopBatch(cs)
		require.NoError(t, err)
		require.Equal(t, rawSize, n)
	})
	t.Run("2.7.5 chain as long as the queue size is allowed", func(t *testing.T) {
		r := newRawRing(t, allFeat)
		for i := range rawSize {
			flags := N
			if i == rawSize-1 {
				flags = W
			}
			r.desc(d, i, rawData+uint64(i)*8, 8, flags, uint16(i+1))
		}
		r.publish(0, 0)
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Len(t, c.Segs, rawSize)
		assert.Equal(t, rawSize-1, c.Readable)
		assert.Equal(t, uint64(8), c.WritableLen)
	})
	t.Run("2.7.5.3.2 device ignores WRITE on the descriptor naming an indirect table", func(t *testing.T) {
		r := newRawRing(t, allFeat)
		r.desc(d, 0, rawData, 4, N, 1)
		r.desc(d, 1, rawTable, 32, I|W, 0)
		r.desc(rawTable, 0, rawData+8, 4, 0|N, 1)
		r.desc(rawTable, 1, rawData+16, 12, W, 0)
		r.publish(0, 0)
		var c Chain
		ok, err := r.dev.Pop(&c)
		require.NoError(t, err)
		require.True(t, ok)
		require.Len(t, c.Segs, 3)
		assert.Equal(t, 2, c.Readable)
		assert.Equal(t, GuestAddr(rawData+16), c.Segs[2].Addr)
		assert.Equal(t, uint64(12), c.WritableLen)
	})
	// A zero-length buffer is an empty segment wherever a buffer of guest
	// memory could start or end: inside it or exactly at its end (the
	// addr == end case of vhost's "addr <= end of memory").
	for _, tc := range []struct {
		name  string
		addr  uint64
		flags uint16
	}{
		{"at the start of guest memory", 0, 0},
		{"inside guest memory", rawData, 0},
		{"inside guest memory, writable", rawData + 3, W},
		{"at the last byte of guest memory", rawMem - 1, 0},
		{"exactly at the end of guest memory", rawMem, W},
	} {
		t.Run("zero-length descriptor "+tc.name+" is an empty segment", func(t *testing.T) {
			r := newRawRing(t, allFeat)
			r.desc(d, 0, tc.addr, 0, tc.flags, 0)
			r.publish(0, 0)
			var c Chain
			ok, err := r.dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.Len(t, c.Segs, 1)
			assert.Equal(t, GuestAddr(tc.addr), c.Segs[0].Addr)
			assert.Empty(t, c.Segs[0].Buf)
		})
	}
}

func TestBufferAcrossAdjacentRegionsIsSplit(t *testing.T) {
	a, err := NewMemfdRegion(0, 0x10000, nil)
	require.NoError(t, err)
	b, err := NewMemfdRegion(0x10000, 0x10000, nil)
	require.NoError(t, err)
	mem, err := NewMemory(b, a)
	require.NoError(t, err)
	defer mem.Close()
	l := ContiguousLayout(0x1000, 4)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
	require.NoError(t, err)
	msg := []byte("0123456789abcdef")
	require.NoError(t, mem.Write(0x10000-6, msg))
	_, err = drv.Add([]Buffer{{Addr: 0x10000 - 6, Len: 16}, {Addr: 0xfff0, Len: 0x20, Writable: true}})
	require.NoError(t, err)
	drv.Publish()
	var c Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, c.Segs, 4)
	assert.Equal(t, 2, c.Readable)
	assert.Len(t, c.Segs[0].Buf, 6)
	assert.Len(t, c.Segs[1].Buf, 10)
	got := make([]byte, 16)
	assert.Equal(t, 16, c.Gather(got))
	assert.Equal(t, msg, got)
	assert.Equal(t, uint64(0x20), c.WritableLen)
}

// writeUsed forges a used entry and used.idx as a (hostile) device would.
func forgeUsed(region []byte, l Layout, slot int, id, n uint32, idx uint16) {
	binary.LittleEndian.PutUint32(region[int(l.Used)+4+8*slot:], id)
	binary.LittleEndian.PutUint32(region[int(l.Used)+8+8*slot:], n)
	binary.LittleEndian.PutUint16(region[int(l.Used)+2:], idx)
}

func TestHostileDriverSideInput(t *testing.T) {
	tests := []struct {
		name  string
		forge func(region []byte, l Layout, head uint16)
		want  error
		index uint16
	}{
		{"2.7.8 used id must name an outstanding chain (never added)", func(g []byte, l Layout, head uint16) {
			forgeUsed(g, l, 0, uint32(head)+1, 0, 1)
		}, ErrUsedIDNotOutstanding, 0},
		{"2.7.8 used id must be < queue size", func(g []byte, l Layout, head uint16) {
			forgeUsed(g, l, 0, 1<<20, 0, 1)
		}, ErrUsedIDNotOutstanding, 0},
		{"2.7.8 used len must not exceed the chain's writable bytes", func(g []byte, l Layout, head uint16) {
			forgeUsed(g, l, 0, uint32(head), 65, 1)
		}, ErrUsedLenTooLarge, 0},
		{"2.7.8 used.idx must not run ahead of outstanding chains", func(g []byte, l Layout, head uint16) {
			forgeUsed(g, l, 0, uint32(head), 1, 2)
		}, ErrUsedIdxJump, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reg, err := NewMemfdRegion(0, rawMem, nil)
			require.NoError(t, err)
			mem, err := NewMemory(reg)
			require.NoError(t, err)
			defer mem.Close()
			l := ContiguousLayout(rawRingAt, rawSize)
			drv, err := NewDriverQueue(mem, DriverQueueOptions{Index: 1, Layout: l})
			require.NoError(t, err)
			head, err := drv.Add([]Buffer{{Addr: rawData, Len: 8}, {Addr: rawData + 8, Len: 64, Writable: true}})
			require.NoError(t, err)
			drv.Publish()
			tc.forge(reg.Bytes(), l, head)
			_, _, ok, err := drv.Reclaim()
			assert.False(t, ok)
			assert.ErrorIs(t, err, tc.want)
			var qe *QueueError
			require.ErrorAs(t, err, &qe)
			assert.Equal(t, 1, qe.Queue)
			assert.Equal(t, tc.index, qe.Index)
			_, _, _, err = drv.Reclaim()
			assert.ErrorIs(t, err, ErrQueueBroken)
			assert.ErrorIs(t, err, tc.want)
			_, err = drv.Add([]Buffer{{Addr: rawData, Len: 8}})
			assert.ErrorIs(t, err, ErrQueueBroken)
		})
	}
}

// The driver side holds zero-length buffers to the device side's rule: in
// guest memory or exactly at its end.
func TestDriverZeroLengthBufferBounds(t *testing.T) {
	for _, tc := range []struct {
		addr GuestAddr
		ok   bool
	}{
		{0, true},
		{rawData, true},
		{rawMem, true},
		{rawMem + 1, false},
		{0xdeadbeef00000000, false},
	} {
		t.Run(tc.addr.String(), func(t *testing.T) {
			reg, err := NewMemfdRegion(0, rawMem, nil)
			require.NoError(t, err)
			mem, err := NewMemory(reg)
			require.NoError(t, err)
			defer mem.Close()
			drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: ContiguousLayout(rawRingAt, rawSize)})
			require.NoError(t, err)
			_, err = drv.Add([]Buffer{{Addr: tc.addr, Len: 0, Writable: true}})
			if tc.ok {
				require.NoError(t, err)
				return
			}
			assert.ErrorIs(t, err, ErrBadChain)
			assert.ErrorIs(t, err, ErrOutOfRange)
		})
	}
}
