package vhostuser

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// A front-end's memfd is sealed against shrinking when the back-end maps it,
// so the peer cannot truncate guest memory out from under the rings.
func TestMapMemTableSealsPeerMemfd(t *testing.T) {
	for _, tc := range []struct {
		name       string
		flags      int
		wantSealed bool
	}{
		{"sealable memfd gets F_SEAL_SHRINK", unix.MFD_ALLOW_SEALING, true},
		{"memfd without sealing support is mapped unsealed", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fd, err := unix.MemfdCreate("peer-guest", unix.MFD_CLOEXEC|tc.flags)
			require.NoError(t, err)
			defer unix.Close(fd)
			require.NoError(t, unix.Ftruncate(fd, 1<<20))
			dup, err := unix.Dup(fd) // mapMemTable takes ownership of its fds
			require.NoError(t, err)

			pm, err := mapMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: 0x7f0000000000}}, []int{dup}, DefaultMaxGuestMemory)
			require.NoError(t, err)
			defer pm.close()
			assert.Equal(t, tc.wantSealed, pm.mem.Regions()[0].Sealed())

			err = unix.Ftruncate(fd, 4096)
			if tc.wantSealed {
				assert.ErrorIs(t, err, unix.EPERM, "the peer must not be able to shrink sealed guest memory")
			} else {
				assert.NoError(t, err)
			}
		})
	}
}

// TestMapMemTableRegionBeyondInt: a region of 4 GiB and 1 MiB maps on
// 64-bit; on 32-bit, where an int holds neither it nor 2 GiB, it is
// refused with ErrBadRegion rather than mapped with a truncated length
// (1 MiB, under a region that claims 4 GiB).
func TestMapMemTableRegionBeyondInt(t *testing.T) {
	const size = 1<<32 + 1<<20
	fd, err := unix.MemfdCreate("peer-guest-large", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, size)) // sparse
	dup, err := unix.Dup(fd)
	require.NoError(t, err)
	pm, err := mapMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: size, UserspaceAddr: 0x7f0000000000}}, []int{dup}, DefaultMaxGuestMemory)
	if math.MaxInt == math.MaxInt32 {
		require.ErrorIs(t, err, ErrBadRegion)
		return
	}
	require.NoError(t, err)
	defer pm.close()
	require.Len(t, pm.mem.Regions(), 1)
	assert.EqualValues(t, uint64(size), pm.mem.Regions()[0].Size())
}

// TestDefaultMaxGuestMemoryFitsTheAddressSpace: a memory table of two
// 300 MiB regions is mapped under the default limit on 64-bit; on 32-bit it
// is refused before anything is mapped, since two such tables (the current
// one and its replacement) would take most of a 4 GiB address space, after
// which the Go runtime aborts the process when it next grows its heap.
func TestDefaultMaxGuestMemoryFitsTheAddressSpace(t *testing.T) {
	const size = 300 << 20
	var rs []MemoryRegion
	var fds []int
	for i := range 2 {
		fd, err := unix.MemfdCreate("peer-guest-default-limit", unix.MFD_CLOEXEC)
		require.NoError(t, err)
		require.NoError(t, unix.Ftruncate(fd, size))
		fds = append(fds, fd)
		rs = append(rs, MemoryRegion{GuestPhysAddr: uint64(i) * size, MemorySize: size, UserspaceAddr: 0x7f0000000000 + uint64(i)*size})
	}
	pm, err := mapMemTable(rs, fds, DefaultMaxGuestMemory)
	if math.MaxInt == math.MaxInt32 {
		require.ErrorIs(t, err, ErrBadRegion)
		return
	}
	require.NoError(t, err)
	defer pm.close()
	assert.Len(t, pm.mem.Regions(), 2)
}
