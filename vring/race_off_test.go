//go:build !race

package vring

const raceEnabled = false
