package softnet_test

import (
	"encoding/binary"
	"net"
	"sync"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

var (
	allOffloads = base.With(virtio.NetFMrgRxbuf) | softnet.HostOffloads | softnet.GuestOffloads
	hostOnly    = base.With(virtio.NetFMrgRxbuf) | softnet.HostOffloads
)

// gsoSpec describes a GSO frame as a Linux driver hands it over: the
// headers of the whole packet, a partial checksum (the pseudo-header sum,
// not complemented) in the transport checksum field, NEEDS_CSUM, csum_start
// at the transport header.
type gsoSpec struct {
	v6, udp, vlan bool
	payload       int
	mss           uint16
	tcpFlags      uint8 // besides ACK
	ecn           bool
}

func (g gsoSpec) build(t *testing.T) (virtio.NetHdr, []byte) {
	t.Helper()
	src := net.HardwareAddr{0x02, 0xaa, 0, 0, 0, 1}
	dst := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	var ls []gopacket.SerializableLayer
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4}
	if g.v6 {
		eth.EthernetType = layers.EthernetTypeIPv6
	}
	ls = append(ls, eth)
	if g.vlan {
		eth2 := *eth
		eth.EthernetType = layers.EthernetTypeDot1Q
		ls = []gopacket.SerializableLayer{eth, &layers.Dot1Q{VLANIdentifier: 7, Type: eth2.EthernetType}}
	}
	var netl gopacket.NetworkLayer
	proto := layers.IPProtocolTCP
	if g.udp {
		proto = layers.IPProtocolUDP
	}
	if g.v6 {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: proto,
			SrcIP: net.ParseIP("fd00::1"), DstIP: net.ParseIP("fd00::2")}
		netl = ip
		ls = append(ls, ip)
	} else {
		ip := &layers.IPv4{Version: 4, TTL: 64, Id: 0x1234, Flags: layers.IPv4DontFragment, Protocol: proto,
			SrcIP: net.IP{10, 9, 0, 1}, DstIP: net.IP{10, 9, 0, 2}}
		netl = ip
		ls = append(ls, ip)
	}
	payload := make([]byte, g.payload)
	for i := range payload {
		payload[i] = byte(i*7 + i>>8)
	}
	gsoType := virtio.NetHdrGSOTCPv4
	csumOff := uint16(16)
	if g.udp {
		u := &layers.UDP{SrcPort: 4000, DstPort: 5000}
		require.NoError(t, u.SetNetworkLayerForChecksum(netl))
		ls = append(ls, u)
		gsoType, csumOff = virtio.NetHdrGSOUDPL4, 6
	} else {
		tc := &layers.TCP{SrcPort: 4000, DstPort: 5000, Seq: 0xfffff000, Ack: 77, ACK: true, Window: 500,
			PSH: g.tcpFlags&0x08 != 0, FIN: g.tcpFlags&0x01 != 0, CWR: g.tcpFlags&0x80 != 0}
		require.NoError(t, tc.SetNetworkLayerForChecksum(netl))
		ls = append(ls, tc)
		if g.v6 {
			gsoType = virtio.NetHdrGSOTCPv6
		}
	}
	ls = append(ls, gopacket.Payload(payload))
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...))
	f := append([]byte(nil), buf.Bytes()...)
	l3 := 14
	if g.vlan {
		l3 = 18
	}
	l4 := l3 + 20
	if g.v6 {
		l4 = l3 + 40
	}
	hl := l4 + 8
	if !g.udp {
		hl = l4 + int(f[l4+12]>>4)*4
	}
	// Replace the full checksum with the partial one a driver leaves.
	binary.BigEndian.PutUint16(f[l4+int(csumOff):], refFold(refPseudo(f, l3, l4, g.v6, g.udp, len(f)-l4)))
	if g.ecn {
		gsoType |= virtio.NetHdrGSOECN
	}
	return virtio.NetHdr{Flags: virtio.NetHdrFNeedsCsum, GSOType: gsoType, HdrLen: uint16(hl), GSOSize: g.mss,
		CsumStart: uint16(l4), CsumOffset: csumOff}, f
}

// refSum, refFold and refPseudo are the test's own ones' complement
// arithmetic (RFC 1071), written independently of the device's.
func refSum(b []byte) uint32 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func refFold(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func refPseudo(f []byte, l3, l4 int, v6, udp bool, l4len int) uint32 {
	proto := uint32(6)
	if udp {
		proto = 17
	}
	if v6 {
		return refSum(f[l3+8:l3+40]) + proto + uint32(l4len)
	}
	return refSum(f[l3+12:l3+20]) + proto + uint32(l4len)
}

// checkSegments verifies that segs are the wire frames of the GSO frame f
// (header h): every checksum valid, lengths right, TCP sequence numbers
// and flags as segmentation leaves them, payloads concatenating to f's.
func checkSegments(t *testing.T, g gsoSpec, h virtio.NetHdr, f []byte, segs [][]byte) {
	t.Helper()
	n := (g.payload + int(g.mss) - 1) / int(g.mss)
	require.Len(t, segs, n, "one frame per gso_size of payload")
	l4 := int(h.CsumStart)
	l3 := 14
	if g.vlan {
		l3 = 18
	}
	hl := int(h.HdrLen)
	var payload []byte
	for i, s := range segs {
		require.LessOrEqual(t, len(s)-hl, int(g.mss), "segment %d", i)
		assert.Equal(t, f[:l3], s[:l3], "Ethernet header of segment %d", i)
		if g.v6 {
			assert.Equal(t, len(s)-l3-40, int(binary.BigEndian.Uint16(s[l3+4:])), "IPv6 payload length %d", i)
		} else {
			assert.Equal(t, len(s)-l3, int(binary.BigEndian.Uint16(s[l3+2:])), "IPv4 total length %d", i)
			assert.Equal(t, uint16(0x1234+i), binary.BigEndian.Uint16(s[l3+4:]), "IPv4 identification %d", i)
			assert.Equal(t, uint16(0xffff), refFold(refSum(s[l3:l4])), "IPv4 header checksum %d", i)
		}
		assert.Equal(t, uint16(0xffff), refFold(refPseudo(s, l3, l4, g.v6, g.udp, len(s)-l4)+refSum(s[l4:])),
			"transport checksum of segment %d", i)
		if g.udp {
			assert.Equal(t, len(s)-l4, int(binary.BigEndian.Uint16(s[l4+4:])), "UDP length %d", i)
		} else {
			assert.Equal(t, uint32(0xfffff000)+uint32(len(payload)), binary.BigEndian.Uint32(s[l4+4:]), "sequence %d", i)
			fl := s[l4+13]
			last := i == len(segs)-1
			assert.Equal(t, last && g.tcpFlags&0x01 != 0, fl&0x01 != 0, "FIN only on the last segment (%d)", i)
			assert.Equal(t, last && g.tcpFlags&0x08 != 0, fl&0x08 != 0, "PSH only on the last segment (%d)", i)
			assert.Equal(t, i == 0 && g.tcpFlags&0x80 != 0, fl&0x80 != 0, "CWR only on the first segment (%d)", i)
			assert.NotZero(t, fl&0x10, "ACK on every segment")
		}
		payload = append(payload, s[hl:]...)
	}
	assert.Equal(t, f[hl:], payload, "payloads concatenate to the original")
}

var gsoCases = []struct {
	name string
	g    gsoSpec
}{
	{"TCPv4", gsoSpec{payload: 20000, mss: 1448, tcpFlags: 0x08}},
	{"TCPv4 FIN and CWR with ECN", gsoSpec{payload: 5000, mss: 1000, tcpFlags: 0x89, ecn: true}},
	{"TCPv4 behind a VLAN tag, payload a multiple of gso_size", gsoSpec{payload: 4000, mss: 1000, vlan: true}},
	{"TCPv6", gsoSpec{v6: true, payload: 60000, mss: 1428, tcpFlags: 0x08}},
	{"UDPv4 (USO)", gsoSpec{udp: true, payload: 9000, mss: 1472}},
	{"UDPv6 (USO) odd sizes", gsoSpec{v6: true, udp: true, payload: 7777, mss: 1001}},
}

func TestOffloadFeatureDependencies(t *testing.T) {
	for _, fctl := range []bool{false, true} {
		dev, err := softnet.New(&softnet.Options{Offload: true, FrontendCtrl: fctl})
		require.NoError(t, err)
		assert.Equal(t, softnet.HostOffloads|softnet.GuestOffloads, dev.Features()&(softnet.HostOffloads|softnet.GuestOffloads))
		tests := []struct {
			name string
			f    virtio.Features
			ok   bool
		}{
			{"every offload", allOffloads, true},
			{"GUEST_TSO4 requires GUEST_CSUM", base.With(virtio.NetFGuestTSO4), false},
			{"GUEST_TSO6 requires GUEST_CSUM", base.With(virtio.NetFGuestTSO6), false},
			{"GUEST_USO4 requires GUEST_CSUM", base.With(virtio.NetFGuestUSO4), false},
			{"GUEST_USO6 requires GUEST_CSUM", base.With(virtio.NetFGuestUSO6), false},
			{"GUEST_ECN requires GUEST_TSO4 or GUEST_TSO6", base.With(virtio.NetFGuestCsum, virtio.NetFGuestECN), false},
			{"GUEST_ECN with GUEST_TSO6", base.With(virtio.NetFGuestCsum, virtio.NetFGuestTSO6, virtio.NetFGuestECN), true},
			{"HOST_TSO4 requires CSUM", base.With(virtio.NetFHostTSO4), false},
			{"HOST_TSO6 requires CSUM", base.With(virtio.NetFHostTSO6), false},
			{"HOST_USO requires CSUM", base.With(virtio.NetFHostUSO), false},
			{"HOST_ECN requires HOST_TSO4 or HOST_TSO6", base.With(virtio.NetFCsum, virtio.NetFHostECN), false},
			{"HOST_ECN with HOST_TSO4", base.With(virtio.NetFCsum, virtio.NetFHostTSO4, virtio.NetFHostECN), true},
			{"checksums alone", base.With(virtio.NetFCsum, virtio.NetFGuestCsum), true},
		}
		for _, tt := range tests {
			err := dev.SetFeatures(tt.f)
			if tt.ok {
				assert.NoError(t, err, tt.name)
			} else {
				assert.ErrorIs(t, err, softnet.ErrFeatures, tt.name)
			}
		}
	}
	plain, err := softnet.New(nil)
	require.NoError(t, err)
	assert.Zero(t, plain.Features()&(softnet.HostOffloads|softnet.GuestOffloads), "offloads are offered on request only")
	assert.Equal(t, "HOST_USO", virtio.NetFHostUSO.Name(virtio.DeviceNet))
	assert.Equal(t, "GUEST_USO4", virtio.NetFGuestUSO4.Name(virtio.DeviceNet))
	assert.Equal(t, "GUEST_USO6", virtio.NetFGuestUSO6.Name(virtio.DeviceNet))
}

// sendHdr transmits frame with header h on queue q.
func (s *stack) sendHdr(q int, h virtio.NetHdr, frame []byte) {
	s.t.Helper()
	hb := make([]byte, s.hdrLen)
	require.NoError(s.t, h.Encode(hb, s.hdrLen))
	_, err := s.drv[q].Add([][]byte{hb, frame}, nil)
	require.NoError(s.t, err)
	s.drv[q].Queue.Publish()
	if s.drv[q].Queue.NeedsKick() {
		require.NoError(s.t, s.kick[q].Signal())
	}
}

// TestLoopbackPassesOffloadsThrough: a driver with every offload gets its
// GSO frame back whole, header as sent (§5.1.6.4: GUEST_TSO and
// GUEST_CSUM let the device hand over the same header).
func TestLoopbackPassesOffloadsThrough(t *testing.T) {
	for _, tc := range gsoCases {
		t.Run(tc.name, func(t *testing.T) {
			s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: allOffloads, slot: 1 << 16})
			s.postRx(0, 32, 4096)
			h, f := tc.g.build(t)
			s.sendHdr(1, h, f)
			got, data := s.recvFrame(0)
			assert.Equal(t, f, data)
			want := h
			want.NumBuffers = got.NumBuffers
			assert.Equal(t, want, got)
			assert.Equal(t, (len(f)+s.hdrLen+4095)/4096, int(got.NumBuffers), "MRG_RXBUF buffers of a 64 KiB frame")
			st := s.dev.Stats()
			assert.Equal(t, [len(st.Drops)]uint64{}, st.Drops)
		})
	}
}

// TestLoopbackSegmentsForDriverWithoutGuestOffloads: the driver transmits
// with HOST_TSO/USO but did not negotiate GUEST_*: the device segments the
// frame itself and the driver receives wire frames with zero headers.
func TestLoopbackSegmentsForDriverWithoutGuestOffloads(t *testing.T) {
	for _, mrg := range []bool{true, false} {
		for _, tc := range gsoCases {
			t.Run(tc.name, func(t *testing.T) {
				f := hostOnly
				if !mrg {
					f &^= virtio.NetFMrgRxbuf.Bit()
				}
				s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: f, size: 128, slot: 1 << 16})
				h, fr := tc.g.build(t)
				n := (tc.g.payload + int(tc.g.mss) - 1) / int(tc.g.mss)
				s.postRx(0, n, 2048)
				s.sendHdr(1, h, fr)
				var segs [][]byte
				for range n {
					got, data := s.recvFrame(0)
					assert.Equal(t, virtio.NetHdr{NumBuffers: got.NumBuffers}, got, "zero header")
					segs = append(segs, data)
				}
				checkSegments(t, tc.g, h, fr, segs)
				st := s.dev.Stats()
				assert.Equal(t, uint64(1), st.Queues[1].Frames)
				assert.Equal(t, uint64(n), st.Queues[0].Frames)
			})
		}
	}
}

// TestChecksumCompletedForDriverWithoutGuestCsum: NEEDS_CSUM without GSO,
// to a driver without GUEST_CSUM: the device computes the checksum.
func TestChecksumCompletedForDriverWithoutGuestCsum(t *testing.T) {
	for _, g := range []gsoSpec{{payload: 1000, mss: 1448}, {v6: true, udp: true, payload: 333, mss: 1448}} {
		s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: base.With(virtio.NetFCsum)})
		s.postRx(0, 1, 2048)
		h, f := g.build(t)
		h.GSOType, h.GSOSize, h.HdrLen = 0, 0, 0
		s.sendHdr(1, h, f)
		got, data := s.recvFrame(0)
		assert.Equal(t, virtio.NetHdr{NumBuffers: 1}, got)
		checkSegments(t, g, virtio.NetHdr{CsumStart: h.CsumStart, HdrLen: h.CsumStart + 8 + 12*boolInt(!g.udp)}, f, [][]byte{data})
	}
}

func boolInt(b bool) uint16 {
	if b {
		return 1
	}
	return 0
}

// recorder is an OffloadHandler taking the offloads acc that keeps copies
// of what it gets.
type recorder struct {
	mu     sync.Mutex
	acc    virtio.Features
	hdrs   []virtio.NetHdr
	frames [][]byte
}

func (r *recorder) HandleFrame(_ *softnet.Tx, f []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hdrs = append(r.hdrs, virtio.NetHdr{})
	r.frames = append(r.frames, append([]byte(nil), f...))
}
func (r *recorder) TxOffloads() virtio.Features { return r.acc }
func (r *recorder) HandleOffload(_ *softnet.Tx, h virtio.NetHdr, f []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hdrs = append(r.hdrs, h)
	r.frames = append(r.frames, append([]byte(nil), f...))
}

func (r *recorder) got() ([]virtio.NetHdr, [][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]virtio.NetHdr(nil), r.hdrs...), append([][]byte(nil), r.frames...)
}

// TestHandlerOffloads: what the handler does not take, the device does.
func TestHandlerOffloads(t *testing.T) {
	tcp := gsoCases[0].g
	for _, tt := range []struct {
		name    string
		acc     virtio.Features
		plain   bool
		segment bool
	}{
		{"plain FrameHandler gets wire frames", 0, true, true},
		{"CSUM only: segmented", virtio.NetFCsum.Bit(), false, true},
		{"TSO4 taken: the frame as it is", virtio.Features(0).With(virtio.NetFCsum, virtio.NetFHostTSO4), false, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{acc: tt.acc}
			var h softnet.FrameHandler = r
			if tt.plain {
				h = softnet.FrameHandlerFunc(r.HandleFrame)
			}
			s := newStack(t, stackOptions{dev: softnet.Options{Offload: true, Handler: h}, features: hostOnly, slot: 1 << 16})
			hd, f := tcp.build(t)
			s.sendHdr(1, hd, f)
			s.wait(1)
			hdrs, frames := r.got()
			if tt.segment {
				for _, x := range hdrs {
					assert.Equal(t, virtio.NetHdr{}, x)
				}
				checkSegments(t, tcp, hd, f, frames)
			} else {
				require.Len(t, frames, 1)
				assert.Equal(t, f, frames[0])
				assert.Equal(t, hd, hdrs[0])
			}
		})
	}
}

// headerLie is a header that does not describe its frame, with the error
// it must give.
type headerLie struct {
	name     string
	h        virtio.NetHdr
	frame    []byte
	err      error
	txOnly   bool // a driver-side rule (features, NEEDS_CSUM with GSO)
	features virtio.Features
}

// headerLies are headers that do not describe their frame (a TCPv4 GSO
// frame of 5000 bytes of payload, or a driver that negotiated only hostOnly
// &^ HOST_USO), each with the error it must give. hdr_len and the flags
// other than NEEDS_CSUM are not among them on the transmit side: the
// device ignores them (TestTransmitIgnoresFlagsAndHdrLen).
func headerLies(t *testing.T) []headerLie {
	h, f := gsoSpec{payload: 5000, mss: 1000}.build(t)
	with := func(mod func(*virtio.NetHdr)) virtio.NetHdr { x := h; mod(&x); return x }
	h6, f6 := gsoSpec{v6: true, payload: 3000, mss: 1000}.build(t)
	hu, fu := gsoSpec{udp: true, payload: 3000, mss: 1000}.build(t)
	type lie = headerLie
	return []lie{
		{"csum_start past the frame", with(func(x *virtio.NetHdr) { x.CsumStart = uint16(len(f)) }), f, softnet.ErrHdrCsum, false, 0},
		{"csum_offset past the frame", with(func(x *virtio.NetHdr) { x.CsumOffset = uint16(len(f)) - x.CsumStart - 1 }), f, softnet.ErrHdrCsum, false, 0},
		{"csum_start+csum_offset overflows 16 bits", with(func(x *virtio.NetHdr) { x.CsumStart, x.CsumOffset = 0xffff, 0xffff }), f, softnet.ErrHdrCsum, false, 0},
		{"gso_size 0 with a gso_type", with(func(x *virtio.NetHdr) { x.GSOSize = 0 }), f, softnet.ErrHdrGSOSize, false, 0},
		{"unknown gso_type 2", with(func(x *virtio.NetHdr) { x.GSOType = 2 }), f, softnet.ErrHdrGSOType, false, 0},
		{"unknown gso_type 0x7f", with(func(x *virtio.NetHdr) { x.GSOType = 0x7f }), f, softnet.ErrHdrGSOType, false, 0},
		{"UFO (gso_type UDP) is not offered", with(func(x *virtio.NetHdr) { x.GSOType = virtio.NetHdrGSOUDP }), f, softnet.ErrHdrGSOType, false, 0},
		{"ECN bit without a gso_type", with(func(x *virtio.NetHdr) { x.GSOType = virtio.NetHdrGSOECN }), f, softnet.ErrHdrGSOType, false, 0},
		{"TCPV4 on an IPv6 frame", with(func(x *virtio.NetHdr) { x.CsumStart = h6.CsumStart }), f6, softnet.ErrHdrGSOPacket, false, 0},
		{"TCPV6 on an IPv4 frame", with(func(x *virtio.NetHdr) { x.GSOType = virtio.NetHdrGSOTCPv6 }), f, softnet.ErrHdrGSOPacket, false, 0},
		{"UDP_L4 on a TCP frame", with(func(x *virtio.NetHdr) { x.GSOType = virtio.NetHdrGSOUDPL4 }), f, softnet.ErrHdrGSOPacket, false, 0},
		{"csum_offset not at the TCP checksum", with(func(x *virtio.NetHdr) { x.CsumOffset = 10 }), f, softnet.ErrHdrGSOPacket, false, 0},
		{"csum_offset of TCP on a UDP frame", func() virtio.NetHdr { x := hu; x.CsumOffset = 16; return x }(), fu, softnet.ErrHdrGSOPacket, false, 0},
		{"csum_start not at the transport header", with(func(x *virtio.NetHdr) { x.CsumStart -= 4; x.CsumOffset += 4 }), f, softnet.ErrHdrGSOPacket, false, 0},
		{"GSO frame cut inside the TCP header", h, f[:h.CsumStart+10], softnet.ErrHdrCsum, false, 0},
		{"GSO frame without payload", with(func(x *virtio.NetHdr) { x.HdrLen = 0 }), f[:h.HdrLen], softnet.ErrHdrGSOPayload, false, 0},
		{"GSO frame too short for Ethernet", with(func(x *virtio.NetHdr) { x.CsumStart, x.CsumOffset, x.HdrLen = 0, 0, 0 }), f[:5], softnet.ErrHdrGSOPacket, false, 0},
		{"GSO without NEEDS_CSUM from a driver", with(func(x *virtio.NetHdr) { x.Flags = 0 }), f, softnet.ErrHdrGSOCsum, true, 0},
		{"NEEDS_CSUM without CSUM negotiated", with(func(x *virtio.NetHdr) { x.GSOType, x.GSOSize = 0, 0 }), f, softnet.ErrHdrCsumFeat, true, base},
		{"USO without HOST_USO negotiated", hu, fu, softnet.ErrHdrGSOFeat, true, hostOnly &^ virtio.NetFHostUSO.Bit()},
		{"ECN without HOST_ECN negotiated", with(func(x *virtio.NetHdr) { x.GSOType |= virtio.NetHdrGSOECN }), f, softnet.ErrHdrGSOFeat, true,
			hostOnly &^ virtio.NetFHostECN.Bit()},
	}
}

// TestTransmittedHeaderLiesAreDropped: each lie is a counted drop; the
// handler sees nothing, the chain is completed, the next frame goes through.
func TestTransmittedHeaderLiesAreDropped(t *testing.T) {
	for _, tt := range headerLies(t) {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.features
			if f == 0 {
				f = hostOnly
			}
			r := &recorder{acc: softnet.HostOffloads}
			s := newStack(t, stackOptions{dev: softnet.Options{Offload: true, Handler: r}, features: f, slot: 1 << 14})
			s.sendHdr(1, tt.h, tt.frame)
			s.wait(1)
			_, frames := r.got()
			assert.Len(t, frames, 0, "the handler got a frame with a lying header")
			assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropTxBadHeader))
			ok := frame(s.dev.MAC(), 1, 100)
			s.sendHdr(1, virtio.NetHdr{}, ok)
			s.wait(1)
			_, frames = r.got()
			require.Equal(t, 1, len(frames))
			assert.Equal(t, ok, frames[0])
		})
	}
}

// TestDeliveredHeaderLiesAreDropped: the same lies from a host back-end,
// and flags the device does not know (a host back-end's header goes on to
// the driver; only a transmitted one has its unknown flags ignored).
func TestDeliveredHeaderLiesAreDropped(t *testing.T) {
	h, f := gsoSpec{payload: 5000, mss: 1000}.build(t)
	lies := append(headerLies(t),
		headerLie{"unknown flag", virtio.NetHdr{Flags: 0x40}, f, softnet.ErrHdrFlags, false, 0},
		headerLie{"RSC_INFO flag", virtio.NetHdr{Flags: h.Flags | virtio.NetHdrFRscInfo, GSOType: h.GSOType, GSOSize: h.GSOSize,
			CsumStart: h.CsumStart, CsumOffset: h.CsumOffset}, f, softnet.ErrHdrFlags, false, 0})
	for _, tt := range lies {
		if tt.txOnly {
			continue
		}
		t.Run(tt.name, func(t *testing.T) {
			s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: allOffloads})
			s.postRx(0, 4, 2048)
			err := s.dev.DeliverHdr(0, tt.h, tt.frame)
			require.ErrorIs(t, err, tt.err)
			require.ErrorIs(t, err, softnet.ErrBadHeader)
			assert.Equal(t, uint64(1), s.dev.Stats().Drop(softnet.DropRxBadHeader))
			ok := frame(s.dev.MAC(), 1, 100)
			require.NoError(t, s.dev.DeliverHdr(0, virtio.NetHdr{}, ok))
			_, got := s.recvFrame(0)
			assert.Equal(t, ok, got)
		})
	}
}

// TestDeliverHdrDataValid: DATA_VALID reaches a driver with GUEST_CSUM and
// is cleared for one without.
func TestDeliverHdrDataValid(t *testing.T) {
	for _, f := range []virtio.Features{allOffloads, base} {
		s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: f})
		s.postRx(0, 1, 2048)
		fr := frame(s.dev.MAC(), 1, 100)
		require.NoError(t, s.dev.DeliverHdr(0, virtio.NetHdr{Flags: virtio.NetHdrFDataValid, NumBuffers: 9}, fr))
		h, got := s.recvFrame(0)
		assert.Equal(t, fr, got)
		want := virtio.NetHdr{NumBuffers: 1}
		if f.Has(virtio.NetFGuestCsum) {
			want.Flags = virtio.NetHdrFDataValid
		}
		assert.Equal(t, want, h)
	}
}

// TestTransmitIgnoresFlagsAndHdrLen: §5.1.6.2.2 — the device ignores flag
// bits it does not recognize (and DATA_VALID/RSC_INFO, which the driver
// must not set), and must not rely on hdr_len. Such frames are not
// dropped: a handler taking the offloads gets NEEDS_CSUM alone and the
// hdr_len the device parsed; one taking none gets the wire segments.
func TestTransmitIgnoresFlagsAndHdrLen(t *testing.T) {
	g := gsoSpec{payload: 5000, mss: 1000, tcpFlags: 0x08}
	h, f := g.build(t)
	hl := h.HdrLen // the true length of the headers
	for _, tt := range []struct {
		name string
		mod  func(*virtio.NetHdr)
	}{
		{"unknown flag 0x40", func(x *virtio.NetHdr) { x.Flags |= 0x40 }},
		{"RSC_INFO", func(x *virtio.NetHdr) { x.Flags |= virtio.NetHdrFRscInfo }},
		{"DATA_VALID", func(x *virtio.NetHdr) { x.Flags |= virtio.NetHdrFDataValid }},
		{"every flag bit", func(x *virtio.NetHdr) { x.Flags = 0xff }},
		{"hdr_len beyond the frame", func(x *virtio.NetHdr) { x.HdrLen = uint16(len(f) + 1) }},
		{"hdr_len 0xffff", func(x *virtio.NetHdr) { x.HdrLen = 0xffff }},
		{"hdr_len 0", func(x *virtio.NetHdr) { x.HdrLen = 0 }},
		{"hdr_len inside the TCP header", func(x *virtio.NetHdr) { x.HdrLen = x.CsumStart + 4 }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sent := h
			tt.mod(&sent)
			for _, acc := range []virtio.Features{softnet.HostOffloads, 0} {
				r := &recorder{acc: acc}
				s := newStack(t, stackOptions{dev: softnet.Options{Offload: true, Handler: r}, features: hostOnly, slot: 1 << 14})
				s.sendHdr(1, sent, f)
				s.wait(1)
				hdrs, frames := r.got()
				assert.Zero(t, s.dev.Stats().Drop(softnet.DropTxBadHeader))
				if acc != 0 {
					require.Len(t, frames, 1)
					assert.Equal(t, f, frames[0])
					want := h
					want.HdrLen = hl
					assert.Equal(t, want, hdrs[0])
					continue
				}
				for _, x := range hdrs {
					assert.Equal(t, virtio.NetHdr{}, x)
				}
				checkSegments(t, g, h, f, frames)
			}
		})
	}
	t.Run("hdr_len beyond a frame without GSO", func(t *testing.T) {
		r := &recorder{acc: softnet.HostOffloads}
		s := newStack(t, stackOptions{dev: softnet.Options{Offload: true, Handler: r}, features: hostOnly, slot: 1 << 14})
		sent := virtio.NetHdr{Flags: virtio.NetHdrFNeedsCsum, CsumStart: h.CsumStart, CsumOffset: h.CsumOffset, HdrLen: 0xffff}
		s.sendHdr(1, sent, f[:200])
		s.wait(1)
		hdrs, frames := r.got()
		require.Len(t, frames, 1)
		sent.HdrLen = 0
		assert.Equal(t, sent, hdrs[0])
	})
}

// TestDeliverHdrGSO: §5.1.6.4.2 — a GSO frame reaches the driver with
// NEEDS_CSUM and an hdr_len not less than its headers, whatever hdr_len
// the host back-end gave; one without NEEDS_CSUM is segmented instead of
// handed over with a header the spec forbids.
func TestDeliverHdrGSO(t *testing.T) {
	g := gsoSpec{payload: 5000, mss: 1000}
	h, f := g.build(t)
	hl := h.HdrLen
	for _, give := range []uint16{0, 14, hl, uint16(len(f))} {
		s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: allOffloads})
		s.postRx(0, 8, 2048)
		sent := h
		sent.HdrLen = give
		require.NoError(t, s.dev.DeliverHdr(0, sent, f))
		got, data := s.recvFrame(0)
		assert.Equal(t, f, data)
		want := h
		want.HdrLen = hl
		want.NumBuffers = got.NumBuffers
		assert.Equal(t, want, got, "hdr_len given %d", give)
	}
	s := newStack(t, stackOptions{dev: softnet.Options{Offload: true}, features: allOffloads})
	n := (g.payload + int(g.mss) - 1) / int(g.mss)
	s.postRx(0, n, 2048)
	sent := h
	sent.Flags = 0
	require.NoError(t, s.dev.DeliverHdr(0, sent, f))
	var segs [][]byte
	for range n {
		got, data := s.recvFrame(0)
		assert.Equal(t, virtio.NetHdr{NumBuffers: got.NumBuffers}, got, "zero header: segmented")
		segs = append(segs, data)
	}
	checkSegments(t, g, h, f, segs)
}
