package mdev_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
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
	s := newSide(t, testGuestMem, mdev.DirtyRelay)
	g, err := mdevtest.Boot(s.dev, s.mem, 0, nil)
	require.NoError(t, err)
	log, err := dirty.New(testGuestMem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, s)
	_, err = s.dev.StartDirtyTracking(log)
	require.NoError(t, err)
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
