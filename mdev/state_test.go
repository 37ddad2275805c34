package mdev

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

func sampleState() *State {
	return &State{
		Backend:          "software",
		DeviceID:         virtio.DeviceNet,
		DeviceFeatures:   netFeatures.With(virtio.NetFStatus),
		DriverFeatures:   netFeatures,
		Status:           sAck | sDrv | sFOK | sDOK,
		ConfigGeneration: 3,
		ISR:              ISRConfig,
		MSIXConfig:       0,
		QueueSelect:      1,
		Config:           []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0xdc, 0x05},
		MSIX:             make([]byte, 56),
		Queues: []QueueRecord{
			{Size: 128, Enabled: true, Vector: 1, Desc: 0x10000, Driver: 0x10800, Device: 0x18000, NextAvail: 5, NextUsed: 5},
			{Size: 128, Enabled: true, Vector: 2, Desc: 0x20000, Driver: 0x20800, Device: 0x28000, NextAvail: 65535, NextUsed: 65530},
		},
	}
}

// reseal recomputes the checksum of a hand-modified stream.
func reseal(b []byte) []byte {
	n := len(b) - 4
	binary.LittleEndian.PutUint32(b[n:], crc32.Checksum(b[:n], crc32.MakeTable(crc32.Castagnoli)))
	return b
}

func TestStateRoundTrip(t *testing.T) {
	s := sampleState()
	b, err := EncodeState(s)
	require.NoError(t, err)
	assert.Equal(t, "VDPAKMDV", string(b[:8]))
	assert.EqualValues(t, StateVersion, binary.LittleEndian.Uint16(b[8:]))
	assert.EqualValues(t, len(b)-20, binary.LittleEndian.Uint32(b[12:]), "payload length")
	got, err := DecodeState(b)
	require.NoError(t, err)
	assert.Equal(t, s, got)
	got2, err := ReadState(bytes.NewReader(append(b, 0xff))) // reads exactly one stream
	require.NoError(t, err)
	assert.Equal(t, s, got2)
}

func TestStateRejectsEveryTruncation(t *testing.T) {
	b, err := EncodeState(sampleState())
	require.NoError(t, err)
	for n := 0; n < len(b); n++ {
		_, err := DecodeState(b[:n])
		require.ErrorIs(t, err, ErrStateTruncated, "length %d", n)
		_, err = ReadState(bytes.NewReader(b[:n]))
		require.ErrorIs(t, err, ErrStateTruncated, "length %d", n)
	}
}

func TestStateRejectsEveryBitFlip(t *testing.T) {
	b, err := EncodeState(sampleState())
	require.NoError(t, err)
	for i := range b {
		for bit := 0; bit < 8; bit++ {
			c := bytes.Clone(b)
			c[i] ^= 1 << bit
			_, err := DecodeState(c)
			require.Error(t, err, "byte %d bit %d", i, bit)
			var se *StateError
			require.ErrorAs(t, err, &se)
		}
	}
}

func TestStateFramingErrors(t *testing.T) {
	good, err := EncodeState(sampleState())
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		mod  func([]byte) []byte
		want error
	}{
		{"wrong version", func(b []byte) []byte { binary.LittleEndian.PutUint16(b[8:], 2); return reseal(b) }, ErrStateVersion},
		{"oversized length", func(b []byte) []byte { binary.LittleEndian.PutUint32(b[12:], MaxStateSize+1); return b }, ErrStateTooLarge},
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return reseal(b) }, ErrStateCorrupt},
		{"reserved header bits", func(b []byte) []byte { b[10] = 1; return reseal(b) }, ErrStateCorrupt},
		{"trailing bytes", func(b []byte) []byte { return append(b, 0) }, ErrStateCorrupt},
		{"checksum", func(b []byte) []byte { b[len(b)-1] ^= 0xff; return b }, ErrStateCorrupt},
		{"payload shorter than its fields", func(b []byte) []byte {
			// Claim two fewer payload bytes and drop them.
			n := binary.LittleEndian.Uint32(b[12:]) - 2
			binary.LittleEndian.PutUint32(b[12:], n)
			out := append(bytes.Clone(b[:16+n]), 0, 0, 0, 0)
			return reseal(out)
		}, ErrStateCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeState(tc.mod(bytes.Clone(good)))
			require.ErrorIs(t, err, tc.want)
		})
	}
}

func TestStateSpecRules(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*State)
	}{
		{"3.1.1 DRIVER_OK without FEATURES_OK", func(s *State) { s.Status = sAck | sDrv | sDOK }},
		{"3.1.1 FEATURES_OK without DRIVER", func(s *State) { s.Status = sAck | sFOK }},
		{"2.1 reserved status bit", func(s *State) { s.Status |= 0x10 }},
		{"3.1.1 driver features not offered", func(s *State) { s.DriverFeatures |= virtio.FRingPacked.Bit() }},
		{"6.1 FEATURES_OK without VERSION_1", func(s *State) {
			s.DriverFeatures &^= virtio.FVersion1.Bit()
		}},
		{"2.7 queue size not a power of two", func(s *State) { s.Queues[0].Size = 100 }},
		{"2.7 enabled queue of size 0", func(s *State) { s.Queues[0].Size = 0 }},
		{"2.7 descriptor table misaligned", func(s *State) { s.Queues[0].Desc = 0x10008 }},
		{"2.7 used ring misaligned", func(s *State) { s.Queues[1].Device = 0x28002 }},
		{"ring address overflow", func(s *State) { s.Queues[1].Device = ^uint64(3) }},
		{"more chains in flight than the queue holds", func(s *State) { s.Queues[0].NextAvail = 200; s.Queues[0].NextUsed = 0 }},
		{"4.1.4.5 unknown ISR bit", func(s *State) { s.ISR = 4 }},
		{"backend name not printable", func(s *State) { s.Backend = "a\x00b" }},
		{"pci config wrong size", func(s *State) { s.PCIConfig = make([]byte, 10) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := sampleState()
			tc.mod(s)
			_, err := EncodeState(s)
			require.ErrorIs(t, err, ErrStateInvalid)
			// A peer that encodes it anyway is rejected on decode too.
			raw := encodeUnchecked(t, s)
			_, err = DecodeState(raw)
			require.ErrorIs(t, err, ErrStateInvalid)
		})
	}
}

// encodeUnchecked encodes a valid state, then patches in s's fields so the
// decoder sees a well-framed stream carrying invalid content.
func encodeUnchecked(t *testing.T, s *State) []byte {
	t.Helper()
	orig := sampleState()
	orig.Backend = "x"
	if len(s.Backend) > 0 {
		orig.Backend = string(bytes.Repeat([]byte("x"), len(s.Backend)))
	}
	orig.PCIConfig = nil
	b, err := EncodeState(orig)
	require.NoError(t, err)
	// Re-encode by hand with s's values: reuse the encoder's layout by
	// swapping Validate out via a copy of the payload writer.
	saved := *s
	payload := encodePayload(&saved)
	out := append([]byte(nil), b[:16]...)
	binary.LittleEndian.PutUint32(out[12:], uint32(len(payload)))
	out = append(out, payload...)
	out = append(out, 0, 0, 0, 0)
	return reseal(out)
}

func TestLoadStateLeavesDestinationUntouched(t *testing.T) {
	src := newTestDevice(t, newFakeBacking(), nil)
	driver{t, src}.bringUp(netFeatures)
	require.NoError(t, src.SetMigrationState(MigStopCopy))
	good, err := src.SaveState()
	require.NoError(t, err)

	for _, tc := range []struct {
		name  string
		setup func(f *fakeBacking)
		data  func() []byte
		want  error
	}{
		{"truncated", nil, func() []byte { return good[:len(good)-1] }, ErrStateTruncated},
		{"corrupt", nil, func() []byte { c := bytes.Clone(good); c[40] ^= 1; return c }, ErrStateCorrupt},
		{"features the destination cannot offer", func(f *fakeBacking) {
			f.features &^= virtio.FEventIdx.Bit()
		}, func() []byte { return good }, ErrStateIncompatible},
		{"queue count differs", func(f *fakeBacking) { f.nq = 4 }, func() []byte { return good }, ErrStateIncompatible},
		{"smaller maximum queue size", func(f *fakeBacking) { f.maxq = 64 }, func() []byte { return good }, ErrStateIncompatible},
		{"different MAC", func(f *fakeBacking) { f.config[5] = 0x99 }, func() []byte { return good }, ErrStateIncompatible},
		{"different device type", func(f *fakeBacking) { f.id = virtio.DeviceBlock }, func() []byte { return good }, ErrStateIncompatible},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			if tc.setup != nil {
				tc.setup(f)
			}
			dst := newTestDevice(t, f, nil)
			require.NoError(t, dst.SetMigrationState(MigResuming))
			before := dst.State()
			opsBefore := len(f.opsCopy())
			require.ErrorIs(t, dst.LoadState(tc.data()), tc.want)
			assert.Equal(t, before, dst.State(), "destination untouched")
			assert.Len(t, f.opsCopy(), opsBefore, "backing device untouched")
			// Leaving RESUMING without a good stream fails and stays.
			require.ErrorIs(t, dst.SetMigrationState(MigRunning), ErrNoState)
			assert.Equal(t, MigResuming, dst.MigrationState())
		})
	}
}

func TestMigrateDeviceStateEndToEnd(t *testing.T) {
	fs := newFakeBacking()
	src := newTestDevice(t, fs, nil)
	driver{t, src}.bringUp(netFeatures)
	fs.mu.Lock()
	fs.base[0], fs.base[1] = stateAt(100, 100), stateAt(65535, 65535)
	fs.mu.Unlock()
	require.NoError(t, src.SetMigrationState(MigStopCopy))
	b, err := src.SaveState()
	require.NoError(t, err)
	require.NoError(t, src.SetMigrationState(MigStop))

	fd := newFakeBacking()
	dst := newTestDevice(t, fd, nil)
	require.NoError(t, dst.SetMigrationState(MigResuming))
	require.NoError(t, dst.LoadState(b))
	require.NoError(t, dst.SetMigrationState(MigRunning))
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, dst.Status())
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, fd.status)
	assert.Equal(t, netFeatures, fd.accepted)
	assert.Equal(t, stateAt(100, 100), fd.base[0])
	assert.Equal(t, stateAt(65535, 65535), fd.base[1])
	desc, _, _ := ringAddrs(1, 128)
	assert.EqualValues(t, desc, fd.addr[1].Desc)
	assert.Same(t, dst.KickFD(0), fd.kick[0])
	// The guest sees the same registers.
	g := driver{t, dst}
	g.w(OffQueueSelect, 2, 1)
	assert.EqualValues(t, 128, g.r(OffQueueSize, 2))
	assert.EqualValues(t, 2, g.r(OffQueueMSIXVector, 2))
}
