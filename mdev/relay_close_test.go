package mdev_test

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/mdev"
	"github.com/vdpakit/vdpakit/mdev/mdevtest"
)

// Closing a device whose data path runs through the shadow relay must stop
// the backing device before the shadow rings are unmapped: the backing
// device works on them until it is reset. Done the other way round, its
// worker faults on unmapped memory (SIGSEGV, which no recover can catch).
func TestCloseInRelayModeUnderTraffic(t *testing.T) {
	rounds := 20
	if testing.Short() {
		rounds = 5
	}
	for i := 0; i < rounds; i++ {
		s := newSide(t, testGuestMem, mdev.DirtyRelay)
		g, err := mdevtest.Boot(s.dev, s.mem, 0, nil)
		require.NoError(t, err)
		log, err := dirty.New(testGuestMem, nil)
		require.NoError(t, err)
		_, err = s.dev.StartDirtyTracking(log)
		require.NoError(t, err)
		// The guest keeps transmitting while the device is closed, so the
		// backing device is busy on the shadow rings at that moment.
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			for {
				select {
				case <-stop:
					return
				default:
					g.Step()
				}
			}
		}()
		for sent, _, _, _ := g.Stats(); sent < 500; sent, _, _, _ = g.Stats() {
			runtime.Gosched()
		}
		require.NoError(t, s.dev.Close())
		close(stop)
		<-done
		require.NoError(t, log.Close())
	}
}
