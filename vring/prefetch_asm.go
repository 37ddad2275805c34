//go:build amd64 || arm64

package vring

// prefetchLines hints the CPU to bring into its cache the 64-byte line
// holding p and the lines-1 lines after it, for writing when write is set.
// It is a hint: it never faults (an address past a mapping or in a
// truncated file is ignored) and changes no memory. Callers give it lines
// of guest memory only.
//
//go:noescape
func prefetchLines(p *byte, lines int, write bool)
