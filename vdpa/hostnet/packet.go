package hostnet

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
)

// PacketOptions configure a Packet. The zero value (or nil) attaches in the
// caller's network namespace.
type PacketOptions struct {
	// NetNS is the path of the network namespace the interface is in.
	NetNS string
	// NoOffload makes TxOffloads empty: the device completes checksums and
	// segments before frames reach the socket.
	NoOffload bool
}

// Packet attaches a softnet.Device to an existing network interface with an
// AF_PACKET socket (PACKET_VNET_HDR, a TPACKET_V3 receive ring of 16
// blocks of 256 KiB, blocks handed over after at most 1 ms): the driver's
// frames are sent out of the interface with their virtio-net header, and
// frames arriving on it (not the host's own outgoing ones) are delivered
// to the driver, read in place from the ring: the one copy is the one into
// the driver's buffers. Like a tap, a packet socket takes checksum and TCP
// segmentation headers (TxOffloads: CSUM, HOST_TSO4/6, HOST_ECN); UDP
// segmentation is done by the device. The kernel hands over GSO frames
// (GRO, or a veth peer's TSO) and partial checksums as such; the device
// completes or segments them for a driver without the GUEST_* offloads.
//
// All queue pairs transmit through the one socket; received frames go to
// queue pair 0. A received frame longer than the ring keeps (truncated)
// is a counted drop, as is a frame the driver has no buffer for; sends
// never block (EAGAIN and ENOBUFS are counted drops).
type Packet struct {
	ifname string
	fd     int
	file   *os.File
	rc     syscall.RawConn
	ring   []byte
	next   int // next block to read (reader goroutine)
	noOff  bool
	tx     sender
	readFn func(uintptr) bool
	attachment
	counters
}

// OpenPacket opens an AF_PACKET socket on interface ifname.
func OpenPacket(ifname string, opts *PacketOptions) (*Packet, error) {
	var o PacketOptions
	if opts != nil {
		o = *opts
	}
	p := &Packet{ifname: ifname, noOff: o.NoOffload}
	err := inNetNS(o.NetNS, func() error {
		fd, ring, err := openPacket(ifname)
		if err != nil {
			return err
		}
		p.fd, p.ring = fd, ring
		return nil
	})
	if err != nil {
		return nil, err
	}
	p.file = os.NewFile(uintptr(p.fd), "packet:"+ifname)
	if p.rc, err = p.file.SyscallConn(); err != nil {
		p.file.Close()
		_ = unmapRing(p.ring)
		return nil, fmt.Errorf("hostnet: packet %s: %w", ifname, err)
	}
	p.tx.init(p.rc, legacyVnet)
	p.readFn = p.ready
	return p, nil
}

// Attach makes p dev's frame handler and starts delivering the interface's
// frames to dev's queue pair 0. A Packet attaches to one device, once
// (ErrAttached), and not after Close (ErrClosed).
func (p *Packet) Attach(dev *softnet.Device) error {
	return p.attach(dev, p, func() {
		p.wg.Add(1)
		go p.readLoop(dev)
	})
}

// HandleFrame implements softnet.FrameHandler.
func (p *Packet) HandleFrame(tx *softnet.Tx, frame []byte) {
	p.HandleOffload(tx, virtio.NetHdr{}, frame)
}

// TxOffloads implements softnet.OffloadHandler.
func (p *Packet) TxOffloads() virtio.Features {
	if p.noOff {
		return 0
	}
	return virtio.Features(0).With(virtio.NetFCsum, virtio.NetFHostTSO4, virtio.NetFHostTSO6, virtio.NetFHostECN)
}

// HandleOffload implements softnet.OffloadHandler: one non-blocking send
// of hdr (as struct virtio_net_hdr) and frame.
func (p *Packet) HandleOffload(_ *softnet.Tx, hdr virtio.NetHdr, frame []byte) {
	p.sent(&hdr, frame, p.tx.send(hdr, frame))
}

// ready is the RawConn read callback: true when the next block is the
// process's (TP_STATUS_USER), false to wait for the socket to be readable.
func (p *Packet) ready(uintptr) bool {
	return loadBlockStatus(p.ring, p.next)&unix.TP_STATUS_USER != 0
}

// readLoop delivers the ring's blocks in order until the socket closes.
func (p *Packet) readLoop(dev *softnet.Device) {
	defer p.wg.Done()
	for {
		if err := p.rc.Read(p.readFn); err != nil {
			return // closed
		}
		p.deliverBlock(dev, p.next)
		releaseBlock(p.ring, p.next)
		p.next = (p.next + 1) % ringBlocks
	}
}

// deliverBlock delivers every frame of block b. The kernel wrote the block
// before publishing it; offsets read from it are checked against the block
// all the same.
func (p *Packet) deliverBlock(dev *softnet.Device, b int) {
	blk := p.ring[b*ringBlock : (b+1)*ringBlock]
	n := binary.NativeEndian.Uint32(blk[blockNumPkts:])
	off := int(binary.NativeEndian.Uint32(blk[blockFirstPkt:]))
	for i := uint32(0); i < n; i++ {
		if off <= 0 || off+pktSllType >= len(blk) {
			p.rxErrors.Add(1)
			return
		}
		pkt := blk[off:]
		snap := int(binary.NativeEndian.Uint32(pkt[pktSnaplen:]))
		full := int(binary.NativeEndian.Uint32(pkt[pktLen:]))
		mac := int(binary.NativeEndian.Uint16(pkt[pktMac:]))
		next := int(binary.NativeEndian.Uint32(pkt[pktNextOff:]))
		switch {
		case mac < legacyVnet || mac+snap > len(pkt):
			p.rxErrors.Add(1)
		case pkt[pktSllType] == unix.PACKET_OUTGOING:
		case snap < full:
			p.rxDropped.Add(1) // truncated: larger than a ring block holds
		default:
			hdr, _ := virtio.DecodeNetHdr(pkt[mac-legacyVnet:mac], legacyVnet)
			p.deliver(dev, 0, hdr, pkt[mac:mac+snap])
		}
		if next == 0 {
			return
		}
		off += next
	}
}

// Stats returns a snapshot of the counters (OffloadSets is always zero).
func (p *Packet) Stats() Stats { return p.stats() }

// Close detaches the socket from its device, closes it, waits (up to ctx's
// end) for the reader, and unmaps the ring. When the reader outlives ctx
// the ring stays mapped (the reader may still touch it).
func (p *Packet) Close(ctx context.Context) error {
	stopped, err := p.close(ctx, "packet "+p.ifname, p.file.Close)
	if !stopped {
		return err
	}
	if merr := unmapRing(p.ring); err == nil {
		err = merr
	}
	return err
}
