package vhostuser

// DPDK 22.11 interop with packed virtqueues (VIRTIO_F_RING_PACKED): DPDK's
// virtio-user with packed_vq=1 against our back-end, and our front-end
// against DPDK's net_vhost with packed rings. Gated like the other interop
// tests of dpdk_test.go.

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestDPDKVirtioUserPacked: virtio-user with packed_vq=1 and 1024-entry
// rings, with and without in_order and mrg_rxbuf, against our back-end
// serving softnet (which offers IN_ORDER here, so in_order=1 negotiates
// it). Packed rings must be negotiated; every frame testpmd transmits is
// counted by the device, and every frame the device delivers is counted
// by testpmd.
func TestDPDKVirtioUserPacked(t *testing.T) {
	for _, inOrder := range []int{0, 1} {
		for _, mrg := range []int{0, 1} {
			// No "=" or "," in the name: the socket path (t.TempDir) goes into
			// virtio-user's key=value,... argument.
			t.Run(fmt.Sprintf("in_order%d-mrg_rxbuf%d", inOrder, mrg), func(t *testing.T) {
				bin := requireTestpmd(t, dpdkInterop)
				ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
				defer cancel()
				dev, err := softnet.New(&softnet.Options{FrontendCtrl: true, MaxQueueSize: 1024, InOrder: true, Handler: softnet.Discard})
				require.NoError(t, err)
				path, be := serveBackend(t, ctx, dev)
				extra := []string{"--no-flush-rx"}
				if mrg == 1 {
					// Frames larger than one receive buffer (below).
					extra = append(extra, "--enable-scatter", "--max-pkt-len=9000")
				}
				p := startTestpmd(t, bin, testpmdConfig{lcores: "0@0,1@0", prefix: uniquePrefix(t, "packed"),
					vdev: fmt.Sprintf("net_virtio_user0,path=%s,queues=1,packed_vq=1,in_order=%d,mrg_rxbuf=%d,queue_size=1024", path, inOrder, mrg),
					fwd:  "txonly", extra: extra})
				require.NoError(t, p.waitOutput(ctx, "testpmd>", 1))
				require.True(t, waitCond(ctx, func() bool { return be.Info().RunningQueues == 2 }), "rings did not start: %+v", be.Info())
				f := be.Info().Features
				t.Logf("negotiated %s", f.Format(virtio.DeviceNet))
				require.True(t, f.Has(virtio.FRingPacked), "packed rings negotiated")
				assert.Equal(t, inOrder == 1, f.Has(virtio.FInOrder), "IN_ORDER")
				assert.Equal(t, mrg == 1, f.Has(virtio.NetFMrgRxbuf), "MRG_RXBUF")

				// Transmit: testpmd sends as fast as it can, the device
				// counts every frame (many wraps of the 1024-entry ring).
				p.command("start")
				require.True(t, waitCond(ctx, func() bool { return dev.Stats().Queues[1].Frames > 50000 }), "frames arrived: %+v", dev.Stats().Queues)
				_, _, tx, _, err := p.stopForwarding(ctx)
				require.NoError(t, err)
				assert.True(t, waitCond(ctx, func() bool { return dev.Stats().Queues[1].Frames == tx }),
					"testpmd sent %d, device got %d", tx, dev.Stats().Queues[1].Frames)

				// Receive: the device delivers, testpmd counts.
				p.command("set fwd rxonly")
				p.command("start")
				require.NoError(t, p.waitOutput(ctx, "forwards packets on", 2))
				deliver := func(n, size int) {
					frame := make([]byte, size)
					copy(frame, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5})
					for i := 0; i < n; i++ {
						for {
							err := dev.Deliver(0, frame)
							if err == nil {
								break
							}
							require.ErrorIs(t, err, softnet.ErrNoBuffer, "frame %d of %d bytes", i, size)
							require.NoError(t, ctx.Err(), "no receive buffers after %d frames of %d bytes", i, size)
							time.Sleep(100 * time.Microsecond)
						}
					}
				}
				frames := 5000
				deliver(frames, 64)
				if mrg == 1 {
					// Each frame spreads over two mergeable buffers, the
					// first filled completely: with IN_ORDER such a buffer
					// still needs a used descriptor of its own, or
					// virtio-user's receive path (one buffer per used
					// descriptor) stalls.
					deliver(2000, 3000)
					frames += 2000
				}
				assert.True(t, waitCond(ctx, func() bool {
					rx, _, err := p.portStats(ctx)
					return err == nil && rx >= uint64(frames)
				}), "testpmd did not receive every frame")
				rx, _, err := p.portStats(ctx) // nothing else reached testpmd's port
				require.NoError(t, err)
				s := dev.Stats()
				assert.Equal(t, uint64(frames), s.Queues[0].Frames, "delivered")
				assert.Equal(t, uint64(frames), rx, "testpmd received")
				require.NoError(t, dev.QueueErr(0))
				require.NoError(t, dev.QueueErr(1))
				t.Logf("DPDK packed %s: testpmd tx %d = device %d; device rx %d = testpmd %d", t.Name(), tx, s.Queues[1].Frames, s.Queues[0].Frames, rx)
			})
		}
	}
}

// TestDPDKFrontendNetVhostPacked: our front-end drives DPDK's net_vhost
// (macswap) on packed rings, both directions, with dirty logging: every
// page of both descriptor rings (where net_vhost writes used descriptors)
// and every receive buffer page is logged, no transmit buffer page is.
func TestDPDKFrontendNetVhostPacked(t *testing.T) { testDPDKFrontendNetVhost(t, true) }
