package vfiouser

import (
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
)

// An MSI-X vector whose stable eventfd cannot be re-targeted (dup3 fails)
// takes the client's eventfd all the same: it is closed, not leaked, and
// the client gets an error instead of a success for an interrupt that
// would never fire. So are the eventfds after it in the same message.
func TestFailedRetargetClosesTheClientEventfd(t *testing.T) {
	good, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer good.Close()
	broken, err := vdpa.NewEventFD()
	require.NoError(t, err)
	require.NoError(t, broken.Close()) // dup3 onto it fails with EBADF
	s := &Server{log: slog.New(slog.DiscardHandler), inProcess: true}
	s.irq.msix = []*vdpa.EventFD{good, broken, good}
	s.irq.assigned = make([]bool, 3)
	efds := make([]*vdpa.EventFD, 3)
	for i := range efds {
		efds[i], err = vdpa.NewEventFD()
		require.NoError(t, err)
	}
	err = s.setIRQFds(IRQMSIX, 0, efds)
	assert.ErrorIs(t, err, ErrDevice)
	assert.Equal(t, unix.EIO, Errno(err))
	assert.Equal(t, []bool{true, false, false}, s.irq.assigned, "only the vector before the failure is installed")
	for i, e := range efds {
		assert.ErrorIs(t, e.Signal(), vdpa.ErrClosed, "client eventfd %d is closed", i)
	}
}
