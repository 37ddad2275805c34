package ctxclose

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// slowCloser's Close takes a while and counts its calls.
type slowCloser struct {
	calls atomic.Int32
	ended atomic.Bool
	delay time.Duration
}

func (c *slowCloser) Close() error {
	c.calls.Add(1)
	time.Sleep(c.delay)
	c.ended.Store(true)
	return nil
}

func TestReleaseBeforeTheContextEndsCancelsTheClose(t *testing.T) {
	c := &slowCloser{}
	ctx, cancel := context.WithCancel(context.Background())
	release := OnDone(ctx, c.Close)
	assert.False(t, release())
	cancel()
	time.Sleep(20 * time.Millisecond)
	assert.Zero(t, c.calls.Load(), "closed after release")
	assert.False(t, release(), "a second release returns the first one's result")
}

func TestReleaseWaitsForACloseInProgress(t *testing.T) {
	c := &slowCloser{delay: 50 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	release := OnDone(ctx, c.Close)
	cancel()
	require.Eventually(t, func() bool { return c.calls.Load() == 1 }, 5*time.Second, time.Millisecond)
	assert.True(t, release())
	assert.True(t, c.ended.Load(), "release returned before Close did")
	assert.True(t, release())
	assert.EqualValues(t, 1, c.calls.Load())
}

func TestReleaseAfterTheContextEndedWaits(t *testing.T) {
	for range 100 {
		c := &slowCloser{delay: time.Millisecond}
		ctx, cancel := context.WithCancel(context.Background())
		release := OnDone(ctx, c.Close)
		cancel()
		assert.True(t, release(), "ctx ended before release")
		assert.True(t, c.ended.Load(), "release returned before Close did")
	}
}
