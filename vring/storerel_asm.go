//go:build (amd64 || arm64) && !race

package vring

// storeRelease32 stores v to *p with release semantics only: every earlier
// load and store of this goroutine is visible no later than v, but later
// loads may complete before it (amd64: a plain MOVL, which TSO makes a
// release store; arm64: STLRW). It is how a ring index is published
// (rules 1 and 3 in ring.go) without the full barrier of
// sync/atomic.StoreUint32 (XCHG on amd64), which waits for the store buffer
// to drain, that is for every cache line the other agent holds to come
// back. The store->load order that notification suppression needs (rule
// 5) is paid for separately, by storeLoadFence, where the load is. p must
// be 4-aligned.
//
// Under the race detector guestatomic.Store32 is used instead
// (storerel_other.go): the detector must see the publication as the
// release that orders the ring entries before it.
//
//go:noescape
func storeRelease32(p *uint32, v uint32)
