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
//     features: MQ, LOG_SHMFD, REPLY_ACK, CONFIG, RESET_DEVICE, STATUS;
//     dirty logging (VHOST_F_LOG_ALL, SET_LOG_BASE) writes into a
//     dirty.Bitmap attached to the front-end's log.
//   - Frontend (we are the VMM) implements vdpa.Device, vdpa.Suspender and
//     vdpa.Logger over a socket (Dial, NewFrontend): memory regions travel
//     with their fds, ring addresses as this process's addresses.
//
// Ring life cycle in the back-end follows the spec's ring states: a ring
// starts when it has received SET_VRING_KICK (with a descriptor, or the
// invalid-fd flag meaning "poll") and is enabled (at once without
// PROTOCOL_FEATURES, else by SET_VRING_ENABLE 1), and stops on
// GET_VRING_BASE. A disabled ring is stopped rather than run "without side
// effects": the Handler contract has no such state, and a stopped ring
// loses nothing. Changes a running ring cannot absorb (a new call or kick
// descriptor, new addresses, LOG_ALL toggled, a new memory table or log)
// stop it, keeping its state, and start it again.
//
// Hostile input: every message is checked against its type (payload size,
// descriptor count, the 8-region and 256-byte limits, queue indexes and
// sizes, ring addresses inside the memory table, memory-table descriptors
// that are regular files long enough for their regions). A violation ends
// the session with a *MessageError wrapping one of the Err sentinels
// (errors.Is), after a failure acknowledgement when the front-end asked for
// one; every descriptor received is closed on every path. FuzzDecode and
// FuzzBackendSession exercise the decoder and the back-end's state machine.
//
// Package vhostusertest holds a small virtio-net Handler (loopback, sink,
// ARP/ICMP responder) for tests, DPDK interop and examples.
package vhostuser
