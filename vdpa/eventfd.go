package vdpa

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
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
// instead of blocking.
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
	return &EventFD{f: f, rc: rc}, nil
}

// Fd returns the descriptor number. It stays owned by the EventFD.
func (e *EventFD) Fd() int { return int(e.f.Fd()) }

// Signal adds one to the counter, waking a waiter. It never blocks: when
// the counter is at its limit (a peer may fill the eventfd it handed over)
// the write fails with EAGAIN, and the waiter is already due, so Signal
// reports success. The write goes through the raw descriptor because
// os.File.Write would wait for the descriptor to become writable.
func (e *EventFD) Signal() error {
	if err := e.rc.Write(signalFd); err != nil {
		return ErrClosed
	}
	return nil
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
// and ErrClosed once the EventFD is closed.
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
	var b [8]byte
	for {
		_, err := e.f.Read(b[:])
		switch {
		case err == nil:
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
// none were pending.
func (e *EventFD) TryWait() (uint64, error) {
	var b [8]byte
	var n int
	var rerr error
	if err := e.rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b[:])
		return true
	}); err != nil {
		return 0, ErrClosed
	}
	if rerr == unix.EAGAIN {
		return 0, nil
	}
	if rerr != nil || n != 8 {
		return 0, fmt.Errorf("eventfd read: %w", rerr)
	}
	return binary.NativeEndian.Uint64(b[:]), nil
}

// Close closes the descriptor and unblocks any Wait.
func (e *EventFD) Close() error { return e.f.Close() }
