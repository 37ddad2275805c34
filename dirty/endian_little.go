//go:build 386 || amd64 || arm || arm64 || loong64 || mips64le || mipsle || ppc64le || riscv64 || wasm

package dirty

// toLE converts between a word as this package computes with it (bit b =
// page 64w+b) and the word as stored in the log, a little-endian u64. On a
// little-endian host the two are the same.
func toLE(x uint64) uint64 { return x }
