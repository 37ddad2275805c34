package mdev

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// The frozen streams under testdata/compat were written once by
// internal/genstreams (go generate), not by this package: decoding them
// and checking every field against the literal values below catches a
// format change even when the encoder and the decoder change together.

func readCompat(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "compat", name))
	require.NoError(t, err)
	return b
}

// compatStateV1 is what testdata/compat/state-v1.bin holds.
func compatStateV1() *State {
	pci := make([]byte, 256)
	for i := range pci {
		pci[i] = byte(i * 7)
	}
	msix := make([]byte, 56)
	for i := range msix {
		msix[i] = byte(0xa0 + i)
	}
	return &State{
		Backend:             "software",
		DeviceID:            virtio.DeviceNet,
		DeviceFeatures:      0x1_3001_0028, // VERSION_1 EVENT_IDX INDIRECT_DESC STATUS MAC MTU
		DriverFeatures:      0x1_2000_0020, // VERSION_1 EVENT_IDX MAC
		Status:              sAck | sDrv | sFOK | sDOK,
		ConfigGeneration:    7,
		ISR:                 ISRQueue | ISRConfig,
		MSIXConfig:          0,
		DeviceFeatureSelect: 1,
		DriverFeatureSelect: 0,
		QueueSelect:         1,
		Config:              []byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0xdc, 0x05},
		PCIConfig:           pci,
		MSIX:                msix,
		Queues: []QueueRecord{
			{Size: 128, Enabled: true, Vector: 1, Desc: 0x10000, Driver: 0x10800, Device: 0x18000, NextAvail: 5, NextUsed: 5},
			{Size: 64, Enabled: true, Vector: 2, Desc: 0x20000, Driver: 0x20400, Device: 0x28000, NextAvail: 65535, NextUsed: 65530},
		},
	}
}

func TestStateVersion1Compat(t *testing.T) {
	b := readCompat(t, "state-v1.bin")
	require.Len(t, b, 464)
	want := compatStateV1()
	// The feature constants above are the spec's bit numbers.
	require.Equal(t, virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx, virtio.FIndirectDesc,
		virtio.NetFMAC, virtio.NetFStatus, virtio.NetFMTU), want.DeviceFeatures)
	require.Equal(t, netFeatures, want.DriverFeatures)

	got, err := DecodeState(b)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	got, err = ReadState(io.MultiReader(bytes.NewReader(b), bytes.NewReader([]byte{0xff})))
	require.NoError(t, err)
	assert.Equal(t, want, got)
	// This version's encoder writes the same bytes.
	enc, err := EncodeState(want)
	require.NoError(t, err)
	assert.Equal(t, b, enc)
}

// compatPage is the content of the page at addr in migration-v1.bin.
func compatPage(addr uint64) []byte {
	return bytes.Repeat([]byte{byte(addr/4096) ^ 0x5a}, 4096)
}

// A destination receives the frozen protocol version 1 stream: the pages
// land where the stream says (a run split at the region boundary), the
// device state is the frozen one and the device runs from it.
func TestMigrationStreamVersion1Compat(t *testing.T) {
	stream := readCompat(t, "migration-v1.bin")
	r0, err := vring.NewMemfdRegion(0, 0x80000, nil)
	require.NoError(t, err)
	r1, err := vring.NewMemfdRegion(0x80000, 0x80000, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r0, r1)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	f := newFakeBacking()
	d := newTestDevice(t, f, &Options{Memory: mem, Backend: "software"})

	var replies bytes.Buffer
	conn := struct {
		io.Reader
		io.Writer
	}{bytes.NewReader(stream), &replies}
	rep, err := MigrateDestination(context.Background(), conn, DestOptions{Device: d, Memory: mem})
	require.NoError(t, err)
	assert.Equal(t, 2, rep.Rounds)
	assert.EqualValues(t, 6*4096, rep.PageBytes)
	assert.Equal(t, 464, rep.StateBytes)
	// hello ack, sync ack, resumed: type u8 | length u32, no payload.
	assert.Equal(t, []byte{2, 0, 0, 0, 0, 10, 0, 0, 0, 0, 7, 0, 0, 0, 0}, replies.Bytes())

	all := append(bytes.Clone(r0.Bytes()), r1.Bytes()...)
	for addr := uint64(0); addr < uint64(len(all)); addr += 4096 {
		want := make([]byte, 4096)
		switch addr {
		case 0x3000, 0x4000, 0x7f000, 0x80000, 0x81000, 0xff000:
			want = compatPage(addr)
		}
		require.Equal(t, want, all[addr:addr+4096], "page %#x", addr)
	}

	assert.Equal(t, MigRunning, d.MigrationState())
	st := d.State()
	want := compatStateV1()
	assert.Equal(t, want.DriverFeatures, st.DriverFeatures)
	assert.Equal(t, want.Status, st.Status)
	assert.Equal(t, want.ConfigGeneration, st.ConfigGeneration)
	assert.Equal(t, want.ISR, st.ISR)
	assert.Equal(t, want.QueueSelect, st.QueueSelect)
	assert.Equal(t, want.MSIX, st.MSIX)
	for i, q := range want.Queues {
		assert.Equal(t, q, st.Queues[i], "queue %d", i)
	}
	// The backing device runs from the frozen positions.
	f.mu.Lock()
	defer f.mu.Unlock()
	assert.Equal(t, netFeatures, f.accepted)
	assert.Equal(t, stateAt(5, 5), f.base[0])
	assert.Equal(t, stateAt(65535, 65530), f.base[1])
	assert.EqualValues(t, 0x20400, f.addr[1].Avail)
}

// compatStateV2 is what testdata/compat/state-v2.bin holds: the version 1
// stream's device with packed rings negotiated.
func compatStateV2() *State {
	s := compatStateV1()
	s.DeviceFeatures = s.DeviceFeatures.With(virtio.FRingPacked)
	s.DriverFeatures = s.DriverFeatures.With(virtio.FRingPacked)
	s.Queues = []QueueRecord{
		{Size: 200, Enabled: true, Vector: 1, Desc: 0x10000, Driver: 0x10c84, Device: 0x18004, NextAvail: 0x8005, NextUsed: 0x8005},
		{Size: 100, Enabled: true, Vector: 2, Desc: 0x20000, Driver: 0x20800, Device: 0x28000, NextAvail: 3, NextUsed: 0x8061},
	}
	return s
}

// The frozen version 2 stream decodes to the literal packed state, this
// encoder writes it byte for byte, and a device restored from it programs
// the backing device with the packed positions (wrap counters included).
func TestStateVersion2Compat(t *testing.T) {
	b := readCompat(t, "state-v2.bin")
	require.Len(t, b, 464)
	want := compatStateV2()
	require.EqualValues(t, uint64(1<<34), uint64(virtio.FRingPacked.Bit()), "RING_PACKED is bit 34")
	got, err := DecodeState(b)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	enc, err := EncodeState(want)
	require.NoError(t, err)
	assert.Equal(t, b, enc)

	r, err := vring.NewMemfdRegion(0, 0x100000, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	f := newFakeBacking()
	d := newTestDevice(t, f, &Options{Memory: mem, Backend: "software"})
	require.NoError(t, d.SetMigrationState(MigStop))
	require.NoError(t, d.SetMigrationState(MigResuming))
	require.NoError(t, d.LoadState(b))
	require.NoError(t, d.SetMigrationState(MigStop))
	require.NoError(t, d.SetMigrationState(MigRunning))
	require.NoError(t, d.Err())
	f.mu.Lock()
	defer f.mu.Unlock()
	assert.Equal(t, want.DriverFeatures, f.accepted)
	assert.EqualValues(t, 200, f.num[0])
	assert.EqualValues(t, 100, f.num[1])
	assert.Equal(t, stateAt(vring.PackedIndex(5, true), vring.PackedIndex(5, true)), f.base[0])
	assert.Equal(t, stateAt(vring.PackedIndex(3, false), vring.PackedIndex(97, true)), f.base[1])
	assert.EqualValues(t, 0x20800, f.addr[1].Avail)
	assert.EqualValues(t, 0x28000, f.addr[1].Used)
}
