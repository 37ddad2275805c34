package testenv_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// TestShrinkLoop: while the loop runs, the file is seen empty and full
// (fstat, a different view than the loop's ftruncate); once stopped, it is
// left at its full size and no longer changes.
func TestShrinkLoop(t *testing.T) {
	const size = 8192
	fd, err := unix.MemfdCreate("shrink-loop-test", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	stop := testenv.ShrinkLoop(t, fd, size)
	seen := map[int64]bool{}
	start := time.Now()
	for !seen[0] || !seen[size] {
		require.Less(t, time.Since(start), 10*time.Second, "sizes seen: %v", seen)
		var st unix.Stat_t
		require.NoError(t, unix.Fstat(fd, &st))
		seen[st.Size] = true
	}
	stop()
	for range 100 {
		var st unix.Stat_t
		require.NoError(t, unix.Fstat(fd, &st))
		require.Equal(t, int64(size), st.Size)
	}
}
