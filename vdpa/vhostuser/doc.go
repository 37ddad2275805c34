// Package vhostuser speaks the vhost-user protocol (QEMU's
// docs/interop/vhost-user.rst) over a unix stream socket, with file
// descriptors passed in SCM_RIGHTS control messages. It has both ends:
//
//   - Backend (we are the device) serves any vdpa.Handler to a front-end
//     such as QEMU or DPDK's virtio-user, in server mode (ListenAndServe,
//     Serve) or client mode (DialAndServe, which reconnects after the
//     front-end restarts). It maps the front-end's memory table, translates
//     ring addresses (front-end user addresses) to guest addresses, builds a
//     vring.DeviceQueue for each ring it starts and hands it to the Handler;
//     GET_VRING_BASE stops the ring through Handler.StopQueue. Protocol
//     features: MQ, LOG_SHMFD, REPLY_ACK, CONFIG, RESET_DEVICE, STATUS,
//     CONFIGURE_MEM_SLOTS (the memory table built region by region with
//     ADD_MEM_REG and REM_MEM_REG, up to MaxMemSlots regions, as QEMU does
//     when it is negotiated: memory hotplug beyond SET_MEM_TABLE's 8);
//     dirty logging (VHOST_F_LOG_ALL, SET_LOG_BASE) writes into a
//     dirty.Bitmap attached to the front-end's log.
//   - Frontend (we are the VMM) implements vdpa.Device, vdpa.Suspender and
//     vdpa.Logger over a socket (Dial, NewFrontend): memory regions travel
//     with their fds, ring addresses as this process's addresses. With
//     FrontendOptions.Reconnect it outlives its back-end: when the back-end
//     restarts it dials again and hands the new one the whole session,
//     rings resuming where guest memory says the old one stopped, as QEMU
//     does for a vhost-user NIC (ReconnectOptions). A mediated device
//     (mdev) over such a Frontend keeps its guest's NIC through a restart.
//
// # Session life cycle
//
// The back-end's session state machine follows the spec's ring states and
// what QEMU 7.2/11 and DPDK 22.11 actually send (recorded sequences:
// testdata/lifecycle). Ring positions are the invariant it protects.
//
//   - SET_OWNER marks the session's start, as the spec puts it; it does
//     not gate anything. The spec does not have the back-end refuse
//     requests before it, and real front-ends depend on that: QEMU
//     negotiates features before its first SET_OWNER and sends one per
//     queue pair on the same connection, and DPDK 22.11's virtio-user in
//     server mode never sends SET_OWNER when a back-end reconnects. A
//     session that configures the device without it is served and noted
//     in the log once.
//   - Start: a ring starts when it has received SET_VRING_KICK (with a
//     descriptor, or the invalid-fd flag meaning "poll") and is enabled
//     (at once without PROTOCOL_FEATURES, else by SET_VRING_ENABLE 1), and
//     is sized, addressed and mapped. SET_STATUS with DRIVER_OK starts
//     every ring that is ready.
//   - Suspend (position kept, ring restartable without a new kick):
//     SET_VRING_ENABLE 0 and SET_STATUS 0. QEMU's vhost_dev_stop (monitor
//     stop, the stop-and-copy of every migration) sends SET_STATUS 0 and
//     then GET_VRING_BASE, so status 0 is a stop, not a reset: the device
//     (negotiated features, MAC, filters) is kept, as DPDK's net_vhost
//     does. SET_VRING_ENABLE 1 resumes a ring SET_VRING_ENABLE 0
//     suspended. After SET_STATUS 0 only SET_STATUS with DRIVER_OK does
//     (a virtio device uses no ring before DRIVER_OK): no ring starts on
//     SET_VRING_ENABLE 1 or a kick until then. QEMU's cont and DPDK's
//     start end with that SET_STATUS.
//   - Receive before transmit: QEMU disables and stops a device's rings in
//     index order, receiveq k (SET_VRING_ENABLE 0, GET_VRING_BASE) before
//     transmitq k, while the guest may still be transmitting. The
//     back-end stops the rings in the front-end's order; a vdpa/softnet
//     handler then consumes nothing from transmitq k until receiveq k
//     starts again (softnet's "Receive queue stopped"), so no frame is
//     taken whose reply, generated in the device, has no receive queue to
//     go to: the chains stay in the ring, and transmitq k's
//     GET_VRING_BASE answers the first one not consumed, which migrates.
//   - Stop: GET_VRING_BASE stops the ring and answers its next avail
//     index; after SET_STATUS 0 or SET_VRING_ENABLE 0 that is still the
//     real position (not 0). The ring stays stopped until the next
//     SET_VRING_KICK.
//   - Reset (positions back to 0, every ring disabled, features
//     forgotten, handler reset, kick needed again): RESET_DEVICE, and
//     RESET_OWNER, which also gives up ownership (as the kernel's
//     VHOST_RESET_OWNER and DPDK's vhost library do). A ring starts again
//     once the front-end has sent SET_FEATURES and enabled it, as a
//     front-end starting a device does (QEMU's virtio-net does not send
//     RESET_DEVICE; its vhost-user-scsi does, and starts again with
//     SET_FEATURES and the rings). A GET_VRING_BASE after either answers 0.
//   - Restart (position kept): a change a running ring cannot absorb (a new
//     call or kick descriptor, new addresses, LOG_ALL toggled, a new memory
//     table or log, SET_FEATURES) stops every running ring, highest index
//     first, and starts them again, lowest first. A ring that a new
//     SET_MEM_TABLE leaves outside guest memory ends the session; only
//     the rings that were running are checked (a stopped ring's old
//     addresses are replaced by its next SET_VRING_ADDR). A table built
//     region by region passes through states in which a ring's memory is
//     missing (QEMU removes before it adds): after an ADD_MEM_REG or
//     REM_MEM_REG such a ring stays stopped, keeps its position and starts
//     when its memory is back.
//   - SET_VRING_BASE sets the position a stopped ring starts from. The used
//     index is what used.idx in guest memory says. A fresh ring has no
//     chains in flight, so a base that disagrees with used.idx cannot be
//     resumed as is: DPDK's virtio-user in server mode sends base 0 when
//     a restarted back-end reconnects, while used.idx holds the old
//     position; a base ahead of used.idx names chains a previous back-end
//     took and never completed. The back-end then starts from used.idx
//     (avail and used), logs a warning with both values and keeps serving,
//     as DPDK's vhost library does; the session never ends over it.
//     QEMU's cont and migration destination send the saved base, which
//     agrees.
//   - A handler whose StopQueue fails may still own the ring: the ring is
//     marked broken, its state is never read, GET_VRING_BASE answers
//     used.idx (the position the device last published), the ring does
//     not start again, and GET_STATUS reports DEVICE_NEEDS_RESET until a
//     reset.
//   - The end of the connection stops every ring and resets the handler;
//     client mode (DialAndServe) dials again after ReconnectInterval.
//
// # Packed rings
//
// VIRTIO_F_RING_PACKED is negotiated like any device feature (the back-end
// offers it when the Handler does); the back-end then builds packed
// vring.DeviceQueues and the front-end packed rings. What changes on the
// wire:
//
//   - SET_VRING_NUM: any size up to 32768 once RING_PACKED is negotiated,
//     a power of two otherwise (and before SET_FEATURES).
//   - SET_VRING_ADDR: desc, avail and used are the descriptor ring, the
//     driver event suppression area and the device event suppression area.
//     log_guest_addr is not used for a packed ring: its used descriptors
//     land in the descriptor ring, which the back-end logs at its own
//     guest address (QEMU sends the device area's address there); the
//     front-end sends the descriptor ring's address, where DPDK's vhost
//     library logs used descriptors.
//   - SET_VRING_BASE / GET_VRING_BASE: bits 0..15 are the next avail
//     position and bits 16..31 the next used position, each a ring index
//     (bits 0..14) with its wrap counter (bit 15), as QEMU and Linux vhost
//     encode them (internal/vhostcore.VringBase). DPDK sends and answers
//     bits 0..15 only; a zero upper half is read as "used equals avail",
//     which is what a stopped ring without chains in flight has. A ring
//     that never got a base starts fresh (both wrap counters 1).
//   - A packed ring publishes no index in guest memory, but its
//     descriptor ring records the used position: every used descriptor a
//     vring.DeviceQueue writes carries, in its Element Address (unused in
//     a used descriptor), how far it moved the used position, and a ring
//     the driver keeps full of single descriptors shows where its oldest
//     available one is (vring.PackedUsedPosition). A ring started with no
//     chains in flight whose base disagrees with that position starts
//     from the position the ring records instead, with an Info note
//     giving both (vring.PackedResumePosition: a full ring's position,
//     which a slot left over from a used chain can fake, only over a
//     base whose own descriptor is not available in its lap). That is what QEMU needs after a back-end was lost: it
//     could not ask the dead back-end for the position and hands the new
//     one the position of the last hand-over it saw (at first the initial
//     one), which the ring has long left behind; started there, a packed
//     ring finds nothing available and the NIC stays dead. A ring the
//     driver reset is zeroed (virtio 1.2 §2.8.13; DPDK's virtio-user
//     resets and zeroes its packed rings when a back-end reconnects in
//     server mode) and records nothing, or the fresh position: it starts
//     at the base given, and so do rings whose used descriptors another
//     implementation wrote. What the ring cannot tell: the position of a
//     receive ring the driver keeps full of chains of several descriptors
//     (Linux's big-packet mode without MRG_RXBUF and INDIRECT_DESC),
//     which reuses every used slot, and whether a stale base is stale
//     when the ring is full and the base's descriptor happens to be
//     available in the base's lap (the driver an even number of laps past
//     it). Both start at the base given.
//
// Multi-queue: GET_QUEUE_NUM answers the device's queue pairs; every ring
// the front-end enables with SET_VRING_ENABLE is served, pair by pair. QEMU
// and DPDK's virtio-user run the virtio-net control queue themselves and
// negotiate MQ, CTRL_RX, CTRL_MAC_ADDR and CTRL_VLAN without CTRL_VQ: a
// vdpa/softnet device served here should be created with
// softnet.Options.FrontendCtrl (examples/vhost-user-net does), which
// accepts that and answers each pair on its own receive queue.
//
// A disabled ring is stopped rather than run "without side effects": the
// Handler contract has no such state, and a stopped ring loses nothing.
//
// With BackendOptions' Logger at debug level every request is logged in
// the line format of the recorded fixtures ("msg" attribute), and every
// reply.
//
// Hostile input: every message is checked against its type (payload size,
// descriptor count, the 8-region and 256-byte limits, queue indexes and
// sizes, ring addresses inside the memory table, memory-table descriptors
// that are regular files long enough for their regions, the bytes a memory
// table maps in all: BackendOptions.MaxGuestMemory, 16 TiB by default, so
// that sparse files cannot take the process's address space; a pending
// dirty log sized by the table's highest address is a sparse memfd and is
// merged without a copy). A violation ends
// the session with a *MessageError wrapping one of the Err sentinels
// (errors.Is; a kick, call or err descriptor that is not an eventfd wraps
// vdpa.ErrNotEventFD, and a socket error is returned as the socket gave
// it), after a failure acknowledgement when the front-end asked for
// one; every descriptor received is closed on every path. FuzzDecode and
// FuzzBackendSession exercise the decoder and the back-end's state machine.
//
// # Transport
//
//   - A message carries at most MaxFds descriptors; more are closed as they
//     arrive and end the session (ErrFdCount). Descriptors the kernel could
//     not install because this process is at its descriptor limit
//     (MSG_CTRUNC) are reported as ErrFdsExhausted, not as the peer's fault.
//   - Once the first byte of a message has arrived the rest must follow
//     within BackendOptions.MessageTimeout (10s by default), and a reply
//     must be taken by the front-end within it, or the session ends with
//     ErrStalled; between messages a connection may idle.
//   - Serve retries temporary accept failures (EMFILE, ENFILE, ENOBUFS,
//     ENOMEM, ECONNABORTED) after a back-off of 5ms doubling to 1s, logging
//     each, so a back-end at its descriptor limit serves again once
//     descriptors are free.
//   - Frontend: every blocking method has a Context form; Close never waits
//     for a request in flight, and a request interrupted on the socket
//     breaks the session (ErrSessionBroken), unless Reconnect takes it to
//     a new connection: then requests wait for that, within their
//     contexts, and one whose connection failed under it is sent again.
//     See Frontend and ReconnectOptions.
//
// Package vhostusertest holds a small virtio-net Handler (loopback, sink,
// ARP/ICMP responder) for tests, DPDK interop and examples.
package vhostuser
