package vfiouser_test

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
)

// kickMessage is a posted REGION_WRITE of the 16-bit queue index to queue
// q's slot in the notification area, as QEMU forwards a guest doorbell.
func kickMessage(q int) []byte {
	p := make([]byte, vfiouser.RegionAccessSize+2)
	vfiouser.RegionAccess{Offset: mdev.BarOffNotify + uint64(q*mdev.NotifyOffMultiplier), Region: mdev.ModernBAR, Count: 2}.Put(p)
	p[vfiouser.RegionAccessSize] = byte(q)
	return vfiousertest.Message(7, vfiouser.CmdRegionWrite, vfiouser.FlagNoReply, p)
}

// TestKickAllocatesNothing: a doorbell forwarded as a posted region write
// costs the server no allocation (the process' malloc count, client
// included, grows by less than one per 100 kicks).
func TestKickAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on synchronization")
	}
	r := newRig(t, nil)
	c := r.dial(t)
	ctx := testCtx(t)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	defer d.Close()
	msg := kickMessage(1)
	conn := c.Conn()
	const n = 2000
	for i := 0; i < 100; i++ { // warm up
		_, err := conn.Write(msg)
		require.NoError(t, err)
	}
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 0; i < n; i++ {
		if _, err := conn.Write(msg); err != nil {
			t.Fatal(err)
		}
	}
	_, err = c.DeviceInfo(ctx) // a round trip: every kick has been handled
	require.NoError(t, err)
	runtime.ReadMemStats(&after)
	allocs := after.Mallocs - before.Mallocs
	t.Logf("%d mallocs for %d kicks", allocs, n)
	require.Less(t, allocs, uint64(n/100))
}

// BenchmarkKick measures one guest notification on the vfio-user path: a
// posted REGION_WRITE to the notify area, decoded by the server and turned
// into a signal of the backing device's kick eventfd.
func BenchmarkKick(b *testing.B) {
	r := newRigB(b)
	c := r.dialB(b)
	ctx := b.Context()
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	msg := kickMessage(1)
	conn := c.Conn()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := conn.Write(msg); err != nil {
			b.Fatal(err)
		}
		if i%64 == 63 {
			if _, err := c.DeviceInfo(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	if _, err := c.DeviceInfo(ctx); err != nil {
		b.Fatal(err)
	}
}
