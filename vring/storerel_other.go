//go:build race || !(amd64 || arm64)

package vring

import "sync/atomic"

// storeRelease32 is sync/atomic's sequentially consistent store here: under
// the race detector, so that it sees each index publication as the release
// that orders the ring entries before it, and on architectures without an
// assembly release store. It is stronger than release, never weaker.
func storeRelease32(p *uint32, v uint32) { atomic.StoreUint32(p, v) }
