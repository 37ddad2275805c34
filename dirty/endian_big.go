//go:build !(386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64 || wasm)

package dirty

import "math/bits"

// toLE converts between a word as this package computes with it (bit b =
// page 64w+b) and the word as stored in the log, a little-endian u64. On a
// big-endian host the bytes are swapped, so that byte k of the log still
// holds pages 8k..8k+7 as the vhost log format requires.
func toLE(x uint64) uint64 { return bits.ReverseBytes64(x) }
