//go:build linux

package vduse_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/vdpa/vduse"
)

func TestAvailableSaysWhy(t *testing.T) {
	err := vduse.Available(&vduse.Options{ControlPath: filepath.Join(t.TempDir(), "control")})
	assert.ErrorIs(t, err, vduse.ErrUnavailable)
	assert.Contains(t, err.Error(), "vduse module")
}

func TestCreateRefusesUnservableNetDevice(t *testing.T) {
	// Checked before any kernel call, so this runs anywhere.
	tests := []struct {
		name string
		opts softnet.Options
	}{
		{"VDUSE net devices need ACCESS_PLATFORM", softnet.Options{NoCtrlVQ: true}},
		{"VDUSE net devices may not have a control queue", softnet.Options{AccessPlatform: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dev, err := softnet.New(&tt.opts)
			require.NoError(t, err)
			_, err = vduse.Create(dev, &vduse.Options{Name: "x", ControlPath: filepath.Join(t.TempDir(), "control")})
			assert.ErrorIs(t, err, vduse.ErrHandler)
		})
	}
}

func TestCreateContextEndedDoesNothing(t *testing.T) {
	dev, err := softnet.New(&softnet.Options{NoCtrlVQ: true, AccessPlatform: true})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// A control path that exists nowhere: an attempt to use it would
	// fail with ErrUnavailable instead.
	_, err = vduse.CreateContext(ctx, dev, &vduse.Options{Name: "x", ControlPath: filepath.Join(t.TempDir(), "control")})
	require.ErrorIs(t, err, context.Canceled)
	assert.NotErrorIs(t, err, vduse.ErrUnavailable)
}
