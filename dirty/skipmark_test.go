package dirty

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/litmus"
)

// A mark that finds its bit already set skips the atomic OR (Bitmap.probe),
// so nothing orders the marker's write to the page before its load of the
// bit: x86's store buffer lets the load go first. If a harvester swaps the
// bit away in that window and reads the page, it reads the old contents,
// and the bit is gone: the write would never be sent. The membarrier(2)
// that ends every operation taking bits (Harvest, HarvestWords, and Clear,
// which Tracker.Begin runs on the live log before the full copy) closes
// the window. This store-buffering litmus test runs the marker (write the
// page, mark it) and the harvester (take the bits, read the page) on two
// threads released together round after round, with the bit set
// beforehand so that the marker takes the skipping path, and checks the
// invariant every round: the harvester saw the write, or the bit is set
// again for the next harvest. With processBarrier made a no-op, every
// case failed in each of 3 runs of 40,000 rounds (1 to 416 rounds each,
// most in the tens); with Clear alone left without it, its case failed 3
// runs of 3 (37 to 124 rounds). A run here is 20,000 rounds per case.

func TestSkippedMarkSeenByHarvest(t *testing.T) {
	if !probeMarks {
		t.Skip("the race detector build never skips a mark (probeMarks is off), and the test's plain page accesses are the races it provokes")
	}
	for _, tc := range []struct {
		name string
		// take takes the bits out of b, reporting whether it took the
		// page's bit; after it the page is read.
		take func(b *Bitmap, words []uint64) (bool, error)
	}{
		{"HarvestWords", func(b *Bitmap, words []uint64) (bool, error) {
			words[0] = 0
			_, err := b.HarvestWords(words)
			return words[0] == 1<<skipPage, err
		}},
		{"Harvest", func(b *Bitmap, _ []uint64) (bool, error) {
			dst, err := New(b.Span(), nil)
			if err != nil {
				return false, err
			}
			defer dst.Close()
			_, err = b.Harvest(dst)
			return dst.PageDirty(skipPage), err
		}},
		// Tracker.Begin clears a live log and then reads every page.
		{"Clear", func(b *Bitmap, _ []uint64) (bool, error) {
			return true, b.Clear()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { skipLitmus(t, tc.take) })
	}
}

const skipPage = 5

func skipLitmus(t *testing.T, take func(*Bitmap, []uint64) (bool, error)) {
	b, err := New(64*DefaultPageSize, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close() })
	t.Logf("marks skip set bits: %v (membarrier(2) available)", b.probe)

	// Each round costs a membarrier(2), tens of µs in a virtual machine
	// (an interrupt to the marker's CPU).
	rounds := 20_000
	if testing.Short() {
		rounds = 5_000
	}
	// contents stands for the guest page: written and read with plain
	// accesses, as a device writes guest memory and a migration copies it.
	// The padding keeps it off the bitmap's cache line. Each round has
	// three steps: the harvester sets up (old contents, bit set), the
	// marker loads the bitmap word into its cache, and then both race. The
	// marker's store to the page must first take the line from the
	// harvester's cache, while its load of the bit hits at once: the
	// store-buffering window the test looks for is that transfer.
	var contents struct {
		_ [64]byte
		v uint64
		_ [64]byte
	}
	var bar litmus.Barrier
	missed, skipped := 0, 0
	marker := func() error {
		for r := range rounds {
			if err := bar.Await(uint64(3*r + 1)); err != nil {
				return err
			}
			if b.PageDirty(skipPage) { // the word, into this CPU's cache
				skipped++ // the bit is set: Mark will skip unless a harvest was first
			}
			if err := bar.Await(uint64(3*r + 2)); err != nil {
				return err
			}
			contents.v = uint64(2*r + 1) // the write
			if err := b.Mark(skipPage*DefaultPageSize, 8); err != nil {
				return err
			}
			if err := bar.Await(uint64(3*r + 3)); err != nil {
				return err
			}
		}
		return nil
	}
	harvester := func() error {
		words := make([]uint64, 1)
		for r := range rounds {
			// Set up: the page holds the old contents and is dirty.
			contents.v = uint64(2 * r)
			if err := b.Mark(skipPage*DefaultPageSize, 8); err != nil {
				return err
			}
			if err := bar.Await(uint64(3*r + 1)); err != nil {
				return err
			}
			if err := bar.Await(uint64(3*r + 2)); err != nil {
				return err
			}
			took, err := take(b, words)
			if err != nil {
				return err
			}
			seen := contents.v // the copy, after the harvest that took the bit
			if err := bar.Await(uint64(3*r + 3)); err != nil {
				return err
			}
			if !took {
				return errors.New("the harvest did not take the bit set before the round")
			}
			if seen != uint64(2*r+1) && !b.PageDirty(skipPage) {
				missed++
			}
			// Take whatever the marker left for the next round's set-up.
			if _, err := b.HarvestWords(words); err != nil {
				return err
			}
		}
		return nil
	}
	errH, errM := litmus.Run(&bar, harvester, marker)
	require.NoError(t, errH)
	require.NoError(t, errM)
	t.Logf("%d of %d marks found their bit set", skipped, rounds)
	require.Zero(t, missed, "rounds of %d where the harvest took the bit, read the page before the marker's write, and no bit was left", rounds)
}
