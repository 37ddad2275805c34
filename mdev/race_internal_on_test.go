//go:build race

package mdev

// raceEnabled (for the package's internal tests): the race detector
// allocates on synchronization, so allocation counts are not asserted
// under -race.
const raceEnabled = true
