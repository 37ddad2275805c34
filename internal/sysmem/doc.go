// Package sysmem reports how much memory the machine has, for the size
// bounds of the packages that allocate in proportion to an input (a queue
// count times a queue size, a dirty log's span): an input larger than the
// machine could ever hold is refused with an error instead of killing the
// process with a runtime out-of-memory failure.
package sysmem
