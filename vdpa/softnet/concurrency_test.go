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
	for _, mc := range modeCases() {
		t.Run(mc.name, func(t *testing.T) {
			f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ, virtio.NetFMrgRxbuf, virtio.FEventIdx)
			s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 2, Mode: mc.mode, PollGroup: mc.group()}, features: f, size: 256})
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
					s.reclaimTx(p)
					received += s.reclaimRx(p)
				}
			}
			wg.Wait()
			close(stop)
			deadline := time.Now().Add(10 * time.Second)
			for {
				st := s.dev.Stats()
				done := st.Tx().Frames == uint64(sent)
				for p := 0; p < 2; p++ {
					received += s.reclaimRx(p)
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

// TestConcurrentDeliverHdr: host back-ends (two goroutines, as a
// multi-queue tap's readers would be) hand GSO and partially checksummed
// frames to one receive queue of a driver without the GUEST_* offloads,
// so the device segments and completes them under the queue's lock while
// the driver reclaims and reposts: run with -race. Every segment the
// device counts as received reaches the driver, every segment is a valid
// wire frame, and each frame is delivered whole or ends with one drop.
func TestConcurrentDeliverHdr(t *testing.T) {
	g := gsoSpec{payload: 5000, mss: 1000}
	h, f := g.build(t)
	hc, fc := gsoSpec{udp: true, payload: 300, mss: 1448}.build(t)
	hc.GSOType, hc.GSOSize = 0, 0
	s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: base.With(virtio.NetFMrgRxbuf), size: 256})
	const perSender = 100
	s.postRx(0, 128, 2048)
	var wg sync.WaitGroup
	var okFrames [2]int
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range perSender {
				var err error
				if n%2 == 0 {
					err = s.dev.DeliverHdr(0, h, f)
				} else {
					err = s.dev.DeliverHdr(0, hc, fc)
				}
				if err == nil {
					okFrames[i]++
				} else {
					assert.ErrorIs(t, err, softnet.ErrNoBuffer)
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	var segs [][]byte
	finished := false
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := 0
		for {
			c, ok, err := s.drv[0].Receive()
			require.NoError(t, err)
			if !ok {
				break
			}
			segs = append(segs, append([]byte(nil), c.Data[s.hdrLen:]...))
			got++
		}
		if got > 0 {
			s.postRx(0, got, 2048)
		}
		if finished && got == 0 && uint64(len(segs)) == s.dev.Stats().Queues[0].Frames {
			break
		}
		select {
		case <-done:
			finished = true
		default:
		}
		require.True(t, time.Now().Before(deadline), "received %d, stats %+v", len(segs), s.dev.Stats())
		time.Sleep(100 * time.Microsecond)
	}
	st := s.dev.Stats()
	delivered := okFrames[0] + okFrames[1]
	assert.Equal(t, uint64(2*perSender-delivered), st.Drop(softnet.DropRxNoBuffer), "one drop per frame not delivered whole")
	var whole, small int
	for _, seg := range segs {
		switch len(seg) {
		case len(fc):
			small++
			assert.Equal(t, uint16(0xffff), refFold(refPseudo(seg, 14, 34, false, true, len(seg)-34)+refSum(seg[34:])), "UDP checksum completed")
		default:
			whole++
			assert.LessOrEqual(t, len(seg), int(h.HdrLen)+int(g.mss))
			assert.Equal(t, uint16(0xffff), refFold(refPseudo(seg, 14, 34, false, false, len(seg)-34)+refSum(seg[34:])), "TCP checksum of a segment")
		}
	}
	t.Logf("%d of %d frames delivered whole: %d TCP segments, %d completed UDP datagrams", delivered, 2*perSender, whole, small)
	assert.Positive(t, delivered)
	assert.Positive(t, small)
	assert.Positive(t, whole)
}

// TestLoopbackWhileActivePairsChange: the driver transmits on pair 1 while
// its control queue switches between one and two active pairs, so Loopback
// replies go to pair 1's receive queue or (steered) to pair 0's, and the
// steering can change in the middle of a transmit batch, which holds a
// receive queue's lock for its replies. Other goroutines Deliver into both
// receive queues meanwhile. Run with -race: nothing deadlocks, and every
// frame is delivered once or counted as a drop.
func TestLoopbackWhileActivePairsChange(t *testing.T) {
	for _, mc := range modeCases() {
		t.Run(mc.name, func(t *testing.T) {
			f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ, virtio.NetFMrgRxbuf, virtio.FEventIdx)
			s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 2, Mode: mc.mode, PollGroup: mc.group(), BatchSize: 8}, features: f, size: 256})
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(4, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 2, 0)))
			const perSender, toSend = 300, 2000
			var wg sync.WaitGroup
			for g := 0; g < 2; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < perSender; i++ {
						_ = s.dev.Deliver(g, frame(s.dev.MAC(), uint32(1e6+i), 64))
					}
				}()
			}
			received := [2]int{}
			reclaim := func() {
				for p := 0; p < 2; p++ {
					s.reclaimTx(p)
					received[p] += s.reclaimRx(p)
				}
			}
			for p := 0; p < 2; p++ {
				s.postRx(2*p, 128, 2048)
			}
			sent, switches := 0, 0
			for sent < toSend {
				for k := 0; k < 16 && s.drv[3].Queue.NumFree() >= 2; k++ {
					s.send(3, frame(s.dev.MAC(), uint32(sent), 100))
					sent++
				}
				if sent%100 < 16 {
					pairs := byte(1 + switches%2)
					require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(4, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, pairs, 0)))
					switches++
				}
				reclaim()
			}
			wg.Wait()
			total := uint64(sent + 2*perSender)
			deadline := time.Now().Add(10 * time.Second)
			for {
				reclaim()
				st := s.dev.Stats()
				got := uint64(received[0] + received[1])
				if st.Tx().Frames == uint64(sent) && st.Rx().Frames+st.Drop(softnet.DropRxNoBuffer) == total && got == st.Rx().Frames {
					break
				}
				require.True(t, time.Now().Before(deadline), "accounting: sent %d+%d, stats %+v, received %v", sent, 2*perSender, st, received)
				time.Sleep(time.Millisecond)
			}
			assert.Greater(t, switches, 10, "active pairs switched under traffic")
			// Where the replies went above depends on when the worker ran
			// (a loaded machine may run every batch under two pairs). With
			// everything settled, one frame under each setting must reply
			// on the pair the steering names.
			for _, pairs := range []byte{1, 2} {
				require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(4, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, pairs, 0)))
				want := received
				want[pairs-1]++
				s.send(3, frame(s.dev.MAC(), uint32(sent), 100))
				sent++
				deadline := time.Now().Add(10 * time.Second)
				for received != want {
					require.True(t, time.Now().Before(deadline), "%d active pair(s): received %v, want %v", pairs, received, want)
					time.Sleep(time.Millisecond)
					reclaim()
				}
			}
			assert.Equal(t, uint64(sent), s.dev.Stats().Tx().Frames)
		})
	}
}

// reclaimTx takes back pair p's used transmit chains (the device writes
// nothing into them).
func (s *stack) reclaimTx(p int) {
	s.t.Helper()
	for {
		c, ok, err := s.drv[2*p+1].Receive()
		require.NoError(s.t, err)
		if !ok {
			return
		}
		assert.Zero(s.t, c.Len)
	}
}

// reclaimRx takes pair p's received frames, posts a 2048-byte buffer for
// each, and returns how many there were.
func (s *stack) reclaimRx(p int) int {
	s.t.Helper()
	n := 0
	for {
		_, ok, err := s.drv[2*p].Receive()
		require.NoError(s.t, err)
		if !ok {
			return n
		}
		n++
		s.postRx(2*p, 1, 2048)
	}
}
