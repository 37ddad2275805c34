package main

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
)

// On any machine the probe either reports that there is no vDPA, or lists
// what the kernel has; it never fails for lack of vDPA.
func TestProbeRunsAnywhere(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, probe(context.Background(), &out, false))
	s := out.String()
	if strings.HasPrefix(s, "No vDPA on this machine") {
		assert.False(t, testenv.InVM(), "the harness has vDPA")
		return
	}
	assert.Contains(t, s, "management devices:")
}

// Inside the harness, a vdpa_sim_net device shows up with its features by
// name, its config and its queues.
func TestProbeShowsSimulatedDevice(t *testing.T) {
	testenv.RequireVM(t)
	testenv.RequireModule(t, "vdpa_sim_net")
	testenv.AddVDPA(t, "vdpa-ex", "vdpasim_net", "mac", "02:00:00:00:00:42", "mtu", "1400")
	var out bytes.Buffer
	require.NoError(t, probe(context.Background(), &out, true))
	s := out.String()
	t.Log(s)
	for _, want := range []string{
		"vdpasim_net: classes net, max vqs 3",
		"vdpa-ex: net device on vdpasim_net",
		"mac 02:00:00:00:00:42, link up, mtu 1400",
		"VERSION_1", "ACCESS_PLATFORM", "MAC",
		"3 queues, max size 256",
		"2 virtqueue groups, 2 address spaces",
	} {
		assert.Contains(t, s, want)
	}
	_, err := exec.LookPath("vdpa")
	require.NoError(t, err)
}
