package dirty

import "golang.org/x/sys/unix"

// This file holds the package's use of membarrier(2), the process-wide
// barrier that lets Mark skip its locked instruction (see Bitmap.probe).

// membarrier(2) commands, from <linux/membarrier.h>.
const (
	membarrierQuery                    = 0
	membarrierPrivateExpedited         = 1 << 3
	membarrierRegisterPrivateExpedited = 1 << 4
)

// registerBarrier registers this process for MEMBARRIER_CMD_PRIVATE_EXPEDITED
// and reports whether the kernel offers it. Registration is per process,
// idempotent and never undone; it costs two system calls. It fails (and
// marks keep their atomic OR) on kernels before 4.14 and where a seccomp
// filter refuses the call.
func registerBarrier() bool {
	cmds, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierQuery, 0, 0)
	if errno != 0 || cmds&membarrierPrivateExpedited == 0 {
		return false
	}
	_, _, errno = unix.Syscall(unix.SYS_MEMBARRIER, membarrierRegisterPrivateExpedited, 0, 0)
	return errno == 0
}

// processBarrier runs a full memory barrier on every CPU that runs a thread
// of this process (MEMBARRIER_CMD_PRIVATE_EXPEDITED); a thread that is not
// running passed one when it was switched out. When it returns, every store
// any thread of the process made before its barrier point is visible to
// every CPU, and every load a thread makes after its barrier point sees
// every store the caller made before the call. It takes about 1.5 µs when
// no other thread of the process runs, and tens of µs in a virtual machine
// when they do (an interrupt to each of their CPUs).
func processBarrier() error {
	if _, _, errno := unix.Syscall(unix.SYS_MEMBARRIER, membarrierPrivateExpedited, 0, 0); errno != 0 {
		return &OpError{Op: "membarrier", Err: errno}
	}
	return nil
}
