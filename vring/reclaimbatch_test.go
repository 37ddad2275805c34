package vring

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

// twinDrivers are two driver queues on two memories that are given the
// same operations: one reclaims with Reclaim, the other with ReclaimBatch.
type twinDrivers struct {
	regs [2]*Region
	drvs [2]*DriverQueue
	devs [2]*DeviceQueue // packed: the device side that uses the chains
	l    Layout
}

func newTwinDrivers(t *testing.T, feat virtio.Features) *twinDrivers {
	var tw twinDrivers
	const size = 8
	tw.l = ContiguousLayout(rawRingAt, size)
	if isPacked(feat) {
		tw.l = ContiguousPackedLayout(rawRingAt, size)
	}
	for i := range tw.drvs {
		reg, err := NewMemfdRegion(0, rawMem, nil)
		require.NoError(t, err)
		mem, err := NewMemory(reg)
		require.NoError(t, err)
		t.Cleanup(func() { mem.Close() })
		tw.regs[i] = reg
		tw.drvs[i], err = NewDriverQueue(mem, DriverQueueOptions{Index: 2, Layout: tw.l, Features: feat})
		require.NoError(t, err)
		if isPacked(feat) {
			tw.devs[i], err = NewDeviceQueue(mem, DeviceQueueOptions{Index: 2, Layout: tw.l, Features: feat, State: InitialState(feat)})
			require.NoError(t, err)
		}
	}
	return &tw
}

// sameErr reports whether two errors are alike: both nil, or the same
// sentinel at the same ring index.
func sameErr(t *testing.T, a, b error, msg string) {
	t.Helper()
	if a == nil || b == nil {
		require.Equal(t, a == nil, b == nil, "%s: %v vs %v", msg, a, b)
		return
	}
	for _, s := range []error{ErrUsedIDNotOutstanding, ErrUsedLenTooLarge, ErrUsedIdxJump, ErrQueueBroken} {
		require.Equal(t, errors.Is(a, s), errors.Is(b, s), "%s: %v vs %v", msg, a, b)
	}
	var qa, qb *QueueError
	if errors.As(a, &qa) {
		require.ErrorAs(t, b, &qb, msg)
		require.Equal(t, qa.Index, qb.Index, msg)
		require.Equal(t, qa.Queue, qb.Queue, msg)
	}
}

// TestReclaimBatchAgreesWithReclaim runs random traffic through twin
// queues, the device using chains in any order and, on split rings, now
// and then breaking a rule (a used id not outstanding or out of range, a
// length beyond the chain's writable bytes, used.idx running ahead):
// ReclaimBatch, in batches of random sizes, must take the same entries as
// Reclaim one at a time, fail the same way at the same entry, and leave
// the queue, its free descriptors and used_event the same.
func TestReclaimBatchAgreesWithReclaim(t *testing.T) {
	for _, packed := range []bool{false, true} {
		name := map[bool]string{false: "split", true: "packed"}[packed]
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(31, uint64(len(name))))
			broken, entries := 0, 0
			for iter := 0; iter < 400; iter++ {
				feat := virtio.Features(0)
				if rng.IntN(2) == 0 {
					feat = feat.With(virtio.FEventIdx)
				}
				if packed {
					feat = feat.With(virtio.FRingPacked)
				}
				tw := newTwinDrivers(t, feat)
				if rng.IntN(3) == 0 {
					for _, d := range tw.drvs {
						d.DisableInterrupts()
					}
				}
				type chain struct {
					head     uint16
					writable uint32
				}
				var out []chain
				var usedIdx uint16
				for round := 0; round < 30; round++ {
					// The driver adds a few chains and publishes them.
					for k := rng.IntN(4); k > 0; k-- {
						n := 1 + rng.IntN(3)
						if tw.drvs[0].NumFree() < n {
							break
						}
						bufs := make([]Buffer, n)
						var w uint32
						for j := range bufs {
							bufs[j] = Buffer{Addr: GuestAddr(rawData + 0x100*j), Len: uint32(1 + rng.IntN(64)), Writable: j == n-1}
							if bufs[j].Writable {
								w += bufs[j].Len
							}
						}
						var heads [2]uint16
						for i, d := range tw.drvs {
							h, err := d.Add(bufs)
							require.NoError(t, err)
							heads[i] = h
						}
						require.Equal(t, heads[0], heads[1])
						out = append(out, chain{heads[0], w})
					}
					for _, d := range tw.drvs {
						d.Publish()
					}
					// The device uses some of them, in any order.
					m := rng.IntN(len(out) + 1)
					rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
					if packed {
						lens := make([]uint32, m)
						for i, u := range out[:m] {
							lens[i] = uint32(rng.IntN(int(u.writable) + 1))
						}
						for _, dev := range tw.devs {
							for {
								var c Chain
								ok, err := dev.Pop(&c)
								require.NoError(t, err)
								if !ok {
									break
								}
							}
							for i, u := range out[:m] {
								require.NoError(t, dev.Push(u.head, lens[i]))
							}
						}
					} else {
						for _, u := range out[:m] {
							id, n := uint32(u.head), uint32(rng.IntN(int(u.writable)+1))
							switch rng.IntN(400) {
							case 0:
								id = uint32(8 + rng.IntN(1<<20))
							case 1:
								id = uint32(rng.IntN(8)) // maybe not outstanding
							case 2:
								n = u.writable + 1
							}
							for _, reg := range tw.regs {
								forgeUsed(reg.Bytes(), tw.l, int(usedIdx%8), id, n, usedIdx+1)
							}
							usedIdx++
						}
						if rng.IntN(300) == 0 {
							for _, reg := range tw.regs {
								binary.LittleEndian.PutUint16(reg.Bytes()[int(tw.l.Used)+2:], usedIdx+9)
							}
						}
					}
					out = out[m:]
					// Reclaim one at a time, and in batches.
					var one, many []UsedElem
					var err1, err2 error
					for {
						h, n, ok, err := tw.drvs[0].Reclaim()
						if err != nil {
							err1 = err
							break
						}
						if !ok {
							break
						}
						one = append(one, UsedElem{h, n})
					}
					buf := make([]UsedElem, 5)
					for {
						k := 1 + rng.IntN(len(buf))
						n, err := tw.drvs[1].ReclaimBatch(buf[:k])
						many = append(many, buf[:n]...)
						if err != nil {
							err2 = err
							break
						}
						if n < k {
							break
						}
					}
					require.Equal(t, one, many, "iteration %d round %d", iter, round)
					entries += len(one)
					sameErr(t, err1, err2, "reclaim error")
					require.Equal(t, tw.drvs[0].NumFree(), tw.drvs[1].NumFree())
					require.Equal(t, tw.drvs[0].Outstanding(), tw.drvs[1].Outstanding())
					ev := int(tw.l.Avail) + 4 + 2*8 // split: used_event; packed: the driver event word
					if packed {
						ev = int(tw.l.Avail)
					}
					require.Equal(t, tw.regs[0].Bytes()[ev:ev+4], tw.regs[1].Bytes()[ev:ev+4], "used_event / driver event")
					if err1 != nil {
						broken++
						// Broken queues stay broken, alike, for an empty
						// batch too.
						_, err := tw.drvs[1].ReclaimBatch(buf)
						require.ErrorIs(t, err, ErrQueueBroken)
						_, err = tw.drvs[1].ReclaimBatch(buf[:0])
						require.ErrorIs(t, err, ErrQueueBroken)
						break
					}
				}
			}
			if !packed {
				require.NotZero(t, broken, "no iteration broke a rule")
			}
			t.Logf("%d entries reclaimed alike; %d iterations ended on a broken rule", entries, broken)
		})
	}
}
