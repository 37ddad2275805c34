package vring

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestDetectPrefetchW checks the CPUID reading against the kernel's: the
// "3dnowprefetch" flag in /proc/cpuinfo is the same CPUID bit, except that
// Linux also sets it on every 64-bit AMD CPU (where PREFETCHW always
// exists) whatever CPUID says; a hypervisor may hide the bit there.
func TestDetectPrefetchW(t *testing.T) {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Skipf("no /proc/cpuinfo to compare with: %v", err)
	}
	var flags []string
	vendor := ""
	for _, line := range strings.Split(string(info), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "vendor_id":
			if vendor == "" {
				vendor = strings.TrimSpace(v)
			}
		case "flags":
			if flags == nil {
				flags = strings.Fields(v)
			}
		}
	}
	if flags == nil {
		t.Skip("/proc/cpuinfo lists no flags")
	}
	kernel := slices.Contains(flags, "3dnowprefetch")
	require.Equal(t, hasPrefetchW, detectPrefetchW())
	if detectPrefetchW() {
		require.True(t, kernel, "CPUID has PREFETCHW, the kernel's flags do not")
	} else if kernel {
		require.Equal(t, "AuthenticAMD", vendor, "the kernel has 3dnowprefetch, CPUID does not, and only AMD explains it")
	}
}
