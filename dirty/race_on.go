//go:build race

package dirty

// probeMarks is false under the race detector: a Mark that skipped its
// atomic OR would leave the race detector without the release that orders
// the marked write before the harvester's read of the page, and it would
// report a race the process barrier in fact prevents.
const probeMarks = false
