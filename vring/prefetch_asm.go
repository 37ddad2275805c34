//go:build amd64 || arm64

package vring

import "unsafe"

// prefetchLines hints the CPU to bring into its cache the 64-byte line
// holding p and the lines-1 lines after it, for writing when write is set.
// It is a hint: it never faults (an address past a mapping or in a
// truncated file is ignored) and changes no memory. Callers give it
// addresses inside memory they hold: guest memory, or a Chain's buffer
// (PrefetchReadable, whose Chain its holder may have pointed anywhere).
//
//go:noescape
func prefetchLines(p *byte, lines int, write bool)

// prefetchDescsW hints the CPU to bring into its cache, for writing, the
// descriptor descs[elems[i].Head] of each of the n elements. Every Head
// must be inside the table (a prefetch never faults, but it is only given
// addresses of guest memory). The caller checks hasPrefetchW on amd64.
//
//go:noescape
func prefetchDescsW(descs *descEntry, elems *UsedElem, n int)

// prefetchDescsW's assembly reads UsedElem.Head as the first two bytes of
// an 8-byte element and scales it by a 16-byte descEntry: a change to
// either layout fails to compile here.
var (
	_ [unsafe.Sizeof(UsedElem{}) - 8]struct{}
	_ [8 - unsafe.Sizeof(UsedElem{})]struct{}
	_ [0 - unsafe.Offsetof(UsedElem{}.Head)]struct{}
	_ [unsafe.Sizeof(descEntry{}) - 16]struct{}
	_ [16 - unsafe.Sizeof(descEntry{})]struct{}
)
