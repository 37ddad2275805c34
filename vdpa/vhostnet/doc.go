// Package vhostnet drives the kernel's classic vhost-net back-end,
// /dev/vhost-net, attached to a tap interface, as a two-queue virtio-net
// vdpa.Device (queue 0 receive, queue 1 transmit). It also implements
// vdpa.Suspender (the rings are detached from the tap and drained) and
// vdpa.Logger (the kernel logs its guest-memory writes into a dirty.Bitmap
// through VHOST_SET_LOG_BASE), which is what live migration of a vhost-net
// device needs.
//
// vhost-net only processes rings: the device's status byte and its
// configuration space (MAC, link status, MTU) are emulated here, from
// Options.
//
// Addresses: descriptors carry guest-physical addresses, translated by the
// kernel through the memory table SetMemory installs (guest_phys_addr =
// Region.Base, userspace_addr = Region.HostAddr); ring addresses are
// addresses in this process, which SetQueueAddr computes with
// Memory.GuestToHost; the dirty log is indexed by guest-physical address,
// and the used ring is logged at its guest address.
//
// The tap is created with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and no offloads;
// its virtio-net header size follows the negotiated features (12 bytes with
// VERSION_1 or MRG_RXBUF, 10 otherwise). The tap provides the header, so
// VHOST_NET_F_VIRTIO_NET_HDR is never negotiated.
package vhostnet
