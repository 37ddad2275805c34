package hostnet

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// What Tap and Packet share: the counters behind Stats, the non-blocking
// send of a header and a frame, and the attachment to a device with its
// reader goroutines and Close.

// ErrClosed: the back-end is closed.
var ErrClosed = errors.New("hostnet: closed")

// ErrAttached: the back-end is already attached to a device (a back-end
// attaches once).
var ErrAttached = errors.New("hostnet: already attached")

// Stats counts what a Tap or a Packet moved.
type Stats struct {
	// TxFrames and TxBytes: frames written to the host (headers
	// excluded); TxGSO of them carried a GSO header.
	TxFrames, TxBytes, TxGSO uint64
	// TxDropped: writes refused because the host's queue is full (EAGAIN,
	// ENOBUFS). TxErrors: other write errors (a header the kernel
	// rejects, EFAULT on guest memory, a deleted tap).
	TxDropped, TxErrors uint64
	// RxFrames and RxBytes: frames read from the host and delivered to
	// the driver; RxGSO of them carried a GSO header.
	RxFrames, RxBytes, RxGSO uint64
	// RxDropped: frames read and not delivered (no receive buffer, queue
	// stopped, link down, a header the device rejects, a frame the
	// AF_PACKET ring truncated). RxErrors: read errors other than the
	// back-end's closing, and malformed ring entries.
	RxDropped, RxErrors uint64
	// OffloadSets counts TUNSETOFFLOAD calls (a Tap's only).
	OffloadSets uint64
}

// counters are a back-end's Stats, updated atomically by its writers and
// readers.
type counters struct {
	txFrames, txBytes, txDropped, txErrors, txGSO atomic.Uint64
	rxFrames, rxBytes, rxDropped, rxErrors, rxGSO atomic.Uint64
	offloadSets                                   atomic.Uint64
}

func (c *counters) stats() Stats {
	return Stats{
		TxFrames: c.txFrames.Load(), TxBytes: c.txBytes.Load(), TxGSO: c.txGSO.Load(),
		TxDropped: c.txDropped.Load(), TxErrors: c.txErrors.Load(),
		RxFrames: c.rxFrames.Load(), RxBytes: c.rxBytes.Load(), RxGSO: c.rxGSO.Load(),
		RxDropped: c.rxDropped.Load(), RxErrors: c.rxErrors.Load(), OffloadSets: c.offloadSets.Load(),
	}
}

// sent counts the outcome err of sending frame with header hdr.
func (c *counters) sent(hdr *virtio.NetHdr, frame []byte, err error) {
	switch {
	case err == nil:
		c.txFrames.Add(1)
		c.txBytes.Add(uint64(len(frame)))
		if hdr.GSOType != virtio.NetHdrGSONone {
			c.txGSO.Add(1)
		}
	case err == unix.EAGAIN || err == unix.ENOBUFS:
		c.txDropped.Add(1)
	default:
		c.txErrors.Add(1)
	}
}

// deliver hands frame with header hdr, read from the host, to pair of dev
// and counts the outcome.
func (c *counters) deliver(dev *softnet.Device, pair int, hdr virtio.NetHdr, frame []byte) {
	if err := dev.DeliverHdr(pair, hdr, frame); err != nil {
		c.rxDropped.Add(1)
		return
	}
	c.rxFrames.Add(1)
	c.rxBytes.Add(uint64(len(frame)))
	if hdr.GSOType != virtio.NetHdrGSONone {
		c.rxGSO.Add(1)
	}
}

// sender writes a virtio-net header of hdrLen bytes and a frame as one
// frame, with one writev through a non-blocking descriptor's RawConn: it
// never waits for room, and allocates nothing. Safe for concurrent use.
type sender struct {
	rc     syscall.RawConn
	hdrLen int
	fn     func(uintptr) bool // write, bound once

	mu    sync.Mutex
	hdr   [virtio.NetHdrSize]byte
	frame []byte
	err   error
	iov   [2]unix.Iovec
}

func (s *sender) init(rc syscall.RawConn, hdrLen int) {
	s.rc, s.hdrLen = rc, hdrLen
	s.fn = s.write
}

// send writes hdr (num_buffers zero) and frame.
func (s *sender) send(hdr virtio.NetHdr, frame []byte) error {
	hdr.NumBuffers = 0
	s.mu.Lock()
	defer s.mu.Unlock()
	_ = hdr.Encode(s.hdr[:s.hdrLen], s.hdrLen)
	s.frame, s.err = frame, nil
	err := s.rc.Write(s.fn)
	if err == nil {
		err = s.err
	}
	s.frame = nil
	return err
}

// write is the RawConn callback: one writev, never a wait for room.
func (s *sender) write(fd uintptr) bool {
	s.err = writev2(int(fd), &s.iov, s.hdr[:s.hdrLen], s.frame)
	return true
}

// attachment is a back-end's device, its reader goroutines and its
// closing. attach and close are serialised by mu, so a Close racing an
// Attach either finds the readers started (and waits for them) or makes
// the Attach fail with ErrClosed; closed is also read by the readers.
type attachment struct {
	mu     sync.Mutex
	dev    *softnet.Device
	closed atomic.Bool
	wg     sync.WaitGroup
}

// attach makes h dev's frame handler and calls start, which starts the
// readers (each counted in wg before start returns).
func (a *attachment) attach(dev *softnet.Device, h softnet.FrameHandler, start func()) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed.Load() {
		return ErrClosed
	}
	if a.dev != nil {
		return ErrAttached
	}
	a.dev = dev
	dev.SetHandler(h)
	start()
	return nil
}

// close detaches from the device (which then discards what the driver
// transmits), calls closeFiles (which must end the readers' blocking
// reads) and waits, up to ctx's end, for the readers. It returns
// ErrClosed on a second call, an error naming what (and matching ctx's
// error) when the readers outlive ctx, and otherwise closeFiles' error;
// stopped reports whether the readers have returned (what they use may
// then be released).
func (a *attachment) close(ctx context.Context, what string, closeFiles func() error) (stopped bool, err error) {
	a.mu.Lock()
	if a.closed.Swap(true) {
		a.mu.Unlock()
		return false, ErrClosed
	}
	if a.dev != nil {
		a.dev.SetHandler(softnet.Discard)
	}
	a.mu.Unlock()
	err = closeFiles()
	done := make(chan struct{})
	go func() { a.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true, err
	case <-ctx.Done():
		return false, fmt.Errorf("hostnet: %s: readers still running: %w", what, ctx.Err())
	}
}
