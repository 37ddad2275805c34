package dirty_test

import (
	"encoding/binary"
	"errors"
	"math"
	"os"
	"slices"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
)

// backings returns a constructor for each kind of bitmap memory, so layout
// rules are checked on every one.
func backings(t *testing.T) map[string]func(span uint64, opts *dirty.Options) *dirty.Bitmap {
	return map[string]func(uint64, *dirty.Options) *dirty.Bitmap{
		"heap": func(span uint64, opts *dirty.Options) *dirty.Bitmap {
			b, err := dirty.New(span, opts)
			require.NoError(t, err)
			t.Cleanup(func() { b.Close() })
			return b
		},
		"memfd": func(span uint64, opts *dirty.Options) *dirty.Bitmap {
			o := dirty.Options{Shared: true}
			if opts != nil {
				o.PageSize = opts.PageSize
			}
			b, err := dirty.New(span, &o)
			require.NoError(t, err)
			t.Cleanup(func() { b.Close() })
			return b
		},
		"attach": func(span uint64, opts *dirty.Options) *dirty.Bitmap {
			// Memory from an independent mmap, as a peer's mapping would be.
			mem, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			require.NoError(t, err)
			t.Cleanup(func() { unix.Munmap(mem) })
			b, err := dirty.Attach(mem, span, opts)
			require.NoError(t, err)
			return b
		},
	}
}

// TestLogLayout checks the bit positions against the vhost log format as the
// kernel and the vhost-user spec define it: the page of guest address a is
// a / VHOST_LOG_PAGE (0x1000), and its bit is bit page%8 of byte page/8
// (the vhost-user spec's "log[page/8] |= 1 << page%8"; the kernel's
// set_bit on little-endian unsigned longs lands on the same bit).
func TestLogLayout(t *testing.T) {
	cases := []struct {
		name     string
		addr     uint64
		wantByte int
		wantBit  uint
	}{
		{"page 0 is bit 0 of byte 0", 0, 0, 0},
		{"last byte of page 0 is still page 0", 0xfff, 0, 0},
		{"page 1 is bit 1 of byte 0", 0x1000, 0, 1},
		{"page 7 is bit 7 of byte 0", 0x7abc, 0, 7},
		{"page 8 is bit 0 of byte 1", 0x8000, 1, 0},
		{"page 63 is bit 7 of byte 7 (top of word 0)", 63 * 0x1000, 7, 7},
		{"page 64 is bit 0 of byte 8 (word 1)", 64 * 0x1000, 8, 0},
		{"page 1000 is bit 0 of byte 125", 1000 * 0x1000, 125, 0},
		{"page 1234567 is bit 7 of byte 154320", 1234567 * 0x1000, 154320, 7},
	}
	for name, mk := range backings(t) {
		t.Run(name, func(t *testing.T) {
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					b := mk(8<<30, nil)
					require.NoError(t, b.Mark(c.addr, 1))
					mem := b.Bytes()
					require.Len(t, mem, b.Size())
					for i, v := range mem {
						if i == c.wantByte {
							assert.Equalf(t, byte(1)<<c.wantBit, v, "byte %d", i)
						} else if v != 0 {
							t.Fatalf("byte %d = %#x, want 0", i, v)
						}
					}
				})
			}
		})
	}
}

// TestLogLayoutReadsForeignBits checks the other direction: bits a kernel or
// peer sets directly in the log memory (as bytes, the way DPDK's vhost
// library writes them) are read back as the right pages.
func TestLogLayoutReadsForeignBits(t *testing.T) {
	for name, mk := range backings(t) {
		t.Run(name, func(t *testing.T) {
			b := mk(1<<30, nil)
			mem := b.Bytes()
			for _, page := range []uint64{0, 9, 63, 64, 200, 262143} {
				mem[page/8] |= 1 << (page % 8)
			}
			// A peer writing a whole little-endian word: pages 128..135.
			binary.LittleEndian.PutUint64(mem[16:], 0xff)
			want := []uint64{0, 9, 63, 64, 128, 129, 130, 131, 132, 133, 134, 135, 200, 262143}
			assert.Equal(t, want, collect(b))
			assert.Equal(t, uint64(len(want)), b.Count())
			words := make([]uint64, b.Words())
			n, err := b.HarvestWords(words)
			require.NoError(t, err)
			assert.Equal(t, uint64(len(want)), n)
			assert.Equal(t, uint64(1<<0|1<<9|1<<63), words[0])
			assert.Equal(t, uint64(0xff), words[2])
			for _, v := range mem {
				require.Zero(t, v, "harvest leaves the log clean")
			}
		})
	}
}

func collect(b *dirty.Bitmap) []uint64 {
	var pages []uint64
	for p := range b.DirtyPages() {
		pages = append(pages, p)
	}
	return pages
}

func TestGeometry(t *testing.T) {
	cases := []struct {
		name       string
		span, ps   uint64
		pages      uint64
		size       int
		spanAfter  uint64
		wantPageSz uint64
	}{
		{"default page size is VHOST_LOG_PAGE 4096", 1 << 20, 0, 256, 32, 1 << 20, 4096},
		{"partial last page counts as a page", 4097, 0, 2, 8, 4097, 4096},
		{"one byte needs one word", 1, 0, 1, 8, 1, 4096},
		{"64 pages fill one word exactly", 64 * 4096, 0, 64, 8, 64 * 4096, 4096},
		{"65 pages need two words", 64*4096 + 1, 0, 65, 16, 64*4096 + 1, 4096},
		{"1 TiB at 4 KiB is 32 MiB of log", 1 << 40, 0, 1 << 28, 32 << 20, 1 << 40, 4096},
		{"2 MiB pages", 1 << 30, 2 << 20, 512, 64, 1 << 30, 2 << 20},
		{"page size 1", 1000, 1, 1000, 128, 1000, 1},
		{"whole 64-bit space with 2^58 pages", math.MaxUint64, 1 << 58, 64, 8, math.MaxUint64, 1 << 58},
		{"whole 64-bit space with 2^63 pages", math.MaxUint64, 1 << 63, 2, 8, math.MaxUint64, 1 << 63},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, err := dirty.New(c.span, &dirty.Options{PageSize: c.ps})
			require.NoError(t, err)
			assert.Equal(t, c.pages, b.NumPages())
			assert.Equal(t, c.size, b.Size())
			assert.Equal(t, c.size/8, b.Words())
			assert.Equal(t, c.spanAfter, b.Span())
			assert.Equal(t, c.wantPageSz, b.PageSize())
			assert.Equal(t, -1, b.Fd())
			assert.NotZero(t, b.Addr())
		})
	}
}

func TestNewRejects(t *testing.T) {
	cases := []struct {
		name string
		span uint64
		ps   uint64
		want error
	}{
		{"page size must be a power of two (3)", 1 << 20, 3, dirty.ErrPageSize},
		{"page size must be a power of two (4095)", 1 << 20, 4095, dirty.ErrPageSize},
		{"empty span", 0, 0, dirty.ErrSpan},
		{"log larger than MaxSize", math.MaxUint64, 4096, dirty.ErrSpan},
		{"log one word larger than MaxSize", (dirty.MaxSize*8 + 64) * 4096, 4096, dirty.ErrSpan},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := dirty.New(c.span, &dirty.Options{PageSize: c.ps})
			require.ErrorIs(t, err, c.want)
		})
	}
}

func TestAttach(t *testing.T) {
	host, err := dirty.New(1<<20, nil) // 32 bytes of aligned memory
	require.NoError(t, err)
	mem := host.Bytes()

	t.Run("span 0 takes all the memory describes", func(t *testing.T) {
		b, err := dirty.Attach(mem, 0, nil)
		require.NoError(t, err)
		assert.Equal(t, uint64(4*64*4096), b.Span())
		assert.Equal(t, 32, b.Size())
		assert.Equal(t, host.Addr(), b.Addr())
	})
	t.Run("attached bitmap shares memory both ways", func(t *testing.T) {
		b, err := dirty.Attach(mem, 1<<20, nil)
		require.NoError(t, err)
		require.NoError(t, b.Mark(0x5000, 1))
		assert.True(t, host.PageDirty(5))
		require.NoError(t, host.Mark(0x9000, 1))
		assert.Equal(t, []uint64{5, 9}, collect(b))
	})
	t.Run("existing bits are kept", func(t *testing.T) {
		b, err := dirty.Attach(mem, 0, nil)
		require.NoError(t, err)
		assert.Equal(t, []uint64{5, 9}, collect(b))
		require.NoError(t, b.Close())
		assert.Equal(t, []uint64{5, 9}, collect(host), "Close of an attached bitmap leaves the memory alone")
	})
	rejects := []struct {
		name string
		mem  []byte
		span uint64
		ps   uint64
		want error
	}{
		{"memory shorter than the span needs", mem, 1<<20 + 1, 0, dirty.ErrMemory},
		{"memory shorter than one word", mem[:7], 0, 0, dirty.ErrMemory},
		{"nil memory", nil, 0, 0, dirty.ErrMemory},
		{"misaligned memory", mem[4:], 0, 0, dirty.ErrMemory},
		{"page size not a power of two", mem, 0, 6, dirty.ErrPageSize},
	}
	for _, c := range rejects {
		t.Run(c.name, func(t *testing.T) {
			_, err := dirty.Attach(c.mem, c.span, &dirty.Options{PageSize: c.ps})
			require.ErrorIs(t, err, c.want)
		})
	}
}

func TestSharedMemfd(t *testing.T) {
	b, err := dirty.New(1<<30, &dirty.Options{Shared: true, Name: "dirty-test"})
	require.NoError(t, err)
	defer b.Close()
	require.GreaterOrEqual(t, b.Fd(), 0)
	assert.Equal(t, uint64(0), b.FdOffset())
	assert.Equal(t, 32<<10, b.Size())

	var st unix.Stat_t
	require.NoError(t, unix.Fstat(b.Fd(), &st))
	assert.Equal(t, int64(b.Size()), st.Size, "the memfd is exactly the log")
	link, err := os.Readlink("/proc/self/fd/" + itoa(b.Fd()))
	require.NoError(t, err)
	assert.Contains(t, link, "memfd:dirty-test")
	seals, err := unix.FcntlInt(uintptr(b.Fd()), unix.F_GET_SEALS, 0)
	require.NoError(t, err)
	assert.Equal(t, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL, seals&(unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL))

	// A second, independent mapping of the fd (what a peer does) sees our
	// marks, and we see its writes.
	peer, err := unix.Mmap(b.Fd(), 0, b.Size(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(t, err)
	defer unix.Munmap(peer)
	require.NoError(t, b.Mark(100*4096, 1))
	assert.Equal(t, byte(1<<4), peer[12])
	peer[1000] = 0x80 // page 8007
	assert.Equal(t, []uint64{100, 8007}, collect(b))

	fd := b.Fd()
	require.NoError(t, b.Close())
	assert.ErrorIs(t, unix.Fstat(fd, &st), unix.EBADF, "Close closes the memfd")
}

func TestAttachFd(t *testing.T) {
	owner, err := dirty.New(1<<30, &dirty.Options{Shared: true})
	require.NoError(t, err)
	defer owner.Close()

	t.Run("maps the whole log and duplicates the fd", func(t *testing.T) {
		b, err := dirty.AttachFd(owner.Fd(), 0, uint64(owner.Size()), nil)
		require.NoError(t, err)
		assert.NotEqual(t, owner.Fd(), b.Fd())
		assert.Equal(t, owner.Span(), b.Span())
		require.NoError(t, b.Mark(0x7000, 0x2000)) // pages 7 and 8
		assert.Equal(t, []uint64{7, 8}, collect(owner))
		require.NoError(t, b.Close())
		var st unix.Stat_t
		require.NoError(t, unix.Fstat(owner.Fd(), &st), "the caller's fd stays open")
		_, err = owner.Harvest(mustNew(t, owner.Span()))
		require.NoError(t, err)
	})
	t.Run("offset that is not page aligned", func(t *testing.T) {
		// mmap_offset 8192+24: the log starts at word 3 of page 2 of the fd.
		b, err := dirty.AttachFd(owner.Fd(), 8192+24, 64, nil)
		require.NoError(t, err)
		defer b.Close()
		assert.Equal(t, uint64(8192+24), b.FdOffset())
		assert.Equal(t, uint64(8*64*4096), b.Span())
		require.NoError(t, b.Mark(0, 1))
		pages := collect(owner)
		assert.Equal(t, []uint64{(8192 + 24) * 8}, pages)
	})
	t.Run("huge pages: the span caps at 2^64-1", func(t *testing.T) {
		b, err := dirty.AttachFd(owner.Fd(), 0, 16, &dirty.Options{PageSize: 1 << 63})
		require.NoError(t, err)
		defer b.Close()
		assert.Equal(t, uint64(math.MaxUint64), b.Span())
		assert.Equal(t, uint64(2), b.NumPages())
		assert.Equal(t, 1, b.Words(), "only the words the span needs")
		owner.Bytes()[0] = 0xff // pages 0..7 of the attached log: 2..7 are slack
		assert.Equal(t, []uint64{0, 1}, collect(b))
		_, err = owner.HarvestWords(make([]uint64, owner.Words()))
		require.NoError(t, err)
	})
	rejects := []struct {
		name         string
		offset, size uint64
		want         error
	}{
		{"size past the end of the file", 0, uint64(owner.Size()) + 8, dirty.ErrMemory},
		{"offset past the end of the file", uint64(owner.Size()), 8, dirty.ErrMemory},
		{"size less than one word", 0, 7, dirty.ErrMemory},
		{"misaligned offset", 4, 8, dirty.ErrMemory},
		{"size over MaxSize", 0, dirty.MaxSize + 8, dirty.ErrMemory},
		{"offset near 2^64", math.MaxUint64 - 7, 8, dirty.ErrMemory},
	}
	for _, c := range rejects {
		t.Run(c.name, func(t *testing.T) {
			_, err := dirty.AttachFd(owner.Fd(), c.offset, c.size, nil)
			require.ErrorIs(t, err, c.want)
		})
	}
	t.Run("bad fd", func(t *testing.T) {
		_, err := dirty.AttachFd(-1, 0, 8, nil)
		require.ErrorIs(t, err, unix.EBADF)
		var op *dirty.OpError
		require.ErrorAs(t, err, &op)
		assert.Equal(t, "fstat", op.Op)
	})
}

func mustNew(t testing.TB, span uint64) *dirty.Bitmap {
	b, err := dirty.New(span, nil)
	require.NoError(t, err)
	return b
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var buf [20]byte
	i := len(buf)
	for ; n > 0; n /= 10 {
		i--
		buf[i] = byte('0' + n%10)
	}
	return string(buf[i:])
}

// TestMarkErrors checks the range rules: every page a range touches, nothing
// outside the span, zero length is a no-op, wrapping past 2^64 is reported.
func TestMarkErrors(t *testing.T) {
	const span = 100*4096 + 10 // the last page is partial
	cases := []struct {
		name      string
		addr, len uint64
		wantErr   error
		wraps     bool
		wantPages []uint64
	}{
		{"zero length marks nothing and is not an error", 5 * 4096, 0, nil, false, nil},
		{"zero length outside the span is not an error either", math.MaxUint64, 0, nil, false, nil},
		{"one byte marks its page", 4096*3 + 17, 1, nil, false, []uint64{3}},
		{"range ending at a page boundary stays in its page", 4096, 4096, nil, false, []uint64{1}},
		{"range crossing a boundary by one byte marks both", 4095, 2, nil, false, []uint64{0, 1}},
		{"last byte of the span", span - 1, 1, nil, false, []uint64{100}},
		{"range up to the end of the span", span - 20, 20, nil, false, []uint64{99, 100}},
		{"first byte past the span", span, 1, dirty.ErrOutOfSpan, false, nil},
		{"range one byte too long", span - 20, 21, dirty.ErrOutOfSpan, false, nil},
		{"inside the last page but past the span", span + 1, 1, dirty.ErrOutOfSpan, false, nil},
		{"range ending exactly at 2^64 is out of span, not wrapped", math.MaxUint64 - 9, 10, dirty.ErrOutOfSpan, false, nil},
		{"range wrapping past 2^64", math.MaxUint64 - 9, 11, dirty.ErrAddrOverflow, true, nil},
		{"range starting in span wrapping past 2^64", 4096, math.MaxUint64, dirty.ErrAddrOverflow, true, nil},
		{"maximal length from 0 is out of span", 0, math.MaxUint64, dirty.ErrOutOfSpan, false, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := mustNew(t, span)
			err := b.Mark(c.addr, c.len)
			if c.wantErr == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, c.wantErr)
				require.ErrorIs(t, err, dirty.ErrOutOfSpan, "every rejected range is out of span")
				var re *dirty.RangeError
				require.ErrorAs(t, err, &re)
				assert.Equal(t, c.addr, re.Addr)
				assert.Equal(t, c.len, re.Len)
				assert.Equal(t, uint64(span), re.Span)
				assert.Equal(t, c.wraps, re.Wraps())
				assert.Equal(t, c.wraps, errors.Is(err, dirty.ErrAddrOverflow))
				assert.Contains(t, err.Error(), "0x")
			}
			assert.Equal(t, c.wantPages, collect(b))
			// LogWrite is the same operation.
			b2 := mustNew(t, span)
			err2 := b2.LogWrite(c.addr, c.len)
			assert.Equal(t, err == nil, err2 == nil)
			assert.Equal(t, c.wantPages, collect(b2))
		})
	}
}

func TestClosed(t *testing.T) {
	b := mustNew(t, 1<<20)
	other := mustNew(t, 1<<20)
	require.NoError(t, b.Mark(0, 1))
	require.NoError(t, b.Close())
	require.ErrorIs(t, b.Close(), dirty.ErrClosed)
	require.ErrorIs(t, b.Mark(0, 1), dirty.ErrClosed)
	require.ErrorIs(t, b.LogWrite(4096, 4096), dirty.ErrClosed)
	_, err := b.Harvest(other)
	require.ErrorIs(t, err, dirty.ErrClosed)
	_, err = other.Harvest(b)
	require.ErrorIs(t, err, dirty.ErrClosed)
	_, err = b.HarvestWords(make([]uint64, 4))
	require.ErrorIs(t, err, dirty.ErrClosed)
	require.ErrorIs(t, b.Union(other), dirty.ErrClosed)
	require.ErrorIs(t, other.Union(b), dirty.ErrClosed)
	require.ErrorIs(t, b.UnionWords(nil), dirty.ErrClosed)
	require.ErrorIs(t, b.Clear(), dirty.ErrClosed)
	assert.Zero(t, b.Count())
	assert.Empty(t, collect(b))
	assert.False(t, b.PageDirty(0))
	assert.Zero(t, b.Addr())
	assert.Nil(t, b.Bytes())

	// A nil bitmap (a typed nil in a WriteLogger, or a nil argument) fails
	// like a closed one instead of panicking.
	var null *dirty.Bitmap
	require.ErrorIs(t, null.LogWrite(0, 1), dirty.ErrClosed)
	_, err = other.Harvest(null)
	require.ErrorIs(t, err, dirty.ErrClosed)
	require.ErrorIs(t, other.Union(null), dirty.ErrClosed)
}

func TestGeometryMismatch(t *testing.T) {
	src := mustNew(t, 1<<20)
	require.NoError(t, src.Mark(0, 1))
	small := mustNew(t, 1<<19)
	big2M, err := dirty.New(1<<30, &dirty.Options{PageSize: 2 << 20})
	require.NoError(t, err)

	_, err = src.Harvest(small)
	require.ErrorIs(t, err, dirty.ErrGeometry)
	_, err = src.Harvest(big2M)
	require.ErrorIs(t, err, dirty.ErrGeometry)
	_, err = src.Harvest(src)
	require.ErrorIs(t, err, dirty.ErrGeometry)
	_, err = src.HarvestWords(make([]uint64, src.Words()-1))
	require.ErrorIs(t, err, dirty.ErrGeometry)
	require.NoError(t, src.Mark(200*dirty.DefaultPageSize, 1)) // past small's 128 pages
	require.ErrorIs(t, small.Union(src), dirty.ErrGeometry)
	assert.Empty(t, collect(small), "a refused union merges nothing")
	require.NoError(t, src.Clear())
	require.NoError(t, src.Mark(0, 1))
	require.ErrorIs(t, src.Union(big2M), dirty.ErrGeometry)
	require.ErrorIs(t, src.UnionWords(make([]uint64, src.Words()+1)), dirty.ErrGeometry)
	assert.Equal(t, []uint64{0}, collect(src), "failed operations leave the source alone")
	assert.Contains(t, (&dirty.GeometryError{Op: "harvest", Reason: "x"}).Error(), "harvest")

	// A bigger destination is fine: a harvest goes into the low pages.
	big := mustNew(t, 1<<30)
	n, err := src.Harvest(big)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n)
	assert.Equal(t, []uint64{0}, collect(big))
}

// TestUnionFromLargerSource: a source may cover more pages than the
// destination when none of those is marked (a pending log sized for a
// memory table, merged into a log that covers every page written); a mark
// past the destination's pages refuses the union before anything is merged.
// Table rows cover a destination ending mid-word and on a word boundary,
// private and shared sources.
func TestUnionFromLargerSource(t *testing.T) {
	const pg = dirty.DefaultPageSize
	for _, tc := range []struct {
		name      string
		dstPages  uint64
		srcPages  uint64
		shared    bool
		marks     []uint64 // pages marked in the source
		wantError bool
	}{
		{"clean excess, destination mid-word", 100, 1000, false, []uint64{0, 63, 64, 99}, false},
		{"clean excess, destination on a word boundary", 128, 1 << 16, false, []uint64{1, 127}, false},
		{"clean excess, shared source", 100, 1 << 20, true, []uint64{5, 99}, false},
		{"mark just past a destination ending mid-word", 100, 1000, false, []uint64{3, 100}, true},
		{"mark just past a word-boundary destination", 128, 1000, false, []uint64{3, 128}, true},
		{"mark far past, shared source", 100, 1 << 20, true, []uint64{3, 1<<20 - 1}, true},
		{"equal sizes", 100, 100, false, []uint64{0, 99}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := mustNew(t, tc.dstPages*pg)
			defer dst.Close()
			src, err := dirty.New(tc.srcPages*pg, &dirty.Options{Shared: tc.shared})
			require.NoError(t, err)
			defer src.Close()
			require.NoError(t, dst.Mark(50*pg, 1))
			for _, p := range tc.marks {
				require.NoError(t, src.Mark(p*pg, 1))
			}
			err = dst.Union(src)
			if tc.wantError {
				require.ErrorIs(t, err, dirty.ErrGeometry)
				assert.Equal(t, []uint64{50}, collect(dst), "a refused union merges nothing")
			} else {
				require.NoError(t, err)
				want := append([]uint64{50}, tc.marks...)
				slices.Sort(want)
				assert.Equal(t, slices.Compact(want), collect(dst))
			}
			assert.Equal(t, tc.marks, collect(src), "the source is left as it was")
		})
	}
}

// TestSlackBits checks that bits past NumPages in the last word (a peer
// writing outside the span) never surface as pages.
func TestSlackBits(t *testing.T) {
	b := mustNew(t, 10*4096) // pages 0..9; bits 10..63 of word 0 are slack
	mem := b.Bytes()
	mem[0] = 0x01 // page 0
	mem[1] = 0xfc // slack bits 10..15
	mem[7] = 0x80 // slack bit 63
	assert.Equal(t, uint64(1), b.Count())
	assert.Equal(t, []uint64{0}, collect(b))
	assert.False(t, b.PageDirty(10))
	assert.False(t, b.PageDirty(63))
	var runs [][2]uint64
	for f, n := range b.DirtyRuns() {
		runs = append(runs, [2]uint64{f, n})
	}
	assert.Equal(t, [][2]uint64{{0, 1}}, runs)

	words := make([]uint64, 1)
	n, err := b.HarvestWords(words)
	require.NoError(t, err)
	assert.Equal(t, uint64(1), n)
	assert.Equal(t, []uint64{1}, words)
	assert.Equal(t, make([]byte, 8), mem, "harvest clears the whole word, slack included")

	require.ErrorIs(t, b.UnionWords([]uint64{1 << 10}), dirty.ErrGeometry)
	require.NoError(t, b.UnionWords([]uint64{1<<9 | 1}))
	assert.Equal(t, []uint64{0, 9}, collect(b))
}

func TestPageHelpers(t *testing.T) {
	b, err := dirty.New(1<<30, &dirty.Options{PageSize: 64 << 10})
	require.NoError(t, err)
	assert.Equal(t, uint64(3), b.PageOf(3*65536+65535))
	assert.Equal(t, uint64(3*65536), b.PageAddr(3))
	assert.False(t, b.PageDirty(b.NumPages()), "page past the span")
	require.NoError(t, b.Mark(b.Span()-1, 1))
	assert.True(t, b.PageDirty(b.NumPages()-1))
}

// TestAttachFdHostilePeer checks what a peer's fd can and cannot do to us.
func TestAttachFdHostilePeer(t *testing.T) {
	t.Run("a shrinkable memfd is sealed against shrinking", func(t *testing.T) {
		fd, err := unix.MemfdCreate("peer-log", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		require.NoError(t, err)
		defer unix.Close(fd)
		require.NoError(t, unix.Ftruncate(fd, 4096))
		b, err := dirty.AttachFd(fd, 0, 4096, nil)
		require.NoError(t, err)
		defer b.Close()
		// The peer now tries to pull the memory from under our mapping.
		require.ErrorIs(t, unix.Ftruncate(fd, 0), unix.EPERM)
		require.NoError(t, b.Mark(0, 1))
	})
	t.Run("a memfd that cannot be sealed is still size-checked", func(t *testing.T) {
		fd, err := unix.MemfdCreate("peer-log", unix.MFD_CLOEXEC) // F_SEAL_SEAL set
		require.NoError(t, err)
		defer unix.Close(fd)
		require.NoError(t, unix.Ftruncate(fd, 4096))
		_, err = dirty.AttachFd(fd, 0, 8192, nil)
		require.ErrorIs(t, err, dirty.ErrMemory)
		b, err := dirty.AttachFd(fd, 0, 4096, nil)
		require.NoError(t, err)
		require.NoError(t, b.Close())
	})
	t.Run("a log larger than a 32-bit address space", func(t *testing.T) {
		// 4 GiB and a word of file (sparse: no memory), one word if the
		// size were truncated to 32 bits. 64-bit maps it all; 32-bit
		// refuses it instead of mapping the wrong length.
		const size = 1<<32 + 8
		fd, err := unix.MemfdCreate("peer-log", unix.MFD_CLOEXEC)
		require.NoError(t, err)
		defer unix.Close(fd)
		require.NoError(t, unix.Ftruncate(fd, size))
		b, err := dirty.AttachFd(fd, 0, size, nil)
		if strconv.IntSize == 32 {
			require.ErrorIs(t, err, dirty.ErrMemory)
			return
		}
		require.NoError(t, err)
		defer b.Close()
		assert.Equal(t, uint64(size), uint64(b.Size()))
		require.NoError(t, b.Mark(b.Span()-1, 1))
		assert.True(t, b.PageDirty(b.NumPages()-1))
	})
	t.Run("an fd that cannot be mapped", func(t *testing.T) {
		p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		require.NoError(t, err)
		defer unix.Close(p[0])
		defer unix.Close(p[1])
		_, err = dirty.AttachFd(p[0], 0, 4096, nil)
		var op *dirty.OpError
		require.ErrorAs(t, err, &op)
		assert.Equal(t, "mmap", op.Op)
		assert.ErrorIs(t, err, unix.ENODEV)
	})
	t.Run("a read-only fd", func(t *testing.T) {
		owner, err := dirty.New(1<<20, &dirty.Options{Shared: true})
		require.NoError(t, err)
		defer owner.Close()
		ro, err := unix.Open("/proc/self/fd/"+itoa(owner.Fd()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		require.NoError(t, err)
		defer unix.Close(ro)
		_, err = dirty.AttachFd(ro, 0, uint64(owner.Size()), nil)
		require.ErrorIs(t, err, unix.EACCES)
	})
}

// TestIteratorsStopEarly checks that breaking out of a range loop stops the
// iterators (a yield after false would panic).
func TestIteratorsStopEarly(t *testing.T) {
	b := mustNew(t, 1<<30)
	for _, r := range [][2]uint64{{0, 1}, {62, 70}, {200, 1}, {1000, 64}, {5000, 3}} {
		require.NoError(t, b.Mark(r[0]*4096, r[1]*4096))
	}
	var pages []uint64
	for p := range b.DirtyPages() {
		if len(pages) == 3 {
			break
		}
		pages = append(pages, p)
	}
	assert.Equal(t, []uint64{0, 62, 63}, pages)
	var runs [][2]uint64
	for f, n := range b.DirtyRuns() {
		runs = append(runs, [2]uint64{f, n})
		if len(runs) == 3 {
			break
		}
	}
	assert.Equal(t, [][2]uint64{{0, 1}, {62, 70}, {200, 1}}, runs)
	runs = runs[:0]
	for f, n := range b.DirtyRuns() {
		runs = append(runs, [2]uint64{f, n})
	}
	assert.Equal(t, [][2]uint64{{0, 1}, {62, 70}, {200, 1}, {1000, 64}, {5000, 3}}, runs)
}
