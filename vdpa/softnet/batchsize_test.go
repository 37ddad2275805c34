package softnet_test

import (
	"encoding/binary"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
)

// TestTxBatchTakesAtMostHalfTheRing: a transmit batch returns its chains
// together at its end, so one batch takes at most half the ring, whatever
// BatchSize says: with a ring of 16 and the default BatchSize of 64, the
// first 8 of 16 frames made available at once are back (used.idx 8) when
// the handler sees the ninth.
func TestTxBatchTakesAtMostHalfTheRing(t *testing.T) {
	var mu sync.Mutex
	var usedAt []uint16 // the transmit queue's used.idx as each frame reached the handler
	s := newStack(t, stackOptions{features: base, size: 16})
	// Set after the stack exists (SetHandler orders it before the
	// worker's next frame): the handler reads s.
	s.dev.SetHandler(softnet.FrameHandlerFunc(func(_ *softnet.Tx, _ []byte) {
		var b [2]byte
		require.NoError(t, s.mem.Read(s.layouts[1].Used+2, b[:]))
		mu.Lock()
		usedAt = append(usedAt, binary.LittleEndian.Uint16(b[:]))
		mu.Unlock()
	}))
	for i := range 16 { // header and frame in one descriptor: 16 chains fill the ring
		_, err := s.drv[1].Add([][]byte{append(s.hdr(), frame(s.dev.MAC(), uint32(i), 50)...)}, nil)
		require.NoError(t, err)
	}
	s.drv[1].Queue.Publish()
	require.NoError(t, s.kick[1].Signal())
	s.waitN(1, 16)
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, usedAt, 16)
	assert.Zero(t, usedAt[0], "nothing returned before the first frame")
	assert.GreaterOrEqual(t, usedAt[8], uint16(8), "the first batch (half the ring) is back before the ninth frame")
}
