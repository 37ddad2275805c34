package vfiouser

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestMmapFixedAnonReplacesPages: mmapFixedAnon puts fresh private
// anonymous memory over a shared file mapping in place: the same
// addresses, zeros to read, writes that no longer reach the file. (On
// 386, unix.SYS_MMAP is the old mmap taking a pointer to its arguments;
// the helper must not use it.)
func TestMmapFixedAnonReplacesPages(t *testing.T) {
	pg := unix.Getpagesize()
	fd, err := unix.MemfdCreate("vfu-retire", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, int64(2*pg)))
	b, err := unix.Mmap(fd, 0, 2*pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(t, err)
	defer unix.Munmap(b)
	b[0], b[2*pg-1] = 0xaa, 0xbb

	addr, err := mmapFixedAnon(b)
	require.NoError(t, err)
	assert.Equal(t, uintptr(unsafe.Pointer(&b[0])), addr, "mapped in place")
	assert.Zero(t, b[0])
	assert.Zero(t, b[2*pg-1])
	b[1] = 0xcc
	file := make([]byte, 2)
	_, err = unix.Pread(fd, file, 0)
	require.NoError(t, err)
	assert.Equal(t, []byte{0xaa, 0}, file, "the file kept its bytes and got none of the new ones")
}
