package softnet

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// tcp4GSO returns a TCPv4 GSO frame with payload bytes of payload and its
// header (partial checksum left as zero: the device overwrites it).
func tcp4GSO(dst [6]byte, payload int, mss uint16) (virtio.NetHdr, []byte) {
	f := make([]byte, 14+20+20+payload)
	copy(f, dst[:])
	binary.BigEndian.PutUint16(f[12:], etherIPv4)
	ip := f[14:]
	ip[0], ip[8], ip[9] = 0x45, 64, ipProtoTCP
	binary.BigEndian.PutUint16(ip[2:], uint16(len(f)-14))
	copy(ip[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	tcp := f[34:]
	tcp[12], tcp[13] = 5<<4, 0x18
	for i := range payload {
		f[54+i] = byte(i)
	}
	return virtio.NetHdr{Flags: virtio.NetHdrFNeedsCsum, GSOType: virtio.NetHdrGSOTCPv4, HdrLen: 54, GSOSize: mss,
		CsumStart: 34, CsumOffset: 16}, f
}

// newOffloadLoop is newLoop for a device with offloads, transmitting one
// fixed frame with header h, and receive buffers of rxLen bytes.
func newOffloadLoop(tb testing.TB, f virtio.Features, h virtio.NetHdr, frame []byte, rxLen uint32) *loop {
	tb.Helper()
	return newLoopFrame(tb, f, true, h, func(*Device) []byte { return frame }, rxLen)
}

// TestOffloadPathsAllocateNothing: a 64 KiB TSO frame passed through to a
// driver with GUEST_TSO4 (one copy into its buffers), completed and
// segmented in software for one without, allocates nothing per frame once
// the queues' segment buffers exist.
func TestOffloadPathsAllocateNothing(t *testing.T) {
	v1 := virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf)
	all := v1 | HostOffloads | GuestOffloads
	h, f := tcp4GSO([6]byte{0x02, 0, 0, 0, 0, 1}, 65000, 1448)
	csum := h
	csum.GSOType, csum.GSOSize = 0, 0
	small := f[:54+1000]
	binary.BigEndian.PutUint16(small[16:], uint16(len(small)-14))
	for _, tt := range []struct {
		name   string
		f      virtio.Features
		h      virtio.NetHdr
		frame  []byte
		rxLen  uint32
		rxPerF int
	}{
		{"TSO frame passed through", all, h, f, 1 << 16, 1},
		{"TSO frame segmented for the driver", v1 | HostOffloads, h, f, 1 << 16, 45},
		{"checksum completed for the driver", v1 | HostOffloads, csum, small, 2048, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			l := newOffloadLoop(t, tt.f, tt.h, tt.frame, tt.rxLen)
			round := func() {
				l.post(t, tt.rxPerF, 1)
				n, err := l.d.txBatch(l.tx)
				require.NoError(t, err)
				require.Equal(t, 1, n)
				_, _, ok, err := l.txq.Reclaim()
				require.True(t, ok)
				require.NoError(t, err)
				for range tt.rxPerF {
					_, _, ok, err := l.rxq.Reclaim()
					require.True(t, ok)
					require.NoError(t, err)
				}
			}
			round()
			require.Zero(t, testing.AllocsPerRun(20, round))
			st := l.d.Stats()
			require.Equal(t, uint64(22*tt.rxPerF), st.Queues[0].Frames, "one round, then AllocsPerRun's warm-up and 20")
			require.Equal(t, [numDropReasons]uint64{}, st.Drops)
		})
	}
}

// BenchmarkOffload measures a 64 KiB TSO frame through the loopback,
// passed through and segmented in software.
func BenchmarkOffload(b *testing.B) {
	v1 := virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf)
	h, f := tcp4GSO([6]byte{0x02, 0, 0, 0, 0, 1}, 65000, 1448)
	for _, bc := range []struct {
		name   string
		f      virtio.Features
		rxPerF int
	}{{"passthrough", v1 | HostOffloads | GuestOffloads, 1}, {"segmented", v1 | HostOffloads, 45}} {
		b.Run(bc.name, func(b *testing.B) {
			l := newOffloadLoop(b, bc.f, h, f, 1<<16)
			b.ReportAllocs()
			b.SetBytes(int64(len(f)))
			for b.Loop() {
				l.post(b, bc.rxPerF, 1)
				if n, err := l.d.txBatch(l.tx); n != 1 || err != nil {
					b.Fatal(n, err)
				}
				l.txq.Reclaim()
				for range bc.rxPerF {
					l.rxq.Reclaim()
				}
			}
		})
	}
}

// FuzzOffloadHeader checks arbitrary headers against arbitrary frames:
// checkHdr never panics; a header it accepts is safe to act on (the
// checksum field lies in the frame; segmentation produces segments no
// longer than headers plus gso_size whose payloads concatenate to the
// frame's; hdr_len within the frame, the headers' length for GSO; no
// flag but NEEDS_CSUM from a driver); one it rejects matches ErrBadHeader. The accepted ones then go
// through the device (transmit, loopback, receive into a driver without
// the GUEST_* offloads), which must not drop them for a bad header.
func FuzzOffloadHeader(f *testing.F) {
	h, fr := tcp4GSO([6]byte{0x02, 0, 0, 0, 0, 1}, 3000, 1000)
	var hb [virtio.NetHdrSize]byte
	_ = h.Encode(hb[:], virtio.NetHdrSize)
	f.Add(hb[:], fr)
	f.Add(make([]byte, 12), fr[:60])
	h.GSOType = virtio.NetHdrGSOUDPL4
	_ = h.Encode(hb[:], virtio.NetHdrSize)
	f.Add(hb[:], fr)
	feat := virtio.Features(0).With(virtio.FVersion1, virtio.NetFMrgRxbuf) | HostOffloads
	buf := make([]byte, MaxFrame)
	f.Fuzz(func(t *testing.T, hdr []byte, frame []byte) {
		if len(hdr) < virtio.NetHdrSize || len(frame) > 1<<14 {
			return
		}
		h, err := virtio.DecodeNetHdr(hdr, virtio.NetHdrSize)
		require.NoError(t, err)
		h.NumBuffers = 0
		for _, fromDriver := range []bool{true, false} {
			p, err := checkHdr(&h, frame, feat, fromDriver)
			if err != nil {
				require.ErrorIs(t, err, ErrBadHeader)
				continue
			}
			// What is handed on never carries a hint a kernel rejects,
			// nor a flag the device ignored.
			require.LessOrEqual(t, int(h.HdrLen), len(frame), "hdr_len handed on")
			if fromDriver {
				require.Zero(t, h.Flags&^virtio.NetHdrFNeedsCsum, "flags handed on")
			}
			if h.Flags&virtio.NetHdrFNeedsCsum != 0 {
				require.LessOrEqual(t, int(h.CsumStart)+int(h.CsumOffset)+2, len(frame))
				cp := append([]byte(nil), frame...)
				completeCsum(&h, cp)
			}
			if gsoKind(&h) == virtio.NetHdrGSONone {
				continue
			}
			require.Equal(t, p.payload, int(h.HdrLen), "hdr_len of a GSO frame")
			var s segmenter
			s.init(frame, p, h.GSOSize)
			var total int
			for seg := s.next(buf); seg != nil; seg = s.next(buf) {
				require.LessOrEqual(t, len(seg), p.payload+int(h.GSOSize))
				require.Equal(t, frame[p.payload+total:p.payload+total+len(seg)-p.payload], seg[p.payload:])
				total += len(seg) - p.payload
			}
			require.Equal(t, len(frame)-p.payload, total)
		}
		if _, err := checkHdr(&h, frame, feat, true); err != nil || len(frame) < 14 {
			return
		}
		l := newOffloadLoop(t, feat, h, frame, 1<<15)
		l.post(t, 8, 1)
		n, err := l.d.txBatch(l.tx)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		st := l.d.Stats()
		require.Zero(t, st.Drop(DropTxBadHeader)+st.Drop(DropRxBadHeader), "an accepted header was dropped later")
	})
}
