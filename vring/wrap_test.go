package vring

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestWraparoundTinyRings drives rings of size 2 and 4 through more than two
// 16-bit index wraparounds (and thousands of ring wraparounds) with random
// interleavings of add, publish, pop, push and reclaim, checking every chain
// against a FIFO model.
func TestWraparoundTinyRings(t *testing.T) {
	for _, size := range []uint16{2, 4} {
		for _, feat := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx, virtio.FIndirectDesc)} {
			t.Run(fmtName(size, feat), func(t *testing.T) {
				mem, drv, dev := newPair(t, size, feat)
				rng := rand.New(rand.NewPCG(uint64(size), 1))
				type rec struct {
					head uint16
					addr GuestAddr
				}
				var added, popped []rec // FIFO models
				var chains []Chain
				var elems []UsedElem
				const total = 140_000 // > 2 * 65536
				next := 0
				reclaimed := 0
				for reclaimed < total {
					switch rng.IntN(5) {
					case 0, 1: // add
						if next == total {
							continue
						}
						addr := GuestAddr(0x100000 + 8*(next%1024))
						bufs := []Buffer{{Addr: addr, Len: 8, Writable: true}}
						var h uint16
						var err error
						if feat.Has(virtio.FIndirectDesc) && next%2 == 1 {
							h, err = drv.AddIndirect(GuestAddr(0x300000+16*(next%1024)), bufs)
						} else {
							h, err = drv.Add(bufs)
						}
						if err != nil {
							if !errors.Is(err, ErrNoSpace) {
								t.Fatal(err)
							}
							continue
						}
						added = append(added, rec{h, addr})
						next++
					case 2:
						drv.Publish()
						drv.NeedsKick()
					case 3: // pop a random batch and push it
						cs := chains[:0]
						for range 1 + rng.IntN(int(size)) {
							var c Chain
							ok, err := dev.Pop(&c)
							if err != nil {
								t.Fatal(err)
							}
							if !ok {
								break
							}
							if len(added) == 0 {
								t.Fatal("popped a chain that was never added")
							}
							want := added[0]
							added = added[1:]
							if want.head != c.Head || want.addr != c.Segs[0].Addr {
								t.Fatalf("popped head %d addr %v, want %d %v", c.Head, c.Segs[0].Addr, want.head, want.addr)
							}
							cs = append(cs, c)
							popped = append(popped, want)
						}
						elems = elems[:0]
						for i, c := range cs {
							elems = append(elems, UsedElem{c.Head, uint32(i % 9)})
						}
						if err := dev.PushBatch(elems); err != nil {
							t.Fatal(err)
						}
						dev.NeedsInterrupt()
					case 4: // reclaim
						for {
							h, _, ok, err := drv.Reclaim()
							if err != nil {
								t.Fatal(err)
							}
							if !ok {
								break
							}
							if popped[0].head != h {
								t.Fatalf("reclaimed %d, want %d", h, popped[0].head)
							}
							popped = popped[1:]
							reclaimed++
						}
					}
				}
				require.Equal(t, int(size), drv.NumFree())
				st := dev.State()
				require.Equal(t, uint16(total%65536), st.NextAvail)
				require.Equal(t, uint16(total%65536), st.NextUsed)
				_ = mem
			})
		}
	}
}

func fmtName(size uint16, f virtio.Features) string {
	s := "size" + itoa(int(size))
	if f.Has(virtio.FEventIdx) {
		s += "_eventidx_indirect"
	}
	return s
}

// TestHotPathsDoNotAllocate asserts zero allocations per operation in
// steady state for pop, push, batch pop/push, add, publish, kick and reclaim
// (one at a time and in batches).
func TestHotPathsDoNotAllocate(t *testing.T) {
	for _, feat := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx)} {
		_, drv, dev := newPair(t, 64, feat)
		dev.log = &nopLog{}
		bufs := []Buffer{{Addr: 0x100000, Len: 64}, {Addr: 0x100100, Len: 64, Writable: true}}
		cs := make([]Chain, 8)
		elems := make([]UsedElem, 8)
		round := func() {
			for range 8 {
				if _, err := drv.Add(bufs); err != nil {
					t.Fatal(err)
				}
			}
			drv.Publish()
			drv.NeedsKick()
			var c Chain = cs[0]
			if ok, err := dev.Pop(&c); !ok || err != nil {
				t.Fatal(ok, err)
			}
			cs[0] = c
			if err := dev.PushChain(&cs[0], 10); err != nil {
				t.Fatal(err)
			}
			n, err := dev.PopBatch(cs[1:])
			if n != 7 || err != nil {
				t.Fatal(n, err)
			}
			for i := range n {
				elems[i] = UsedElem{cs[1+i].Head, 1}
			}
			if err := dev.PushBatch(elems[:n]); err != nil {
				t.Fatal(err)
			}
			dev.NeedsInterrupt()
			for range 4 {
				if _, _, ok, err := drv.Reclaim(); !ok || err != nil {
					t.Fatal(ok, err)
				}
			}
			if n, err := drv.ReclaimBatch(elems[:4]); n != 4 || err != nil {
				t.Fatal(n, err)
			}
			if n, err := drv.ReclaimBatch(elems); n != 0 || err != nil {
				t.Fatal(n, err)
			}
			drv.Reclaim()
			dev.Pop(&cs[0])
		}
		round() // grow Chain.Segs once
		require.Zero(t, testing.AllocsPerRun(100, round))
	}
}

type nopLog struct{ n uint64 }

func (l *nopLog) LogWrite(addr, n uint64) error { l.n += n; return nil }
