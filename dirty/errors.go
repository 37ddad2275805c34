package dirty

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every validation error the package returns matches one of
// them with errors.Is; richer error types (RangeError, GeometryError) carry
// the details. A failed system call is an *OpError naming the call and
// wrapping its errno (errors.Is(err, unix.EACCES) works).
var (
	// ErrOutOfSpan reports a Mark (or LogWrite) whose byte range does not lie
	// entirely inside the bitmap's span. The range is not marked at all.
	ErrOutOfSpan = errors.New("dirty: range outside the bitmap span")
	// ErrAddrOverflow reports a range whose end lies past 2^64. It is always
	// returned inside a RangeError that also matches ErrOutOfSpan.
	ErrAddrOverflow = errors.New("dirty: range wraps past 2^64")
	// ErrPageSize reports a page size that is not a power of two.
	ErrPageSize = errors.New("dirty: page size must be a power of two")
	// ErrSpan reports an empty span, or one whose bitmap would exceed MaxSize.
	ErrSpan = errors.New("dirty: invalid span")
	// ErrMemory reports memory handed to Attach or AttachFd that cannot hold
	// the bitmap: too short, or not 8-byte aligned.
	ErrMemory = errors.New("dirty: unusable log memory")
	// ErrGeometry reports an operation between two bitmaps (or a bitmap and
	// a word slice) whose page sizes or lengths do not fit together.
	ErrGeometry = errors.New("dirty: bitmap geometry mismatch")
	// ErrClosed reports use of a bitmap after Close.
	ErrClosed = errors.New("dirty: bitmap closed")
	// ErrUnsupported reports a shared (memfd) bitmap on a platform without
	// memfd and mmap.
	ErrUnsupported = errors.New("dirty: not supported on this platform")
	// ErrTooLarge reports a bitmap New will not create: larger than
	// MemoryLimit, a bound relative to the machine's memory. It is always
	// returned inside a *SizeError.
	ErrTooLarge = errors.New("dirty: log too large for this machine")
	// ErrTracker reports misuse of a Tracker (invalid options, rounds after
	// the final round, a round before Begin).
	ErrTracker = errors.New("dirty: tracker")
)

// RangeError describes a byte range that could not be marked. It matches
// ErrOutOfSpan, and also ErrAddrOverflow when the range wraps past 2^64.
type RangeError struct {
	Addr uint64 // first byte of the rejected range
	Len  uint64 // length of the rejected range in bytes
	Span uint64 // the bitmap's span: valid addresses are [0, Span)
}

// Wraps reports whether the range's end lies past 2^64.
func (e *RangeError) Wraps() bool { return e.Len-1 > ^uint64(0)-e.Addr }

func (e *RangeError) Error() string {
	if e.Wraps() {
		return fmt.Sprintf("dirty: range [%#x, +%#x) wraps past 2^64 (span [0, %#x))", e.Addr, e.Len, e.Span)
	}
	return fmt.Sprintf("dirty: range [%#x, %#x) outside the bitmap span [0, %#x)", e.Addr, e.Addr+e.Len, e.Span)
}

// Is makes errors.Is(err, ErrOutOfSpan) true for every RangeError, and
// errors.Is(err, ErrAddrOverflow) true for one that wraps.
func (e *RangeError) Is(target error) bool {
	return target == ErrOutOfSpan || (target == ErrAddrOverflow && e.Wraps())
}

// SizeError describes a log New refused because it is larger than
// MemoryLimit. It matches ErrTooLarge.
type SizeError struct {
	Size  uint64 // bytes of log the span needs
	Limit uint64 // MemoryLimit when it was refused
}

func (e *SizeError) Error() string {
	return fmt.Sprintf("dirty: %d bytes of log exceed this machine's limit of %d (MemoryLimit)", e.Size, e.Limit)
}

// Is makes errors.Is(err, ErrTooLarge) true.
func (e *SizeError) Is(target error) bool { return target == ErrTooLarge }

// GeometryError describes two bitmaps (or a bitmap and a word slice) that
// cannot be combined. It matches ErrGeometry.
type GeometryError struct {
	Op     string // the operation, e.g. "harvest" or "union"
	Reason string // what does not fit
}

func (e *GeometryError) Error() string { return "dirty: " + e.Op + ": " + e.Reason }

// Is makes errors.Is(err, ErrGeometry) true.
func (e *GeometryError) Is(target error) bool { return target == ErrGeometry }

// OpError wraps a failed system call with the operation that made it.
type OpError struct {
	Op  string // e.g. "memfd_create", "mmap"
	Err error  // the underlying error (a syscall.Errno, or a sentinel above)
}

func (e *OpError) Error() string { return "dirty: " + e.Op + ": " + e.Err.Error() }

// Unwrap returns the underlying error.
func (e *OpError) Unwrap() error { return e.Err }
