//go:build !race

package mdev_test

const raceEnabled = false
