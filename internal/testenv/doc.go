// Package testenv gates tests on the environment they run in.
//
// vdpakit's privileged tests need things an ordinary development machine or CI
// container does not have: root, the vhost/vDPA kernel modules, character
// devices such as /dev/vhost-vdpa-0, /dev/vhost-net or /dev/vduse/control.
// On such a machine those tests skip with a clear reason, so that a plain
// `go test ./...` runs anywhere.
//
// The real-kernel harness (vmtest/run.sh) boots a Debian kernel under QEMU with
// all of these present and runs the test binaries there with the environment
// variable VDPAKIT_VMTEST=1. Inside the harness nothing may skip: every
// requirement helper in this package calls t.Fatal instead of t.Skip when
// InVM reports true, so a missing module or device is a test failure rather
// than a silently passing run.
//
// Typical use:
//
//	func TestProbe(t *testing.T) {
//		testenv.RequireRoot(t)
//		testenv.RequireFile(t, "/dev/vhost-vdpa-0")
//		...
//	}
//
// Tests that only make sense inside the harness (because they create or
// destroy kernel devices) use RequireVM, which skips outside the VM and
// is a no-op inside it.
package testenv
