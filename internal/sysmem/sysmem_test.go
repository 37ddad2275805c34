package sysmem

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// memTotal reads MemTotal from /proc/meminfo: the same figure through a
// different interface than sysinfo(2).
func memTotal(t *testing.T) uint64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Skipf("no /proc/meminfo: %v", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseUint(fields[1], 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Skip("no MemTotal in /proc/meminfo")
	return 0
}

func TestTotalMatchesMeminfo(t *testing.T) {
	want := memTotal(t)
	got := Total()
	// sysinfo rounds to its unit; /proc/meminfo to KiB.
	require.InDelta(t, float64(want), float64(got), 1<<20)
}
