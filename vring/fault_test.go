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

// TestMemoryTableEdits: a faulted region goes in its sorted place and is
// refused when it overlaps its neighbour on either side, and RemoveRange
// drops exactly the regions touching the range, in a table of many
// regions (both look only near the range, by binary search).
func TestMemoryTableEdits(t *testing.T) {
	const n, stride, size = 64, 0x10000, 0x1000 // regions at k*stride
	var next *Region
	fault := func(addr GuestAddr, _ uint64) (*Region, error) { return next, nil }
	regions := make([]*Region, n)
	var err error
	for k := range regions {
		regions[k], err = NewRegion(GuestAddr(k*stride), make([]byte, size), nil)
		require.NoError(t, err)
	}
	mem, err := NewMemoryWithOptions(&MemoryOptions{Fault: fault}, regions...)
	require.NoError(t, err)
	defer mem.Close()
	bases := func() []GuestAddr {
		var out []GuestAddr
		for _, r := range mem.Regions() {
			out = append(out, r.Base())
		}
		return out
	}

	for _, tc := range []struct {
		name       string
		base, size uint64
		access     GuestAddr
		err        error
	}{
		{"overlaps the next region", 10*stride + 0x8000, 0x9000, 10*stride + 0x8000, ErrRegionOverlap},
		{"overlaps the region before", 10*stride + size - 1, 0x2000, 10*stride + size, ErrRegionOverlap},
		{"overlaps the first region", 0, 0x2000, size, ErrRegionOverlap},
		{"covers a whole region", 20*stride - 0x100, 0x2000, 20*stride - 0x100, ErrRegionOverlap},
		{"between two regions", 10*stride + size, stride - size, 10*stride + size, nil},
		{"after the last region", n * stride, size, n*stride + 1, nil},
		{"at the top of the address space", ^uint64(0) - size + 1, size, ^GuestAddr(0), nil},
		{"overlaps the region at the top", ^uint64(0) - size, 2, ^GuestAddr(0) - size, ErrRegionOverlap},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewRegion(GuestAddr(tc.base), make([]byte, tc.size), nil)
			require.NoError(t, err)
			next = r
			before := len(mem.Regions())
			_, err = mem.Slice(tc.access, 1)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				assert.Len(t, mem.Regions(), before)
				return
			}
			require.NoError(t, err)
			assert.Len(t, mem.Regions(), before+1)
			assert.IsIncreasing(t, bases(), "the table stays sorted")
		})
	}
	require.Len(t, mem.Regions(), n+3)

	// [30*stride+size-1, 33*stride]: the last byte of region 30, regions 31
	// and 32, and the first byte of 33.
	require.NoError(t, mem.RemoveRange(30*stride+size-1, 33*stride))
	got := bases()
	assert.Len(t, got, n+3-4)
	for _, k := range []int{30, 31, 32, 33} {
		assert.NotContains(t, got, GuestAddr(k*stride), "region %d dropped", k)
	}
	for _, k := range []int{29, 34} {
		assert.Contains(t, got, GuestAddr(k*stride), "region %d kept", k)
	}
	// A range in a gap drops nothing; one past the end neither.
	require.NoError(t, mem.RemoveRange(40*stride+size, 41*stride-1))
	require.NoError(t, mem.RemoveRange(n*stride+size, ^GuestAddr(0)-size))
	assert.Len(t, bases(), n+3-4)
	// The range that ends at the top drops the region there.
	require.NoError(t, mem.RemoveRange(n*stride+size, ^GuestAddr(0)))
	assert.Len(t, bases(), n+2-4)
	assert.IsIncreasing(t, bases())
}
