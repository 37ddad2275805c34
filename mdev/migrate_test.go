package mdev_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const testGuestMem = 16 << 20

type side struct {
	mem   *vring.Memory
	sn    *softnet.Device
	local *vdpa.Local
	dev   *mdev.Device
}

func newSide(t testing.TB, size uint64, mode mdev.DirtyMode) *side {
	t.Helper()
	return newSideWith(t, size, &mdev.Options{DirtyMode: mode, Backend: "software"})
}

// newSideWith is newSide with the device's options (Memory is set here).
func newSideWith(t testing.TB, size uint64, opts *mdev.Options) *side {
	t.Helper()
	r, err := vring.NewMemfdRegion(0, size, &vring.RegionOptions{Name: "guest"})
	require.NoError(t, err)
	return newSideOn(t, r, opts)
}

// unsealedSide is newSide on guest memory the test can take away: a memfd
// created without sealing, so the device cannot seal it against
// shrinking. It returns the memfd (closed when the test ends) and the side.
func unsealedSide(t testing.TB, size uint64, mode mdev.DirtyMode) (int, *side) {
	t.Helper()
	fd, err := unix.MemfdCreate("unsealed-guest", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, int64(size)))
	r, err := vring.NewFdRegion(0, size, fd, 0, nil)
	require.NoError(t, err)
	require.False(t, r.Sealed(), "a memfd without MFD_ALLOW_SEALING cannot be sealed")
	return fd, newSideOn(t, r, &mdev.Options{DirtyMode: mode, Backend: "software"})
}

// newSideOn is newSideWith on guest memory of the one region r.
func newSideOn(t testing.TB, r *vring.Region, opts *mdev.Options) *side {
	t.Helper()
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	return newSideOnMemory(t, mem, opts)
}

// newSideOnMemory is newSideWith on guest memory mem.
func newSideOnMemory(t testing.TB, mem *vring.Memory, opts *mdev.Options) *side {
	t.Helper()
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	local := vdpa.NewLocal(sn, nil)
	t.Cleanup(func() { _ = local.Close() })
	o := *opts
	o.Memory = mem
	dev, err := mdev.NewDevice(local, &o)
	require.NoError(t, err)
	t.Cleanup(func() { _ = dev.Close() })
	return &side{mem: mem, sn: sn, local: local, dev: dev}
}

// trackedSide is a software-backed side in relay mode with a guest booted
// for frames and dirty tracking started into a log over all its memory,
// closed after the side.
func trackedSide(t testing.TB, frames uint64) (*side, *mdevtest.Guest) {
	t.Helper()
	s := newSide(t, testGuestMem, mdev.DirtyRelay)
	g, err := mdevtest.Boot(s.dev, s.mem, frames, nil)
	require.NoError(t, err)
	log, err := dirty.New(testGuestMem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, s)
	_, err = s.dev.StartDirtyTracking(log)
	require.NoError(t, err)
	return s, g
}

// goDestination runs MigrateDestination on conn in a goroutine of its own
// and returns the channel its error arrives on. When the test ends, and
// before the cleanups registered earlier run (those of the destination's
// device and guest memory among them), conn is closed and the goroutine is
// waited for. A destination still loading pages would otherwise write them
// into guest memory that is being unmapped, and once the address is reused
// by another mapping (another test's memory, a thread's stack) the write
// corrupts it silently.
func goDestination(tb testing.TB, conn net.Conn, opts mdev.DestOptions) <-chan error {
	tb.Helper()
	errc := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, err := mdev.MigrateDestination(context.Background(), conn, opts)
		errc <- err
	}()
	tb.Cleanup(func() {
		_ = conn.Close()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			// Its guest memory is about to be unmapped under it.
			tb.Errorf("the migration destination did not end within 30s of its connection closing")
			<-done
		}
	})
	return errc
}

// closeLogAfter closes log when the test ends, after the devices that may
// still write into it (a relay or a logging backing device) are closed.
func closeLogAfter(tb testing.TB, log *dirty.Bitmap, sides ...*side) {
	tb.Helper()
	tb.Cleanup(func() {
		for _, s := range sides {
			_ = s.dev.Close()
		}
		_ = log.Close()
	})
}

func memHash(mem *vring.Memory) [32]byte {
	h := sha256.New()
	for _, r := range mem.Regions() {
		h.Write(r.Bytes())
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// vcpus runs the guest driver and the memory dirtier until stopped.
type vcpus struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startVCPUs(t testing.TB, g *mdevtest.Guest, d *mdevtest.Dirtier) *vcpus {
	ctx, cancel := context.WithCancel(context.Background())
	v := &vcpus{cancel: cancel}
	v.wg.Add(2)
	go func() { defer v.wg.Done(); _ = g.Run(ctx) }()
	go func() { defer v.wg.Done(); d.Run(ctx) }()
	t.Cleanup(func() { _ = v.stop() }) // before the memory is unmapped
	return v
}

func (v *vcpus) stop() error { v.cancel(); v.wg.Wait(); return nil }

const waitLimit = 60 * time.Second

func msg(s string) func() string { return func() string { return s } }

// waitFor steps until cond holds; the deadline only guards against a hang.
func waitFor(t *testing.T, what func() string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what())
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// migration is a source guest under traffic with a memory dirtier, both
// marking one dirty log, ready to migrate from src to dst.
type migration struct {
	t        *testing.T
	o        migrationOptions
	src, dst *side
	scratch  uint64 // where the dirtiers write (after the guest's rings and buffers)
	g        *mdevtest.Guest
	log      *dirty.Bitmap
	v        *vcpus
	// The destination's guest and vCPUs, started by switchOver.
	dg *mdevtest.Guest
	dv *vcpus
}

type migrationOptions struct {
	size    uint64            // guest memory of both sides
	frames  uint64            // frames each guest sends and expects back
	guest   *mdevtest.Options // nil for mdevtest's defaults
	rate    float64           // pages per second each dirtier writes
	seed    uint64            // the source dirtier's seed
	dstSeed uint64            // the destination dirtier's seed
	log     *dirty.Options    // the dirty log's options
}

// startMigration boots the guest on src and starts it and its dirtier,
// logging into a new dirty log closed after both sides.
func startMigration(t *testing.T, src, dst *side, o migrationOptions) *migration {
	t.Helper()
	m := &migration{t: t, o: o, src: src, dst: dst}
	var err error
	m.g, err = mdevtest.Boot(src.dev, src.mem, o.frames, o.guest)
	require.NoError(t, err)
	m.scratch = mdevtest.Layout(o.guest)
	dirtier, err := mdevtest.NewDirtier(src.mem, m.scratch, o.size, o.rate, o.seed)
	require.NoError(t, err)
	m.log, err = dirty.New(o.size, o.log)
	require.NoError(t, err)
	closeLogAfter(t, m.log, src, dst)
	m.g.SetLog(m.log)
	dirtier.SetLog(m.log)
	m.v = startVCPUs(t, m.g, dirtier)
	return m
}

// switchOver migrates src to dst over a pipe with tracker's settings,
// stopping the source's vCPUs at the switch-over; the destination attaches
// a guest to what it loaded and starts it with its own dirtier. Both ends
// must succeed and the destination must have loaded the source's memory
// byte for byte.
func (m *migration) switchOver(tracker dirty.TrackerOptions) *mdev.SourceReport {
	t, src, dst := m.t, m.src, m.dst
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	var dstHash [32]byte
	destErr := goDestination(t, c2, mdev.DestOptions{
		Device: dst.dev, Memory: dst.mem,
		Loaded: func() error { dstHash = memHash(dst.mem); return nil },
		StartGuest: func() error {
			var err error
			if m.dg, err = mdevtest.Attach(dst.dev, dst.mem); err != nil {
				return err
			}
			d2, err := mdevtest.NewDirtier(dst.mem, m.scratch, m.o.size, m.o.rate, m.o.dstSeed)
			if err != nil {
				return err
			}
			m.dv = startVCPUs(t, m.dg, d2)
			return nil
		},
	})
	rep, err := mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: m.log,
		Tracker:   tracker,
		StopGuest: m.v.stop,
	})
	require.NoError(t, err)
	require.NoError(t, <-destErr)
	// The source is stopped: its memory is what the destination started
	// from, byte for byte.
	assert.Equal(t, memHash(src.mem), dstHash, "guest memory identical at switchover")
	return rep
}

// finish waits for the destination guest to complete its traffic, stops
// it and verifies every frame it got back.
func (m *migration) finish() {
	m.t.Helper()
	waitFor(m.t, func() string { return fmt.Sprint(m.dg.Stats()) }, m.dg.Done)
	require.NoError(m.t, m.dv.stop())
	require.NoError(m.t, m.dg.Verify())
}

// ringFormats are the guest ring formats the traffic and migration tests run
// on: split rings (mdevtest's defaults) and packed rings of a size that is
// not a power of two.
var ringFormats = []struct {
	name  string
	guest *mdevtest.Options
}{
	{"split", nil},
	{"packed", &mdevtest.Options{QueueSize: 200, Features: virtio.FRingPacked.Bit()}},
}

func TestMigrateUnderTraffic(t *testing.T) {
	for _, rf := range ringFormats {
		for _, mode := range []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay} {
			for seed := uint64(1); seed <= 3; seed++ {
				t.Run(fmt.Sprintf("%s/%s/seed%d", rf.name, mode, seed), func(t *testing.T) {
					migrateOnce(t, mode, seed, rf.guest)
				})
			}
		}
	}
}

func migrateOnce(t *testing.T, mode mdev.DirtyMode, seed uint64, guest *mdevtest.Options) {
	rng := rand.New(rand.NewPCG(seed, 77))
	const frames = 20000
	src := newSide(t, testGuestMem, mode)
	dst := newSide(t, testGuestMem, mode)
	rate := float64(1000 + rng.IntN(20000)) // pages per second
	m := startMigration(t, src, dst, migrationOptions{size: testGuestMem, frames: frames, guest: guest,
		rate: rate, seed: seed, dstSeed: seed + 100})
	// Random switch point: migrate after a random amount of traffic.
	at := uint64(rng.IntN(frames / 2))
	waitFor(t, msg("traffic"), func() bool { s, _, _, _ := m.g.Stats(); return s >= at })

	rep := m.switchOver(dirty.TrackerOptions{Bandwidth: 2e9, DowntimeTarget: 2 * time.Millisecond, MaxRounds: 8})
	assert.Equal(t, mode, rep.Mode)
	assert.Equal(t, mdev.MigStop, src.dev.MigrationState())
	assert.Equal(t, mdev.MigRunning, dst.dev.MigrationState())

	m.finish()
	sent, received, _, _ := m.dg.Stats()
	assert.EqualValues(t, frames, sent)
	assert.EqualValues(t, frames, received)
	packed := guest != nil && guest.Features.Has(virtio.FRingPacked)
	assert.Equal(t, packed, dst.dev.DriverFeatures().Has(virtio.FRingPacked), "ring format on the destination")
	t.Logf("%s: switch at frame %d, dirty rate %.0f pages/s, %d rounds, downtime %v, final %d pages",
		mode, at, rate, len(rep.Rounds), rep.Downtime, rep.Final.Pages)
}

// TestRelaySwitchUnderTraffic switches the data path into and out of the
// shadow relay six times while the guest runs: the rewind on each stop
// (by chain for a split guest ring, by descriptor for a packed one) loses
// and duplicates nothing.
func TestRelaySwitchUnderTraffic(t *testing.T) {
	for _, rf := range ringFormats {
		for seed := uint64(1); seed <= 3; seed++ {
			t.Run(fmt.Sprintf("%s/seed%d", rf.name, seed), func(t *testing.T) { relaySwitch(t, seed, rf.guest) })
		}
	}
}

func relaySwitch(t *testing.T, seed uint64, guest *mdevtest.Options) {
	rng := rand.New(rand.NewPCG(seed, 5))
	const frames = 30000
	s := newSide(t, testGuestMem, mdev.DirtyRelay)
	g, err := mdevtest.Boot(s.dev, s.mem, frames, guest)
	require.NoError(t, err)
	log, err := dirty.New(testGuestMem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, s)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Run(ctx) }()
	defer func() { cancel(); <-done }()
	for i := 0; i < 6; i++ {
		at := uint64((i + 1) * frames / 8)
		at += uint64(rng.IntN(frames / 16))
		waitFor(t, func() string {
			st := s.dev.State()
			return fmt.Sprint("switch ", i, " ", s.dev.Err(), " ", s.dev.Status(), " ", st.Queues[0], st.Queues[1], s.sn.Stats(), fmt.Sprint(g.Stats()), s.sn.QueueErr(0), s.sn.QueueErr(1))
		}, func() bool { s, _, _, _ := g.Stats(); return s >= at })
		if i%2 == 0 {
			mode, err := s.dev.StartDirtyTracking(log)
			require.NoError(t, err)
			require.Equal(t, mdev.DirtyRelay, mode)
		} else {
			require.NoError(t, s.dev.StopDirtyTracking())
		}
	}
	waitFor(t, func() string { return fmt.Sprint(g.Stats()) }, g.Done)
	require.NoError(t, g.Verify())
	assert.NotZero(t, log.Count(), "relay marked the pages the device wrote")
	assert.Zero(t, s.dev.Status()&0x40, "no NEEDS_RESET: %v", s.dev.Err())
	packed := guest != nil && guest.Features.Has(virtio.FRingPacked)
	assert.Equal(t, packed, s.dev.DriverFeatures().Has(virtio.FRingPacked))
}

func TestDestinationRejectsBadPages(t *testing.T) {
	dst := newSide(t, 1<<20, mdev.DirtyAuto)
	c1, c2 := net.Pipe()
	defer c1.Close()
	errc := goDestination(t, c2, mdev.DestOptions{Device: dst.dev, Memory: dst.mem})
	// A hello for a different memory layout.
	var buf bytes.Buffer
	buf.Write([]byte{1, 8 + 16, 0, 0, 0, 1, 0, 0x00, 0x10, 0, 0, 1, 0})
	buf.Write(make([]byte, 8))
	buf.Write([]byte{0, 0, 0x20, 0, 0, 0, 0, 0}) // 2 MiB
	go func() { _, _ = c1.Write(buf.Bytes()); _, _ = c1.Read(make([]byte, 256)) }()
	err := <-errc
	require.ErrorIs(t, err, mdev.ErrMemoryLayout)
	assert.Equal(t, mdev.MigRunning, dst.dev.MigrationState(), "destination untouched")
}

// A guest that breaks the ring rules while the relay serves it (here:
// avail.idx jumps by more than the queue size, virtio 1.2 §2.7.13.3) gets
// DEVICE_NEEDS_RESET with the ring error, never a panic or a hang.
func TestRelayHostileGuestNeedsReset(t *testing.T) {
	s, g := trackedSide(t, 100)
	for !g.Done() {
		g.Step()
	}
	// transmitq0's avail.idx lives at its avail ring + 2 (guest layout of
	// mdevtest: the TX ring at 0x11000, desc table 16*256 bytes).
	availIdx := vring.GuestAddr(0x11000 + 16*256 + 2)
	require.NoError(t, s.mem.Write(availIdx, []byte{0x00, 0x40}))
	require.NoError(t, s.dev.Write(mdev.RegionNotify, 1*mdev.NotifyOffMultiplier, 2, 1))
	waitFor(t, msg("NEEDS_RESET"), func() bool {
		st, _ := s.dev.Read(mdev.RegionCommon, mdev.OffDeviceStatus, 1)
		return virtio.Status(st)&virtio.StatusDeviceNeedsReset != 0
	})
	assert.ErrorIs(t, s.dev.Err(), vring.ErrAvailIdxJump)
	// Reset recovers the device.
	require.NoError(t, s.dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, 0))
	assert.EqualValues(t, 0, s.dev.Status())
}

// A packed guest ring under the relay that makes a descriptor available
// with a buffer id beyond the ring (virtio 1.2 §2.8.6) breaks only that
// device: NEEDS_RESET with the ring's typed error, and reset recovers it.
func TestRelayHostilePackedGuestNeedsReset(t *testing.T) {
	s := newSide(t, testGuestMem, mdev.DirtyRelay)
	g, err := mdevtest.Boot(s.dev, s.mem, 100, &mdevtest.Options{QueueSize: 200, Features: virtio.FRingPacked.Bit()})
	require.NoError(t, err)
	log, err := dirty.New(testGuestMem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, s)
	mode, err := s.dev.StartDirtyTracking(log)
	require.NoError(t, err)
	require.Equal(t, mdev.DirtyRelay, mode)
	for !g.Done() {
		g.Step()
	}
	require.NoError(t, g.Verify())
	// transmitq0 (mdevtest: ring at 0x11000) made 100 chains available
	// from index 0 on lap 1: index 100 is next. Its id|flags word: id 500,
	// AVAIL set and USED clear for wrap counter 1.
	desc := vring.GuestAddr(0x11000 + 16*100)
	d := make([]byte, 16)
	binary.LittleEndian.PutUint64(d, 0x100000)
	binary.LittleEndian.PutUint32(d[8:], 64)
	binary.LittleEndian.PutUint16(d[12:], 500)
	binary.LittleEndian.PutUint16(d[14:], 1<<7)
	require.NoError(t, s.mem.Write(desc, d))
	require.NoError(t, s.dev.Write(mdev.RegionNotify, 1*mdev.NotifyOffMultiplier, 2, 1))
	waitFor(t, msg("NEEDS_RESET"), func() bool {
		st, _ := s.dev.Read(mdev.RegionCommon, mdev.OffDeviceStatus, 1)
		return virtio.Status(st)&virtio.StatusDeviceNeedsReset != 0
	})
	assert.ErrorIs(t, s.dev.Err(), vring.ErrBufferIDOutOfRange)
	require.NoError(t, s.dev.Write(mdev.RegionCommon, mdev.OffDeviceStatus, 1, 0))
	assert.EqualValues(t, 0, s.dev.Status())
}

// A destination that cannot take the device (another MAC address) refuses
// the state; the source gets the reason, its device runs again and the
// guest, resumed on the source, loses no frame.
func TestMigrationRefusedByDestinationRollsBack(t *testing.T) {
	const frames = 5000
	src := newSide(t, testGuestMem, mdev.DirtyDeviceLog)
	r, err := vring.NewMemfdRegion(0, testGuestMem, nil)
	require.NoError(t, err)
	dmem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = dmem.Close() })
	sn, err := softnet.New(&softnet.Options{MAC: [6]byte{0x02, 0, 0, 0, 0, 0x99}})
	require.NoError(t, err)
	local := vdpa.NewLocal(sn, nil)
	t.Cleanup(func() { _ = local.Close() })
	ddev, err := mdev.NewDevice(local, &mdev.Options{Memory: dmem})
	require.NoError(t, err)
	t.Cleanup(func() { _ = ddev.Close() })

	g, err := mdevtest.Boot(src.dev, src.mem, frames, nil)
	require.NoError(t, err)
	log, err := dirty.New(testGuestMem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, src)
	g.SetLog(log)
	for s, _, _, _ := g.Stats(); s < frames/2; s, _, _, _ = g.Stats() {
		g.Step()
	}
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	errc := goDestination(t, c2, mdev.DestOptions{Device: ddev, Memory: dmem})
	_, err = mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: log,
		Tracker:   dirty.TrackerOptions{Bandwidth: 1e9},
		StopGuest: func() error { return nil },
	})
	require.ErrorIs(t, err, mdev.ErrPeer)
	assert.Contains(t, err.Error(), "device config differs")
	require.ErrorIs(t, <-errc, mdev.ErrStateIncompatible)
	assert.Equal(t, mdev.MigRunning, src.dev.MigrationState())
	assert.Equal(t, mdev.DirtyAuto, src.dev.DirtyTracking())
	for !g.Done() {
		g.Step()
	}
	require.NoError(t, g.Verify())
}

// The software device's link going down reaches the guest as a
// configuration change: new config_generation, ISR bit 1 and the config
// interrupt (virtio 1.2 §2.5.1, §4.1.4.5), with the new status in the
// device configuration.
func TestLinkChangeRaisesConfigInterrupt(t *testing.T) {
	r, err := vring.NewMemfdRegion(0, testGuestMem, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	var dev *mdev.Device
	sn, err := softnet.New(&softnet.Options{OnConfigChange: func() { dev.ConfigChanged() }})
	require.NoError(t, err)
	local := vdpa.NewLocal(sn, nil)
	t.Cleanup(func() { _ = local.Close() })
	dev, err = mdev.NewDevice(local, &mdev.Options{Memory: mem})
	require.NoError(t, err)
	t.Cleanup(func() { _ = dev.Close() })
	_, err = mdevtest.Boot(dev, mem, 1, nil)
	require.NoError(t, err)
	gen0, err := dev.Read(mdev.RegionCommon, mdev.OffConfigGeneration, 1)
	require.NoError(t, err)

	sn.SetLinkUp(false)
	n, err := dev.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n, "config interrupt")
	isr, err := dev.Read(mdev.RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, mdev.ISRConfig, isr)
	gen1, err := dev.Read(mdev.RegionCommon, mdev.OffConfigGeneration, 1)
	require.NoError(t, err)
	assert.NotEqual(t, gen0, gen1)
	st, err := dev.Read(mdev.RegionDevice, 6, 2) // virtio_net_config.status
	require.NoError(t, err)
	assert.Zero(t, st&1, "VIRTIO_NET_S_LINK_UP clear")
}

// TestMigrateSourceTruncatedMemoryFails: guest memory that the VMM mapped
// from a file it can still truncate (a memfd created without sealing) and
// then truncated before migrating. Sending the first round copies guest
// memory; the fault that raises fails the migration with an error
// matching vring.ErrMemoryFault instead of ending the process, and the
// source device runs on.
func TestMigrateSourceTruncatedMemoryFails(t *testing.T) {
	fd, src := unsealedSide(t, testGuestMem, mdev.DirtyRelay)
	dev, mem := src.dev, src.mem
	log, err := dirty.New(testGuestMem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, src)

	dst := newSide(t, testGuestMem, mdev.DirtyRelay)
	c1, c2 := net.Pipe()
	defer c1.Close()
	errc := goDestination(t, c2, mdev.DestOptions{Device: dst.dev, Memory: dst.mem})

	// The VMM takes the second half of guest memory away.
	require.NoError(t, unix.Ftruncate(fd, testGuestMem/2))
	_, err = mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
		Device: dev, Memory: mem, Log: log,
		Tracker:   dirty.TrackerOptions{Bandwidth: 1e9},
		StopGuest: func() error { return nil },
	})
	require.ErrorIs(t, err, vring.ErrMemoryFault)
	var fe *vring.FaultError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, mdev.MigRunning, dev.MigrationState(), "the source device runs on")
	_ = c1.Close()
	require.Error(t, <-errc, "the destination sees the stream end early")
}
