package vring

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestDetectPrefetchW checks the CPUID reading against the kernel's: the
// "3dnowprefetch" flag in /proc/cpuinfo is the same CPUID bit.
func TestDetectPrefetchW(t *testing.T) {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Skipf("no /proc/cpuinfo to compare with: %v", err)
	}
	var flags []string
	for _, line := range strings.Split(string(info), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
			flags = strings.Fields(v)
			break
		}
	}
	if flags == nil {
		t.Skip("/proc/cpuinfo lists no flags")
	}
	want := false
	for _, f := range flags {
		want = want || f == "3dnowprefetch"
	}
	require.Equal(t, want, detectPrefetchW())
	require.Equal(t, want, hasPrefetchW)
}
