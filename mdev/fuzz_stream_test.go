package mdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

type streamRW struct {
	io.Reader
	io.Writer
}

func msgBytes(typ byte, payload ...[]byte) []byte {
	var n int
	for _, p := range payload {
		n += len(p)
	}
	b := []byte{typ, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(b[1:], uint32(n))
	for _, p := range payload {
		b = append(b, p...)
	}
	return b
}

// validStream is a whole migration of a 1 MiB guest with a device that has
// not been started by its driver.
func validStream(t testing.TB) []byte {
	src := newTestDevice(t, newFakeBacking(), nil)
	if err := src.SetMigrationState(MigStopCopy); err != nil {
		t.Fatal(err)
	}
	state, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	hello := binary.LittleEndian.AppendUint16(nil, protoVersion)
	hello = binary.LittleEndian.AppendUint32(hello, 4096)
	hello = binary.LittleEndian.AppendUint16(hello, 1)
	hello = binary.LittleEndian.AppendUint64(hello, 0)
	hello = binary.LittleEndian.AppendUint64(hello, 1<<20)
	page := make([]byte, 8+4096)
	binary.LittleEndian.PutUint64(page, 0x3000)
	page[8+100] = 0xaa
	var s []byte
	s = append(s, msgBytes(msgHello, hello)...)
	s = append(s, msgBytes(msgPages, page)...)
	s = append(s, msgBytes(msgRound, make([]byte, 12))...)
	s = append(s, msgBytes(msgSync)...)
	s = append(s, msgBytes(msgState, state)...)
	s = append(s, msgBytes(msgDone)...)
	return s
}

func TestMigrateDestinationValidStream(t *testing.T) {
	dst := newTestDevice(t, newFakeBacking(), nil)
	var out bytes.Buffer
	rep, err := MigrateDestination(context.Background(), streamRW{bytes.NewReader(validStream(t)), &out},
		DestOptions{Device: dst, Memory: dst.opts.Memory})
	if err != nil {
		t.Fatal(err)
	}
	if rep.PageBytes != 4096 || rep.Rounds != 1 {
		t.Fatalf("report %+v", rep)
	}
	b := make([]byte, 1)
	if err := dst.opts.Memory.Read(0x3000+100, b); err != nil || b[0] != 0xaa {
		t.Fatalf("page not written: %v %x", err, b)
	}
	if dst.MigrationState() != MigRunning {
		t.Fatalf("state %s", dst.MigrationState())
	}
}

// FuzzMigrationStream feeds arbitrary bytes to the destination side of the
// migration protocol. It must end with an error or success — never a panic,
// a hang or a write outside guest memory — and a failed stream must not
// leave a half-loaded device running.
func FuzzMigrationStream(f *testing.F) {
	f.Add(validStream(f))
	f.Add([]byte{msgHello, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		dst := newTestDevice(t, newFakeBacking(), nil)
		_, err := MigrateDestination(context.Background(), streamRW{bytes.NewReader(b), io.Discard},
			DestOptions{Device: dst, Memory: dst.opts.Memory})
		if err != nil {
			if dst.MigrationState() == MigRunning && dst.Status() != 0 {
				t.Fatalf("failed stream left a restored device running: %v", err)
			}
			if errors.Is(err, ErrInvalidOptions) {
				t.Fatal(err)
			}
		}
	})
}
