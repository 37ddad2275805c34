package vring

import (
	"fmt"
	"testing"

	"github.com/vdpakit/vdpakit/virtio"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// LogChain logs what PushChain would log for the same chain and bytes, and
// pushes nothing; a device then returns a run of chains with PushBatch.
func TestLogChain(t *testing.T) {
	// A chain of one readable and two writable 64-byte buffers.
	c := &Chain{Head: 3, Readable: 1, ReadableLen: 64, WritableLen: 128, Segs: []Segment{
		{Addr: 0x1000, Len: 64},
		{Addr: 0x2000, Len: 64, Writable: true},
		{Addr: 0x3000, Len: 64, Writable: true},
	}}
	for _, tc := range []struct {
		name    string
		written uint32
		want    [][2]uint64
		err     error
	}{
		{"nothing written logs nothing", 0, nil, nil},
		{"part of the first writable buffer", 10, [][2]uint64{{0x2000, 10}}, nil},
		{"into the second writable buffer", 100, [][2]uint64{{0x2000, 64}, {0x3000, 36}}, nil},
		{"every writable byte", 128, [][2]uint64{{0x2000, 64}, {0x3000, 64}}, nil},
		{"more than the chain can hold", 129, nil, ErrWrittenTooLarge},
	} {
		for _, packed := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s, packed %v", tc.name, packed), func(t *testing.T) {
				r, err := NewMemfdRegion(0, 1<<16, nil)
				require.NoError(t, err)
				mem, err := NewMemory(r)
				require.NoError(t, err)
				defer mem.Close()
				log := &recLog{}
				opts := DeviceQueueOptions{Layout: ContiguousLayout(0x8000, 8), Log: log}
				if packed {
					opts.Layout = ContiguousPackedLayout(0x8000, 8)
					opts.Features = virtio.Features(0).With(virtio.FRingPacked)
					opts.State = InitialState(opts.Features)
				}
				q, err := NewDeviceQueue(mem, opts)
				require.NoError(t, err)
				before := q.State()
				log.writes = nil // what enabling notifications logged
				err = q.LogChain(c, tc.written)
				if tc.err != nil {
					require.ErrorIs(t, err, tc.err)
					return
				}
				require.NoError(t, err)
				assert.Equal(t, tc.want, log.writes)
				assert.Equal(t, before, q.State(), "nothing pushed")
			})
		}
	}
	t.Run("a queue without a log only checks the length", func(t *testing.T) {
		r, err := NewMemfdRegion(0, 1<<16, nil)
		require.NoError(t, err)
		mem, err := NewMemory(r)
		require.NoError(t, err)
		defer mem.Close()
		q, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousLayout(0x8000, 8)})
		require.NoError(t, err)
		require.NoError(t, q.LogChain(c, 128))
		require.ErrorIs(t, q.LogChain(c, 129), ErrWrittenTooLarge)
	})
}
