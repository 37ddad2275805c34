package vdpa

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

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

// TestAwaitCloseOfAnIdleEventFDWritesNothing: a close that no call of the
// EventFD's holds, but that is slow to run (its goroutine waited for a CPU:
// here done is sent late), is waited for, and the counter a peer shares is
// left alone. Close used to take any close still running after unblockPoll
// for one a peer holds and wrote 1 into the empty counter: a spurious
// interrupt for the peer (CI met it under the race detector). With a Wait
// under way the rescue still runs, and wakes it.
func TestAwaitCloseOfAnIdleEventFDWritesNothing(t *testing.T) {
	for _, reading := range []bool{false, true} {
		peer, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		require.NoError(t, err)
		defer unix.Close(peer)
		own, err := unix.Dup(peer)
		require.NoError(t, err)
		e, err := EventFDFromFd(own)
		require.NoError(t, err)
		dup, err := unix.Dup(peer)
		require.NoError(t, err)
		if reading {
			e.reading.Add(1) // a Wait in its read
		}
		done := make(chan error, 1)
		time.AfterFunc(20*unblockPoll, func() { done <- e.f.Close() })
		require.NoError(t, e.awaitClose(done, dup))
		var b [8]byte
		_, err = unix.Read(peer, b[:])
		if reading {
			require.NoError(t, err, "the rescue did not wake the Wait under way")
			assert.Equal(t, uint64(1), binary.NativeEndian.Uint64(b[:]))
			continue
		}
		require.ErrorIs(t, err, unix.EAGAIN, "the close of an idle EventFD wrote %d into the counter the peer shares",
			binary.NativeEndian.Uint64(b[:]))
	}
}

// TestReadsThatCloseOverlapsEndClosed: once Close has begun, what a Wait
// or TryWait reads may be the 1 Close's rescue wrote to wake a read a peer
// holds; the call ends with ErrClosed instead of reporting that count.
// (Under a slow emulator the rescue can run before the close wakes a Wait
// parked in the poller; this pins the state that race produces.)
func TestReadsThatCloseOverlapsEndClosed(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		read func(e *EventFD) (uint64, error)
	}{
		{"Wait", func(e *EventFD) (uint64, error) { return e.Wait(ctx) }},
		{"TryWait", func(e *EventFD) (uint64, error) { return e.TryWait() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := NewEventFD()
			require.NoError(t, err)
			defer e.f.Close()
			require.NoError(t, e.Signal())
			n, err := tc.read(e)
			require.NoError(t, err, "before Close")
			require.Equal(t, uint64(1), n)

			e.closing.Store(true) // Close has begun; its rescue wrote 1
			var one [8]byte
			binary.NativeEndian.PutUint64(one[:], 1)
			_, err = unix.Write(e.Fd(), one[:])
			require.NoError(t, err)
			n, err = tc.read(e)
			require.ErrorIs(t, err, ErrClosed)
			require.Zero(t, n)
		})
	}
}
