package litmus

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Both sides pass every barrier in step: at each round each sees the
// other's write of the round before.
func TestRunReleasesInStep(t *testing.T) {
	const rounds = 1000
	var bar Barrier
	var a, b [rounds]int
	// side writes mine each round and checks, between the round's two
	// barriers, that the other side's write of the round is there.
	side := func(mine, theirs *[rounds]int, name string) func() error {
		return func() error {
			for r := range rounds {
				mine[r] = r + 1
				if err := bar.Await(uint64(2*r + 1)); err != nil {
					return err
				}
				if theirs[r] != r+1 {
					return errors.New(name + " released before the other side's write")
				}
				if err := bar.Await(uint64(2*r + 2)); err != nil {
					return err
				}
			}
			return nil
		}
	}
	errA, errB := Run(&bar, side(&a, &b, "A"), side(&b, &a, "B"))
	require.NoError(t, errA)
	require.NoError(t, errB)
}

// A side that stops aborts the barrier: the other gets ErrAborted instead
// of spinning for ever.
func TestRunAbortsTheOtherSide(t *testing.T) {
	var bar Barrier
	boom := errors.New("boom")
	errA, errB := Run(&bar, func() error {
		return bar.Await(1)
	}, func() error { return boom })
	assert.ErrorIs(t, errA, ErrAborted)
	assert.ErrorIs(t, errB, boom)
	assert.True(t, bar.Aborted())
}
