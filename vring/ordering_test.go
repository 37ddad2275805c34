package vring

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/litmus"
	"github.com/vdpakit/vdpakit/virtio"
)

// The notification decisions are the one place where the ring protocol
// needs store->load order (ring.go rule 5): of a device that publishes a
// used entry and then asks NeedsInterrupt, and a driver that re-enables
// interrupts and then looks for used entries (EnableInterrupts), at least
// one must see the other's store, or the driver sleeps on an entry nobody
// interrupts it for. Likewise for a driver's Publish + NeedsKick against a
// device's EnableNotify. The index publication is a release store only (no
// barrier), so this rests on the fence in NeedsInterrupt and NeedsKick:
// without it x86's store buffer lets both sides miss each other. (With the
// fence made a plain load, three runs of these tests here each failed
// some of the cases, split and packed, at 100,000 rounds: which case
// catches it varies from run to run, so all of them run.) The tests run the two sides of each decision on two threads,
// released together by a spin barrier round after round, and check the
// invariant every round: a store-buffering litmus test.

// litmusRounds is how many rounds each case runs.
func litmusRounds() int {
	switch {
	case raceEnabled:
		return 2_000 // the race build publishes with sequentially consistent stores anyway
	case testing.Short():
		return 20_000
	}
	return 100_000
}

type litmusFormat struct {
	name string
	feat virtio.Features
}

var litmusFormats = []litmusFormat{
	{"split flags", 0},
	{"split event idx", virtio.Features(0).With(virtio.FEventIdx)},
	{"packed flags", virtio.Features(0).With(virtio.FRingPacked)},
	{"packed event idx", virtio.Features(0).With(virtio.FRingPacked, virtio.FEventIdx)},
}

// litmusQueues is a driver and a device queue of size 16 (newPair,
// newPackedPair) and a buffer address in their data area.
func litmusQueues(t *testing.T, feat virtio.Features) (*DriverQueue, *DeviceQueue, GuestAddr) {
	t.Helper()
	var drv *DriverQueue
	var dev *DeviceQueue
	if feat.Has(virtio.FRingPacked) {
		_, drv, dev = newPackedPair(t, 16, feat)
	} else {
		_, drv, dev = newPair(t, 16, feat)
	}
	return drv, dev, 0x100000
}

func TestInterruptDecisionNeverMissed(t *testing.T) {
	for _, f := range litmusFormats {
		t.Run(f.name, func(t *testing.T) {
			drv, dev, buf := litmusQueues(t, f.feat)
			dev.DisableNotify()
			rounds := litmusRounds()
			wants := make([]bool, rounds)
			var bar litmus.Barrier
			missed := 0
			device := func() error {
				var c Chain
				for r := range rounds {
					for {
						ok, err := dev.Pop(&c)
						if err != nil {
							return err
						}
						if ok {
							break
						}
						if bar.Aborted() {
							return litmus.ErrAborted
						}
					}
					if err := bar.Await(uint64(2*r + 1)); err != nil {
						return err
					}
					// Publish the used entry, then decide.
					if err := dev.Push(c.Head, 0); err != nil {
						return err
					}
					wants[r] = dev.NeedsInterrupt()
					if err := bar.Await(uint64(2*r + 2)); err != nil {
						return err
					}
				}
				return nil
			}
			driver := func() error {
				for r := range rounds {
					drv.DisableInterrupts()
					if _, err := drv.Add([]Buffer{{Addr: buf, Len: 64, Writable: true}}); err != nil {
						return err
					}
					drv.Publish()
					if err := bar.Await(uint64(2*r + 1)); err != nil {
						return err
					}
					// Re-enable interrupts, then look for used entries.
					pending, err := drv.EnableInterrupts()
					if err != nil {
						return err
					}
					if err := bar.Await(uint64(2*r + 2)); err != nil {
						return err
					}
					if !pending && !wants[r] {
						missed++
					}
					_, _, ok, err := drv.Reclaim()
					if err != nil {
						return err
					}
					if !ok {
						return fmt.Errorf("round %d: the used entry is not there after the barrier", r)
					}
				}
				return nil
			}
			errDrv, errDev := litmus.Run(&bar, driver, device)
			require.NoError(t, errDrv)
			require.NoError(t, errDev)
			require.Zero(t, missed, "rounds of %d where the driver slept on a used entry and the device raised no interrupt", rounds)
		})
	}
}

func TestKickDecisionNeverMissed(t *testing.T) {
	for _, f := range litmusFormats {
		t.Run(f.name, func(t *testing.T) {
			drv, dev, buf := litmusQueues(t, f.feat)
			drv.DisableInterrupts()
			rounds := litmusRounds()
			kicks := make([]bool, rounds)
			var bar litmus.Barrier
			missed := 0
			driver := func() error {
				for r := range rounds {
					if _, err := drv.Add([]Buffer{{Addr: buf, Len: 64, Writable: true}}); err != nil {
						return err
					}
					if err := bar.Await(uint64(2*r + 1)); err != nil {
						return err
					}
					// Publish the chain, then decide.
					drv.Publish()
					kicks[r] = drv.NeedsKick()
					if err := bar.Await(uint64(2*r + 2)); err != nil {
						return err
					}
					// The device pushes the chain back after the barrier.
					for {
						_, _, ok, err := drv.Reclaim()
						if err != nil {
							return err
						}
						if ok {
							break
						}
						if bar.Aborted() {
							return litmus.ErrAborted
						}
					}
				}
				return nil
			}
			device := func() error {
				var c Chain
				for r := range rounds {
					dev.DisableNotify()
					if err := bar.Await(uint64(2*r + 1)); err != nil {
						return err
					}
					// Re-enable notifications, then look for chains.
					pending, err := dev.EnableNotify()
					if err != nil {
						return err
					}
					if err := bar.Await(uint64(2*r + 2)); err != nil {
						return err
					}
					if !pending && !kicks[r] {
						missed++
					}
					ok, err := dev.Pop(&c)
					if err != nil {
						return err
					}
					if !ok {
						return fmt.Errorf("round %d: the chain is not there after the barrier", r)
					}
					if err := dev.Push(c.Head, 0); err != nil {
						return err
					}
				}
				return nil
			}
			errDev, errDrv := litmus.Run(&bar, device, driver)
			require.NoError(t, errDrv)
			require.NoError(t, errDev)
			require.Zero(t, missed, "rounds of %d where the device slept on a chain and the driver sent no kick", rounds)
		})
	}
}
