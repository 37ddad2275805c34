package vring

import (
	"errors"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMemoryFault checks MemoryOptions.Fault: a miss maps the missing range
// on demand (as VDUSE devices do with lazily added IOVA mappings), once,
// and bad fault results fail the access without corrupting the table.
func TestMemoryFault(t *testing.T) {
	var mu sync.Mutex
	calls := 0
	fault := func(addr GuestAddr, n uint64) (*Region, error) {
		mu.Lock()
		calls++
		mu.Unlock()
		switch {
		case addr >= 0x100000 && addr < 0x200000: // lazily mapped window
			return NewMemfdRegion(0x100000, 0x100000, nil)
		case addr >= 0x300000 && addr < 0x301000: // buggy: does not cover addr
			return NewRegion(0x500000, make([]byte, 0x1000), nil)
		case addr >= 0x400000 && addr < 0x401000: // buggy: overlaps the base region
			return NewRegion(0x0, make([]byte, 0x400100), nil)
		}
		return nil, errors.New("no such mapping")
	}
	base, err := NewMemfdRegion(0, 0x10000, nil)
	require.NoError(t, err)
	mem, err := NewMemoryWithOptions(&MemoryOptions{Fault: fault}, base)
	require.NoError(t, err)
	defer mem.Close()

	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			assert.NoError(t, mem.Write(0x100010, []byte("lazy")))
		}()
	}
	wg.Wait()
	assert.Equal(t, 1, calls, "concurrent misses fault once")
	require.Len(t, mem.Regions(), 2)
	b, err := mem.Slice(0x100010, 4)
	require.NoError(t, err)
	assert.Equal(t, "lazy", string(b))

	_, err = mem.Slice(0x900000, 4)
	assert.ErrorIs(t, err, ErrOutOfRange)
	assert.ErrorContains(t, err, "no such mapping")
	_, err = mem.Slice(0x300000, 4)
	assert.ErrorIs(t, err, ErrInvalidRegion)
	_, err = mem.Slice(0x400000, 4)
	assert.ErrorIs(t, err, ErrRegionOverlap)
	assert.Len(t, mem.Regions(), 2, "rejected fault results are not added")

	// A device queue walks a buffer in a not-yet-mapped range.
	l := ContiguousLayout(0x1000, 8)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
	require.NoError(t, err)
	_, err = drv.Add([]Buffer{{Addr: 0x100010, Len: 4}})
	require.NoError(t, err)
	drv.Publish()
	var c Chain
	ok, err := dev.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, "lazy", string(c.Segs[0].Buf))

	// RemoveRange drops (and closes) the faulted region; the next access
	// faults it in again.
	require.NoError(t, mem.RemoveRange(0x100000, 0x100fff))
	assert.Len(t, mem.Regions(), 1)
	b, err = mem.Slice(0x100010, 4)
	require.NoError(t, err)
	assert.Equal(t, []byte{0, 0, 0, 0}, b, "a fresh mapping")
	assert.Equal(t, 5, calls, "first fault, 3 failing faults, one fault after RemoveRange")
	assert.ErrorIs(t, mem.RemoveRange(2, 1), ErrInvalidRegion)

	_, err = NewMemoryWithOptions(nil)
	assert.ErrorIs(t, err, ErrInvalidRegion, "no regions and no fault function")
	empty, err := NewMemoryWithOptions(&MemoryOptions{Fault: fault})
	require.NoError(t, err)
	h, err := empty.GuestToHost(0x100000)
	require.NoError(t, err)
	assert.Equal(t, empty.Regions()[0].HostAddr(), h)
	require.NoError(t, empty.Close())
}
