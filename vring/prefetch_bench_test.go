package vring

import "testing"

// BenchmarkPrefetch32 is Prefetch over 32 available 1-descriptor chains
// whose buffers are already in this CPU's cache: the hint's own cost.
func BenchmarkPrefetch32(b *testing.B) {
	br := newBenchRing(b, 1, 0)
	br.refill(1)
	b.ReportAllocs()
	for b.Loop() {
		if n := br.dev.Prefetch(32); n != 32 {
			b.Fatal(n)
		}
	}
}
