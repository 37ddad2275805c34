package vfiouser

import (
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/vdpa"
)

// After Close, a session that is still ending (Close does not wait for
// ServeConn) installs no interrupt eventfd: the ones it passes are closed,
// and nothing is dup3'ed onto the stable eventfds' numbers, which Close
// has released and another file may reuse.
func TestSetIRQFdsAfterCloseInstallsNothing(t *testing.T) {
	reused, err := vdpa.NewEventFD() // a file that took a stable eventfd's number
	require.NoError(t, err)
	defer reused.Close()
	s := &Server{log: slog.New(slog.DiscardHandler)}
	s.irq.msix = []*vdpa.EventFD{reused}
	s.irq.assigned = []bool{false}
	s.irq.closed = true
	client, err := vdpa.NewEventFD()
	require.NoError(t, err)
	s.setIRQFds(IRQMSIX, 0, []*vdpa.EventFD{client})
	assert.ErrorIs(t, client.Signal(), vdpa.ErrClosed, "the client's eventfd is taken and closed")
	assert.False(t, s.irq.assigned[0])
	// reused is still its own file: a signal on client (before it was
	// closed) would have reached it had client been dup3'ed onto it.
	require.NoError(t, reused.Signal())
	intx, err := vdpa.NewEventFD()
	require.NoError(t, err)
	s.setIRQFds(IRQIntx, 0, []*vdpa.EventFD{intx})
	assert.Nil(t, s.irq.intx, "no INTx eventfd installed after Close")
	assert.ErrorIs(t, intx.Signal(), vdpa.ErrClosed)
}
