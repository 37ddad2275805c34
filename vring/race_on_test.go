//go:build race

package vring

// raceEnabled: under the race detector the concurrency tests move fewer
// chains (the detector checks the synchronization, not the volume; the
// normal run moves a million).
const raceEnabled = true
