package vfiouser_test

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
)

// TestArgszBeyondPayload: an argsz larger than the payload is refused with
// ErrArgsz whatever its value, including 2^31 and above (negative as a
// 32-bit int, which once passed the check there and let DEVICE_SET_IRQS
// slice booleans past the payload's end).
func TestArgszBeyondPayload(t *testing.T) {
	dma := vfiouser.DMAMap{Argsz: vfiouser.DMAMapSize, Flags: vfiouser.DMAReadable, Size: 4096}.Marshal()
	// DATA_BOOL for 16 vectors, without the 16 booleans.
	irq := vfiouser.IRQSet{Argsz: vfiouser.IRQSetSize, Flags: vfiouser.IRQSetDataBool | vfiouser.IRQSetActionTrigger,
		Index: 2, Count: 16}.Marshal()
	for _, tc := range []struct {
		name  string
		argsz func(payload int) uint32
		ok    bool
	}{
		{"the payload", func(n int) uint32 { return uint32(n) }, true},
		{"a byte more", func(n int) uint32 { return uint32(n) + 1 }, false},
		{"2^31", func(int) uint32 { return 1 << 31 }, false},
		{"2^32-1", func(int) uint32 { return ^uint32(0) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := append([]byte(nil), dma...)
			binary.LittleEndian.PutUint32(p, tc.argsz(len(p)))
			_, err := vfiouser.ParseDMAMap(p)
			if tc.ok {
				require.NoError(t, err, "DMA_MAP")
			} else {
				assert.ErrorIs(t, err, vfiouser.ErrArgsz, "DMA_MAP")
			}

			p = append([]byte(nil), irq...)
			binary.LittleEndian.PutUint32(p, tc.argsz(len(p)))
			_, err = vfiouser.ParseIRQSet(p, 0)
			// Even argsz == len(p) is short of the 16 booleans.
			assert.ErrorIs(t, err, vfiouser.ErrArgsz, "DEVICE_SET_IRQS")
		})
	}
}
