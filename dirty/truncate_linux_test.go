package dirty_test

import (
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/vring"
)

// TestAttachedLogTruncatedWhileInUse: a peer hands over a log it can still
// shrink (a memfd without sealing) and truncates and regrows it as fast as
// it can while this process marks, harvests, counts and clears it, each
// call under vring.Guard. Each either returns or fails with
// vring.ErrMemoryFault; none kills the process. That includes race
// builds, whose sync/atomic operations on such memory could fault on the
// system stack, where the runtime cannot recover (internal/guestatomic).
func TestAttachedLogTruncatedWhileInUse(t *testing.T) {
	if !guestatomic.FaultSafe {
		t.Skip("a fault in sync/atomic under the race detector kills the process on this architecture (internal/guestatomic)")
	}
	size := uint64(2 * os.Getpagesize())
	fd, err := unix.MemfdCreate("peer-log", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, int64(size)))
	log, err := dirty.AttachFd(fd, 0, size, nil)
	require.NoError(t, err)
	defer log.Close()
	harvest := make([]uint64, log.Words())
	dst, err := dirty.New(log.Span(), nil)
	require.NoError(t, err)
	defer dst.Close()

	defer testenv.ShrinkLoop(t, fd, int64(size))()
	calls := []func() error{
		func() error { return log.Mark(0x1234000, 3*dirty.DefaultPageSize) },
		func() error { _, err := log.HarvestWords(harvest); return err },
		func() error { _, err := log.Harvest(dst); return err },
		func() error { log.Count(); return nil },
		func() error { return log.Clear() },
	}
	// At least 150 ms, until a fault was seen; a kernel that never faults
	// fails the test after 10 s.
	faults, ok := 0, 0
	start := time.Now()
	for time.Since(start) < 150*time.Millisecond || faults == 0 {
		require.Less(t, time.Since(start), 10*time.Second, "no fault in %d calls", ok)
		for _, call := range calls {
			// vring.Guard, as the vhost-user back-end runs its log
			// flushes: a fault is vring.ErrMemoryFault.
			if err := vring.Guard(call); err != nil {
				require.ErrorIs(t, err, vring.ErrMemoryFault)
				faults++
			} else {
				ok++
			}
		}
	}
	t.Logf("%d calls returned, %d faulted", ok, faults)
}
