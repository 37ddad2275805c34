package mdev

import (
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
)

// The relay's guest interrupt: signalled on the current eventfd; a failure
// of the current one is the relay's (it fails the data path), and none
// at all is nothing to signal.
func TestSignalGuest(t *testing.T) {
	var call atomic.Pointer[vdpa.EventFD]
	require.NoError(t, signalGuest(&call), "no interrupt set up")

	fd := mustEventFD(t)
	call.Store(fd)
	require.NoError(t, signalGuest(&call))
	n, err := fd.TryWait()
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n, "one interrupt")

	require.NoError(t, fd.Close())
	assert.ErrorIs(t, signalGuest(&call), vdpa.ErrClosed, "the current interrupt's eventfd is closed")
}

// The guest's vector changes under the relay and the embedder closes the
// eventfd it replaced, while the relay signals: no signal fails for that
// (it goes to the new vector). Before signalGuest, a signal that loaded the
// old eventfd just before the swap failed with ErrClosed, and the relay
// put the device in DEVICE_NEEDS_RESET for a vector re-registration.
func TestSignalGuestFollowsAReplacedVector(t *testing.T) {
	var call atomic.Pointer[vdpa.EventFD]
	call.Store(mustEventFD(t))
	const swaps = 3000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range swaps {
			fd, err := vdpa.NewEventFD()
			if err != nil {
				t.Error(err)
				return
			}
			_ = call.Swap(fd).Close()
		}
	}()
	signals, failed := 0, 0
	var firstErr error
	for running := true; running; signals++ {
		select {
		case <-done:
			running = false
		default:
		}
		if err := signalGuest(&call); err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
		}
	}
	assert.Zero(t, failed, "signals that failed over %d swaps (%d signals); the first: %v", swaps, signals, firstErr)
	_ = call.Load().Close()
}
