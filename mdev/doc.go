// Package mdev is a mediated virtio-net VF: an emulated virtio 1.x modern
// PCI control path in front of any vdpa.Device, with a passthrough data path
// and live migration.
//
// # Control path
//
// A VMM exposes a Device on its PCI bus using Layout and the configuration
// space image (RegionPCIConfig: vendor 0x1af4, device 0x1040+id, the
// virtio vendor capabilities COMMON/NOTIFY/ISR/DEVICE/PCI_CFG and MSI-X),
// and forwards the guest's accesses to Read and Write (or ReadBAR and
// WriteBAR). The device implements the common configuration structure, the
// notification area, the ISR byte and the device configuration as virtio 1.2
// §4.1 specifies, and the status state machine of §2.1 and §3.1: features
// are negotiated through the select windows (the offer is the backing
// device's, less Options.Features' mask, less the transport bits this
// emulation does not implement, and closed over the spec's feature
// requirements: no feature without what it requires, §2.2.2), config
// reads are consistent with config_generation, FEATURES_OK is refused (reads
// back clear) when the driver accepted something not offered, writes the
// spec forbids in the current state are ignored, writing 0 resets, and a
// backing device failure sets DEVICE_NEEDS_RESET and raises the
// configuration interrupt. A reset completes (device_status reads 0, which
// the driver waits for before it reuses its rings, §2.4) only once the
// backing device has reset too: while it refuses, device_status reads
// DEVICE_NEEDS_RESET, Err says why, and each status read tries again. A backing device that gives up on its own while
// live (a software device breaks a queue whose ring the guest made invalid,
// a vhost-user back-end goes away) is noticed by a watcher goroutine that
// asks it for its status every Options.HealthInterval (50 ms by default)
// while the device is live, or, when the backing device announces its
// failures (vdpa.FailureNotifier, as vdpa.Local over softnet does), each
// time it announces one, so the guest is notified without having to read
// device_status first.
//
// # Passthrough
//
// When the driver sets DRIVER_OK the device validates every enabled queue
// and programs the backing device with the negotiated features, the guest
// memory and each queue's size, ring addresses and position. The queue's
// kick eventfd (KickFD, which a VMM can register as a KVM ioeventfd) is
// handed to the backing device, and the backing device signals the VMM's
// irqfd (Options.Vector, or CallFD) directly: the data path never passes
// through this package.
//
// # Migration
//
// SetMigrationState implements the VFIO migration v2 state machine
// (MigrationPath gives its arcs). Entering STOP suspends the backing device
// and reads back its ring positions; STOP_COPY captures the device state
// (SaveState) as a versioned, length-bounded, CRC32C-checksummed stream
// (EncodeState); RESUMING accepts a stream (LoadState), which is validated
// whole — framing, checksum, the spec's rules, compatibility with this
// device — before anything is applied, and the device restarts from the
// restored positions on its way back to RUNNING. In STOP, STOP_COPY and
// RESUMING the data path stays stopped whatever the driver writes: a
// DRIVER_OK written there is recorded (its rings checked at once) and takes
// effect on the way back to RUNNING. Nor does a stopped device raise
// interrupts (linux/vfio.h): a change of the backing device's configuration
// is shown (new config_generation, new contents) and notified with one
// configuration interrupt when the device runs again, and a failure that
// sets DEVICE_NEEDS_RESET sets the bit at once but is notified then too. A
// state captured meanwhile carries both, and the destination notifies when
// it runs (as it does for any configuration notification whose ISR bit the
// driver had not read).
//
// While the device is passed through, StartDirtyTracking tracks the pages
// the data path writes either by the backing device's own log
// (vdpa.Logger) or by a shadow relay (see DirtyRelay) that forwards the
// guest's chains to shadow rings and marks every page written. Switching in
// and out of relay mode while traffic flows loses and duplicates nothing.
//
// MigrateSource and MigrateDestination drive a whole migration over an
// io.ReadWriter (a TCP connection, typically) with a small framed protocol:
// iterative pre-copy of guest memory driven by a dirty.Tracker while the
// guest runs, then stop-and-copy of the last dirty pages and the device
// state, and restore on the destination, which validates every message
// (page addresses inside its guest memory, sizes bounded) and loads the
// device state only whole. Pages travel in messages of at most 1 MiB of
// whole pages, for any dirty-log page size from 512 bytes to 64 KiB
// (guest-memory regions aligned to it); dirty runs are split at region
// boundaries. Any failure of MigrateSource leaves the device RUNNING with
// tracking off and tells the destination. The formats are frozen per
// version under testdata/compat. Package mdevtest provides a guest-side
// driver whose state lives entirely in guest memory, for tests and the
// examples/migrate demo.
//
// # Concurrency
//
// Back-end operations (status transitions, migration arcs, dirty-tracking
// switches, Close) are serialised by a lock of their own and call the
// backing device with the register lock released, so a slow back-end never
// stalls the guest's register reads; a read that would consult the backing
// device during such an operation answers from the device's last copy. The
// blocking calls have Context variants (SetMigrationStateContext,
// StartDirtyTrackingContext, WriteContext, ...) whose ctx bounds the wait
// for an operation in progress.
//
// # Packed virtqueues
//
// When the backing device offers VIRTIO_F_RING_PACKED the device offers it
// too. With it negotiated, queue_size takes any size from 1 to the maximum
// (virtio 1.2 §2.8; split rings keep the power-of-two rule), queue_desc is
// the descriptor ring (16-aligned), queue_driver the driver event
// suppression area and queue_device the device event suppression area
// (4-aligned, 4 bytes each), and a fresh queue starts at vring.InitialState
// (index 0, wrap counters 1). Ring positions — read back on suspend, handed
// to the backing device, carried in the state stream (version 2) — are
// packed positions in the vhost encoding: ring index in bits 0..14, wrap
// counter in bit 15. The shadow relay serves a packed guest ring too: its
// shadow rings stay split (the backing device is negotiated without
// RING_PACKED while the relay runs, and a shadow ring's size is the next
// power of two), completions go back to the guest by buffer id, and on stop
// the guest queue is rewound by the descriptors of the chains the backing
// device never consumed.
//
// Limits: no NOTIFICATION_DATA or RING_RESET; legacy and transitional
// interfaces are not emulated; the relay needs a backing device that can reach a memory region placed above
// guest memory and that completes the chains it consumed before Suspend
// returns (or before GET_VRING_BASE), which vhost-net, vdpa_sim and the
// software device do — a device that cannot is reported with ErrInFlight
// rather than losing chains.
//
// Sysfs manages VFIO mediated devices of real hardware (parents, supported
// types, create and remove by UUID) under a configurable sysfs root.
package mdev
