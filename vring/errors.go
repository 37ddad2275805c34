package vring

import (
	"errors"
	"fmt"
	"strings"
)

// Errors about guest memory and layouts. They are returned as is (or wrapped
// with context by fmt.Errorf) and are checked with errors.Is.
var (
	// ErrOutOfRange: a guest address range is not (entirely) backed by guest
	// memory.
	ErrOutOfRange = errors.New("vring: guest address range outside guest memory")
	// ErrOverflow: addr+length wraps around the 64-bit address space.
	ErrOverflow = errors.New("vring: guest address range overflows")
	// ErrSpansRegions: a range that must be contiguous in this process (a
	// zero-copy slice, a ring area, an indirect table) crosses a region
	// boundary.
	ErrSpansRegions = errors.New("vring: guest address range spans memory regions")
	// ErrRegionOverlap: two regions of one Memory overlap in guest address space.
	ErrRegionOverlap = errors.New("vring: memory regions overlap")
	// ErrInvalidRegion: a region's parameters are unusable (zero size, base+size
	// overflow, nil region, closed region).
	ErrInvalidRegion = errors.New("vring: invalid memory region")
	// ErrQueueSize: a queue size is zero, above 32768 or, for a split
	// queue, not a power of two.
	ErrQueueSize = errors.New("vring: queue size must be a power of two in 1..32768")
	// ErrMisaligned: a ring area violates the virtio alignment (descriptor
	// table 16, available ring 2, used ring 4), in guest or in host address space.
	ErrMisaligned = errors.New("vring: ring area misaligned")
	// ErrRingOverlap: two ring areas of one queue overlap.
	ErrRingOverlap = errors.New("vring: ring areas overlap")
)

// Errors caused by the other side of a queue breaking the virtio rules
// (hostile or buggy guest input on the device side, a buggy device on the
// driver side). Each is returned inside a *QueueError. After one of them the
// queue is broken: every further call returns an error wrapping
// ErrQueueBroken and the original error until Reset.
var (
	// ErrHeadOutOfRange: an available-ring entry names a descriptor index
	// >= queue size (virtio 1.2 §2.7.6).
	ErrHeadOutOfRange = errors.New("vring: chain head index out of range")
	// ErrNextOutOfRange: a descriptor's next field is >= the table size.
	ErrNextOutOfRange = errors.New("vring: descriptor next index out of range")
	// ErrChainLoop: following NEXT revisits a descriptor.
	ErrChainLoop = errors.New("vring: loop in descriptor chain")
	// ErrChainTooLong: a chain (counting indirect entries) has more
	// descriptors than the queue size (§2.7.5.3.1). On a packed ring also a
	// chain that runs into descriptors still in flight (longer than the
	// ring's free descriptors).
	ErrChainTooLong = errors.New("vring: descriptor chain longer than queue size")
	// ErrTooManySegments: a chain's buffers would make more than
	// MaxChainSegments(queue size) segments (a descriptor makes one
	// segment, plus one for each guest-memory region boundary its buffer
	// crosses), as buffers laid over many small adjacent regions do. It
	// matches ErrChainTooLong as well.
	ErrTooManySegments error = &subError{"vring: descriptor chain has too many segments", ErrChainTooLong}
	// ErrNestedIndirect: an INDIRECT descriptor inside an indirect table.
	ErrNestedIndirect = errors.New("vring: indirect descriptor inside indirect table")
	// ErrIndirectWithNext: a descriptor has both INDIRECT and NEXT set.
	ErrIndirectWithNext = errors.New("vring: indirect descriptor with NEXT flag")
	// ErrIndirectSize: an indirect table's length is zero or not a multiple of 16.
	ErrIndirectSize = errors.New("vring: indirect table length zero or not a multiple of 16")
	// ErrIndirectNotNegotiated: INDIRECT used without VIRTIO_F_INDIRECT_DESC.
	ErrIndirectNotNegotiated = errors.New("vring: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
	// ErrReadableAfterWritable: a device-readable descriptor follows a
	// device-writable one in a chain (§2.7.4.2).
	ErrReadableAfterWritable = errors.New("vring: readable descriptor after writable descriptor")
	// ErrBufferOutOfRange: a descriptor's buffer (or indirect table) is not in
	// guest memory or its address+length overflows. A zero-length buffer is
	// in guest memory when its address is in a region or is the end of one
	// (addr <= end of memory, as Linux vhost checks it). The QueueError also wraps
	// ErrOutOfRange, ErrOverflow or ErrSpansRegions.
	ErrBufferOutOfRange = errors.New("vring: descriptor buffer outside guest memory")
	// ErrAvailIdxJump: avail.idx is more than the queue size ahead of the
	// device's next available index.
	ErrAvailIdxJump = errors.New("vring: avail.idx more than queue size ahead")
	// ErrUsedIdxJump: used.idx is ahead of the driver by more than the number
	// of chains it has outstanding.
	ErrUsedIdxJump = errors.New("vring: used.idx ahead of outstanding chains")
	// ErrUsedIDNotOutstanding: a used entry names a chain the driver has not
	// made available (or already reclaimed).
	ErrUsedIDNotOutstanding = errors.New("vring: used id not outstanding")
	// ErrUsedLenTooLarge: a used entry's length exceeds the chain's writable bytes.
	ErrUsedLenTooLarge = errors.New("vring: used length larger than chain's writable bytes")
	// ErrBufferIDOutOfRange: a packed chain's buffer id (the id field of
	// its last ring descriptor, virtio 1.2 §2.8.6) is >= the queue size.
	ErrBufferIDOutOfRange = errors.New("vring: buffer id out of range")
	// ErrBufferIDInFlight: a packed chain's buffer id names a chain the
	// device popped and has not returned yet.
	ErrBufferIDInFlight = errors.New("vring: buffer id already in flight")
	// ErrDescNotAvailable: a descriptor of a packed chain after its head
	// (reached through NEXT) is not marked available for its position's
	// wrap counter (AVAIL bit equal to it, USED bit not), although the
	// head is: the driver makes the head available last (§2.8.6), so the
	// rest must already be available.
	ErrDescNotAvailable = errors.New("vring: chain descriptor not marked available")
	// ErrLogWrite: the WriteLogger failed to log a write the device made.
	ErrLogWrite = errors.New("vring: dirty log write failed")
	// ErrQueueBroken: the queue saw one of the errors above and refuses work
	// until Reset.
	ErrQueueBroken = errors.New("vring: queue broken, needs reset")
)

// Errors from misuse of a queue by its own side. They do not break the queue.
var (
	// ErrNotInFlight: Push with no popped chain outstanding, or a head that is
	// out of range.
	ErrNotInFlight = errors.New("vring: push without a popped chain in flight")
	// ErrWrittenTooLarge: PushChain with written > the chain's writable bytes.
	ErrWrittenTooLarge = errors.New("vring: written length larger than chain's writable bytes")
	// ErrNoSpace: not enough free descriptors for Add.
	ErrNoSpace = errors.New("vring: not enough free descriptors")
	// ErrBadChain: Add with an empty chain, a readable buffer after a writable
	// one, or too many buffers for the indirect table.
	ErrBadChain = errors.New("vring: invalid chain")
)

// QueueError is the error for a rule broken on a queue. Err is one of the
// sentinel errors above (possibly wrapping a memory error); Queue is the
// queue index from the options; Index is the descriptor index (within the
// indirect table when Indirect is set) or, for ring-level errors, the ring
// index (avail or used index) where the problem was found.
type QueueError struct {
	Queue    int
	Index    uint16
	Indirect bool
	Err      error
}

func (e *QueueError) Error() string {
	where := "index"
	if e.Indirect {
		where = "indirect index"
	}
	return fmt.Sprintf("vring: queue %d %s %d: %s", e.Queue, where, e.Index, strings.TrimPrefix(e.Err.Error(), "vring: "))
}

// Unwrap returns the underlying error.
func (e *QueueError) Unwrap() error { return e.Err }

// brokenError is returned by every call on a broken queue: it matches both
// ErrQueueBroken and the error that broke the queue.
type brokenError struct{ cause *QueueError }

func (e *brokenError) Error() string   { return "vring: queue broken, needs reset: " + e.cause.Error() }
func (e *brokenError) Unwrap() []error { return []error{ErrQueueBroken, e.cause} }

func qerr(queue int, index uint16, indirect bool, err error) *QueueError {
	return &QueueError{Queue: queue, Index: index, Indirect: indirect, Err: err}
}

// subError is a sentinel that refines another one: errors.Is matches both.
type subError struct {
	msg    string
	parent error
}

func (e *subError) Error() string { return e.msg }
func (e *subError) Unwrap() error { return e.parent }

// wrap2 joins a vring sentinel with the memory error that caused it, so that
// errors.Is matches both.
type wrap2 struct{ outer, inner error }

func (e *wrap2) Error() string   { return e.outer.Error() + ": " + e.inner.Error() }
func (e *wrap2) Unwrap() []error { return []error{e.outer, e.inner} }
