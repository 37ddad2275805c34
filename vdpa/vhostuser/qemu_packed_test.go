package vhostuser

// QEMU interop with packed virtqueues: virtio-net-pci,packed=on on a
// vhost-user netdev served by our back-end, the Linux guest's virtio_net
// driver on packed rings. Gated like the other QEMU tests (qemu_test.go).

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// TestQEMUPackedPing is TestQEMUVirtioNetPing with packed=on: the guest
// driver negotiates RING_PACKED (its features file has bit 34 set), the
// back-end gets it, every echo is answered and the guest's counters equal
// the device's.
func TestQEMUPackedPing(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		testQEMUVirtioNetPingWith(t, q, helper, pingVariant{packed: true})
	})
}

// TestQEMUPackedMigration: a guest on packed rings migrates A→B under a
// paced ping stream. A packed ring has no index in guest memory, so its
// position crosses only in the vhost-user base word (avail and used
// positions with their wrap counters): the destination must start every
// ring where the source stopped it, no page of the back-end's may differ
// between the source's and the destination's RAM (every used descriptor
// and receive buffer the back-end wrote was logged; classifyDiff), and no
// echo is lost.
func TestQEMUPackedMigration(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q qemuPeer, helper string) {
		retryVoid(t, func(t *testing.T) { testQEMUPackedMigration(t, q, helper) })
	})
}

func testQEMUPackedMigration(t *testing.T, q qemuPeer, helper string) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	m := bootForMigration(t, ctx, q, helper, ourRigs(t, ctx, rigOptions{}), qemuConfig{name: q.name + "-packed", packed: true}, 1)
	dir, g, a, b := m.dir, m.g, m.a, m.b
	require.True(t, a.be.Info().Features.Has(virtio.FRingPacked), "the guest driver negotiated packed rings: %s",
		a.be.Info().Features.Format(virtio.DeviceNet))

	h := m.next(1)
	h.packed, h.voidOnLoss = true, true
	migrate(t, ctx, q, g, dir, h, 1<<30, false)
	assert.Empty(t, h.devicePages, "guest pages that differ after the migration (written by the back-end, not logged): %v", firstN(h.devicePages, 20))
	checkHandover(t, h)
	before := echoes(a, b)
	took, err := waitEchoes(ctx, before+20, 60*time.Second, a, b)
	require.NoError(t, err, "traffic on %s after the destination resumed", b.name)
	assert.True(t, b.be.Info().Features.Has(virtio.FRingPacked), "destination negotiated packed rings")
	for _, ev := range lastRing(b.ring.snapshot()) {
		if ev.start {
			assert.True(t, ev.packed, "destination queue %d runs a packed ring", ev.q)
		}
	}
	p := stopPingers(t, ctx, h.dst, g.nonce, "final")
	noWarnings(t, a, b)
	checkPingRound(t, q.name+" packed migration", p, false, a, b)
	_, _ = h.dstQMP.Do("quit", nil)
	t.Logf("RESULT %s packed migration: traffic resumed within %v of cont, QEMU downtime %d ms, run time %v",
		q.name, took.Round(time.Millisecond), h.info.Downtime, time.Since(start).Round(time.Millisecond))
}
