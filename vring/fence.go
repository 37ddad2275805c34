package vring

import "sync/atomic"

// storeLoadFence is a full barrier: every store this goroutine made before
// it (in particular an index published with storeRelease32) is globally
// visible before any load after it. It is a sequentially consistent
// read-modify-write of a word private to the caller's queue (amd64: a
// LOCK-prefixed OR, the kernel's smp_mb idiom; arm64: an LDSETAL or an
// exclusive pair with acquire-release), so it touches no shared cache line.
// Rule 5 in ring.go: the device's NeedsInterrupt and the driver's NeedsKick
// run it between the index they published and the other side's
// suppression field they load.
func storeLoadFence(private *uint32) { atomic.OrUint32(private, 0) }
