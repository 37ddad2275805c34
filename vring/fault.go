package vring

import (
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
)

// ErrMemoryFault: an access to guest memory faulted. Guest memory mapped
// from a peer's file (a vhost-user memory table, a VDUSE IOTLB entry) stops
// being backed when the peer truncates the file; touching a page past the
// new end of file raises SIGBUS. Under CatchFault (or Guard) that fault is
// this error, wrapped in a *FaultError, instead of the end of the process.
var ErrMemoryFault = errors.New("vring: guest memory access faulted (mapping no longer backed)")

// FaultError is the error CatchFault and Guard return for a memory fault.
// It matches ErrMemoryFault and the runtime.Error the fault raised.
type FaultError struct {
	// Addr is the host address whose access faulted.
	Addr uintptr
	// Err is the runtime error of the fault.
	Err runtime.Error
}

func (e *FaultError) Error() string {
	return fmt.Sprintf("%v: host address %#x: %v", ErrMemoryFault, e.Addr, e.Err)
}

// Unwrap returns ErrMemoryFault and the runtime error.
func (e *FaultError) Unwrap() []error { return []error{ErrMemoryFault, e.Err} }

// faultOf reports whether a recovered panic value is a memory fault at a
// non-nil address: a runtime.Error with an Addr method, which is what the
// runtime panics with for a SIGBUS or SIGSEGV when
// runtime/debug.SetPanicOnFault is on. (A nil dereference panics without
// Addr and is not a memory fault.)
func faultOf(r any) (*FaultError, bool) {
	re, ok := r.(runtime.Error)
	if !ok {
		return nil, false
	}
	a, ok := r.(interface{ Addr() uintptr })
	if !ok {
		return nil, false
	}
	// Addr is read before the panic is recovered (its result is undefined
	// afterwards).
	return &FaultError{Addr: a.Addr(), Err: re}, true
}

// CatchFault turns a memory fault into an error. Use it as
//
//	defer vring.CatchFault(&err)
//
// in a function whose goroutine has runtime/debug.SetPanicOnFault(true)
// (which applies to the calling goroutine only; without it a fault kills
// the process before any recover runs). On a fault it recovers, sets *errp
// to a *FaultError (matching ErrMemoryFault) and the function returns
// normally; any other panic continues unchanged. It must be the deferred
// function itself: recover only works there. A *FaultError that inner code
// caught and panics with again (to hand the fault to an outer guard, say
// because the faulting memory belongs to its caller) is caught the same
// way.
//
// Every fault at a non-nil address in the protected code is reported, so
// a wild pointer in unsafe code would be reported too; guest memory is the
// only mapping vdpakit accesses that another process can take away.
//
// What was in progress when the fault hit is left half done (a chain popped
// and not pushed, a frame half copied), so the caller must treat the queues
// using that memory as broken: stop them and report the error (a device
// sets DEVICE_NEEDS_RESET) rather than continue.
func CatchFault(errp *error) {
	r := recover()
	if r == nil {
		return
	}
	fe, ok := r.(*FaultError)
	if !ok {
		if fe, ok = faultOf(r); !ok {
			panic(r)
		}
	}
	*errp = fe
}

// Guard calls fn with memory faults turned into errors: it turns on
// runtime/debug.SetPanicOnFault for the calling goroutine during the call
// (restoring the previous setting afterwards) and recovers a fault as
// CatchFault does. It costs a few nanoseconds and allocates nothing when
// fn does not fault (fn does not escape), so it suits calls into guest
// memory outside a long-running worker, such as a control-path access on
// a server goroutine. Workers should instead set SetPanicOnFault once and
// defer CatchFault once per loop, not per item.
func Guard(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer CatchFault(&err)
	return fn()
}
