package softnet_test

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestTxHeldWhileRxStopped stops receiveq 0 while transmitq 0 is busy, the
// way a vhost-user front-end stopping the device does (QEMU disables and
// stops the rings in index order: receiveq k before transmitq k). From then
// on the device must consume nothing from transmitq 0, whose loopback
// replies would have nowhere to go: no reply is dropped, tx's used index
// does not move, and the base read after tx is stopped is the first chain
// not consumed. When receiveq 0 starts again every pending frame is
// answered exactly once.
func TestTxHeldWhileRxStopped(t *testing.T) {
	for _, mc := range modeCases() {
		t.Run(mc.name, func(t *testing.T) {
			s := newStack(t, stackOptions{dev: softnet.Options{Mode: mc.mode, PollGroup: mc.group()}, features: base.With(virtio.FEventIdx), size: 64})
			mac := s.dev.MAC()
			usedIdx := func(q int) uint16 {
				var b [2]byte
				require.NoError(t, s.mem.Read(s.layouts[q].Used+2, b[:]))
				return binary.LittleEndian.Uint16(b[:])
			}
			var seq uint32
			got := map[uint32]int{}
			drainRx := func() {
				for {
					c, ok, err := s.drv[0].Receive()
					require.NoError(t, err)
					if !ok {
						return
					}
					got[seqOf(c.Data[s.hdrLen:])]++
				}
			}
			drainTx := func() {
				for {
					_, ok, err := s.drv[1].Receive()
					require.NoError(t, err)
					if !ok {
						return
					}
				}
			}
			sendSome := func(n int) {
				for i := 0; i < n && s.drv[1].Queue.NumFree() >= 2; i++ {
					s.send(1, frame(mac, seq, 64))
					seq++
				}
			}
			for round := 0; round < 30; round++ {
				drainRx()
				drainTx()
				if free := s.drv[0].Queue.NumFree(); free > 0 {
					s.postRx(0, free, 2048)
				}
				// Frames in flight while receiveq 0 stops: the worker is
				// racing the stop (SET_VRING_ENABLE 0 on the back-end).
				sendSome(8)
				require.NoError(t, s.local.EnableQueue(0, false))
				frozen := usedIdx(1)
				// The driver keeps transmitting while rx is off.
				sendSome(8)
				for i := 0; i < 5; i++ {
					time.Sleep(2 * time.Millisecond)
					require.Equal(t, frozen, usedIdx(1), "round %d: transmitq consumed a chain while receiveq was stopped", round)
				}
				require.Zero(t, s.dev.Stats().Drop(softnet.DropRxNotReady), "round %d: a reply was dropped", round)

				// Then transmitq stops (GET_VRING_BASE): its base is the
				// first chain not consumed.
				require.NoError(t, s.local.EnableQueue(1, false))
				st, err := s.local.QueueBase(1)
				require.NoError(t, err)
				assert.Equal(t, frozen, st.NextAvail, "round %d: tx base is the next chain not consumed", round)
				assert.Equal(t, frozen, st.NextUsed)
				// Transmitq restarted first (rx still off) stays held.
				require.NoError(t, s.local.EnableQueue(1, true))
				s.send(1, frame(mac, seq, 64))
				seq++
				time.Sleep(5 * time.Millisecond)
				require.Equal(t, frozen, usedIdx(1), "round %d: restarted transmitq consumed while receiveq is still stopped", round)
				require.NoError(t, s.local.EnableQueue(0, true))
				// Every frame sent so far is answered once receiveq runs.
				deadline := time.Now().Add(10 * time.Second)
				for len(got) < int(seq) {
					require.True(t, time.Now().Before(deadline), "round %d: %d of %d frames answered", round, len(got), seq)
					drainRx()
					drainTx()
					if free := s.drv[0].Queue.NumFree(); free > 0 {
						s.postRx(0, free, 2048)
					}
					time.Sleep(time.Millisecond)
				}
				// The transmit chains of the answered frames come back
				// after their replies: wait for all of them, so that the
				// next round's 17 frames (34 descriptors) always fit the
				// 64-entry ring.
				for s.drv[1].Queue.NumFree() < 64 {
					require.True(t, time.Now().Before(deadline), "round %d: transmitq has %d of 64 descriptors back", round, s.drv[1].Queue.NumFree())
					drainTx()
					time.Sleep(time.Millisecond)
				}
			}
			drainRx()
			for i := uint32(0); i < seq; i++ {
				require.Equal(t, 1, got[i], "frame %d answered once", i)
			}
			assert.Len(t, got, int(seq))
			st := s.dev.Stats()
			assert.Zero(t, st.Drop(softnet.DropRxNotReady))
			assert.Zero(t, st.Drop(softnet.DropRxNoBuffer))
			assert.Equal(t, uint64(seq), st.Queues[1].Frames)
			assert.Equal(t, uint64(seq), st.Queues[0].Frames)
		})
	}
}

// TestTxHeldWakesWhenPairsChange: transmitq 1 is held because receiveq 1,
// where its replies go, is stopped. The driver then sets one queue pair
// (VQ_PAIRS_SET): transmitq 1's replies now go to receiveq 0, which runs,
// and the held worker goes on by itself. In event mode it slept on its
// kick with notifications off, and nothing kicked it: its chains stayed
// in flight until receiveq 1 started again or the device was reset (found
// by a review). The reverse (pairs raised so that a held queue's replies
// go to a running receive queue) wakes it the same way.
func TestTxHeldWakesWhenPairsChange(t *testing.T) {
	for _, mc := range modeCases() {
		t.Run(mc.name, func(t *testing.T) {
			f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ)
			s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 2, Mode: mc.mode, PollGroup: mc.group()}, features: f, size: 64})
			const cq = 4
			mac := s.dev.MAC()
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 2, 0)))
			s.postRx(0, 8, 2048)
			s.postRx(2, 8, 2048)
			require.NoError(t, s.local.EnableQueue(2, false)) // receiveq 1 stops
			s.send(3, frame(mac, 1, 64))
			time.Sleep(20 * time.Millisecond)
			_, ok, err := s.drv[3].Receive()
			require.NoError(t, err)
			require.False(t, ok, "held: receiveq 1 is stopped")

			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 1, 0)))
			c := s.wait(3)
			assert.Zero(t, c.Len, "the transmit chain completes")
			_, got := s.recvFrame(0)
			assert.Equal(t, uint32(1), seqOf(got), "the reply on receiveq 0")

			// The reverse: receiveq 0 stops, transmitq 1 (steered to it
			// with one pair) is held; two pairs send its replies to
			// receiveq 1, started again.
			require.NoError(t, s.local.EnableQueue(0, false))
			require.NoError(t, s.local.EnableQueue(2, true))
			s.send(3, frame(mac, 2, 64))
			time.Sleep(20 * time.Millisecond)
			_, ok, err = s.drv[3].Receive()
			require.NoError(t, err)
			require.False(t, ok, "held: receiveq 0 is stopped")
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 2, 0)))
			c = s.wait(3)
			assert.Zero(t, c.Len)
			_, got = s.recvFrame(2)
			assert.Equal(t, uint32(2), seqOf(got), "the reply on receiveq 1")
		})
	}
}
