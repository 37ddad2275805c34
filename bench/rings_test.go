package main

import (
	"context"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
)

// TestMain lets the test binary serve as the re-executed child of the
// cross-process ring benchmark and of the vhost-user back-end peer.
func TestMain(m *testing.M) {
	if isRingChild() {
		os.Exit(ringChildMain())
	}
	if isVhostChild() {
		os.Exit(vhostChildMain())
	}
	os.Exit(m.Run())
}

func TestChainBuffers(t *testing.T) {
	one := chainBuffers(1)
	require.Len(t, one, 1)
	assert.False(t, one[0].Writable, "a 1-descriptor chain is a readable frame")
	assert.Zero(t, writtenFor(one))
	four := chainBuffers(4)
	require.Len(t, four, 4)
	assert.Equal(t, []bool{false, false, true, true}, []bool{four[0].Writable, four[1].Writable, four[2].Writable, four[3].Writable},
		"readable descriptors come before writable ones")
	assert.Equal(t, uint32(2*ringBufLen), writtenFor(four))
}

// The single-goroutine loops must do exactly the work asked, without
// allocating (timeLoopAllocs fails the run otherwise).
func TestSameGoroutineLoopsRun(t *testing.T) {
	ctx := context.Background()
	for _, descs := range []int{1, 4} {
		for _, batch := range []int{1, 8, 32} {
			t1, err := benchDevice(ctx, time.Millisecond, 64, descs, batch, nil)
			n := t1.N
			require.NoError(t, err, "device descs=%d batch=%d", descs, batch)
			assert.Positive(t, n)
			assert.Positive(t, t1.CPU, "the thread's CPU time is measured")
			t2, err := benchDriver(ctx, time.Millisecond, 64, descs, batch)
			n = t2.N
			require.NoError(t, err, "driver descs=%d batch=%d", descs, batch)
			assert.Positive(t, n)
		}
	}
}

// With a log, every used-ring write and every written buffer byte is
// marked: the used ring's page and the writable buffers' page.
func TestDeviceLoopLogs(t *testing.T) {
	bm, err := dirty.New(ringMemSize, nil)
	require.NoError(t, err)
	defer bm.Close()
	_, err = benchDevice(context.Background(), time.Millisecond, 64, 4, 8, bm)
	require.NoError(t, err)
	assert.True(t, bm.PageDirty(ringBufBase/dirty.DefaultPageSize), "written buffers are logged")
	assert.Positive(t, bm.Count())
}

func TestCrossThreadMovesAllChains(t *testing.T) {
	for _, batch := range []int{1, 32} {
		el, err := libCrossThread(context.Background(), crossOptions{RingSize: 64, Descs: 4, Batch: batch, Chains: 5000, HostCPU: 0, GuestCPU: otherCPU()})
		require.NoError(t, err)
		assert.Positive(t, el)
	}
}

func TestCrossProcessMovesAllChains(t *testing.T) {
	el, err := libCrossProcess(context.Background(), crossOptions{RingSize: 64, Descs: 1, Batch: 8, Chains: 5000, HostCPU: 0, GuestCPU: otherCPU()})
	require.NoError(t, err)
	assert.Positive(t, el)
}

// otherCPU is a second CPU when there is one: two busy-polling threads on
// one CPU only progress at scheduler-tick pace.
func otherCPU() int {
	if runtime.NumCPU() > 1 {
		return 1
	}
	return 0
}

func TestPinThreadRejectsBadCPU(t *testing.T) {
	done := make(chan error, 1)
	go func() {
		_, err := pinThread(1 << 20)
		done <- err
	}()
	assert.Error(t, <-done)
}

// The allocation check of the timed loops fails a loop that allocates per
// operation or per batch, and not one whose run saw a few allocations of
// the harness's other goroutines (a profile writer, the runtime).
func TestAllocFailed(t *testing.T) {
	for _, tc := range []struct {
		name   string
		allocs uint64
		ops    int
		want   bool
	}{
		{"none", 0, 30_000_000, false},
		{"background over a long run", 66, 30_000_000, false},
		{"background up to the floor over a short run", 64, 1024, false},
		{"one per operation", 30_000_000, 30_000_000, true},
		{"one per batch of 32", 1_000_000, 32_000_000, true},
		{"one per batch of 1024", 29_297, 30_000_000, true},
		{"one per batch of 4096", 7_325, 30_000_000, false},
		{"above the floor over a short run", 65, 1024, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, allocFailed(tc.allocs, tc.ops))
		})
	}
}

// A loop that allocates fails timeLoopAllocs; one that does not passes.
func TestTimeLoopAllocsCatchesAllocation(t *testing.T) {
	var sink []byte
	_, err := timeLoopAllocs(context.Background(), 20*time.Millisecond, func(n int) error {
		for range n {
			sink = make([]byte, 64)
		}
		return nil
	})
	require.ErrorContains(t, err, "hot path allocated")
	_ = sink
	_, err = timeLoopAllocs(context.Background(), 20*time.Millisecond, func(n int) error {
		x := 0
		for i := range n {
			x += i
		}
		_ = x
		return nil
	})
	require.NoError(t, err)
}
