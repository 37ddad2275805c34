//go:build !amd64 && !arm64

package vring

// prefetchLines does nothing where vring has no prefetch instruction.
func prefetchLines(p *byte, lines int, write bool) {}

// hasPrefetchW: no prefetch instructions here.
const hasPrefetchW = false

// prefetchDescsW does nothing where vring has no prefetch instruction.
func prefetchDescsW(descs *descEntry, elems *UsedElem, n int) {}
