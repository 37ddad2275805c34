package main

import (
	"math"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCrossCPURoundTrip(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("needs two CPUs")
	}
	rt, err := crossCPURoundTrip(0, 1, 20000)
	require.NoError(t, err)
	assert.Greater(t, rt, time.Duration(0))
	assert.Less(t, rt, 100*time.Microsecond, "a cache line round trip, not a scheduler one")
	_, err = crossCPURoundTrip(1, 1, 10)
	assert.Error(t, err, "one CPU cannot ping-pong with itself")
}

func TestStateChanged(t *testing.T) {
	nan := math.NaN()
	for _, tc := range []struct {
		name    string
		probes  []float64
		changed bool
	}{
		{"one state", []float64{210, 230, 220, 215}, false},
		{"the slow state's two levels", []float64{440, 970, 460}, false},
		{"just within", []float64{200, 499}, false},
		{"two states", []float64{120, 125, 450, 118}, true},
		{"unprobed rounds ignored", []float64{nan, 200, nan, 210}, false},
		{"none probed", []float64{nan, nan}, false},
		{"empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			changed, why := stateChanged(tc.probes)
			assert.Equal(t, tc.changed, changed, why)
		})
	}
}

func TestByState(t *testing.T) {
	nan := math.NaN()
	a := []float64{36, 26, 9, 11, 10}
	b := []float64{28, 28, 12, 12, 15}
	// Rounds 0-1 fast on both sides, 2-4 slow on both, except round 4,
	// whose DPDK side ran fast: it straddles and is left out.
	pa := []float64{100, 110, 480, 500, 840}
	pb := []float64{95, 130, 480, 590, 120}
	got := byState(a, b, pa, pb)
	assert.Contains(t, got, "fast (round trip ≤ 238 ns) 1.11x [0.93–1.29] over 2 round pair(s)")
	assert.Contains(t, got, "slow 0.83x [0.75–0.92] over 2")
	assert.Empty(t, byState(a, b, []float64{100, 100, 100, 100, 100}, []float64{100, 100, 100, 100, 100}), "one state")
	assert.Empty(t, byState(a, b, []float64{nan, nan}, []float64{nan, nan}), "not probed")
}
