package vmrig

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/testenv"
	"github.com/vdpakit/vdpakit/virtio"
)

// VdpaJSON runs iproute2's `vdpa -j ARGS...`, logs its output and decodes
// it. Keys are trimmed: iproute2 6.1 prints "link " and "link_announce "
// with a trailing space.
func VdpaJSON(t testing.TB, args ...string) map[string]any {
	t.Helper()
	out := testenv.Command(t, "vdpa", append([]string{"-j"}, args...)...)
	t.Logf("vdpa -j %s: %s", strings.Join(args, " "), out)
	var v map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &v), "vdpa -j %s: %s", strings.Join(args, " "), out)
	return trimKeys(v).(map[string]any)
}

func trimKeys(v any) any {
	switch x := v.(type) {
	case map[string]any:
		m := map[string]any{}
		for k, e := range x {
			m[strings.TrimSpace(k)] = trimKeys(e)
		}
		return m
	case []any:
		for i := range x {
			x[i] = trimKeys(x[i])
		}
	}
	return v
}

// Obj walks nested JSON objects by key.
func Obj(t testing.TB, v map[string]any, keys ...string) map[string]any {
	t.Helper()
	for _, k := range keys {
		n, ok := v[k].(map[string]any)
		require.True(t, ok, "no object %q in %v", k, v)
		v = n
	}
	return v
}

// iproute2FeatureBits are the names iproute2's vdpa tool prints for feature
// bits (vdpa/vdpa.c: net_feature_strs and ext_feature_strs); it prints
// "bit_N" for the rest.
var iproute2FeatureBits = map[string]uint{
	"CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5, "GUEST_TSO4": 7,
	"GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11, "HOST_TSO6": 12, "HOST_ECN": 13,
	"HOST_UFO": 14, "MRG_RXBUF": 15, "STATUS": 16, "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19,
	"CTRL_RX_EXTRA": 20, "GUEST_ANNOUNCE": 21, "MQ": 22, "CTRL_MAC_ADDR": 23, "NOTIFY_ON_EMPTY": 24,
	"ANY_LAYOUT": 27, "RING_INDIRECT_DESC": 28, "RING_EVENT_IDX": 29, "VERSION_1": 32,
	"ACCESS_PLATFORM": 33, "RING_PACKED": 34, "IN_ORDER": 35, "ORDER_PLATFORM": 36, "SR_IOV": 37,
	"NOTIFICATION_DATA": 38, "HASH_REPORT": 57, "RSS": 60, "RSC_EXT": 61, "STANDBY": 62, "SPEED_DUPLEX": 63,
}

// FeatureList decodes an iproute2 feature-name array (a JSON array of
// strings) into a feature set.
func FeatureList(t testing.TB, v any) virtio.Features {
	t.Helper()
	f, err := parseFeatureList(v)
	require.NoError(t, err)
	return f
}

func parseFeatureList(v any) (virtio.Features, error) {
	list, ok := v.([]any)
	if !ok {
		return 0, fmt.Errorf("feature list %v is not an array", v)
	}
	var f virtio.Features
	for _, e := range list {
		s, ok := e.(string)
		if !ok {
			return 0, fmt.Errorf("feature name %v is not a string", e)
		}
		s = strings.TrimSpace(s)
		if b, ok := iproute2FeatureBits[s]; ok {
			f |= 1 << b
			continue
		}
		var n uint
		if _, err := fmt.Sscanf(s, "bit_%d", &n); err != nil || n > 63 {
			return 0, fmt.Errorf("unknown feature name %q", s)
		}
		f |= 1 << n
	}
	return f, nil
}
