package mdev

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vdpakit/vdpakit/virtio"
)

// FuzzDecodeState feeds arbitrary bytes to the device state decoder. It must
// never panic; every rejection must wrap one of the ErrState sentinels; and
// whatever it accepts must be valid and re-encode to the identical stream
// (the encoding is canonical up to the version field: a version 2 stream of
// split rings re-encodes as version 1, byte for byte the same otherwise), so
// nothing is silently dropped.
func FuzzDecodeState(f *testing.F) {
	for _, s := range []*State{sampleState(), samplePackedState()} {
		if b, err := EncodeState(s); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("VDPAKMDV"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeState(b)
		if err != nil {
			for _, sentinel := range []error{ErrStateTruncated, ErrStateCorrupt, ErrStateTooLarge,
				ErrStateVersion, ErrStateInvalid} {
				if errors.Is(err, sentinel) {
					return
				}
			}
			t.Fatalf("untyped error: %v", err)
		}
		if err := s.Validate(); err != nil {
			t.Fatalf("accepted an invalid state: %v", err)
		}
		out, err := EncodeState(s)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		if v := binary.LittleEndian.Uint16(b[8:]); v != binary.LittleEndian.Uint16(out[8:]) {
			if s.DriverFeatures.Has(virtio.FRingPacked) {
				t.Fatalf("packed state accepted in a version %d stream", v)
			}
			binary.LittleEndian.PutUint16(out[8:], v)
			out = reseal(out)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, out)
		}
		// ReadState agrees with DecodeState.
		if _, err := ReadState(bytes.NewReader(b)); err != nil {
			t.Fatalf("ReadState rejects what DecodeState accepts: %v", err)
		}
	})
}
