package vhostuser

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vring"
)

// hungBackend answers the handshake (with STATUS) and never answers
// GET_STATUS; got receives each GET_STATUS as it arrives. Cleanup checks
// that no descriptor leaked.
func hungBackend(t *testing.T) (f *Frontend, got <-chan struct{}) {
	t.Helper()
	before := openFdSet(t)
	gotc := make(chan struct{}, 8)
	c, done := fakeBackend(t, func(m *Message) *fakeReply {
		if m.Request == ReqGetStatus {
			gotc <- struct{}{}
			return nil // never answers
		}
		return standard(m, ProtocolFeatures(0).With(PFStatus))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	f, err := NewFrontend(ctx, c.uc, &FrontendOptions{Timeout: time.Minute})
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = f.Close()
		<-done
		assert.Empty(t, leakedSince(t, before), "descriptors leaked")
	})
	return f, gotc
}

// returnsWithin runs fn and fails the test if it takes longer than d.
func returnsWithin(t *testing.T, d time.Duration, what string, fn func() error) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- fn() }()
	select {
	case err := <-errc:
		return err
	case <-time.After(d):
		t.Fatalf("%s still blocked after %v", what, d)
		return nil
	}
}

// Close must not wait behind a request the back-end never answers: it
// closes the socket, and the request returns vdpa.ErrClosed.
func TestFrontendCloseDoesNotWaitForHungBackend(t *testing.T) {
	f, got := hungBackend(t)
	errc := make(chan error, 1)
	go func() { _, err := f.Status(); errc <- err }()
	<-got
	err := returnsWithin(t, 2*time.Second, "Close", f.Close)
	assert.NoError(t, err)
	select {
	case err := <-errc:
		require.Error(t, err)
		assert.ErrorIs(t, err, vdpa.ErrClosed)
		var me *MessageError
		if assert.ErrorAs(t, err, &me) {
			assert.Equal(t, ReqGetStatus, me.Request)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the in-flight request did not return after Close")
	}
	assert.ErrorIs(t, f.SetStatus(0), vdpa.ErrClosed)
}

// A request whose context is cancelled while the back-end does not answer
// returns promptly with an error wrapping context.Canceled; the session is
// then out of step (vhost-user replies carry no request id) and every later
// request fails with ErrSessionBroken.
func TestFrontendContextCancelsRequest(t *testing.T) {
	f, got := hungBackend(t)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-got; cancel() }()
	err := returnsWithin(t, 2*time.Second, "StatusContext", func() error {
		_, err := f.StatusContext(ctx)
		return err
	})
	require.Error(t, err)
	assert.ErrorIs(t, err, context.Canceled)
	err = f.SetStatusContext(context.Background(), 0)
	assert.ErrorIs(t, err, ErrSessionBroken)
	assert.ErrorIs(t, err, context.Canceled, "the cause is kept")
	assert.NoError(t, f.Close())
}

// A deadline applies to the socket I/O like cancellation.
func TestFrontendContextDeadline(t *testing.T) {
	f, _ := hungBackend(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := returnsWithin(t, 2*time.Second, "StatusContext", func() error {
		_, err := f.StatusContext(ctx)
		return err
	})
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

// A caller waiting for its turn behind a hung request honours its own
// context and Close, and does not break the session by giving up.
func TestFrontendWaitingCallerGivesUp(t *testing.T) {
	f, got := hungBackend(t)
	first := make(chan error, 1)
	go func() { _, err := f.Status(); first <- err }()
	<-got
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := returnsWithin(t, 2*time.Second, "waiting SetStatusContext", func() error {
		return f.SetStatusContext(ctx, 0)
	})
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.False(t, errors.Is(err, ErrSessionBroken))

	waiting := make(chan error, 1)
	go func() { waiting <- f.SetStatus(0) }()
	time.Sleep(20 * time.Millisecond)
	assert.NoError(t, returnsWithin(t, 2*time.Second, "Close", f.Close))
	for _, c := range []chan error{first, waiting} {
		select {
		case err := <-c:
			assert.ErrorIs(t, err, vdpa.ErrClosed)
		case <-time.After(2 * time.Second):
			t.Fatal("a request still blocked after Close")
		}
	}
}

// QueueBase reads NextUsed from the used ring; when that read fails the
// error is returned, not a NextUsed of 0.
func TestFrontendQueueBaseUsedIdxUnreadable(t *testing.T) {
	c, done := fakeBackend(t, func(m *Message) *fakeReply {
		if m.Request == ReqGetVringBase {
			st, _ := DecodeVringState(m.Payload)
			return &fakeReply{payload: VringState{Index: st.Index, Num: 7}.Encode()}
		}
		return standard(m, 0)
	})
	defer func() { c.close(); <-done }()
	f, err := NewFrontend(context.Background(), c.uc, nil)
	require.NoError(t, err)
	defer f.Close()

	memAt := func(base vring.GuestAddr) *vring.Memory {
		reg, err := vring.NewMemfdRegion(base, 1<<20, nil)
		require.NoError(t, err)
		mem, err := vring.NewMemory(reg)
		require.NoError(t, err)
		t.Cleanup(func() { mem.Close() })
		return mem
	}
	require.NoError(t, f.SetMemory(memAt(0x100000)))
	l := vring.ContiguousLayout(0x100000, 256)
	require.NoError(t, f.SetQueueNum(0, 256))
	require.NoError(t, f.SetQueueAddr(0, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}))
	require.NoError(t, f.SetQueueKick(0, nil))
	// New guest memory that no longer holds the ring.
	require.NoError(t, f.SetMemory(memAt(0x800000)))

	st, err := f.QueueBase(0)
	require.Error(t, err, "got %+v", st)
	assert.ErrorIs(t, err, ErrAddrNotMapped)
	var me *MessageError
	if assert.ErrorAs(t, err, &me) {
		assert.Equal(t, ReqGetVringBase, me.Request)
	}
}

// startSplitQueue gives f 1 MiB of guest memory at 0x100000 and starts its
// queue 0 there as a split ring of size entries whose used.idx is used.
func startSplitQueue(t *testing.T, f *Frontend, size, used uint16) {
	t.Helper()
	reg, err := vring.NewMemfdRegion(0x100000, 1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	require.NoError(t, f.SetMemory(mem))
	l := vring.ContiguousLayout(0x100000, size)
	require.NoError(t, f.SetQueueNum(0, size))
	require.NoError(t, f.SetQueueAddr(0, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}))
	require.NoError(t, f.SetQueueKick(0, nil))
	require.NoError(t, mem.Write(l.Used+2, []byte{byte(used), byte(used >> 8)}))
}

// A split ring's GET_VRING_BASE answer is checked against used.idx in
// guest memory: a back-end that says it took more chains than the ring
// holds, or fewer than the used ring already returned, gets
// ErrUnexpectedReply naming GET_VRING_BASE instead of a state that no
// queue can be restarted or migrated at.
func TestFrontendSplitQueueBaseInFlight(t *testing.T) {
	const size = 256
	for _, tc := range []struct {
		name        string
		avail, used uint16
		ok          bool
	}{
		{"valid: 7 in flight", 7, 0, true},
		{"valid: 9 in flight across the index wrap", 3, 65530, true},
		{"valid: the whole ring in flight", 1000 + size, 1000, true},
		{"valid: nothing in flight", 500, 500, true},
		{"one more than the ring holds", 1000 + size + 1, 1000, false},
		{"avail behind used.idx", 5, 10, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, done := fakeBackend(t, func(m *Message) *fakeReply {
				if m.Request == ReqGetVringBase {
					st, _ := DecodeVringState(m.Payload)
					return &fakeReply{payload: VringState{Index: st.Index, Num: uint32(tc.avail)}.Encode()}
				}
				return standard(m, 0)
			})
			defer func() { c.close(); <-done }()
			f, err := NewFrontend(context.Background(), c.uc, nil)
			require.NoError(t, err)
			defer f.Close()
			startSplitQueue(t, f, size, tc.used)

			st, err := f.QueueBase(0)
			if tc.ok {
				require.NoError(t, err)
				assert.Equal(t, vring.QueueState{NextAvail: tc.avail, NextUsed: tc.used}, st)
				return
			}
			require.ErrorIs(t, err, ErrUnexpectedReply, "got %+v", st)
			var me *MessageError
			if assert.ErrorAs(t, err, &me) {
				assert.Equal(t, ReqGetVringBase, me.Request)
			}
		})
	}
}

// A reset without SET_STATUS or RESET_DEVICE stops each ring with
// GET_VRING_BASE and forgets its position, so a position no queue can be
// at does not fail the reset: the ring is stopped all the same.
func TestFrontendResetStopsRingWhateverItsPosition(t *testing.T) {
	var gets atomic.Int32
	c, done := fakeBackend(t, func(m *Message) *fakeReply {
		if m.Request == ReqGetVringBase {
			gets.Add(1)
			st, _ := DecodeVringState(m.Payload)
			return &fakeReply{payload: VringState{Index: st.Index, Num: 1000 + 300}.Encode()}
		}
		return standard(m, 0)
	})
	defer func() { c.close(); <-done }()
	f, err := NewFrontend(context.Background(), c.uc, nil)
	require.NoError(t, err)
	defer f.Close()
	startSplitQueue(t, f, 256, 1000)

	require.NoError(t, f.SetStatus(0))
	assert.Equal(t, int32(1), gets.Load(), "the reset stopped the ring")
}
