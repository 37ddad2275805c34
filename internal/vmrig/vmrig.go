// Package vmrig holds the test rigs vdpakit's in-VM tests share: kernel
// vDPA devices to test against (a vdpa_sim_net device, a VDUSE device
// served by a Go handler), iproute2's view of them (`vdpa -j`), and the
// driver side of a virtio-net device's receive and transmit rings in guest
// memory.
//
// It is for tests only. Every helper takes the test's testing.TB, fails it
// on error and undoes what it set up when the test ends. Helpers that
// change kernel state run only inside the real-kernel harness
// (vmtest/run.sh): elsewhere they skip the test, through internal/testenv.
package vmrig

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/vduse"
)

// AddSimNet adds a vdpa_sim_net device called name (`vdpa dev add name
// NAME mgmtdev vdpasim_net ARGS...`, deleted when the test ends) and
// returns its /dev/vhost-vdpa-N. It runs only inside the harness and
// requires root and the vhost_vdpa and vdpa_sim_net modules.
func AddSimNet(t testing.TB, name string, args ...string) string {
	t.Helper()
	testenv.RequireVM(t)
	testenv.RequireRoot(t)
	testenv.RequireModule(t, "vhost_vdpa")
	testenv.RequireModule(t, "vdpa_sim_net")
	testenv.AddVDPA(t, name, "vdpasim_net", args...)
	return testenv.VhostVDPAPath(t, name)
}

// ServeVDUSE creates a VDUSE device called name for h, serves it until the
// test ends, and adds it to the vDPA bus (where it binds to vhost_vdpa).
// When the test ends the vDPA device is deleted first, then serving stops
// and the VDUSE device is destroyed. The caller checks the requirements
// (root, the vduse module, /dev/vduse/control).
func ServeVDUSE(t testing.TB, name string, h vdpa.Handler) *vduse.Device {
	t.Helper()
	vd, err := vduse.CreateContext(t.Context(), h, &vduse.Options{Name: name, Logf: t.Logf})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- vd.Serve(ctx) }()
	t.Cleanup(func() {
		// Runs after AddVDPA's cleanup (LIFO) deleted the vDPA device.
		cancel()
		<-done
		assert.NoError(t, vd.Close())
	})
	testenv.AddVDPA(t, name, "vduse")
	return vd
}

// NewEventFD returns an eventfd closed when the test ends.
func NewEventFD(t testing.TB) *vdpa.EventFD {
	t.Helper()
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	t.Cleanup(func() { e.Close() })
	return e
}
