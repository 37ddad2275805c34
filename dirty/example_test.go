package dirty_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/vdpakit/vdpakit/dirty"
)

// A device logs its writes; the migration code harvests them.
func Example() {
	// A log for a 1 GiB guest: 4 KiB pages, 32 KiB of bitmap.
	log, err := dirty.New(1<<30, nil)
	if err != nil {
		panic(err)
	}
	defer log.Close()

	// The device wrote 10 KiB at 0x3000 and 8 bytes at 0x20_0000.
	_ = log.Mark(0x3000, 10<<10)
	_ = log.Mark(0x20_0000, 8)

	// Take what is dirty; the log is clean again afterwards.
	round, _ := dirty.New(log.Span(), nil)
	n, _ := log.Harvest(round)
	fmt.Println("harvested", n, "pages; left in log:", log.Count())
	for first, count := range round.DirtyRuns() {
		fmt.Printf("send %#x..%#x\n", round.PageAddr(first), round.PageAddr(first+count)-1)
	}
	// Output:
	// harvested 4 pages; left in log: 0
	// send 0x3000..0x5fff
	// send 0x200000..0x200fff
}

// A range outside the log's span is an error, never silently dropped.
func ExampleBitmap_Mark() {
	log, _ := dirty.New(64<<20, nil)
	err := log.Mark(64<<20-8, 16) // runs 8 bytes past the span
	fmt.Println(errors.Is(err, dirty.ErrOutOfSpan))
	var re *dirty.RangeError
	if errors.As(err, &re) {
		fmt.Printf("rejected %#x+%d\n", re.Addr, re.Len)
	}
	fmt.Println(log.Mark(1<<40, 0)) // zero length: nothing to do
	// Output:
	// true
	// rejected 0x3fffff8+16
	// <nil>
}

// A device queue's goroutine batches its marks in a Cache and flushes them
// once per burst, after the writes and before the log is read.
func ExampleCache() {
	log, _ := dirty.New(1<<30, nil)
	c := log.NewCache()

	// A burst: 32 receive buffers of 2 KiB in 16 consecutive pages, and
	// the used ring's page.
	for i := range uint64(32) {
		_ = c.Mark(0x10_0000+i*2048, 1500)
	}
	_ = c.Mark(0x2000, 8)
	fmt.Println("cached words:", c.Pending(), "in the log:", log.Count())

	_ = c.Flush() // one atomic OR per word
	fmt.Println("cached words:", c.Pending(), "in the log:", log.Count())
	// Output:
	// cached words: 2 in the log: 0
	// cached words: 0 in the log: 17
}

// A consumer that fails to send what it harvested puts it back, so the
// next harvest returns it again.
func ExampleBitmap_Union() {
	log, _ := dirty.New(1<<30, nil)
	_ = log.Mark(0x7000, 1)

	harvested, _ := dirty.New(log.Span(), nil)
	_, _ = log.Harvest(harvested)
	sendErr := errors.New("link down")
	if sendErr != nil {
		_ = log.Union(harvested) // put back
	}
	for p := range log.DirtyPages() {
		fmt.Printf("page %d is still dirty\n", p)
	}
	// Output:
	// page 7 is still dirty
}

// Harvesting into a word slice: bit b of word w is page 64w+b.
func ExampleBitmap_HarvestWords() {
	log, _ := dirty.New(1<<30, nil)
	_ = log.Mark(0, 2*4096)    // pages 0, 1
	_ = log.Mark(65*4096, 100) // page 65
	words := make([]uint64, log.Words())
	n, _ := log.HarvestWords(words)
	fmt.Printf("%d pages: %#x %#x\n", n, words[0], words[1])
	// Output:
	// 3 pages: 0x3 0x2
}

// A shared log lives in a memfd: what a vhost-user front-end sends with
// VHOST_USER_SET_LOG_BASE, and what the back-end maps with AttachFd.
func ExampleAttachFd() {
	front, err := dirty.New(4<<30, &dirty.Options{Shared: true})
	if err != nil {
		panic(err)
	}
	defer front.Close()
	// Sent to the peer: fd, mmap_size, mmap_offset.
	fmt.Println("mmap_size", front.Size(), "mmap_offset", front.FdOffset())

	// The back-end (usually another process) maps it and logs its writes.
	back, err := dirty.AttachFd(front.Fd(), front.FdOffset(), uint64(front.Size()), nil)
	if err != nil {
		panic(err)
	}
	defer back.Close()
	_ = back.Mark(0x1234_5000, 100)

	// The front-end sees the bit.
	for p := range front.DirtyPages() {
		fmt.Printf("dirty page at %#x\n", front.PageAddr(p))
	}
	// Output:
	// mmap_size 131072 mmap_offset 0
	// dirty page at 0x12345000
}

// Iterative pre-copy driven by a Tracker (with a fake clock, so the output is
// deterministic).
func ExampleTracker() {
	log, _ := dirty.New(1<<30, nil)
	now := time.Unix(0, 0)
	tr, _ := dirty.NewTracker(log, &dirty.TrackerOptions{
		Bandwidth:      100e6, // 100 MB/s
		DowntimeTarget: 50 * time.Millisecond,
		Now:            func() time.Time { return now },
	})
	_ = tr.Begin()
	// ... send all of guest memory (round 0) ...
	dirtied := []uint64{20000, 4000, 1000} // pages the guest dirties per round
	toSend, _ := dirty.New(log.Span(), nil)
	for _, n := range dirtied {
		_ = log.Mark(0, n*4096) // the guest runs
		now = now.Add(time.Second)
		r, _ := tr.Next(toSend)
		fmt.Printf("round %d: %d pages, %.0f pages/s, downtime now %v: %v\n",
			r.N, r.Pages, r.PageRate, r.Downtime, r.Decision)
		if r.Decision != dirty.Continue {
			break
		}
		// ... send toSend's pages ...
		_ = toSend.Clear()
	}
	// ... stop the guest and the device ...
	f, _ := tr.Final(toSend)
	fmt.Printf("stop-and-copy: %d pages (%d new)\n", toSend.Count(), f.Pages)
	// Output:
	// round 1: 20000 pages, 20000 pages/s, downtime now 819.2ms: continue
	// round 2: 4000 pages, 4000 pages/s, downtime now 163.84ms: continue
	// round 3: 1000 pages, 1000 pages/s, downtime now 40.96ms: stop: downtime target met
	// stop-and-copy: 1000 pages (0 new)
}
