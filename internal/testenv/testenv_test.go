package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recorder is a testing.TB whose Skipf and Fatalf record the outcome instead
// of stopping the goroutine, so the helpers' decisions can be asserted.
// Everything else is forwarded to the real test.
type recorder struct {
	testing.TB
	skipped bool
	failed  bool
	msg     string
}

func (r *recorder) Skipf(format string, args ...any) {
	r.skipped = true
	r.msg = fmt.Sprintf(format, args...)
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = true
	r.msg = fmt.Sprintf(format, args...)
}

func TestInVMOnlyForExactlyOne(t *testing.T) {
	for _, tc := range []struct {
		value string
		want  bool
	}{
		{"1", true},
		{"", false},
		{"0", false},
		{"true", false},
		{" 1", false},
	} {
		t.Run(fmt.Sprintf("%q", tc.value), func(t *testing.T) {
			t.Setenv(EnvVar, tc.value)
			assert.Equal(t, tc.want, InVM())
		})
	}
}

func TestRequireSkipsOutsideAndFailsInsideTheVM(t *testing.T) {
	for _, tc := range []struct {
		name        string
		env         string
		ok          bool
		wantSkipped bool
		wantFailed  bool
	}{
		{"satisfied outside the VM does nothing", "", true, false, false},
		{"satisfied inside the VM does nothing", "1", true, false, false},
		{"unsatisfied outside the VM skips", "", false, true, false},
		{"unsatisfied inside the VM fails", "1", false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvVar, tc.env)
			r := &recorder{TB: t}
			Require(r, tc.ok, "needs a unicorn")
			assert.Equal(t, tc.wantSkipped, r.skipped, "skipped")
			assert.Equal(t, tc.wantFailed, r.failed, "failed")
			if tc.ok {
				assert.Empty(t, r.msg)
				return
			}
			assert.Contains(t, r.msg, "needs a unicorn")
			if tc.wantFailed {
				assert.Contains(t, r.msg, "nothing may skip")
			} else {
				assert.Contains(t, r.msg, "vmtest/run.sh")
			}
		})
	}
}

func TestRequireVM(t *testing.T) {
	t.Setenv(EnvVar, "")
	r := &recorder{TB: t}
	RequireVM(r)
	assert.True(t, r.skipped, "outside the VM RequireVM skips")
	assert.False(t, r.failed)

	t.Setenv(EnvVar, "1")
	r = &recorder{TB: t}
	RequireVM(r)
	assert.False(t, r.skipped, "inside the VM RequireVM does nothing")
	assert.False(t, r.failed)
}

func TestRequireFile(t *testing.T) {
	dir := t.TempDir()
	present := filepath.Join(dir, "present")
	require.NoError(t, os.WriteFile(present, nil, 0o600))
	missing := filepath.Join(dir, "missing")

	for _, env := range []string{"", "1"} {
		t.Run("env="+env, func(t *testing.T) {
			t.Setenv(EnvVar, env)

			r := &recorder{TB: t}
			RequireFile(r, present)
			assert.False(t, r.skipped || r.failed, "an existing file satisfies RequireFile")

			r = &recorder{TB: t}
			RequireFile(r, dir)
			assert.False(t, r.skipped || r.failed, "an existing directory satisfies RequireFile")

			r = &recorder{TB: t}
			RequireFile(r, missing)
			assert.Equal(t, env == "", r.skipped)
			assert.Equal(t, env == "1", r.failed)
			assert.Contains(t, r.msg, missing)
			assert.Contains(t, r.msg, "does not exist")
		})
	}
}

func TestRequireRootMatchesEUID(t *testing.T) {
	t.Setenv(EnvVar, "")
	r := &recorder{TB: t}
	RequireRoot(r)
	if os.Geteuid() == 0 {
		assert.False(t, r.skipped || r.failed, "root satisfies RequireRoot")
	} else {
		assert.True(t, r.skipped, "non-root skips outside the VM")
		assert.Contains(t, r.msg, "needs root")
	}
}

func TestRequireModuleLooksInSysModule(t *testing.T) {
	t.Setenv(EnvVar, "")
	r := &recorder{TB: t}
	RequireModule(r, "vdpakit_no_such_module")
	assert.True(t, r.skipped)
	assert.Contains(t, r.msg, "/sys/module/vdpakit_no_such_module")
}

// TestQEMUInteropGate: the QEMU interop tests run only when asked for
// (VDPAKIT_QEMU=1); otherwise they skip, saying how to run them and what is
// missing, even where every peer is present (a machine that ran .ci/run has
// QEMU and the guest kernel cached, and the default go test ./... must stay
// a matter of minutes there).
func TestQEMUInteropGate(t *testing.T) {
	for _, tc := range []struct {
		name         string
		vm, env      string
		missing      []string
		wantRequired bool
		wantSkipped  bool
		wantInMsg    string
	}{
		{"VDPAKIT_QEMU=1 must run even with peers missing", "", "1", []string{"QEMU"}, true, false, ""},
		{"VDPAKIT_QEMU=1 with everything present runs", "", "1", nil, true, false, ""},
		{"VDPAKIT_QEMU=0 skips with everything present", "", "0", nil, false, true, "VDPAKIT_QEMU=1 runs it"},
		{"unset with everything present skips: slow", "", "", nil, false, true, "VDPAKIT_QEMU=1 runs it"},
		{"unset with a peer missing skips and names it", "", "", []string{"the guest kernel"}, false, true, "needs the guest kernel"},
		{"inside the harness VM it always skips", "1", "1", nil, false, true, "not inside the real-kernel harness"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvVar, tc.vm)
			t.Setenv(QEMUEnvVar, tc.env)
			r := &recorder{TB: t}
			got := QEMUInterop(r, tc.missing)
			assert.Equal(t, tc.wantRequired, got, "required")
			assert.Equal(t, tc.wantSkipped, r.skipped, "skipped: %s", r.msg)
			assert.False(t, r.failed)
			assert.Contains(t, r.msg, tc.wantInMsg)
		})
	}
}
