package dirty_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vring"
)

// TestHotPathsDoNotAllocate asserts the zero-allocation promise of marking,
// harvesting and iterating.
func TestHotPathsDoNotAllocate(t *testing.T) {
	log := mustNew(t, 1<<30)
	dst := mustNew(t, 1<<30)
	words := make([]uint64, log.Words())
	var logger vring.WriteLogger = log
	var sink uint64
	cases := map[string]func(){
		"Mark one page":      func() { _ = log.Mark(0x1234, 8) },
		"Mark a range":       func() { _ = log.Mark(0x1234, 1<<20) },
		"Mark zero length":   func() { _ = log.Mark(0x1234, 0) },
		"LogWrite interface": func() { _ = logger.LogWrite(0x5000, 1500) },
		"Harvest": func() {
			_ = log.Mark(0x9000, 1<<16)
			_, _ = log.Harvest(dst)
		},
		"HarvestWords": func() {
			_ = log.Mark(0x9000, 1<<16)
			_, _ = log.HarvestWords(words)
		},
		"Union":      func() { _ = log.Union(dst) },
		"UnionWords": func() { _ = log.UnionWords(words) },
		"Clear":      func() { _ = dst.Clear() },
		"Count":      func() { sink += log.Count() },
		"DirtyPages": func() {
			for p := range log.DirtyPages() {
				sink += p
			}
		},
		"DirtyRuns": func() {
			for f, n := range log.DirtyRuns() {
				sink += f + n
			}
		},
		"PageDirty": func() {
			if log.PageDirty(9) {
				sink++
			}
		},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			require.Zero(t, testing.AllocsPerRun(100, f))
		})
	}
	_ = sink
}
