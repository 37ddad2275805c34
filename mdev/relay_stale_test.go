package mdev

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// A relay run that fails reports the failure from a goroutine of its own,
// which may get the device lock only after the device was reset, closed or
// brought up again with a new relay run. That report is stale: it must not
// mark the device NEEDS_RESET.
func TestRelayStaleFailureReportDropped(t *testing.T) {
	for _, tc := range []struct {
		name string
		// after runs with d.mu held, after the relay run failed and
		// before its report can be delivered.
		after func(t *testing.T, d *Device)
		// then runs once the report was delivered (or dropped).
		then func(t *testing.T, d *Device)
	}{
		{"reset", func(t *testing.T, d *Device) { d.setStatus(0) }, func(t *testing.T, d *Device) {
			assert.Zero(t, d.Status())
			assert.NoError(t, d.Err())
		}},
		{"reset and new driver session", func(t *testing.T, d *Device) { d.setStatus(0) }, func(t *testing.T, d *Device) {
			_, drv, _ := ringAddrs(1, 128)
			require.NoError(t, d.opts.Memory.Write(vring.GuestAddr(drv+2), []byte{0, 0}))
			driver{t, d}.bringUp(netFeatures)
			assert.Equal(t, sAck|sDrv|sFOK|sDOK, d.Status())
			assert.NoError(t, d.Err())
		}},
		{"close", func(t *testing.T, d *Device) {
			// Close's work without letting go of d.mu: releasing it
			// here would let the report in before the close, where it
			// is not stale (and correctly sets NEEDS_RESET).
			require.NoError(t, d.closeLocked())
		}, func(t *testing.T, d *Device) {
			assert.Zero(t, d.Status()&virtio.StatusDeviceNeedsReset)
			assert.NoError(t, d.Err())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeBacking()
			d := newTestDevice(t, f, &Options{DirtyMode: DirtyRelay})
			driver{t, d}.bringUp(netFeatures)
			log, err := dirty.New(1<<20, nil)
			require.NoError(t, err)
			t.Cleanup(func() { _ = d.Close(); _ = log.Close() })
			mode, err := d.StartDirtyTracking(log)
			require.NoError(t, err)
			require.Equal(t, DirtyRelay, mode)

			d.mu.Lock()
			run := d.relay.run
			// transmitq's avail.idx jumps by more than the queue size.
			_, drv, _ := ringAddrs(1, 128)
			var b [2]byte
			binary.LittleEndian.PutUint16(b[:], 0x4000)
			require.NoError(t, d.opts.Memory.Write(vring.GuestAddr(drv+2), b[:]))
			require.NoError(t, d.kicks[1].Signal())
			deadline := time.Now().Add(10 * time.Second)
			for run.failed.Load() == nil {
				if time.Now().After(deadline) {
					d.mu.Unlock()
					t.Fatal("relay did not fail")
				}
				time.Sleep(100 * time.Microsecond)
			}
			assert.ErrorIs(t, *run.failed.Load(), vring.ErrAvailIdxJump)
			tc.after(t, d)
			d.mu.Unlock()
			waitRelayReport(t, run)
			tc.then(t, d)
		})
	}
}

func waitRelayReport(t *testing.T, run *relayRun) {
	t.Helper()
	select {
	case <-run.reported:
	case <-time.After(10 * time.Second):
		t.Fatal("the relay's failure report never ran")
	}
}
