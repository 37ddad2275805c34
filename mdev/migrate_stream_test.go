package mdev_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vring"
)

// newRegionsSide is a software-backed side whose guest memory is made of
// adjacent regions of the given sizes, starting at guest address 0.
func newRegionsSide(t testing.TB, sizes []uint64, mode mdev.DirtyMode) *side {
	t.Helper()
	var rs []*vring.Region
	var base uint64
	for i, sz := range sizes {
		r, err := vring.NewMemfdRegion(vring.GuestAddr(base), sz, &vring.RegionOptions{Name: fmt.Sprintf("guest%d", i)})
		require.NoError(t, err)
		rs = append(rs, r)
		base += sz
	}
	mem, err := vring.NewMemory(rs...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = mem.Close() })
	sn, err := softnet.New(nil)
	require.NoError(t, err)
	local := vdpa.NewLocal(sn, nil)
	t.Cleanup(func() { _ = local.Close() })
	dev, err := mdev.NewDevice(local, &mdev.Options{Memory: mem, DirtyMode: mode, Backend: "software"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = dev.Close() })
	return &side{mem: mem, sn: sn, dev: dev}
}

// memBytes returns a copy of all of mem, regions in order.
func memBytes(mem *vring.Memory) []byte {
	var out []byte
	for _, r := range mem.Regions() {
		out = append(out, r.Bytes()...)
	}
	return out
}

// scribble writes fresh bytes over [addr, addr+n) and marks them in log, as
// a vCPU would.
func scribble(t testing.TB, mem *vring.Memory, log *dirty.Bitmap, rng *rand.Rand, addr, n uint64) {
	t.Helper()
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	require.NoError(t, mem.Write(vring.GuestAddr(addr), b))
	require.NoError(t, log.Mark(addr, n))
}

// scriptedMigration migrates a booted (idle) guest from src to dst over a
// pipe. Between pre-copy rounds and at StopGuest it dirties, with fresh
// bytes, every range dirtyAt returns for that point (round 0, 1, ...; -1
// for the stop), so the pre-copy rounds and the final copy both carry
// exactly those runs. The destination's memory must equal the source's,
// byte for byte, when it has loaded everything.
func scriptedMigration(t *testing.T, src, dst *side, pageSize uint64, dirtyAt func(round int) [][2]uint64) *mdev.SourceReport {
	t.Helper()
	var span uint64
	for _, r := range src.mem.Regions() {
		span = max(span, uint64(r.End()))
	}
	rng := rand.New(rand.NewPCG(pageSize, 3))
	for _, r := range src.mem.Regions() {
		b := r.Bytes()
		for i := 0; i+8 <= len(b); i += 8 {
			binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
		}
	}
	g, err := mdevtest.Boot(src.dev, src.mem, 64, nil)
	require.NoError(t, err)
	for !g.Done() {
		g.Step()
	}
	log, err := dirty.New(span, &dirty.Options{PageSize: pageSize})
	require.NoError(t, err)
	closeLogAfter(t, log, src, dst)

	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	var loaded []byte
	destErr := goDestination(t, c2, mdev.DestOptions{
		Device: dst.dev, Memory: dst.mem,
		Loaded: func() error { loaded = memBytes(dst.mem); return nil },
	})
	round := 0
	dirtyRanges := func(at int) {
		if dirtyAt == nil {
			return
		}
		for _, r := range dirtyAt(at) {
			scribble(t, src.mem, log, rng, r[0], r[1])
		}
	}
	rep, err := mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: log,
		// Slow enough on paper that the tracker runs pre-copy rounds.
		Tracker: dirty.TrackerOptions{Bandwidth: 1e6, MaxRounds: 3},
		OnRound: func(mdev.RoundReport) { dirtyRanges(round); round++ },
		StopGuest: func() error {
			dirtyRanges(-1)
			return nil
		},
	})
	require.NoError(t, err)
	require.NoError(t, <-destErr)
	assert.Equal(t, mdev.MigStop, src.dev.MigrationState())
	assert.Equal(t, mdev.MigRunning, dst.dev.MigrationState())
	want := memBytes(src.mem)
	require.Equal(t, len(want), len(loaded))
	if !bytes.Equal(want, loaded) {
		for i := range want {
			if want[i] != loaded[i] {
				t.Fatalf("destination memory differs first at %#x", i)
			}
		}
	}
	return rep
}

// Pages messages are sized by bytes: every page size the destination
// accepts migrates, with dirty pages in the pre-copy rounds and in the
// final copy.
func TestMigratePageSizes(t *testing.T) {
	const mib = 1 << 20
	for ps := uint64(512); ps <= 64<<10; ps *= 2 {
		t.Run(fmt.Sprintf("%dB", ps), func(t *testing.T) {
			sizes := []uint64{8 * mib, 8 * mib}
			src := newRegionsSide(t, sizes, mdev.DirtyDeviceLog)
			dst := newRegionsSide(t, sizes, mdev.DirtyDeviceLog)
			rep := scriptedMigration(t, src, dst, ps, func(round int) [][2]uint64 {
				// A long run (more than one message) and a single page.
				return [][2]uint64{{4*mib - 3*ps, 2*mib + 5*ps}, {12*mib + ps, ps}}
			})
			assert.EqualValues(t, 16*mib, rep.Rounds[0].Sent)
			assert.NotZero(t, rep.Final.Pages)
		})
	}
}

// A dirty run that crosses from one guest-memory region into the next is
// split at the boundary: several regions of different sizes, runs across
// every boundary, in the pre-copy rounds and in the final copy.
func TestMigrateDirtyRunsAcrossRegions(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name  string
		sizes []uint64
		page  uint64
	}{
		{"two regions", []uint64{8 * mib, 8 * mib}, 4096},
		{"five regions", []uint64{4 * mib, 64 << 10, 1 * mib, 4096 * 3, 2 * mib}, 4096},
		{"five regions 64KiB pages", []uint64{4 * mib, 64 << 10, 1 * mib, 128 << 10, 2 * mib}, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newRegionsSide(t, tc.sizes, mdev.DirtyDeviceLog)
			dst := newRegionsSide(t, tc.sizes, mdev.DirtyDeviceLog)
			var bounds []uint64
			var end uint64
			for _, sz := range tc.sizes[:len(tc.sizes)-1] {
				end += sz
				bounds = append(bounds, end)
			}
			ps := tc.page
			scriptedMigration(t, src, dst, ps, func(round int) [][2]uint64 {
				var rs [][2]uint64
				for i, b := range bounds {
					switch {
					case round == 0:
						// One page either side of the boundary.
						rs = append(rs, [2]uint64{b - ps, 2 * ps})
					case round < 0:
						// Longer runs, different on each side, and a
						// run over the whole of a small region.
						before := min(uint64(i+1)*ps, b)
						rs = append(rs, [2]uint64{b - before, before + uint64(i+2)*ps})
					}
				}
				return rs
			})
		})
	}
}

// cutProxy relays the migration stream between the source and the
// destination, message by message, and makes the destination vanish at
// message cut of the conversation (both directions, counted from 0 in the
// order they happen): it closes both connections after forwarding the
// first at(len) bytes of that message (at nil: none of it).
type cutProxy struct {
	mu   sync.Mutex
	n    int
	cut  int
	at   func(n int) int
	done bool
	// seen records the types the source sent, after the cut point too
	// when corrupt is set (then nothing is cut).
	seen    []byte
	corrupt int // the destination's reply number corrupt (1-based) is replaced by an unexpected type
	replies int
	a, b    net.Conn // the proxy's ends towards source and destination
}

func newCutProxy(cut int, at func(n int) int) (srcEnd, dstEnd net.Conn, p *cutProxy) {
	s1, s2 := net.Pipe()
	d1, d2 := net.Pipe()
	p = &cutProxy{cut: cut, at: at, corrupt: -1, a: s2, b: d1}
	go p.relay(s2, d1, true)
	go p.relay(d1, s2, false)
	return s1, d2, p
}

func (p *cutProxy) hangUp() {
	p.done = true
	_ = p.a.Close()
	_ = p.b.Close()
}

func (p *cutProxy) relay(from, to net.Conn, fromSource bool) {
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(from, hdr[:]); err != nil {
			p.mu.Lock()
			if !p.done {
				p.hangUp()
			}
			p.mu.Unlock()
			return
		}
		payload := make([]byte, binary.LittleEndian.Uint32(hdr[1:]))
		if _, err := io.ReadFull(from, payload); err != nil {
			p.mu.Lock()
			p.hangUp()
			p.mu.Unlock()
			return
		}
		p.mu.Lock()
		if p.done {
			p.mu.Unlock()
			return
		}
		if fromSource {
			p.seen = append(p.seen, hdr[0])
		} else {
			p.replies++
			if p.replies == p.corrupt {
				hdr[0] = 4 // a round report: never a reply
				binary.LittleEndian.PutUint32(hdr[1:], 12)
				payload = make([]byte, 12)
			}
		}
		n := p.n
		p.n++
		if n == p.cut {
			if p.at != nil {
				msg := append(hdr[:], payload...)
				if k := p.at(len(msg)); k > 0 {
					_, _ = to.Write(msg[:k])
				}
			}
			p.hangUp()
			p.mu.Unlock()
			return
		}
		p.mu.Unlock()
		if _, err := to.Write(append(hdr[:], payload...)); err != nil {
			return
		}
	}
}

// sourceRollsBack checks that a failed migration left the source device
// running its guest: RUNNING, dirty tracking off, no NEEDS_RESET, and the
// guest finishes its traffic with every frame intact.
func sourceRollsBack(t *testing.T, s *side, g *mdevtest.Guest) {
	t.Helper()
	assert.Equal(t, mdev.MigRunning, s.dev.MigrationState())
	assert.Equal(t, mdev.DirtyAuto, s.dev.DirtyTracking())
	assert.Zero(t, s.dev.Status()&0x40, "NEEDS_RESET: %v", s.dev.Err())
	deadline := time.Now().Add(waitLimit)
	for !g.Done() {
		if !g.Step() {
			if time.Now().After(deadline) {
				t.Fatalf("guest traffic stalled after the failed migration: %v", fmt.Sprint(g.Stats()))
			}
			time.Sleep(50 * time.Microsecond)
		}
	}
	require.NoError(t, g.Verify())
}

// The destination vanishing at any point of the stream — before any
// message in either direction, after its first byte, in its middle or
// before its last byte — fails MigrateSource with
// the device back in RUNNING and its guest running on.
func TestMigrateSourcePeerVanishes(t *testing.T) {
	const mem = 4 << 20
	for _, mode := range []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay} {
		for _, where := range []struct {
			name string
			at   func(n int) int // bytes of the message forwarded
		}{
			{"before", nil},
			{"after 1 byte", func(int) int { return 1 }},
			{"in the middle", func(n int) int { return n / 2 }},
			{"before the last byte", func(n int) int { return n - 1 }},
		} {
			t.Run(fmt.Sprintf("%s/%s", mode, where.name), func(t *testing.T) {
				for cut := 0; ; cut++ {
					end, ran := false, false
					ok := t.Run(fmt.Sprint("cut", cut), func(t *testing.T) {
						ran = true
						src := newSide(t, mem, mode)
						dst := newSide(t, mem, mode)
						const frames = 400
						g, err := mdevtest.Boot(src.dev, src.mem, frames, nil)
						require.NoError(t, err)
						for s, _, _, _ := g.Stats(); s < frames/2; s, _, _, _ = g.Stats() {
							g.Step()
						}
						log, err := dirty.New(mem, nil)
						require.NoError(t, err)
						closeLogAfter(t, log, src, dst)
						g.SetLog(log)
						se, de, p := newCutProxy(cut, where.at)
						defer se.Close()
						defer de.Close()
						destErr := goDestination(t, de, mdev.DestOptions{Device: dst.dev, Memory: dst.mem})
						stopped := false
						_, err = mdev.MigrateSource(context.Background(), se, mdev.SourceOptions{
							Device: src.dev, Memory: src.mem, Log: log,
							Tracker: dirty.TrackerOptions{Bandwidth: 1e6, MaxRounds: 2},
							OnRound: func(mdev.RoundReport) {
								// Dirty a page so that every round sends something.
								g.Step()
								_ = log.Mark(3<<20, 4096)
							},
							StopGuest: func() error { stopped = true; return nil },
						})
						derr := <-destErr
						p.mu.Lock()
						cutDone := p.done
						p.mu.Unlock()
						if !cutDone {
							// The whole conversation went through: this
							// is the end of the stream.
							require.NoError(t, err)
							require.NoError(t, derr)
							assert.Equal(t, mdev.MigStop, src.dev.MigrationState())
							end = true
							t.Logf("the stream ends after %d messages", cut)
							return
						}
						require.Error(t, err, "cut at message %d", cut)
						t.Logf("cut %d (stopped guest: %v): %v", cut, stopped, err)
						sourceRollsBack(t, src, g)
					})
					if !ok || end || !ran {
						return
					}
				}
			})
		}
	}
}

// A destination that answers with the wrong message at any of its three
// replies gets the source's error back, and the source runs again.
func TestMigrateSourceSendsErrorToPeer(t *testing.T) {
	const mem = 4 << 20
	for reply := 1; reply <= 3; reply++ {
		t.Run(fmt.Sprint("reply", reply), func(t *testing.T) {
			src := newSide(t, mem, mdev.DirtyDeviceLog)
			dst := newSide(t, mem, mdev.DirtyDeviceLog)
			g, err := mdevtest.Boot(src.dev, src.mem, 100, nil)
			require.NoError(t, err)
			log, err := dirty.New(mem, nil)
			require.NoError(t, err)
			closeLogAfter(t, log, src, dst)
			se, de, p := newCutProxy(-1, nil)
			p.corrupt = reply
			defer se.Close()
			defer de.Close()
			goDestination(t, de, mdev.DestOptions{Device: dst.dev, Memory: dst.mem})
			_, err = mdev.MigrateSource(context.Background(), se, mdev.SourceOptions{
				Device: src.dev, Memory: src.mem, Log: log,
				Tracker:   dirty.TrackerOptions{Bandwidth: 1e9},
				StopGuest: func() error { return nil },
			})
			require.ErrorIs(t, err, mdev.ErrProtocol)
			sourceRollsBack(t, src, g)
			// The proxy has read the error (the pipe is synchronous) but
			// may not have recorded it yet.
			waitFor(t, func() string { p.mu.Lock(); defer p.mu.Unlock(); return fmt.Sprint("msgError after ", p.seen) }, func() bool {
				p.mu.Lock()
				defer p.mu.Unlock()
				return len(p.seen) > 0 && p.seen[len(p.seen)-1] == 8 // msgError
			})
		})
	}
}

// Failures on the source's own side after the sync acknowledgement (the
// guest cannot be stopped) are sent to the destination too.
func TestMigrateSourceStopGuestFails(t *testing.T) {
	const mem = 4 << 20
	src := newSide(t, mem, mdev.DirtyRelay)
	dst := newSide(t, mem, mdev.DirtyRelay)
	g, err := mdevtest.Boot(src.dev, src.mem, 100, nil)
	require.NoError(t, err)
	log, err := dirty.New(mem, nil)
	require.NoError(t, err)
	closeLogAfter(t, log, src, dst)
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	destErr := goDestination(t, c2, mdev.DestOptions{Device: dst.dev, Memory: dst.mem})
	boom := errors.New("vCPUs will not stop")
	_, err = mdev.MigrateSource(context.Background(), c1, mdev.SourceOptions{
		Device: src.dev, Memory: src.mem, Log: log,
		Tracker:   dirty.TrackerOptions{Bandwidth: 1e9},
		StopGuest: func() error { return boom },
	})
	require.ErrorIs(t, err, boom)
	derr := <-destErr
	require.ErrorIs(t, derr, mdev.ErrPeer)
	assert.Contains(t, derr.Error(), boom.Error())
	sourceRollsBack(t, src, g)
}

// A migration cancelled through its context mid-way returns the context's
// error and rolls back like any other failure. (The rollback also runs
// with the cancellation removed, which matters only when it would have to
// wait for another back-end operation; this test does not cover that.)
func TestMigrateSourceCancelledRollsBack(t *testing.T) {
	const mem = 4 << 20
	for _, mode := range []mdev.DirtyMode{mdev.DirtyDeviceLog, mdev.DirtyRelay} {
		t.Run(mode.String(), func(t *testing.T) {
			src := newSide(t, mem, mode)
			dst := newSide(t, mem, mode)
			g, err := mdevtest.Boot(src.dev, src.mem, 100, nil)
			require.NoError(t, err)
			log, err := dirty.New(mem, nil)
			require.NoError(t, err)
			closeLogAfter(t, log, src, dst)
			c1, c2 := net.Pipe()
			defer c1.Close()
			defer c2.Close()
			goDestination(t, c2, mdev.DestOptions{Device: dst.dev, Memory: dst.mem})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			_, err = mdev.MigrateSource(ctx, c1, mdev.SourceOptions{
				Device: src.dev, Memory: src.mem, Log: log,
				Tracker:   dirty.TrackerOptions{Bandwidth: 1e6, MaxRounds: 3},
				OnRound:   func(mdev.RoundReport) { _ = log.Mark(3<<20, 4096); cancel() },
				StopGuest: func() error { return nil },
			})
			require.ErrorIs(t, err, context.Canceled)
			sourceRollsBack(t, src, g)
		})
	}
}
