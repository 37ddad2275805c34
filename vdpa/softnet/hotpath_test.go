package softnet

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// loop drives the transmit path synchronously: the driver side adds a
// transmit chain and a receive buffer, txBatch loops the frame back, the
// driver reclaims both. No goroutines, so allocations are attributable.
type loop struct {
	d        *Device
	tx       *queue
	txq, rxq *vring.DriverQueue
	txBufs   []vring.Buffer
	rxBufs   []vring.Buffer
}

func newLoop(tb testing.TB, f virtio.Features, frameLen int) *loop {
	tb.Helper()
	return newLoopFrame(tb, f, false, virtio.NetHdr{}, func(d *Device) []byte {
		fr := make([]byte, frameLen)
		copy(fr, d.cfgMAC[:])
		return fr
	}, 4096)
}

// newLoopFrame builds a loop on a device (with Options.Offload if offload)
// that negotiated f, transmitting the frame frameFor returns, with header
// h, into receive buffers of rxLen bytes.
func newLoopFrame(tb testing.TB, f virtio.Features, offload bool, h virtio.NetHdr, frameFor func(*Device) []byte, rxLen uint32) *loop {
	tb.Helper()
	const size = 256
	d, err := New(&Options{MaxQueueSize: size, Offload: offload})
	require.NoError(tb, err)
	require.NoError(tb, d.SetFeatures(f))
	frame := frameFor(d)
	hdrLen := virtio.NetHdrLen(f)
	hb := make([]byte, hdrLen)
	require.NoError(tb, h.Encode(hb, hdrLen))
	ringBytes := (vring.ContiguousLayoutBytes(size) + 4095) &^ 4095
	data := vring.GuestAddr(2 * ringBytes)
	rxData := data + vring.GuestAddr((hdrLen+len(frame)+4095)&^4095)
	r, err := vring.NewMemfdRegion(0, uint64(rxData)+uint64(rxLen), nil)
	require.NoError(tb, err)
	mem, err := vring.NewMemory(r)
	require.NoError(tb, err)
	tb.Cleanup(func() { mem.Close() })
	rxL := vring.ContiguousLayout(0, size)
	txL := vring.ContiguousLayout(vring.GuestAddr(ringBytes), size)
	rxq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Layout: rxL, Features: f})
	require.NoError(tb, err)
	txq, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: 1, Layout: txL, Features: f})
	require.NoError(tb, err)
	rxd, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: rxL, Features: f, State: vring.InitialState(f)})
	require.NoError(tb, err)
	txd, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: 1, Layout: txL, Features: f, State: vring.InitialState(f)})
	require.NoError(tb, err)
	require.NoError(tb, d.StartQueue(0, rxd, nil, nil))
	tx := d.queues[1]
	tx.gather = make([]byte, virtio.NetHdrSize+MaxFrame)
	tx.dq = txd
	tx.tx = Tx{dev: d, pair: 0, q: tx}
	require.NoError(tb, mem.Write(data, append(hb, frame...)))
	return &loop{d: d, tx: tx, txq: txq, rxq: rxq,
		txBufs: []vring.Buffer{{Addr: data, Len: uint32(hdrLen)}, {Addr: data + vring.GuestAddr(hdrLen), Len: uint32(len(frame))}},
		rxBufs: []vring.Buffer{{Addr: rxData, Len: rxLen, Writable: true}}}
}

// post makes rx receive buffers and tx transmit chains available and
// publishes both rings.
func (l *loop) post(tb testing.TB, rx, tx int) {
	tb.Helper()
	for range rx {
		if _, err := l.rxq.Add(l.rxBufs); err != nil {
			tb.Fatal(err)
		}
	}
	for range tx {
		if _, err := l.txq.Add(l.txBufs); err != nil {
			tb.Fatal(err)
		}
	}
	l.rxq.Publish()
	l.txq.Publish()
}

// round moves n frames through the device.
func (l *loop) round(tb testing.TB, n int) {
	l.post(tb, n, n)
	got, err := l.d.txBatch(l.tx)
	if err != nil || got != n {
		tb.Fatalf("txBatch: %d, %v", got, err)
	}
	for i := 0; i < n; i++ {
		if _, _, ok, err := l.txq.Reclaim(); !ok || err != nil {
			tb.Fatalf("tx reclaim: %v %v", ok, err)
		}
		if _, _, ok, err := l.rxq.Reclaim(); !ok || err != nil {
			tb.Fatalf("rx reclaim: %v %v", ok, err)
		}
	}
}

func TestLoopbackPathAllocatesNothing(t *testing.T) {
	for _, f := range []virtio.Features{
		virtio.Features(0).With(virtio.FVersion1),
		virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf, virtio.FEventIdx),
		virtio.Features(0).With(virtio.FVersion1, virtio.FRingPacked),
		virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf, virtio.FEventIdx, virtio.FRingPacked),
	} {
		l := newLoop(t, f, 1500-18)
		require.Equal(t, f.Has(virtio.FRingPacked), l.txq.Packed())
		l.round(t, 32)
		allocs := testing.AllocsPerRun(100, func() { l.round(t, 32) })
		require.Zero(t, allocs, "features %s", f.Format(virtio.DeviceNet))
		require.Equal(t, uint64(32*102), l.d.Stats().Queues[0].Frames, "AllocsPerRun runs once more to warm up")
	}
}

func benchLoop(b *testing.B, f virtio.Features, frameLen int) {
	l := newLoop(b, f, frameLen)
	const batch = 64
	b.ReportAllocs()
	b.SetBytes(int64(frameLen) * batch)
	n := 0
	for b.Loop() {
		l.round(b, batch)
		n += batch
	}
	b.ReportMetric(float64(n)/b.Elapsed().Seconds()/1e6, "Mpps")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/frame")
}

// BenchmarkLoopback measures the device's transmit-to-receive path in
// process (driver side included): 64-frame batches.
func BenchmarkLoopback(b *testing.B) {
	v1 := virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx)
	b.Run("64B", func(b *testing.B) { benchLoop(b, v1, 64) })
	b.Run("1500B", func(b *testing.B) { benchLoop(b, v1, 1500) })
	b.Run("64B-mrg", func(b *testing.B) { benchLoop(b, v1.With(virtio.NetFMrgRxbuf), 64) })
	b.Run("64B-packed", func(b *testing.B) { benchLoop(b, v1.With(virtio.FRingPacked), 64) })
	b.Run("64B-mrg-packed", func(b *testing.B) { benchLoop(b, v1.With(virtio.NetFMrgRxbuf, virtio.FRingPacked), 64) })
}

// longChainLoop is a loop whose transmit chains are the header and the
// frame split into pieces-1 descriptors.
func longChainLoop(t *testing.T, pieces int) *loop {
	t.Helper()
	f := virtio.Features(0).With(virtio.FVersion1)
	l := newLoop(t, f, 200)
	hdr, frame := l.txBufs[0], l.txBufs[1]
	bufs := []vring.Buffer{hdr}
	n := uint32(pieces - 1)
	off := uint32(0)
	for i := range n {
		ln := frame.Len / n
		if i < frame.Len%n {
			ln++
		}
		bufs = append(bufs, vring.Buffer{Addr: frame.Addr + vring.GuestAddr(off), Len: ln})
		off += ln
	}
	require.Len(t, bufs, pieces)
	l.txBufs = bufs
	return l
}

// TestTransmitGroupKeepsOneLargeRoom: chains longer than any real frame
// grow the room of every chain of a transmit group that takes them; after
// the group only one chain (the first) keeps a room beyond txKeepSegs, as
// one chain did before groups, and the frames go through whole.
func TestTransmitGroupKeepsOneLargeRoom(t *testing.T) {
	l := longChainLoop(t, txKeepSegs+6) // grows a room of 8 to 128
	l.round(t, 3)                       // 3 chains of 70 descriptors: one group
	require.Len(t, l.tx.chains, txGroup)
	large := 0
	for i := range l.tx.chains {
		if cap(l.tx.chains[i].Segs) > txKeepSegs {
			large++
		}
	}
	assert.Equal(t, 1, large, "rooms beyond txKeepSegs kept")
	assert.Greater(t, cap(l.tx.chains[0].Segs), txKeepSegs, "the first chain keeps the largest room")
	assert.Equal(t, uint64(3), l.d.Stats().Queues[0].Frames)
	assert.Zero(t, l.d.Stats().Drops[DropTxShort]+l.d.Stats().Drops[DropTxTooBig])
}

// TestTransmitGroupKeepsRealFrameRoom: chains about as long as a real
// driver's longest (here 42 descriptors, which grow a room of 8 to
// txKeepSegs) keep their grown room, so a stream of them allocates nothing
// once every chain of the group has grown.
func TestTransmitGroupKeepsRealFrameRoom(t *testing.T) {
	const chains = 6 // 6 x 42 descriptors fill the 256-entry ring
	l := longChainLoop(t, 42)
	l.round(t, chains)
	allocs := testing.AllocsPerRun(20, func() { l.round(t, chains) })
	assert.Zero(t, allocs)
	for i := range chains {
		assert.Equal(t, txKeepSegs, cap(l.tx.chains[i].Segs), "chain %d", i)
	}
}
