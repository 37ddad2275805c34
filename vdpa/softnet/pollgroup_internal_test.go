package softnet

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vring"
)

// fakeEntry is a started queue whose batches are process: a real (empty)
// DeviceQueue, so that the worker can adopt it, and nothing else.
func fakeEntry(t *testing.T, mem *vring.Memory, at vring.GuestAddr, process batchFunc) *pollEntry {
	t.Helper()
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: vring.ContiguousLayout(at, 16)})
	require.NoError(t, err)
	q := &queue{dq: dq, done: make(chan struct{})}
	return &pollEntry{q: q, process: process, done: q.done}
}

// stopEntry stops e as queue.stop does: stopReq, then the worker's changed
// flag, then wait until the worker has let go of it.
func stopEntry(e *pollEntry) {
	e.q.stopReq.Store(true)
	e.q.poller.changed.Store(true)
	<-e.done
}

// TestPollGroupResumesWhereItStopped: a worker serves four busy queues and,
// last in its list, a fifth one, while other queues join and leave it far
// more often than a round takes. Every change makes the worker re-read its
// queues; it must go on from the queue it had reached, not from the first
// one again, or the last queue is never polled while the churn lasts.
func TestPollGroupResumesWhereItStopped(t *testing.T) {
	r, err := vring.NewMemfdRegion(0, 1<<20, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(r)
	require.NoError(t, err)
	defer mem.Close()
	g := NewPollGroup(&PollGroupOptions{Workers: 1})
	busy := func(*queue) (int, error) { time.Sleep(300 * time.Microsecond); return 1, nil }
	var last atomic.Int64
	counted := func(*queue) (int, error) { last.Add(1); return 0, nil }
	var es []*pollEntry
	for i := range 4 {
		es = append(es, fakeEntry(t, mem, vring.GuestAddr(i)*0x1000, busy))
	}
	es = append(es, fakeEntry(t, mem, 4*0x1000, counted))
	for _, e := range es {
		g.add(e)
	}
	defer func() {
		for _, e := range es {
			stopEntry(e)
		}
		assert.Zero(t, g.Running())
	}()

	// About one change per 0.5 ms against a round of 1.2 ms.
	last.Store(0)
	deadline := time.Now().Add(300 * time.Millisecond)
	churns := 0
	for time.Now().Before(deadline) {
		e := fakeEntry(t, mem, 8*0x1000, busy)
		g.add(e)
		time.Sleep(250 * time.Microsecond)
		stopEntry(e)
		churns++
	}
	got := last.Load()
	t.Logf("%d joins and leaves; the last queue was polled %d times", churns, got)
	assert.GreaterOrEqual(t, got, int64(10), "the queue at the end of the list starves")
}

// TestPollGroupWorkersBounded: Workers is bounded (each is a struct made
// up front), zero means GOMAXPROCS.
func TestPollGroupWorkersBounded(t *testing.T) {
	assert.Len(t, NewPollGroup(&PollGroupOptions{Workers: 1 << 30}).workers, MaxPollWorkers)
	assert.Len(t, NewPollGroup(&PollGroupOptions{Workers: 3}).workers, 3)
}
