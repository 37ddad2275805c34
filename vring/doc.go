// Package vring is guest memory and virtio 1.x virtqueues, split and packed,
// from both ends: the device side (what a device or a vhost back-end does)
// and the driver side (what a guest driver, a VMM test or a shadow relay
// does).
//
// # Guest memory
//
// A Memory is a set of non-overlapping Regions mapping guest addresses
// (guest-physical addresses or IOVAs, GuestAddr) to host bytes.
// NewMemfdRegion backs a region with a memfd mapped MAP_SHARED and exposes
// its fd, offset and host address, which is what vhost-vdpa (the kernel
// ignores anonymous private memory) and vhost-user peers need; NewFdRegion
// maps an fd received from a peer; NewRegion wraps memory mapped elsewhere.
// Every translation is overflow- and bounds-checked: Slice returns zero-copy
// bytes of a range inside one region, Read/Write/ReadAt/WriteAt copy and may
// cross adjacent regions, and no guest address becomes a host access
// without those checks. The last region hit is cached. NewMemoryWithOptions
// can add regions on demand (MemoryOptions.Fault, for IOVA spaces that grow
// lazily, like VDUSE's) and RemoveRange drops them again.
//
// # Queues
//
// A Layout (size and the guest addresses of the descriptor table,
// available ring and used ring) and a QueueState (next available and next
// used index) are plain, untrusted data. A live queue exists only through
// NewDeviceQueue or NewDriverQueue, which validate the layout (power-of-two
// size up to 32768, alignments 16/2/4, no overflow or overlap, each area
// inside one region and host-aligned) once, so the hot paths work on
// validated slices.
//
// The same two types handle packed virtqueues (virtio 1.2 §2.8): with
// VIRTIO_F_RING_PACKED in the features the constructors build a packed
// queue (Packed reports it) and every method keeps its signature with the
// packed meaning. The Layout's three addresses are then the descriptor
// ring (16*Size bytes, 16-aligned), the driver event suppression area and
// the device event suppression area (4 bytes, 4-aligned each): virtio-pci's
// queue_desc, queue_driver and queue_device, vhost's desc, avail and used
// addresses. The size is 1..32768, not necessarily a power of two
// (ContiguousPackedLayout, ValidPackedQueueSize). A QueueState holds, per
// side, the ring index in bits 0..14 and the wrap counter in bit 15 (the
// encoding of vhost-user's GET/SET_VRING_BASE, vhost-vdpa and QEMU); a
// fresh packed queue starts at InitialState (index 0, wrap counters 1), not
// at the zero QueueState. Chain.Head is the buffer id (the id of the
// chain's last ring descriptor) and Chain.Descs the number of ring
// descriptors the chain occupies; the device may complete chains in any
// order, and the driver side follows the used descriptors by id. The
// device side writes a used descriptor per chain, with VIRTIO_F_IN_ORDER
// too; the driver side also follows a device that writes one for a run of
// chains (§2.8.8) and returns each chain of the run.
// DeviceQueue.AdoptInFlight re-declares chains that were in flight when a
// packed queue's state was saved, so the restored queue can push them.
//
// Device side lifecycle:
//
//	q, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: l, Features: f, Log: bitmap})
//	for {
//		for ok, err := q.Pop(&c); ok; ok, err = q.Pop(&c) { ...; q.PushChain(&c, n) }
//		if q.NeedsInterrupt() { call.Signal() }
//		if pending, _ := q.EnableNotify(); !pending { kick.Wait(ctx) }
//		q.DisableNotify()
//	}
//	st := q.State() // migration: save; DeviceQueueOptions.State restores
//
// Pop walks NEXT chains and INDIRECT tables and presents the readable
// segments, then the writable ones, as zero-copy slices; PopBatch and
// PushBatch amortise the index accesses (ReclaimBatch on the driver side;
// PopBatchFit for a device popping ahead of its need, without letting the
// driver grow the Chains it holds),
// and Prefetch asks the CPU for a batch's buffers (the next chains' first
// lines) before any is copied, for a device whose driver runs on another
// CPU. NeedsInterrupt and NeedsKick
// implement VIRTIO_F_EVENT_IDX and the NO_INTERRUPT/NO_NOTIFY flags;
// EnableNotify and EnableInterrupts handle the "enable notifications, then
// re-check the ring" race (see EnableNotify).
//
// With a WriteLogger (a dirty-page bitmap), the device side logs every
// guest write it makes: used entries, used.flags/idx, avail_event, and the
// bytes PushChain reports as written. DeviceQueueOptions.UsedLogAddr logs
// used-ring writes at a different guest address than the ring is accessed
// at, like vhost's log_guest_addr. A push logs used.idx and the entries it
// wrote as one range when they share used.idx's 4 KiB page. Without a
// logger, logging costs one nil check. A logger that is also a LogFlusher
// (dirty.Cache) holds marks back and is flushed by the queue at the end of
// every push and notification change, and by the queue's owner
// (DeviceQueue.FlushLog) when the queue stops.
//
// # Dirty logging of packed queues
//
// A packed queue's device side writes used descriptors into the
// descriptor ring (len, id and flags: bytes 8..15 of each) and the device
// event suppression structure; it logs each of those writes, and
// PushChain's written bytes. The rule it implements: UsedLogAddr is the
// guest-physical address of the descriptor ring (zero: Layout.Desc) and
// DeviceEventLogAddr that of the device event suppression area (zero:
// Layout.Used). That is how DPDK's vhost library reads vhost-user's
// log_guest_addr for a packed ring (it logs a used descriptor at
// log_guest_addr + 16*index). QEMU, however, sends log_guest_addr = the
// guest address of the ring's "used" area whatever the format
// (vhost_virtqueue_set_addr: used_phys), which for a packed ring is the
// device event suppression area. A vhost-user back-end therefore should
// not pass log_guest_addr through for a packed ring: it should translate
// the ring's desc and used user addresses through the memory table
// (Memory.UserToGuest) and pass those as UsedLogAddr and
// DeviceEventLogAddr, which is right whatever the front-end sent; and a
// front-end talking to DPDK should send the descriptor ring's
// guest-physical address as log_guest_addr.
//
// # Hostile input
//
// Ring contents come from the other side and are never trusted. Each
// broken rule is a distinct sentinel (ErrHeadOutOfRange, ErrNextOutOfRange,
// ErrChainLoop, ErrChainTooLong, ErrTooManySegments (a refinement of
// ErrChainTooLong), ErrNestedIndirect, ErrIndirectWithNext,
// ErrIndirectSize, ErrReadableAfterWritable, ErrBufferOutOfRange,
// ErrAvailIdxJump on the device side; ErrUsedIDNotOutstanding,
// ErrUsedLenTooLarge, ErrUsedIdxJump on the driver side) returned inside a
// *QueueError that names the queue and the descriptor or ring index.
// Packed rings add ErrBufferIDOutOfRange, ErrBufferIDInFlight and
// ErrDescNotAvailable (a chain's later descriptor not marked available
// for its lap while its head is: the driver makes the head available
// last, so that is hostile; a head not marked available is simply not
// available yet, never an error); a packed chain running into descriptors
// in flight is ErrChainTooLong (the rules are listed at packedWalk). After
// one, the queue is broken, like a device that set NEEDS_RESET: every call
// returns an error matching both ErrQueueBroken and the original until
// Reset (DriverQueue.Reset also re-initializes the rings, as a driver does
// after a device reset). No input makes a queue panic, loop or access memory outside guest
// memory; every walk is bounded by the queue size, and the segments of a
// chain by MaxChainSegments (buffers laid across many small regions).
//
// # Untrusted memory
//
// Guest memory mapped from a peer's file (NewFdRegion for a vhost-user
// memory table or a VDUSE IOTLB fd) can be taken away by that peer: after
// it truncates the file, touching a page past the new end raises SIGBUS,
// which by default kills the whole process (so does a hugetlbfs page that
// cannot be allocated when first touched). Two defences:
//
//   - At mapping time, NewFdRegion keeps the file from shrinking where it
//     can (SealShrink): a memfd already sealed with F_SEAL_SHRINK (QEMU's
//     memory-backend-memfd seals by default) is safe; an unsealed memfd whose
//     seals are not locked gets F_SEAL_SHRINK added, which only forbids what
//     the peer must not do anyway (opt out with RegionOptions.NoSeal). Other
//     files (locked seals, memfds made without MFD_ALLOW_SEALING, hugetlbfs
//     or tmpfs files) cannot be protected. Region.Sealed tells which case a
//     region is in. NewMemfdRegion seals its own memfds.
//   - At run time, code that touches guest memory runs on goroutines with
//     runtime/debug.SetPanicOnFault(true) (it applies to the calling
//     goroutine only) under a deferred CatchFault, which turns the fault into
//     a *FaultError matching ErrMemoryFault; Guard does both for a single
//     call. Memory.Read and Write (about 8 ns more per call) and
//     NewDeviceQueue's first ring write guard themselves, so a server's
//     control path may use them on its own goroutine. The interrupted work is
//     left half done, so the queues using that memory must be stopped and
//     reported broken (NEEDS_RESET), not continued. Workers set this up once
//     per goroutine or batch, not per buffer: the hot paths stay as they are.
//     This holds in race-detector builds on amd64 and arm64 too: there the
//     ring's atomics are done in assembly on the goroutine's own stack
//     rather than inside the race runtime, where a fault cannot be
//     recovered (internal/guestatomic).
//
// # Ownership and concurrency
//
// A DeviceQueue or DriverQueue is owned by one goroutine: its methods are
// not safe for concurrent use. The other side of the ring may be anywhere:
// another goroutine, another process mapping the same memfd, the kernel, or
// a guest. The index fields shared with it are accessed with atomics in the
// order the virtio specification requires (the protocol is written down in
// ring.go, and for packed rings in packed_ring.go: there a descriptor's
// 32-bit id|flags word is what publishes it, in either direction). A
// Memory is safe for concurrent use by many queues. Zero-copy
// segment buffers alias guest memory; the other side may change them at any
// time, so a device must copy (or validate after copying) anything it
// parses. Memory.Close must not race with queue use.
//
// Queues on Go-heap memory (NewRegion over a make([]byte)) are for
// single-goroutine tests and fuzzing; rings shared between goroutines should
// live in mapped memory (NewMemfdRegion), as real rings do.
//
// The package assumes a little-endian host (virtio 1.x rings are
// little-endian: the hot paths access descriptors and ring entries through
// typed views of the ring memory); amd64 and arm64 use assembly 16-bit
// atomics.
package vring
