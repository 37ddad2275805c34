//go:build amd64 || arm64

package guestatomic

// The assembly operations. They are compiled in every build on these
// architectures, so that an ordinary test run checks them too, but only the
// race build of the exported functions calls them. Each is a complete,
// sequentially consistent atomic operation of its own (amd64: MOV loads,
// XCHG stores, LOCK OR; arm64: LDAR loads, STLR stores, LDAXR/STLXR loops),
// ordered with sync/atomic's operations on these architectures as those are
// with each other.

//go:noescape
func load32(p *uint32) uint32

//go:noescape
func store32(p *uint32, v uint32)

//go:noescape
func load64(p *uint64) uint64

//go:noescape
func swap64(p *uint64, v uint64) uint64

//go:noescape
func or64(p *uint64, v uint64)
