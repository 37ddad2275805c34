// Package dirty tracks which guest pages a device wrote, in the vhost
// dirty-log format, and drives iterative pre-copy live migration from it.
//
// # The log format
//
// A Bitmap covers guest addresses [0, Span()). Bit n marks page n, the
// PageSize() bytes at n*PageSize() (4 KiB by default, any power of two).
// Bits are stored as little-endian 64-bit words: word w holds pages
// 64w..64w+63, page 64w+b at bit b; equivalently byte k holds pages
// 8k..8k+7. This is the layout of the Linux vhost log (VHOST_SET_LOG_BASE
// takes Addr()) and of the vhost-user log (VHOST_USER_SET_LOG_BASE sends
// Fd(), Size() and FdOffset()), so the same memory can be handed to the
// kernel or to a peer process and read back here.
//
// A Bitmap lives in ordinary memory (New), in a memfd mapped MAP_SHARED
// (New with Options.Shared), in memory someone else allocated (Attach), or
// in a log fd a peer sent (AttachFd).
//
// # Marking and harvesting
//
// Mark(addr, len) sets the bit of every page the byte range touches with one
// atomic OR per 64-page word, so any number of goroutines (and the kernel, and
// peers sharing the memory) can mark at once. On a private bitmap (New
// without Options.Shared), a word whose bits are all set already is only
// loaded: a device marks the
// same ring and buffer pages over and over between harvests, and the
// locked instruction is most of a mark's cost. A range outside the span is an
// error (ErrOutOfSpan), never dropped. LogWrite is Mark under the name of
// vring's WriteLogger interface, so a *Bitmap logs a device queue's writes
// directly; the two packages do not import each other.
//
// Harvest atomically takes the set bits out of a live log (each non-zero
// word is swapped with zero; zero words are only read) and ORs them into a
// destination bitmap or word slice, allocating nothing. A bit set while a
// harvest runs is either taken by it or left for the next one: never lost,
// never taken twice. A consumer that cannot process what it harvested puts
// it back with Union (or UnionWords). DirtyPages and DirtyRuns iterate
// pages and runs of pages; Count counts them.
//
// A Cache (Bitmap.NewCache) batches one writer's marks: a mark into a word
// it already holds is a plain OR, and Flush applies each word with one
// atomic OR. A device queue's burst of buffers, used entries and used index
// then costs an atomic per distinct word instead of one per mark. A Cache
// belongs to one goroutine, and its marks reach the log only when it is
// flushed (see Cache for who flushes when); vring's DeviceQueue flushes one
// given as its logger at every push, and the servers in package vdpa give
// each ring its own.
//
// # Size and memory
//
// New refuses a log larger than MemoryLimit, a quarter of the machine's
// physical memory and on 32-bit at most 1 GiB, a quarter of the address
// space (ErrTooLarge, in a *SizeError): a log covers 32768 times
// its size of guest memory, so a larger one is a mistake, and a private
// bitmap beyond memory would end the process with a runtime out-of-memory
// failure when first used. A log mapped from a file (a shared New,
// AttachFd) takes memory only for the file pages someone wrote: the scans
// (Harvest, HarvestWords, Count, Clear, Union's source, the iterators) ask
// the file for its data runs (lseek SEEK_DATA/SEEK_HOLE) and skip its
// holes, because reading a hole of a memfd through a shared mapping
// allocates it. Harvesting a clean, never-written log reads nothing.
// Measured on a 1 TiB guest's log (32 MiB): a shared log written once
// everywhere harvests as fast as a private one (one data run); the worst
// case, every other page of log a hole, costs about 4 µs per run (16 ms for
// 4096 runs). A summary bitmap kept by Mark would have cost Mark a second
// atomic and would not see the pages a peer or the kernel writes.
//
// # Memory ordering
//
// Marks are atomic ORs and harvests atomic swaps, both sequentially
// consistent under the Go memory model; everything else reads the words with
// atomic loads. A writer that stores into guest memory and then marks the
// page is therefore seen completely by a harvester whose swap returned the
// bit: the harvester may read the page right after harvesting. Mark after the
// write it records, never before. Writers outside the Go program (the kernel,
// a peer process) use locked or byte-atomic ORs of their own on the shared
// memory, which the swap takes just the same.
//
// A mark that skips its OR because the bit is set (private bitmaps only)
// stores nothing, so nothing orders its write to guest memory before the
// load that found the bit, and a harvest could take the bit and read the
// page before the write lands. Every operation that takes bits out of such
// a bitmap (Harvest, HarvestWords, Clear) therefore ends, when it took
// any, with membarrier(2) (MEMBARRIER_CMD_PRIVATE_EXPEDITED): a full
// barrier on every CPU running a thread of the process, which returns only
// once every write a skipped mark recorded is visible. It costs the harvest
// 1.5 µs with no other thread running, and tens of µs in a virtual machine
// whose other CPUs run the process's threads (an interrupt to each). That
// is why only private bitmaps skip: every harvest of them goes through
// this package in this process, while a log that another process may
// harvest (a shared New, Attach, AttachFd: the vhost-user front-end's) is
// always ORed. Where membarrier is unavailable (kernels before 4.14, or a
// seccomp filter that refuses it with an error), or under the race
// detector, every mark ORs. A private New registers the process for
// membarrier's expedited command once it is called (a filter that kills on
// an unlisted system call must list membarrier).
//
// # Platforms
//
// Shared (memfd) bitmaps and AttachFd need Linux; elsewhere they report
// ErrUnsupported. On a big-endian host the package converts each word so
// that the memory still holds the little-endian log format.
//
// # Pre-copy
//
// A Tracker drives iterative pre-copy: the first round sends all of guest
// memory; each later round sends what the previous one harvested from the
// log, i.e. what the guest and device dirtied while that round was being
// sent. The tracker records each round's pages and bytes, estimates the dirty
// rate and the downtime of stopping now, and decides when to stop and copy:
// when the downtime target is met, the rounds are exhausted, or the dirty set
// stops shrinking. See Tracker for the algorithm.
package dirty
