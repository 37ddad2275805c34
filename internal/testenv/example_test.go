package testenv_test

import (
	"testing"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// A kernel test states what it needs. On a developer's machine it skips with
// the reason; inside vmtest/run.sh (VDPAKIT_VMTEST=1) a missing piece fails
// it instead.
func ExampleRequireFile() {
	test := func(t *testing.T) {
		testenv.RequireRoot(t)
		testenv.RequireModule(t, "vhost_net")
		testenv.RequireFile(t, "/dev/vhost-net")
		// ... open /dev/vhost-net and assert on what the kernel did.
	}
	_ = test
}

// Tests that add, bind or delete kernel vDPA devices run only in the harness.
// AddVDPA and BindVDPA undo their work when the test ends.
func ExampleBindVDPA() {
	test := func(t *testing.T) {
		testenv.AddVDPA(t, "vdpa0", "vdpasim_net", "mac", "02:00:00:00:00:01")
		node := testenv.VhostVDPAPath(t, "vdpa0") // bound to vhost_vdpa on creation
		_ = node
		testenv.BindVDPA(t, "vdpa0", testenv.DriverVirtioVDPA) // now the kernel's virtio_net drives it
	}
	_ = test
}
