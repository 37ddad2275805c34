package dirty_test

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
)

// resident returns how many pages of the log's mapping are in memory: the
// Rss of its mapping in /proc/self/smaps, divided by the page size. It is
// the test's own view of which pages of a shared log exist, through a
// different interface than the lseek calls the package makes.
func resident(t *testing.T, b *dirty.Bitmap) int {
	t.Helper()
	addr := uint64(b.Addr())
	f, err := os.Open("/proc/self/smaps")
	require.NoError(t, err)
	defer f.Close()
	s := bufio.NewScanner(f)
	in := false
	for s.Scan() {
		line := s.Text()
		if r, _, ok := strings.Cut(line, " "); ok && strings.Contains(r, "-") && !strings.HasSuffix(r, ":") {
			lo, hi, _ := strings.Cut(r, "-")
			l, err1 := strconv.ParseUint(lo, 16, 64)
			h, err2 := strconv.ParseUint(hi, 16, 64)
			in = err1 == nil && err2 == nil && l <= addr && addr < h
			continue
		}
		if in && strings.HasPrefix(line, "Rss:") {
			kb, err := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(line, "Rss:"), "kB")), 10, 64)
			require.NoError(t, err)
			return int(kb << 10 / uint64(os.Getpagesize()))
		}
	}
	t.Fatalf("no mapping at %#x in /proc/self/smaps", addr)
	return 0
}

// procStatus returns a field of /proc/self/status in bytes (kB values).
func procStatus(t *testing.T, field string) uint64 {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	require.NoError(t, err)
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && k == field {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// memTotal is MemTotal of /proc/meminfo in bytes.
func memTotal(t *testing.T) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	require.NoError(t, err)
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, err := strconv.ParseUint(f[1], 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatal("no MemTotal in /proc/meminfo")
	return 0
}

// hugeSparseLog returns a shared log of up to 1 GiB (a 32 TiB guest),
// within what New accepts on this machine.
func hugeSparseLog(t *testing.T) *dirty.Bitmap {
	t.Helper()
	size := min(uint64(1<<30), memTotal(t)/8) &^ (1<<20 - 1)
	b, err := dirty.New(size*8*dirty.DefaultPageSize, &dirty.Options{Shared: true})
	require.NoError(t, err)
	t.Cleanup(func() { b.Close() })
	require.Equal(t, int(size), b.Size())
	return b
}

// TestHugeSparseSharedLogHarvestsWhatIsWritten: harvesting, counting,
// clearing and iterating a huge clean shared log brings none of it into
// memory, and a sparsely written one only the pages written: the process's
// shared memory (RssShmem) stays within a few MiB of where it started.
func TestHugeSparseSharedLogHarvestsWhatIsWritten(t *testing.T) {
	src, dst := hugeSparseLog(t), hugeSparseLog(t)
	rss0 := procStatus(t, "RssShmem")
	require.Zero(t, resident(t, src), "a new log holds no pages")

	n, err := src.Harvest(dst)
	require.NoError(t, err)
	require.Zero(t, n)
	require.Zero(t, src.Count())
	require.NoError(t, src.Clear())
	for range src.DirtyPages() {
		t.Fatal("a clean log has no dirty page")
	}
	for range src.DirtyRuns() {
		t.Fatal("a clean log has no dirty run")
	}
	require.NoError(t, dst.Union(src))
	assert.Zero(t, resident(t, src), "a clean harvest touched the log")
	assert.Zero(t, resident(t, dst), "a clean harvest touched its destination")

	// Mark pages scattered over the whole span: each lands on its own
	// page of log (a log page holds 32768 guest pages).
	const marks = 200
	step := src.NumPages() / marks
	var want []uint64
	for i := range uint64(marks) {
		p := i*step + i%7
		want = append(want, p)
		require.NoError(t, src.Mark(src.PageAddr(p)+17, 1))
	}
	logPages := resident(t, src)
	require.LessOrEqual(t, logPages, marks)
	n, err = src.Harvest(dst)
	require.NoError(t, err)
	require.Equal(t, uint64(marks), n)
	assert.Equal(t, want, slices.Collect(dst.DirtyPages()))
	assert.Equal(t, logPages, resident(t, src), "the harvest touched only pages written")
	assert.LessOrEqual(t, resident(t, dst), marks, "the destination took only the pages it got bits for")
	n, err = src.Harvest(dst)
	require.NoError(t, err)
	require.Zero(t, n, "a second harvest finds nothing")
	assert.Less(t, procStatus(t, "RssShmem")-rss0, uint64(8<<20), "shared memory grew")
}

// TestResidencyCheckSeesReadFaults is the negative control of the test
// above: reading holes of a shared log through its mapping (what a scan
// that does not skip them does) brings them into memory, and resident
// counts them.
func TestResidencyCheckSeesReadFaults(t *testing.T) {
	b := hugeSparseLog(t)
	mem := b.Bytes()
	const touched = 64
	stride := len(mem) / touched
	var sum byte
	for i := range touched {
		sum |= mem[i*stride]
	}
	require.Zero(t, sum)
	require.GreaterOrEqual(t, resident(t, b), touched, "reads of holes fault pages in")
}

// TestAttachFdDataFarPastTheLog: a peer grows its log file and writes 16
// GiB past the log (data further than a 32-bit int counts words). The
// scans still see no data in the log and read none of its holes.
func TestAttachFdDataFarPastTheLog(t *testing.T) {
	pg := os.Getpagesize()
	fd, err := unix.MemfdCreate("peer-log", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	size := uint64(64 * pg)
	require.NoError(t, unix.Ftruncate(fd, int64(size)))
	b, err := dirty.AttachFd(fd, 0, size, nil)
	require.NoError(t, err)
	defer b.Close()
	// Word 2^31 and a page's worth: negative if made an int on 32-bit.
	_, err = unix.Pwrite(fd, []byte{0xff}, 16<<30+int64(pg))
	require.NoError(t, err)

	assert.Zero(t, b.Count())
	for range b.DirtyPages() {
		t.Fatal("a clean log has no dirty page")
	}
	n, err := b.HarvestWords(make([]uint64, b.Words()))
	require.NoError(t, err)
	assert.Zero(t, n)
	assert.Zero(t, resident(t, b), "the scans read holes of the log")
}

// TestAttachFdHarvestSkipsHoles: a peer's log file with data pages here and
// there (written with pwrite) and an offset: AttachFd's harvest returns
// exactly the bits written, whichever side of a hole they lie.
func TestAttachFdHarvestSkipsHoles(t *testing.T) {
	pg := os.Getpagesize()
	fd, err := unix.MemfdCreate("peer-log", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	const logPages = 64
	offset := uint64(3*pg + 24) // the log starts mid-page
	size := uint64(logPages * pg)
	require.NoError(t, unix.Ftruncate(fd, int64(offset+size)))
	// Bits at the first word, the last word, words either side of a page
	// boundary, and one in the middle of a long hole's neighbour.
	lastWord := size/8 - 1
	set := map[uint64]uint64{0: 1 << 3, lastWord: 1 << 63, 511: 1, 512: 1 << 7, 40 * 512: 0xf0}
	for w, v := range set {
		var buf [8]byte
		for i := range buf {
			buf[i] = byte(v >> (8 * i))
		}
		_, err := unix.Pwrite(fd, buf[:], int64(offset+8*w))
		require.NoError(t, err)
	}
	b, err := dirty.AttachFd(fd, offset, size, nil)
	require.NoError(t, err)
	defer b.Close()
	var want []uint64
	for w, v := range set {
		for bit := range uint64(64) {
			if v&(1<<bit) != 0 {
				want = append(want, w*64+bit)
			}
		}
	}
	slices.Sort(want)
	assert.Equal(t, want, slices.Collect(b.DirtyPages()))
	assert.Equal(t, uint64(len(want)), b.Count())
	dst := make([]uint64, b.Words())
	n, err := b.HarvestWords(dst)
	require.NoError(t, err)
	assert.Equal(t, uint64(len(want)), n)
	for w := range dst {
		assert.Equal(t, set[uint64(w)], dst[w], "word %d", w)
	}
	assert.Zero(t, b.Count())
}

// TestNewRefusesLogBeyondMachine: a log larger than a quarter of the
// machine's memory (on 32-bit, of the address space: 1 GiB, whatever the
// memory) is an error matching ErrTooLarge, not a runtime out-of-memory
// failure when it is first used, and not a truncated allocation.
func TestNewRefusesLogBeyondMachine(t *testing.T) {
	limit := memTotal(t) / 4
	if strconv.IntSize == 32 {
		limit = min(limit, 1<<30)
	}
	for _, shared := range []bool{false, true} {
		big := (limit + 1<<20) * 8 * dirty.DefaultPageSize
		_, err := dirty.New(big, &dirty.Options{Shared: shared})
		require.ErrorIs(t, err, dirty.ErrTooLarge, "shared %v", shared)
		var se *dirty.SizeError
		require.ErrorAs(t, err, &se)
		assert.Equal(t, limit+1<<20, se.Size)
		assert.Equal(t, dirty.MemoryLimit(), se.Limit)

		b, err := dirty.New((limit-1<<20)*8*dirty.DefaultPageSize, &dirty.Options{Shared: shared})
		require.NoError(t, err, "a log just within the limit (never touched)")
		require.NoError(t, b.Close())
	}
}

// TestSparseScansMatchHeap: a log mapped from a file (a shared New, and
// AttachFd at an offset that is not page-aligned) whose pages are written
// here and there gives the same answers as a heap bitmap that took the
// same marks, through every scan that skips holes: Harvest, HarvestWords,
// Count, the iterators, Clear and Union from it.
func TestSparseScansMatchHeap(t *testing.T) {
	const logPages = 48 // 192 KiB of log: 48 file pages, most of them holes
	const wordsPerPage = 4096 / 8
	shared := func(t *testing.T) *dirty.Bitmap {
		b, err := dirty.New(logPages*4096*8*dirty.DefaultPageSize, &dirty.Options{Shared: true})
		require.NoError(t, err)
		t.Cleanup(func() { b.Close() })
		return b
	}
	attached := func(t *testing.T) *dirty.Bitmap {
		owner, err := dirty.New((logPages+2)*4096*8*dirty.DefaultPageSize, &dirty.Options{Shared: true})
		require.NoError(t, err)
		t.Cleanup(func() { owner.Close() })
		b, err := dirty.AttachFd(owner.Fd(), 4096+8*37, logPages*4096, nil)
		require.NoError(t, err)
		t.Cleanup(func() { b.Close() })
		return b
	}
	seeds := uint64(8)
	if testing.Short() {
		seeds = 2
	}
	for name, mk := range map[string]func(*testing.T) *dirty.Bitmap{"memfd": shared, "attach at an offset": attached} {
		for seed := range seeds {
			t.Run(fmt.Sprintf("%s/seed %d", name, seed), func(t *testing.T) {
				sut := mk(t)
				oracle, err := dirty.New(sut.Span(), nil)
				require.NoError(t, err)
				r := rand.New(rand.NewPCG(seed, 7))
				// A few log pages receive marks; the others stay holes.
				var hot []uint64
				for range 1 + r.IntN(6) {
					hot = append(hot, uint64(r.IntN(logPages)))
				}
				pagesPerLogPage := uint64(wordsPerPage * 64)
				for round := range 6 {
					for range r.IntN(40) {
						lp := hot[r.IntN(len(hot))]
						page := lp*pagesPerLogPage + uint64(r.IntN(int(pagesPerLogPage)))
						n := uint64(1 + r.IntN(3000)) // up to a few words' worth of pages
						addr := sut.PageAddr(page) + uint64(r.IntN(4096))
						length := min(n*dirty.DefaultPageSize, sut.Span()-addr)
						require.NoError(t, sut.Mark(addr, length))
						require.NoError(t, oracle.Mark(addr, length))
					}
					require.Equal(t, oracle.Count(), sut.Count(), "round %d", round)
					require.Equal(t, slices.Collect(oracle.DirtyPages()), slices.Collect(sut.DirtyPages()))
					type run struct{ first, n uint64 }
					var want, got []run
					for f, n := range oracle.DirtyRuns() {
						want = append(want, run{f, n})
					}
					for f, n := range sut.DirtyRuns() {
						got = append(got, run{f, n})
					}
					require.Equal(t, want, got)
					u, err := dirty.New(sut.Span(), nil)
					require.NoError(t, err)
					require.NoError(t, u.Union(sut))
					require.Equal(t, slices.Collect(oracle.DirtyPages()), slices.Collect(u.DirtyPages()), "Union from the sparse log")
					switch round % 3 {
					case 0:
						wantW, gotW := make([]uint64, oracle.Words()), make([]uint64, sut.Words())
						n1, err := oracle.HarvestWords(wantW)
						require.NoError(t, err)
						n2, err := sut.HarvestWords(gotW)
						require.NoError(t, err)
						require.Equal(t, n1, n2)
						require.Equal(t, wantW, gotW)
					case 1:
						d1, err := dirty.New(sut.Span(), nil)
						require.NoError(t, err)
						d2, err := dirty.New(sut.Span(), nil)
						require.NoError(t, err)
						n1, err := oracle.Harvest(d1)
						require.NoError(t, err)
						n2, err := sut.Harvest(d2)
						require.NoError(t, err)
						require.Equal(t, n1, n2)
						require.Equal(t, slices.Collect(d1.DirtyPages()), slices.Collect(d2.DirtyPages()))
					case 2:
						require.NoError(t, oracle.Clear())
						require.NoError(t, sut.Clear())
					}
					require.Zero(t, sut.Count())
				}
			})
		}
	}
}
