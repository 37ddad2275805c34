// Package vfiouser serves an mdev.Device to a VMM over vfio-user, the
// protocol QEMU (>= 10.1, -device vfio-user-pci) uses to talk to a PCI
// device implemented in another process (QEMU's docs/interop/vfio-user.rst,
// modelled on the VFIO ioctls of linux/vfio.h).
//
// # What the server does
//
//   - VERSION: protocol 0.0 (what QEMU 11.1 proposes); the reply announces
//     max_msg_fds, max_data_xfer_size, max_dma_maps and pgsizes.
//
//   - DEVICE_GET_INFO: a resettable PCI device with the 9 PCI regions and 5
//     IRQ indices.
//
//   - DEVICE_GET_REGION_INFO: region 7 is the 256-byte configuration space;
//     the BARs are those mdev.Layout describes (BAR 1: MSI-X table and PBA,
//     BAR 4: the virtio structures); every other region is empty. No region
//     is mappable (every register has side effects), so no sparse-mmap
//     capability is sent; the codec encodes and parses one.
//
//   - REGION_READ / REGION_WRITE / REGION_WRITE_MULTI, with or without
//     No_reply: config space accesses of any length are split into natural
//     1/2/4-byte accesses; BAR accesses keep the guest's width (1, 2, 4 or
//     8), which the device checks. A write to the notification area kicks
//     the backing device's kick eventfd; the path allocates nothing.
//
//   - DMA_MAP / DMA_UNMAP: windows with a descriptor are mapped, read-only
//     unless the client made them writable (a device write into a
//     read-only window faults, which the data path catches: the device
//     reports DEVICE_NEEDS_RESET; a backing device that maps guest memory
//     itself, such as a vhost-user back-end, is handed the descriptor and
//     maps it as it can), memfds sealed against shrinking, and become the
//     device's guest memory
//     (Server.Memory, a vring.Memory whose regions appear on first use);
//     windows without one are recorded but are not memory the data path
//     can use. Overlapping maps fail with EEXIST, unmaps must match a map
//     exactly (ENOENT). A window with a descriptor is at most 32 TiB
//     (EINVAL); at most Options.MaxDMAWindows windows are mapped at once
//     (ENOSPC beyond; announced as max_dma_maps) and at most
//     Options.DMABudget bytes of address space are held by windows and by
//     the ranges of retired windows (ENOMEM beyond). The server keeps one
//     descriptor per file the windows map, shared by the file's windows,
//     for at most Options.MaxDMAFiles files (ENOSPC beyond). The limits are
//     checked before anything is mapped, and the session goes on. An unmap
//     releases the window's mapping, and the file's descriptor with its
//     last window, before its reply, whatever the migration state. When memory
//     changes under a running data path (in any of the running migration
//     states), the server stops it through mdev's migration state machine
//     (-> STOP records every ring position) and restarts it afterwards;
//     that pause is the server's own: the client keeps seeing the
//     migration state it set. When the server's stop fails, the server
//     resets the device. A data path that was already impossible to stop
//     that way (live in ERROR, or a backing device that refused its reset:
//     mdev keeps a data path stopped in STOP, STOP_COPY and RESUMING
//     whatever the driver writes) gets the window's pages
//     replaced by anonymous memory, whose address range is unmapped once
//     the data path stops; the 65th such window resets the device instead.
//     Unmaps are not refused (QEMU treats the EEXIST of its next
//     overlapping map as fatal).
//
//   - DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS: INTx (1, maskable, automasked),
//     MSI-X (one vector per queue plus one for configuration changes); MSI
//     and the error/request indices have no interrupts. MSI-X interrupts
//     bypass the server: the backing device signals a per-vector eventfd
//     onto which the client's eventfd is dup3'ed, so QEMU re-registering
//     its eventfds while the data path runs (it does, when the guest
//     unmasks vectors) changes the target without touching the backing
//     device. MSI-X is not maskable through SET_IRQS (as with kernel VFIO,
//     the client masks vectors in its own emulation of the MSI-X table;
//     QEMU 11.1 never sends MSI-X mask/unmask). INTx goes through the
//     server: the device's line-interrupt eventfd (mdev.Options.INTx) sets
//     the ISR and signals the client's eventfd, masked until the client's
//     UNMASK (which QEMU sends at the guest's EOI), re-asserted then if the
//     ISR is still set.
//
//   - DEVICE_RESET: a virtio reset of the device.
//
//   - Disconnect: every DMA window is unmapped, every descriptor of the
//     client closed and its DMA logging stopped (the dirty log was the
//     client's to read); the device keeps its state, and the data path resumes
//     when a new client has mapped memory and touches the device. (A device
//     whose data path cannot be stopped otherwise is reset, so that guest
//     memory is released all the same.)
//
//   - Migration (VFIO migration v2 over DEVICE_FEATURE): MIGRATION offers
//     STOP_COPY and P2P; MIG_DEVICE_STATE walks mdev's state machine
//     (mdev.Device.SetMigrationState; setting the current state again
//     changes nothing); MIG_DATA_READ streams the state
//     captured on entering STOP_COPY (nothing in PRE_COPY), MIG_DATA_WRITE
//     collects the stream in RESUMING (at most 1 MiB), which is validated
//     and loaded when the device leaves RESUMING; DMA_LOGGING_START / STOP /
//     REPORT run mdev's dirty tracking (device log or shadow relay) into a
//     4 KiB-page bitmap, reported and cleared per range at any power-of-two
//     page size. DEVICE_RESET also leaves the ERROR state. A PROBE
//     succeeds only if the feature supports every method (GET, SET) it
//     names; a request whose reply would not fit its argsz is refused with
//     EINVAL, MIG_DATA_READ's included (a short read would end the stream).
//
// Not implemented: DMA_READ / DMA_WRITE (server-initiated accesses to
// windows without descriptors) and GET_REGION_IO_FDS (ENOSYS: QEMU 11.1 does
// not ask).
//
// # Hostile clients
//
// Every message is decoded by the parsers of this package (Decode, fuzzed
// by FuzzDecode): sizes, argsz, flags, indices, ranges and descriptor
// counts are checked before anything is acted on. A bad message gets an
// error reply with an errno (*Error, wrapping one of the Err* sentinels);
// a framing error (a size below the header or above MaxMessage, reserved
// header flags), too many descriptors, a failed VERSION or any message
// before VERSION closes the session. Descriptors a message should not
// carry are closed; beyond max_msg_fds for one message they are closed as
// they arrive, however many pieces the message comes in.
//
// # QEMU 11.1
//
// Only the JSON form of -device works, and guest memory must be shareable:
//
//	-object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem
//	-device '{"driver":"vfio-user-pci","id":"n0","socket":{"path":"/tmp/vfu.sock","type":"unix"}}'
//
// The guest's own virtio_pci driver chooses the ring format: the device
// offers VIRTIO_F_RING_PACKED whenever mdev does (its backing device offers
// it), so a Linux guest runs packed rings (there is no packed=on property
// on vfio-user-pci; mask the bit with mdev.Options.Features for split
// rings). vfiousertest's Driver does either (DriverOptions.Packed).
//
// QEMU 11.1's client DMA-maps guest RAM with memfd descriptors, reads the
// whole configuration space, registers MSI-X eventfds when the guest
// enables MSI-X and again when it unmasks vectors (after DRIVER_OK), and
// prints "Could not enable error recovery for the device" because the
// error IRQ index has no interrupts.
//
// QEMU 11.1's vfio-user client has no migration support ("No live migration
// support yet" in its source): it live-migrates a VM with a vfio-user-pci
// device without any error and without asking for device state
// (query-migrate ends "completed" with "vfio": {"transferred": 0}), so the
// destination's device starts fresh and the guest's NIC stalls there. The
// server cannot tell a migration from a shutdown; when a client disconnects
// while the device is running it logs a warning saying so. The migration
// implemented here is driven by other clients, such as vfiousertest's
// Driver.Migrate.
package vfiouser
