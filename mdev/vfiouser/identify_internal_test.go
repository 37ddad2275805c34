package vfiouser

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestIdentify: which file a DMA_MAP's descriptor is, as the windows share
// it. A regular file is its inode and access mode, whatever descriptor
// refers to it; any other kind of file is the descriptor itself; and a
// descriptor among the standard streams is moved above them, since
// vring.RegionOptions takes descriptor 0 for none.
func TestIdentify(t *testing.T) {
	win := DMAMap{Flags: DMAReadable | DMAWritable, Size: 4096}
	memfd, err := unix.MemfdCreate("vfu-identify", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(memfd)
	require.NoError(t, unix.Ftruncate(memfd, 4096))
	dup := func(fd int) int {
		d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 3)
		require.NoError(t, err)
		return d
	}

	a, b := dup(memfd), dup(memfd)
	defer unix.Close(a)
	defer unix.Close(b)
	fa, ida, err := identify(win, a)
	require.NoError(t, err)
	_, idb, err := identify(win, b)
	require.NoError(t, err)
	assert.Equal(t, a, fa, "a descriptor above the standard streams is kept as it is")
	assert.Equal(t, ida, idb, "two descriptors of one regular file are one file")
	assert.Equal(t, -1, ida.fd)

	zero, err := unix.Open("/dev/zero", unix.O_RDWR|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(zero)
	z2 := dup(zero)
	defer unix.Close(z2)
	_, idz, err := identify(win, zero)
	require.NoError(t, err)
	_, idz2, err := identify(win, z2)
	require.NoError(t, err)
	assert.NotEqual(t, idz, idz2, "descriptors of a character device are files of their own")

	// Descriptor 0: park stdin, put a memfd descriptor there, and restore.
	saved := dup(0)
	defer func() {
		require.NoError(t, unix.Dup3(saved, 0, 0))
		unix.Close(saved)
	}()
	require.NoError(t, unix.Dup3(memfd, 0, 0))
	f0, id0, err := identify(win, 0)
	require.NoError(t, err)
	defer unix.Close(f0)
	assert.GreaterOrEqual(t, f0, 3, "moved above the standard streams")
	assert.Equal(t, ida, id0, "the same file")
	_, err = unix.FcntlInt(0, unix.F_GETFD, 0)
	assert.ErrorIs(t, err, unix.EBADF, "descriptor 0 was closed")

	_, _, err = identify(DMAMap{Flags: DMAWritable, Size: 4096}, a)
	assert.ErrorIs(t, err, ErrFlags, "a window with a descriptor must be readable")
	_, _, err = identify(DMAMap{Flags: DMAReadable, Size: 4096, Offset: 1}, a)
	assert.ErrorIs(t, err, ErrRange, "an offset inside a page")
}
