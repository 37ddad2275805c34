package vfiouser_test

import (
	"errors"
	"io"
	"math/bits"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
	"github.com/vdpakit/vdpakit/vdpa"
)

// unreadBytes is what the client sent that the server has not read yet
// (SIOCOUTQ on a unix socket).
func unreadBytes(t *testing.T, c *vfiousertest.Client) int {
	t.Helper()
	rc, err := c.Conn().SyscallConn()
	require.NoError(t, err)
	var n int
	var ierr error
	require.NoError(t, rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }))
	require.NoError(t, ierr)
	return n
}

// TestDescriptorsSpreadOverAMessageAreBounded: a message may arrive in
// many pieces, each with its own descriptors. The server keeps at most
// max_msg_fds of them for the message and closes the rest as they arrive:
// it used to keep them all until the message was complete, so one message
// of 1 MiB, one byte per sendmsg with 16 descriptors each, could exhaust
// RLIMIT_NOFILE. The message is refused (EBADF) and the session ends, as
// for any message with more than max_msg_fds descriptors.
func TestDescriptorsSpreadOverAMessageAreBounded(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	e, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer e.Close()
	fds := make([]int, vfiouser.MaxMsgFds)
	for i := range fds {
		fds[i] = e.Fd()
	}
	before := fdCount(t)
	c := r.dial(t)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)

	const pieces = 1000 // 16000 descriptors in all: below this machine's RLIMIT_NOFILE, so the old server kept them
	msg := vfiousertest.Message(9, vfiouser.CmdDeviceReset, 0, make([]byte, pieces))
	require.NoError(t, c.SendRaw(msg[:vfiouser.HeaderSize], nil))
	for i := 0; i < pieces-1; i++ {
		off := vfiouser.HeaderSize + i
		require.NoError(t, c.SendRaw(msg[off:off+1], fds))
	}
	// Everything but the last byte has been read by the server: it holds
	// what it keeps of the message's descriptors now.
	require.Eventually(t, func() bool { return unreadBytes(t, c) == 0 }, 10*time.Second, time.Millisecond)
	held := fdCount(t) - before
	require.LessOrEqual(t, held, 2+vfiouser.MaxMsgFds,
		"descriptors held mid-message: both ends of the connection and at most max_msg_fds (the server used to hold 15986)")

	require.NoError(t, c.SendRaw(msg[len(msg)-1:], fds))
	h, _, err := c.ReadReply(ctx)
	require.NoError(t, err)
	require.Equal(t, uint16(9), h.ID)
	require.NotZero(t, h.Flags&vfiouser.FlagError, "an error reply")
	require.Equal(t, uint32(unix.EBADF), h.Error)
	_, _, err = c.ReadReply(ctx)
	require.True(t, errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET), "the server closed the session: %v", err)
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool { return fdCount(t) <= before }, 5*time.Second, 10*time.Millisecond,
		"descriptors leaked: %d before, %d after", before, fdCount(t))

	// The server serves the next client.
	c = r.dial(t)
	_, err = c.Negotiate(ctx)
	require.NoError(t, err)
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err)
}

// TestDMALoggingReportOfAHugeRange: over a 1 TiB log, a report of the whole
// TiB as one 1 TiB page, which took the old server 2^28 steps under the
// migration lock per request (reportDirty's tests count the work), answers
// the one page dirty after traffic and clean once reported; a range past
// the log is clean; a page-granular report is what it was.
func TestDMALoggingReportOfAHugeRange(t *testing.T) {
	r := newRig(t, nil)
	ctx := testCtx(t)
	c := r.dial(t)
	d, err := vfiousertest.NewDriver(ctx, c, nil)
	require.NoError(t, err)
	defer d.Close()
	const tib = 1 << 40
	require.NoError(t, c.StartDMALogging(ctx, 4096, 0, tib))
	traffic := func() {
		require.NoError(t, d.SendFrames(frames(4, 5)))
		require.NoError(t, d.Receive(ctx, d.Sent, nil))
	}
	traffic()
	bm, err := c.DMALoggingReport(ctx, 0, tib, tib)
	require.NoError(t, err)
	require.Equal(t, []uint64{1}, bm, "guest memory was written")
	bm, err = c.DMALoggingReport(ctx, 0, tib, tib)
	require.NoError(t, err)
	require.Equal(t, []uint64{0}, bm, "reported pages are cleared")
	bm, err = c.DMALoggingReport(ctx, 1<<62, 1<<62, 1<<62)
	require.NoError(t, err)
	require.Equal(t, []uint64{0}, bm, "past the log")

	traffic()
	bm, err = c.DMALoggingReport(ctx, 0, vfiousertest.GuestMemSize, 4096)
	require.NoError(t, err)
	dirtyPages := 0
	for _, w := range bm {
		dirtyPages += bits.OnesCount64(w)
	}
	require.NotZero(t, dirtyPages, "page-granular report")
	require.NoError(t, c.StopDMALogging(ctx))
	_, err = c.DeviceInfo(ctx)
	require.NoError(t, err, "the session goes on")
}
