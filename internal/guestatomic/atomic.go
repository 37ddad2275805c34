//go:build !race || !(amd64 || arm64)

package guestatomic

import "sync/atomic"

// FaultSafe reports whether a fault in these operations is recoverable
// under SetPanicOnFault in this build: always, except in race builds on
// architectures without the assembly, where sync/atomic faults inside the
// race runtime (see the package doc).
const FaultSafe = !raceBuild

// Load32 atomically loads *p.
func Load32(p *uint32) uint32 { return atomic.LoadUint32(p) }

// Store32 atomically stores v to *p.
func Store32(p *uint32, v uint32) { atomic.StoreUint32(p, v) }

// Load64 atomically loads *p.
func Load64(p *uint64) uint64 { return atomic.LoadUint64(p) }

// Swap64 atomically stores v to *p and returns the previous value.
func Swap64(p *uint64, v uint64) uint64 { return atomic.SwapUint64(p, v) }

// Or64 atomically sets the bits of v in *p.
func Or64(p *uint64, v uint64) { atomic.OrUint64(p, v) }
