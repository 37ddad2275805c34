package vdpa_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
)

func TestEventFDSignalsCoalesce(t *testing.T) {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	for i := 0; i < 3; i++ {
		require.NoError(t, e.Signal())
	}
	n, err := e.Wait(context.Background())
	require.NoError(t, err)
	assert.Equal(t, uint64(3), n)
	n, err = e.TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "Wait must have reset the counter")
}

func TestEventFDWaitAfterCancelledWait(t *testing.T) {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()

	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(10 * time.Millisecond); cancel() }()
	_, err = e.Wait(ctx)
	require.ErrorIs(t, err, context.Canceled)

	// A later Wait must block until signalled, not fail on a stale deadline.
	done := make(chan error, 1)
	go func() { _, err := e.Wait(context.Background()); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("Wait returned before any signal: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	require.NoError(t, e.Signal())
	require.NoError(t, <-done)
}

func TestEventFDDeadlineIsContextError(t *testing.T) {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer cancel()
	_, err = e.Wait(ctx)
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestEventFDCloseUnblocksWait(t *testing.T) {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { _, err := e.Wait(context.Background()); done <- err }()
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, e.Close())
	select {
	case err := <-done:
		assert.True(t, errors.Is(err, vdpa.ErrClosed), "got %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Wait")
	}
	assert.ErrorIs(t, e.Signal(), vdpa.ErrClosed)
}

func TestEventFDWaitBackgroundAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful under the race detector")
	}
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	ctx := context.Background()
	allocs := testing.AllocsPerRun(100, func() {
		_ = e.Signal()
		_, _ = e.Wait(ctx)
	})
	assert.Zero(t, allocs)
}
