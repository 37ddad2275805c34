package vring

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

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
	ringBytes := (ContiguousLayoutBytes(size) + 4095) &^ 4095
	total := ringBytes + uint64(size)*(trafficSlot+16*(maxReadable+1))
	r, err := NewMemfdRegion(0, (total+4095)&^4095, &RegionOptions{Name: "vring-traffic"})
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	return r, mem, ContiguousLayout(0, size), GuestAddr(ringBytes)
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
// byte both ways.
func TestCrossGoroutine(t *testing.T) {
	modes := []struct {
		name   string
		feat   virtio.Features
		notify bool
		batch  int
		size   uint16
		// avail2 places the available ring at an address that is 2 mod 4,
		// exercising the other avail.idx word layout (see ring.go).
		avail2 bool
	}{
		{"polling", 0, false, 32, 256, false},
		{"notify flags", 0, true, 8, 64, false},
		{"notify event idx indirect", virtio.Features(0).With(virtio.FEventIdx, virtio.FIndirectDesc), true, 1, 16, false},
		{"notify event idx 2-aligned avail", virtio.Features(0).With(virtio.FEventIdx), true, 4, 32, true},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			n := chainCount(t)
			if m.notify {
				n /= 4 // notifications cost a channel operation per wakeup
			}
			_, mem, l, data := trafficMemory(t, m.size)
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
		})
	}
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
