package vring

import (
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
	"golang.org/x/sys/unix"
)

// chainCount is a million chains, fewer with -short or the race detector.
func chainCount(t *testing.T) int {
	if testing.Short() || raceEnabled {
		return 100_000
	}
	return 1_000_000
}

// trafficMemory is memfd guest memory holding a ring of the given size at 0
// and the traffic slots and indirect tables after it.
func trafficMemory(t testing.TB, size uint16) (*Region, *Memory, Layout, GuestAddr) {
	return newTrafficMemory(t, size, false)
}

// newTrafficMemory is trafficMemory, backed by a Go heap slice instead of
// a memfd mapping when heap is set. The race detector sees plain accesses
// to heap memory only (not to mmap'd memory), so only the heap variant lets
// `go test -race` check the ring's memory ordering.
func newTrafficMemory(t testing.TB, size uint16, heap bool) (*Region, *Memory, Layout, GuestAddr) {
	ringBytes := (ContiguousLayoutBytes(size) + 4095) &^ 4095
	total := (ringBytes + uint64(size)*(trafficSlot+16*(maxReadable+1)) + 4095) &^ 4095
	var r *Region
	var err error
	if heap {
		r, err = NewRegion(0, heapBytes(total), nil)
	} else {
		r, err = NewMemfdRegion(0, total, &RegionOptions{Name: "vring-traffic"})
	}
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	return r, mem, ContiguousLayout(0, size), GuestAddr(ringBytes)
}

// heapBytes is n bytes of Go heap memory starting on a 4096-byte boundary
// (the ring areas must be host-aligned like their guest addresses).
func heapBytes(n uint64) []byte {
	b := make([]byte, n+4096)
	off := (4096 - uintptr(hostAddrOf(b))%4096) % 4096
	return b[off : uint64(off)+n : uint64(off)+n]
}

func signal(ch chan struct{}) func() {
	return func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func wait(ch chan struct{}) func(context.Context) error {
	return func(ctx context.Context) error {
		select {
		case <-ch:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// TestCrossGoroutine moves a million chains of random shape between a
// driver goroutine and a device goroutine, busy-polling and with
// notifications (flags, and event idx with indirect tables), verifying every
// byte both ways. Each mode runs over memfd memory (what devices use) and
// over Go heap memory, where the race detector checks every descriptor,
// ring entry and buffer access against the index stores and loads that
// must order it (it does not see accesses to mmap'd memory at all).
func TestCrossGoroutine(t *testing.T) {
	for _, m := range []crossMode{
		{"polling", 0, false, 32, 256, false},
		{"notify flags", 0, true, 8, 64, false},
		{"notify event idx indirect", virtio.Features(0).With(virtio.FEventIdx, virtio.FIndirectDesc), true, 1, 16, false},
		{"notify event idx 2-aligned avail", virtio.Features(0).With(virtio.FEventIdx), true, 4, 32, true},
	} {
		t.Run(m.name+"/memfd", func(t *testing.T) { crossGoroutine(t, m, false) })
		t.Run(m.name+"/heap", func(t *testing.T) { crossGoroutine(t, m, true) })
	}
}

type crossMode struct {
	name   string
	feat   virtio.Features
	notify bool
	batch  int
	size   uint16
	// avail2 places the available ring at an address that is 2 mod 4,
	// exercising the other avail.idx word layout (see ring.go).
	avail2 bool
}

func crossGoroutine(t *testing.T, m crossMode, heap bool) {
	n := chainCount(t)
	if m.notify {
		n /= 4 // notifications cost a channel operation per wakeup
	}
	_, mem, l, data := newTrafficMemory(t, m.size, heap)
	defer mem.Close()
	if m.avail2 {
		_, a, _ := SplitSizes(m.size)
		l.Avail += 2
		l.Used = (l.Avail + GuestAddr(a) + 3) &^ 3
	}
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: m.feat})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: m.feat})
	require.NoError(t, err)
	o := trafficOpts{n: n, seed: 42, batch: m.batch, data: data, idleTimeout: time.Minute,
		indirect: m.feat.Has(virtio.FIndirectDesc)}
	if m.notify {
		kick, intr := make(chan struct{}, 1), make(chan struct{}, 1)
		o.kick, o.waitKick = signal(kick), wait(kick)
		o.interrupt, o.waitIntr = signal(intr), wait(intr)
	}
	errc := make(chan error, 1)
	go func() { errc <- runDevice(dev, o) }()
	require.NoError(t, runDriver(mem, drv, o))
	require.NoError(t, <-errc)
	require.Equal(t, QueueState{NextAvail: uint16(n), NextUsed: uint16(n)}, dev.State())
}

// TestCrossProcess runs the device side in a child process (this test binary
// re-executed) that maps the same memfd, received as an inherited fd.
func TestCrossProcess(t *testing.T) {
	if os.Getenv("VRING_XPROC_CHILD") == "1" {
		crossProcessChild(t)
		return
	}
	const size = 256
	n := chainCount(t)
	r, mem, l, data := trafficMemory(t, size)
	defer mem.Close()
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l})
	require.NoError(t, err)

	exe, err := os.Executable()
	require.NoError(t, err)
	// The child gets its own duplicate of the memfd, owned by f and closed
	// here: an *os.File wrapping the region's own fd would close that fd
	// number again from its finalizer, after mem.Close, when it may already
	// belong to another test's memfd.
	dupFd, err := unix.Dup(r.Fd())
	require.NoError(t, err)
	f := os.NewFile(uintptr(dupFd), "memfd")
	defer f.Close()
	cmd := exec.Command(exe, "-test.run=^TestCrossProcess$", "-test.v")
	cmd.Env = append(os.Environ(), "VRING_XPROC_CHILD=1",
		"VRING_XPROC_N="+strconv.Itoa(n), "VRING_XPROC_SIZE="+strconv.FormatUint(r.Size(), 10))
	cmd.ExtraFiles = []*os.File{f} // fd 3 in the child
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	derr := runDriver(mem, drv, trafficOpts{n: n, seed: 7, data: data})
	werr := cmd.Wait()
	require.NoError(t, derr, "child output:\n%s", out.String())
	require.NoError(t, werr, "child output:\n%s", out.String())
}

func crossProcessChild(t *testing.T) {
	n, err := strconv.Atoi(os.Getenv("VRING_XPROC_N"))
	require.NoError(t, err)
	size, err := strconv.ParseUint(os.Getenv("VRING_XPROC_SIZE"), 10, 64)
	require.NoError(t, err)
	r, err := NewFdRegion(0, size, 3, 0, nil)
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	defer mem.Close()
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousLayout(0, 256)})
	require.NoError(t, err)
	require.NoError(t, runDevice(dev, trafficOpts{n: n, seed: 7, batch: 32}))
}

// TestRaceDetectorSeesHeapRings shows why TestCrossGoroutine has heap
// variants: a child process breaks the protocol on purpose (the driver
// rewrites a published descriptor while the device reads it, with nothing
// ordering the two). On a heap-backed region the race detector reports it;
// on a memfd mapping the very same race goes unreported.
func TestRaceDetectorSeesHeapRings(t *testing.T) {
	if backing := os.Getenv("VRING_RACE_CHILD"); backing != "" {
		racyChild(t, backing == "heap")
		return
	}
	if !raceEnabled {
		t.Skip("needs the race detector (go test -race)")
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	for _, tc := range []struct {
		backing  string
		reported bool
	}{{"heap", true}, {"memfd", false}} {
		t.Run(tc.backing, func(t *testing.T) {
			cmd := exec.Command(exe, "-test.run=^TestRaceDetectorSeesHeapRings$", "-test.count=1")
			cmd.Env = append(os.Environ(), "VRING_RACE_CHILD="+tc.backing, "GORACE=halt_on_error=0")
			out, err := cmd.CombinedOutput()
			assert.Equal(t, tc.reported, strings.Contains(string(out), "WARNING: DATA RACE"), "child output:\n%s", out)
			assert.Equal(t, tc.reported, err != nil, "child exit: %v", err)
		})
	}
}

func racyChild(t *testing.T, heap bool) {
	_, mem, l, data := newTrafficMemory(t, 16, heap)
	defer mem.Close()
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l})
	require.NoError(t, err)
	head, err := drv.Add([]Buffer{{Addr: data, Len: 64}})
	require.NoError(t, err)
	drv.Publish()
	done := make(chan error)
	go func() {
		var c Chain
		c.Segs = make([]Segment, 0, 4)
		_, err := dev.Pop(&c)
		done <- err
	}()
	// The bug: rewriting descriptor head after publishing it.
	var d [16]byte
	binary.LittleEndian.PutUint64(d[:], uint64(data))
	binary.LittleEndian.PutUint32(d[8:], 32)
	require.NoError(t, mem.Write(l.Desc+16*GuestAddr(head), d[:]))
	require.NoError(t, <-done)
}
