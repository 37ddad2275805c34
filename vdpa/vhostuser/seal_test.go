package vhostuser

import (
	"strconv"
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

// TestMapMemTableWithin32BitAddressSpace: what a 64-bit back-end maps, a
// 32-bit one refuses with ErrBadRegion before anything is mapped: a region
// of 4 GiB and 1 MiB, which an int cannot hold (it used to be mapped with
// the truncated length, 1 MiB, under a region that claimed 4 GiB), and,
// under the default limit, a 600 MiB table (two such tables, the current
// one and its replacement, would take most of a 4 GiB address space, after
// which the Go runtime aborts the process when it next grows its heap).
func TestMapMemTableWithin32BitAddressSpace(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sizes []uint64
		limit uint64
	}{
		{"a region an int cannot hold", []uint64{1<<32 + 1<<20}, 1 << 46},
		{"a table above the default limit", []uint64{300 << 20, 300 << 20}, DefaultMaxGuestMemory},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rs []MemoryRegion
			var fds []int
			var at uint64
			for _, size := range tc.sizes {
				fd, err := unix.MemfdCreate("peer-guest-32bit", unix.MFD_CLOEXEC)
				require.NoError(t, err)
				require.NoError(t, unix.Ftruncate(fd, int64(size))) // sparse
				fds = append(fds, fd)
				rs = append(rs, MemoryRegion{GuestPhysAddr: at, MemorySize: size, UserspaceAddr: 0x7f0000000000 + at})
				at += size
			}
			pm, err := mapMemTable(rs, fds, tc.limit) // closes fds
			if strconv.IntSize == 32 {
				require.ErrorIs(t, err, ErrBadRegion)
				return
			}
			require.NoError(t, err)
			defer pm.close()
			regions := pm.mem.Regions()
			require.Len(t, regions, len(tc.sizes))
			for i, r := range regions {
				assert.Equal(t, tc.sizes[i], r.Size(), "region %d", i)
			}
		})
	}
}
