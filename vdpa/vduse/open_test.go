//go:build linux

package vduse

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestOpenRetry: the device node is waited for (it appears shortly after
// VDUSE_CREATE_DEV), other open errors end the wait at once, and a
// context that ends ends it too, saying both why and what was missing.
func TestOpenRetry(t *testing.T) {
	t.Run("node appears", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "dev")
		go func() {
			time.Sleep(3 * openPoll)
			_ = os.WriteFile(path, nil, 0o600)
		}()
		fd, err := openRetry(context.Background(), path)
		require.NoError(t, err)
		unix.Close(fd)
	})
	t.Run("other errors end the wait", func(t *testing.T) {
		start := time.Now()
		_, err := openRetry(context.Background(), t.TempDir()) // a directory: EISDIR
		require.ErrorIs(t, err, unix.EISDIR)
		assert.Less(t, time.Since(start), openWait)
	})
	t.Run("context ends the wait", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(2*openPoll, cancel)
		start := time.Now()
		_, err := openRetry(ctx, filepath.Join(t.TempDir(), "missing"))
		require.ErrorIs(t, err, context.Canceled)
		require.ErrorIs(t, err, unix.ENOENT)
		assert.Less(t, time.Since(start), openWait)
	})
	t.Run("context with a cause ends the wait", func(t *testing.T) {
		cause := errors.New("the test's own cause")
		ctx, cancel := context.WithCancelCause(context.Background())
		time.AfterFunc(2*openPoll, func() { cancel(cause) })
		_, err := openRetry(ctx, filepath.Join(t.TempDir(), "missing"))
		require.ErrorIs(t, err, context.Canceled)
		require.ErrorIs(t, err, cause)
		require.ErrorIs(t, err, unix.ENOENT)
	})
	t.Run("gives up after openWait", func(t *testing.T) {
		if testing.Short() {
			t.Skip("waits openWait (1 s); -short skips it")
		}
		start := time.Now()
		_, err := openRetry(context.Background(), filepath.Join(t.TempDir(), "missing"))
		require.ErrorIs(t, err, unix.ENOENT)
		assert.GreaterOrEqual(t, time.Since(start), openWait)
	})
}
