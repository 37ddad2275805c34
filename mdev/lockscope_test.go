package mdev

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
)

// gatedBacking is a backing device whose control operations, once armed,
// block until the test releases them: a slow back-end (a vhost-user peer
// taking its time to answer, for example).
type gatedBacking struct {
	*fakeBacking
	gmu     sync.Mutex
	armed   bool
	entered chan string
	release chan struct{}
}

func newGatedBacking() *gatedBacking {
	return &gatedBacking{fakeBacking: newFakeBacking(), entered: make(chan string, 1), release: make(chan struct{})}
}

func (g *gatedBacking) gate(op string) {
	g.gmu.Lock()
	armed := g.armed
	g.armed = false // only the first operation blocks
	g.gmu.Unlock()
	if armed {
		g.entered <- op
		<-g.release
	}
}

func (g *gatedBacking) arm() { g.gmu.Lock(); g.armed = true; g.gmu.Unlock() }

func (g *gatedBacking) SetFeatures(x virtio.Features) error {
	g.gate("SetFeatures")
	return g.fakeBacking.SetFeatures(x)
}
func (g *gatedBacking) Status() (virtio.Status, error) {
	g.gate("Status")
	return g.fakeBacking.Status()
}
func (g *gatedBacking) SetStatus(s virtio.Status) error {
	g.gate(fmt.Sprintf("SetStatus(%s)", s))
	return g.fakeBacking.SetStatus(s)
}
func (g *gatedBacking) ReadConfig(off int, p []byte) error {
	g.gate("ReadConfig")
	return g.fakeBacking.ReadConfig(off, p)
}
func (g *gatedBacking) WriteConfig(off int, p []byte) error {
	g.gate("WriteConfig")
	return g.fakeBacking.WriteConfig(off, p)
}
func (g *gatedBacking) SetQueueCall(q int, e *vdpa.EventFD) error {
	g.gate("SetQueueCall")
	return g.fakeBacking.SetQueueCall(q, e)
}
func (g *gatedBacking) Suspend() error {
	g.gate("Suspend")
	return g.fakeBacking.Suspend()
}

// guestReadsComplete checks that the guest's register reads, and writes
// that need no back-end, complete while a back-end operation is blocked,
// and that they see consistent values.
func guestReadsComplete(t *testing.T, d *Device, wantStatus virtio.Status, wantQSize uint64) (done chan struct{}) {
	t.Helper()
	done = make(chan struct{})
	go func() {
		defer close(done)
		g := driver{t, d}
		assert.Equal(t, wantStatus, g.status())
		assert.Equal(t, d.OfferedFeatures(), g.readFeatures())
		assert.EqualValues(t, 2, g.r(OffNumQueues, 2))
		g.w(OffQueueSelect, 2, 1)
		assert.EqualValues(t, 1, g.r(OffQueueSelect, 2))
		assert.EqualValues(t, wantQSize, g.r(OffQueueSize, 2))
		g.r(OffConfigGeneration, 1)
		mac0, err := d.Read(RegionDevice, 0, 1)
		assert.NoError(t, err)
		assert.EqualValues(t, 0x52, mac0)
		_, err = d.Read(RegionISR, 0, 1)
		assert.NoError(t, err)
		vendor, err := d.Read(RegionPCIConfig, 0, 2)
		assert.NoError(t, err)
		assert.EqualValues(t, PCIVendorID, vendor)
		_, err = d.Read(RegionMSIX, 0, 4)
		assert.NoError(t, err)
		// A kick goes through.
		assert.NoError(t, d.Write(RegionNotify, 0, 2, 0))
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Error("guest register accesses blocked behind a back-end operation")
	}
	return done
}

// The device lock is not held across back-end calls: while a back-end
// operation started by the guest (status writes) or by the VMM (migration,
// dirty tracking) is blocked in the back-end, the guest's register reads
// complete.
func TestRegisterAccessDuringSlowBackend(t *testing.T) {
	live := sAck | sDrv | sFOK | sDOK
	for _, tc := range []struct {
		name string
		// setup brings the device to where the operation starts.
		setup func(t *testing.T, d *Device)
		// op is the operation that blocks in the back-end.
		op func(d *Device) error
		// status is what the guest reads meanwhile.
		status virtio.Status
	}{
		{"guest sets FEATURES_OK", func(t *testing.T, d *Device) {
			g := driver{t, d}
			g.setStatus(sAck)
			g.setStatus(sAck | sDrv)
			g.writeFeatures(netFeatures)
		}, func(d *Device) error {
			return d.Write(RegionCommon, OffDeviceStatus, 1, uint64(sAck|sDrv|sFOK))
		}, sAck | sDrv},
		{"guest sets DRIVER_OK", func(t *testing.T, d *Device) {
			g := driver{t, d}
			g.setStatus(sAck)
			g.setStatus(sAck | sDrv)
			g.writeFeatures(netFeatures)
			g.setStatus(sAck | sDrv | sFOK)
			for q := 0; q < d.NumQueues(); q++ {
				g.setupQueue(q, 128, uint16(q+1))
			}
		}, func(d *Device) error {
			return d.Write(RegionCommon, OffDeviceStatus, 1, uint64(live))
		}, live},
		{"guest resets", func(t *testing.T, d *Device) { driver{t, d}.bringUp(netFeatures) }, func(d *Device) error {
			return d.Write(RegionCommon, OffDeviceStatus, 1, 0)
		}, live},
		{"guest changes a queue vector", func(t *testing.T, d *Device) { driver{t, d}.bringUp(netFeatures) }, func(d *Device) error {
			if err := d.Write(RegionCommon, OffQueueSelect, 2, 0); err != nil {
				return err
			}
			return d.Write(RegionCommon, OffQueueMSIXVector, 2, 2)
		}, live},
		{"guest writes device config", func(t *testing.T, d *Device) { driver{t, d}.bringUp(netFeatures) }, func(d *Device) error {
			return d.Write(RegionDevice, 0, 1, 0x52)
		}, live},
		{"migration to STOP_COPY", func(t *testing.T, d *Device) { driver{t, d}.bringUp(netFeatures) }, func(d *Device) error {
			return d.SetMigrationState(MigStopCopy)
		}, live},
		{"dirty tracking starts a relay", func(t *testing.T, d *Device) { driver{t, d}.bringUp(netFeatures) }, func(d *Device) error {
			log, err := dirty.New(1<<20, nil)
			if err != nil {
				return err
			}
			t.Cleanup(func() { _ = d.Close(); _ = log.Close() })
			_, err = d.StartDirtyTracking(log)
			return err
		}, live},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newGatedBacking()
			d, err := NewDevice(b, &Options{Memory: testMemory(t), DirtyMode: DirtyRelay})
			require.NoError(t, err)
			t.Cleanup(func() { _ = d.Close() })
			tc.setup(t, d)
			b.arm()
			opErr := make(chan error, 1)
			go func() { opErr <- tc.op(d) }()
			var op string
			select {
			case op = <-b.entered:
			case err := <-opErr:
				t.Fatalf("the operation never reached the back-end: %v", err)
			}
			t.Logf("blocked in %s", op)
			qsize := uint64(128)
			if tc.status&sFOK == 0 {
				qsize = 256 // not set up yet: the maximum
			}
			done := guestReadsComplete(t, d, tc.status, qsize)
			close(b.release)
			<-done
			require.NoError(t, <-opErr)
		})
	}
}

// While a back-end operation is blocked, callers of the Context variants
// can give up waiting for it (typed: the context's error), and nothing
// changes.
func TestBlockingCallsHonourContext(t *testing.T) {
	b := newGatedBacking()
	d, err := NewDevice(b, &Options{Memory: testMemory(t), DirtyMode: DirtyRelay})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	driver{t, d}.bringUp(netFeatures)
	b.arm()
	opErr := make(chan error, 1)
	go func() { opErr <- d.SetMigrationState(MigStopCopy) }()
	require.Equal(t, "Suspend", <-b.entered)

	log, err := dirty.New(1<<20, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = log.Close() })
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"SetMigrationStateContext", func(ctx context.Context) error { return d.SetMigrationStateContext(ctx, MigRunning) }},
		{"StartDirtyTrackingContext", func(ctx context.Context) error { _, err := d.StartDirtyTrackingContext(ctx, log); return err }},
		{"StopDirtyTrackingContext", func(ctx context.Context) error { return d.StopDirtyTrackingContext(ctx) }},
		{"ResetMigrationContext", func(ctx context.Context) error { return d.ResetMigrationContext(ctx) }},
		{"LoadStateContext", func(ctx context.Context) error { return d.LoadStateContext(ctx, nil) }},
		{"VectorsChangedContext", func(ctx context.Context) error { return d.VectorsChangedContext(ctx) }},
		{"WriteContext device_status", func(ctx context.Context) error {
			return d.WriteContext(ctx, RegionCommon, OffDeviceStatus, 1, 0)
		}},
		{"WriteBARContext queue_msix_vector", func(ctx context.Context) error {
			return d.WriteBARContext(ctx, ModernBAR, BarOffCommon+OffQueueMSIXVector, 2, 1)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, tc.call(cancelled), context.Canceled)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			defer cancel()
			err := tc.call(ctx)
			require.ErrorIs(t, err, context.DeadlineExceeded)
			var ae *AccessError
			if errors.As(err, &ae) {
				assert.True(t, ae.Write)
			}
		})
	}
	// Nothing changed meanwhile.
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, d.Status())
	// The transition is on its RUNNING_P2P -> STOP arc (suspending).
	assert.Equal(t, MigRunningP2P, d.MigrationState())
	close(b.release)
	require.NoError(t, <-opErr)
	assert.Equal(t, MigStopCopy, d.MigrationState())
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, d.Status(), "a status write given up on did not reset the device")
}

// ConfigChanged during a blocked back-end operation (the back-end may
// report a change from inside a call) returns at once. The operation here
// stops the device (-> STOP_COPY), so the change reaches the guest when the
// device runs again; TestConfigChangedDuringGuestAccess has one that ends
// with the device running, where the operation's end delivers it.
func TestConfigChangedDuringSlowBackend(t *testing.T) {
	b := newGatedBacking()
	d, err := NewDevice(b, &Options{Memory: testMemory(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	driver{t, d}.bringUp(netFeatures)
	gen0 := driver{t, d}.r(OffConfigGeneration, 1)
	_, err = d.ConfigFD().TryWait()
	require.NoError(t, err)
	b.arm()
	opErr := make(chan error, 1)
	go func() { opErr <- d.SetMigrationState(MigStopCopy) }()
	require.Equal(t, "Suspend", <-b.entered)

	b.setConfig(6, []byte{0}) // link down
	returned := make(chan struct{})
	go func() { d.ConfigChanged(); close(returned) }()
	select {
	case <-returned:
	case <-time.After(5 * time.Second):
		t.Error("ConfigChanged waited for the back-end operation")
	}
	close(b.release)
	<-returned
	require.NoError(t, <-opErr)
	// The operation stopped the device (STOP_COPY): linux/vfio.h allows it
	// no interrupt and no change of its state, so the change waits for the
	// device to run again.
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "config interrupt in STOP_COPY")
	assert.Equal(t, gen0, driver{t, d}.r(OffConfigGeneration, 1), "generation changed in STOP_COPY")
	require.NoError(t, d.SetMigrationState(MigRunning))
	n, err = d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n, "config interrupt once the device runs")
	assert.NotEqual(t, gen0, driver{t, d}.r(OffConfigGeneration, 1))
	st, err := d.Read(RegionDevice, 6, 2)
	require.NoError(t, err)
	assert.Zero(t, st&1, "link down")
}

// A migration whose context is cancelled while another back-end operation
// is in progress still rolls back: undoing waits for that operation rather
// than giving up with the context.
func TestMigrateSourceRollbackWaitsForOperation(t *testing.T) {
	b := newGatedBacking()
	src, err := NewDevice(b, &Options{Memory: testMemory(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = src.Close() })
	driver{t, src}.bringUp(netFeatures)
	dst := newTestDevice(t, newFakeBacking(), nil)
	log, err := dirty.New(1<<20, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = src.Close(); _ = log.Close() })

	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	destDone := make(chan struct{})
	go func() {
		defer close(destDone)
		_, _ = MigrateDestination(context.Background(), c2, DestOptions{Device: dst, Memory: dst.opts.Memory})
	}()
	// The destination writes pages into its guest memory: it must be done
	// before the cleanups unmap that memory (see goDestination).
	t.Cleanup(func() { _ = c2.Close(); <-destDone })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	writeErr := make(chan error, 1)
	fired := false
	_, err = MigrateSource(ctx, c1, SourceOptions{
		Device: src, Memory: src.opts.Memory, Log: log,
		Tracker: dirty.TrackerOptions{Bandwidth: 1e6, MaxRounds: 3},
		OnRound: func(RoundReport) {
			if fired {
				return
			}
			fired = true
			// The guest writes the device configuration; the back-end
			// takes its time. The migration is cancelled meanwhile.
			b.arm()
			go func() { writeErr <- src.Write(RegionDevice, 0, 1, 0x52) }()
			<-b.entered
			cancel()
			time.AfterFunc(50*time.Millisecond, func() { close(b.release) })
		},
		StopGuest: func() error { return nil },
	})
	require.ErrorIs(t, err, context.Canceled)
	require.NoError(t, <-writeErr)
	assert.Equal(t, MigRunning, src.MigrationState())
	assert.Equal(t, DirtyAuto, src.DirtyTracking())
}

// configGateBacking blocks, once armed, the first device configuration
// read or write until released. Only those: the health watcher's status
// polls must not take the gate.
type configGateBacking struct {
	*fakeBacking
	armed   atomic.Bool
	entered chan string
	release chan struct{}
}

func (c *configGateBacking) gate(op string) {
	if c.armed.CompareAndSwap(true, false) {
		c.entered <- op
		<-c.release
	}
}

func (c *configGateBacking) ReadConfig(off int, p []byte) error {
	c.gate("ReadConfig")
	return c.fakeBacking.ReadConfig(off, p)
}

func (c *configGateBacking) WriteConfig(off int, p []byte) error {
	c.gate("WriteConfig")
	return c.fakeBacking.WriteConfig(off, p)
}

// §4.1.4.5, §2.5.1: a configuration change the back-end reports while a
// guest register access holds the back-end (it is reading or writing the
// device configuration) raises the configuration interrupt when that access
// ends, as it does after any other back-end operation. Found by
// FuzzGuestAccess: the change used to stay pending until the next
// migration or dirty-tracking operation, so the driver of a running guest
// never heard of it.
func TestConfigChangedDuringGuestAccess(t *testing.T) {
	pciCfgWindow := func(d *Device) {
		// §4.1.4.9: the PCI_CFG window on virtio_net_config.status.
		require.NoError(t, d.Write(RegionPCIConfig, capOffPCICfg+4, 1, ModernBAR))
		require.NoError(t, d.Write(RegionPCIConfig, capOffPCICfg+8, 4, BarOffDevice+6))
		require.NoError(t, d.Write(RegionPCIConfig, capOffPCICfg+12, 4, 2))
	}
	for _, tc := range []struct {
		name   string
		window bool // set the PCI_CFG window up first
		access func(d *Device) error
	}{
		{"4.1.4.6 guest reads the device configuration", false, func(d *Device) error {
			_, err := d.Read(RegionDevice, 6, 2)
			return err
		}},
		{"4.1.4.6 guest writes the device configuration", false, func(d *Device) error {
			return d.Write(RegionDevice, 0, 1, 0x52)
		}},
		{"4.1.4.9 guest reads the device configuration through PCI_CFG", true, func(d *Device) error {
			_, err := d.Read(RegionPCIConfig, capOffPCICfg+16, 4)
			return err
		}},
		{"4.1.4.9 guest writes the device configuration through PCI_CFG", true, func(d *Device) error {
			return d.Write(RegionPCIConfig, capOffPCICfg+16, 2, 1)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &configGateBacking{fakeBacking: newFakeBacking(), entered: make(chan string, 1), release: make(chan struct{})}
			d, err := NewDevice(b, &Options{Memory: testMemory(t)})
			require.NoError(t, err)
			t.Cleanup(func() { _ = d.Close() })
			driver{t, d}.bringUp(netFeatures)
			if tc.window {
				pciCfgWindow(d)
			}
			_, err = d.ConfigFD().TryWait()
			require.NoError(t, err)
			_, err = d.Read(RegionISR, 0, 1)
			require.NoError(t, err)

			// A guest read takes the back-end only when no operation holds
			// it (a status poll of the health watcher, rarely): try again
			// until the access is the one in the back-end.
			accessErr := make(chan error, 1)
			for entered := false; !entered; {
				b.armed.Store(true)
				go func() { accessErr <- tc.access(d) }()
				select {
				case <-b.entered:
					entered = true
				case err := <-accessErr:
					require.NoError(t, err)
				}
			}
			b.setConfig(6, []byte{0}) // link down
			d.ConfigChanged()         // returns at once: the access holds the back-end
			close(b.release)
			require.NoError(t, <-accessErr)

			n, err := d.ConfigFD().TryWait()
			require.NoError(t, err)
			assert.EqualValues(t, 1, n, "configuration interrupt once the access ended")
			isr, err := d.Read(RegionISR, 0, 1)
			require.NoError(t, err)
			assert.EqualValues(t, ISRConfig, isr)
		})
	}
}
