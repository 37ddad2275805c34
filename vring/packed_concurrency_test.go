package vring

import (
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
	"golang.org/x/sys/unix"
)

// TestPackedCrossGoroutine is TestCrossGoroutine for packed rings: a
// million chains of random shape (1-3 readable segments and a writable
// one: chains of 2-4 ring descriptors, or one indirect descriptor) between
// a driver goroutine and a device goroutine, busy-polling and with
// notifications (ENABLE/DISABLE flags, and DESC event offsets with
// EVENT_IDX), on ring sizes that are not powers of two, every byte checked
// both ways by seeded generators. Each mode runs over memfd memory and
// over Go heap memory (where the race detector checks the ordering).
func TestPackedCrossGoroutine(t *testing.T) {
	pk := virtio.Features(0).With(virtio.FRingPacked)
	for _, m := range []crossMode{
		{"polling 256", pk, false, 32, 256, false},
		{"polling 61", pk, false, 7, 61, false},
		{"polling in order 255", pk.With(virtio.FInOrder), false, 32, 255, false},
		{"notify flags 100", pk, true, 8, 100, false},
		{"notify event idx indirect 17", pk.With(virtio.FEventIdx, virtio.FIndirectDesc), true, 1, 17, false},
		{"notify event idx 1000", pk.With(virtio.FEventIdx), true, 4, 1000, false},
		{"notify event idx in order 5", pk.With(virtio.FEventIdx, virtio.FInOrder), true, 3, 5, false},
	} {
		t.Run(m.name+"/memfd", func(t *testing.T) { packedCrossGoroutine(t, m, false) })
		t.Run(m.name+"/heap", func(t *testing.T) { packedCrossGoroutine(t, m, true) })
	}
}

func packedCrossGoroutine(t *testing.T, m crossMode, heap bool) {
	n := chainCount(t)
	if m.notify {
		n /= 4 // notifications cost a channel operation per wakeup
	}
	_, mem, _, data := newTrafficMemory(t, m.size, heap)
	defer mem.Close()
	l := ContiguousPackedLayout(0, m.size)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: m.feat})
	require.NoError(t, err)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: m.feat, State: InitialState(m.feat)})
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
	st := dev.State()
	require.Equal(t, st.NextAvail, st.NextUsed, "nothing in flight")
	require.Equal(t, int(m.size), drv.NumFree())
}

// TestPackedCrossProcess runs a packed ring's device side in a child
// process mapping the same memfd.
func TestPackedCrossProcess(t *testing.T) {
	const size = 251
	if os.Getenv("VRING_PXPROC_CHILD") == "1" {
		packedCrossProcessChild(t, size)
		return
	}
	n := chainCount(t)
	r, mem, _, data := trafficMemory(t, size)
	defer mem.Close()
	f := virtio.Features(0).With(virtio.FRingPacked, virtio.FEventIdx)
	drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: ContiguousPackedLayout(0, size), Features: f})
	require.NoError(t, err)
	exe, err := os.Executable()
	require.NoError(t, err)
	dupFd, err := unix.Dup(r.Fd())
	require.NoError(t, err)
	fd := os.NewFile(uintptr(dupFd), "memfd")
	defer fd.Close()
	cmd := exec.Command(exe, "-test.run=^TestPackedCrossProcess$", "-test.v")
	cmd.Env = append(os.Environ(), "VRING_PXPROC_CHILD=1",
		"VRING_XPROC_N="+strconv.Itoa(n), "VRING_XPROC_SIZE="+strconv.FormatUint(r.Size(), 10))
	cmd.ExtraFiles = []*os.File{fd} // fd 3 in the child
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	derr := runDriver(mem, drv, trafficOpts{n: n, seed: 7, data: data})
	werr := cmd.Wait()
	require.NoError(t, derr, "child output:\n%s", out.String())
	require.NoError(t, werr, "child output:\n%s", out.String())
}

func packedCrossProcessChild(t *testing.T, size uint16) {
	n, err := strconv.Atoi(os.Getenv("VRING_XPROC_N"))
	require.NoError(t, err)
	msize, err := strconv.ParseUint(os.Getenv("VRING_XPROC_SIZE"), 10, 64)
	require.NoError(t, err)
	r, err := NewFdRegion(0, msize, 3, 0, nil)
	require.NoError(t, err)
	mem, err := NewMemory(r)
	require.NoError(t, err)
	defer mem.Close()
	f := virtio.Features(0).With(virtio.FRingPacked, virtio.FEventIdx)
	dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousPackedLayout(0, size), Features: f, State: InitialState(f)})
	require.NoError(t, err)
	require.NoError(t, runDevice(dev, trafficOpts{n: n, seed: 7, batch: 32}))
}
