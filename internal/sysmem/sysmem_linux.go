package sysmem

import "golang.org/x/sys/unix"

// Total returns the machine's physical memory in bytes (sysinfo(2)
// totalram × mem_unit), or 0 when it cannot be read.
func Total() uint64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	unit := uint64(si.Unit)
	if unit == 0 {
		unit = 1
	}
	return uint64(si.Totalram) * unit
}
