package softnet

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vring"
)

// TestPollNoSleep checks what an idle ModePoll queue does between empty
// polls: it sleeps PollSleep after PollSpins spins and as many yields,
// unless PollNoSleep keeps it yielding for good.
func TestPollNoSleep(t *testing.T) {
	r, err := vring.NewMemfdRegion(0, 1<<16, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	defer mem.Close()
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: vring.ContiguousLayout(0, 16)})
	require.NoError(t, err)
	const polls = 1000
	for _, tc := range []struct {
		name    string
		noSleep bool
		sleeps  int
	}{
		// Empty poll k (from 1) spins while k < 8, yields while k < 16.
		{"sleeps once spins and yields are used up", false, polls - (2*8 - 1)},
		{"PollNoSleep never sleeps", true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := New(&Options{Mode: ModePoll, PollSpins: 8, PollSleep: time.Millisecond, PollNoSleep: tc.noSleep})
			require.NoError(t, err)
			q := &queue{dq: dq}
			calls, sleeps := 0, 0
			idle := func(q *queue) (int, error) {
				calls++
				if calls == polls {
					q.stopReq.Store(true) // seen before the next poll
				}
				return 0, nil
			}
			require.NoError(t, d.pollWith(q, idle, func(d time.Duration) {
				assert.Equal(t, time.Millisecond, d)
				sleeps++
			}))
			assert.Equal(t, polls, calls)
			assert.Equal(t, tc.sleeps, sleeps)
		})
	}
}
