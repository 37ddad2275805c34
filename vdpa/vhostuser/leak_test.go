package vhostuser

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// The leak tests start many devices through the public API, send a frame
// through each, close everything and require the goroutines and file
// descriptors of the process to come back to where they were. The counts
// are small enough for go test ./...; the bench harness's scale suite runs
// the same lifecycle with thousands.

// leakDev is one device of a leak test and what its embedder made for it.
type leakDev struct {
	sw      *softnet.Device
	dev     vdpa.Device
	mem     *vring.Memory
	efds    []*vdpa.EventFD
	drv     [2]*vringtest.Driver
	kick    *vdpa.EventFD
	stopped func() error // ends a back-end's Serve and reports how it ended
}

var leakFeatures = virtio.Features(0).With(virtio.FVersion1, virtio.NetFMAC)

// start runs the virtio initialization sequence for one queue pair with
// kick and call eventfds on both queues.
func (ld *leakDev) start() error {
	const size, stride = 64, 0x10000
	r, err := vring.NewMemfdRegion(0, 2*stride, nil)
	if err != nil {
		return err
	}
	if ld.mem, err = vring.NewMemory(r); err != nil {
		r.Close()
		return err
	}
	d := ld.dev
	st := virtio.StatusAcknowledge | virtio.StatusDriver
	if err := errors.Join(d.SetStatus(st), d.SetFeatures(leakFeatures), d.SetStatus(st|virtio.StatusFeaturesOK), d.SetMemory(ld.mem)); err != nil {
		return err
	}
	for q := range 2 {
		base := vring.GuestAddr(q) * stride
		l := vring.ContiguousLayout(base, size)
		if ld.drv[q], err = vringtest.NewDriver(ld.mem, vringtest.DriverOptions{Index: q, Layout: l, Features: leakFeatures,
			Data: base + 0x2000, SlotSize: 256}); err != nil {
			return err
		}
		kick, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		ld.efds = append(ld.efds, kick)
		call, err := vdpa.NewEventFD()
		if err != nil {
			return err
		}
		ld.efds = append(ld.efds, call)
		ld.kick = kick
		if err := errors.Join(d.SetQueueNum(q, size), d.SetQueueAddr(q, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}),
			d.SetQueueKick(q, kick), d.SetQueueCall(q, call), d.EnableQueue(q, true)); err != nil {
			return err
		}
	}
	return d.SetStatus(st | virtio.StatusFeaturesOK | virtio.StatusDriverOK)
}

// ping sends a frame and waits for its loopback.
func (ld *leakDev) ping(t *testing.T, seq byte) {
	t.Helper()
	_, _, err := ld.drv[0].Send(nil, []uint32{256})
	require.NoError(t, err)
	mac := ld.sw.MAC()
	f := append(make([]byte, virtio.NetHdrLen(leakFeatures)), mac[:]...)
	f = append(f, 0x02, 0, 0, 0, 0, 0x09, 0x88, 0xb5, seq)
	_, _, err = ld.drv[1].Send([][]byte{f}, nil)
	require.NoError(t, err)
	require.NoError(t, ld.kick.Signal())
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, ok, err := ld.drv[0].Receive()
		require.NoError(t, err)
		if ok {
			require.Equal(t, seq, c.Data[c.Len-1], "the frame came back")
			return
		}
		require.True(t, time.Now().Before(deadline), "no loopback of frame %d", seq)
		time.Sleep(50 * time.Microsecond)
	}
}

func (ld *leakDev) close() error {
	var errs []error
	if ld.dev != nil {
		errs = append(errs, ld.dev.Close())
	}
	if ld.stopped != nil {
		errs = append(errs, ld.stopped())
	}
	for _, e := range ld.efds {
		errs = append(errs, e.Close())
	}
	if ld.mem != nil {
		errs = append(errs, ld.mem.Close())
	}
	return errors.Join(errs...)
}

func fdCount(t *testing.T) int {
	t.Helper()
	return len(openFdSet(t))
}

// goroutineSet returns the IDs of the process's goroutines now, read from
// their stacks' headers ("goroutine 7 [running]:"). IDs are never reused,
// so unlike a count the set cannot mistake a goroutine of an earlier test
// still on its way out for one the test left behind.
func goroutineSet() map[string]bool {
	set := map[string]bool{}
	for id := range goroutineStacks() {
		set[id] = true
	}
	return set
}

// goroutineStacks returns every goroutine's stack by its ID.
func goroutineStacks() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	stacks := map[string]string{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		if rest, ok := strings.CutPrefix(g, "goroutine "); ok {
			if id, _, ok := strings.Cut(rest, " "); ok {
				stacks[id] = g
			}
		}
	}
	return stacks
}

// newGoroutines returns the stacks of the goroutines that are not in
// before.
func newGoroutines(before map[string]bool) []string {
	var added []string
	for id, g := range goroutineStacks() {
		if !before[id] {
			added = append(added, g)
		}
	}
	return added
}

// requireNothingLeaked waits (up to 5 s) for every goroutine started since
// goroutines was taken to end and every descriptor opened since fds was
// taken to be closed, and fails naming what is left. Both are compared as
// sets (goroutine IDs; descriptors by leakedSince), not counted, so that a
// goroutine or descriptor of something earlier, ending meanwhile, can
// neither hide one left behind nor fail the test. A descriptor that only a
// forced collection closes (an os.File or a connection dropped without
// Close) is reported as such: it is a leak too.
func requireNothingLeaked(t *testing.T, goroutines map[string]bool, fds fdSet) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(newGoroutines(goroutines)) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if left := newGoroutines(goroutines); len(left) > 0 {
		t.Fatalf("%d goroutines left after close:\n%s", len(left), strings.Join(left, "\n\n"))
	}
	added := leakedSince(t, fds)
	for len(added) > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		added = leakedSince(t, fds)
	}
	if len(added) == 0 {
		return
	}
	runtime.GC()
	runtime.GC() // finalizers queued by the first one have run
	time.Sleep(10 * time.Millisecond)
	if left := leakedSince(t, fds); len(left) < len(added) {
		t.Fatalf("descriptors left open after close, closed only by the garbage collector: %v (still open after it: %v)", added, left)
	}
	t.Fatalf("descriptors left open after close: %v", added)
}

func newLocalLeakDev(t *testing.T, _ int) *leakDev {
	sw, err := softnet.New(&softnet.Options{MaxQueueSize: 64})
	require.NoError(t, err)
	return &leakDev{sw: sw, dev: vdpa.NewLocal(sw, nil)}
}

func newSessionLeakDev(dir string) func(t *testing.T, i int) *leakDev {
	return func(t *testing.T, i int) *leakDev {
		sw, err := softnet.New(&softnet.Options{MaxQueueSize: 64})
		require.NoError(t, err)
		path := filepath.Join(dir, fmt.Sprintf("%d.sock", i))
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		require.NoError(t, err)
		l.SetUnlinkOnClose(true)
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan error, 1)
		go func() { served <- NewBackend(sw, nil).Serve(ctx, l) }()
		ld := &leakDev{sw: sw, stopped: func() error {
			cancel()
			if err := <-served; !errors.Is(err, context.Canceled) {
				return fmt.Errorf("Serve ended with %v", err)
			}
			return nil
		}}
		f, err := Dial(ctx, path, &FrontendOptions{MaxQueueSize: 64})
		if err != nil {
			require.NoError(t, errors.Join(err, ld.close()))
		}
		ld.dev = f
		return ld
	}
}

// TestManyDevicesLeakNothing: 64 softnet devices behind vdpa.Local and 32
// vhost-user sessions (Backend serving softnet, Frontend driving it), each
// started and answering a frame, then closed: no goroutine and no
// descriptor survives them.
func TestManyDevicesLeakNothing(t *testing.T) {
	tests := []struct {
		name string
		n    int
		mk   func(dir string) func(*testing.T, int) *leakDev
	}{
		{"softnet behind vdpa.Local", 64, func(string) func(*testing.T, int) *leakDev { return newLocalLeakDev }},
		{"vhost-user sessions", 32, newSessionLeakDev},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			// Start the runtime poller (its epoll and wake-up descriptors
			// live for the rest of the process) before counting.
			e, err := vdpa.NewEventFD()
			require.NoError(t, err)
			require.NoError(t, e.Close())
			goroutines, fds := goroutineSet(), openFdSet(t)

			mk := tt.mk(dir)
			devs := make([]*leakDev, 0, tt.n)
			for i := range tt.n {
				ld := mk(t, i)
				devs = append(devs, ld)
				if err := ld.start(); err != nil {
					for _, d := range devs {
						d.close()
					}
					t.Fatalf("device %d: %v", i, err)
				}
			}
			require.Greater(t, fdCount(t), len(fds)+tt.n, "the devices hold descriptors while open")
			for i, d := range devs {
				d.ping(t, byte(i))
			}
			for i, d := range devs {
				require.NoError(t, d.close(), "device %d", i)
			}
			requireNothingLeaked(t, goroutines, fds)
		})
	}
}

// TestBackendHugeMemoryTableLogRefused: a front-end whose memory table
// reaches guest address 2^50 and that negotiates LOG_ALL before sending a
// log makes the back-end log into a pending bitmap for the whole table:
// 32 GiB of log, beyond what dirty.New creates on any machine with less
// than 128 GiB of RAM. The session ends with a protocol error instead of
// the process dying of a runtime out-of-memory error, and the back-end's
// goroutines and descriptors are released.
func TestBackendHugeMemoryTableLogRefused(t *testing.T) {
	const far = 1 << 50
	if need := uint64(far / dirty.DefaultPageSize / 8); need <= dirty.MemoryLimit() {
		t.Skipf("this machine would accept a %d-byte log", need)
	}
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	require.NoError(t, e.Close())
	goroutines, fds := goroutineSet(), openFdSet(t)

	func() {
		sw, err := softnet.New(&softnet.Options{MaxQueueSize: 64})
		require.NoError(t, err)
		a, b := socketpair(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- NewBackend(sw, nil).ServeConn(ctx, b) }()
		fe, err := NewFrontend(ctx, a, nil)
		require.NoError(t, err)
		defer fe.Close()
		low, err := vring.NewMemfdRegion(0x100000, 1<<20, nil)
		require.NoError(t, err)
		high, err := vring.NewMemfdRegion(far, 4096, nil)
		require.NoError(t, err)
		mem, err := vring.NewMemory(low, high)
		require.NoError(t, err)
		defer mem.Close()
		offered, err := fe.Features()
		require.NoError(t, err)
		f := offered & virtio.Features(0).With(virtio.FVersion1, virtio.FLogAll, virtio.NetFMAC)
		require.True(t, f.Has(virtio.FLogAll))
		require.NoError(t, fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver))
		require.NoError(t, fe.SetFeatures(f))
		require.NoError(t, fe.SetMemory(mem))
		l := vring.ContiguousLayout(0x100000, 64)
		kick, err := vdpa.NewEventFD()
		require.NoError(t, err)
		defer kick.Close()
		// Starting the ring needs the pending log: the back-end refuses it
		// and ends the session, so one of these calls fails.
		err = errors.Join(fe.SetQueueNum(0, 64), fe.SetQueueAddr(0, vdpa.QueueAddr{Desc: l.Desc, Avail: l.Avail, Used: l.Used}),
			fe.SetQueueBase(0, vdpa.QueueState{}), fe.SetQueueKick(0, kick), fe.EnableQueue(0, true),
			fe.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
		select {
		case serr := <-done:
			require.ErrorIs(t, serr, ErrProtocol)
			require.ErrorContains(t, serr, "pending dirty log")
			require.Error(t, err, "the front-end saw the session end")
		case <-time.After(10 * time.Second):
			t.Fatalf("the session did not end (front-end calls: %v)", err)
		}
	}()
	requireNothingLeaked(t, goroutines, fds)
}
