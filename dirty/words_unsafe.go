package dirty

import "unsafe"

// This file holds every unsafe conversion of the package. The callers check
// lengths and alignment first (see checkWordMemory); these helpers only
// reinterpret memory that is known to be long enough and 8-byte aligned.

// aligned8 reports whether the first byte of b is 8-byte aligned, as
// sync/atomic requires for 64-bit operations.
func aligned8(b []byte) bool {
	return len(b) > 0 && uintptr(unsafe.Pointer(&b[0]))%8 == 0
}

// bytesAsWords views b, whose length is a non-zero multiple of 8 and whose
// start is 8-byte aligned, as a slice of uint64 sharing the same memory.
func bytesAsWords(b []byte) []uint64 {
	b = b[: len(b)/8*8 : len(b)/8*8] // bounds: never reach past b
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), len(b)/8)
}

// wordsAsBytes views w as its 8*len(w) bytes.
func wordsAsBytes(w []uint64) []byte {
	if len(w) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&w[0])), len(w)*8)
}

// wordsAddr returns the address of w[0] in this process, or 0 for an empty
// slice. Go's heap does not move objects, and mmap'd memory never moves, so
// the address stays valid while the Bitmap holding w is alive.
func wordsAddr(w []uint64) uintptr {
	if len(w) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&w[0]))
}
