package vhostuser

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// The lifecycle of a packed ring over vhost-user. A packed ring publishes
// no index in guest memory, so its position travels in the base word only:
// GET_VRING_BASE answers the avail position in bits 0..15 and the used
// position in bits 16..31 (each a ring index with its wrap counter in bit
// 15), QEMU's and Linux vhost's encoding; DPDK sends the low half alone.

var lcPackedFeatures = lcFeatures.With(virtio.FRingPacked)

// packedWord is the base word for a ring that has consumed and completed
// n chains of one descriptor each on a ring of lcSize: the index is n mod
// lcSize and the wrap counter starts at 1 and flips at every wrap.
func packedWord(n int) uint32 {
	pos := uint32(n % lcSize)
	if (n/lcSize)%2 == 0 {
		pos |= 1 << 15
	}
	return pos | pos<<16
}

func (c *lcConn) negotiatePacked() {
	c.send(ReqSetOwner, nil)
	c.call(ReqGetFeatures, nil)
	c.call(ReqGetProtocolFeatures, nil)
	c.send(ReqSetProtocolFeatures, putU64(uint64(lcProto)))
	c.send(ReqSetFeatures, putU64(uint64(lcPackedFeatures)))
	c.send(ReqSetMemTable, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: rawUA}}), c.g.memfd)
}

// startPacked is startRing with a 32-bit base word (or none when
// withBase is false: a front-end that relies on the fresh position).
func (c *lcConn) startPacked(base uint32, withBase bool) {
	c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
	if withBase {
		c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: base}.Encode())
	}
	c.send(ReqSetVringAddr, VringAddr{Index: lcQueue, Desc: rawUA, Avail: rawUA + 0x1000, Used: rawUA + 0x2000}.Encode())
	c.send(ReqSetVringKick, putU64(lcQueue), c.g.kick.Fd())
	c.send(ReqSetVringCall, putU64(lcQueue|VringNoFd))
	c.send(ReqSetVringEnable, VringState{Index: lcQueue, Num: 1}.Encode())
	c.send(ReqSetStatus, putU64(uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK)))
	require.Equal(c.t, 1, c.running(), "ring started")
}

// trafficN is traffic for any n: at most half a ring at a time.
func (g *lcGuest) trafficN(n int) {
	g.t.Helper()
	for n > 0 {
		k := min(n, lcSize/2)
		g.traffic(k)
		n -= k
	}
}

func (c *lcConn) base32() uint32 {
	c.t.Helper()
	st, err := DecodeVringState(c.call(ReqGetVringBase, VringState{Index: lcQueue}.Encode()))
	require.NoError(c.t, err)
	return st.Num
}

func TestLifecyclePacked(t *testing.T) {
	fresh := uint32(1<<15 | 1<<31)
	require.Equal(t, packedWord(0), fresh)
	t.Run("negotiated and fresh", func(t *testing.T) {
		g := newLCGuestWith(t, lcPackedFeatures)
		c := g.connect(lcDevice(t))
		c.negotiatePacked()
		c.startPacked(0, false) // no SET_VRING_BASE: the fresh position
		require.True(t, c.be.Info().Features.Has(virtio.FRingPacked))
		g.trafficN(5)
		c.send(ReqSetStatus, putU64(0))
		assert.Equal(t, packedWord(5), c.base32())
	})
	// QEMU's stop and cont across several wraps of the ring: the word it
	// got back restarts the ring where it stopped.
	t.Run("stop and cont across wraps", func(t *testing.T) {
		g := newLCGuestWith(t, lcPackedFeatures)
		c := g.connect(lcDevice(t))
		c.negotiatePacked()
		c.startPacked(fresh, true)
		total := 0
		for round, n := range []int{40, 60, 64, 100, 3} {
			g.trafficN(n)
			total += n
			c.send(ReqSetStatus, putU64(0))
			got := c.base32()
			require.Equal(t, packedWord(total), got, "round %d after %d chains", round, total)
			c.send(ReqSetFeatures, putU64(uint64(lcPackedFeatures)))
			c.startPacked(got, true)
		}
		assert.Empty(t, c.log.find("resynchronised"))
	})
	// Migration: the destination is a fresh back-end given the source's
	// word; a DPDK front-end sends only the low half (used = avail).
	for _, tc := range []struct {
		name string
		word func(uint32) uint32
	}{
		{"migration with QEMU's 32-bit word", func(w uint32) uint32 { return w }},
		{"reconnect with DPDK's 16-bit word", func(w uint32) uint32 { return w & 0xffff }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newLCGuestWith(t, lcPackedFeatures)
			src := g.connect(lcDevice(t))
			src.negotiatePacked()
			src.startPacked(fresh, true)
			g.trafficN(70)
			src.send(ReqSetStatus, putU64(0))
			saved := src.base32()
			require.Equal(t, packedWord(70), saved)
			src.hangUp()

			dst := g.connect(lcDevice(t))
			dst.negotiatePacked()
			dst.startPacked(tc.word(saved), true)
			g.trafficN(80)
			dst.send(ReqSetStatus, putU64(0))
			assert.Equal(t, packedWord(150), dst.base32())
		})
	}
	// A back-end lost without a hand-over (QEMU's reconnect after the
	// back-end died): the front-end could not ask it for the position and
	// hands the next one the last position it knew, the initial one or
	// that of an earlier stop. The ring records the used position; the
	// new back-end resumes there, notes it, and the guest's next chains
	// are served. A base that agrees with the ring is taken as it is.
	for _, tc := range []struct {
		name         string
		before, lost int // chains used before the last hand-over the front-end saw, and after it
		stale        bool
	}{
		{"the initial position, one lap and more behind", 0, 70, true},
		{"an earlier stop's position", 30, 50, true},
		{"a stale position two laps behind exactly (the same word: agrees)", 0, 2 * lcSize, false},
		{"nothing lost since the hand-over", 40, 0, false},
	} {
		t.Run("back-end lost: "+tc.name, func(t *testing.T) {
			g := newLCGuestWith(t, lcPackedFeatures)
			src := g.connect(lcDevice(t))
			src.negotiatePacked()
			src.startPacked(fresh, true)
			known := fresh
			if tc.before > 0 {
				g.trafficN(tc.before)
				src.send(ReqSetStatus, putU64(0))
				known = src.base32()
				src.send(ReqSetFeatures, putU64(uint64(lcPackedFeatures)))
				src.startPacked(known, true)
			}
			g.trafficN(tc.lost)
			src.hangUp() // no GET_VRING_BASE: the back-end died

			dst := g.connect(lcDevice(t))
			dst.negotiatePacked()
			dst.startPacked(known, true)
			notes := dst.log.find("resynchronised from the ring")
			if tc.stale {
				require.Len(t, notes, 1, "one note")
				assert.Contains(t, notes[0], fmt.Sprintf("base=%#x ring=%#x", uint16(known), uint16(packedWord(tc.before+tc.lost))))
			} else {
				assert.Empty(t, notes)
			}
			g.trafficN(10)
			dst.send(ReqSetStatus, putU64(0))
			assert.Equal(t, packedWord(tc.before+tc.lost+10), dst.base32())
			select {
			case err := <-dst.done:
				t.Fatalf("session ended: %v", err)
			default:
			}
		})
	}
	// A packed base is 32 bits; a split ring's is refused beyond 16.
	t.Run("split base beyond 16 bits is refused", func(t *testing.T) {
		g := newLCGuest(t)
		c := g.connect(lcDevice(t))
		c.negotiate()
		c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: fresh}.Encode())
		select {
		case err := <-c.done:
			require.ErrorIs(t, err, ErrProtocol)
		case <-time.After(10 * time.Second):
			t.Fatal("session not ended")
		}
	})
	// A packed ring may have any size up to 32768; a split ring's is a
	// power of two.
	t.Run("sizes", func(t *testing.T) {
		for _, tc := range []struct {
			f    virtio.Features
			size uint32
			ok   bool
		}{{lcPackedFeatures, 48, true}, {lcFeatures, 48, false}, {lcPackedFeatures, 0, false}} {
			g := newLCGuest(t)
			c := g.connect(lcDevice(t))
			c.send(ReqSetOwner, nil)
			c.send(ReqSetFeatures, putU64(uint64(tc.f)))
			c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: tc.size}.Encode())
			if tc.ok {
				c.call(ReqGetFeatures, nil) // in order: the session is still up if the size was taken
				select {
				case err := <-c.done:
					t.Fatalf("size %d with %v refused: %v", tc.size, tc.f, err)
				default:
				}
				continue
			}
			select {
			case err := <-c.done:
				require.ErrorIs(t, err, ErrBadQueue)
			case <-time.After(10 * time.Second):
				t.Fatalf("size %d with %v accepted", tc.size, tc.f)
			}
		}
	})
}
