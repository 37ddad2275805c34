package vhostuser

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/virtio"
)

// TestLifecycleResetDeviceResetsRingsAndFeatures: RESET_DEVICE must
// "disable all rings and reset all internal device state to the initial
// state". A ring configured and kicked again after the reset stays
// stopped until it is enabled again (SET_VRING_ENABLE 1, or a SET_FEATURES
// without PROTOCOL_FEATURES, which enables every ring), and the features
// negotiated before the reset are gone: a ring does not start on them.
func TestLifecycleResetDeviceResetsRingsAndFeatures(t *testing.T) {
	const before = 3 // chains served before the reset
	enable := func(c *lcConn) { c.send(ReqSetVringEnable, VringState{Index: lcQueue, Num: 1}.Encode()) }
	tests := []struct {
		name   string
		after  func(c *lcConn) // sent after RESET_DEVICE, before the ring's configuration and kick
		atKick bool            // the ring starts at the kick
		then   func(c *lcConn) // what starts it otherwise
	}{
		{"SET_FEATURES with PROTOCOL_FEATURES: disabled until SET_VRING_ENABLE 1",
			func(c *lcConn) { c.send(ReqSetFeatures, putU64(uint64(lcFeatures))) }, false, enable},
		{"no SET_FEATURES since the reset: the ring waits for the features",
			enable, false, func(c *lcConn) {
				c.send(ReqSetFeatures, putU64(uint64(lcFeatures)))
				c.send(ReqSetVringKick, putU64(lcQueue), c.g.kick.Fd())
			}},
		{"SET_FEATURES without PROTOCOL_FEATURES enables every ring",
			func(c *lcConn) { c.send(ReqSetFeatures, putU64(uint64(lcFeatures&^virtio.FProtocolFeat.Bit()))) }, true, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g, c := runningLC(t, before)
			c.send(ReqResetDevice, nil)
			assert.Equal(t, 0, c.running(), "the reset stops the ring")
			assert.Zero(t, c.be.Info().Features, "the reset forgets the features")

			tc.after(c)
			c.send(ReqSetVringNum, VringState{Index: lcQueue, Num: lcSize}.Encode())
			c.send(ReqSetVringBase, VringState{Index: lcQueue, Num: before}.Encode())
			c.send(ReqSetVringAddr, VringAddr{Index: lcQueue, Desc: rawUA, Avail: rawUA + 0x1000, Used: rawUA + 0x2000}.Encode())
			c.send(ReqSetVringCall, putU64(lcQueue|VringNoFd))
			c.send(ReqSetVringKick, putU64(lcQueue), g.kick.Fd())
			if !tc.atKick {
				require.Equal(t, 0, c.running(), "the kick starts a ring the reset disabled")
				tc.then(c)
			}
			require.Equal(t, 1, c.running(), "the ring starts")
			assert.Equal(t, lcFeatures.Has(virtio.FVersion1), c.be.Info().Features.Has(virtio.FVersion1))
			g.traffic(2)
			assert.Equal(t, uint16(before+2), g.usedIdx())
			select {
			case err := <-c.done:
				t.Fatalf("session ended: %v", err)
			default:
			}
		})
	}
}
