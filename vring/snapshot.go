package vring

import "fmt"

// RingSnapshot is the state of a split ring's shared index and
// notification fields as they lie in guest memory, for diagnostics (a stall
// watchdog dumping both sides' view of a ring).
//
// Without EVENT_IDX the rings have no event fields; UsedEvent and
// AvailEvent are then 0.
//
// For a packed queue (Packed set) the fields hold the event suppression
// structures: AvailFlags and UsedEvent the driver area's desc_event_flags
// and desc_event_off_wrap, UsedFlags and AvailEvent the device area's;
// AvailIdx and UsedIdx are 0 (a packed ring has no index fields).
type RingSnapshot struct {
	AvailFlags, AvailIdx, UsedEvent uint16 // written by the driver
	UsedFlags, UsedIdx, AvailEvent  uint16 // written by the device
	Packed                          bool
}

func (s RingSnapshot) String() string {
	if s.Packed {
		return fmt.Sprintf("packed driver event{flags %#x off_wrap %#x} device event{flags %#x off_wrap %#x}",
			s.AvailFlags, s.UsedEvent, s.UsedFlags, s.AvailEvent)
	}
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
	if q.pk != nil {
		return q.packedSnapshot()
	}
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
