package vring

// The seed corpora of the fuzz targets (testdata/fuzz) are written by a
// generator; internal/genseeds checks that the committed ones are current.
//go:generate go run ./internal/genseeds
