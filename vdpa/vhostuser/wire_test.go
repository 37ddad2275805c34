package vhostuser

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// readHexFile reads a testdata/wire file: hex bytes, '#' comments.
func readHexFile(t *testing.T, name string) []byte {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", "wire", name))
	require.NoError(t, err)
	defer f.Close()
	var out []byte
	sc := bufio.NewScanner(f)
	for line := 1; sc.Scan(); line++ {
		text, _, _ := strings.Cut(sc.Text(), "#")
		for _, field := range strings.Fields(text) {
			b, err := hex.DecodeString(field)
			require.NoError(t, err, "%s:%d: %q", name, line, field)
			out = append(out, b...)
		}
	}
	require.NoError(t, sc.Err())
	return out
}

// TestFrozenWire decodes the hand-written messages under testdata/wire
// (see its README), checks every field, and encodes the decoded values back
// to the same bytes, so a change that breaks the format on both the
// encoding and the decoding side fails here.
func TestFrozenWire(t *testing.T) {
	var probe [2]byte
	binary.NativeEndian.PutUint16(probe[:], 1)
	if probe[0] != 1 {
		t.Skip("the frozen messages are little-endian; vhost-user is native-endian and this machine is big-endian")
	}

	tests := []struct {
		file string
		hdr  Header
		fds  int // descriptors the message travels with
		// check asserts the payload's fields and returns the payload
		// encoded again from them (nil: no encoder for this format).
		check func(t *testing.T, p []byte) []byte
	}{
		{"set_features.hex", Header{ReqSetFeatures, Version, 8}, 0, func(t *testing.T, p []byte) []byte {
			m := Message{Payload: p}
			f := virtio.Features(m.U64())
			assert.Equal(t, virtio.Features(0x0000000160000000), f)
			assert.True(t, f.Has(virtio.FVersion1))
			assert.True(t, f.Has(virtio.FProtocolFeat))
			return putU64(uint64(f))
		}},
		{"get_features_reply.hex", Header{ReqGetFeatures, Version | FlagReply, 8}, 0, func(t *testing.T, p []byte) []byte {
			m := Message{Payload: p}
			f := virtio.Features(m.U64())
			assert.Equal(t, virtio.Features(0x0000000144008020), f)
			assert.True(t, f.Has(virtio.FLogAll))
			return putU64(uint64(f))
		}},
		{"set_protocol_features.hex", Header{ReqSetProtocolFeatures, Version, 8}, 0, func(t *testing.T, p []byte) []byte {
			m := Message{Payload: p}
			pf := ProtocolFeatures(m.U64())
			assert.Equal(t, ProtocolFeatures(0).With(PFMQ, PFLogShmfd, PFReplyAck, PFConfig, PFResetDevice, PFStatus), pf)
			return putU64(uint64(pf))
		}},
		{"set_vring_num.hex", Header{ReqSetVringNum, Version, 8}, 0, func(t *testing.T, p []byte) []byte {
			s, err := DecodeVringState(p)
			require.NoError(t, err)
			assert.Equal(t, VringState{Index: 1, Num: 256}, s)
			return s.Encode()
		}},
		{"get_vring_base_reply.hex", Header{ReqGetVringBase, Version | FlagReply, 8}, 0, func(t *testing.T, p []byte) []byte {
			s, err := DecodeVringState(p)
			require.NoError(t, err)
			assert.Equal(t, VringState{Index: 1, Num: 0x1234}, s)
			return s.Encode()
		}},
		{"set_vring_addr.hex", Header{ReqSetVringAddr, Version | FlagNeedReply, 40}, 0, func(t *testing.T, p []byte) []byte {
			a, err := DecodeVringAddr(p)
			require.NoError(t, err)
			assert.Equal(t, uint32(2), a.Index)
			assert.Equal(t, uint32(VringFLog), a.Flags)
			assert.Equal(t, uint64(0x7f0000001000), a.Desc)
			assert.Equal(t, uint64(0x7f0000003000), a.Used)
			assert.Equal(t, uint64(0x7f0000002000), a.Avail)
			assert.Equal(t, uint64(0x103000), a.Log)
			return a.Encode()
		}},
		{"set_vring_kick_nofd.hex", Header{ReqSetVringKick, Version, 8}, 0, func(t *testing.T, p []byte) []byte {
			m := Message{Payload: p}
			v := m.U64()
			assert.Equal(t, uint64(1), v&VringIndexMask)
			assert.NotZero(t, v&VringNoFd)
			return putU64(1 | VringNoFd)
		}},
		{"set_vring_call.hex", Header{ReqSetVringCall, Version, 8}, 1, func(t *testing.T, p []byte) []byte {
			m := Message{Payload: p}
			assert.Equal(t, uint64(3), m.U64())
			return putU64(3)
		}},
		{"set_mem_table.hex", Header{ReqSetMemTable, Version, 72}, 2, func(t *testing.T, p []byte) []byte {
			rs, err := DecodeMemTable(p)
			require.NoError(t, err)
			require.Len(t, rs, 2)
			assert.Equal(t, MemoryRegion{GuestPhysAddr: 0, MemorySize: 0x80000000, UserspaceAddr: 0x7f1200000000, MmapOffset: 0}, rs[0])
			assert.Equal(t, MemoryRegion{GuestPhysAddr: 0x100000000, MemorySize: 0x40000000, UserspaceAddr: 0x7f1280000000, MmapOffset: 0x80000000}, rs[1])
			return EncodeMemTable(rs)
		}},
		{"set_log_base.hex", Header{ReqSetLogBase, Version, 16}, 1, func(t *testing.T, p []byte) []byte {
			l, err := DecodeLog(p)
			require.NoError(t, err)
			assert.Equal(t, Log{MmapSize: 0x10000, MmapOffset: 0x1000}, l)
			return l.Encode()
		}},
		{"get_config.hex", Header{ReqGetConfig, Version, 18}, 0, func(t *testing.T, p []byte) []byte {
			c, err := DecodeConfig(p)
			require.NoError(t, err)
			assert.Equal(t, uint32(0), c.Offset)
			assert.Equal(t, uint32(ConfigFlagWritable), c.Flags)
			assert.Equal(t, make([]byte, 6), c.Data)
			return c.Encode()
		}},
		{"get_config_reply.hex", Header{ReqGetConfig, Version | FlagReply, 16}, 0, func(t *testing.T, p []byte) []byte {
			c, err := DecodeConfig(p)
			require.NoError(t, err)
			assert.Equal(t, uint32(6), c.Offset)
			assert.Equal(t, uint32(ConfigFlagMigration), c.Flags)
			assert.Equal(t, []byte{1, 0, 4, 0}, c.Data)
			return c.Encode()
		}},
		{"get_inflight_fd.hex", Header{ReqGetInflightFd, Version, 24}, 0, func(t *testing.T, p []byte) []byte {
			f, err := DecodeInflight(p)
			require.NoError(t, err)
			assert.Equal(t, Inflight{MmapSize: 0, MmapOffset: 0, NumQueues: 2, QueueSize: 256}, f)
			return f.Encode()
		}},
		{"set_status.hex", Header{ReqSetStatus, Version | FlagNeedReply, 8}, 0, func(t *testing.T, p []byte) []byte {
			m := Message{Payload: p}
			st := virtio.Status(m.U64())
			assert.Equal(t, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusDriverOK|virtio.StatusFeaturesOK, st)
			return putU64(uint64(st))
		}},
		// No codec in this package: the framing and size rules are what
		// is frozen.
		{"add_mem_reg.hex", Header{ReqAddMemReg, Version, 40}, 1, nil},
		{"iotlb_msg.hex", Header{ReqIOTLBMsg, Version, 32}, 0, nil},
	}
	for _, tc := range tests {
		t.Run(strings.TrimSuffix(tc.file, ".hex"), func(t *testing.T) {
			b := readHexFile(t, tc.file)
			require.Len(t, b, HeaderSize+int(tc.hdr.Size), "file length")
			h, err := DecodeHeader(b)
			require.NoError(t, err)
			assert.Equal(t, tc.hdr, h)
			p := b[HeaderSize:]
			if !h.IsReply() {
				// A front-end request: the whole-message decoder
				// accepts it with its descriptors.
				fds := pipeFds(t, tc.fds)
				m, err := Decode(b, fds)
				require.NoError(t, err)
				assert.Len(t, m.Fds, tc.fds)
				m.Close()
			}
			if tc.check == nil {
				return
			}
			enc := tc.check(t, p)
			assert.Equal(t, p, enc, "payload encoded from the decoded fields")
			assert.True(t, bytes.Equal(b, Encode(nil, tc.hdr, enc)), "whole message encoded again")
		})
	}
}
