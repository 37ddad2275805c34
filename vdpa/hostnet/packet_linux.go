package hostnet

// The system calls and unsafe code of the AF_PACKET back-end: the socket,
// its TPACKET_V3 receive ring, and the atomic access to the block status
// words the kernel and this process hand the ring's blocks over with.

import (
	"encoding/binary"
	"fmt"
	"net"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Layout of the TPACKET_V3 ring (linux/if_packet.h).
const (
	// struct tpacket_block_desc: version, offset_to_priv, then struct
	// tpacket_hdr_v1 whose first fields are block_status, num_pkts,
	// offset_to_first_pkt.
	blockStatusOff = 8
	blockNumPkts   = 12
	blockFirstPkt  = 16
	// struct tpacket3_hdr: tp_next_offset, tp_sec, tp_nsec, tp_snaplen,
	// tp_len, tp_status, tp_mac, tp_net; struct sockaddr_ll follows at
	// TPACKET_ALIGN(sizeof(struct tpacket3_hdr)), sll_pkttype at 10 in it.
	pktNextOff  = 0
	pktSnaplen  = 12
	pktLen      = 16
	pktMac      = 24
	pktSllType  = (unix.SizeofTpacket3Hdr+unix.TPACKET_ALIGNMENT-1)&^(unix.TPACKET_ALIGNMENT-1) + 10
	legacyVnet  = 10 // struct virtio_net_hdr: PACKET_VNET_HDR's header
	ringBlock   = 1 << 18
	ringBlocks  = 16
	ringFrame   = 1 << 11
	ringTimeout = 1 // ms before the kernel hands over a partly filled block
)

// openPacket opens an AF_PACKET socket bound to interface ifname with
// PACKET_VNET_HDR, its own outgoing frames ignored, and a TPACKET_V3 receive
// ring mapped into ring.
func openPacket(ifname string) (fd int, ring []byte, err error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return -1, nil, fmt.Errorf("hostnet: interface %q: %w", ifname, err)
	}
	fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return -1, nil, fmt.Errorf("hostnet: AF_PACKET socket: %w", err)
	}
	fail := func(op string, err error) (int, []byte, error) {
		if ring != nil {
			_ = unix.Munmap(ring)
		}
		unix.Close(fd)
		return -1, nil, fmt.Errorf("hostnet: AF_PACKET %s on %s: %w", op, ifname, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
		return fail("PACKET_VNET_HDR", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VERSION, unix.TPACKET_V3); err != nil {
		return fail("PACKET_VERSION", err)
	}
	// Frames this socket sends are not looped back to it anyway; this also
	// keeps the host's own outgoing frames on the interface out.
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		return fail("PACKET_IGNORE_OUTGOING", err)
	}
	req := unix.TpacketReq3{Block_size: ringBlock, Block_nr: ringBlocks, Frame_size: ringFrame,
		Frame_nr: ringBlock / ringFrame * ringBlocks, Retire_blk_tov: ringTimeout}
	if err := unix.SetsockoptTpacketReq3(fd, unix.SOL_PACKET, unix.PACKET_RX_RING, &req); err != nil {
		return fail("PACKET_RX_RING", err)
	}
	ring, err = unix.Mmap(fd, 0, ringBlock*ringBlocks, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail("mmap", err)
	}
	sll := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}
	if err := unix.Bind(fd, sll); err != nil {
		return fail("bind", err)
	}
	return fd, ring, nil
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// blockStatus is the address of block b's block_status word. The kernel
// sets TP_STATUS_USER in it after writing the block (a release); this
// process reads it with an atomic load before reading the block (acquire),
// and stores TP_STATUS_KERNEL after the last read of the block, giving it
// back.
func blockStatus(ring []byte, b int) *uint32 {
	p := ring[b*ringBlock+blockStatusOff:][:4]
	return (*uint32)(unsafe.Pointer(&p[0]))
}

func loadBlockStatus(ring []byte, b int) uint32 { return atomic.LoadUint32(blockStatus(ring, b)) }

func releaseBlock(ring []byte, b int) {
	atomic.StoreUint32(blockStatus(ring, b), unix.TP_STATUS_KERNEL)
}

// unmapRing unmaps the receive ring (after the socket is closed and the
// reader has returned).
func unmapRing(ring []byte) error { return unix.Munmap(ring) }
