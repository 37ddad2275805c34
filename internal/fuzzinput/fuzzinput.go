// Package fuzzinput reads a fuzz target's input as a stream of bytes: the
// operations of a hostile peer that the vring and softnet ring fuzzers
// decode one byte at a time.
package fuzzinput

// Reader reads the bytes of a fuzz input in order. Past the end every byte
// reads as zero, so that an operation cut short by the input's end still
// decodes (its missing arguments are zero) and a fuzzer needs no length
// check per argument.
type Reader struct {
	data []byte
	p    int
}

// New returns a Reader of data.
func New(data []byte) *Reader { return &Reader{data: data} }

// Next returns the next byte, or 0 past the end.
func (r *Reader) Next() byte {
	if r.p >= len(r.data) {
		return 0
	}
	r.p++
	return r.data[r.p-1]
}

// More reports whether bytes are left.
func (r *Reader) More() bool { return r.p < len(r.data) }
