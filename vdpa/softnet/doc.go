// Package softnet is a software virtio-net device: a vdpa.Handler that
// processes the driver's transmit, receive and control virtqueues in
// goroutines of this process, with vring's device-side queues.
//
// What the driver transmits goes to a FrameHandler. The default, Loopback,
// sends every frame straight back on the receive queue of the same queue
// pair, like the kernel's vdpa_sim_net. Responder answers ARP requests and
// ICMP echo requests for an IPv4 address; ForwardTo links two devices like a
// cable. Frames reach the driver through a receive filter (MAC address,
// promiscuous and all-multicast modes, MAC tables of up to MACTableEntries
// addresses of each kind) that the driver programs over the control
// virtqueue.
//
// Behind a vhost-user back-end the front-end (QEMU, DPDK's virtio-user)
// runs the driver's control queue itself and passes MQ, CTRL_RX,
// CTRL_MAC_ADDR and CTRL_VLAN on without CTRL_VQ; Options.FrontendCtrl
// makes the device accept that, with every queue pair active. A driver
// that talks to the device directly (mdev, VDUSE, vdpa.Local) gets the
// feature dependencies of virtio 1.2 §5.1.3.1 enforced.
//
// Ring formats: the device offers VIRTIO_F_RING_PACKED next to the split
// ring; the driver picks one by negotiating it or not. The queue workers
// are format-blind: vring.DeviceQueue walks either (the server builds a
// packed queue when the feature is negotiated), so everything below holds
// for both. Options.Disable with RING_PACKED keeps a driver on split rings.
//
// Queue layout (virtio 1.2 §5.1.2): receiveq k is queue 2k, transmitq k is
// queue 2k+1, and the control queue is queue 2N when VIRTIO_NET_F_MQ is
// negotiated (N = max_virtqueue_pairs), queue 2 otherwise.
//
// The data path allocates nothing per frame: each queue owns its chain
// buffers and a gather buffer for frames split across descriptors, and a
// frame is copied once, from the transmit chain (or the handler's buffer)
// into the receive chain(s). A queue's buffers are allocated when the
// driver starts it (sized by the ring it set up), kept across a stop and
// start, and released by Reset: a device offering many queue pairs costs
// little until they are used. New bounds what they can grow to
// (Options.MaxQueueMemory, QueueMemory), so no queue count or size makes
// the process run out of memory, nor any ring contents: the segment room
// receive chains grow to is bounded per queue (a split ring may name one
// long chain in every avail entry). With VIRTIO_NET_F_MRG_RXBUF a frame
// may fill several receive chains; num_buffers in the first header says
// how many. Each must hold at least the header (§5.1.6.3.1): one that does
// not, and the chains the frame took before it, go back empty
// (DropRxTooSmall), as do the chains of a frame with more segments beyond
// four per chain than the ring has entries, or 64 (DropRxFragmented).
//
// # Offloads
//
// With Options.Offload the device offers the checksum and segmentation
// offloads of both directions (HostOffloads, GuestOffloads) and enforces
// their dependencies (§5.1.3.1). The virtio-net header of every transmitted
// frame is validated against the frame; one that lies is a counted drop
// (DropTxBadHeader). An OffloadHandler (Loopback, ForwardTo, a host
// back-end such as a tap device) gets the header with the frame; Tx.ReplyHdr
// and Device.DeliverHdr take one back towards the driver. Whatever the
// other side cannot take, the device does in software, and only then copies
// the frame once more: for a handler, checksum completion (NEEDS_CSUM
// without CSUM in its TxOffloads) and TCP/UDP segmentation (GSO without its
// HOST_TSO4/6, HOST_USO, HOST_ECN); for a driver, the same for what it did
// not negotiate (GUEST_CSUM, GUEST_TSO4/6, GUEST_USO4/6, GUEST_ECN).
// Segmentation works on TCP and UDP over IPv4 and IPv6 behind up to two
// VLAN tags, without IPv6 extension headers or IP fragments. A 64 KiB frame
// needs MRG_RXBUF or receive buffers that big (a driver with GUEST_TSO and
// without MRG_RXBUF posts them); MaxFrame bounds every frame. Nothing is
// allocated per frame on these paths either.
//
// Two processing modes: ModeEvent waits on the kick eventfd with driver
// notifications enabled and re-checks the ring after enabling them (the
// race vring's EnableNotify reports as pending); ModePoll keeps
// notifications off and polls, yielding and then sleeping a bounded time
// when idle. Each transmit and control queue has a goroutine of its own,
// unless the device joins a PollGroup (Options.PollGroup, ModePoll only):
// the group's fixed set of worker goroutines then polls the queues of all
// its devices in turn, as a DPDK lcore polls many ports, so hundreds of
// queue pairs or devices cost a few goroutines.
//
// Guest memory may come from a peer that truncates the file behind it
// (vring's "Untrusted memory"). Every goroutine of the device that touches
// guest memory runs with runtime/debug.SetPanicOnFault on and a
// vring.CatchFault set up once per worker (once per stretch of polling on
// a PollGroup worker, per call for Deliver), so a
// fault on a lost page breaks the queue whose memory faulted with an error
// matching vring.ErrMemoryFault: QueueErr reports it, vdpa.Local and the
// vhost-user back-end turn it into DEVICE_NEEDS_RESET, and the process
// lives on. A fault reading a transmitted frame breaks the transmit queue,
// even when it happens while the frame is copied into a receive queue.
//
// Device is safe for concurrent use: control calls come from the server,
// data-path work runs on per-queue goroutines (or a PollGroup's workers),
// and Deliver may be called
// from any goroutine.
//
// # Receive queue stopped
//
// A transmitted frame may be answered inside the device (Loopback,
// Responder) on the receive queue of its pair. So while the driver has a
// receive queue stopped (StopQueue, which a vhost-user back-end calls on
// SET_VRING_ENABLE 0, GET_VRING_BASE and SET_STATUS 0), the transmit queues
// whose replies go there consume nothing: their chains stay in the avail
// ring, part of the ring state that StopQueue of the transmit queue returns
// (its NextAvail is the first chain not consumed) and that migrates.
// StartQueue of the receive queue lets them go on (it kicks their workers).
// StopQueue of a receive queue first waits for the batch each transmit
// worker is in, so no reply of a frame consumed before the stop is lost
// either (a worker checks at the start of each batch under a mutex of its
// own: per batch, one uncontended lock and one atomic load, no allocation).
// QEMU stops a device's rings in index order (receiveq k before transmitq
// k); without this rule the frames transmitted in between were consumed and
// their replies dropped (DropRxNotReady). The rule holds whatever the
// handler (ForwardTo too): the device cannot tell which frames will be
// answered. Reset lifts every hold. A receive
// queue that was never started holds nothing: frames are consumed, and
// their replies dropped as before.
package softnet
