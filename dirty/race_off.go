//go:build !race

package dirty

// probeMarks enables Bitmap.probe where the kernel offers membarrier(2)
// (see race_on.go for why the race detector turns it off).
const probeMarks = true
