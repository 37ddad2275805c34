package vring

import (
	"testing"

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
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewMemfdRegion(0, 1<<16, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			log := &recLog{}
			q, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: ContiguousLayout(0x8000, 8), Log: log})
			require.NoError(t, err)
			log.writes = nil // what enabling notifications logged
			err = q.LogChain(c, tc.written)
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, log.writes)
			assert.Equal(t, QueueState{}, q.State(), "nothing pushed")
		})
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
