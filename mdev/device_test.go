package mdev

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const (
	sAck = virtio.StatusAcknowledge
	sDrv = virtio.StatusDriver
	sFOK = virtio.StatusFeaturesOK
	sDOK = virtio.StatusDriverOK
	sNR  = virtio.StatusDeviceNeedsReset
	sF   = virtio.StatusFailed
)

func TestCommonConfigResetValues(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	// §4.1.4.3.1: on reset queue_size holds the maximum, vectors NO_VECTOR.
	assert.EqualValues(t, 2, g.r(OffNumQueues, 2))
	assert.EqualValues(t, 0, g.status())
	assert.EqualValues(t, NoVector, g.r(OffMSIXConfig, 2))
	for q := 0; q < 2; q++ {
		g.w(OffQueueSelect, 2, uint64(q))
		assert.EqualValues(t, 256, g.r(OffQueueSize, 2))
		assert.EqualValues(t, NoVector, g.r(OffQueueMSIXVector, 2))
		assert.EqualValues(t, 0, g.r(OffQueueEnable, 2))
		assert.EqualValues(t, q, g.r(OffQueueNotifyOff, 2))
	}
	// §4.1.4.3: queue_size 0 for a queue that does not exist.
	g.w(OffQueueSelect, 2, 2)
	assert.EqualValues(t, 0, g.r(OffQueueSize, 2))
}

func TestDeviceFeatureWindows(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	got := g.readFeatures()
	// The transport features this emulation does not implement are never
	// offered, whatever the backing device offers; RING_PACKED is, when
	// the backing device offers it.
	want := f.features &^ virtio.Features(0).With(virtio.FLogAll)
	assert.Equal(t, want, got)
	assert.True(t, got.Has(virtio.FRingPacked))
	f2 := newFakeBacking()
	f2.features &^= virtio.FRingPacked.Bit()
	assert.False(t, newTestDevice(t, f2, nil).OfferedFeatures().Has(virtio.FRingPacked),
		"RING_PACKED only when the backing device offers it")
	g.w(OffDeviceFeatureSelect, 4, 2)
	assert.EqualValues(t, 0, g.r(OffDeviceFeature, 4), "feature window 2 has no bits")
	assert.EqualValues(t, 2, g.r(OffDeviceFeatureSelect, 4))
	// device_feature is read-only.
	g.w(OffDeviceFeatureSelect, 4, 0)
	g.w(OffDeviceFeature, 4, 0)
	assert.EqualValues(t, uint64(want)&0xffffffff, g.r(OffDeviceFeature, 4))
}

// TestOfferedFeaturesFollowTheSpec: what the device offers, whatever the
// backing device offers and Options.Features keeps. §2.2.2: no feature
// without the features it requires (Linux's virtio-net refuses to probe a
// device with MQ or CTRL_RX but no CTRL_VQ). §6.3: a non-transitional
// device offers neither NOTIFY_ON_EMPTY nor ANY_LAYOUT (vhost-net does).
// Transport bits with no field in this common configuration
// (NOTIF_CONFIG_DATA 39, ADMIN_VQ 41) or not yet defined (25, 31, 42..49)
// are never offered.
func TestOfferedFeaturesFollowTheSpec(t *testing.T) {
	f := func(fs ...virtio.Feature) virtio.Features { return virtio.Features(0).With(fs...) }
	base := f(virtio.FVersion1, virtio.FEventIdx, virtio.FIndirectDesc, virtio.NetFMAC)
	ctrl := f(virtio.NetFCtrlVQ, virtio.NetFCtrlRx, virtio.NetFMQ, virtio.NetFCtrlMACAddr, virtio.NetFCtrlVLAN)
	tests := []struct {
		name          string
		backing, mask virtio.Features
		want          virtio.Features
	}{
		{"everything consistent passes", base | ctrl, 0, base | ctrl},
		{"mask without CTRL_VQ takes its dependents", base | ctrl, base | ctrl&^virtio.NetFCtrlVQ.Bit(), base},
		{"backing GUEST_TSO4 without GUEST_CSUM", base | f(virtio.NetFGuestTSO4, virtio.NetFGuestECN), 0, base},
		{"vhost-net's legacy bits", base | f(virtio.FNotifyOnEmpty, virtio.FAnyLayout), 0, base},
		{"transport bits without fields here", base | f(39, 41, 25, 31, 42, 49), 0, base},
		{"supported transport bits pass", base | f(virtio.FRingPacked, virtio.FInOrder, virtio.FOrderPlatform, virtio.FAccessPlatform), 0,
			base | f(virtio.FRingPacked, virtio.FInOrder, virtio.FOrderPlatform, virtio.FAccessPlatform)},
		{"device-specific bits above the transport range pass", base | f(virtio.NetFHostUSO, virtio.NetFCsum, virtio.NetFSpeedDuplex), 0,
			base | f(virtio.NetFHostUSO, virtio.NetFCsum, virtio.NetFSpeedDuplex)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBacking()
			fb.features = tc.backing
			d := newTestDevice(t, fb, &Options{Features: tc.mask})
			got := driver{t, d}.readFeatures()
			assert.Equal(t, tc.want.Format(virtio.DeviceNet), got.Format(virtio.DeviceNet))
			assert.Equal(t, got, d.OfferedFeatures())
		})
	}
}

func TestAccessWidthRules(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	for _, tc := range []struct {
		name string
		off  uint64
		size int
		ok   bool
	}{
		{"4.1.3.1 32-bit field with 32-bit access", OffDeviceFeature, 4, true},
		{"4.1.3.1 32-bit field with 16-bit access rejected", OffDeviceFeature, 2, false},
		{"4.1.3.1 16-bit field with 16-bit access", OffNumQueues, 2, true},
		{"4.1.3.1 16-bit field with 32-bit access rejected", OffQueueSelect, 4, false},
		{"4.1.3.1 8-bit device_status with 8-bit access", OffDeviceStatus, 1, true},
		{"4.1.3.1 device_status with 16-bit access rejected", OffDeviceStatus, 2, false},
		{"4.1.3.1 8-bit config_generation", OffConfigGeneration, 1, true},
		{"4.1.3.1 64-bit queue_desc low half", OffQueueDesc, 4, true},
		{"4.1.3.1 64-bit queue_desc high half", OffQueueDesc + 4, 4, true},
		{"4.1.3.1 64-bit queue_device whole", OffQueueDevice, 8, true},
		{"4.1.3.1 misaligned access inside a field rejected", OffQueueDesc + 2, 2, false},
		{"4.1.3.1 access straddling two fields rejected", OffMSIXConfig, 4, false},
		{"access past the structure rejected", CommonCfgLen, 1, false},
		{"odd access size rejected", OffDeviceFeature, 3, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := d.Read(RegionCommon, tc.off, tc.size)
			if tc.ok {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			var ae *AccessError
			require.ErrorAs(t, err, &ae)
			assert.True(t, errorsIsAny(err, ErrAccessSize, ErrOutOfRange), "%v", err)
		})
	}
}

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if isErr(err, t) {
			return true
		}
	}
	return false
}

func TestStatusStateMachine(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []virtio.Status
		want   virtio.Status
	}{
		{"3.1.1 ACKNOWLEDGE first", []virtio.Status{sAck}, sAck},
		{"3.1.1 DRIVER after ACKNOWLEDGE", []virtio.Status{sAck, sAck | sDrv}, sAck | sDrv},
		{"3.1.1 DRIVER without ACKNOWLEDGE ignored", []virtio.Status{sDrv}, 0},
		{"3.1.1 FEATURES_OK without DRIVER ignored", []virtio.Status{sAck, sAck | sFOK}, sAck},
		{"3.1.1 DRIVER_OK without FEATURES_OK ignored", []virtio.Status{sAck, sAck | sDrv, sAck | sDrv | sDOK}, sAck | sDrv},
		{"3.1.1 full sequence", []virtio.Status{sAck, sAck | sDrv, sAck | sDrv | sFOK, sAck | sDrv | sFOK | sDOK}, sAck | sDrv | sFOK | sDOK},
		{"3.1.1 bits set together in order", []virtio.Status{sAck | sDrv}, sAck | sDrv},
		{"2.1.2 driver must not clear a bit: write ignored", []virtio.Status{sAck, sAck | sDrv, sAck}, sAck | sDrv},
		{"2.1 reserved bits ignored", []virtio.Status{sAck, sAck | 0x10}, sAck},
		{"2.1 FAILED may be set at any time", []virtio.Status{sAck, sAck | sF}, sAck | sF},
		{"2.1 nothing but reset after FAILED", []virtio.Status{sAck, sAck | sF, sAck | sF | sDrv}, sAck | sF},
		{"2.1.2 driver cannot set NEEDS_RESET", []virtio.Status{sAck, sAck | sNR}, sAck},
		{"2.4 writing 0 resets", []virtio.Status{sAck, sAck | sDrv, 0}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, nil)
			g := driver{t, d}
			g.writeFeatures(netFeatures)
			for _, s := range tc.writes {
				g.setStatus(s)
			}
			assert.Equal(t, tc.want, g.status())
		})
	}
}

func TestFeaturesOKNegotiation(t *testing.T) {
	for _, tc := range []struct {
		name    string
		accept  virtio.Features
		extra   bool // write a bit in feature window 2
		refuse  bool // backing refuses FEATURES_OK
		wantFOK bool
	}{
		{"3.1.1 subset of offered features accepted", netFeatures, false, false, true},
		{"3.1.1 feature not offered: FEATURES_OK refused", netFeatures.With(virtio.FNotificationData), false, false, false},
		{"3.1.1 RING_PACKED offered by the backing device accepted", netFeatures.With(virtio.FRingPacked), false, false, true},
		{"3.1.1 feature bit beyond 63: FEATURES_OK refused", netFeatures, true, false, false},
		{"6.1 modern device without VERSION_1: FEATURES_OK refused", virtio.Features(0).With(virtio.NetFMAC), false, false, false},
		{"3.1.1 backing device refuses: FEATURES_OK refused", netFeatures, false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			f.refuseFOK = tc.refuse
			d := newTestDevice(t, f, nil)
			g := driver{t, d}
			g.setStatus(sAck | sDrv)
			g.writeFeatures(tc.accept)
			if tc.extra {
				g.w(OffDriverFeatureSelect, 4, 2)
				g.w(OffDriverFeature, 4, 1)
			}
			g.setStatus(sAck | sDrv | sFOK)
			assert.Equal(t, tc.wantFOK, g.status()&sFOK != 0)
			if tc.wantFOK {
				assert.Equal(t, tc.accept, f.accepted, "backing device got the negotiated features")
			}
		})
	}
}

func TestDriverFeaturesFrozenAfterFeaturesOK(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	g := driver{t, d}
	g.setStatus(sAck | sDrv)
	g.writeFeatures(netFeatures)
	g.setStatus(sAck | sDrv | sFOK)
	g.writeFeatures(netFeatures.With(virtio.NetFStatus))
	assert.Equal(t, netFeatures, d.DriverFeatures(), "3.1.1: features fixed once FEATURES_OK is set")
}

func TestQueueRegisterRules(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	g := driver{t, d}
	g.w(OffQueueSelect, 2, 0)
	for _, tc := range []struct {
		name string
		size uint64
		want uint64
	}{
		{"4.1.4.3.2 smaller power of two accepted", 64, 64},
		{"4.1.4.3.2 non-power-of-two ignored", 100, 64},
		{"4.1.4.3.2 larger than maximum ignored", 512, 64},
		{"4.1.4.3.2 zero ignored", 0, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.w(OffQueueSize, 2, tc.size)
			assert.Equal(t, tc.want, g.r(OffQueueSize, 2))
		})
	}
	t.Run("4.1.5.1.2 vector beyond the MSI-X table reads NO_VECTOR", func(t *testing.T) {
		g.w(OffQueueMSIXVector, 2, 3) // table has 3 vectors: 0..2
		assert.EqualValues(t, NoVector, g.r(OffQueueMSIXVector, 2))
		g.w(OffQueueMSIXVector, 2, 2)
		assert.EqualValues(t, 2, g.r(OffQueueMSIXVector, 2))
		g.w(OffMSIXConfig, 2, 7)
		assert.EqualValues(t, NoVector, g.r(OffMSIXConfig, 2))
	})
	t.Run("4.1.3.1 64-bit address written as two halves", func(t *testing.T) {
		g.w(OffQueueDesc, 4, 0x89abcdf0)
		g.w(OffQueueDesc+4, 4, 0x01234567)
		assert.EqualValues(t, uint64(0x0123456789abcdf0), g.r(OffQueueDesc, 8))
		assert.EqualValues(t, 0x01234567, g.r(OffQueueDesc+4, 4))
	})
	t.Run("4.1.4.3.2 writing 0 to queue_enable ignored", func(t *testing.T) {
		g.w(OffQueueEnable, 2, 1)
		g.w(OffQueueEnable, 2, 0)
		assert.EqualValues(t, 1, g.r(OffQueueEnable, 2))
	})
	t.Run("queue configuration frozen once enabled", func(t *testing.T) {
		g.w(OffQueueSize, 2, 32)
		assert.EqualValues(t, 64, g.r(OffQueueSize, 2))
		g.w(OffQueueDesc, 4, 0)
		assert.EqualValues(t, uint64(0x89abcdf0), g.r(OffQueueDesc, 4))
	})
	t.Run("read-only fields ignore writes", func(t *testing.T) {
		g.w(OffNumQueues, 2, 9)
		assert.EqualValues(t, 2, g.r(OffNumQueues, 2))
		g.w(OffQueueNotifyOff, 2, 9)
		assert.EqualValues(t, 0, g.r(OffQueueNotifyOff, 2))
	})
}

// Packed queues (virtio 1.2 §2.8, §4.1.4.3.2): with RING_PACKED negotiated
// queue_size takes any size from 1 to the maximum.
func TestPackedQueueSizeRules(t *testing.T) {
	for _, tc := range []struct {
		name     string
		features virtio.Features
		size     uint64
		want     uint64
	}{
		{"2.7 split: non-power-of-two ignored", netFeatures, 100, 256},
		{"2.8 packed: non-power-of-two accepted", netFeatures.With(virtio.FRingPacked), 100, 100},
		{"2.8 packed: size 1 accepted", netFeatures.With(virtio.FRingPacked), 1, 1},
		{"2.8 packed: zero ignored", netFeatures.With(virtio.FRingPacked), 0, 256},
		{"2.8 packed: larger than maximum ignored", netFeatures.With(virtio.FRingPacked), 257, 256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newTestDevice(t, newFakeBacking(), nil)
			g := driver{t, d}
			g.setStatus(sAck | sDrv)
			g.writeFeatures(tc.features)
			g.setStatus(sAck | sDrv | sFOK)
			require.NotZero(t, g.status()&sFOK)
			g.w(OffQueueSelect, 2, 0)
			g.w(OffQueueSize, 2, tc.size)
			assert.Equal(t, tc.want, g.r(OffQueueSize, 2))
		})
	}
}

// §4.1.4.3.1: without RING_PACKED negotiated, queue_size reads 0 or a power
// of two. A size written before FEATURES_OK is judged by the split rule,
// whatever driver_feature says at that moment: the driver may still take
// RING_PACKED back before it sets FEATURES_OK.
func TestQueueSizeBeforeFeaturesOK(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	g := driver{t, d}
	g.setStatus(sAck | sDrv)
	g.writeFeatures(netFeatures.With(virtio.FRingPacked))
	g.w(OffQueueSelect, 2, 0)
	g.w(OffQueueSize, 2, 100)
	assert.EqualValues(t, 256, g.r(OffQueueSize, 2), "a packed size before FEATURES_OK is ignored")
	g.w(OffQueueSize, 2, 64)
	assert.EqualValues(t, 64, g.r(OffQueueSize, 2), "a power of two is taken")
	g.writeFeatures(netFeatures)
	g.setStatus(sAck | sDrv | sFOK)
	require.NotZero(t, g.status()&sFOK)
	assert.EqualValues(t, 64, g.r(OffQueueSize, 2), "split ring: a power of two")
}

// With RING_PACKED, queue_desc is the descriptor ring and queue_driver and
// queue_device the driver and device event suppression areas (§2.8.10,
// 4-aligned, 4 bytes): the backing device gets them as the ring addresses,
// a fresh packed queue at vring.InitialState (index 0, wrap counters 1).
func TestDriverOKProgramsBackingPacked(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	feat := netFeatures.With(virtio.FRingPacked)
	g.setStatus(sAck | sDrv)
	g.writeFeatures(feat)
	g.setStatus(sAck | sDrv | sFOK)
	for q := 0; q < 2; q++ {
		base := uint64(0x10000 * (q + 1))
		g.w(OffQueueSelect, 2, uint64(q))
		g.w(OffQueueSize, 2, 100)
		g.w(OffQueueMSIXVector, 2, uint64(q+1))
		g.w(OffQueueDesc, 8, base)
		g.w(OffQueueDriver, 8, base+0x1004) // 4-aligned: enough for an event area
		g.w(OffQueueDevice, 8, base+0x2008)
		g.w(OffQueueEnable, 2, 1)
	}
	g.setStatus(sAck | sDrv | sFOK | sDOK)
	require.Equal(t, sAck|sDrv|sFOK|sDOK, g.status(), "err: %v", d.Err())
	assert.Equal(t, feat, f.accepted)
	for q := 0; q < 2; q++ {
		base := vring.GuestAddr(0x10000 * (q + 1))
		assert.EqualValues(t, 100, f.num[q])
		assert.Equal(t, vdpa.QueueAddr{Desc: base, Avail: base + 0x1004, Used: base + 0x2008}, f.addr[q])
		assert.Equal(t, vring.QueueState{NextAvail: 0x8000, NextUsed: 0x8000}, f.base[q], "§2.8.1: wrap counters start at 1")
	}
}

func TestDriverOKProgramsBacking(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	require.Equal(t, sAck|sDrv|sFOK|sDOK, g.status(), "err: %v", d.Err())
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, f.status)
	assert.Equal(t, netFeatures, f.accepted)
	assert.NotNil(t, f.mem)
	for q := 0; q < 2; q++ {
		desc, drv, dev := ringAddrs(q, 128)
		assert.EqualValues(t, 128, f.num[q])
		assert.EqualValues(t, desc, f.addr[q].Desc)
		assert.EqualValues(t, drv, f.addr[q].Avail)
		assert.EqualValues(t, dev, f.addr[q].Used)
		assert.Equal(t, vring.QueueState{}, f.base[q])
		assert.Same(t, d.KickFD(q), f.kick[q], "guest kick eventfd handed straight to the backing device")
		assert.Same(t, d.CallFD(q), f.call[q], "backing interrupts go straight to the call eventfd")
		assert.True(t, f.enabled[q])
	}
	// The last operation sets DRIVER_OK on the backing device.
	ops := f.opsCopy()
	assert.Equal(t, "SetStatus(ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK)", ops[len(ops)-1])
}

func TestDriverOKWithVectorIrqfds(t *testing.T) {
	f := newFakeBacking()
	irq := map[uint16]*eventfdT{}
	d := newTestDevice(t, f, &Options{Vector: func(v uint16) *eventfdT {
		if irq[v] == nil {
			e := mustEventFD(t)
			irq[v] = e
		}
		return irq[v]
	}})
	g := driver{t, d}
	require.NoError(t, d.Write(RegionPCIConfig, capOffMSIX+3, 1, msixCtlEnable))
	g.bringUp(netFeatures)
	require.Zero(t, g.status()&sNR, "%v", d.Err())
	require.NotNil(t, irq[1])
	assert.Same(t, irq[1], f.call[0], "queue 0 uses vector 1's irqfd")
	assert.Same(t, irq[2], f.call[1], "queue 1 uses vector 2's irqfd")
	assert.Nil(t, d.CallFD(0))
}

// TestInterruptRoutingFollowsMSIXEnable: with Options.Vector the device
// follows the guest's MSI-X Enable bit (§4.1.5). Enabled: an interrupt goes
// to its vector, and one whose vector is NO_VECTOR goes nowhere (§4.1.5.4,
// §4.1.5.5). Disabled: every interrupt takes the line (Options.INTx) and
// sets the ISR, whatever vector the driver wrote. A guest that turns MSI-X
// off or on while the data path runs moves its queues' interrupts with it.
func TestInterruptRoutingFollowsMSIXEnable(t *testing.T) {
	setup := func(t *testing.T) (*fakeBacking, *Device, map[uint16]*eventfdT, *eventfdT) {
		f := newFakeBacking()
		irq := map[uint16]*eventfdT{}
		intx := mustEventFD(t)
		d := newTestDevice(t, f, &Options{INTx: intx, Vector: func(v uint16) *eventfdT {
			if irq[v] == nil {
				irq[v] = mustEventFD(t)
			}
			return irq[v]
		}})
		return f, d, irq, intx
	}
	calls := func(f *fakeBacking) [2]*eventfdT {
		f.mu.Lock()
		defer f.mu.Unlock()
		return [2]*eventfdT{f.call[0], f.call[1]}
	}
	signalled := func(e *eventfdT) uint64 {
		n, err := e.TryWait()
		require.NoError(t, err)
		return n
	}
	msix := func(d *Device, on bool) {
		v := uint64(0)
		if on {
			v = msixCtlEnable
		}
		require.NoError(t, d.Write(RegionPCIConfig, capOffMSIX+3, 1, v))
	}

	t.Run("enabled, then disabled while live", func(t *testing.T) {
		f, d, irq, intx := setup(t)
		g := driver{t, d}
		msix(d, true)
		g.bringUp(netFeatures)
		require.NotNil(t, irq[1])
		assert.Equal(t, [2]*eventfdT{irq[1], irq[2]}, calls(f), "each queue on its vector")
		g.w(OffQueueSelect, 2, 1)
		g.w(OffQueueMSIXVector, 2, uint64(NoVector))
		assert.Equal(t, [2]*eventfdT{irq[1], nil}, calls(f), "NO_VECTOR: no interrupt at all")
		f.setConfig(6, []byte{0, 0})
		d.ConfigChanged() // msix_config is NO_VECTOR: nothing is signalled
		assert.Zero(t, signalled(intx), "no line interrupt with MSI-X enabled")

		msix(d, false)
		assert.Equal(t, [2]*eventfdT{intx, intx}, calls(f), "MSI-X off: every queue on the line")
		f.setConfig(6, []byte{1, 0})
		d.ConfigChanged()
		assert.EqualValues(t, 1, signalled(intx), "the configuration change on the line")
		isr, err := d.Read(RegionISR, 0, 1)
		require.NoError(t, err)
		assert.EqualValues(t, ISRConfig, isr&uint64(ISRConfig))

		msix(d, true)
		assert.Equal(t, [2]*eventfdT{irq[1], nil}, calls(f), "MSI-X on again: the vectors")
		require.Zero(t, g.status()&sNR, "%v", d.Err())
	})

	t.Run("never enabled (pci=nomsi), vectors written anyway", func(t *testing.T) {
		f, d, irq, intx := setup(t)
		driver{t, d}.bringUp(netFeatures)
		assert.Equal(t, [2]*eventfdT{intx, intx}, calls(f))
		assert.Empty(t, irq, "no vector's irqfd asked for")
	})
}

func TestNotifyKicksQueueEventfd(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	require.NoError(t, d.Write(RegionNotify, 1*NotifyOffMultiplier, 2, 1))
	n, err := d.KickFD(1).TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n)
	n, err = d.KickFD(0).TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 0, n, "4.1.4.4: only the written queue's slot is notified")
	assert.ErrorIs(t, d.Write(RegionNotify, 2*NotifyOffMultiplier, 2, 2), ErrOutOfRange)
	assert.ErrorIs(t, d.Write(RegionNotify, 0, 1, 0), ErrAccessSize)
}

// A DRIVER_OK whose rings break a layout rule or lie outside guest memory
// sets NEEDS_RESET at the write, also while the migration state holds the
// data path (STOP): leaving STOP then neither starts the data path nor
// fails (judged only then, the driver's mistake would put the device in
// ERROR, which only a VFIO reset leaves).
func TestInvalidQueueLayoutSetsNeedsReset(t *testing.T) {
	for _, held := range []bool{false, true} {
		t.Run(map[bool]string{false: "RUNNING", true: "DRIVER_OK held in STOP"}[held], func(t *testing.T) {
			invalidQueueLayoutSetsNeedsReset(t, held)
		})
	}
}

func invalidQueueLayoutSetsNeedsReset(t *testing.T, held bool) {
	for _, tc := range []struct {
		name string
		off  uint64
		v    uint64
		feat virtio.Features
	}{
		{"2.7 descriptor table 16-byte aligned", OffQueueDesc, 0x10008, netFeatures},
		{"2.7 used ring 4-byte aligned", OffQueueDevice, 0x18002, netFeatures},
		{"ring outside guest memory", OffQueueDriver, 1 << 40, netFeatures},
		{"2.8.10.1 packed descriptor ring 16-byte aligned", OffQueueDesc, 0x10008, netFeatures.With(virtio.FRingPacked)},
		{"2.8.10.1 packed driver event area 4-byte aligned", OffQueueDriver, 0x10802, netFeatures.With(virtio.FRingPacked)},
		{"2.8.10.1 packed device event area 4-byte aligned", OffQueueDevice, 0x18002, netFeatures.With(virtio.FRingPacked)},
		{"packed ring outside guest memory", OffQueueDevice, 1 << 40, netFeatures.With(virtio.FRingPacked)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, nil)
			g := driver{t, d}
			if held {
				require.NoError(t, d.SetMigrationState(MigStop))
			}
			g.setStatus(sAck | sDrv)
			g.writeFeatures(tc.feat)
			g.setStatus(sAck | sDrv | sFOK)
			g.w(OffMSIXConfig, 2, 0)
			g.w(OffQueueSelect, 2, 0)
			desc, drv, dev := ringAddrs(0, 128)
			g.w(OffQueueSize, 2, 128)
			g.w(OffQueueDesc, 8, desc)
			g.w(OffQueueDriver, 8, drv)
			g.w(OffQueueDevice, 8, dev)
			g.w(tc.off, 8, tc.v)
			g.w(OffQueueEnable, 2, 1)
			g.setStatus(sAck | sDrv | sFOK | sDOK)
			assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status())
			assert.ErrorIs(t, d.Err(), ErrQueueLayout)
			notified := func() {
				t.Helper()
				n, err := d.ConfigFD().TryWait()
				require.NoError(t, err)
				assert.EqualValues(t, 1, n, "2.1.2: NEEDS_RESET raises the config interrupt")
				isr, err := d.Read(RegionISR, 0, 1)
				require.NoError(t, err)
				assert.EqualValues(t, ISRConfig, isr)
			}
			if !held {
				notified()
			} else {
				// linux/vfio.h: a device in STOP generates no
				// interrupts; the driver hears of it when the
				// device runs again.
				n, err := d.ConfigFD().TryWait()
				require.NoError(t, err)
				assert.Zero(t, n, "a config interrupt in STOP")
				isr, err := d.Read(RegionISR, 0, 1)
				require.NoError(t, err)
				assert.Zero(t, isr, "ISR changed in STOP")
				require.NoError(t, d.SetMigrationState(MigRunning))
				notified()
				assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status())
				assert.False(t, d.DataPathActive())
				f.mu.Lock()
				defer f.mu.Unlock()
				assert.Zero(t, f.status&sDOK, "backing device started")
			}
		})
	}
}

func TestBackingFailureSetsNeedsReset(t *testing.T) {
	f := newFakeBacking()
	f.failOn["SetQueueAddr(1)"] = true
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status())
	assert.ErrorIs(t, d.Err(), ErrBacking)
	assert.ErrorIs(t, d.Err(), errInjected)
	assert.EqualValues(t, 0, f.status, "backing device reset after the failed programming")

	// §2.4: writing 0 clears NEEDS_RESET, and the device works again.
	g.setStatus(0)
	assert.EqualValues(t, 0, g.status())
	delete(f.failOn, "SetQueueAddr(1)")
	g.bringUp(netFeatures)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, g.status())

	// A data-path failure reported later also sets NEEDS_RESET.
	d.BackingFailed(errInjected)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status())
	// The driver's writes do not clear NEEDS_RESET.
	g.setStatus(sAck | sDrv | sFOK | sDOK)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status())
}

func TestResetClearsEverything(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	g.w(OffMSIXConfig, 2, 0)
	g.setStatus(0)
	assert.EqualValues(t, 0, g.status())
	assert.EqualValues(t, 0, f.status, "backing device reset")
	assert.EqualValues(t, 0, d.DriverFeatures())
	assert.EqualValues(t, NoVector, g.r(OffMSIXConfig, 2))
	for q := 0; q < 2; q++ {
		g.w(OffQueueSelect, 2, uint64(q))
		assert.EqualValues(t, 256, g.r(OffQueueSize, 2))
		assert.EqualValues(t, 0, g.r(OffQueueEnable, 2))
		assert.EqualValues(t, 0, g.r(OffQueueDesc, 8))
		assert.EqualValues(t, NoVector, g.r(OffQueueMSIXVector, 2))
	}
}

func TestISRReadClears(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	f.setConfig(6, []byte{0, 0}) // link down
	d.ConfigChanged()
	v, err := d.Read(RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, ISRConfig, v, "4.1.4.5: config change sets bit 1")
	v, err = d.Read(RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, 0, v, "4.1.4.5: reading ISR clears it")
}

// TestConfigChangeSeenFirstByTheGuest: the guest reads config_generation
// after the back-end's configuration changed (link down) but before the
// back-end's ConfigChanged call arrives. The change must still be
// notified, once: the read takes it into the device's snapshot, so a
// notification left to ConfigChanged alone (which then finds nothing new)
// was lost, and a driver that reads the link status only when notified
// never learnt of it. Found by FuzzGuestAccess's helper.
func TestConfigChangeSeenFirstByTheGuest(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, &Options{HealthInterval: -1})
	g := driver{t, d}
	g.bringUp(netFeatures)
	gen0 := g.r(OffConfigGeneration, 1)
	f.setConfig(6, []byte{0, 0}) // link down
	assert.NotEqual(t, gen0, g.r(OffConfigGeneration, 1), "2.5.1: a new generation")
	d.ConfigChanged() // the back-end's report, after the guest's read
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n, "4.1.4.5: one configuration change notification")
	v, err := d.Read(RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, ISRConfig, v)
	status, err := d.Read(RegionDevice, 6, 2)
	require.NoError(t, err)
	assert.EqualValues(t, 0, status, "the driver reads the link down")

	// Before DRIVER_OK a change bumps the generation and notifies nothing.
	g.setStatus(0)
	g.setStatus(sAck)
	gen1 := g.r(OffConfigGeneration, 1)
	f.setConfig(6, []byte{1, 0})
	assert.NotEqual(t, gen1, g.r(OffConfigGeneration, 1))
	n, err = d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.Zero(t, n, "no notification before DRIVER_OK")
}

func TestConfigGenerationBumpsOnChange(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	gen0 := g.r(OffConfigGeneration, 1)
	assert.Equal(t, gen0, g.r(OffConfigGeneration, 1), "2.5.1: unchanged config, same generation")
	mac, err := d.Read(RegionDevice, 0, 4)
	require.NoError(t, err)
	assert.EqualValues(t, 0x12005452, mac)
	f.setConfig(6, []byte{0, 0})
	gen1 := g.r(OffConfigGeneration, 1)
	assert.NotEqual(t, gen0, gen1, "2.5.1: changed config, new generation")
	st, err := d.Read(RegionDevice, 6, 2)
	require.NoError(t, err)
	assert.EqualValues(t, 0, st)
	_, err = d.Read(RegionDevice, 11, 2)
	assert.ErrorIs(t, err, ErrOutOfRange)
}

// TestConfigReadsMatchTheirGeneration: §4.1.4.3.1, after the driver reads
// a configuration value that changed, the device presents a new
// config_generation. The driver's loop (read the generation, the fields,
// the generation again; retry when they differ) must never accept a torn
// configuration, also when some of its reads find a back-end operation in
// progress (d.ops held: the health watcher takes it every 50 ms), and also
// when the configuration changes back (A→B→A) between its generation
// reads.
func TestConfigReadsMatchTheirGeneration(t *testing.T) {
	busy := func(d *Device, fn func()) {
		require.True(t, d.ops.tryLock())
		defer d.ops.unlock()
		fn()
	}
	// start reads the generation, then the backing device's link goes
	// down: the configuration changed under the driver.
	start := func(t *testing.T) (*fakeBacking, *Device, driver, uint64) {
		f := newFakeBacking()
		d := newTestDevice(t, f, nil)
		g := driver{t, d}
		gen0 := g.r(OffConfigGeneration, 1)
		f.setConfig(6, []byte{0, 0})
		return f, d, g, gen0
	}
	status := func(t *testing.T, d *Device) uint64 {
		st, err := d.Read(RegionDevice, 6, 2)
		require.NoError(t, err)
		return st
	}
	t.Run("field read live, generation read during an operation", func(t *testing.T) {
		_, d, g, gen0 := start(t)
		require.EqualValues(t, 0, status(t, d), "the driver read the new status")
		busy(d, func() {
			assert.NotEqual(t, gen0, g.r(OffConfigGeneration, 1), "a value that changed was read: a new generation")
		})
	})
	t.Run("field read during an operation, generation after", func(t *testing.T) {
		_, d, g, gen0 := start(t)
		busy(d, func() {
			assert.EqualValues(t, 1, status(t, d), "during an operation: the configuration of generation gen0")
			assert.Equal(t, gen0, g.r(OffConfigGeneration, 1), "and gen0 with it")
		})
		assert.NotEqual(t, gen0, g.r(OffConfigGeneration, 1), "the change, once seen, is a new generation")
	})
	t.Run("A to B to A between the generation reads", func(t *testing.T) {
		f, d, g, gen0 := start(t)
		require.EqualValues(t, 0, status(t, d))
		f.setConfig(6, []byte{1, 0}) // back to A
		assert.NotEqual(t, gen0, g.r(OffConfigGeneration, 1), "the driver read B: its loop must go round again")
	})
}

func TestPCIConfigSpace(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	rd := func(off uint64, size int) uint64 {
		v, err := d.Read(RegionPCIConfig, off, size)
		require.NoError(t, err)
		return v
	}
	assert.EqualValues(t, 0x1af4, rd(0x00, 2), "4.1.2: vendor")
	assert.EqualValues(t, 0x1041, rd(0x02, 2), "4.1.2: device 0x1040 + virtio id 1")
	assert.EqualValues(t, 1, rd(0x08, 1), "4.1.2: revision 1 for modern devices")
	assert.EqualValues(t, 0x020000, rd(0x08, 4)>>8, "class: ethernet controller")
	assert.NotZero(t, rd(0x06, 2)&0x10, "capability list present")

	// Walk the capability list.
	type capInfo struct {
		bar         uint8
		offset, len uint32
		mult        uint32
	}
	caps := map[uint8]capInfo{}
	seen := map[uint64]bool{}
	msix := false
	for p := rd(0x34, 1); p != 0; p = rd(p+1, 1) {
		require.False(t, seen[p], "capability loop")
		seen[p] = true
		switch rd(p, 1) {
		case 0x09:
			ct := uint8(rd(p+3, 1))
			ci := capInfo{bar: uint8(rd(p+4, 1)), offset: uint32(rd(p+8, 4)), len: uint32(rd(p+12, 4))}
			if ct == CapNotifyCfg {
				ci.mult = uint32(rd(p+16, 4))
			}
			caps[ct] = ci
		case 0x11:
			msix = true
			assert.EqualValues(t, 2, rd(p+2, 2)&0x7ff, "table size N-1")
		}
	}
	assert.True(t, msix)
	require.Len(t, caps, 5)
	assert.Equal(t, capInfo{bar: 4, offset: 0, len: 0x38}, caps[CapCommonCfg])
	assert.Equal(t, capInfo{bar: 4, offset: 0x3000, len: 8, mult: 4}, caps[CapNotifyCfg])
	assert.Equal(t, capInfo{bar: 4, offset: 0x1000, len: 1}, caps[CapISRCfg])
	assert.Equal(t, capInfo{bar: 4, offset: 0x2000, len: 12}, caps[CapDeviceCfg])

	// BAR sizing: write all ones, read back the size mask.
	require.NoError(t, d.Write(RegionPCIConfig, 0x20, 4, 0xffffffff))
	assert.EqualValues(t, uint64(0xffffc00c), rd(0x20, 4), "BAR4: 16 KiB, 64-bit prefetchable")
	// Vendor and device IDs are read-only.
	require.NoError(t, d.Write(RegionPCIConfig, 0x00, 2, 0x1234))
	assert.EqualValues(t, 0x1af4, rd(0x00, 2))
}

func TestPCICfgCapabilityWindow(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	// §4.1.4.9: select BAR 4, offset of num_queues, length 2, read data.
	w := func(off uint64, size int, v uint64) { require.NoError(t, d.Write(RegionPCIConfig, off, size, v)) }
	w(capOffPCICfg+4, 1, 4)
	w(capOffPCICfg+8, 4, OffNumQueues)
	w(capOffPCICfg+12, 4, 2)
	v, err := d.Read(RegionPCIConfig, capOffPCICfg+16, 4)
	require.NoError(t, err)
	assert.EqualValues(t, 2, v)
	// Write device_status through the window.
	w(capOffPCICfg+8, 4, OffDeviceStatus)
	w(capOffPCICfg+12, 4, 1)
	w(capOffPCICfg+16, 4, uint64(sAck))
	assert.Equal(t, sAck, d.Status())
}

func TestBARMapping(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	v, err := d.ReadBAR(ModernBAR, BarOffCommon+OffNumQueues, 2)
	require.NoError(t, err)
	assert.EqualValues(t, 2, v)
	v, err = d.ReadBAR(ModernBAR, BarOffDevice+10, 2)
	require.NoError(t, err)
	assert.EqualValues(t, 1500, v)
	_, err = d.ReadBAR(ModernBAR, 0x1800, 1)
	assert.ErrorIs(t, err, ErrOutOfRange)
	require.NoError(t, d.WriteBAR(MSIXBAR, 0, 4, 0xfee00000))
	v, err = d.ReadBAR(MSIXBAR, 0, 4)
	require.NoError(t, err)
	assert.EqualValues(t, uint64(0xfee00000), v)
	assert.EqualValues(t, 1, binary.LittleEndian.Uint32(d.msix[12:]), "vector control starts masked")
}

func TestBackingNeedsResetPropagates(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	g := driver{t, d}
	g.bringUp(netFeatures)
	require.Equal(t, sAck|sDrv|sFOK|sDOK, g.status())
	f.mu.Lock()
	f.status |= sNR
	f.mu.Unlock()
	assert.Equal(t, sAck|sDrv|sFOK|sDOK|sNR, g.status(), "2.1.2: the backing device's NEEDS_RESET reaches the guest")
	assert.ErrorIs(t, d.Err(), ErrBacking)
	n, err := d.ConfigFD().TryWait()
	require.NoError(t, err)
	assert.EqualValues(t, 1, n)
}

// loggingBacking is a fake that can log (vdpa.Logger).
type loggingBacking struct {
	*fakeBacking
	log *dirty.Bitmap
}

func (l *loggingBacking) SetLog(b *dirty.Bitmap) error { l.log = b; return nil }

// trackingWithDeviceLog brings up a device on a logging backing b and
// starts dirty tracking, which must use the backing's log.
func trackingWithDeviceLog(t *testing.T, b vdpa.Device) (*Device, driver, *dirty.Bitmap) {
	t.Helper()
	d, err := NewDevice(b, &Options{Memory: testMemory(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = d.Close() })
	g := driver{t, d}
	g.bringUp(netFeatures)
	bm, err := dirty.New(1<<20, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = bm.Close() })
	mode, err := d.StartDirtyTracking(bm)
	require.NoError(t, err)
	require.Equal(t, DirtyDeviceLog, mode)
	return d, g, bm
}

func TestDeviceLogNegotiatesLogAll(t *testing.T) {
	f := &loggingBacking{fakeBacking: newFakeBacking()}
	d, _, bm := trackingWithDeviceLog(t, f)
	assert.False(t, d.OfferedFeatures().Has(virtio.FLogAll), "LOG_ALL is not a virtio feature")
	assert.Same(t, bm, f.log)
	assert.Equal(t, netFeatures.With(virtio.FLogAll), f.accepted, "vhost logs only with LOG_ALL negotiated")
	require.NoError(t, d.StopDirtyTracking())
	assert.Nil(t, f.log)
	assert.Equal(t, netFeatures, f.accepted)
}

// An access lies within its region (§4.1.4: the capability's length bounds
// the structure; the PCI configuration space is 256 bytes) whatever its
// offset. The offset is the VMM's 64-bit value, and one just below 2^64
// makes offset+size wrap around: found by FuzzGuestAccess, such an access
// passed the bounds check and panicked indexing the register image, with
// the device's locks held.
func TestAccessOffsetWrapsAround(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	for _, tc := range []struct {
		name   string
		region Region
		size   int
	}{
		{"4.1.4.3 common configuration", RegionCommon, 1},
		{"4.1.4.3 common configuration, 64-bit field", RegionCommon, 8},
		{"4.1.4.4 notification area", RegionNotify, 2},
		{"4.1.4.5 ISR", RegionISR, 1},
		{"4.1.4.6 device configuration", RegionDevice, 4},
		{"PCI configuration space", RegionPCIConfig, 2},
		{"MSI-X table and PBA", RegionMSIX, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Offsets from 2^64-size (aligned: the access ends exactly at
			// 2^64) to 2^64-1. A misaligned one may be refused for its
			// alignment first.
			for back := 1; back <= tc.size; back++ {
				off := -uint64(back)
				_, rerr := d.Read(tc.region, off, tc.size)
				werr := d.Write(tc.region, off, tc.size, 0)
				if back == tc.size {
					assert.ErrorIs(t, rerr, ErrOutOfRange, "read at %#x", off)
					assert.ErrorIs(t, werr, ErrOutOfRange, "write at %#x", off)
					continue
				}
				assert.True(t, errorsIsAny(rerr, ErrOutOfRange, ErrAccessSize), "read at %#x: %v", off, rerr)
				assert.True(t, errorsIsAny(werr, ErrOutOfRange, ErrAccessSize), "write at %#x: %v", off, werr)
			}
		})
	}
	// The device still works.
	driver{t, d}.bringUp(netFeatures)
	assert.Equal(t, sAck|sDrv|sFOK|sDOK, d.Status())
}

// A vCPU may still trap into the device while the VMM tears it down. After
// Close, which reset the back-end and released the eventfds, no access may
// reach the back-end (a driver's §3.1.1 sequence would otherwise set it
// running again, with nothing left to stop it): every access fails with
// ErrClosed. Found by FuzzGuestAccess.
func TestAccessAfterClose(t *testing.T) {
	f := newFakeBacking()
	d := newTestDevice(t, f, nil)
	driver{t, d}.bringUp(netFeatures)
	require.NoError(t, d.Close())
	ops := len(f.opsCopy())
	for _, tc := range []struct {
		name   string
		access func() error
	}{
		{"3.1.1 ACKNOWLEDGE", func() error { return d.Write(RegionCommon, OffDeviceStatus, 1, uint64(sAck)) }},
		{"3.1.1 DRIVER_OK", func() error { return d.Write(RegionCommon, OffDeviceStatus, 1, uint64(sAck|sDrv|sFOK|sDOK)) }},
		{"4.1.4.3 queue_select", func() error { return d.Write(RegionCommon, OffQueueSelect, 2, 1) }},
		{"4.1.4.3 device_status read", func() error { _, err := d.Read(RegionCommon, OffDeviceStatus, 1); return err }},
		{"4.1.4.4 notification", func() error { return d.Write(RegionNotify, 0, 2, 0) }},
		{"4.1.4.6 device configuration read", func() error { _, err := d.Read(RegionDevice, 0, 4); return err }},
		{"4.1.4.6 device configuration write", func() error { return d.Write(RegionDevice, 0, 1, 0) }},
		{"4.1.4.9 PCI_CFG window", func() error { return d.Write(RegionPCIConfig, capOffPCICfg+16, 4, 0) }},
		{"BAR 4 device_status", func() error { return d.WriteBAR(ModernBAR, BarOffCommon+OffDeviceStatus, 1, uint64(sAck)) }},
		{"BAR 1 MSI-X table", func() error { _, err := d.ReadBAR(MSIXBAR, 0, 4); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.access()
			require.ErrorIs(t, err, ErrClosed)
			var ae *AccessError
			assert.ErrorAs(t, err, &ae)
		})
	}
	assert.Len(t, f.opsCopy(), ops, "the back-end was called after Close")
	assert.Zero(t, f.status, "the back-end stays reset")
}

// busyLogBacking logs, and refuses to let go of its log (vdpa.ErrQueueBusy)
// until a reset, as vdpa.Local does after a queue failed to stop.
type busyLogBacking struct {
	*fakeBacking
	log   *dirty.Bitmap
	stuck bool
}

func (b *busyLogBacking) SetLog(l *dirty.Bitmap) error {
	b.mu.Lock()
	stuck := b.stuck
	b.mu.Unlock()
	if stuck {
		return fmt.Errorf("%w: a queue failed to stop", vdpa.ErrQueueBusy)
	}
	b.log = l
	return nil
}

func (b *busyLogBacking) SetStatus(s virtio.Status) error {
	if s == 0 {
		b.mu.Lock()
		b.stuck = false
		b.mu.Unlock()
	}
	return b.fakeBacking.SetStatus(s)
}

// Stopping dirty tracking must leave the backing without the log, since
// the caller may close it when StopDirtyTracking returns, even when a
// backing queue fails to stop: the renegotiation without LOG_ALL fails,
// the backing keeps the log until a reset, and the device resets it to
// release the log. The guest is told (DEVICE_NEEDS_RESET).
func TestStopDirtyTrackingReleasesALogTheBackingHolds(t *testing.T) {
	f := &busyLogBacking{fakeBacking: newFakeBacking()}
	d, g, bm := trackingWithDeviceLog(t, f)
	require.Same(t, bm, f.log)

	f.mu.Lock()
	f.stuck = true // a queue failed to stop: the log stays until a reset
	f.failOn = map[string]bool{"Suspend": true}
	f.mu.Unlock()
	err := d.StopDirtyTracking()
	assert.ErrorIs(t, err, errInjected, "the failed stop is reported")
	assert.Nil(t, f.log, "the backing no longer holds the log")
	assert.NotZero(t, g.status()&sNR, "DEVICE_NEEDS_RESET")
	assert.Equal(t, DirtyAuto, d.DirtyTracking())
	ops := f.opsCopy()
	assert.Equal(t, "SetStatus(RESET)", ops[len(ops)-1], "the backing was reset to release the log: %v", ops)
}

// TestPCIStatusInterruptBit: §4.1.4.5.1, with MSI-X disabled the device sets
// the Interrupt Status bit of the PCI Status register to the OR of the ISR
// status bits; reading the ISR clears both. With MSI-X enabled the ISR is
// no interrupt source and the bit stays clear.
func TestPCIStatusInterruptBit(t *testing.T) {
	d := newTestDevice(t, newFakeBacking(), nil)
	status := func() uint64 {
		v, err := d.Read(RegionPCIConfig, 0x06, 2)
		require.NoError(t, err)
		return v
	}
	assert.EqualValues(t, 0x0010, status(), "capabilities list, no interrupt")
	d.RaiseISR(ISRConfig)
	assert.EqualValues(t, 0x0018, status(), "ISR set: Interrupt Status")
	cmdStatus, err := d.Read(RegionPCIConfig, 0x04, 4)
	require.NoError(t, err)
	assert.EqualValues(t, 0x0018, cmdStatus>>16, "the same through a 32-bit read of command and status")
	isr, err := d.Read(RegionISR, 0, 1)
	require.NoError(t, err)
	assert.EqualValues(t, ISRConfig, isr)
	assert.EqualValues(t, 0x0010, status(), "reading the ISR clears it")

	require.NoError(t, d.Write(RegionPCIConfig, capOffMSIX+3, 1, 0x80)) // MSI-X Enable
	d.RaiseISR(ISRQueue)
	assert.EqualValues(t, 0x0010, status(), "MSI-X enabled: the ISR raises no line")
}

// TestMigratedConfigKeepsItsGeneration: the destination answers, under the
// source's config_generation, the configuration the source had under it
// (LoadState refuses a destination whose configuration differs then); a
// change after the load (here its link goes down before it resumes) is a
// new generation once it runs, as any change is (§4.1.4.3.1).
func TestMigratedConfigKeepsItsGeneration(t *testing.T) {
	src := newTestDevice(t, newFakeBacking(), nil)
	g := driver{t, src}
	gen0 := g.r(OffConfigGeneration, 1)
	for _, s := range []MigState{MigStop, MigStopCopy} {
		require.NoError(t, src.SetMigrationState(s))
	}
	b, err := src.SaveState()
	require.NoError(t, err)

	fd := newFakeBacking()
	dst := newTestDevice(t, fd, nil)
	require.NoError(t, dst.SetMigrationState(MigStop))
	require.NoError(t, dst.SetMigrationState(MigResuming))
	require.NoError(t, dst.LoadState(b))
	fd.setConfig(6, []byte{0, 0}) // the destination's link goes down
	require.NoError(t, dst.SetMigrationState(MigStop))
	h := driver{t, dst}
	assert.Equal(t, gen0, h.r(OffConfigGeneration, 1), "stopped: the source's generation")
	st, err := dst.Read(RegionDevice, 6, 2)
	require.NoError(t, err)
	assert.EqualValues(t, 1, st, "and the source's configuration with it")
	require.NoError(t, dst.SetMigrationState(MigRunning))
	assert.NotEqual(t, gen0, h.r(OffConfigGeneration, 1), "running: its own configuration differs, a new generation")
	st, err = dst.Read(RegionDevice, 6, 2)
	require.NoError(t, err)
	assert.EqualValues(t, 0, st)
}
