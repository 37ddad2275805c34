//go:build race || !(amd64 || arm64)

package vring

import "github.com/vdpakit/vdpakit/internal/guestatomic"

// storeRelease32 is a sequentially consistent atomic store here: under
// the race detector, so that it sees each index publication as the release
// that orders the ring entries before it, and on architectures without an
// assembly release store. It is stronger than release, never weaker.
func storeRelease32(p *uint32, v uint32) { guestatomic.Store32(p, v) }
