//go:build race && (amd64 || arm64)

package guestatomic

import (
	"runtime"
	"unsafe"
)

// FaultSafe reports whether a fault in these operations is recoverable
// under SetPanicOnFault in this build: it is here.
const FaultSafe = true

// The annotations bracket the access: a store releases before it writes, a
// load acquires after it reads, a read-modify-write does both, so whoever
// observes a value has acquired at least the release of its writer.
// Because an annotation and its access are two steps, two goroutines
// storing to one word at once may annotate in one order and store in the
// other; runtime.RaceReleaseMerge (rather than RaceRelease, which would
// replace the earlier release) keeps both writers' releases, so such a
// reorder cannot hide a happens-before edge and produce a false report.

// Load32 atomically loads *p.
func Load32(p *uint32) uint32 {
	v := load32(p)
	runtime.RaceAcquire(unsafe.Pointer(p))
	return v
}

// Store32 atomically stores v to *p.
func Store32(p *uint32, v uint32) {
	runtime.RaceReleaseMerge(unsafe.Pointer(p))
	store32(p, v)
}

// Load64 atomically loads *p.
func Load64(p *uint64) uint64 {
	v := load64(p)
	runtime.RaceAcquire(unsafe.Pointer(p))
	return v
}

// Swap64 atomically stores v to *p and returns the previous value.
func Swap64(p *uint64, v uint64) uint64 {
	runtime.RaceReleaseMerge(unsafe.Pointer(p))
	old := swap64(p, v)
	runtime.RaceAcquire(unsafe.Pointer(p))
	return old
}

// Or64 atomically sets the bits of v in *p.
func Or64(p *uint64, v uint64) {
	runtime.RaceReleaseMerge(unsafe.Pointer(p))
	or64(p, v)
	runtime.RaceAcquire(unsafe.Pointer(p))
}
