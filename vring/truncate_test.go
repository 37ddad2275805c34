package vring

import (
	"errors"
	"os"
	"runtime/debug"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/guestatomic"
	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/virtio"
)

// peerMemfd creates a memfd of size bytes the way a peer might: flags
// decide whether it can be sealed.
func peerMemfd(t *testing.T, size int64, flags int) int {
	t.Helper()
	fd, err := unix.MemfdCreate("peer", unix.MFD_CLOEXEC|flags)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, size))
	return fd
}

// TestTruncatedMappingFaultIsError maps an unsealed peer memfd (NoSeal),
// shrinks the file under the mapping, and checks that accesses to the lost
// pages are ErrMemoryFault errors and the process goes on: through
// Memory.Read/Write (guarded themselves), and through a zero-copy slice
// under CatchFault.
func TestTruncatedMappingFaultIsError(t *testing.T) {
	const size = 4 * 4096
	fd := peerMemfd(t, size, 0)
	r, err := NewFdRegion(0x10000, size, fd, 0, &RegionOptions{NoSeal: true})
	require.NoError(t, err)
	assert.False(t, r.Sealed(), "NoSeal on an unsealed memfd")
	mem, err := NewMemory(r)
	require.NoError(t, err)
	defer mem.Close()
	require.NoError(t, mem.Write(0x10000+3*4096, []byte("last page")))

	// The peer keeps only the first page.
	require.NoError(t, unix.Ftruncate(fd, 4096))

	p := make([]byte, 9)
	require.NoError(t, mem.Read(0x10000, p), "the page still in the file")
	err = mem.Read(0x10000+3*4096, p)
	require.ErrorIs(t, err, ErrMemoryFault)
	var fe *FaultError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, uintptr(r.HostAddr())+3*4096, fe.Addr, "the first byte of the lost page")
	assert.ErrorIs(t, mem.Write(0x10000+2*4096, p), ErrMemoryFault)

	// A Read that starts in the surviving page and runs into a lost one.
	err = mem.Read(0x10000+4096-4, make([]byte, 8))
	assert.ErrorIs(t, err, ErrMemoryFault)

	// Zero-copy access, the way a device touches buffers.
	b, err := mem.Slice(0x10000+3*4096, 16)
	require.NoError(t, err, "translation does not touch the memory")
	touch := func() (err error) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer CatchFault(&err)
		b[0] = 1
		return nil
	}
	assert.ErrorIs(t, touch(), ErrMemoryFault)
	assert.ErrorIs(t, Guard(func() error { _ = b[5]; return copyInto(p, b) }), ErrMemoryFault)
	assert.NoError(t, Guard(func() error { return nil }))
}

func copyInto(dst, src []byte) error {
	copy(dst, src)
	return nil
}

// TestCatchFaultRepanicsOtherPanics: only memory faults become errors.
func TestCatchFaultRepanicsOtherPanics(t *testing.T) {
	other := errors.New("not a fault")
	assert.PanicsWithValue(t, other, func() {
		_ = Guard(func() error { panic(other) })
	})
	assert.Panics(t, func() {
		_ = Guard(func() error {
			var p *[4]byte
			p[1] = 1 // nil dereference: a runtime.Error without Addr
			return nil
		})
	})
	var s []int
	i := 3
	assert.Panics(t, func() { _ = Guard(func() error { s[i] = 1; return nil }) })
}

// TestFdRegionSeals checks the seal handling of NewFdRegion: which peer
// files end up protected against shrinking, and that a protected one
// cannot be shrunk.
func TestFdRegionSeals(t *testing.T) {
	const size = 2 * 4096
	t.Run("unsealed memfd gets F_SEAL_SHRINK", func(t *testing.T) {
		fd := peerMemfd(t, size, unix.MFD_ALLOW_SEALING)
		r, err := NewFdRegion(0, size, fd, 0, nil)
		require.NoError(t, err)
		defer r.Close()
		assert.True(t, r.Sealed())
		assert.ErrorIs(t, unix.Ftruncate(fd, 4096), unix.EPERM, "the peer can no longer shrink it")
		assert.NoError(t, unix.Ftruncate(fd, 4*4096), "growing stays allowed")
	})
	t.Run("already sealed like QEMU's memory-backend-memfd", func(t *testing.T) {
		fd := peerMemfd(t, size, unix.MFD_ALLOW_SEALING)
		_, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_GROW|unix.F_SEAL_SHRINK|unix.F_SEAL_SEAL)
		require.NoError(t, err)
		r, err := NewFdRegion(0, size, fd, 0, &RegionOptions{NoSeal: true})
		require.NoError(t, err)
		defer r.Close()
		assert.True(t, r.Sealed())
	})
	t.Run("seals locked without F_SEAL_SHRINK", func(t *testing.T) {
		fd := peerMemfd(t, size, unix.MFD_ALLOW_SEALING)
		_, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SEAL)
		require.NoError(t, err)
		r, err := NewFdRegion(0, size, fd, 0, nil)
		require.NoError(t, err)
		defer r.Close()
		assert.False(t, r.Sealed())
	})
	t.Run("memfd without MFD_ALLOW_SEALING", func(t *testing.T) {
		fd := peerMemfd(t, size, 0)
		r, err := NewFdRegion(0, size, fd, 0, nil)
		require.NoError(t, err)
		defer r.Close()
		assert.False(t, r.Sealed())
		assert.NoError(t, unix.Ftruncate(fd, size), "nothing was added")
	})
	t.Run("NoSeal leaves an unsealed memfd alone", func(t *testing.T) {
		fd := peerMemfd(t, size, unix.MFD_ALLOW_SEALING)
		r, err := NewFdRegion(0, size, fd, 0, &RegionOptions{NoSeal: true})
		require.NoError(t, err)
		defer r.Close()
		assert.False(t, r.Sealed())
		seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
		require.NoError(t, err)
		assert.Zero(t, seals&unix.F_SEAL_SHRINK)
	})
	t.Run("file shorter than the region", func(t *testing.T) {
		fd := peerMemfd(t, size, unix.MFD_ALLOW_SEALING)
		_, err := NewFdRegion(0, size, fd, 4096, nil)
		assert.ErrorIs(t, err, ErrInvalidRegion, "offset+size past the end of file would fault")
	})
	t.Run("own memfd regions are sealed", func(t *testing.T) {
		r, err := NewMemfdRegion(0, size, nil)
		require.NoError(t, err)
		defer r.Close()
		assert.True(t, r.Sealed())
		assert.ErrorIs(t, unix.Ftruncate(r.Fd(), 0), unix.EPERM)
	})
	t.Run("wrapped memory reports what the caller says", func(t *testing.T) {
		r, err := NewRegion(0, make([]byte, 16), &RegionOptions{Sealed: true})
		require.NoError(t, err)
		assert.True(t, r.Sealed())
		r, err = NewRegion(0, make([]byte, 16), nil)
		require.NoError(t, err)
		assert.False(t, r.Sealed())
	})
}

// TestTruncatedRingFaultIsError: a queue whose ring pages are gone faults
// in its index loads (atomics, with and without the race detector); under
// Guard that is an error too.
func TestTruncatedRingFaultIsError(t *testing.T) {
	const size = 4 * 4096
	fd := peerMemfd(t, size, 0)
	r, err := NewFdRegion(0, size, fd, 0, nil)
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	defer mem.Close()
	dq, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousLayout(0, 16)})
	require.NoError(t, err)
	require.NoError(t, unix.Ftruncate(fd, 0))
	var c Chain
	err = Guard(func() error {
		_, err := dq.Pop(&c)
		return err
	})
	assert.ErrorIs(t, err, ErrMemoryFault)
	assert.ErrorIs(t, Guard(func() error { _, err := dq.EnableNotify(); return err }), ErrMemoryFault)
}

// TestNewDeviceQueueOnTruncatedRing: a server creating a queue whose ring
// pages are already gone gets an error, not a SIGBUS.
func TestNewDeviceQueueOnTruncatedRing(t *testing.T) {
	for _, f := range []virtio.Features{0, virtio.Features(0).With(virtio.FEventIdx)} {
		fd := peerMemfd(t, 4*4096, 0)
		r, err := NewFdRegion(0, 4*4096, fd, 0, nil)
		require.NoError(t, err)
		mem, err := NewMemory(r)
		require.NoError(t, err)
		require.NoError(t, unix.Ftruncate(fd, 0))
		_, err = NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousLayout(0, 16), Features: f})
		assert.ErrorIs(t, err, ErrMemoryFault, "features %v", f)
		require.NoError(t, mem.Close())
	}
}

// BenchmarkMemoryRead64 measures a 64-byte Memory.Read, which runs under
// its own fault guard (SetPanicOnFault on and off, a deferred recover).
func BenchmarkMemoryRead64(b *testing.B) {
	r, err := NewMemfdRegion(0, 1<<16, nil)
	require.NoError(b, err)
	mem, err := NewMemory(r)
	require.NoError(b, err)
	defer mem.Close()
	p := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		if err := mem.Read(0x100, p); err != nil {
			b.Fatal(err)
		}
	}
}

// TestRingTruncatedWhileInUse: a peer truncates and regrows the file behind
// a ring while the device polls it, enables notifications and decides on
// interrupts, as fast as it can. Every call returns, either normally or with
// ErrMemoryFault; none kills the process. That includes race builds, whose
// sync/atomic operations on such memory could fault on the system stack,
// where the runtime cannot recover (internal/guestatomic).
func TestRingTruncatedWhileInUse(t *testing.T) {
	if !guestatomic.FaultSafe {
		t.Skip("a fault in sync/atomic under the race detector kills the process on this architecture (internal/guestatomic)")
	}
	size := int64(4 * os.Getpagesize())
	for _, tc := range []struct {
		name   string
		feat   virtio.Features
		layout Layout
	}{
		{"split", virtio.Features(0).With(virtio.FEventIdx), ContiguousLayout(0, 16)},
		{"packed", virtio.Features(0).With(virtio.FRingPacked).With(virtio.FEventIdx), ContiguousPackedLayout(0, 16)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fd := peerMemfd(t, size, 0)
			r, err := NewFdRegion(0, uint64(size), fd, 0, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			dq, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: tc.layout, Features: tc.feat, State: InitialState(tc.feat)})
			require.NoError(t, err)

			defer testenv.ShrinkLoop(t, fd, size)()
			var c Chain
			calls := []func() error{
				func() error { _, err := dq.Pop(&c); return err },
				func() error { _, err := dq.EnableNotify(); return err },
				func() error { dq.NeedsInterrupt(); return nil },
			}
			// At least 150 ms, until a fault was seen; a kernel that
			// never faults fails the test after 10 s.
			faults, ok := 0, 0
			start := time.Now()
			for time.Since(start) < 150*time.Millisecond || faults == 0 {
				require.Less(t, time.Since(start), 10*time.Second, "no fault in %d calls", ok)
				for _, call := range calls {
					// A regrown file reads as zeros: an empty ring,
					// so the only error possible is the fault.
					if err := Guard(call); err != nil {
						require.ErrorIs(t, err, ErrMemoryFault)
						faults++
					} else {
						ok++
					}
				}
			}
			t.Logf("%d calls returned, %d faulted", ok, faults)
		})
	}
}
