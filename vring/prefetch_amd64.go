package vring

// hasPrefetchW reports whether the CPU has PREFETCHW (CPUID
// 0x80000001:ECX bit 8, "3DNowPrefetch"). Set once at start-up and only
// read after; without it Prefetch uses PREFETCHT0 for writable buffers too.
var hasPrefetchW = detectPrefetchW()

func detectPrefetchW() bool {
	if maxExt, _ := cpuid(0x80000000); maxExt < 0x80000001 {
		return false
	}
	_, ecx := cpuid(0x80000001)
	return ecx&(1<<8) != 0
}

// cpuid executes CPUID for leaf (sub-leaf 0) and returns EAX and ECX.
func cpuid(leaf uint32) (eax, ecx uint32)
