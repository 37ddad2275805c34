// Package guestatomic holds the atomic operations vring and dirty perform on
// memory a peer shares with this process: ring indexes and event words in
// guest memory, descriptor words of packed rings, and dirty-log words. (The
// 16-bit ring fields are vring's load16 and store16, assembly in every build
// on amd64 and arm64, so the race-build hazard below does not reach them.)
//
// In an ordinary build each function is the corresponding sync/atomic
// operation (Load32 is atomic.LoadUint32, Or64 atomic.OrUint64, ...), inlined
// by the compiler: there is no cost to going through here.
//
// Under the race detector the sync/atomic operations are not safe on such
// memory. The race runtime touches the address once on the goroutine's stack
// (to raise a fault early) and then performs the operation inside the race
// runtime on the system stack. A peer that truncates the file behind the
// mapping between those two steps makes the second access fault where the
// runtime cannot turn the fault into a panic, and the process dies ("traceback
// did not unwind completely") instead of returning vring.ErrMemoryFault. The
// race builds of this package therefore perform the access in assembly on the
// goroutine's stack, where runtime/debug.SetPanicOnFault applies as in an
// ordinary build, and tell the race detector about the synchronization
// separately (runtime.RaceReleaseMerge before a store, runtime.RaceAcquire
// after a load). For memory outside Go's heap, the only memory a peer can
// truncate, the race detector ignores both the annotations and the
// synchronization of sync/atomic, so nothing it checks is lost. For memory in
// Go's heap (private dirty bitmaps, rings in tests) the annotations give at
// least the happens-before edges sync/atomic would have (a store's release
// merges with earlier ones instead of replacing them, which only adds edges
// on a word with several writers), but the access itself is invisible to
// the detector: a plain access racing with one of these operations on the
// same word is no longer reported. On architectures without the assembly
// (any but amd64 and arm64), race builds keep sync/atomic and the hazard;
// FaultSafe is false there.
//
// Every operation is sequentially consistent, like sync/atomic's. Pointers
// must be aligned to the operand's size.
package guestatomic
