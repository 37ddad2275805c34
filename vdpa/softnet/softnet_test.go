package softnet_test

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

var base = virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMTU)

func TestLoopbackByteIdentical(t *testing.T) {
	tests := []struct {
		name     string
		features virtio.Features
		mode     softnet.Mode
		indirect bool
		grouped  bool // on a PollGroup of one worker
	}{
		{"VERSION_1 header is 12 bytes with num_buffers 1", base, softnet.ModeEvent, false, false},
		{"MRG_RXBUF with VERSION_1", base.With(virtio.NetFMrgRxbuf), softnet.ModeEvent, false, false},
		{"legacy 10-byte header without VERSION_1 or MRG_RXBUF", virtio.Features(0).With(virtio.NetFMAC), softnet.ModeEvent, false, false},
		{"EVENT_IDX notification suppression", base.With(virtio.FEventIdx, virtio.NetFMrgRxbuf), softnet.ModeEvent, false, false},
		{"INDIRECT_DESC chains", base.With(virtio.FIndirectDesc), softnet.ModeEvent, true, false},
		{"busy-poll mode", base.With(virtio.FEventIdx, virtio.NetFMrgRxbuf), softnet.ModePoll, false, false},
		{"busy-poll mode on a poll group", base.With(virtio.FEventIdx, virtio.NetFMrgRxbuf), softnet.ModePoll, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mc := modeCase{mode: tt.mode, grouped: tt.grouped}
			s := newStack(t, stackOptions{dev: softnet.Options{Mode: tt.mode, PollGroup: mc.group()}, features: tt.features, indirect: tt.indirect})
			mac := s.dev.MAC()
			sizes := []int{0, 1, 46, 100, 1000, 1500 - 18}
			s.postRx(0, 2*len(sizes), 2048)
			for round := 0; round < 2; round++ {
				for i, n := range sizes {
					f := frame(mac, uint32(round*100+i), n)
					s.send(1, f)
					h, got := s.recvFrame(0)
					require.Equal(t, f, got, "frame %d", i)
					if s.hdrLen == virtio.NetHdrSize {
						assert.Equal(t, uint16(1), h.NumBuffers, "§5.1.6.4: num_buffers is 1 when one buffer holds the frame")
					}
					assert.Equal(t, virtio.NetHdr{NumBuffers: h.NumBuffers}, h, "no offload fields set")
					tx := s.wait(1)
					assert.Equal(t, uint32(0), tx.Len, "transmit chains are completed with nothing written")
				}
			}
			st := s.dev.Stats()
			assert.Equal(t, uint64(2*len(sizes)), st.Queues[1].Frames)
			assert.Equal(t, uint64(2*len(sizes)), st.Queues[0].Frames)
			assert.Equal(t, st.Queues[0].Bytes, st.Queues[1].Bytes)
			assert.Equal(t, [len(st.Drops)]uint64{}, st.Drops)
		})
	}
}

func TestHeaderAndFrameInOneDescriptor(t *testing.T) {
	s := newStack(t, stackOptions{features: base})
	s.postRx(0, 1, 2048)
	f := frame(s.dev.MAC(), 7, 300)
	_, err := s.drv[1].Add([][]byte{append(s.hdr(), f...)}, nil)
	require.NoError(t, err)
	s.drv[1].Queue.Publish()
	require.NoError(t, s.kick[1].Signal())
	_, got := s.recvFrame(0)
	assert.Equal(t, f, got)
}

func TestFrameSplitAcrossManyDescriptors(t *testing.T) {
	s := newStack(t, stackOptions{features: base})
	s.postRx(0, 1, 2048)
	f := frame(s.dev.MAC(), 9, 700)
	// Header split in two, frame in 12 pieces of 60 bytes: 14 descriptors.
	segs := [][]byte{s.hdr()[:5], s.hdr()[5:]}
	for off := 0; off < len(f); off += 60 {
		segs = append(segs, f[off:min(off+60, len(f))])
	}
	require.Len(t, segs, 14)
	_, err := s.drv[1].Add(segs, nil)
	require.NoError(t, err)
	s.drv[1].Queue.Publish()
	require.NoError(t, s.kick[1].Signal())
	_, got := s.recvFrame(0)
	assert.Equal(t, f, got, "gathered from %d descriptors", len(segs))
}

func TestMergeableRxSpansBuffers(t *testing.T) {
	// §5.1.6.4: with MRG_RXBUF a frame may use several buffers; num_buffers
	// in the first header counts them.
	s := newStack(t, stackOptions{features: base.With(virtio.NetFMrgRxbuf)})
	s.postRx(0, 8, 256)
	f := frame(s.dev.MAC(), 1, 1000) // 12 + 1018 bytes: 5 buffers of 256
	s.send(1, f)
	cs := s.waitN(0, 5)
	h, err := virtio.DecodeNetHdr(cs[0].Data, virtio.NetHdrSize)
	require.NoError(t, err)
	assert.Equal(t, uint16(5), h.NumBuffers)
	var all []byte
	for i, c := range cs {
		if i < 4 {
			assert.Equal(t, uint32(256), c.Len, "buffer %d is filled", i)
		}
		all = append(all, c.Data...)
	}
	assert.Equal(t, f, all[virtio.NetHdrSize:])
}

func TestMergeableHeldChainsAreNotLost(t *testing.T) {
	// A frame that finds too few buffers is dropped, but the buffers it
	// popped are kept for the next frame, not returned half-filled.
	s := newStack(t, stackOptions{features: base.With(virtio.NetFMrgRxbuf)})
	s.postRx(0, 2, 256)
	big := frame(s.dev.MAC(), 1, 1000)
	s.send(1, big)
	s.wait(1)
	assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropRxNoBuffer))
	small := frame(s.dev.MAC(), 2, 100)
	s.send(1, small)
	s.wait(1)
	_, got := s.recvFrame(0)
	assert.Equal(t, small, got)
	// The second held buffer is still available for a third frame.
	s.send(1, small)
	s.wait(1)
	_, got = s.recvFrame(0)
	assert.Equal(t, small, got)
}

func TestRxBufferTooSmallWithoutMergeable(t *testing.T) {
	s := newStack(t, stackOptions{features: base})
	s.postRx(0, 1, 100)
	s.send(1, frame(s.dev.MAC(), 1, 500))
	s.wait(1)
	c := s.wait(0)
	assert.Equal(t, uint32(0), c.Len, "too-small buffer is returned empty")
	assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropRxTooSmall))
}

func TestNoRxBufferDropsButCompletesTx(t *testing.T) {
	s := newStack(t, stackOptions{features: base})
	s.send(1, frame(s.dev.MAC(), 1, 60), frame(s.dev.MAC(), 2, 60))
	s.waitN(1, 2)
	st := s.dev.Stats()
	assert.Equal(t, uint64(2), st.Drop(softnet.DropRxNoBuffer))
	assert.Equal(t, uint64(2), st.Queues[1].Frames)
	assert.Equal(t, uint64(0), st.Queues[0].Frames)
}

func TestTxChainShorterThanHeader(t *testing.T) {
	s := newStack(t, stackOptions{features: base})
	_, err := s.drv[1].Add([][]byte{make([]byte, 11)}, nil)
	require.NoError(t, err)
	s.drv[1].Queue.Publish()
	require.NoError(t, s.kick[1].Signal())
	assert.Equal(t, uint32(0), s.wait(1).Len)
	assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropTxShort))
}

func TestConfigSpace(t *testing.T) {
	mac := [6]byte{0x52, 0x54, 0, 0xab, 0xcd, 0xef}
	dev, err := softnet.New(&softnet.Options{MAC: mac, MTU: 9000, MaxQueuePairs: 4})
	require.NoError(t, err)
	l := vdpa.NewLocal(dev, nil)
	n, err := l.ConfigSize()
	require.NoError(t, err)
	p := make([]byte, n)
	require.NoError(t, l.ReadConfig(0, p))
	c, err := virtio.DecodeNetConfig(p)
	require.NoError(t, err)
	assert.Equal(t, mac, c.MAC)
	assert.Equal(t, virtio.NetSLinkUp, c.Status)
	assert.Equal(t, uint16(4), c.MaxVirtqueuePairs)
	assert.Equal(t, uint16(9000), c.MTU)
	assert.Equal(t, virtio.NetSpeedUnknown, c.Speed)

	var one [2]byte
	require.NoError(t, l.ReadConfig(virtio.NetCfgMTU, one[:]))
	assert.Equal(t, uint16(9000), binary.LittleEndian.Uint16(one[:]), "partial read at an offset")
	require.NoError(t, l.ReadConfig(100, one[:]))
	assert.Equal(t, [2]byte{}, one, "reads outside the config space are zero")

	changed := 0
	dev2, err := softnet.New(&softnet.Options{OnConfigChange: func() { changed++ }})
	require.NoError(t, err)
	dev2.SetLinkUp(false)
	dev2.SetLinkUp(false)
	assert.Equal(t, uint16(0), dev2.Config().Status)
	assert.Equal(t, 1, changed, "one change, one notification")

	offered := dev.Features()
	assert.True(t, offered.Has(virtio.FVersion1, virtio.NetFMQ, virtio.NetFCtrlVQ, virtio.NetFMrgRxbuf, virtio.FEventIdx))
	assert.False(t, offered.Has(virtio.FAccessPlatform))
	vd, err := softnet.New(&softnet.Options{AccessPlatform: true, NoCtrlVQ: true})
	require.NoError(t, err)
	assert.True(t, vd.Features().Has(virtio.FAccessPlatform, virtio.FVersion1))
	assert.False(t, vd.Features().Has(virtio.NetFCtrlVQ))
	assert.False(t, vd.Features().Has(virtio.NetFCtrlRx))
	assert.Equal(t, 2, vd.NumQueues())
	_, err = softnet.New(&softnet.Options{NoCtrlVQ: true, MaxQueuePairs: 2})
	assert.Error(t, err, "MQ needs the control queue")
}

func TestFeatureDependencies(t *testing.T) {
	direct, err := softnet.New(&softnet.Options{MaxQueuePairs: 2})
	require.NoError(t, err)
	fe, err := softnet.New(&softnet.Options{MaxQueuePairs: 2, FrontendCtrl: true})
	require.NoError(t, err)
	assert.False(t, direct.Features().Has(virtio.NetFCtrlVLAN), "no VLAN filter of its own")
	assert.True(t, fe.Features().Has(virtio.NetFCtrlVLAN), "the front-end filters VLANs")
	tests := []struct {
		name         string
		f            virtio.Features
		direct, fctl bool // accepted by a device driven directly / with FrontendCtrl
	}{
		{"CTRL_RX requires CTRL_VQ (§5.1.3.1)", base.With(virtio.NetFCtrlRx), false, true},
		{"CTRL_MAC_ADDR requires CTRL_VQ (§5.1.3.1)", base.With(virtio.NetFCtrlMACAddr), false, true},
		{"MQ requires CTRL_VQ (§5.1.3.1)", base.With(virtio.NetFMQ), false, true},
		{"CTRL_VLAN is not offered to a direct driver", base.With(virtio.NetFCtrlVLAN, virtio.NetFCtrlVQ), false, true},
		{"QEMU's set: MQ, CTRL_RX, CTRL_MAC_ADDR, CTRL_VLAN without CTRL_VQ",
			base.With(virtio.NetFMQ, virtio.NetFCtrlRx, virtio.NetFCtrlMACAddr, virtio.NetFCtrlVLAN), false, true},
		{"features not offered are rejected", base.With(virtio.NetFGuestTSO4), false, false},
		{"CTRL_VQ with CTRL_RX is fine", base.With(virtio.NetFCtrlVQ, virtio.NetFCtrlRx), true, true},
		{"CTRL_VQ with MQ is fine", base.With(virtio.NetFCtrlVQ, virtio.NetFMQ), true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, c := range []struct {
				dev *softnet.Device
				ok  bool
			}{{direct, tt.direct}, {fe, tt.fctl}} {
				err := c.dev.SetFeatures(tt.f)
				if c.ok {
					assert.NoError(t, err)
				} else {
					assert.ErrorIs(t, err, softnet.ErrFeatures)
				}
			}
		})
	}
}

// TestFrontendCtrlMultiQueue: with FrontendCtrl and MQ negotiated without
// CTRL_VQ (QEMU, DPDK virtio-user with queues=N), every pair is active
// without VQ_PAIRS_SET and each pair's frames come back on its own
// receive queue.
func TestFrontendCtrlMultiQueue(t *testing.T) {
	f := base.With(virtio.NetFMQ, virtio.NetFCtrlRx, virtio.NetFMrgRxbuf)
	s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 3, FrontendCtrl: true}, features: f})
	require.Len(t, s.drv, 6, "no control queue started")
	assert.Equal(t, 3, s.dev.ActivePairs())
	for p := 0; p < 3; p++ {
		s.postRx(2*p, 4, 2048)
	}
	for p := 0; p < 3; p++ {
		s.send(2*p+1, frame(s.dev.MAC(), uint32(p), 64+p))
	}
	for p := 0; p < 3; p++ {
		_, got := s.recvFrame(2 * p)
		assert.Equal(t, uint32(p), seqOf(got), "pair %d loops back on its own receive queue", p)
	}
	st := s.dev.Stats()
	for p := 0; p < 3; p++ {
		assert.Equal(t, uint64(1), st.Queues[2*p].Frames, "rx %d", p)
		assert.Equal(t, uint64(1), st.Queues[2*p+1].Frames, "tx %d", p)
	}
}

func ctrlCmd(class, cmd byte, data ...byte) []byte { return append([]byte{class, cmd}, data...) }

func TestControlQueue(t *testing.T) {
	f := base.With(virtio.NetFCtrlVQ, virtio.NetFCtrlRx, virtio.NetFCtrlMACAddr)
	s := newStack(t, stackOptions{features: f})
	const cq = 2
	other := [6]byte{0x02, 0xbb, 0, 0, 0, 2}
	s.postRx(0, 16, 2048)

	// Promiscuous by default: a frame for another station loops back.
	s.send(1, frame(other, 1, 10))
	_, got := s.recvFrame(0)
	assert.Equal(t, uint32(1), seqOf(got))

	tests := []struct {
		name string
		cmd  []byte
		ack  byte
	}{
		{"PROMISC off is acknowledged", ctrlCmd(virtio.NetCtrlRx, virtio.NetCtrlRxPromisc, 0), virtio.NetCtrlOK},
		{"ALLMULTI on is acknowledged", ctrlCmd(virtio.NetCtrlRx, virtio.NetCtrlRxAllMulti, 1), virtio.NetCtrlOK},
		{"NOBCAST needs CTRL_RX_EXTRA", ctrlCmd(virtio.NetCtrlRx, virtio.NetCtrlRxNoBcast, 1), virtio.NetCtrlErr},
		{"MQ without MQ negotiated", ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 1, 0), virtio.NetCtrlErr},
		{"unknown class", ctrlCmd(77, 0), virtio.NetCtrlErr},
		{"truncated MAC_ADDR_SET", ctrlCmd(virtio.NetCtrlMAC, virtio.NetCtrlMACAddrSet, 1, 2, 3), virtio.NetCtrlErr},
		{"multicast MAC_ADDR_SET", ctrlCmd(virtio.NetCtrlMAC, virtio.NetCtrlMACAddrSet, 1, 0, 0x5e, 0, 0, 1), virtio.NetCtrlErr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.ack, s.sendCtrl(cq, tt.cmd))
		})
	}
	assert.False(t, s.dev.Promisc())
	assert.True(t, s.dev.AllMulti())

	// Filtering (§5.1.6.5.1): other unicast dropped; own MAC, broadcast
	// and (ALLMULTI) multicast accepted.
	s.send(1, frame(other, 2, 10), frame(s.dev.MAC(), 3, 10), frame(bcast, 4, 10),
		frame([6]byte{0x01, 0, 0x5e, 0, 0, 1}, 5, 10))
	s.waitN(1, 4)
	for _, want := range []uint32{3, 4, 5} {
		_, got := s.recvFrame(0)
		assert.Equal(t, want, seqOf(got))
	}
	assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropFiltered))

	// MAC_ADDR_SET changes the station address and the config mac.
	newMAC := [6]byte{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}
	assert.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMAC, virtio.NetCtrlMACAddrSet, newMAC[:]...)))
	assert.Equal(t, newMAC, s.dev.MAC())
	p := make([]byte, 6)
	require.NoError(t, s.local.ReadConfig(0, p))
	assert.Equal(t, newMAC[:], p)

	// MAC_TABLE_SET: an extra unicast address is accepted.
	tbl := binary.LittleEndian.AppendUint32(nil, 1)
	tbl = append(tbl, other[:]...)
	tbl = binary.LittleEndian.AppendUint32(tbl, 0)
	assert.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMAC, virtio.NetCtrlMACTableSet, tbl...)))
	s.send(1, frame(other, 6, 10))
	s.wait(1)
	_, got = s.recvFrame(0)
	assert.Equal(t, uint32(6), seqOf(got))

	st := s.dev.Stats()
	assert.Equal(t, uint64(4), st.CtrlOK)
	assert.Equal(t, uint64(5), st.CtrlErr)
}

func TestMultiQueue(t *testing.T) {
	f := base.With(virtio.NetFCtrlVQ, virtio.NetFMQ, virtio.NetFMrgRxbuf)
	s := newStack(t, stackOptions{dev: softnet.Options{MaxQueuePairs: 4}, features: f})
	require.Len(t, s.drv, 9)
	const cq = 8 // §5.1.2: controlq is 2N with MQ
	assert.Equal(t, 1, s.dev.ActivePairs())
	assert.Equal(t, virtio.NetCtrlErr, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 5, 0)), "more pairs than max_virtqueue_pairs")
	assert.Equal(t, virtio.NetCtrlErr, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 0, 0)), "zero pairs")
	assert.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 4, 0)))
	assert.Equal(t, 4, s.dev.ActivePairs())
	for p := 0; p < 4; p++ {
		s.postRx(2*p, 4, 2048)
	}
	for p := 0; p < 4; p++ {
		s.send(2*p+1, frame(s.dev.MAC(), uint32(p), 64+p))
	}
	for p := 0; p < 4; p++ {
		_, got := s.recvFrame(2 * p)
		assert.Equal(t, uint32(p), seqOf(got), "pair %d loops back on its own receive queue", p)
		assert.Len(t, got, 18+64+p)
	}
	st := s.dev.Stats()
	for p := 0; p < 4; p++ {
		assert.Equal(t, uint64(1), st.Queues[2*p].Frames)
		assert.Equal(t, uint64(1), st.Queues[2*p+1].Frames)
	}
	// Fewer active pairs: traffic of pair 3 steers to pair 3 mod 2 = 1.
	assert.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlMQ, virtio.NetCtrlMQVQPairsSet, 2, 0)))
	s.send(7, frame(s.dev.MAC(), 33, 10))
	_, got := s.recvFrame(2)
	assert.Equal(t, uint32(33), seqOf(got))
}

func TestResetReturnsToInitialState(t *testing.T) {
	f := base.With(virtio.NetFCtrlVQ, virtio.NetFCtrlMACAddr, virtio.NetFCtrlRx)
	s := newStack(t, stackOptions{features: f})
	newMAC := [6]byte{0x02, 9, 9, 9, 9, 9}
	assert.Equal(t, virtio.NetCtrlOK, s.sendCtrl(2, ctrlCmd(virtio.NetCtrlMAC, virtio.NetCtrlMACAddrSet, newMAC[:]...)))
	assert.Equal(t, virtio.NetCtrlOK, s.sendCtrl(2, ctrlCmd(virtio.NetCtrlRx, virtio.NetCtrlRxPromisc, 0)))
	require.NoError(t, s.local.SetStatus(0))
	st, err := s.local.Status()
	require.NoError(t, err)
	assert.Equal(t, virtio.Status(0), st)
	assert.Equal(t, [6]byte{0x02, 0, 0, 0, 0, 1}, s.dev.MAC())
	assert.True(t, s.dev.Promisc())
	assert.Equal(t, virtio.Features(0), s.dev.NegotiatedFeatures())
	for q := 0; q < 3; q++ {
		_, err := s.dev.StopQueue(q)
		assert.ErrorIs(t, err, softnet.ErrQueueStopped, "queue %d stopped by reset", q)
	}
}

func TestForwarderLinksTwoDevices(t *testing.T) {
	a := newStack(t, stackOptions{features: base})
	b := newStack(t, stackOptions{features: base, dev: softnet.Options{MAC: [6]byte{0x02, 0, 0, 0, 0, 2}}})
	softnet.Link(a.dev, b.dev)
	a.postRx(0, 2, 2048)
	b.postRx(0, 2, 2048)
	fa := frame(b.dev.MAC(), 1, 200)
	a.send(1, fa)
	_, got := b.recvFrame(0)
	assert.Equal(t, fa, got)
	fb := frame(a.dev.MAC(), 2, 300)
	b.send(1, fb)
	_, got = a.recvFrame(0)
	assert.Equal(t, fb, got)
	// A transmit queue counts its batch after the handler has run, so
	// the receiver may see the frame first (QueueStats).
	waitFor(t, func() bool { return a.dev.Stats().Tx().Frames == 1 }, "a's transmit count: %+v", a.dev.Stats().Queues)
	assert.Equal(t, uint64(1), b.dev.Stats().Rx().Frames)
}

// A frame made available after SetHandler returns goes to the new handler,
// even when the transmit batch it is popped in began under the old one (a
// PollGroup test saw a forwarded frame looped back instead: Link ran while
// the worker was in a batch begun under the default Loopback).
func TestSetHandlerDuringBatch(t *testing.T) {
	inEachMode(t, func(t *testing.T, s *stack) {
		inOld := make(chan uint32, 4)
		release := releaser(t)
		var gotNew []uint32
		var mu sync.Mutex
		s.dev.SetHandler(holdingHandler(t, inOld, release))
		first := frame(s.dev.MAC(), 1, 64)
		s.send(1, first)
		require.Equal(t, uint32(1), recvWithin(t, inOld), "the old handler has the first frame")
		// The batch is in the old handler's call: replace the handler,
		// then make the second frame available. The batch pops it when
		// the call returns.
		s.dev.SetHandler(softnet.FrameHandlerFunc(func(tx *softnet.Tx, f []byte) {
			mu.Lock()
			gotNew = append(gotNew, seqOf(f))
			mu.Unlock()
		}))
		s.send(1, frame(s.dev.MAC(), 2, 64))
		release.do()
		// The first frame's reply comes back (the old handler finishes
		// its call); the second reaches the new handler, never the old.
		_, got := s.recvFrame(0)
		assert.Equal(t, first, got)
		waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(gotNew) == 1 }, "no frame reached the new handler")
		mu.Lock()
		assert.Equal(t, []uint32{2}, gotNew)
		mu.Unlock()
		assert.Empty(t, inOld, "no frame after SetHandler reached the old handler")
	})
}

// A handler replaced in the middle of a batch (here by itself, during its
// first frame) has its replies published at once, before the batch goes on
// with the new handler, and counted first: a driver that sees a reply finds
// the frame that caused it in Stats, as at the end of a batch.
func TestSetHandlerDuringBatchPublishesOldReplies(t *testing.T) {
	inEachMode(t, func(t *testing.T, s *stack) {
		inNew := make(chan uint32, 4)
		release := releaser(t)
		blocking := holdingHandler(t, inNew, release)
		var oldSaw []uint32 // the batch's goroutine only, until inNew receives
		s.dev.SetHandler(softnet.FrameHandlerFunc(func(tx *softnet.Tx, f []byte) {
			oldSaw = append(oldSaw, seqOf(f))
			assert.NoError(t, tx.Reply(f))
			s.dev.SetHandler(blocking)
		}))
		f1, f2 := frame(s.dev.MAC(), 1, 64), frame(s.dev.MAC(), 2, 64)
		s.send(1, f1, f2) // one publication: both in the first batch
		require.Equal(t, uint32(2), recvWithin(t, inNew), "the second frame reaches the new handler")
		// The batch waits in the new handler's call; the old handler's
		// reply is out, and its frame counted.
		_, got := s.recvFrame(0)
		assert.Equal(t, f1, got)
		assert.Equal(t, []uint32{1}, oldSaw)
		assert.Equal(t, uint64(1), s.dev.Stats().Tx().Frames, "the replied frame is counted before its reply is visible")
		release.do()
		_, got = s.recvFrame(0)
		assert.Equal(t, f2, got)
		waitFor(t, func() bool { return s.dev.Stats().Tx().Frames == 2 }, "both frames counted: %+v", s.dev.Stats().Queues)
	})
}

// inEachMode runs body on a fresh stack with four receive buffers posted,
// once per transmit mode (a queue's own goroutine woken by kicks, and
// polling), each as a subtest.
func inEachMode(t *testing.T, body func(t *testing.T, s *stack)) {
	for _, mode := range []softnet.Mode{softnet.ModeEvent, softnet.ModePoll} {
		t.Run(mode.String(), func(t *testing.T) {
			s := newStack(t, stackOptions{features: base, dev: softnet.Options{Mode: mode}})
			s.postRx(0, 4, 2048)
			body(t, s)
		})
	}
}

// holdingHandler sends each frame's sequence number to seen, waits for
// release, then replies with the frame: a batch held inside a handler
// call for as long as the test wants.
func holdingHandler(t *testing.T, seen chan<- uint32, release *release) softnet.FrameHandler {
	return softnet.FrameHandlerFunc(func(tx *softnet.Tx, f []byte) {
		seen <- seqOf(f)
		<-release.c
		assert.NoError(t, tx.Reply(f))
	})
}

// release is a channel closed once, by do or at the test's end, so that a
// handler waiting on it never outlives a failed test.
type release struct {
	c    chan struct{}
	once sync.Once
}

func releaser(t *testing.T) *release {
	r := &release{c: make(chan struct{})}
	t.Cleanup(r.do)
	return r
}

func (r *release) do() { r.once.Do(func() { close(r.c) }) }

// recvWithin receives from c, failing the test after 10 s.
func recvWithin[T any](t *testing.T, c <-chan T) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("nothing received in 10s")
		panic("unreachable")
	}
}

func TestSuspendResumeStateExact(t *testing.T) {
	// Frames flow while the device is suspended and resumed over and over;
	// every frame must arrive exactly once and in order, and every queue's
	// state read back while suspended must match what the driver sees.
	// Packed rings too: held receive chains are given back across the
	// ring's end, where the avail position's wrap counter flips.
	for _, tc := range []struct {
		name        string
		mrg, packed bool
		grouped     bool // busy-poll on a one-worker PollGroup: every Suspend takes the queue out of it
	}{
		{"single buffer", false, false, false},
		{"mergeable", true, false, false},
		{"single buffer, packed", false, true, false},
		{"mergeable, packed", true, true, false},
		{"mergeable, poll group", true, false, true},
		{"mergeable, packed, poll group", true, true, true},
	} {
		mrg := tc.mrg
		f := base.With(virtio.FEventIdx)
		if mrg {
			f = f.With(virtio.NetFMrgRxbuf)
		}
		if tc.packed {
			f = f.With(virtio.FRingPacked)
		}
		t.Run(tc.name, func(t *testing.T) {
			size := uint16(32)
			if tc.packed {
				// Not a power of two (packed allows any size), and small:
				// the ring wraps every few rounds, so held chains are
				// given back across the wrap.
				size = 7
			}
			mc := modeCase{mode: softnet.ModeEvent}
			if tc.grouped {
				mc = modeCase{mode: softnet.ModePoll, grouped: true}
			}
			s := newStack(t, stackOptions{dev: softnet.Options{Mode: mc.mode, PollGroup: mc.group()}, features: f, size: size})
			var seq, next uint32
			bufSize := uint32(2048)
			if mrg {
				bufSize = 128 // frames span 2-3 buffers
			}
			received := 0
			drainRx := func() {
				for {
					c, ok, err := s.drv[0].Receive()
					require.NoError(t, err)
					if !ok {
						return
					}
					if c.Len == 0 {
						continue
					}
					h, err := virtio.DecodeNetHdr(c.Data, virtio.NetHdrSize)
					require.NoError(t, err)
					data := c.Data[virtio.NetHdrSize:]
					for i := 1; i < int(h.NumBuffers); i++ {
						data = append(data, s.wait(0).Data...)
					}
					got := seqOf(data)
					require.GreaterOrEqual(t, got, next, "frame %d duplicated or reordered", got)
					next = got + 1
					received++
				}
			}
			drainTx := func() {
				for {
					c, ok, err := s.drv[1].Receive()
					require.NoError(t, err)
					if !ok {
						return
					}
					assert.Zero(t, c.Len)
				}
			}
			for round := 0; round < 60; round++ {
				if free := s.drv[0].Queue.NumFree(); free > 0 {
					s.postRx(0, min(free, 5), bufSize)
				}
				for i := 0; i < 3 && s.drv[1].Queue.NumFree() >= 2; i++ {
					s.send(1, frame(s.dev.MAC(), seq, 150))
					seq++
				}
				if round%3 != 0 && s.drv[1].Queue.Outstanding() > 0 {
					// Let the device work while running on some rounds;
					// on the others it is stopped before it gets to run.
					assert.Zero(t, s.wait(1).Len)
				}
				require.NoError(t, s.local.Suspend())
				for q := 0; q < 2; q++ {
					st, err := s.local.QueueBase(q)
					require.NoError(t, err)
					if !tc.packed { // a packed ring has no used index in memory
						var used [2]byte
						require.NoError(t, s.mem.Read(s.layouts[q].Used+2, used[:]))
						assert.Equal(t, st.NextUsed, binary.LittleEndian.Uint16(used[:]), "queue %d: used.idx", q)
					}
					assert.Equal(t, st.NextAvail, st.NextUsed, "queue %d: nothing in flight while suspended", q)
					require.NoError(t, s.local.SetQueueBase(q, st))
				}
				require.NoError(t, s.local.Resume())
				drainTx()
				drainRx()
			}
			for s.drv[1].Queue.Outstanding() > 0 {
				assert.Zero(t, s.wait(1).Len)
			}
			drainRx()
			st := s.dev.Stats()
			assert.Equal(t, uint64(seq), st.Queues[1].Frames, "every frame transmitted once")
			assert.Equal(t, uint64(received), st.Queues[0].Frames, "every delivered frame reached the driver once")
			assert.Equal(t, uint64(seq), st.Queues[0].Frames+st.Drop(softnet.DropRxNoBuffer))
		})
	}
}

func TestDirtyLogCoversEverythingWritten(t *testing.T) {
	// Every byte the device writes (receive buffers up to the used length,
	// used rings, avail_event) is marked, and nothing else: transmit
	// buffers are only read.
	f := base.With(virtio.FEventIdx, virtio.NetFMrgRxbuf)
	s := newStack(t, stackOptions{features: f, size: 16, slot: 4096})
	span := s.mem.Regions()[0].Size()
	bm, err := dirty.New(span, nil)
	require.NoError(t, err)
	require.NoError(t, s.local.SetLog(bm))

	// Receive buffers through the raw driver queue so their addresses are
	// known: one page-aligned buffer per page of the rx data area.
	rxData := s.layouts[0].Desc + 4096
	var rxAddrs []vring.GuestAddr
	for i := 0; i < 4; i++ {
		a := rxData + vring.GuestAddr(i*4096)
		_, err := s.drv[0].Queue.Add([]vring.Buffer{{Addr: a, Len: 4096, Writable: true}})
		require.NoError(t, err)
		rxAddrs = append(rxAddrs, a)
	}
	s.drv[0].Queue.Publish()
	sizes := []int{60, 3000}
	for i, n := range sizes {
		s.send(1, frame(s.dev.MAC(), uint32(i), n))
	}
	s.waitN(1, len(sizes))
	want := map[uint64]bool{}
	mark := func(a vring.GuestAddr, n uint64) {
		for p := uint64(a) / 4096; p <= (uint64(a)+n-1)/4096; p++ {
			want[p] = true
		}
	}
	for i := range sizes {
		var head uint16
		var n uint32
		h, l, ok, err := s.drv[0].Queue.Reclaim()
		require.NoError(t, err)
		require.True(t, ok, "frame %d delivered before its transmit chain completed", i)
		head, n = h, l
		_ = head
		assert.Equal(t, uint32(virtio.NetHdrSize+18+sizes[i]), n)
		mark(rxAddrs[i], uint64(n))
	}
	for q := 0; q < 2; q++ {
		_, _, used := vring.SplitSizes(s.layouts[q].Size)
		mark(s.layouts[q].Used, used)
	}
	got := map[uint64]bool{}
	for p := uint64(0); p < bm.NumPages(); p++ {
		if bm.PageDirty(p) {
			got[p] = true
		}
	}
	assert.Equal(t, want, got)
}

func TestInOrderCompletions(t *testing.T) {
	// §2.7.9 (IN_ORDER): the device uses buffers in the order they were made
	// available, including receive buffers returned empty or held across a
	// frame that found too few.
	f := base.With(virtio.FInOrder, virtio.NetFMrgRxbuf)
	s := newStack(t, stackOptions{features: f, dev: softnet.Options{InOrder: true}})
	require.True(t, s.dev.Features().Has(virtio.FInOrder))
	var rxHeads, txHeads []uint16
	add := func(q int, readable [][]byte, writable []uint32) {
		h, err := s.drv[q].Add(readable, writable)
		require.NoError(t, err)
		if q == 0 {
			rxHeads = append(rxHeads, h)
		} else {
			txHeads = append(txHeads, h)
		}
	}
	add(0, nil, []uint32{8}) // too small for the header: returned empty
	for i := 0; i < 6; i++ {
		add(0, nil, []uint32{128})
	}
	s.drv[0].Queue.Publish()
	sizes := []int{10, 300, 50, 900} // the last needs more buffers than are left
	for i, n := range sizes {
		add(1, [][]byte{s.hdr(), frame(s.dev.MAC(), uint32(i), n)}, nil)
	}
	s.drv[1].Queue.Publish()
	require.NoError(t, s.kick[1].Signal())
	for i, c := range s.waitN(1, len(sizes)) {
		assert.Equal(t, txHeads[i], c.Head, "tx completion %d", i)
	}
	// Frame 0 meets the 8-byte buffer first: header does not fit, the buffer
	// goes back empty and the frame is dropped. Frame 1 takes 3 buffers,
	// frame 2 one; frame 3 needs 8, finds 2, is dropped and the 2 stay held.
	got := s.waitN(0, 5)
	for i, c := range got {
		assert.Equal(t, rxHeads[i], c.Head, "rx completion %d", i)
	}
	assert.Zero(t, got[0].Len)
	assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropRxTooSmall))
	assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropRxNoBuffer))
	// The held buffers are the next ones used, in order.
	add(0, nil, []uint32{2048})
	s.drv[0].Queue.Publish()
	add(1, [][]byte{s.hdr(), frame(s.dev.MAC(), 9, 100)}, nil) // 130 bytes: 2 buffers
	s.drv[1].Queue.Publish()
	require.NoError(t, s.kick[1].Signal())
	got = s.waitN(0, 2)
	assert.Equal(t, rxHeads[5], got[0].Head)
	assert.Equal(t, rxHeads[6], got[1].Head)
	h, err := virtio.DecodeNetHdr(got[0].Data, virtio.NetHdrSize)
	require.NoError(t, err)
	assert.Equal(t, uint16(2), h.NumBuffers)
}

func TestHostileRingSetsNeedsReset(t *testing.T) {
	// §2.1.2: a device that enters an error state sets DEVICE_NEEDS_RESET.
	// The driver here publishes avail.idx far beyond the queue size.
	s := newStack(t, stackOptions{features: base})
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], 1000)
	require.NoError(t, s.mem.Write(s.layouts[1].Avail+2, idx[:]))
	require.NoError(t, s.kick[1].Signal())
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := s.local.Status()
		require.NoError(t, err)
		if st&virtio.StatusDeviceNeedsReset != 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "status %v", st)
		time.Sleep(time.Millisecond)
	}
	err := s.local.QueueErr(1)
	assert.ErrorIs(t, err, vring.ErrAvailIdxJump)
	assert.ErrorIs(t, s.dev.QueueErr(1), vring.ErrAvailIdxJump)
	// A reset brings the device back.
	require.NoError(t, s.local.SetStatus(0))
	st, err := s.local.Status()
	require.NoError(t, err)
	assert.Zero(t, st)
}

// TestLargeSplitFramesGathered: frames larger than the transmit queue's
// initial gather buffer, split across descriptors, come back whole, before
// and after the buffer has grown, and so do small ones after that.
func TestLargeSplitFramesGathered(t *testing.T) {
	s := newStack(t, stackOptions{features: base.With(virtio.NetFMrgRxbuf), slot: 65536})
	for i, n := range []int{700, 9000, 9000, 60000 - 14, 100} {
		f := frame(s.dev.MAC(), uint32(i), n)
		segs := [][]byte{s.hdr()}
		for off := 0; off < len(f); off += 1000 {
			segs = append(segs, f[off:min(off+1000, len(f))])
		}
		if len(segs) > vringtest.MaxSegs {
			// One descriptor per 5000 bytes for the largest frame.
			segs = [][]byte{s.hdr()}
			for off := 0; off < len(f); off += 5000 {
				segs = append(segs, f[off:min(off+5000, len(f))])
			}
		}
		need := (virtio.NetHdrSize + len(f) + 4095) / 4096
		s.postRx(0, need, 4096)
		_, err := s.drv[1].Add(segs, nil)
		require.NoError(t, err)
		s.drv[1].Queue.Publish()
		require.NoError(t, s.kick[1].Signal())
		cs := s.waitN(0, need)
		var all []byte
		for _, c := range cs {
			all = append(all, c.Data...)
		}
		require.Equal(t, f, all[virtio.NetHdrSize:], "frame %d of %d bytes in %d descriptors", i, n, len(segs))
		s.wait(1)
	}
}

// macTableCmd is a MAC_TABLE_SET command (virtio 1.2 §5.1.6.5.2) with
// nuni unicast and nmulti multicast entries, none of them want.
func macTableCmd(nuni, nmulti int) []byte {
	tbl := binary.LittleEndian.AppendUint32(nil, uint32(nuni))
	for i := range nuni {
		tbl = append(tbl, 0x02, 0xcc, 0, 0, byte(i>>8), byte(i))
	}
	tbl = binary.LittleEndian.AppendUint32(tbl, uint32(nmulti))
	for i := range nmulti {
		tbl = append(tbl, 0x01, 0x00, 0x5e, 0, byte(i>>8), byte(i))
	}
	return ctrlCmd(virtio.NetCtrlMAC, virtio.NetCtrlMACTableSet, tbl...)
}

// TestMACTableOverflow: a MAC_TABLE_SET with more than MACTableEntries
// addresses of a kind turns filtering of that kind off (every frame of
// that kind accepted, as QEMU does past its table), so that no table a
// driver sends makes each received frame scan thousands of entries; up to
// MACTableEntries the filter stays exact.
func TestMACTableOverflow(t *testing.T) {
	f := base.With(virtio.NetFCtrlVQ, virtio.NetFCtrlRx)
	uniX := [6]byte{0x02, 0xdd, 0, 0, 0, 1}      // in no table
	multiX := [6]byte{0x01, 0x00, 0x5e, 9, 9, 9} // in no table
	uniIn := [6]byte{0x02, 0xcc, 0, 0, 0, 63}    // entry 63 of a unicast table
	tests := []struct {
		name                 string
		nuni, nmulti         int
		wantUniX, wantMultiX bool
	}{
		{"both tables full", softnet.MACTableEntries, softnet.MACTableEntries, false, false},
		{"unicast one over", softnet.MACTableEntries + 1, 0, true, false},
		{"multicast one over", 0, softnet.MACTableEntries + 1, false, true},
		{"both over", softnet.MACTableEntries + 1, softnet.MACTableEntries + 1, true, true},
		{"ten thousand unicast", 10000, 1, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStack(t, stackOptions{features: f, slot: 64 << 10})
			const cq = 2
			s.postRx(0, 16, 2048)
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlRx, virtio.NetCtrlRxPromisc, 0)))
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, ctrlCmd(virtio.NetCtrlRx, virtio.NetCtrlRxAllMulti, 0)))
			require.Equal(t, virtio.NetCtrlOK, s.sendCtrl(cq, macTableCmd(tt.nuni, tt.nmulti)))

			s.send(1, frame(uniX, 1, 10), frame(multiX, 2, 10), frame(s.dev.MAC(), 3, 10))
			sent := 3
			want := []uint32{}
			if tt.wantUniX {
				want = append(want, 1)
			}
			if tt.wantMultiX {
				want = append(want, 2)
			}
			want = append(want, 3)
			if tt.nuni >= 64 {
				s.send(1, frame(uniIn, 4, 10))
				sent++
				want = append(want, 4)
			}
			for _, seq := range want {
				_, got := s.recvFrame(0)
				assert.Equal(t, seq, seqOf(got))
			}
			s.waitN(1, sent)
			assert.EqualValues(t, sent-len(want), s.dev.Stats().Drop(softnet.DropFiltered))
		})
	}
}

// TestFramesBeforeAHostileChainGoOut: the transmit worker pops chains in
// groups; when a group's PopBatch stops at a chain that breaks the ring's
// rules, the frames it popped before that one are still transmitted (here
// replied to, in order, and counted), and only then is the queue broken
// (with the typed error, and DEVICE_NEEDS_RESET). Good frames and the
// hostile head are made available in one avail.idx store, so they are in
// one group.
func TestFramesBeforeAHostileChainGoOut(t *testing.T) {
	s := newStack(t, stackOptions{features: base, dev: softnet.Options{Handler: softnet.Loopback}})
	s.postRx(0, 8, 2048)
	var sent [][]byte
	for i := range 3 {
		f := frame(s.dev.MAC(), uint32(i), 64)
		sent = append(sent, f)
		_, err := s.drv[1].Add([][]byte{s.hdr(), f}, nil)
		require.NoError(t, err)
	}
	// Add wrote the three chains' avail entries; no Publish: avail.idx
	// goes from 0 to 4 in one store, after the hostile fourth entry.
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], 0xffff) // a head beyond any queue
	require.NoError(t, s.mem.Write(s.layouts[1].Avail+4+2*3, b[:]))
	binary.LittleEndian.PutUint16(b[:], 4)
	require.NoError(t, s.mem.Write(s.layouts[1].Avail+2, b[:]))
	require.NoError(t, s.kick[1].Signal())

	for i := range sent {
		_, got := s.recvFrame(0)
		require.Equal(t, sent[i], got, "reply %d", i)
	}
	// The transmit chains themselves are not returned: the ring is broken
	// (vring pushes nothing on it), and the driver is to reset the device.
	s.waitNeedsReset()
	require.ErrorIs(t, s.dev.QueueErr(1), vring.ErrHeadOutOfRange)
	assert.Equal(t, uint64(len(sent)), s.dev.Stats().Tx().Frames)
}
