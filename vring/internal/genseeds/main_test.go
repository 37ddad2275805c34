package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The committed seed corpora are what the generator writes: run go generate
// in package vring after changing it. (Corpus files that no generator
// writes, such as fuzzer finds kept as regressions, are left alone.)
func TestSeedsAreUpToDate(t *testing.T) {
	root := filepath.Join("..", "..", "testdata", "fuzz")
	for _, s := range seeds() {
		got, err := os.ReadFile(filepath.Join(root, s.target, s.name))
		require.NoError(t, err, "run go generate in package vring")
		assert.Equal(t, string(s.file()), string(got), "%s/%s: run go generate in package vring", s.target, s.name)
	}
}

func TestGeneratorWritesEveryFile(t *testing.T) {
	dir := t.TempDir()
	for _, s := range seeds() {
		require.NoError(t, s.write(dir))
	}
	for _, s := range seeds() {
		assert.FileExists(t, filepath.Join(dir, s.target, s.name))
	}
}
