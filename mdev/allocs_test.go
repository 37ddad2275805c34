package mdev_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// The shadow relay's data path (complete, forward, publish for every frame)
// allocates nothing once warm: the whole system — guest driver, relay
// worker, software device — is measured over thousands of frames.
func TestRelayDataPathAllocatesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("runs traffic")
	}
	if raceEnabled {
		t.Skip("the race detector allocates on synchronization")
	}
	_, g := trackedSide(t, 0)
	step := func(n uint64) {
		s0, _, _, _ := g.Stats()
		for {
			if sent, _, _, _ := g.Stats(); sent >= s0+n {
				return
			}
			g.Step()
		}
	}
	step(2000) // warm up: every buffer and chain slice reaches its size
	const frames = 10000
	allocs := testing.AllocsPerRun(1, func() { step(frames) })
	assert.LessOrEqual(t, allocs, 10.0, "%.0f allocations for %d frames", allocs, frames)
	t.Logf("%.0f allocations for %d frames", allocs, frames)
	_, _, dup, bad := g.Stats()
	assert.Zero(t, dup+bad)
}
