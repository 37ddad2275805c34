package mdev

import (
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/virtio"
)

var allMigStates = []MigState{MigError, MigStop, MigRunning, MigStopCopy, MigResuming, MigRunningP2P, MigPreCopy, MigPreCopyP2P}

// The single arcs linux/vfio.h lists in its comment on enum
// vfio_device_mig_state, written out by hand.
var vfioArcs = map[[2]MigState]bool{
	{MigRunningP2P, MigStop}:       true,
	{MigStopCopy, MigStop}:         true,
	{MigResuming, MigStop}:         true,
	{MigPreCopy, MigRunning}:       true,
	{MigRunningP2P, MigRunning}:    true,
	{MigRunning, MigRunningP2P}:    true,
	{MigStop, MigRunningP2P}:       true,
	{MigPreCopyP2P, MigRunningP2P}: true,
	{MigRunning, MigPreCopy}:       true,
	{MigPreCopyP2P, MigPreCopy}:    true,
	{MigRunningP2P, MigPreCopyP2P}: true,
	{MigPreCopy, MigPreCopyP2P}:    true,
	{MigStop, MigStopCopy}:         true,
	{MigPreCopyP2P, MigStopCopy}:   true,
	{MigStop, MigResuming}:         true,
}

func TestLegalArcsAllPairs(t *testing.T) {
	for _, from := range allMigStates {
		for _, to := range allMigStates {
			assert.Equal(t, vfioArcs[[2]MigState{from, to}], LegalArc(from, to), "%s -> %s", from, to)
		}
	}
}

// Expected paths for every pair, as vfio_mig_get_next_state walks them
// (written by hand from the kernel's FSM rules). nil with ok=false means the
// request fails.
func TestMigrationPathAllPairs(t *testing.T) {
	const (
		S  = MigStop
		R  = MigRunning
		SC = MigStopCopy
		RS = MigResuming
		RP = MigRunningP2P
		PC = MigPreCopy
		PP = MigPreCopyP2P
	)
	type want struct {
		path []MigState
		ok   bool
	}
	p := func(s ...MigState) want { return want{s, true} }
	bad := want{nil, false}
	table := map[MigState]map[MigState]want{
		S:  {S: p(), R: p(RP, R), SC: p(SC), RS: p(RS), RP: p(RP), PC: p(RP, R, PC), PP: p(RP, PP)},
		R:  {S: p(RP, S), R: p(), SC: p(RP, S, SC), RS: p(RP, S, RS), RP: p(RP), PC: p(PC), PP: p(RP, PP)},
		SC: {S: p(S), R: p(S, RP, R), SC: p(), RS: p(S, RS), RP: p(S, RP), PC: bad, PP: bad},
		RS: {S: p(S), R: p(S, RP, R), SC: p(S, SC), RS: p(), RP: p(S, RP), PC: bad, PP: bad},
		RP: {S: p(S), R: p(R), SC: p(S, SC), RS: p(S, RS), RP: p(), PC: p(R, PC), PP: p(PP)},
		PC: {S: p(R, RP, S), R: p(R), SC: p(PP, SC), RS: p(R, RP, S, RS), RP: p(R, RP), PC: p(), PP: p(PP)},
		PP: {S: p(RP, S), R: p(RP, R), SC: p(SC), RS: p(RP, S, RS), RP: p(RP), PC: p(PC), PP: p()},
	}
	for _, from := range allMigStates {
		for _, to := range allMigStates {
			t.Run(fmt.Sprintf("%s->%s", from, to), func(t *testing.T) {
				path, err := MigrationPath(from, to)
				w, listed := table[from][to]
				if from == MigError || to == MigError || !listed || !w.ok {
					require.ErrorIs(t, err, ErrMigrationState)
					var te *TransitionError
					require.ErrorAs(t, err, &te)
					assert.Equal(t, from, te.From)
					return
				}
				require.NoError(t, err)
				if len(w.path) == 0 {
					assert.Empty(t, path)
				} else {
					assert.Equal(t, w.path, path)
				}
				// Every step is a legal single arc.
				cur := from
				for _, s := range path {
					assert.True(t, LegalArc(cur, s), "%s -> %s", cur, s)
					cur = s
				}
			})
		}
	}
	_, err := MigrationPath(MigState(8), MigStop)
	assert.ErrorIs(t, err, ErrMigrationState)
}

func TestDeviceMigrationStateWalk(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	assert.Equal(t, MigRunning, d.MigrationState())
	_, err := d.SaveState()
	assert.ErrorIs(t, err, ErrMigrationState, "no save session while RUNNING")

	f.mu.Lock()
	f.base[0] = stateAt(7, 7)
	f.base[1] = stateAt(3, 3)
	f.mu.Unlock()
	require.NoError(t, d.SetMigrationState(MigStopCopy))
	assert.Equal(t, MigStopCopy, d.MigrationState())
	assert.Contains(t, f.opsCopy(), "Suspend")
	assert.EqualValues(t, 0, f.status, "backing stopped and reset after reading positions")
	b, err := d.SaveState()
	require.NoError(t, err)
	s, err := DecodeState(b)
	require.NoError(t, err)
	assert.EqualValues(t, 7, s.Queues[0].NextAvail)
	assert.EqualValues(t, 3, s.Queues[1].NextUsed)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, s.Status)

	// Back to RUNNING (migration aborted): the backing device restarts from
	// the positions read back.
	require.NoError(t, d.SetMigrationState(MigRunning))
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, f.status)
	assert.Equal(t, stateAt(7, 7), f.base[0])
	assert.Equal(t, stateAt(3, 3), f.base[1])

	require.ErrorIs(t, d.SetMigrationState(MigError), ErrMigrationState)
	assert.Equal(t, MigRunning, d.MigrationState())
}

func TestInFlightChainsFailStop(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	driver{t, d}.bringUp(netFeatures)
	f.mu.Lock()
	f.base[0] = stateAt(9, 7)
	f.mu.Unlock()
	err := d.SetMigrationState(MigStop)
	require.ErrorIs(t, err, ErrInFlight)
	assert.Equal(t, MigError, d.MigrationState())
	d.ResetMigration()
	assert.Equal(t, MigRunning, d.MigrationState())
	assert.EqualValues(t, 0, d.Status())
}

// In STOP, STOP_COPY and RESUMING a driver that resets the device and sets
// it up again up to DRIVER_OK (a client driving the registers while the VM
// is stopped) gets the bits recorded, but the backing device stays stopped
// until the device leaves them; in RUNNING_P2P and PRE_COPY DRIVER_OK
// starts it at once.
func TestDriverOKInStoppedStatesWaitsForRunning(t *testing.T) {
	// A state saved from a running device, for RESUMING.
	src := newTestDevice(t, newFakeBacking(), nil)
	driver{t, src}.bringUp(netFeatures)
	require.NoError(t, src.SetMigrationState(MigStopCopy))
	saved, err := src.SaveState()
	require.NoError(t, err)

	for _, tc := range []struct {
		state MigState
		held  bool
	}{
		{MigStop, true},
		{MigStopCopy, true},
		{MigResuming, true},
		{MigRunningP2P, false},
		{MigPreCopy, false},
		{MigPreCopyP2P, false},
	} {
		t.Run(tc.state.String(), func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, nil)
			g := driver{t, d}
			g.bringUp(netFeatures)
			require.NoError(t, d.SetMigrationState(tc.state))
			g.setStatus(0)
			require.False(t, d.DataPathActive())
			g.bringUp(netFeatures)
			assert.Equal(t, sAck|sDrv|sFOK|sDOK, d.Status(), "the driver's bits are recorded")
			f.mu.Lock()
			backing := f.status
			f.mu.Unlock()
			if !tc.held {
				assert.True(t, d.DataPathActive())
				assert.Equal(t, sAck|sDrv|sFOK|sDOK, backing)
				return
			}
			assert.False(t, d.DataPathActive(), "live in %s", tc.state)
			assert.Zero(t, backing&sDOK, "backing device started in %s", tc.state)
			if tc.state == MigResuming {
				require.NoError(t, d.LoadState(saved))
			}
			require.NoError(t, d.SetMigrationState(MigRunning))
			assert.True(t, d.DataPathActive(), "RUNNING starts the data path")
			f.mu.Lock()
			defer f.mu.Unlock()
			assert.Equal(t, sAck|sDrv|sFOK|sDOK, f.status)
		})
	}
}

// Relay dirty tracking switched on or off between FEATURES_OK and DRIVER_OK
// renegotiates the backing device: a relay's shadow rings are split, so a
// backing device negotiated with the guest's RING_PACKED must lose it when
// the relay starts, and get it back when the relay ends. (DRIVER_OK used
// to find the backing device as FEATURES_OK left it.)
func TestRelaySwitchBeforeDriverOKRenegotiates(t *testing.T) {
	packed := netFeatures.With(virtio.FRingPacked)
	for _, tc := range []struct {
		name    string
		stopped bool // FEATURES_OK and DRIVER_OK written in STOP
	}{{"running", false}, {"DRIVER_OK held in STOP", true}} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, nil)
			g := driver{t, d}
			if tc.stopped {
				require.NoError(t, d.SetMigrationState(MigStop))
			}
			g.setStatus(sAck | sDrv)
			g.writeFeatures(packed)
			g.setStatus(sAck | sDrv | sFOK)
			require.NotZero(t, g.status()&sFOK)
			accepted := func() virtio.Features {
				f.mu.Lock()
				defer f.mu.Unlock()
				return f.accepted
			}
			require.Equal(t, packed, accepted())
			bm, err := dirty.New(1<<20, nil)
			require.NoError(t, err)
			t.Cleanup(func() { _ = bm.Close() })
			mode, err := d.StartDirtyTracking(bm)
			require.NoError(t, err)
			require.Equal(t, DirtyRelay, mode)
			assert.Equal(t, netFeatures, accepted(), "the relay's backing device runs split rings")
			require.NoError(t, d.StopDirtyTracking())
			assert.Equal(t, packed, accepted(), "passthrough again: the guest's features")
		})
	}
}

// linux/vfio.h: in STOP (and STOP_COPY, which behaves as STOP) "the device
// must not generate interrupts, DMA, or any other change to external
// state. It must not change its internal state." A change of the backing
// device's configuration (link down) or a backing failure (NEEDS_RESET)
// that comes while the device is stopped reaches the driver when the
// device runs again, with one configuration interrupt for both. The P2P
// states run the device: there the interrupt goes at once.
func TestConfigInterruptHeldWhileStopped(t *testing.T) {
	for _, tc := range []struct {
		state      MigState
		held       bool
		link, fail bool
	}{
		{MigStop, true, true, false},
		{MigStop, true, false, true},
		{MigStop, true, true, true},
		{MigStopCopy, true, true, false},
		{MigStopCopy, true, false, true},
		{MigRunningP2P, false, true, false},
		{MigRunningP2P, false, false, true},
		{MigPreCopyP2P, false, true, true},
	} {
		t.Run(fmt.Sprintf("%s/link=%t/fail=%t", tc.state, tc.link, tc.fail), func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, &Options{HealthInterval: -1})
			g := driver{t, d}
			g.bringUp(netFeatures)
			gen0 := g.r(OffConfigGeneration, 1)
			require.NoError(t, d.SetMigrationState(tc.state))
			if tc.link {
				f.setConfig(6, []byte{0, 0})
				d.ConfigChanged()
			}
			if tc.fail {
				d.BackingFailed(errors.New("queue 0: broken ring"))
			}
			interrupts := func() uint64 {
				t.Helper()
				n, err := d.ConfigFD().TryWait()
				require.NoError(t, err)
				return n
			}
			want := sAck | sDrv | sFOK | sDOK
			if tc.fail {
				want |= sNR
			}
			if tc.held {
				assert.Zero(t, interrupts(), "a configuration interrupt in %s", tc.state)
				assert.Zero(t, d.ISRPending(), "ISR changed in %s", tc.state)
				assert.Equal(t, gen0, g.r(OffConfigGeneration, 1), "config_generation changed in %s", tc.state)
				require.NoError(t, d.SetMigrationState(MigRunning))
			}
			// Running, each event is notified as it comes; held, one
			// notification covers them.
			wantN := 1
			if !tc.held && tc.link && tc.fail {
				wantN = 2
			}
			assert.EqualValues(t, wantN, interrupts(), "configuration interrupts once the device runs")
			assert.EqualValues(t, ISRConfig, d.ISRPending())
			assert.Equal(t, want, g.status())
			if tc.link {
				assert.NotEqual(t, gen0, g.r(OffConfigGeneration, 1), "2.5.1: a new generation")
			} else {
				assert.Equal(t, gen0, g.r(OffConfigGeneration, 1))
			}
			require.NoError(t, d.SetMigrationState(MigRunning))
			assert.Zero(t, interrupts(), "a second interrupt")
		})
	}
}

// A device migrated in NEEDS_RESET tells the driver on the destination
// when it runs there: the source's notification may have been held back by
// its stop (or not read before it), and a driver that never hears it never
// resets the device.
func TestMigratedNeedsResetNotifiesOnDestination(t *testing.T) {
	src := newTestDevice(t, newFakeBacking(), &Options{HealthInterval: -1})
	driver{t, src}.bringUp(netFeatures)
	require.NoError(t, src.SetMigrationState(MigStop))
	src.BackingFailed(errors.New("queue 1: broken ring"))
	require.NoError(t, src.SetMigrationState(MigStopCopy))
	saved, err := src.SaveState()
	require.NoError(t, err)
	n, err := src.ConfigFD().TryWait()
	require.NoError(t, err)
	require.Zero(t, n, "the source signalled while stopped")

	dst := newTestDevice(t, newFakeBacking(), &Options{HealthInterval: -1})
	require.NoError(t, dst.SetMigrationState(MigResuming))
	require.NoError(t, dst.LoadState(saved))
	require.NoError(t, dst.SetMigrationState(MigStop))
	n, err = dst.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "the destination signalled while stopped")
	require.NoError(t, dst.SetMigrationState(MigRunning))
	n, err = dst.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n, "2.1.2: the driver hears NEEDS_RESET on the destination")
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, driver{t, dst}.status())
}

// A link change while the device is stopped, and then migrated: the device
// keeps showing the configuration its generation stands for while stopped,
// and the captured state carries the change (a new generation) and the
// notification owed (the ISR's configuration bit), so the driver hears of
// it on the destination. (Held back on the source and dropped from the
// stream, it was never told: the destination's configuration is the new
// one from the start.)
func TestConfigChangeWhileStoppedMigrates(t *testing.T) {
	fs := newFakeBacking()
	src := newTestDevice(t, fs, &Options{HealthInterval: -1})
	gs := driver{t, src}
	gs.bringUp(netFeatures)
	gen0 := gs.r(OffConfigGeneration, 1)
	require.NoError(t, src.SetMigrationState(MigStop))
	fs.setConfig(6, []byte{0, 0}) // link down
	src.ConfigChanged()
	linkStatus := func(d *Device) uint64 {
		t.Helper()
		v, err := d.Read(RegionDevice, 6, 2)
		require.NoError(t, err)
		return v
	}
	assert.EqualValues(t, 1, linkStatus(src), "a stopped device changed its configuration without a new generation")
	assert.Equal(t, gen0, gs.r(OffConfigGeneration, 1))
	require.NoError(t, src.SetMigrationState(MigStopCopy))
	saved, err := src.SaveState()
	require.NoError(t, err)
	s, err := DecodeState(saved)
	require.NoError(t, err)
	assert.EqualValues(t, gen0+1, s.ConfigGeneration, "the captured generation")
	assert.EqualValues(t, ISRConfig, s.ISR&ISRConfig, "the captured notification owed")

	fd := newFakeBacking()
	fd.setConfig(6, []byte{0, 0}) // the destination's link is down too
	dst := newTestDevice(t, fd, &Options{HealthInterval: -1})
	require.NoError(t, dst.SetMigrationState(MigResuming))
	require.NoError(t, dst.LoadState(saved))
	require.NoError(t, dst.SetMigrationState(MigRunning))
	n, err := dst.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n, "the destination notified the change")
	gd := driver{t, dst}
	assert.EqualValues(t, gen0+1, gd.r(OffConfigGeneration, 1))
	assert.Zero(t, linkStatus(dst), "link down on the destination")

	// Migrated back without any change: the ISR bit nobody read asks for
	// one more notification (the driver only looks again); the generation
	// stays.
	require.NoError(t, dst.SetMigrationState(MigStopCopy))
	again, err := dst.SaveState()
	require.NoError(t, err)
	s, err = DecodeState(again)
	require.NoError(t, err)
	assert.EqualValues(t, gen0+1, s.ConfigGeneration, "no change, no new generation")
}

// A failed restart (STOP -> RUNNING_P2P) enters ERROR and tells the driver,
// even when a data-path failure reported while restart waited for the
// backing device (d.mu released) had already set NEEDS_RESET and had its
// notification held: it is sent then, not kept for ever.
func TestFailedRestartSendsHeldNotification(t *testing.T) {
	b := newGatedBacking()
	d, err := NewDevice(b, &Options{Memory: testMemory(t), HealthInterval: -1})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	driver{t, d}.bringUp(netFeatures)
	require.NoError(t, d.SetMigrationState(MigStop))
	_, err = d.ConfigFD().TryWait()
	require.NoError(t, err)
	b.mu.Lock()
	b.failOn["SetStatus(ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK)"] = true
	b.mu.Unlock()
	b.arm()
	done := make(chan error, 1)
	go func() { done <- d.SetMigrationState(MigRunning) }()
	op := <-b.entered
	// restart waits for the backing device: a failure report now finds
	// the device stopped and holds its notification.
	d.BackingFailed(errors.New("queue 0: broken ring"))
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "a notification while the device is still stopped (in %s)", op)
	close(b.release)
	require.Error(t, <-done, "the restart failed")
	assert.Equal(t, MigError, d.MigrationState())
	n, err = d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n, "the driver was told of NEEDS_RESET")
	assert.NotZero(t, d.Status()&sNR)
}

// TestMigrateRingLayoutTheDriverWrote: a guest driver can leave queue
// registers holding a layout no ring can have (a misaligned descriptor
// table, enabled) without DRIVER_OK, or with a DRIVER_OK the device
// refused for it (NEEDS_RESET). The state migrates as it is, where the
// stream's validation used to refuse it and so let a guest make its VM
// impossible to migrate (found by a review); the destination refuses the
// layout when the driver sets DRIVER_OK there, as the source does, or
// stays in NEEDS_RESET.
func TestMigrateRingLayoutTheDriverWrote(t *testing.T) {
	const sFOK = virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK
	for _, driverOK := range []bool{false, true} {
		t.Run(fmt.Sprintf("DRIVER_OK %v", driverOK), func(t *testing.T) {
			src := newTestDevice(t, newFakeBacking(), nil)
			g := driver{t, src}
			g.setStatus(virtio.StatusAcknowledge)
			g.setStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
			g.writeFeatures(netFeatures)
			g.setStatus(sFOK)
			g.w(OffQueueSelect, 2, 0)
			g.w(OffQueueDesc, 8, 0x10001)
			g.w(OffQueueEnable, 2, 1)
			if driverOK {
				g.setStatus(sFOK | virtio.StatusDriverOK)
				require.NotZero(t, g.status()&virtio.StatusDeviceNeedsReset, "the source refuses the layout")
			}
			for _, s := range []MigState{MigStop, MigStopCopy} {
				require.NoError(t, src.SetMigrationState(s), "a guest's registers cannot stop its migration")
			}
			b, err := src.SaveState()
			require.NoError(t, err)

			dst := newTestDevice(t, newFakeBacking(), nil)
			require.NoError(t, dst.SetMigrationState(MigStop))
			require.NoError(t, dst.SetMigrationState(MigResuming))
			require.NoError(t, dst.LoadState(b))
			require.NoError(t, dst.SetMigrationState(MigStop))
			require.NoError(t, dst.SetMigrationState(MigRunning))
			q := dst.State().Queues[0]
			assert.True(t, q.Enabled)
			assert.Equal(t, uint64(0x10001), q.Desc, "the registers moved as they were")
			h := driver{t, dst}
			if !driverOK {
				assert.Zero(t, h.status()&virtio.StatusDeviceNeedsReset)
				h.setStatus(sFOK | virtio.StatusDriverOK)
				assert.ErrorIs(t, dst.Err(), ErrQueueLayout)
			}
			assert.NotZero(t, h.status()&virtio.StatusDeviceNeedsReset, "the destination refuses the layout")
		})
	}
}
