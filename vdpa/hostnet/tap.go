package hostnet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// vnetHdrLen is the virtio-net header the back-ends exchange with the
// kernel: struct virtio_net_hdr_v1 (TUNSETVNETHDRSZ 12), whatever header
// size the driver negotiated; the fields are the same.
const vnetHdrLen = virtio.NetHdrSize

// TapOptions configure a Tap. The zero value (or nil) is a single queue tap
// named by the kernel in the caller's network namespace.
type TapOptions struct {
	// Queues is the number of tap queues, one per queue pair of the
	// device (frames of pair k use queue k mod Queues). Zero means 1; more
	// than one opens the tap with IFF_MULTI_QUEUE.
	Queues int
	// NetNS is the path of a network namespace (/var/run/netns/NAME,
	// /proc/PID/ns/net) to create the tap in. Empty means the caller's.
	NetNS string
	// NoOffload keeps the kernel from handing over partially
	// checksummed or GSO frames (no TUNSETOFFLOAD) and makes TxOffloads
	// empty, so the device completes and segments everything itself.
	NoOffload bool
}

// Tap is a Linux tap device (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte
// virtio-net headers) attached to a softnet.Device as its
// softnet.OffloadHandler: what the driver transmits is written to the tap
// with its header, and what the kernel sends out of the tap is delivered
// to the driver with softnet.Device.DeliverHdr.
//
// Offloads: writes to a tap accept checksum and GSO headers
// (virtio_net_hdr_to_skb), so TxOffloads is CSUM, HOST_TSO4, HOST_TSO6,
// HOST_ECN and, on kernels whose tap knows UDP segmentation (6.2 and
// later, probed with TUNSETOFFLOAD), HOST_USO. The reading side follows
// the driver: TUNSETOFFLOAD is set to the GUEST_* offloads it negotiated
// (GUEST_CSUM: TUN_F_CSUM, GUEST_TSO4/6: TUN_F_TSO4/6, GUEST_ECN:
// TUN_F_TSO_ECN, GUEST_USO4/6: TUN_F_USO4/6) whenever they change, checked
// on every received frame with one atomic load; a frame read before a
// change is completed or segmented by the device.
//
// A tap deleted while open (ip link del) ends the readers (its reads fail
// with EBADFD, counted once per queue in Stats.RxErrors); writes then
// count as Stats.TxErrors until Close.
//
// Back-pressure: writes never block. A write the tap refuses because its
// queue is full (EAGAIN) is a counted drop (Stats.TxDropped); a
// received frame the driver has no buffer for is dropped by the device
// and counted (Stats.RxDropped). One goroutine per queue reads the tap
// into a buffer of its own, so a received frame is copied once, from that
// buffer into the driver's. Nothing is allocated per frame.
//
// A Tap is safe for concurrent use. The tap device exists as long as the
// Tap is open (it is not made persistent).
type Tap struct {
	name   string
	queues []*tapQueue
	noOff  bool
	txAcc  virtio.Features
	usoOK  bool
	offMu  sync.Mutex
	offSet atomic.Uint64 // GUEST_* offloads applied with TUNSETOFFLOAD, +1 (0: none yet)
	attachment
	counters
}

type tapQueue struct {
	t    *Tap
	idx  int
	fd   int // owned by file; used only inside rc callbacks
	file *os.File
	rc   syscall.RawConn
	tx   sender

	rxBuf []byte
}

// OpenTap creates (or attaches to) tap device name with opts.Queues
// queues. An empty name lets the kernel choose one (Name reports it).
func OpenTap(name string, opts *TapOptions) (*Tap, error) {
	var o TapOptions
	if opts != nil {
		o = *opts
	}
	if o.Queues <= 0 {
		o.Queues = 1
	}
	t := &Tap{noOff: o.NoOffload}
	err := inNetNS(o.NetNS, func() error {
		for i := 0; i < o.Queues; i++ {
			fd, ifname, err := openTapQueue(name, o.Queues > 1)
			if err != nil {
				return err
			}
			name = ifname // the following queues attach to the same device
			t.name = ifname
			f := os.NewFile(uintptr(fd), "tap:"+ifname)
			rc, err := f.SyscallConn()
			if err != nil {
				f.Close()
				return fmt.Errorf("hostnet: tap %s: %w", ifname, err)
			}
			q := &tapQueue{t: t, idx: i, fd: fd, file: f, rc: rc, rxBuf: make([]byte, vnetHdrLen+softnet.MaxFrame)}
			q.tx.init(rc, vnetHdrLen)
			t.queues = append(t.queues, q)
		}
		return nil
	})
	if err != nil {
		t.closeFiles()
		return nil, err
	}
	if !t.noOff {
		t.txAcc = virtio.Features(0).With(virtio.NetFCsum, virtio.NetFHostTSO4, virtio.NetFHostTSO6, virtio.NetFHostECN)
		// A tap that takes UDP segmentation from its reader parses UDP_L4
		// headers written to it too (both came with Linux 6.2).
		if setTapOffload(t.queues[0].fd, unix.TUN_F_CSUM|unix.TUN_F_USO4|unix.TUN_F_USO6) == nil {
			t.usoOK = true
			t.txAcc = t.txAcc.With(virtio.NetFHostUSO)
		}
		if err := setTapOffload(t.queues[0].fd, 0); err != nil {
			t.closeFiles()
			return nil, err
		}
	}
	return t, nil
}

// Name returns the tap's interface name.
func (t *Tap) Name() string { return t.name }

// USO reports whether the kernel's tap takes UDP segmentation offload.
func (t *Tap) USO() bool { return t.usoOK }

// Attach makes t dev's frame handler and starts reading the tap into dev's
// receive queues. A Tap attaches to one device, once (ErrAttached), and
// not after Close (ErrClosed).
func (t *Tap) Attach(dev *softnet.Device) error {
	return t.attach(dev, t, func() {
		t.syncOffloads(dev)
		for _, q := range t.queues {
			t.wg.Add(1)
			go q.readLoop(dev)
		}
	})
}

// HandleFrame implements softnet.FrameHandler.
func (t *Tap) HandleFrame(tx *softnet.Tx, frame []byte) {
	t.HandleOffload(tx, virtio.NetHdr{}, frame)
}

// TxOffloads implements softnet.OffloadHandler.
func (t *Tap) TxOffloads() virtio.Features { return t.txAcc }

// HandleOffload implements softnet.OffloadHandler: it writes hdr and frame
// to the tap queue of tx's pair without blocking.
func (t *Tap) HandleOffload(tx *softnet.Tx, hdr virtio.NetHdr, frame []byte) {
	q := t.queues[tx.Pair()%len(t.queues)]
	t.sent(&hdr, frame, q.tx.send(hdr, frame))
}

// syncOffloads sets the tap's TUNSETOFFLOAD to the GUEST_* offloads dev's
// driver negotiated, when they changed.
func (t *Tap) syncOffloads(dev *softnet.Device) {
	if t.noOff {
		return
	}
	want := uint64(dev.NegotiatedFeatures()&softnet.GuestOffloads) + 1
	if t.offSet.Load() == want {
		return
	}
	t.offMu.Lock()
	defer t.offMu.Unlock()
	if t.offSet.Load() == want {
		return
	}
	f := virtio.Features(want - 1)
	var flags uint
	if f.Has(virtio.NetFGuestCsum) {
		flags |= unix.TUN_F_CSUM
		if f.Has(virtio.NetFGuestTSO4) {
			flags |= unix.TUN_F_TSO4
		}
		if f.Has(virtio.NetFGuestTSO6) {
			flags |= unix.TUN_F_TSO6
		}
		if f.Has(virtio.NetFGuestECN) && flags&(unix.TUN_F_TSO4|unix.TUN_F_TSO6) != 0 {
			flags |= unix.TUN_F_TSO_ECN
		}
		if t.usoOK && f.Has(virtio.NetFGuestUSO4) {
			flags |= unix.TUN_F_USO4
		}
		if t.usoOK && f.Has(virtio.NetFGuestUSO6) {
			flags |= unix.TUN_F_USO6
		}
	}
	if t.closed.Load() {
		return
	}
	// The setting belongs to the tap device: any queue's fd sets it.
	q := t.queues[0]
	var err error
	if cerr := q.rc.Control(func(fd uintptr) { err = setTapOffload(int(fd), flags) }); cerr != nil {
		return
	}
	if err != nil {
		t.rxErrors.Add(1)
		return
	}
	t.offloadSets.Add(1)
	t.offSet.Store(want)
}

// readLoop reads frames from the queue's tap fd (through the runtime
// poller: Close unblocks it) and delivers them to the driver of pair
// q.idx until the tap is closed or its reads fail (see receiveOne).
func (q *tapQueue) readLoop(dev *softnet.Device) {
	defer q.t.wg.Done()
	for {
		if err := q.receiveOne(dev); err != nil {
			return
		}
	}
}

// receiveOne reads and delivers one frame; it returns an error when the
// reader must end: the tap is closed (ErrClosed), or a read failed. A tap
// read fails only for good: EBADFD once the interface was deleted under
// the descriptor (which stays readable, so a reader carrying on would
// spin); EINVAL and EFAULT cannot come with the queue's own buffer; the
// poller absorbs EAGAIN and the runtime EINTR.
func (q *tapQueue) receiveOne(dev *softnet.Device) error {
	t := q.t
	n, err := q.file.Read(q.rxBuf)
	if err != nil {
		if errors.Is(err, os.ErrClosed) || t.closed.Load() {
			return ErrClosed
		}
		t.rxErrors.Add(1)
		return fmt.Errorf("hostnet: tap %s queue %d: %w", t.name, q.idx, err)
	}
	if n < vnetHdrLen {
		t.rxErrors.Add(1)
		return nil
	}
	t.syncOffloads(dev)
	hdr, _ := virtio.DecodeNetHdr(q.rxBuf[:vnetHdrLen], vnetHdrLen)
	t.deliver(dev, q.idx, hdr, q.rxBuf[vnetHdrLen:n])
	return nil
}

// Stats returns a snapshot of the counters.
func (t *Tap) Stats() Stats { return t.stats() }

// Close detaches the tap from its device (which then discards what the
// driver transmits), closes every queue's file descriptor and waits, up
// to ctx's end, for the reading goroutines to return.
func (t *Tap) Close(ctx context.Context) error {
	_, err := t.close(ctx, "tap "+t.name, t.closeFiles)
	return err
}

func (t *Tap) closeFiles() error {
	var first error
	for _, q := range t.queues {
		if err := q.file.Close(); err != nil && first == nil && !errors.Is(err, os.ErrClosed) {
			first = err
		}
	}
	return first
}
