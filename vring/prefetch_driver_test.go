package vring

import (
	"math/rand/v2"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// driverPrefetch is one request prefetchTrace saw.
type driverPrefetch struct {
	used     bool
	addr     HostAddr
	n, lines int
}

// expectedUsedPrefetch is what ReclaimBatch should ask for of the used
// ring when it goes on to read n entries from index from (mod size): one
// request per piece up to the ring's end and from 0, each with the lines
// its bytes touch counted byte by byte, and nothing when all of them lie in
// one line.
// used is the used ring's area as the test's own Memory gives it.
func expectedUsedPrefetch(used []byte, size int, from uint16, n int) []driverPrefetch {
	host := uint64(hostAddrOf(used))
	var out []driverPrefetch
	all := map[uint64]bool{}
	first := int(from) % size
	for n > 0 {
		k := min(n, size-first)
		lines := map[uint64]bool{}
		for e := first; e < first+k; e++ {
			for b := uint64(0); b < 8; b++ {
				a := host + 4 + 8*uint64(e) + b
				lines[a/64] = true
				all[a/64] = true
			}
		}
		out = append(out, driverPrefetch{true, HostAddr(host + 4 + 8*uint64(first)), k, len(lines)})
		n -= k
		first = 0
	}
	if len(all) < 2 {
		return nil
	}
	return out
}

// TestReclaimBatchPrefetchTargets drives random traffic (chains of one to
// three buffers, used out of order, reclaimed in random batch sizes, with
// and without EVENT_IDX and interrupts) and checks what each ReclaimBatch
// asks for: the used entries it reads after loading used.idx, as
// expectedUsedPrefetch counts them, and the descriptor of every chain it
// frees, the same heads it returns, in order.
func TestReclaimBatchPrefetchTargets(t *testing.T) {
	for _, tc := range []struct {
		name string
		feat virtio.Features
		size uint16
		intr bool
		// used4: the used ring 4 bytes past a line (its alignment allows
		// that), so that some runs of entries end exactly at a line's end.
		used4 bool
	}{
		{"size16", 0, 16, false, false},
		{"size256", 0, 256, false, false},
		{"size16_event_idx_interrupts", virtio.Features(0).With(virtio.FEventIdx), 16, true, false},
		{"size64_event_idx", virtio.Features(0).With(virtio.FEventIdx), 64, false, false},
		{"size16_used_4_past_a_line", 0, 16, false, true},
		// The whole used ring in one line: a run that wraps is not
		// asked for either.
		{"size4", 0, 4, false, false},
		{"size128_used_4_past_a_line", virtio.Features(0).With(virtio.FEventIdx), 128, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := ContiguousLayout(0x1000, tc.size)
			if tc.used4 {
				l.Used = 0x20004
			}
			r, err := NewMemfdRegion(0, 4<<20, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			t.Cleanup(func() { mem.Close() })
			drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: tc.feat})
			require.NoError(t, err)
			dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: tc.feat})
			require.NoError(t, err)
			if !tc.intr {
				drv.DisableInterrupts()
			}
			usedArea, err := mem.Slice(l.Used, 4+8*uint64(tc.size))
			require.NoError(t, err)
			descArea, err := mem.Slice(l.Desc, 16*uint64(tc.size))
			require.NoError(t, err)
			got := []driverPrefetch{}
			drv.prefetchTrace = func(used bool, addr HostAddr, n, lines int) {
				got = append(got, driverPrefetch{used, addr, n, lines})
			}
			rng := rand.New(rand.NewPCG(uint64(tc.size), 7))
			var popped []Chain
			out := make([]UsedElem, tc.size)
			usedPrefetches, wrapped, descs := 0, 0, 0
			for step := 0; step < 3000; step++ {
				// The driver adds a few chains, the device pops them.
				for range rng.IntN(8) {
					nb := 1 + rng.IntN(3)
					if drv.NumFree() < nb {
						break
					}
					bufs := make([]Buffer, nb)
					for i := range bufs {
						bufs[i] = Buffer{Addr: GuestAddr(0x100000 + 0x1000*i), Len: 64, Writable: i == nb-1}
					}
					_, err := drv.Add(bufs)
					require.NoError(t, err)
				}
				drv.Publish()
				for {
					var c Chain
					ok, err := dev.Pop(&c)
					require.NoError(t, err)
					if !ok {
						break
					}
					popped = append(popped, c)
				}
				// The device uses some of them, in random order.
				rng.Shuffle(len(popped), func(i, j int) { popped[i], popped[j] = popped[j], popped[i] })
				k := rng.IntN(len(popped) + 1)
				for _, c := range popped[:k] {
					require.NoError(t, dev.Push(c.Head, 0))
				}
				popped = popped[k:]
				// The driver reclaims a batch of random size.
				m := 1 + rng.IntN(len(out))
				known := int(drv.usedSeen - drv.lastUsed)
				pushed := int(dev.usedIdx - drv.lastUsed)
				got = got[:0]
				n, err := drv.ReclaimBatch(out[:m])
				require.NoError(t, err)
				require.Equal(t, min(m, pushed), n)
				// The entries known before the call are reclaimed first
				// (and their descriptors asked for), then used.idx is
				// loaded and the entries the batch still takes are asked
				// for before they are read.
				want := []driverPrefetch{}
				for i, e := range out[:n] {
					if i == min(known, m) {
						want = append(want, expectedUsedPrefetch(usedArea, int(tc.size), drv.lastUsed-uint16(n-i), min(pushed, m)-i)...)
					}
					if hasPrefetchW { // without it no descriptor is asked for
						want = append(want, driverPrefetch{false, hostAddrOf(descArea) + HostAddr(16*int(e.Head)), 1, 1})
					}
				}
				require.Equal(t, want, got, "step %d: batch of %d, %d known, %d pushed", step, m, known, pushed)
				for i, p := range want {
					if p.used {
						usedPrefetches++
						if i+1 < len(want) && want[i+1].used { // across the ring's end
							wrapped++
						}
					} else {
						descs++
					}
				}
			}
			// The random traffic reached each case.
			if tc.size > 4 {
				require.Positive(t, usedPrefetches)
				require.Positive(t, wrapped)
			} else {
				require.Zero(t, usedPrefetches, "a ring in one line")
			}
			if hasPrefetchW {
				require.Positive(t, descs)
			}
		})
	}
}

// TestPrefetchDescsWStaysInItsElements runs prefetchDescsW over element
// arrays that end exactly at an inaccessible page: an assembly loop that
// read one element too many, or stepped by the wrong size, would fault.
// (What it prefetches cannot be observed; the layouts it relies on are
// asserted at compile time in prefetch_asm.go.)
func TestPrefetchDescsWStaysInItsElements(t *testing.T) {
	page := unix.Getpagesize()
	m, err := unix.Mmap(-1, 0, 2*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Munmap(m) })
	require.NoError(t, unix.Mprotect(m[page:], unix.PROT_NONE))
	all := unsafe.Slice((*UsedElem)(unsafe.Pointer(&m[0])), page/8) // the first page, as elements
	descs := make([]descEntry, 1<<16)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 2, 3, 31, 32, 33, 255, page / 8} {
		elems := all[len(all)-n:] // ends at the inaccessible page
		for i := range elems {
			elems[i] = UsedElem{Head: uint16(rng.IntN(len(descs))), Len: rng.Uint32()}
		}
		before := append([]UsedElem(nil), elems...)
		prefetchDescsW(&descs[0], &elems[0], n)
		require.Equal(t, before, elems, "n=%d: the elements are only read", n)
	}
	prefetchDescsW(&descs[0], &all[0], 0) // nothing to do
}
