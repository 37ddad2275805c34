package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
)

// Dirty runs the dirty-tracking suite: Mark cost, harvest scan speed against
// guest size for clean, 1 % and 50 % dirty bitmaps, and the overhead of
// logging on ring processing.
func (h *Harness) Dirty(ctx context.Context) {
	const suite = "dirty"
	h.benchMark(ctx, suite)
	for _, size := range h.cfg.scanSizes {
		for _, frac := range []float64{0, 0.01, 0.5} {
			if ctx.Err() != nil {
				return
			}
			h.benchHarvest(ctx, suite, size, frac)
		}
	}
	for _, descs := range []int{1, 4} {
		for _, b := range []int{1, maxInt(h.cfg.Batches)} {
			if ctx.Err() != nil {
				return
			}
			h.benchLogOverhead(ctx, suite, descs, b)
			if b == 1 && maxInt(h.cfg.Batches) == 1 {
				break
			}
		}
	}
}

// benchMark measures Mark of one page and of a 64 KiB range, walking a
// 1 GiB span so the words touched are not all in one cache line, and the
// one-page mark through a dirty.Cache flushed every 32 marks (a device
// queue's burst). After the first pass over the span every bit is set, so
// these rows are the cost of marking pages again, which on a bitmap from
// dirty.New skips the atomic OR. The "bit clear" row is the cost right
// after a harvest: it walks a 1 TiB span page by page, every mark setting a
// clear bit, and clears the bitmap when the walk wraps (once per 268
// million marks).
func (h *Harness) benchMark(ctx context.Context, suite string) {
	for _, c := range []struct {
		length uint64
		cached bool
		clean  bool
	}{{1, false, false}, {1, false, true}, {64 << 10, false, false}, {1, true, false}} {
		length := c.length
		span := uint64(1 << 30)
		name := fmt.Sprintf("Mark %s, uncontended", map[uint64]string{1: "1 page", 64 << 10: "64 KiB range"}[length])
		switch {
		case c.cached:
			name = "Mark 1 page through a Cache, flushed every 32"
		case c.clean:
			name = "Mark 1 page, bit clear (the first mark since a harvest)"
			span = 1 << 40
		}
		p := map[string]any{"span": formatSize(span), "length": length, "page_size": dirty.DefaultPageSize, "cached": c.cached, "clean": c.clean}
		h.prog.Step("dirty: %s", name)
		bm, err := dirty.New(span, nil)
		if err != nil {
			h.fail(suite, name, p, err)
			continue
		}
		cache := bm.NewCache()
		// A stride of 7 pages plus the range visits every page, in an order
		// that defeats a simple next-line prefetch.
		stride := uint64(7*dirty.DefaultPageSize) + length
		// The walk's position is carried from one timed loop to the
		// next in addr, and kept in a local (a register) inside each:
		// a variable the closures share lives on the heap, and every
		// step would load and store it, which the row would count as
		// Mark's cost (the shared variable: 3.3-5.8 ns a mark; this
		// loop: 2.8, two runs each, 2026-12-05).
		var addr uint64
		loop := func(n int) error {
			a := addr
			for i := 0; i < n; i++ {
				if err := bm.Mark(a, length); err != nil {
					return err
				}
				if a += stride; a+length > span {
					a = (a + length) % span % stride
				}
			}
			addr = a
			return nil
		}
		switch {
		case c.cached:
			loop = func(n int) error {
				a := addr
				for i := 0; i < n; i++ {
					if err := cache.Mark(a, length); err != nil {
						return err
					}
					if i&31 == 31 {
						if err := cache.Flush(); err != nil {
							return err
						}
					}
					if a += stride; a+length > span {
						a = (a + length) % span % stride
					}
				}
				addr = a
				return cache.Flush()
			}
		case c.clean:
			loop = func(n int) error {
				a := addr
				for i := 0; i < n; i++ {
					if err := bm.Mark(a, length); err != nil {
						return err
					}
					if a += dirty.DefaultPageSize; a == span {
						a = 0
						if err := bm.Clear(); err != nil {
							return err
						}
					}
				}
				addr = a
				return nil
			}
		}
		t, err := timeLoopAllocs(ctx, h.cfg.duration, loop)
		bm.Close()
		if err != nil {
			h.fail(suite, name, p, err)
			continue
		}
		p["ops"] = t.N
		h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{
			{Name: "ns_per_op", Value: nsPer(t.N, t.Wall), Unit: "ns/op"},
			{Name: "mops", Value: mppsOf(t.N, t.Wall), Unit: "Mops/s"},
			{Name: "cpu", Value: nsPer(t.N, t.CPU), Unit: "cpu-ns/op"},
		}})
	}
}

// dirtyPattern returns bitmap bytes with each of pages bits set with
// probability frac (a fixed seed: every run scans the same pattern).
func dirtyPattern(size int, pages uint64, frac float64) []byte {
	b := make([]byte, size)
	if frac <= 0 {
		return b
	}
	rng := rand.New(rand.NewPCG(1, uint64(frac*1e6)))
	if frac >= 0.5 {
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
	} else {
		// Geometric gaps between dirty pages: cheap for small fractions.
		want := uint64(float64(pages) * frac)
		for i := uint64(0); i < want; i++ {
			pg := rng.Uint64N(pages)
			b[pg/8] |= 1 << (pg % 8)
		}
	}
	// Bits past the last page name nothing; keep them clear.
	for pg := pages; pg < uint64(size)*8; pg++ {
		b[pg/8] &^= 1 << (pg % 8)
	}
	return b
}

// benchHarvest measures Harvest scan speed over a bitmap covering guest
// bytes of guest space with frac of its pages dirty. The pattern is copied
// back into the log before each harvest, untimed.
func (h *Harness) benchHarvest(ctx context.Context, suite string, guest uint64, frac float64) {
	name := fmt.Sprintf("harvest %s guest, %s", formatSize(guest), fracLabel(frac))
	p := map[string]any{"guest_size": formatSize(guest), "guest_bytes": guest, "dirty_fraction": frac, "page_size": dirty.DefaultPageSize}
	h.prog.Step("dirty: %s", name)
	src, err := dirty.New(guest, nil)
	if err != nil {
		h.fail(suite, name, p, err)
		return
	}
	defer src.Close()
	dst, err := dirty.New(guest, nil)
	if err != nil {
		h.fail(suite, name, p, err)
		return
	}
	defer dst.Close()
	pattern := dirtyPattern(src.Size(), src.NumPages(), frac)
	var expect uint64
	for _, c := range pattern {
		for ; c != 0; c &= c - 1 {
			expect++
		}
	}
	log := src.Bytes()
	var total time.Duration
	scans := 0
	minScans := 3
	if h.cfg.Short {
		minScans = 1
	}
	for (total < h.cfg.duration || scans < minScans) && ctx.Err() == nil {
		copy(log, pattern)
		start := time.Now()
		got, err := src.Harvest(dst)
		total += time.Since(start)
		if err != nil {
			h.fail(suite, name, p, err)
			return
		}
		if got != expect {
			h.fail(suite, name, p, fmt.Errorf("harvest took %d pages, pattern has %d", got, expect))
			return
		}
		scans++
		if scans >= 10000 {
			break
		}
	}
	per := total / time.Duration(scans)
	p["scans"] = scans
	p["bitmap_bytes"] = src.Size()
	p["dirty_pages"] = expect
	h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{
		{Name: "ms", Value: float64(per.Nanoseconds()) / 1e6, Unit: "ms/scan"},
		{Name: "gbps", Value: float64(src.Size()) / per.Seconds() / 1e9, Unit: "GB/s of bitmap"},
	}})
}

func fracLabel(f float64) string {
	if f == 0 {
		return "clean"
	}
	return fmt.Sprintf("%g%% dirty", f*100)
}

// benchLogOverhead measures device-side pop+push with and without dirty
// logging (used ring entries, used.idx and the chain's written bytes marked
// in a bitmap) and reports the ratio logged/unlogged.
func (h *Harness) benchLogOverhead(ctx context.Context, suite string, descs, batch int) {
	name := fmt.Sprintf("logging overhead on pop+push, %s, batch %d", chainLabel(descs), batch)
	p := map[string]any{"descs": descs, "batch": batch, "ring_size": h.cfg.RingSize}
	h.prog.Step("dirty: %s", name)
	bm, err := dirty.New(ringMemSize, nil)
	if err != nil {
		h.fail(suite, name, p, err)
		return
	}
	defer bm.Close()
	// Alternate plain, logged and cached (a dirty.Cache per queue, as the
	// servers in vdpa give each ring) runs and keep the best of each, so
	// load from other processes does not land on one side only.
	var plain, logged, cached []float64
	rounds := 3
	if h.cfg.Short {
		rounds = 1
	}
	for r := 0; r < rounds; r++ {
		t, err := benchDevice(ctx, h.cfg.duration/2, h.cfg.RingSize, descs, batch, nil)
		if err != nil {
			h.fail(suite, name, p, err)
			return
		}
		plain = append(plain, nsPer(t.N, t.Wall))
		t, err = benchDevice(ctx, h.cfg.duration/2, h.cfg.RingSize, descs, batch, bm)
		if err != nil {
			h.fail(suite, name, p, err)
			return
		}
		logged = append(logged, nsPer(t.N, t.Wall))
		t, err = benchDevice(ctx, h.cfg.duration/2, h.cfg.RingSize, descs, batch, bm.NewCache())
		if err != nil {
			h.fail(suite, name, p, err)
			return
		}
		cached = append(cached, nsPer(t.N, t.Wall))
	}
	a, b, c := minF(plain), minF(logged), minF(cached)
	p["rounds"] = rounds
	h.add(Result{Suite: suite, Name: name, Params: p, Metrics: []Metric{
		{Name: "ratio", Value: ratio(b, a), Unit: "x"},
		{Name: "plain", Value: a, Unit: "ns/chain"},
		{Name: "logged", Value: b, Unit: "ns/chain"},
		{Name: "cached", Value: c, Unit: "ns/chain"},
		{Name: "cached_ratio", Value: ratio(c, a), Unit: "x"},
	}})
}

func minF(v []float64) float64 {
	m := v[0]
	for _, x := range v[1:] {
		m = min(m, x)
	}
	return m
}
