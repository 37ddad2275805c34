package guestatomic

import (
	"os"
	"runtime/debug"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// faultAddr runs f and returns the address of the memory fault it raised, or
// 0 if it returned normally. The calling goroutine has SetPanicOnFault on.
func faultAddr(f func()) (addr uintptr) {
	defer func() {
		if r := recover(); r != nil {
			a, ok := r.(interface{ Addr() uintptr })
			if !ok {
				panic(r)
			}
			addr = a.Addr()
		}
	}()
	f()
	return 0
}

// TestFaultWhileAPeerTruncates: a peer truncates and regrows the file behind
// a shared mapping as fast as it can while every operation runs on the
// mapping. Each operation either completes or faults as a recoverable panic
// at an address inside the word, the way a plain Go access does under
// SetPanicOnFault. Under the race detector, sync/atomic fails this within
// milliseconds: the process dies with "traceback did not unwind completely"
// when the truncation lands between the race runtime's probe of the address
// and its access on the system stack.
func TestFaultWhileAPeerTruncates(t *testing.T) {
	if !FaultSafe {
		t.Skip("a fault in sync/atomic under the race detector kills the process on this architecture (no assembly here)")
	}
	page := os.Getpagesize()
	fd, err := unix.MemfdCreate("guestatomic-test", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, int64(page)))
	m, err := unix.Mmap(fd, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(t, err)
	defer unix.Munmap(m)
	p32 := (*uint32)(unsafe.Pointer(&m[64]))
	p64 := (*uint64)(unsafe.Pointer(&m[128]))

	defer testenv.ShrinkLoop(t, fd, int64(page))()

	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	a32, a64 := uintptr(unsafe.Pointer(p32)), uintptr(unsafe.Pointer(p64))
	for _, o := range implementations() {
		for _, tc := range []struct {
			name string
			addr uintptr
			size uintptr
			op   func()
		}{
			{"load32", a32, 4, func() { o.load32(p32) }},
			{"store32", a32, 4, func() { o.store32(p32, 1) }},
			{"load64", a64, 8, func() { o.load64(p64) }},
			{"swap64", a64, 8, func() { o.swap64(p64, 1) }},
			{"or64", a64, 8, func() { o.or64(p64, 1) }},
		} {
			// At least 100 ms, until both outcomes were seen; a
			// kernel that never faults fails the test after 10 s.
			faults, ok := 0, 0
			start := time.Now()
			for time.Since(start) < 100*time.Millisecond || faults == 0 || ok == 0 {
				require.Less(t, time.Since(start), 10*time.Second,
					"%s %s: %d completed, %d faulted", o.name, tc.name, ok, faults)
				switch a := faultAddr(tc.op); a {
				case 0:
					ok++
				default:
					// Inside the word: 32-bit platforms do a
					// 64-bit operation as two 32-bit accesses.
					require.True(t, a >= tc.addr && a < tc.addr+tc.size,
						"%s %s faulted at %#x, outside the word at %#x", o.name, tc.name, a, tc.addr)
					faults++
				}
			}
			t.Logf("%s %s: %d completed, %d faulted", o.name, tc.name, ok, faults)
		}
	}
}
