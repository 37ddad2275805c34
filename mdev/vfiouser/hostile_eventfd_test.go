package vfiouser_test

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
)

// TestHostileClientEventFDHoldsNothing: a client shares the file of every
// eventfd it hands over, so it can clear the file's non-blocking flag and
// fill the counter; the server's next write to it then waits in the
// kernel, with the server's interrupt lock held. The eventfd ends that
// wait by itself (vdpa.EventFD's watchdog): the trigger is answered, the
// interrupt lands, and neither Stats nor Close waits for the client.
func TestHostileClientEventFDHoldsNothing(t *testing.T) {
	r := newRig(t, nil)
	c := r.dial(t)
	ctx := testCtx(t)
	_, err := c.Negotiate(ctx)
	require.NoError(t, err)
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(efd)
	require.NoError(t, c.SetIRQEventfds(ctx, vfiouser.IRQMSIX, 0, 1, []int{efd}))
	// Filled before the flag is cleared: a counter that is not empty (the
	// server wrote to it) refuses the write (EAGAIN) instead of holding
	// the test.
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], 0xfffffffffffffffe)
	_, err = unix.Write(efd, b[:])
	require.NoError(t, err, "the eventfd's counter was not empty: the server wrote to it unasked")
	require.NoError(t, unix.SetNonblock(efd, false))

	// The trigger's write waits until the watchdog reads the full counter.
	trig := make(chan error, 1)
	go func() { trig <- c.SetIRQs(ctx, vfiouser.IRQMSIX, vfiouser.IRQSetActionTrigger, 0, 1) }()
	select {
	case err := <-trig:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the trigger waits for the client's eventfd")
	}
	stats := make(chan vfiouser.Stats, 1)
	go func() { stats <- r.srv.Stats() }()
	select {
	case <-stats:
	case <-time.After(10 * time.Second):
		t.Fatal("Stats waits for the client's eventfd")
	}
	require.NoError(t, unix.SetNonblock(efd, true))
	_, err = unix.Read(efd, b[:])
	require.NoError(t, err)
	assert.Equal(t, uint64(1), binary.NativeEndian.Uint64(b[:]), "the triggered interrupt landed")

	// The same again, left blocked for Close to find.
	binary.NativeEndian.PutUint64(b[:], 0xfffffffffffffffe)
	_, err = unix.Write(efd, b[:])
	require.NoError(t, err, "the eventfd's counter was not empty: the server wrote to it unasked")
	require.NoError(t, unix.SetNonblock(efd, false))
	tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	go func() { _ = c.SetIRQs(tctx, vfiouser.IRQMSIX, vfiouser.IRQSetActionTrigger, 0, 1) }()
	closed := make(chan error, 1)
	go func() { closed <- r.srv.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close waits for the client's eventfd")
	}
}
