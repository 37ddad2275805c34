package guestatomic

import (
	"runtime"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
)

// ops is one implementation of the five operations: the exported ones, and
// on amd64 and arm64 the assembly ones as well (asm_test.go), which an
// ordinary build never calls otherwise.
type ops struct {
	name    string
	load32  func(*uint32) uint32
	store32 func(*uint32, uint32)
	load64  func(*uint64) uint64
	swap64  func(*uint64, uint64) uint64
	or64    func(*uint64, uint64)
}

var exported = ops{"exported", Load32, Store32, Load64, Swap64, Or64}

func implementations() []ops { return append([]ops{exported}, asmOps...) }

func TestOperations(t *testing.T) {
	for _, o := range implementations() {
		t.Run(o.name, func(t *testing.T) {
			// Neighbours on both sides must be left alone.
			w32 := [3]uint32{0xa5a5a5a5, 0x01020304, 0x5a5a5a5a}
			assert.Equal(t, uint32(0x01020304), o.load32(&w32[1]))
			o.store32(&w32[1], 0xfffefdfc)
			assert.Equal(t, [3]uint32{0xa5a5a5a5, 0xfffefdfc, 0x5a5a5a5a}, w32)

			w64 := [3]uint64{^uint64(0), 0x0102030405060708, ^uint64(0)}
			assert.Equal(t, uint64(0x0102030405060708), o.load64(&w64[1]))
			for _, tc := range []struct {
				swap, old uint64
			}{
				{0x8000000000000001, 0x0102030405060708},
				{0, 0x8000000000000001},
				{^uint64(0), 0},
			} {
				assert.Equal(t, tc.old, o.swap64(&w64[1], tc.swap))
				assert.Equal(t, tc.swap, w64[1])
			}
			o.swap64(&w64[1], 0)
			for _, tc := range []struct {
				or, want uint64
			}{
				{1, 1},
				{1 << 63, 1<<63 | 1},
				{1, 1<<63 | 1},
				{0, 1<<63 | 1},
				{0x00ff00, 1<<63 | 0x00ff01},
			} {
				o.or64(&w64[1], tc.or)
				assert.Equal(t, tc.want, o.load64(&w64[1]))
			}
			assert.Equal(t, ^uint64(0), w64[0])
			assert.Equal(t, ^uint64(0), w64[2])
		})
	}
}

// TestOrLosesNoBit: writers set disjoint bits of the same words at once
// while a harvester swaps them out, as dirty-page markers and a harvester
// do; every bit set is found exactly once.
func TestOrLosesNoBit(t *testing.T) {
	const writers, nwords = 8, 512
	for _, o := range implementations() {
		t.Run(o.name, func(t *testing.T) {
			var words [nwords]uint64
			var harvested [nwords]uint64
			var wg sync.WaitGroup
			done := make(chan struct{})
			harvest := func() {
				for i := range words {
					w := o.swap64(&words[i], 0)
					assert.Zero(t, harvested[i]&w, "bit harvested twice")
					harvested[i] |= w
				}
			}
			var hw sync.WaitGroup
			hw.Add(1)
			go func() {
				defer hw.Done()
				for {
					select {
					case <-done:
						return
					default:
						harvest()
					}
				}
			}()
			for g := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					// Writer g owns bits 8g..8g+7 of every word and
					// sets each of its bits in each word once.
					for r := range 8 * nwords {
						o.or64(&words[r/8], 1<<(8*g+r%8))
					}
				}()
			}
			wg.Wait()
			close(done)
			hw.Wait()
			harvest()
			for i := range harvested {
				assert.Equal(t, ^uint64(0), harvested[i], "word %d", i)
			}
		})
	}
}

// TestPublication: data written before a release (Store32, Or64, Swap64) is
// seen by the goroutine whose acquire (Load32, Load64, Swap64) sees the
// released value, in the two patterns of this module: a ring index
// published by a store and loaded, and a dirty bit set by an OR and taken
// by a swap. Run under the race detector, this also checks that the race
// build's annotations give each happens-before edge: without one the
// detector reports the plain data accesses as a race (checked by removing
// an annotation).
func TestPublication(t *testing.T) {
	const n = 1000
	t.Run("store-load", func(t *testing.T) {
		data := make([]uint64, n)
		var flag uint32
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := range uint32(n) {
				for Load32(&flag) != i+1 {
					runtime.Gosched()
				}
				assert.Equal(t, uint64(i)*3, data[i])
				// Hand the slot back: an OR releases, Load64 acquires.
				Or64(&data[i], 1<<63)
			}
		}()
		for i := range uint32(n) {
			if i > 0 {
				for Load64(&data[i-1])&(1<<63) == 0 {
					runtime.Gosched()
				}
			}
			data[i] = uint64(i) * 3
			Store32(&flag, i+1)
		}
		<-done
		assert.Equal(t, uint64(n-1)*3|1<<63, data[n-1])
	})
	t.Run("or-swap", func(t *testing.T) {
		// A writer fills page i, then marks it (Or64); the harvester
		// takes the mark (Swap64), reads the page and clears it for the
		// next round (Swap64 on the ack word releases, the writer's
		// Swap64 acquires).
		page := make([]uint64, 8)
		var mark, ack uint64
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := range uint64(n) {
				for Swap64(&mark, 0) == 0 {
					runtime.Gosched()
				}
				for _, v := range page {
					assert.Equal(t, i, v)
				}
				clear(page)
				Swap64(&ack, 1)
			}
		}()
		for i := range uint64(n) {
			if i > 0 {
				for Swap64(&ack, 0) == 0 {
					runtime.Gosched()
				}
			}
			for k := range page {
				page[k] = i
			}
			Or64(&mark, 1<<(i%64))
		}
		<-done
	})
}
