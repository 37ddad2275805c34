package softnet

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/sysmem"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// The smallest receive state an entry can have: room for four segments of
// a guest address, a length and a slice each (what a chain popped into it
// needs), whatever else the device keeps.
const minRxEntry = 4 * (8 + 4 + 24)

func TestNewBoundsQueueMemory(t *testing.T) {
	tests := []struct {
		name    string
		pairs   uint16
		size    uint16
		bound   uint64
		ok      bool
		offload bool
	}{
		{"one pair within 1 MiB", 1, 256, 1 << 20, true, false},
		{"one pair of 32768 entries beyond 1 MiB", 1, 32768, 1 << 20, false, false},
		{"one pair beyond 4 KiB", 1, 256, 4 << 10, false, false},
		{"0x8000 pairs of 256 beyond 1 GiB", 0x8000, 256, 1 << 30, false, false},
		{"0x8000 pairs of 256 within 8 GiB (allocated on start only)", 0x8000, 256, 8 << 30, true, false},
		{"0x8000 pairs of 32768 beyond 64 GiB", 0x8000, 32768, 64 << 30, false, false},
		{"one pair within 256 KiB", 1, 256, 256 << 10, true, false},
		// Two segment buffers of MaxFrame (64 KiB) more do not fit.
		{"one pair with offloads beyond 256 KiB", 1, 256, 256 << 10, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := New(&Options{MaxQueuePairs: tt.pairs, MaxQueueSize: tt.size, MaxQueueMemory: tt.bound, Offload: tt.offload})
			if tt.ok {
				require.NoError(t, err)
				require.Equal(t, 2*int(tt.pairs)+1, d.NumQueues())
				return
			}
			require.ErrorIs(t, err, ErrTooLarge)
			require.Nil(t, d)
		})
	}
}

// TestNewDefaultBoundRefusesWhatWouldKillTheProcess: 0x8000 pairs × 32768
// entries passed validation and then died in a runtime out-of-memory error.
// With the default bound (a quarter of physical memory) it is an error.
func TestNewDefaultBoundRefusesWhatWouldKillTheProcess(t *testing.T) {
	need := uint64(0x8000) * 32768 * minRxEntry
	if total := sysmem.Total(); total == 0 || total/4 >= need {
		t.Skipf("machine memory %d: a quarter holds %d bytes of receive state", total, need)
	}
	_, err := New(&Options{MaxQueuePairs: 0x8000, MaxQueueSize: 32768})
	require.ErrorIs(t, err, ErrTooLarge)
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// deviceQueue returns a device-side queue of size entries over fresh guest
// memory.
func deviceQueue(t *testing.T, size uint16) *vring.DeviceQueue {
	t.Helper()
	n := (vring.ContiguousLayoutBytes(size) + 4095) &^ 4095
	r, err := vring.NewMemfdRegion(0, n, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: vring.ContiguousLayout(0, size), Features: base1})
	require.NoError(t, err)
	return dq
}

var base1 = virtio.Features(0).With(virtio.FVersion1)

// TestQueueStateAllocatedOnStart: New commits only the queue structs;
// a receive queue gets its chain state (sized by the driver's ring, not
// MaxQueueSize, with MRG_RXBUF; one chain without) when it starts, keeps
// it across stop and start, and gives it back on Reset.
func TestQueueStateAllocatedOnStart(t *testing.T) {
	before := heapInUse()
	d, err := New(&Options{MaxQueuePairs: 0x8000, MaxQueueSize: 256, MaxQueueMemory: 8 << 30})
	require.NoError(t, err)
	grew := heapInUse() - before
	// 0x8000 pairs × 256 entries of receive state would be at least
	// 0x8000*256*minRxEntry (1.2 GB); the queue structs alone are far
	// less than 64 MiB.
	require.Less(t, grew, uint64(64<<20), "New allocated %d bytes", grew)
	for _, q := range d.queues {
		require.Nil(t, q.stash)
		require.Nil(t, q.gather)
	}
	require.NoError(t, d.SetFeatures(base1.With(virtio.NetFMrgRxbuf)))

	rx := d.queues[0]
	require.NoError(t, d.StartQueue(0, deviceQueue(t, 64), nil, nil))
	require.Len(t, rx.stash, 64, "sized by the ring the driver set up")
	require.Len(t, rx.lens, 64)
	first := &rx.stash[0]
	_, err = d.StopQueue(0)
	require.NoError(t, err)
	require.NoError(t, d.StartQueue(0, deviceQueue(t, 64), nil, nil))
	require.Same(t, first, &rx.stash[0], "a stop and start of the same size allocates nothing")
	_, err = d.StopQueue(0)
	require.NoError(t, err)
	require.NoError(t, d.StartQueue(0, deviceQueue(t, 128), nil, nil))
	require.Len(t, rx.stash, 128, "a larger ring gets larger state")

	d.Reset()
	require.Nil(t, rx.stash, "Reset releases receive state")
	require.Nil(t, rx.lens)
	require.False(t, rx.isRunning())

	// Without MRG_RXBUF a frame fills one chain: one is all the queue
	// keeps, whatever the ring's size.
	require.NoError(t, d.SetFeatures(base1))
	require.NoError(t, d.StartQueue(0, deviceQueue(t, 128), nil, nil))
	require.Len(t, rx.stash, 1)
}

// TestWorkerStateReleasedOnReset: a transmit queue's gather buffer comes
// with its start and goes with Reset.
func TestWorkerStateReleasedOnReset(t *testing.T) {
	d, err := New(nil)
	require.NoError(t, err)
	require.NoError(t, d.SetFeatures(base1))
	tx := d.queues[1]
	require.Nil(t, tx.gather)
	require.NoError(t, d.StartQueue(1, deviceQueue(t, 32), nil, nil))
	require.Len(t, tx.gather, gatherInit)
	require.Len(t, tx.segBuf(), MaxFrame)
	d.Reset()
	require.Nil(t, tx.gather)
	require.Nil(t, tx.seg, "the offload segment buffer goes too")
	require.Nil(t, tx.chains)
}

// TestGatherGrowsToTheLargestFrame: a transmit queue starts with a gather
// buffer for the usual MTU, grows it (doubling, capped at a header and
// MaxFrame) when a larger split frame comes, and then allocates nothing.
func TestGatherGrowsToTheLargestFrame(t *testing.T) {
	d, err := New(nil)
	require.NoError(t, err)
	require.NoError(t, d.SetFeatures(base1))
	require.NoError(t, d.StartQueue(1, deviceQueue(t, 32), nil, nil))
	defer d.Reset()
	tx := d.queues[1]
	require.Len(t, tx.gather, gatherInit)
	require.Len(t, tx.gatherBuf(9000), 9000)
	require.Len(t, tx.gather, 9000, "doubling 2048 is not enough: the frame's size")
	require.Len(t, tx.gatherBuf(10000), 10000)
	require.Len(t, tx.gather, 18000, "doubled")
	require.Len(t, tx.gatherBuf(virtio.NetHdrSize+MaxFrame), virtio.NetHdrSize+MaxFrame)
	require.Len(t, tx.gather, virtio.NetHdrSize+MaxFrame, "capped at a header and MaxFrame")
	require.Zero(t, testing.AllocsPerRun(100, func() { tx.gatherBuf(virtio.NetHdrSize + MaxFrame) }))
}
