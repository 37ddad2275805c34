// Package mgmt manages kernel vDPA devices through the "vdpa" generic
// netlink family, the interface iproute2's vdpa tool speaks: list
// management devices (the parents that can create vDPA devices, such as
// vdpa_sim_net or a NIC's vDPA-capable function) with their supported
// device classes and limits, add and delete vDPA devices, show devices,
// their configuration and per-queue vendor statistics.
//
// A device added here appears as /dev/vhost-vdpa-N once the vhost_vdpa
// driver binds it; vdpa/kernel opens it.
//
// Everything goes through github.com/mdlayher/genetlink. Tests use
// genltest fakes; the real-kernel harness compares the results with the
// output of `vdpa -j` on the same devices.
package mgmt
