package mdev

import "fmt"

// MigState is a VFIO migration v2 device state (enum vfio_device_mig_state
// in linux/vfio.h; the numeric values are the kernel's).
type MigState uint32

// The VFIO migration states.
const (
	MigError      MigState = 0 // VFIO_DEVICE_STATE_ERROR
	MigStop       MigState = 1 // VFIO_DEVICE_STATE_STOP
	MigRunning    MigState = 2 // VFIO_DEVICE_STATE_RUNNING
	MigStopCopy   MigState = 3 // VFIO_DEVICE_STATE_STOP_COPY
	MigResuming   MigState = 4 // VFIO_DEVICE_STATE_RESUMING
	MigRunningP2P MigState = 5 // VFIO_DEVICE_STATE_RUNNING_P2P
	MigPreCopy    MigState = 6 // VFIO_DEVICE_STATE_PRE_COPY
	MigPreCopyP2P MigState = 7 // VFIO_DEVICE_STATE_PRE_COPY_P2P
	numMigStates           = 8
)

// holdsDataPath reports whether a device in state s keeps its data path
// stopped whatever the driver writes: STOP, STOP_COPY and RESUMING, the
// states in which a VFIO device must not change the guest's memory or its
// own state (linux/vfio.h). A VMM that stopped the device has taken its
// last dirty log and may unmap guest memory; a DRIVER_OK written then
// (by a client that drives the registers while the VM is stopped) must
// not start the rings.
func (s MigState) holdsDataPath() bool {
	return s == MigStop || s == MigStopCopy || s == MigResuming
}

func (s MigState) String() string {
	switch s {
	case MigError:
		return "ERROR"
	case MigStop:
		return "STOP"
	case MigRunning:
		return "RUNNING"
	case MigStopCopy:
		return "STOP_COPY"
	case MigResuming:
		return "RESUMING"
	case MigRunningP2P:
		return "RUNNING_P2P"
	case MigPreCopy:
		return "PRE_COPY"
	case MigPreCopyP2P:
		return "PRE_COPY_P2P"
	}
	return fmt.Sprintf("MigState(%d)", uint32(s))
}

// LegalArc reports whether from -> to is one of the single FSM arcs the
// kernel's vfio.h defines:
//
//	RUNNING_P2P -> STOP, STOP_COPY -> STOP, RESUMING -> STOP,
//	PRE_COPY -> RUNNING, RUNNING_P2P -> RUNNING,
//	RUNNING -> RUNNING_P2P, STOP -> RUNNING_P2P, PRE_COPY_P2P -> RUNNING_P2P,
//	RUNNING -> PRE_COPY, PRE_COPY_P2P -> PRE_COPY,
//	RUNNING_P2P -> PRE_COPY_P2P, PRE_COPY -> PRE_COPY_P2P,
//	STOP -> STOP_COPY, PRE_COPY_P2P -> STOP_COPY,
//	STOP -> RESUMING.
//
// (any -> ERROR happens only as the result of a failed transition.)
func LegalArc(from, to MigState) bool {
	switch from {
	case MigRunning:
		return to == MigRunningP2P || to == MigPreCopy
	case MigRunningP2P:
		return to == MigStop || to == MigRunning || to == MigPreCopyP2P
	case MigStop:
		return to == MigRunningP2P || to == MigStopCopy || to == MigResuming
	case MigStopCopy:
		return to == MigStop
	case MigResuming:
		return to == MigStop
	case MigPreCopy:
		return to == MigRunning || to == MigPreCopyP2P
	case MigPreCopyP2P:
		return to == MigRunningP2P || to == MigPreCopy || to == MigStopCopy
	}
	return false
}

// nextState is the next arc on the way from cur to target, the same choice
// the kernel's vfio_mig_get_next_state makes (shortest path that never
// passes through a saving or resuming state it does not end in). MigError
// marks a target that cannot be reached.
var nextState = [numMigStates][numMigStates]MigState{
	MigStop: {
		MigStop: MigStop, MigRunning: MigRunningP2P, MigPreCopy: MigRunningP2P, MigPreCopyP2P: MigRunningP2P,
		MigStopCopy: MigStopCopy, MigResuming: MigResuming, MigRunningP2P: MigRunningP2P, MigError: MigError,
	},
	MigRunning: {
		MigStop: MigRunningP2P, MigRunning: MigRunning, MigPreCopy: MigPreCopy, MigPreCopyP2P: MigRunningP2P,
		MigStopCopy: MigRunningP2P, MigResuming: MigRunningP2P, MigRunningP2P: MigRunningP2P, MigError: MigError,
	},
	MigPreCopy: {
		MigStop: MigRunning, MigRunning: MigRunning, MigPreCopy: MigPreCopy, MigPreCopyP2P: MigPreCopyP2P,
		MigStopCopy: MigPreCopyP2P, MigResuming: MigRunning, MigRunningP2P: MigRunning, MigError: MigError,
	},
	MigPreCopyP2P: {
		MigStop: MigRunningP2P, MigRunning: MigRunningP2P, MigPreCopy: MigPreCopy, MigPreCopyP2P: MigPreCopyP2P,
		MigStopCopy: MigStopCopy, MigResuming: MigRunningP2P, MigRunningP2P: MigRunningP2P, MigError: MigError,
	},
	MigStopCopy: {
		MigStop: MigStop, MigRunning: MigStop, MigPreCopy: MigError, MigPreCopyP2P: MigError,
		MigStopCopy: MigStopCopy, MigResuming: MigStop, MigRunningP2P: MigStop, MigError: MigError,
	},
	MigResuming: {
		MigStop: MigStop, MigRunning: MigStop, MigPreCopy: MigError, MigPreCopyP2P: MigError,
		MigStopCopy: MigStop, MigResuming: MigResuming, MigRunningP2P: MigStop, MigError: MigError,
	},
	MigRunningP2P: {
		MigStop: MigStop, MigRunning: MigRunning, MigPreCopy: MigRunning, MigPreCopyP2P: MigPreCopyP2P,
		MigStopCopy: MigStop, MigResuming: MigStop, MigRunningP2P: MigRunningP2P, MigError: MigError,
	},
	// MigError: every entry is MigError (the zero value); only a device
	// reset leaves ERROR.
}

// TransitionError reports a requested migration state change that the FSM
// does not allow.
type TransitionError struct {
	From, To MigState
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("mdev: no migration path from %s to %s", e.From, e.To)
}

// Unwrap returns ErrMigrationState.
func (e *TransitionError) Unwrap() error { return ErrMigrationState }

// MigrationPath returns the sequence of single arcs the device walks to get
// from cur to target (excluding cur; empty when cur == target), or a
// *TransitionError when target is not reachable: ERROR can never be
// requested, nothing leaves ERROR but a reset, and the saving states cannot
// be entered from STOP_COPY or RESUMING.
func MigrationPath(cur, target MigState) ([]MigState, error) {
	if cur >= numMigStates || target >= numMigStates || cur == MigError || target == MigError {
		return nil, &TransitionError{From: cur, To: target}
	}
	var path []MigState
	for s := cur; s != target; {
		n := nextState[s][target]
		if n == MigError || !LegalArc(s, n) {
			return nil, &TransitionError{From: cur, To: target}
		}
		path = append(path, n)
		s = n
	}
	return path, nil
}
