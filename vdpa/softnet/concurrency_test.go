package softnet_test

import (
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// Two queue pairs loop back while other goroutines inject frames with
// Deliver into the same receive queues and read counters: run with -race.
// Every frame is either delivered exactly once or counted as a drop.
func TestConcurrentLoopbackAndDeliver(t *testing.T) {
	for _, mode := range []softnet.Mode{softnet.ModeEvent, softnet.ModePoll} {
		t.Run(mode.String(), func(t *testing.T) {
			f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ, virtio.NetFMrgRxbuf, virtio.FEventIdx)
			s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 2, Mode: mode}, features: f, size: 256})
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(4, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 2, 0)))
			const perSender = 200
			var wg sync.WaitGroup
			stop := make(chan struct{})
			for g := 0; g < 2; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < perSender; i++ {
						_ = s.dev.Deliver(g, frame(s.dev.MAC(), uint32(1e6+i), 64))
						if i%50 == 0 {
							_ = s.dev.Stats()
						}
					}
				}()
			}
			// The driver side (one goroutine, as rings require) feeds both
			// pairs and reclaims until every injected and looped frame is
			// accounted for.
			sent := 0
			received := 0
			for p := 0; p < 2; p++ {
				s.postRx(2*p, 128, 2048)
			}
			for sent < 400 {
				for p := 0; p < 2; p++ {
					if s.drv[2*p+1].Queue.NumFree() >= 2 {
						s.send(2*p+1, frame(s.dev.MAC(), uint32(sent), 100))
						sent++
					}
					for {
						c, ok, err := s.drv[2*p+1].Receive()
						require.NoError(t, err)
						if !ok {
							break
						}
						assert.Zero(t, c.Len)
					}
					for {
						_, ok, err := s.drv[2*p].Receive()
						require.NoError(t, err)
						if !ok {
							break
						}
						received++
						s.postRx(2*p, 1, 2048)
					}
				}
			}
			wg.Wait()
			close(stop)
			deadline := time.Now().Add(10 * time.Second)
			for {
				st := s.dev.Stats()
				done := st.Tx().Frames == uint64(sent)
				for p := 0; p < 2; p++ {
					for {
						_, ok, err := s.drv[2*p].Receive()
						require.NoError(t, err)
						if !ok {
							break
						}
						received++
						s.postRx(2*p, 1, 2048)
					}
				}
				st = s.dev.Stats()
				total := uint64(sent + 2*perSender)
				if done && st.Rx().Frames+st.Drop(softnet.DropRxNoBuffer) == total && uint64(received) == st.Rx().Frames {
					break
				}
				require.True(t, time.Now().Before(deadline), "accounting: sent %d+%d, stats %+v, received %d", sent, 2*perSender, st, received)
				time.Sleep(time.Millisecond)
			}
		})
	}
}

// BenchmarkStackLoopback runs the whole in-process stack: the driver side
// on raw vring.DriverQueues in the benchmark goroutine, vdpa.Local, and
// softnet's busy-polling transmit goroutine; 64-byte frames, the whole receive
// ring kept posted. Mpps counts frames received back; drop-ratio is the
// share of transmitted frames that found no receive buffer (the driver
// side refills slower than the device loops).
func BenchmarkStackLoopback(b *testing.B) {
	f := base.With(virtio.FEventIdx)
	s := newStack(b, stackOptions{dev: softnet.Options{Mode: softnet.ModePoll}, features: f, size: 256, slot: 256})
	ringBytes := (vring.ContiguousLayoutBytes(256) + 4095) &^ 4095
	txData := s.layouts[1].Desc + vring.GuestAddr(ringBytes)
	rxData := s.layouts[0].Desc + vring.GuestAddr(ringBytes)
	fr := append(s.hdr(), frame(s.dev.MAC(), 1, 64-18)...)
	require.NoError(b, s.mem.Write(txData, fr))
	txBufs := []vring.Buffer{{Addr: txData, Len: uint32(len(fr))}}
	var slotOf [256]int
	rxq, txq := s.drv[0].Queue, s.drv[1].Queue
	addRx := func(slot int) {
		h, err := rxq.Add([]vring.Buffer{{Addr: rxData + vring.GuestAddr(slot*256), Len: 256, Writable: true}})
		if err != nil {
			b.Fatal(err)
		}
		slotOf[h] = slot
	}
	for i := 0; i < 256; i++ {
		addRx(i)
	}
	rxq.Publish()
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	// One b.N unit is one frame received back by the driver.
	for n < b.N {
		for txq.NumFree() > 0 {
			if _, err := txq.Add(txBufs); err != nil {
				b.Fatal(err)
			}
		}
		txq.Publish()
		for {
			_, _, ok, err := txq.Reclaim()
			if err != nil {
				b.Fatal(err)
			}
			if !ok {
				break
			}
		}
		for {
			h, _, ok, err := rxq.Reclaim()
			if err != nil {
				b.Fatal(err)
			}
			if !ok {
				break
			}
			n++
			addRx(slotOf[h])
		}
		rxq.Publish()
	}
	b.StopTimer()
	st := s.dev.Stats()
	b.ReportMetric(float64(n)/b.Elapsed().Seconds()/1e6, "Mpps")
	b.ReportMetric(float64(st.Drop(softnet.DropRxNoBuffer))/float64(max(1, st.Tx().Frames)), "drop-ratio")
}
