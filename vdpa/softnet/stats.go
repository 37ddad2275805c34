package softnet

import (
	"fmt"
	"sync/atomic"
)

// DropReason says why a frame was not delivered.
type DropReason int

// Drop reasons.
const (
	// DropTxShort: a transmit chain shorter than the virtio-net header.
	DropTxShort DropReason = iota
	// DropTxTooBig: a transmitted frame larger than MaxFrame.
	DropTxTooBig
	// DropRxTooBig: a frame to deliver larger than MaxFrame.
	DropRxTooBig
	// DropRxNoBuffer: the receive queue had no (or not enough) buffers.
	DropRxNoBuffer
	// DropRxTooSmall: a receive chain too small for the header (or, without
	// MRG_RXBUF, for the whole frame). With MRG_RXBUF every chain must
	// hold the header (virtio 1.2 §5.1.6.3.1); the frame is dropped and
	// the chains it held, up to that one, go back empty.
	DropRxTooSmall
	// DropRxNotReady: the receive queue is not started or is broken.
	DropRxNotReady
	// DropFiltered: rejected by the receive filter (MAC, rx mode).
	DropFiltered
	// DropLinkDown: the link is down.
	DropLinkDown
	// DropTxBadHeader: a transmitted frame whose virtio-net header lies
	// (ErrBadHeader: see OffloadHandler for what is checked).
	DropTxBadHeader
	// DropRxBadHeader: a frame given to DeliverHdr (or Tx.ReplyHdr) whose
	// header lies.
	DropRxBadHeader
	// DropRxFragmented: with MRG_RXBUF, the receive chains a frame took
	// had more segments beyond four per chain, in all, than the ring has
	// entries (or 64): far more than any driver's buffers have, whose
	// chains are one or two descriptors. They go back empty.
	DropRxFragmented
	numDropReasons
)

var dropNames = [...]string{"tx_short", "tx_too_big", "rx_too_big", "rx_no_buffer", "rx_too_small",
	"rx_not_ready", "filtered", "link_down", "tx_bad_header", "rx_bad_header", "rx_fragmented"}

func (r DropReason) String() string {
	if r >= 0 && r < numDropReasons {
		return dropNames[r]
	}
	return fmt.Sprintf("drop(%d)", int(r))
}

type dropCounters [numDropReasons]atomic.Uint64

func (c *dropCounters) add(r DropReason) { c[r].Add(1) }

// QueueStats counts the frames and bytes (without headers) that went
// through one virtqueue: transmitted on a transmit queue, delivered on a
// receive queue. A transmit queue adds a batch's frames when the batch
// ends, after its handler has run, with one atomic add (none per frame),
// or earlier for replies (below).
// Replies made through Tx (Loopback, Responder, Tx.Reply) are published
// during the batch, every few replies, and at its end, each time after the
// frames the batch has transmitted so far are counted (adding them then
// rather than at the batch's end); a frame handed to another device
// (ForwardTo, Deliver) may reach that device's driver before its
// transmit queue counts it.
type QueueStats struct {
	Frames uint64
	Bytes  uint64
}

// Stats is a snapshot of the device's counters.
type Stats struct {
	// Queues is indexed by virtqueue: receiveq k at 2k, transmitq k at 2k+1.
	Queues []QueueStats
	// Drops is indexed by DropReason.
	Drops [numDropReasons]uint64
	// CtrlOK and CtrlErr count control commands acknowledged with
	// VIRTIO_NET_OK and VIRTIO_NET_ERR.
	CtrlOK, CtrlErr uint64
}

// Drop returns the count for one reason.
func (s Stats) Drop(r DropReason) uint64 {
	if r < 0 || r >= numDropReasons {
		return 0
	}
	return s.Drops[r]
}

// Rx and Tx sum the receive and transmit queue counters.
func (s Stats) Rx() QueueStats { return s.sum(0) }
func (s Stats) Tx() QueueStats { return s.sum(1) }

func (s Stats) sum(parity int) QueueStats {
	var t QueueStats
	for i := parity; i < len(s.Queues); i += 2 {
		t.Frames += s.Queues[i].Frames
		t.Bytes += s.Queues[i].Bytes
	}
	return t
}

// Stats returns a snapshot of the counters.
func (d *Device) Stats() Stats {
	n := 2 * int(d.opts.MaxQueuePairs)
	s := Stats{Queues: make([]QueueStats, n), CtrlOK: d.ctrlOK.Load(), CtrlErr: d.ctrlEr.Load()}
	for i := 0; i < n; i++ {
		s.Queues[i] = QueueStats{Frames: d.queues[i].frames.Load(), Bytes: d.queues[i].bytes.Load()}
	}
	for i := range s.Drops {
		s.Drops[i] = d.drops[i].Load()
	}
	return s
}
