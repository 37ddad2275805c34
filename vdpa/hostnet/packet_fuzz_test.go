package hostnet

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// packetBlock returns the start of a TPACKET_V3 block holding frames, each
// behind a struct tpacket3_hdr, its sockaddr_ll and a 10-byte virtio-net
// header (hdr), as the kernel lays a block out.
func packetBlock(hdr virtio.NetHdr, frames ...[]byte) []byte {
	const first = 48 // after struct tpacket_block_desc
	const mac = 96   // tp_mac: room for the headers and the virtio-net header
	blk := make([]byte, first)
	binary.NativeEndian.PutUint32(blk[blockNumPkts:], uint32(len(frames)))
	binary.NativeEndian.PutUint32(blk[blockFirstPkt:], first)
	for i, fr := range frames {
		size := (mac + len(fr) + 15) &^ 15
		pkt := make([]byte, size)
		if i < len(frames)-1 {
			binary.NativeEndian.PutUint32(pkt[pktNextOff:], uint32(size))
		}
		binary.NativeEndian.PutUint32(pkt[pktSnaplen:], uint32(len(fr)))
		binary.NativeEndian.PutUint32(pkt[pktLen:], uint32(len(fr)))
		binary.NativeEndian.PutUint16(pkt[pktMac:], mac)
		_ = hdr.Encode(pkt[mac-legacyVnet:mac], legacyVnet)
		copy(pkt[mac:], fr)
		blk = append(blk, pkt...)
	}
	return blk
}

// TestPacketBlockParse: the fuzz target's seed layout is the one the
// reader parses: two frames reach the device (dropped there: it has no
// driver), a frame sent by the host itself is skipped, a truncated one is
// a drop, an offset outside the block an error.
func TestPacketBlockParse(t *testing.T) {
	dev, err := softnet.New(nil)
	require.NoError(t, err)
	fr := make([]byte, 60)
	for _, tt := range []struct {
		name              string
		blk               []byte
		mod               func([]byte)
		dropped, rxErrors uint64
	}{
		{"two frames", packetBlock(virtio.NetHdr{}, fr, fr[:42]), nil, 2, 0},
		{"outgoing frame skipped", packetBlock(virtio.NetHdr{}, fr), func(b []byte) { b[48+pktSllType] = unix.PACKET_OUTGOING }, 0, 0},
		{"truncated frame", packetBlock(virtio.NetHdr{}, fr), func(b []byte) { b[48+pktLen]++ }, 1, 0},
		{"first offset beyond the block", packetBlock(virtio.NetHdr{}, fr), func(b []byte) {
			binary.NativeEndian.PutUint32(b[blockFirstPkt:], ringBlock-10)
		}, 0, 1},
		{"tp_mac before the virtio-net header", packetBlock(virtio.NetHdr{}, fr), func(b []byte) {
			binary.NativeEndian.PutUint16(b[48+pktMac:], legacyVnet-1)
		}, 0, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ring := make([]byte, ringBlock)
			copy(ring, tt.blk)
			if tt.mod != nil {
				tt.mod(ring)
			}
			p := &Packet{ring: ring}
			p.deliverBlock(dev, 0)
			st := p.Stats()
			assert.Equal(t, tt.dropped, st.RxDropped, "%+v", st)
			assert.Equal(t, tt.rxErrors, st.RxErrors, "%+v", st)
			assert.Zero(t, st.RxFrames)
		})
	}
}

// FuzzPacketBlock gives deliverBlock arbitrary ring blocks (the kernel
// writes them, but the reader checks every count and offset all the same):
// it never reads outside the block nor panics, and accounts for at most
// the frames the block says it holds.
func FuzzPacketBlock(f *testing.F) {
	fr := make([]byte, 60)
	copy(fr, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x08, 0x00})
	f.Add(packetBlock(virtio.NetHdr{}, fr, fr[:42]))
	f.Add(packetBlock(virtio.NetHdr{Flags: virtio.NetHdrFNeedsCsum, CsumStart: 34, CsumOffset: 6}, fr))
	f.Add(packetBlock(virtio.NetHdr{GSOType: virtio.NetHdrGSOTCPv4, GSOSize: 1448}, fr))
	dev, err := softnet.New(&softnet.Options{Offload: true})
	require.NoError(f, err)
	ring := make([]byte, ringBlock)
	f.Fuzz(func(t *testing.T, data []byte) {
		clear(ring)
		copy(ring, data)
		p := &Packet{ring: ring}
		p.deliverBlock(dev, 0)
		st := p.Stats()
		n := binary.NativeEndian.Uint32(ring[blockNumPkts:])
		require.LessOrEqual(t, st.RxFrames+st.RxDropped+st.RxErrors, uint64(n))
	})
}
