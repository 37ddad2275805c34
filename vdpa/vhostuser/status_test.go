package vhostuser

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
	"github.com/vdpakit/vdpakit/virtio"
)

// TestBackendSetStatusZeroHoldsRingsUntilDriverOK: SET_STATUS 0 (QEMU's
// stop) suspends the device, and a virtio device must not use its rings
// before the driver sets DRIVER_OK again. So no ring starts on
// SET_VRING_ENABLE 1, on a kick or on a status without DRIVER_OK; the
// SET_STATUS with DRIVER_OK that ends QEMU's cont (and DPDK's start)
// starts them, from the position they stopped at. A ring suspended by
// SET_VRING_ENABLE 0 alone is not held: SET_VRING_ENABLE 1 resumes it.
func TestBackendSetStatusZeroHoldsRingsUntilDriverOK(t *testing.T) {
	const before = 3 // chains served before the stop
	driverOK := virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK
	statusZero := func(c *lcConn) { c.send(ReqSetStatus, putU64(0)) }
	enable := func(on uint32) func(c *lcConn) {
		return func(c *lcConn) { c.send(ReqSetVringEnable, VringState{Index: lcQueue, Num: on}.Encode()) }
	}
	tests := []struct {
		name    string
		stop    func(c *lcConn)
		resume  func(c *lcConn) // what the front-end sends next, before any DRIVER_OK
		resumed bool            // the ring runs again after resume alone
	}{
		{"SET_STATUS 0, then SET_VRING_ENABLE 1", statusZero, enable(1), false},
		{"SET_STATUS 0, then a status without DRIVER_OK", statusZero, func(c *lcConn) {
			c.send(ReqSetStatus, putU64(uint64(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK)))
			enable(1)(c)
		}, false},
		{"SET_STATUS 0, GET_VRING_BASE, ring set up and kicked again (QEMU's cont)", func(c *lcConn) {
			statusZero(c)
			require.Equal(c.t, uint16(before), c.base())
		}, func(c *lcConn) {
			enable(1)(c)
			c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
			c.send(ReqSetStatus, putU64(uint64(virtio.StatusFeaturesOK)))
			c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
			c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: before}.Encode())
			c.send(ReqSetVringAddr, VringAddr{Index: lcQueue, Desc: rawUA, Avail: rawUA + 0x1000, Used: rawUA + 0x2000}.Encode())
			c.send(ReqSetVringKick, putU64(lcQueue), c.g.kick.Fd())
			c.send(ReqSetVringCall, putU64(lcQueue|VringNoFd))
		}, false},
		{"SET_VRING_ENABLE 0, then SET_VRING_ENABLE 1", enable(0), enable(1), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, c := runningLC(t, before)
			tc.stop(c)
			require.Equal(t, 0, c.running(), "stopped")
			tc.resume(c)
			if !tc.resumed {
				require.Equal(t, 0, c.running(), "a ring of a device whose status was set to 0 ran before DRIVER_OK")
				c.send(ReqSetStatus, putU64(uint64(driverOK)))
			}
			require.Equal(t, 1, c.running(), "the ring runs again")
			g.traffic(2)
			assert.Equal(t, uint16(before+2), g.usedIdx(), "from the position it stopped at")
		})
	}
}

// TestBackendSetConfigFlags: "The vhost-user back-end must check the flags
// field" of SET_CONFIG: 0 (a front-end write of writable fields) and 1
// (live migration) are the defined values; anything else is refused with
// ErrProtocol (a failure status with REPLY_ACK) and the session ends.
func TestBackendSetConfigFlags(t *testing.T) {
	tests := []struct {
		flags uint32
		want  error
	}{
		{ConfigFlagWritable, nil},
		{ConfigFlagMigration, nil},
		{2, ErrProtocol},
		{0x80000000, ErrProtocol},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("flags %#x", tc.flags), func(t *testing.T) {
			before := openFdSet(t)
			h := vhostusertest.New(vhostusertest.Sink, [6]byte{})
			a, b := socketpair(t)
			done := make(chan error, 1)
			go func() { done <- NewBackend(h, nil).ServeConn(context.Background(), b) }()
			c := newConn(a)
			require.NoError(t, c.write(Header{Request: ReqSetOwner, Flags: Version}, nil, nil))
			pf := ProtocolFeatures(0).With(PFReplyAck, PFConfig)
			require.NoError(t, c.write(Header{Request: ReqSetProtocolFeatures, Flags: Version}, u64p(uint64(pf)), nil))
			p := Config{Offset: virtio.NetCfgStatus, Flags: tc.flags, Data: make([]byte, 2)}.Encode()
			require.NoError(t, c.write(Header{Request: ReqSetConfig, Flags: Version | FlagNeedReply}, p, nil))
			r, err := c.read()
			require.NoError(t, err)
			assert.Equal(t, ReqSetConfig, r.Request)
			require.Len(t, r.Payload, u64Size)
			status := binary.NativeEndian.Uint64(r.Payload)
			if tc.want == nil {
				assert.Zero(t, status, "accepted")
				require.NoError(t, a.CloseWrite())
				select {
				case err = <-done:
					require.NoError(t, err, "the session goes on until the front-end hangs up")
				case <-time.After(10 * time.Second):
					t.Fatal("back-end did not end the session after the front-end hung up")
				}
			} else {
				assert.NotZero(t, status, "refused")
				select {
				case err = <-done:
				case <-time.After(10 * time.Second):
					t.Fatal("back-end did not end the session")
				}
				assert.ErrorIs(t, err, tc.want)
				_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, rerr := io.ReadAll(a)
				assert.NoError(t, rerr)
			}
			require.NoError(t, a.Close())
			_ = b.Close()
			assert.Empty(t, leakedSince(t, before), "descriptors leaked")
		})
	}
}
