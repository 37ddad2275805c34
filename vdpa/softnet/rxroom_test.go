package softnet

import (
	"errors"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// rawRx is a device whose receive queue 0 is a split ring the test writes
// descriptor by descriptor (vringtest.RawRing), and into which it delivers
// frames with Deliver: everything runs on the test's goroutine.
type rawRx struct {
	t    *testing.T
	d    *Device
	r    *vringtest.RawRing
	size uint16
	data vring.GuestAddr // dataBytes of guest memory after the ring
	idx  uint16          // next avail entry
}

func newRawRx(t *testing.T, size uint16, f virtio.Features, dataBytes uint64) *rawRx {
	t.Helper()
	ring := (vring.ContiguousLayoutBytes(size) + 4095) &^ 4095
	region, err := vring.NewMemfdRegion(0, ring+dataBytes, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(region)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	layout := vring.ContiguousLayout(0, size)
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: layout, Features: base1})
	require.NoError(t, err)
	r, err := vringtest.NewRawRing(mem, layout)
	require.NoError(t, err)
	d, err := New(nil)
	require.NoError(t, err)
	require.NoError(t, d.SetFeatures(f))
	require.NoError(t, d.StartQueue(0, dq, nil, nil))
	t.Cleanup(d.Reset)
	return &rawRx{t: t, d: d, r: r, size: size, data: vring.GuestAddr(ring)}
}

// chain writes descriptors first..first+len(lens)-1 as one chain of
// device-writable buffers of lens bytes (a zero length: an empty buffer at
// the start of the data area; the others one after the other from addr),
// and returns its head.
func (x *rawRx) chain(first int, addr vring.GuestAddr, lens ...uint32) uint16 {
	x.t.Helper()
	for i, n := range lens {
		flags, next := uint16(vring.DescFWrite), uint16(0)
		if i < len(lens)-1 {
			flags |= vring.DescFNext
			next = uint16(first + i + 1)
		}
		a := x.data
		if n != 0 {
			a = addr
			addr += vring.GuestAddr(n)
		}
		require.NoError(x.t, x.r.WriteDesc(x.r.Layout.Desc, first+i, a, n, flags, next))
	}
	return uint16(first)
}

// post makes heads available (one avail entry each) and publishes them.
func (x *rawRx) post(heads ...uint16) {
	x.t.Helper()
	for _, h := range heads {
		require.NoError(x.t, x.r.SetAvail(x.idx, h))
		x.idx++
	}
	require.NoError(x.t, x.r.SetAvailIdx(x.idx))
}

// drain delivers frame until the receive queue has no buffer left, and
// returns how many deliveries failed otherwise (each with a dropped frame).
func (x *rawRx) drain(frame []byte) int {
	x.t.Helper()
	for n := 0; n <= int(x.size); n++ {
		err := x.d.Deliver(0, frame)
		if errors.Is(err, ErrNoBuffer) {
			return n
		}
		require.ErrorIs(x.t, err, ErrBufferTooSmall)
	}
	x.t.Fatalf("%d frames and the ring is not empty", x.size+1)
	return 0
}

func bcastFrame(n int) []byte {
	f := make([]byte, n)
	for i := range f {
		f[i] = byte(i)
	}
	copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	return f
}

type memSnap struct{ total, heap uint64 }

func snapMem() memSnap {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSnap{ms.TotalAlloc, ms.HeapInuse}
}

// grewBy returns how much was allocated since s, and by how much more
// heap is in use (0 if less).
func (s memSnap) grewBy() (total, heap uint64) {
	now := snapMem()
	if now.heap > s.heap {
		heap = now.heap - s.heap
	}
	return now.total - s.total, heap
}

// TestMergeableRxZeroLengthChainsRepeated: a split ring may name one head
// in every avail entry (nothing tracks heads in flight). Here it is a
// chain of size-2 empty descriptors, behind one 12-byte buffer that takes
// the header. A chain that cannot hold the header takes no part in a
// frame (with MRG_RXBUF each buffer must hold one, §5.1.6.3.1): the
// device used to hold every entry of the ring for the frame, each a
// ring's worth of segments (44 MiB at 1024 entries, tens of GiB at
// 32768); now each goes back empty at once, memory stays flat, and the
// buffers the driver posts next receive frames.
func TestMergeableRxZeroLengthChainsRepeated(t *testing.T) {
	const size = 1024
	x := newRawRx(t, size, base1.With(virtio.NetFMrgRxbuf), 1<<20)
	zeros := make([]uint32, size-2)
	hostile := x.chain(0, 0, zeros...)
	hdrOnly := x.chain(size-2, x.data+4096, virtio.NetHdrSize)
	good := x.chain(size-1, x.data+8192, 2048)
	x.post(hdrOnly)
	for range size - 1 {
		x.post(hostile)
	}
	frame := bcastFrame(1000)

	before := snapMem()
	dropped := x.drain(frame)
	alloc, heap := before.grewBy()
	t.Logf("%d frames dropped; allocated %d bytes, heap in use +%d", dropped, alloc, heap)
	// The frame's first chain, and then each empty chain, went back.
	assert.Equal(t, size-1, dropped)
	st := x.d.Stats()
	assert.Equal(t, uint64(size-1), st.Drop(DropRxTooSmall))
	assert.Equal(t, uint64(1), st.Drop(DropRxNoBuffer), "the ring is empty")
	// One chain of size-2 segments is 40 KiB; the device held size-1 of
	// them (44 MiB) before.
	assert.Less(t, alloc, uint64(4<<20))
	assert.Less(t, heap, uint64(2<<20))
	rx := x.d.queues[0]
	assert.Zero(t, rx.nstash, "nothing held")
	assert.LessOrEqual(t, rx.segExtra, rx.segMax)

	_, used, err := x.r.UsedIdx()
	require.NoError(t, err)
	require.Equal(t, uint16(size), used, "every chain went back")
	for i := range uint16(size) {
		id, n, err := x.r.Used(i)
		require.NoError(t, err)
		assert.Zero(t, n, "used entry %d: nothing written", i)
		if i == 0 {
			assert.Equal(t, uint32(hdrOnly), id)
		} else {
			assert.Equal(t, uint32(hostile), id)
		}
	}

	// A good buffer now gets the next frame, whole.
	x.post(good)
	require.NoError(t, x.d.Deliver(0, frame))
	id, n, err := x.r.Used(size)
	require.NoError(t, err)
	assert.Equal(t, uint32(good), id)
	require.Equal(t, uint32(virtio.NetHdrSize+len(frame)), n)
	got := make([]byte, n)
	require.NoError(t, x.r.Mem.Read(x.data+8192, got))
	h, err := virtio.DecodeNetHdr(got, virtio.NetHdrSize)
	require.NoError(t, err)
	assert.Equal(t, uint16(1), h.NumBuffers)
	assert.Equal(t, frame, got[virtio.NetHdrSize:])
	assert.Equal(t, uint64(1), x.d.Stats().Queues[0].Frames)
}

// TestMergeableRxFragmentedChains: chains that each hold the header (12
// bytes) but come with size-2 empty descriptors, one head in every avail
// entry. A frame may take so many segments beyond four per chain (a
// chain as long as the ring: rxFrameSegs) and no more: each frame here
// gives its two chains back empty (DropRxFragmented), the device keeps
// the room of those two and no more, and allocates nothing per frame.
func TestMergeableRxFragmentedChains(t *testing.T) {
	const size = 1024
	x := newRawRx(t, size, base1.With(virtio.NetFMrgRxbuf), 1<<20)
	lens := make([]uint32, size-1)
	lens[0] = virtio.NetHdrSize
	frag := x.chain(0, x.data+4096, lens...)
	good := x.chain(size-1, x.data+8192, 2048)
	for range size {
		x.post(frag)
	}
	frame := bcastFrame(1000)

	// The first frame grows two entries' room (and is dropped).
	require.ErrorIs(t, x.d.Deliver(0, frame), ErrBufferTooSmall)
	before := snapMem()
	dropped := x.drain(frame)
	alloc, heap := before.grewBy()
	t.Logf("%d frames dropped; allocated %d bytes, heap in use +%d", dropped, alloc, heap)
	assert.Equal(t, size/2-1, dropped)
	st := x.d.Stats()
	assert.Equal(t, uint64(size/2), st.Drop(DropRxFragmented))
	assert.Zero(t, st.Drop(DropRxTooSmall))
	// The device used to hold 85 such chains per frame (12 bytes each),
	// 4 MiB, and all of the ring's when frames did not fit.
	assert.Less(t, alloc, uint64(1<<20), "nothing allocated per frame")
	assert.Less(t, heap, uint64(1<<20))
	rx := x.d.queues[0]
	assert.Zero(t, rx.nstash)
	assert.LessOrEqual(t, rx.segExtra, rx.segMax)

	_, used, err := x.r.UsedIdx()
	require.NoError(t, err)
	require.Equal(t, uint16(size), used)
	for i := range uint16(size) {
		_, n, err := x.r.Used(i)
		require.NoError(t, err)
		require.Zero(t, n, "used entry %d", i)
	}

	// Good buffers get frames: one spread over two (num_buffers 2).
	x.post(good)
	require.NoError(t, x.d.Deliver(0, frame))
	id, n, err := x.r.Used(size)
	require.NoError(t, err)
	assert.Equal(t, uint32(good), id)
	assert.Equal(t, uint32(virtio.NetHdrSize+len(frame)), n)
	small := x.chain(0, x.data+16384, 512)
	x.chain(1, x.data+20480, 1024)
	x.post(small, 1)
	require.NoError(t, x.d.Deliver(0, frame))
	id, n, err = x.r.Used(size + 1)
	require.NoError(t, err)
	assert.Equal(t, uint32(small), id)
	assert.Equal(t, uint32(512), n)
	id, n, err = x.r.Used(size + 2)
	require.NoError(t, err)
	assert.Equal(t, uint32(1), id)
	assert.Equal(t, uint32(virtio.NetHdrSize+len(frame)-512), n)
	hdr := make([]byte, virtio.NetHdrSize)
	require.NoError(t, x.r.Mem.Read(x.data+16384, hdr))
	h, err := virtio.DecodeNetHdr(hdr, virtio.NetHdrSize)
	require.NoError(t, err)
	assert.Equal(t, uint16(2), h.NumBuffers)
}

// TestMergeableRxLongChainAccepted: one chain as long as the ring (a
// header and a frame's worth of buffers in size descriptors) is a frame's
// whole allowance and is accepted, and so is a frame over chains of a
// few segments each.
func TestMergeableRxLongChainAccepted(t *testing.T) {
	const size = 64
	x := newRawRx(t, size, base1.With(virtio.NetFMrgRxbuf), 1<<20)
	lens := make([]uint32, size)
	for i := range lens {
		lens[i] = 32
	}
	long := x.chain(0, x.data+4096, lens...) // one buffer of 64 descriptors over 2 KiB
	x.post(long)
	frame := bcastFrame(1500)
	require.NoError(t, x.d.Deliver(0, frame))
	id, n, err := x.r.Used(0)
	require.NoError(t, err)
	assert.Equal(t, uint32(long), id)
	assert.Equal(t, uint32(virtio.NetHdrSize+len(frame)), n)
	got := make([]byte, n)
	require.NoError(t, x.r.Mem.Read(x.data+4096, got))
	assert.Equal(t, frame, got[virtio.NetHdrSize:])
	assert.Zero(t, x.d.Stats().Drop(DropRxFragmented))
}

// TestRxRoomTrimmed: once the stash keeps more room than segMax, chains
// the device is done with get their rxSegs room back, from the arrays
// they grew from (no allocation), until it is within segMax again.
func TestRxRoomTrimmed(t *testing.T) {
	x := newRawRx(t, 64, base1.With(virtio.NetFMrgRxbuf), 1<<20)
	rx := x.d.queues[0]
	rx.mu.Lock()
	defer rx.mu.Unlock()
	require.Equal(t, rxSpareSegs(64), rx.segMax)
	// Pop a 64-descriptor chain into each of eight entries, as if held.
	lens := make([]uint32, 64)
	for i := range lens {
		lens[i] = 16
	}
	head := x.chain(0, x.data+4096, lens...)
	for range 8 {
		x.post(head)
	}
	for i := range 8 {
		c := &rx.stash[i]
		old := c.Segs
		ok, err := rx.dq.Pop(c)
		require.NoError(t, err)
		rx.grew(old, cap(c.Segs))
		require.True(t, ok)
		require.Len(t, rx.stash[i].Segs, 64)
	}
	rx.nstash = 8
	perChain := cap(rx.stash[0].Segs) - rxSegs
	require.Equal(t, 8*perChain, rx.segExtra)
	require.Len(t, rx.spare, 8, "the arrays the chains grew from")
	require.Greater(t, rx.segExtra, rx.segMax)

	allocs := testing.AllocsPerRun(1, func() { rx.consume(8) })
	assert.Zero(t, allocs)
	assert.LessOrEqual(t, rx.segExtra, rx.segMax)
	assert.Greater(t, rx.segExtra, rx.segMax-perChain, "trimmed no more than needed")
	trimmed := 0
	for i := range rx.stash {
		if c := cap(rx.stash[i].Segs); c > rxSegs {
			assert.Equal(t, perChain+rxSegs, c)
		} else {
			require.Equal(t, rxSegs, c)
			if i < 8 {
				trimmed++
			}
		}
	}
	assert.Equal(t, 8-len(rx.spare), trimmed, "each trimmed chain took an array back from spare")
	assert.Equal(t, rx.segExtra, (8-trimmed)*perChain)
}
