package virtio

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNetHdrLen(t *testing.T) {
	tests := []struct {
		name string
		f    Features
		want int
	}{
		{"legacy header without VERSION_1 or MRG_RXBUF is 10 bytes", 0, 10},
		{"VERSION_1 makes the header 12 bytes", FVersion1.Bit(), 12},
		{"MRG_RXBUF alone makes the header 12 bytes", NetFMrgRxbuf.Bit(), 12},
		{"both give 12 bytes", Features(0).With(FVersion1, NetFMrgRxbuf), 12},
		{"unrelated features keep 10 bytes", Features(0).With(NetFMAC, FEventIdx), 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, NetHdrLen(tt.f))
		})
	}
}

func TestNetHdrWireLayout(t *testing.T) {
	// virtio 1.2 §5.1.6: flags u8, gso_type u8, hdr_len le16, gso_size le16,
	// csum_start le16, csum_offset le16, num_buffers le16.
	h := NetHdr{Flags: NetHdrFNeedsCsum, GSOType: NetHdrGSOTCPv4, HdrLen: 0x0102, GSOSize: 0x0304,
		CsumStart: 0x0506, CsumOffset: 0x0708, NumBuffers: 0x090a}
	var p [12]byte
	require.NoError(t, h.Encode(p[:], NetHdrSize))
	assert.Equal(t, []byte{1, 1, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9}, p[:])

	var q [12]byte
	q[10], q[11] = 0xee, 0xee
	require.NoError(t, h.Encode(q[:], NetHdrLegacySize))
	assert.Equal(t, []byte{1, 1, 2, 1, 4, 3, 6, 5, 8, 7, 0xee, 0xee}, q[:], "10-byte form must not touch num_buffers")

	got, err := DecodeNetHdr(p[:], NetHdrSize)
	require.NoError(t, err)
	assert.Equal(t, h, got)
	got, err = DecodeNetHdr(p[:], NetHdrLegacySize)
	require.NoError(t, err)
	want := h
	want.NumBuffers = 0
	assert.Equal(t, want, got)
}

func TestNetHdrErrors(t *testing.T) {
	var h NetHdr
	assert.ErrorIs(t, h.Encode(make([]byte, 11), NetHdrSize), ErrNetShort)
	assert.Error(t, h.Encode(make([]byte, 20), 11))
	_, err := DecodeNetHdr(make([]byte, 9), NetHdrLegacySize)
	assert.ErrorIs(t, err, ErrNetShort)
	_, err = DecodeNetHdr(make([]byte, 20), 8)
	assert.Error(t, err)
}

func TestNetConfigLayout(t *testing.T) {
	c := NetConfig{MAC: [6]byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}, Status: NetSLinkUp,
		MaxVirtqueuePairs: 4, MTU: 1500, Speed: 10000, Duplex: NetDuplexFull,
		RSSMaxKeySize: 40, RSSMaxIndirectionTableLength: 128, SupportedHashTypes: 0x3f}
	p := make([]byte, NetConfigSize)
	require.NoError(t, c.Encode(p))
	want := []byte{
		0x52, 0x54, 0, 0x12, 0x34, 0x56, // mac
		1, 0, // status
		4, 0, // max_virtqueue_pairs
		0xdc, 0x05, // mtu 1500
		0x10, 0x27, 0, 0, // speed 10000
		1,      // duplex
		40,     // rss_max_key_size
		128, 0, // rss_max_indirection_table_length
		0x3f, 0, 0, 0, // supported_hash_types
	}
	assert.Equal(t, want, p)
	got, err := DecodeNetConfig(p)
	require.NoError(t, err)
	assert.Equal(t, c, got)

	short, err := DecodeNetConfig(p[:12])
	require.NoError(t, err)
	assert.Equal(t, NetConfig{MAC: c.MAC, Status: 1, MaxVirtqueuePairs: 4, MTU: 1500}, short)
	_, err = DecodeNetConfig(p[:5])
	assert.ErrorIs(t, err, ErrNetShort)
	assert.ErrorIs(t, c.Encode(p[:23]), ErrNetShort)
}

func macTable(uni, multi [][6]byte) []byte {
	p := []byte{NetCtrlMAC, NetCtrlMACTableSet}
	for _, tab := range [][][6]byte{uni, multi} {
		p = binary.LittleEndian.AppendUint32(p, uint32(len(tab)))
		for _, m := range tab {
			p = append(p, m[:]...)
		}
	}
	return p
}

func TestParseNetCtrl(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		err  error
	}{
		{"RX PROMISC carries one byte", []byte{0, 0, 1}, nil},
		{"RX NOBCAST carries one byte", []byte{0, 5, 0}, nil},
		{"RX command 6 is unknown", []byte{0, 6, 1}, ErrNetCtrlUnknown},
		{"RX without its byte is rejected", []byte{0, 1}, ErrNetCtrlLength},
		{"RX with two bytes is rejected", []byte{0, 1, 1, 1}, ErrNetCtrlLength},
		{"MAC_ADDR_SET carries six bytes", []byte{1, 1, 2, 0, 0, 0, 0, 1}, nil},
		{"MAC_ADDR_SET with five bytes is rejected", []byte{1, 1, 2, 0, 0, 0, 0}, ErrNetCtrlLength},
		{"MAC_TABLE_SET two empty tables", macTable(nil, nil), nil},
		{"MAC_TABLE_SET with entries", macTable([][6]byte{{2, 0, 0, 0, 0, 1}}, [][6]byte{{1, 0, 0x5e, 0, 0, 1}, {0x33, 0x33, 0, 0, 0, 1}}), nil},
		{"MAC_TABLE_SET count beyond data", []byte{1, 0, 2, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0}, ErrNetCtrlMACTable},
		{"MAC_TABLE_SET missing multicast table", []byte{1, 0, 0, 0, 0, 0}, ErrNetCtrlMACTable},
		{"MAC_TABLE_SET trailing bytes", append(macTable(nil, nil), 9), ErrNetCtrlMACTable},
		{"MAC_TABLE_SET huge count does not overflow", []byte{1, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, ErrNetCtrlMACTable},
		{"MAC command 2 is unknown", []byte{1, 2}, ErrNetCtrlUnknown},
		{"VLAN ADD carries le16", []byte{2, 0, 5, 0}, nil},
		{"ANNOUNCE ACK carries nothing", []byte{3, 0}, nil},
		{"ANNOUNCE ACK with data is rejected", []byte{3, 0, 0}, ErrNetCtrlLength},
		{"MQ VQ_PAIRS_SET carries le16", []byte{4, 0, 2, 0}, nil},
		{"MQ VQ_PAIRS_SET truncated", []byte{4, 0, 2}, ErrNetCtrlLength},
		{"MQ command 3 is unknown", []byte{4, 3}, ErrNetCtrlUnknown},
		{"GUEST_OFFLOADS_SET carries le64", []byte{5, 0, 1, 2, 3, 4, 5, 6, 7, 8}, nil},
		{"class 99 is unknown", []byte{99, 0}, ErrNetCtrlUnknown},
		{"empty command is truncated", nil, ErrNetCtrlShort},
		{"class alone is truncated", []byte{0}, ErrNetCtrlShort},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseNetCtrl(tt.in)
			if tt.err != nil {
				require.ErrorIs(t, err, tt.err)
				require.ErrorIs(t, err, ErrNetCtrl)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.in[0], c.Class)
			assert.Equal(t, tt.in[1], c.Command)
			assert.Equal(t, tt.in[2:], c.Data)
		})
	}
}

func TestNetCtrlArguments(t *testing.T) {
	c, err := ParseNetCtrl([]byte{0, NetCtrlRxAllMulti, 7})
	require.NoError(t, err)
	on, err := c.OnOff()
	require.NoError(t, err)
	assert.True(t, on, "any non-zero byte enables")

	c, err = ParseNetCtrl([]byte{1, 1, 0x52, 0x54, 0, 1, 2, 3})
	require.NoError(t, err)
	m, err := c.MACAddr()
	require.NoError(t, err)
	assert.Equal(t, [6]byte{0x52, 0x54, 0, 1, 2, 3}, m)
	_, err = c.OnOff()
	assert.ErrorIs(t, err, ErrNetCtrl)

	c, err = ParseNetCtrl([]byte{1, 1, 0x01, 0, 0x5e, 0, 0, 1})
	require.NoError(t, err)
	_, err = c.MACAddr()
	assert.ErrorIs(t, err, ErrNetCtrlMulticast)

	for _, tt := range []struct {
		n   uint16
		err error
	}{{0, ErrNetCtrlBadValue}, {1, nil}, {4, nil}, {5, ErrNetCtrlBadValue}} {
		c, err := ParseNetCtrl(binary.LittleEndian.AppendUint16([]byte{4, 0}, tt.n))
		require.NoError(t, err)
		n, err := c.VQPairs(4)
		if tt.err != nil {
			assert.ErrorIs(t, err, tt.err, "pairs %d", tt.n)
		} else {
			require.NoError(t, err)
			assert.Equal(t, tt.n, n)
		}
	}

	uni := [][6]byte{{2, 0, 0, 0, 0, 1}}
	multi := [][6]byte{{1, 0, 0x5e, 0, 0, 1}, {0x33, 0x33, 0, 0, 0, 1}}
	c, err = ParseNetCtrl(macTable(uni, multi))
	require.NoError(t, err)
	gu, gm, err := c.MACTable(nil, nil)
	require.NoError(t, err)
	assert.Equal(t, uni, gu)
	assert.Equal(t, multi, gm)
}

// FuzzParseNetCtrl feeds arbitrary control-queue payloads to the parser and
// its argument accessors: none may panic, and accepted MAC tables must
// account for every byte.
func FuzzParseNetCtrl(f *testing.F) {
	f.Add([]byte{0, 0, 1})
	f.Add([]byte{1, 1, 2, 0, 0, 0, 0, 1})
	f.Add(macTable([][6]byte{{2, 0, 0, 0, 0, 1}}, nil))
	f.Add([]byte{4, 0, 2, 0})
	f.Fuzz(func(t *testing.T, p []byte) {
		c, err := ParseNetCtrl(p)
		if err != nil {
			if !assert.ErrorIs(t, err, ErrNetCtrl) {
				t.FailNow()
			}
			return
		}
		_, _ = c.OnOff()
		_, _ = c.MACAddr()
		_, _ = c.VQPairs(NetCtrlMQPairsMax)
		if c.Class == NetCtrlMAC && c.Command == NetCtrlMACTableSet {
			u, m, err := c.MACTable(nil, nil)
			require.NoError(t, err, "parser accepted a table the decoder rejects")
			require.Equal(t, len(c.Data), 8+6*(len(u)+len(m)))
		}
	})
}
