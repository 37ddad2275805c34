package vring

import "fmt"

// RingSnapshot is the state of a split ring's shared index and
// notification fields as they lie in guest memory, for diagnostics (a stall
// watchdog dumping both sides' view of a ring).
//
// Without EVENT_IDX the rings have no event fields; UsedEvent and
// AvailEvent are then 0.
type RingSnapshot struct {
	AvailFlags, AvailIdx, UsedEvent uint16 // written by the driver
	UsedFlags, UsedIdx, AvailEvent  uint16 // written by the device
}

func (s RingSnapshot) String() string {
	return fmt.Sprintf("avail{flags %#x idx %d used_event %d} used{flags %#x idx %d avail_event %d}",
		s.AvailFlags, s.AvailIdx, s.UsedEvent, s.UsedFlags, s.UsedIdx, s.AvailEvent)
}

// Snapshot loads the ring's shared fields from guest memory. It reads only
// guest memory, with atomic loads, so unlike the queue's other methods it
// may be called from any goroutine while the owner works on the queue. The
// fields are loaded one by one: they need not be mutually consistent. Like
// any ring access it faults if the ring's pages were truncated away (see
// Guard).
func (q *DeviceQueue) Snapshot() RingSnapshot {
	uf, ui := q.r.loadUsedWord()
	s := RingSnapshot{
		AvailFlags: q.r.loadAvailFlags(), AvailIdx: q.r.loadAvailIdx(),
		UsedFlags: uf, UsedIdx: ui,
	}
	if q.r.usedEvent != nil { // EVENT_IDX: the rings hold the event fields
		s.UsedEvent, s.AvailEvent = load16(q.r.usedEvent), load16(q.r.availEvent)
	}
	return s
}
