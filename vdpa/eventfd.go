package vdpa

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// EventFD is a Linux eventfd used for virtqueue kicks and interrupts. It is
// registered with the Go runtime poller, so Wait blocks a goroutine rather
// than a thread and Close unblocks a pending Wait.
//
// Signal and Wait are safe for concurrent use. The same descriptor can be
// handed to the kernel (SET_VRING_KICK/CALL) or to a vhost-user peer.
type EventFD struct {
	f  *os.File
	rc syscall.RawConn // f's, for Signal's raw write
	// signalling counts the Signal calls in their write, for Unblock.
	signalling atomic.Int32
	// reading counts the Wait and TryWait calls in their read, for Close:
	// only a call of the EventFD's own can hold its close.
	reading atomic.Int32
	// draining is set while a read of Unblock's or the watchdog's runs
	// (at most one at a time).
	draining atomic.Bool
	// closing is set by Close before it ends blocked Signals: a Signal
	// that starts after that writes nothing.
	closing atomic.Bool
	// watch runs watchdog watchInterval after a Signal armed it (armed
	// set), so that a write a peer holds (see Signal) ends by itself.
	watch *time.Timer
	armed atomic.Bool
}

// ErrClosed is returned by operations on a closed EventFD or device.
var ErrClosed = errors.New("vdpa: closed")

// NewEventFD creates a non-blocking, close-on-exec eventfd.
func NewEventFD() (*EventFD, error) {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return newEventFD(fd)
}

// ErrNotEventFD is returned by EventFDFromFd for a descriptor that is not
// an eventfd (a pipe, a socket, a file, another anonymous inode).
var ErrNotEventFD = errors.New("vdpa: not an eventfd")

// EventFDFromFd adopts fd (received from a peer, for example). It checks
// that fd is an eventfd and sets it non-blocking; on success the EventFD
// owns fd. On error fd stays the caller's to close.
//
// A peer chooses what it sends: a pipe or a socket in place of an eventfd
// is refused here, and an eventfd the peer filled to its limit makes
// Signal report success without writing (the waiter is due anyway)
// instead of blocking. The non-blocking flag belongs to the file, which
// the peer shares: a peer that clears it again and fills the counter
// holds a Signal in its write only until the EventFD's watchdog ends the
// wait (see Signal).
func EventFDFromFd(fd int) (*EventFD, error) {
	if err := checkEventFD(fd); err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil { // O_PATH descriptors refuse it
		return nil, fmt.Errorf("%w: descriptor %d: set non-blocking: %w", ErrNotEventFD, fd, err)
	}
	return newEventFD(fd)
}

// checkEventFD reports whether fd is an eventfd: an anonymous inode (no
// file type in its mode) whose /proc/self/fd link names eventfd. Without
// /proc the mode check alone decides.
func checkEventFD(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%w: descriptor %d: fstat: %w", ErrNotEventFD, fd, err)
	}
	if t := st.Mode & unix.S_IFMT; t != 0 && t != unix.S_IFREG {
		return fmt.Errorf("%w: descriptor %d has file type %#o", ErrNotEventFD, fd, t)
	}
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		if st.Mode&unix.S_IFMT != 0 {
			return fmt.Errorf("%w: descriptor %d is a regular file", ErrNotEventFD, fd)
		}
		return nil
	}
	if link != "anon_inode:[eventfd]" {
		return fmt.Errorf("%w: descriptor %d is %s", ErrNotEventFD, fd, link)
	}
	return nil
}

// newEventFD wraps the non-blocking eventfd fd, which it owns from now on.
func newEventFD(fd int) (*EventFD, error) {
	f := os.NewFile(uintptr(fd), "eventfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	e := &EventFD{f: f, rc: rc}
	e.watch = time.AfterFunc(time.Hour, e.watchdog)
	e.watch.Stop()
	return e, nil
}

// Fd returns the descriptor number. It stays owned by the EventFD.
func (e *EventFD) Fd() int { return int(e.f.Fd()) }

// Signal adds one to the counter, waking a waiter. It does not block: when
// the counter is at its limit (a peer may fill the eventfd it handed over)
// the write fails with EAGAIN, and the waiter is already due, so Signal
// reports success. The write goes through the raw descriptor because
// os.File.Write would wait for the descriptor to become writable.
//
// The one exception is a peer that shares the eventfd's file (it handed
// the descriptor over) and both clears the file's non-blocking flag, which
// belongs to the file and not to this process's descriptor, and fills the
// counter: the write then waits in the kernel for a read of the counter.
// The EventFD ends such a wait by itself within about watchInterval (a
// timer that a Signal arms, at most once per interval, does what Unblock
// does), so a lock held around Signal is never held longer than that on
// account of a peer; Unblock and Close end it at once.
func (e *EventFD) Signal() error {
	// Counted before closing is read: Close sets closing before it looks
	// at the count, so either it sees this Signal or this Signal sees it
	// (sequentially consistent atomics).
	e.signalling.Add(1)
	var err error
	if e.closing.Load() {
		err = os.ErrClosed
	} else {
		if !e.armed.Load() && e.armed.CompareAndSwap(false, true) {
			e.watch.Reset(watchInterval)
		}
		err = e.rc.Write(signalFd)
	}
	e.signalling.Add(-1)
	if err != nil {
		return ErrClosed
	}
	return nil
}

// Unblock ends the wait of Signal calls blocked in their write by a peer
// (see Signal) and reports whether any Signal was still in its write when
// it returned. While one is, it sets the file's non-blocking flag again
// and, when the counter is at its limit (the only state in which a write
// waits), reads the counter: the blocked write then completes, and the
// waiter still finds it non-zero. A counter below its limit is never read,
// so a Signal that is merely under way loses nothing to Unblock. (On a
// counter at its limit, a reader racing with that read can find its
// wake-up taken by it: only on an eventfd a peer filled, its own.) It
// returns once no Signal is in its write and its own read has ended.
//
// A peer that keeps clearing the flag and refilling the counter can make
// a write wait again; Unblock tries for about unblockFor and gives up. The
// read runs on a goroutine of its own, so Unblock itself returns within
// that time even when the peer makes the read wait too; such a read ends
// with the next write to the eventfd.
//
// Call it from code that waits for a goroutine which signals this eventfd
// (a queue worker being stopped): the signal then cannot hold that wait.
func (e *EventFD) Unblock() bool {
	deadline := time.Now().Add(unblockFor)
	// Until no Signal is in its write and no read of Unblock's runs (a
	// read the peer holds keeps the descriptor in use, as a write does).
	for e.signalling.Load() > 0 || e.draining.Load() {
		if e.signalling.Load() > 0 && e.draining.CompareAndSwap(false, true) {
			// Runs only while the file is open (the raw descriptor's
			// reference count keeps it so); on a closed EventFD it does
			// nothing.
			go func() {
				defer e.draining.Store(false)
				_ = e.rc.Control(drainIfFull)
			}()
		}
		if !time.Now().Before(deadline) {
			return e.signalling.Load() > 0 || e.draining.Load()
		}
		time.Sleep(unblockPoll)
	}
	return false
}

// unblockFor bounds Unblock; unblockPoll is how often it looks again;
// watchInterval is how long after a Signal the watchdog looks for one
// held in its write.
const (
	unblockFor    = 2 * time.Second
	unblockPoll   = time.Millisecond
	watchInterval = 100 * time.Millisecond
)

// watchdog runs watchInterval after a Signal armed it: while a Signal is
// in its write it starts Unblock's read (which takes the counter only at
// its limit, where a write waits, so a Signal merely under way loses
// nothing) and looks again an interval later; otherwise it disarms.
func (e *EventFD) watchdog() {
	for {
		if e.signalling.Load() > 0 {
			if e.draining.CompareAndSwap(false, true) {
				// On the timer's goroutine: a read the peer holds holds
				// only this goroutine.
				_ = e.rc.Control(drainIfFull)
				e.draining.Store(false)
			}
			e.watch.Reset(watchInterval)
			return
		}
		e.armed.Store(false)
		// A Signal that began after the check above found armed set and
		// did not arm: look again, unless one has armed since.
		if e.signalling.Load() == 0 || !e.armed.CompareAndSwap(false, true) {
			return
		}
	}
}

// drainIfFull sets the eventfd fd non-blocking again and reads its
// counter if (and only if) it is at its limit, where a write would wait.
func drainIfFull(fd uintptr) { rescueRound(int(fd), false) }

// rescueRound sets the eventfd fd non-blocking again and frees the calls
// its counter holds: it reads a counter at its limit (a write waits) and,
// with wakeReads, writes 1 to an empty one (a read waits). A counter in
// between holds nothing and is left alone.
func rescueRound(fd int, wakeReads bool) {
	_ = unix.SetNonblock(fd, true)
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}
	if n, err := unix.Poll(pfd, 0); err != nil || n != 1 {
		return
	}
	var b [8]byte
	switch {
	case pfd[0].Revents&unix.POLLOUT == 0: // at the limit
		_, _ = unix.Read(fd, b[:])
	case wakeReads && pfd[0].Revents&unix.POLLIN == 0: // empty
		binary.NativeEndian.PutUint64(b[:], 1)
		_, _ = unix.Write(fd, b[:])
	}
}

// signalFd writes 1 to the eventfd fd, once, without waiting for it to
// become writable. Its only failure on an eventfd opened non-blocking is
// EAGAIN, a counter at its limit: the waiter is due, nothing is lost.
// (A plain function, not a closure: Signal allocates nothing.)
func signalFd(fd uintptr) bool {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(int(fd), one[:])
	return true
}

// Wait blocks until the counter is non-zero, resets it and returns its value
// (the number of signals coalesced). It returns ctx.Err() when ctx ends first
// and ErrClosed once Close has begun, including for a Wait already blocked
// when Close was called: a count it reads after that (made up by Close to
// free a read a peer holds, or a real one that raced with Close) is taken
// from the counter and not reported.
//
// Wait honours ctx through the descriptor's read deadline, so an EventFD has
// one waiter at a time (its queue's owner): os.File serialises concurrent
// reads, and a second waiter would not see its own context end. Hand each
// consumer its own EventFD instead. A context that can never be cancelled
// (context.Background) costs no allocation.
func (e *EventFD) Wait(ctx context.Context) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	// Always start from the context's own deadline (or none), so that a
	// previous Wait whose context was cancelled cannot leave a past deadline
	// behind, and always clear it on the way out.
	dl, _ := ctx.Deadline()
	if err := e.f.SetReadDeadline(dl); err != nil {
		return 0, ErrClosed
	}
	defer e.f.SetReadDeadline(time.Time{})
	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, func() { _ = e.f.SetReadDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	e.reading.Add(1)
	defer e.reading.Add(-1)
	var b [8]byte
	for {
		_, err := e.f.Read(b[:])
		switch {
		case err == nil:
			if e.closing.Load() {
				// Close began while this read ran: what it read may be
				// the 1 Close's rescue writes to wake a held read (see
				// Close). A Wait that Close overlaps ends with ErrClosed,
				// never with a count Close made up.
				return 0, ErrClosed
			}
			return binary.NativeEndian.Uint64(b[:]), nil
		case errors.Is(err, os.ErrClosed):
			return 0, ErrClosed
		case errors.Is(err, os.ErrDeadlineExceeded):
			if cerr := ctx.Err(); cerr != nil {
				return 0, cerr
			}
			if !dl.IsZero() && !time.Now().Before(dl) {
				return 0, context.DeadlineExceeded
			}
			// Not our deadline: the cancellation callback of an earlier Wait
			// fired late, after that Wait had returned. Restore ours and keep
			// waiting.
			if err := e.f.SetReadDeadline(dl); err != nil {
				return 0, ErrClosed
			}
		default:
			return 0, fmt.Errorf("eventfd wait: %w", err)
		}
	}
}

// TryWait consumes pending signals without blocking; it reports zero when
// none were pending. It returns ErrClosed once the EventFD is closed, and
// when it read a count after Close began (as Wait does); a TryWait that
// Close overlaps and that finds nothing pending reports zero.
func (e *EventFD) TryWait() (uint64, error) {
	var b [8]byte
	var n int
	var rerr error
	e.reading.Add(1)
	defer e.reading.Add(-1)
	if err := e.rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b[:])
		return true
	}); err != nil {
		return 0, ErrClosed
	}
	if rerr == unix.EAGAIN {
		return 0, nil
	}
	if rerr == nil && e.closing.Load() { // as in Wait
		return 0, ErrClosed
	}
	if rerr != nil || n != 8 {
		return 0, fmt.Errorf("eventfd read: %w", rerr)
	}
	return binary.NativeEndian.Uint64(b[:]), nil
}

// Close closes the descriptor and unblocks any Wait. The descriptor is
// closed once no call uses it any more. A call a peer holds in the kernel
// (see Signal: a write at the counter's limit, or a read of an empty
// counter once the peer cleared the non-blocking flag) is ended first: a
// Signal after Close writes nothing, the counter is read while at its
// limit and written once while empty, which wakes a held read. A Wait or
// TryWait of the EventFD's that reads a count after Close began returns
// ErrClosed, never that count (made up by Close, or a real one taken from
// the counter); a reader of the peer's may see a spurious wake-up, never a
// lost one. Only a call of the EventFD's own (Signal, Wait,
// TryWait, Unblock's read) can be held so: while none is under way, a
// close that is merely slow to run is waited for, and the counter, which
// a peer that handed the eventfd over shares, is left alone. Should a
// peer that keeps clearing the flag and refilling or emptying the counter
// still hold a call after about unblockFor, Close returns
// ErrCloseDeferred and goes on in the background until the descriptor is
// closed: Close itself never waits longer for a peer.
func (e *EventFD) Close() error {
	if !e.closing.CompareAndSwap(false, true) {
		return e.f.Close() // closed before: os.File says so
	}
	e.watch.Stop()
	// A duplicate of the descriptor (the same file) lets the rescue below
	// reach the file while the close waits for the calls still using it:
	// the EventFD's own descriptor is out of bounds once the close begins,
	// and its number may be reused as soon as it ends.
	dup := -1
	_ = e.rc.Control(func(fd uintptr) { dup, _ = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	done := make(chan error, 1)
	go func() { done <- e.f.Close() }()
	if dup < 0 {
		return <-done // no descriptor to spare: the plain close
	}
	return e.awaitClose(done, dup)
}

// awaitClose waits for the close of e's descriptor, whose result arrives
// on done, and ends the calls a peer holds in it through dup, a duplicate
// of the descriptor that it closes (Close).
func (e *EventFD) awaitClose(done <-chan error, dup int) error {
	// While no call of the EventFD's is under way, none holds the close:
	// it is only slow to run (its goroutine waits for a CPU), and waiting
	// is all there is to do. A rescue round would write 1 into an empty
	// counter that a peer which handed the eventfd over shares: a
	// spurious interrupt for it, for nothing.
	for {
		select {
		case err := <-done:
			unix.Close(dup)
			return err
		case <-time.After(unblockPoll):
		}
		if e.signalling.Load() > 0 || e.reading.Load() > 0 || e.draining.Load() {
			break
		}
	}
	// Still in use: a Wait the close is waking (it returns at once), or
	// a call a peer holds. The rescuer owns dup and closes it when it
	// stops, after its last round; Close returns once it has, so that no
	// descriptor of the EventFD outlives a Close that reports success.
	stop, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		rescueUntil(dup, stop)
	}()
	deadline := time.After(unblockFor)
	select {
	case err := <-done:
		close(stop)
		select {
		case <-exited:
			return err
		case <-deadline: // a round the peer holds in its read
			return ErrCloseDeferred
		}
	case <-deadline:
		go func() { <-done; close(stop) }()
		return ErrCloseDeferred
	}
}

// rescueUntil frees calls held on the eventfd file that fd refers to,
// every unblockPoll, until stop is closed, then closes fd. Each round sets
// the file non-blocking again, reads the counter if it is at its limit (a
// write waits) and writes 1 if it is empty (a read waits). Only Close runs
// it, on a file whose EventFD no longer signals or waits.
func rescueUntil(fd int, stop <-chan struct{}) {
	defer unix.Close(fd)
	for {
		rescueRound(fd, true)
		select {
		case <-stop:
			return
		case <-time.After(unblockPoll):
		}
	}
}

// ErrCloseDeferred is returned by Close when a peer kept a call on the
// eventfd held in the kernel past unblockFor: the descriptor is closed in
// the background once nothing uses it.
var ErrCloseDeferred = errors.New("vdpa: eventfd close deferred: a peer holds a call in the kernel")
