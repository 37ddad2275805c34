package vdpa

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestDrainIfFull: Unblock's read takes the counter only at its limit,
// where a write waits; below it (a signal under way, a reader that is
// merely late) the count stays for the reader.
func TestDrainIfFull(t *testing.T) {
	for _, tc := range []struct {
		name      string
		count     uint64
		blocking  bool // the peer cleared O_NONBLOCK
		wantAfter uint64
	}{
		{"empty", 0, false, 0},
		{"pending signals", 5, false, 5},
		{"one below the limit", 0xfffffffffffffffd, true, 0xfffffffffffffffd},
		{"at the limit", 0xfffffffffffffffe, false, 0},
		{"at the limit, flag cleared", 0xfffffffffffffffe, true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
			require.NoError(t, err)
			defer unix.Close(fd)
			var b [8]byte
			if tc.count != 0 {
				binary.NativeEndian.PutUint64(b[:], tc.count)
				_, err = unix.Write(fd, b[:])
				require.NoError(t, err)
			}
			require.NoError(t, unix.SetNonblock(fd, !tc.blocking))
			drainIfFull(uintptr(fd))
			fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
			require.NoError(t, err)
			assert.NotZero(t, fl&unix.O_NONBLOCK, "non-blocking again")
			got := uint64(0)
			if _, err := unix.Read(fd, b[:]); err == nil {
				got = binary.NativeEndian.Uint64(b[:])
			} else {
				require.ErrorIs(t, err, unix.EAGAIN)
			}
			assert.Equal(t, tc.wantAfter, got)
		})
	}
}
