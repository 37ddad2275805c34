package vdpa_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
	"golang.org/x/sys/unix"
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
	w := startParkedWaiter(t, e)
	require.NoError(t, e.Signal())
	n, err := w.result(t)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n)
}

// waiter is a goroutine blocked in EventFD.Wait(context.Background()).
type waiter struct {
	done chan waitResult
}

type waitResult struct {
	n   uint64
	err error
}

// startParkedWaiter starts a goroutine waiting on e and returns once that
// goroutine is parked in the runtime poller inside EventFD.Wait (its stack,
// from runtime.Stack, is in "IO wait" under EventFD.Wait below
// parkedWaiter), failing the test if it is not parked within 10 s or
// returns instead. So Wait provably blocked: it did not return early and
// is not spinning.
func startParkedWaiter(t *testing.T, e *vdpa.EventFD) *waiter {
	t.Helper()
	w := &waiter{done: make(chan waitResult, 1)}
	go parkedWaiter(e, w.done)
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		select {
		case r := <-w.done:
			t.Fatalf("Wait returned (%d, %v) instead of blocking", r.n, r.err)
		default:
		}
		if goroutineParkedIn(buf[:runtime.Stack(buf, true)], "vdpa_test.parkedWaiter", "vdpa.(*EventFD).Wait", "[IO wait") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the waiter never parked in EventFD.Wait")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case r := <-w.done:
		t.Fatalf("Wait returned (%d, %v) instead of blocking", r.n, r.err)
	default:
	}
	return w
}

// parkedWaiter is the waiter goroutine's body, named so that
// startParkedWaiter can find its stack.
//
//go:noinline
func parkedWaiter(e *vdpa.EventFD, done chan<- waitResult) {
	n, err := e.Wait(context.Background())
	done <- waitResult{n, err}
}

// goroutineParkedIn reports whether one goroutine in the runtime.Stack dump
// has state in its header line and both frames in its stack.
func goroutineParkedIn(dump []byte, body, frame, state string) bool {
	for _, g := range bytes.Split(dump, []byte("\n\n")) {
		header, _, _ := bytes.Cut(g, []byte("\n"))
		if bytes.Contains(header, []byte(state)) && bytes.Contains(g, []byte(body)) && bytes.Contains(g, []byte(frame)) {
			return true
		}
	}
	return false
}

// result is what the parked Wait returned, which it must do promptly once
// woken.
func (w *waiter) result(t *testing.T) (uint64, error) {
	t.Helper()
	select {
	case r := <-w.done:
		return r.n, r.err
	case <-time.After(5 * time.Second):
		t.Fatal("the parked Wait was not woken")
		return 0, nil
	}
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
	w := startParkedWaiter(t, e)
	require.NoError(t, e.Close())
	n, err := w.result(t)
	assert.True(t, errors.Is(err, vdpa.ErrClosed), "got %v", err)
	assert.Zero(t, n)
	assert.ErrorIs(t, e.Signal(), vdpa.ErrClosed)
}

func TestEventFDSignalWakesParkedWait(t *testing.T) {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	w := startParkedWaiter(t, e)
	require.NoError(t, e.Signal())
	n, err := w.result(t)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n)
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

// TestEventFDFromPeer: a descriptor from a peer is adopted only if it is
// an eventfd; anything else is refused with ErrNotEventFD and stays the
// caller's (still open, for the caller to close).
func TestEventFDFromPeer(t *testing.T) {
	var p [2]int
	require.NoError(t, unix.Pipe2(p[:], unix.O_CLOEXEC))
	defer unix.Close(p[0])
	s, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(s[1])
	mfd, err := unix.MemfdCreate("not-an-eventfd", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	tfd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_CLOEXEC)
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		fd   int
	}{{"pipe", p[1]}, {"socket", s[0]}, {"memfd", mfd}, {"timerfd (another anonymous inode)", tfd}, {"closed descriptor", 1 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := vdpa.EventFDFromFd(tc.fd)
			require.ErrorIs(t, err, vdpa.ErrNotEventFD)
			require.Nil(t, e)
			if tc.fd < 1<<20 {
				_, err := unix.FcntlInt(uintptr(tc.fd), unix.F_GETFD, 0)
				require.NoError(t, err, "the refused descriptor is still open")
				require.NoError(t, unix.Close(tc.fd))
			}
		})
	}
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	require.NoError(t, err)
	e, err := vdpa.EventFDFromFd(fd)
	require.NoError(t, err)
	require.NoError(t, e.Signal())
	n, err := e.Wait(context.Background())
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n)
	require.NoError(t, e.Close())
}

// TestEventFDSignalSaturatedDoesNotBlock: a peer may fill the eventfd it
// handed over to its limit (0xfffffffffffffffe) and never read it. A
// write would then block; Signal must return at once, reporting success
// (the waiter is due), and never wait for the peer.
func TestEventFDSignalSaturatedDoesNotBlock(t *testing.T) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	require.NoError(t, err)
	var max [8]byte
	binary.NativeEndian.PutUint64(max[:], 0xfffffffffffffffe)
	_, err = unix.Write(fd, max[:])
	require.NoError(t, err)
	e, err := vdpa.EventFDFromFd(fd)
	require.NoError(t, err)
	defer e.Close()
	done := make(chan error, 1)
	go func() {
		var err error
		for i := 0; i < 3 && err == nil; i++ {
			err = e.Signal()
		}
		done <- err
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Signal blocked on a saturated eventfd")
	}
	n, err := e.TryWait()
	require.NoError(t, err)
	assert.Equal(t, uint64(0xfffffffffffffffe), n, "the counter kept its value")
	require.NoError(t, e.Signal(), "drained, it takes signals again")
	n, err = e.TryWait()
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n)
}

func TestEventFDSignalAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are not meaningful under the race detector")
	}
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	assert.Zero(t, testing.AllocsPerRun(1000, func() { _ = e.Signal() }))
}

// blockedSignal sets up what a hostile peer can do to an eventfd it handed
// over: it clears the file's non-blocking flag (which the adoption set)
// and fills the counter to its limit. It returns the adopted EventFD, the
// peer's descriptor, and a channel that receives the result of a Signal
// started on another goroutine once that Signal is seen to block.
func blockedSignal(t *testing.T) (*vdpa.EventFD, int, <-chan error) {
	t.Helper()
	e, peer := peerBlockingEventFD(t)
	var max [8]byte
	binary.NativeEndian.PutUint64(max[:], 0xfffffffffffffffe)
	_, err := unix.Write(peer, max[:])
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- e.Signal() }()
	select {
	case err := <-done:
		t.Fatalf("Signal returned (%v) on a full blocking eventfd: the setup is wrong", err)
	case <-time.After(50 * time.Millisecond):
	}
	return e, peer, done
}

// peerBlockingEventFD returns an EventFD adopted from a peer's eventfd and
// the peer's own descriptor of the same file (closed when the test ends),
// on which the peer has cleared the non-blocking flag that the adoption
// set: the flag belongs to the shared file.
func peerBlockingEventFD(t *testing.T) (*vdpa.EventFD, int) {
	t.Helper()
	peer, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(peer) })
	dup, err := unix.Dup(peer)
	require.NoError(t, err)
	e, err := vdpa.EventFDFromFd(dup)
	require.NoError(t, err)
	require.NoError(t, unix.SetNonblock(peer, false))
	return e, peer
}

// eventFDsOpen counts this process's eventfd descriptors.
func eventFDsOpen(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	n := 0
	for _, ent := range ents {
		if link, err := os.Readlink("/proc/self/fd/" + ent.Name()); err == nil && link == "anon_inode:[eventfd]" {
			n++
		}
	}
	return n
}

// requireCloses closes e and fails if Close waits for the peer.
func requireCloses(t *testing.T, e *vdpa.EventFD) {
	t.Helper()
	closed := make(chan error, 1)
	go func() { closed <- e.Close() }()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Close waited for the peer")
	}
}

// TestEventFDUnblockEndsABlockedSignal: a Signal held in its write by the
// peer (see blockedSignal) is ended by Unblock, and the signal is not
// lost: the peer's reader finds the counter at one.
func TestEventFDUnblockEndsABlockedSignal(t *testing.T) {
	e, peer, done := blockedSignal(t)
	defer e.Close()
	assert.False(t, e.Unblock(), "no Signal left in its write")
	requireLanded(t, done, peer, "Signal still blocked after Unblock")
	assert.False(t, e.Unblock(), "nothing to do")
}

// requireLanded waits for the blocked Signal's result on done (failing
// with stuck if it does not come) and checks, as the peer, that its write
// landed: the counter reads one.
func requireLanded(t *testing.T, done <-chan error, peer int, stuck string) {
	t.Helper()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal(stuck)
	}
	var b [8]byte
	require.NoError(t, unix.SetNonblock(peer, true))
	_, err := unix.Read(peer, b[:])
	require.NoError(t, err)
	assert.Equal(t, uint64(1), binary.NativeEndian.Uint64(b[:]), "the blocked signal landed")
}

// TestEventFDCloseEndsABlockedSignal: Close does not wait for a peer that
// holds a Signal in its write; the Signal returns.
func TestEventFDCloseEndsABlockedSignal(t *testing.T) {
	e, _, done := blockedSignal(t)
	requireCloses(t, e)
	require.NoError(t, <-done)
}

// TestEventFDBlockedSignalEndsByItself: nobody calls Unblock; the EventFD's
// watchdog, armed by the Signal, ends the wait within about its interval,
// so a lock held around Signal is not held for the peer's pleasure.
func TestEventFDBlockedSignalEndsByItself(t *testing.T) {
	e, peer, done := blockedSignal(t)
	defer e.Close()
	requireLanded(t, done, peer, "Signal still blocked: the watchdog did not end it")
}

// TestEventFDSignalsUnderWatchdogLoseNothing: many Signals from several
// goroutines, with a reader draining concurrently: the watchdog that the
// Signals arm never takes a count (the counter is far below its limit),
// so the reader sees every one.
func TestEventFDSignalsUnderWatchdogLoseNothing(t *testing.T) {
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	const goroutines, each = 4, 20000
	stop := time.Now().Add(250 * time.Millisecond) // spans at least two watchdog intervals
	var total atomic.Uint64
	var wg sync.WaitGroup
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each || time.Now().Before(stop); i++ {
				if !assert.NoError(t, e.Signal()) {
					return
				}
				total.Add(1)
			}
		}()
	}
	var got uint64
	readerStop, readerDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			n, err := e.TryWait()
			if err != nil {
				return
			}
			got += n
			if n == 0 {
				select {
				case <-readerStop:
					return
				default:
					runtime.Gosched()
				}
			}
		}
	}()
	wg.Wait()
	close(readerStop)
	<-readerDone
	n, err := e.TryWait()
	require.NoError(t, err)
	got += n
	assert.Equal(t, total.Load(), got)
}

// BenchmarkEventFDSignal: one Signal with nobody waiting (the counter
// drained every 1024 signals): the write syscall plus the watchdog's
// bookkeeping (two atomic adds and a load per Signal, a timer reset at
// most once per watchInterval).
func BenchmarkEventFDSignal(b *testing.B) {
	e, err := vdpa.NewEventFD()
	require.NoError(b, err)
	defer e.Close()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := e.Signal(); err != nil {
			b.Fatal(err)
		}
		if i++; i%1024 == 0 {
			_, _ = e.TryWait()
		}
	}
}

// TestEventFDCloseEndsAReadHeldByThePeer: the peer clears the file's
// non-blocking flag while the counter is empty, so a Wait's read waits in
// the kernel, where no deadline reaches it. Close ends that read (it
// writes the empty counter once) instead of waiting for the peer, and the
// Wait returns.
func TestEventFDCloseEndsAReadHeldByThePeer(t *testing.T) {
	e, _ := peerBlockingEventFD(t)
	open := eventFDsOpen(t) // the peer's and the EventFD's
	waited := make(chan waitResult, 1)
	go func() {
		n, err := e.Wait(context.Background())
		waited <- waitResult{n, err}
	}()
	select {
	case r := <-waited:
		t.Fatalf("Wait returned (%d, %v) on an empty blocking eventfd: the setup is wrong", r.n, r.err)
	case <-time.After(50 * time.Millisecond):
	}
	requireCloses(t, e)
	assert.LessOrEqual(t, eventFDsOpen(t), open-1, "a descriptor of the EventFD (its own, or Close's duplicate) outlived Close")
	select {
	case r := <-waited:
		// Close freed the read by writing 1 into the counter: the Wait
		// reports the close, not that count.
		assert.ErrorIs(t, r.err, vdpa.ErrClosed)
		assert.Zero(t, r.n)
	case <-time.After(10 * time.Second):
		t.Fatal("Wait still held")
	}
}
