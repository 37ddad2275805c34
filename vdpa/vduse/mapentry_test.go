package vduse

import (
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vring"
)

// TestMapEntryRefusesShortFiles: an IOTLB entry whose file ends before the
// range it maps (a VMM's memfd, possibly truncated after it was sealed
// against nothing) is refused with ErrBadRequest rather than mapped: every
// access past the end of the file would raise SIGBUS. Entries inside the
// file map, and a file that is not regular (an eventfd's anonymous inode
// here, as the kernel's IOVA domain file is) is not judged by its size.
func TestMapEntryRefusesShortFiles(t *testing.T) {
	const page = 4096
	memfd := func(t *testing.T, size int64, flags int) int {
		fd, err := unix.MemfdCreate("vduse-test", unix.MFD_CLOEXEC|flags)
		require.NoError(t, err)
		t.Cleanup(func() { unix.Close(fd) })
		require.NoError(t, unix.Ftruncate(fd, size))
		return fd
	}
	for _, tc := range []struct {
		name   string
		size   int64 // file size
		flags  int
		e      iotlbEntry
		refuse bool
	}{
		{"inside the file", 4 * page, unix.MFD_ALLOW_SEALING, iotlbEntry{Start: 0x10000, Last: 0x10000 + 4*page - 1}, false},
		{"at an offset, to the end", 4 * page, 0, iotlbEntry{Offset: 2 * page, Start: 0, Last: 2*page - 1}, false},
		{"a page past the end", 4 * page, unix.MFD_ALLOW_SEALING, iotlbEntry{Start: 0, Last: 5*page - 1}, true},
		{"offset past the end", 4 * page, 0, iotlbEntry{Offset: 4 * page, Start: 0, Last: page - 1}, true},
		{"empty file", 0, 0, iotlbEntry{Start: 0, Last: page - 1}, true},
		{"offset near 2^64", 4 * page, 0, iotlbEntry{Offset: ^uint64(0) &^ (page - 1), Start: 0, Last: page - 1}, true},
		// A page if truncated to 32 bits: mapped whole on 64-bit, refused
		// on 32-bit, where a slice cannot be that long.
		{"4 GiB and a page", 1<<32 + page, 0, iotlbEntry{Start: 0, Last: 1<<32 + page - 1}, strconv.IntSize == 32},
		{"above 1 TiB", 1<<40 + page, 0, iotlbEntry{Start: 0, Last: 1<<40 + page - 1}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &Device{}
			r, err := d.mapEntry(memfd(t, tc.size, tc.flags), tc.e)
			if tc.refuse {
				require.ErrorIs(t, err, ErrBadRequest)
				assert.Nil(t, r)
				assert.Empty(t, d.maps, "nothing mapped")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.e.Last-tc.e.Start+1, r.Size())
			d.unmapRegions([]*vring.Region{r})
			assert.Empty(t, d.maps)
		})
	}
	t.Run("anonymous inode", func(t *testing.T) {
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		require.NoError(t, err)
		defer unix.Close(efd)
		require.NoError(t, checkFileSize(efd, 0, 1<<30))
	})
}
