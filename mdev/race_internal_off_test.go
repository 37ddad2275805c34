//go:build !race

package mdev

const raceEnabled = false
