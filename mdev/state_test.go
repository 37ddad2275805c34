package mdev

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
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

// samplePackedState is sampleState with packed rings: sizes that are not
// powers of two, 4-aligned event suppression areas, and packed positions
// (queue 1's avail one lap ahead of its used: 53 descriptors in flight).
func samplePackedState() *State {
	s := sampleState()
	s.DeviceFeatures = s.DeviceFeatures.With(virtio.FRingPacked)
	s.DriverFeatures = s.DriverFeatures.With(virtio.FRingPacked)
	s.Queues = []QueueRecord{
		{Size: 200, Enabled: true, Vector: 1, Desc: 0x10000, Driver: 0x10c84, Device: 0x18004,
			NextAvail: vring.PackedIndex(5, true), NextUsed: vring.PackedIndex(5, true)},
		{Size: 100, Enabled: true, Vector: 2, Desc: 0x20000, Driver: 0x20800, Device: 0x28000,
			NextAvail: vring.PackedIndex(3, false), NextUsed: vring.PackedIndex(50, true)},
	}
	return s
}

// reseal recomputes the checksum of a hand-modified stream.
func reseal(b []byte) []byte {
	n := len(b) - 4
	binary.LittleEndian.PutUint32(b[n:], crc32.Checksum(b[:n], crc32.MakeTable(crc32.Castagnoli)))
	return b
}

// EncodeState writes the oldest version that describes the state: 1 for
// split rings, 2 for packed ones.
func TestStateRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name    string
		s       *State
		version uint16
	}{
		{"split", sampleState(), 1},
		{"packed", samplePackedState(), 2},
	} {
		t.Run(tc.name, func(t *testing.T) { stateRoundTrip(t, tc.s, tc.version) })
	}
}

func stateRoundTrip(t *testing.T, s *State, version uint16) {
	b, err := EncodeState(s)
	require.NoError(t, err)
	assert.Equal(t, "VDPAKMDV", string(b[:8]))
	assert.Equal(t, version, binary.LittleEndian.Uint16(b[8:]))
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
	p, err := EncodeState(samplePackedState())
	require.NoError(t, err)
	for n := 0; n < len(p); n++ {
		_, err := DecodeState(p[:n])
		require.ErrorIs(t, err, ErrStateTruncated, "packed, length %d", n)
	}
	for n := 0; n < len(b); n++ {
		_, err := DecodeState(b[:n])
		require.ErrorIs(t, err, ErrStateTruncated, "length %d", n)
		_, err = ReadState(bytes.NewReader(b[:n]))
		require.ErrorIs(t, err, ErrStateTruncated, "length %d", n)
	}
}

func TestStateRejectsEveryBitFlip(t *testing.T) {
	for _, s := range []*State{sampleState(), samplePackedState()} {
		stateRejectsEveryBitFlip(t, s)
	}
}

func stateRejectsEveryBitFlip(t *testing.T, s *State) {
	b, err := EncodeState(s)
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
		{"version 0", func(b []byte) []byte { binary.LittleEndian.PutUint16(b[8:], 0); return reseal(b) }, ErrStateVersion},
		{"future version", func(b []byte) []byte { binary.LittleEndian.PutUint16(b[8:], StateVersion+1); return reseal(b) }, ErrStateVersion},
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
		{"2.8 packed queue of size 0 enabled", func(s *State) { *s = *samplePackedState(); s.Queues[1].Size = 0 }},
		{"2.8 packed queue larger than 32768", func(s *State) { *s = *samplePackedState(); s.Queues[1].Size = 32769 }},
		{"2.8.10.1 packed driver event area misaligned", func(s *State) { *s = *samplePackedState(); s.Queues[0].Driver = 0x10c82 }},
		{"2.8.10.1 packed descriptor ring misaligned", func(s *State) { *s = *samplePackedState(); s.Queues[0].Desc = 0x10008 }},
		{"2.8 packed avail index beyond the ring", func(s *State) {
			*s = *samplePackedState()
			s.Queues[1].NextAvail = vring.PackedIndex(100, false)
		}},
		{"2.8 packed used index beyond the ring", func(s *State) {
			*s = *samplePackedState()
			s.Queues[0].NextUsed = vring.PackedIndex(200, true)
			s.Queues[0].NextAvail = vring.PackedIndex(200, true)
		}},
		{"2.8 packed avail behind used", func(s *State) {
			*s = *samplePackedState()
			s.Queues[0].NextAvail = vring.PackedIndex(4, true)
		}},
		{"2.8 packed avail more than a lap ahead", func(s *State) {
			*s = *samplePackedState()
			s.Queues[0].NextAvail = vring.PackedIndex(6, false)
		}},
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
	binary.LittleEndian.PutUint16(out[8:], s.streamVersion())
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

// Version 2 streams carry packed rings; version 1 streams cannot: a
// version 1 header on a packed state is rejected whole, and a version 2
// header on a split state (not written by EncodeState) is still read.
func TestStateVersions(t *testing.T) {
	p, err := EncodeState(samplePackedState())
	require.NoError(t, err)
	v1 := bytes.Clone(p)
	binary.LittleEndian.PutUint16(v1[8:], 1)
	_, err = DecodeState(reseal(v1))
	require.ErrorIs(t, err, ErrStateInvalid)
	var se *StateError
	require.ErrorAs(t, err, &se)
	assert.Contains(t, se.Field, "RING_PACKED")

	b, err := EncodeState(sampleState())
	require.NoError(t, err)
	v2 := bytes.Clone(b)
	binary.LittleEndian.PutUint16(v2[8:], 2)
	got, err := DecodeState(reseal(v2))
	require.NoError(t, err)
	assert.Equal(t, sampleState(), got)
}
