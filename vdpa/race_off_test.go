//go:build !race

package vdpa_test

const raceEnabled = false
