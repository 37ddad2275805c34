package dirty_test

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
)

// TestConcurrentMarkHarvest runs many markers against one harvester that
// harvests in a loop. Every page is marked exactly once, by its owning
// marker, right after the marker writes the page's "content" with a plain
// store. The harvester, for every page a harvest returns, reads that content
// with a plain load: the atomic OR / atomic swap pair must order the two
// (the race detector checks it, the value check catches a stale read), and
// the union of all harvests must be every page marked, each harvested once.
// With "cache", each marker marks through its own Cache and flushes every
// few marks and at its end: the flush's atomic ORs must order the content
// stores before the bits just as Mark does.
func TestConcurrentMarkHarvest(t *testing.T) {
	for _, mode := range []string{"bitmap", "words", "cache"} {
		into := mode
		if mode == "cache" {
			into = "bitmap"
		}
		t.Run(mode, func(t *testing.T) {
			const (
				pages   = 1 << 16
				markers = 8
			)
			span := uint64(pages) * dirty.DefaultPageSize
			log, err := dirty.New(span, nil)
			require.NoError(t, err)
			content := make([]uint64, pages) // the "guest page" each bit stands for

			var done atomic.Bool
			var wg sync.WaitGroup
			for g := range markers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(g), 99))
					// Marker g owns pages p with p%markers == g, marks them in a
					// shuffled order, some as multi-page ranges of its own pages
					// only (stride markers), some as single pages.
					own := make([]uint64, 0, pages/markers)
					for p := uint64(g); p < pages; p += markers {
						own = append(own, p)
					}
					r.Shuffle(len(own), func(i, j int) { own[i], own[j] = own[j], own[i] })
					var mark func(addr, n uint64) error = log.Mark
					cache := log.NewCache()
					if mode == "cache" {
						mark = cache.Mark
					}
					for k, p := range own {
						content[p] = p*2654435761 + 1 // plain store, then mark
						off := r.Uint64N(dirty.DefaultPageSize)
						n := 1 + r.Uint64N(dirty.DefaultPageSize-off)
						if err := mark(p*dirty.DefaultPageSize+off, n); err != nil {
							t.Error(err)
							return
						}
						if k%(1+int(p%29)) == 0 {
							if err := cache.Flush(); err != nil {
								t.Error(err)
								return
							}
						}
					}
					if err := cache.Flush(); err != nil {
						t.Error(err)
					}
				}()
			}
			go func() { wg.Wait(); done.Store(true) }()

			seen := make([]int, pages)
			var harvests int
			consume := func(got []uint64) {
				for _, p := range got {
					seen[p]++
					// Plain load of what the marker stored before marking.
					if content[p] != p*2654435761+1 {
						t.Errorf("page %d harvested before its content was visible", p)
					}
				}
			}
			dst, err := dirty.New(span, nil)
			require.NoError(t, err)
			words := make([]uint64, log.Words())
			harvest := func() {
				harvests++
				if into == "bitmap" {
					n, err := log.Harvest(dst)
					require.NoError(t, err)
					got := collect(dst)
					require.Equal(t, int(n), len(got))
					consume(got)
					require.NoError(t, dst.Clear())
					return
				}
				clear(words)
				n, err := log.HarvestWords(words)
				require.NoError(t, err)
				got := pagesOfWords(words)
				require.Equal(t, int(n), len(got))
				consume(got)
			}
			for !done.Load() {
				harvest()
			}
			harvest() // after every marker finished: takes the rest
			for p, n := range seen {
				if n != 1 {
					t.Fatalf("page %d harvested %d times, want exactly once", p, n)
				}
			}
			assert.Zero(t, log.Count())
			t.Logf("%d harvests", harvests)
		})
	}
}

// TestConcurrentMarkSameWords has markers hammer the same few words (every
// marker marks every page, repeatedly) while the harvester takes them: the
// contended case. Every page must show up in some harvest, and a final
// harvest after the markers stop must leave the log clean.
func TestConcurrentMarkSameWords(t *testing.T) {
	const pages = 256
	log := mustNew(t, pages*dirty.DefaultPageSize)
	var wg sync.WaitGroup
	var done atomic.Bool
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 200 {
				for p := uint64(0); p < pages; p++ {
					if err := log.Mark(((p+uint64(g*round))%pages)*dirty.DefaultPageSize, 1); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	go func() { wg.Wait(); done.Store(true) }()
	union := make([]uint64, log.Words())
	for !done.Load() {
		_, err := log.HarvestWords(union)
		require.NoError(t, err)
	}
	_, err := log.HarvestWords(union)
	require.NoError(t, err)
	for i, w := range union {
		require.Equal(t, ^uint64(0), w, "word %d", i)
	}
	assert.Zero(t, log.Count())
}

// TestConcurrentPutBack has a consumer that fails every other harvest and
// puts the bits back with Union while markers keep marking: no page may be
// lost.
func TestConcurrentPutBack(t *testing.T) {
	const pages = 1 << 14
	log := mustNew(t, pages*dirty.DefaultPageSize)
	var wg sync.WaitGroup
	var done atomic.Bool
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := uint64(g); p < pages; p += 4 {
				if err := log.Mark(p*dirty.DefaultPageSize, dirty.DefaultPageSize); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); done.Store(true) }()
	got := mustNew(t, pages*dirty.DefaultPageSize)
	tmp := mustNew(t, pages*dirty.DefaultPageSize)
	fail := true
	for last := false; !last; {
		last = done.Load()
		_, err := log.Harvest(tmp)
		require.NoError(t, err)
		if fail { // the consumer fails: put back
			require.NoError(t, log.Union(tmp))
		} else {
			require.NoError(t, got.Union(tmp))
		}
		require.NoError(t, tmp.Clear())
		if last && fail { // the final harvest failed: one more
			last = false
		}
		fail = !fail
	}
	assert.Equal(t, uint64(pages), got.Count())
	assert.Zero(t, log.Count())
}
