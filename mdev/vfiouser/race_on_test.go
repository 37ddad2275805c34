//go:build race

package vfiouser_test

// raceEnabled: the race detector allocates on synchronization, so
// allocation counts are not asserted under -race.
const raceEnabled = true
