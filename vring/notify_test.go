package vring

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vdpakit/vdpakit/virtio"
)

func TestNeedEventMatchesSpec(t *testing.T) {
	// virtio 1.2 §2.7.10: vring_need_event(event_idx, new_idx, old_idx) is
	// (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old_idx).
	tests := []struct {
		name            string
		event, new, old uint16
		want            bool
	}{
		{"event just published", 5, 6, 5, true},
		{"event inside the published range", 5, 10, 3, true},
		{"event before the published range", 2, 10, 3, false},
		{"event not reached yet", 10, 10, 3, false},
		{"nothing published", 5, 5, 5, false},
		{"range across the 16-bit wrap", 0xffff, 2, 0xfffe, true},
		{"event after wrap inside range", 1, 2, 0xfffe, true},
		{"event after wrap not reached", 2, 2, 0xfffe, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, needEvent(tc.event, tc.new, tc.old))
		})
	}
}

func addOne(t *testing.T, drv *DriverQueue) uint16 {
	t.Helper()
	h, err := drv.Add([]Buffer{{Addr: 0x100000, Len: 16}, {Addr: 0x100100, Len: 16, Writable: true}})
	require.NoError(t, err)
	drv.Publish()
	return h
}

func TestNotificationFlags(t *testing.T) {
	t.Run("2.7.7 driver kicks unless device sets NO_NOTIFY", func(t *testing.T) {
		_, drv, dev := newPair(t, 8, 0)
		addOne(t, drv)
		assert.True(t, drv.NeedsKick())
		assert.False(t, drv.NeedsKick(), "nothing new published")
		dev.DisableNotify()
		addOne(t, drv)
		assert.False(t, drv.NeedsKick())
		pending, err := dev.EnableNotify()
		require.NoError(t, err)
		assert.True(t, pending, "re-enabling must report chains published while disabled")
		addOne(t, drv)
		assert.True(t, drv.NeedsKick())
	})
	t.Run("2.7.7 device interrupts unless driver sets NO_INTERRUPT", func(t *testing.T) {
		_, drv, dev := newPair(t, 8, 0)
		var c Chain
		addOne(t, drv)
		addOne(t, drv)
		assert.False(t, dev.NeedsInterrupt(), "nothing pushed")
		ok, err := dev.Pop(&c)
		require.True(t, ok)
		require.NoError(t, err)
		require.NoError(t, dev.Push(c.Head, 0))
		assert.True(t, dev.NeedsInterrupt())
		drv.DisableInterrupts()
		ok, err = dev.Pop(&c)
		require.True(t, ok)
		require.NoError(t, err)
		require.NoError(t, dev.Push(c.Head, 0))
		assert.False(t, dev.NeedsInterrupt())
		_, _, ok, err = drv.Reclaim()
		require.True(t, ok)
		require.NoError(t, err)
		pending, err := drv.EnableInterrupts()
		require.NoError(t, err)
		assert.True(t, pending, "one used entry is still unreclaimed")
	})
}

func TestEventIdx(t *testing.T) {
	ev := virtio.Features(0).With(virtio.FEventIdx)
	t.Run("2.7.10 driver kicks only when avail.idx passes avail_event", func(t *testing.T) {
		mem, drv, dev := newPair(t, 8, ev)
		// The device armed avail_event = 0 at creation.
		addOne(t, drv)
		assert.True(t, drv.NeedsKick(), "0 -> 1 passes avail_event 0")
		addOne(t, drv)
		assert.False(t, drv.NeedsKick(), "1 -> 2 does not pass avail_event 0")
		dev.DisableNotify()
		var c Chain
		for range 2 {
			ok, err := dev.Pop(&c)
			require.True(t, ok)
			require.NoError(t, err)
		}
		// Disabled: finding the ring empty does not move avail_event.
		ok, err := dev.Pop(&c)
		require.False(t, ok)
		require.NoError(t, err)
		assert.Equal(t, uint16(0), readAvailEvent(t, mem, dev.Layout()))
		pending, err := dev.EnableNotify()
		require.NoError(t, err)
		assert.False(t, pending)
		assert.Equal(t, uint16(2), readAvailEvent(t, mem, dev.Layout()))
		addOne(t, drv)
		assert.True(t, drv.NeedsKick(), "2 -> 3 passes avail_event 2")
	})
	t.Run("2.7.10 enabled device re-arms avail_event when it finds the ring empty", func(t *testing.T) {
		mem, drv, dev := newPair(t, 8, ev)
		addOne(t, drv)
		assert.True(t, drv.NeedsKick())
		var c Chain
		ok, err := dev.Pop(&c)
		require.True(t, ok)
		require.NoError(t, err)
		ok, err = dev.Pop(&c)
		require.False(t, ok)
		require.NoError(t, err)
		assert.Equal(t, uint16(1), readAvailEvent(t, mem, dev.Layout()))
		addOne(t, drv)
		assert.True(t, drv.NeedsKick())
	})
	t.Run("2.7.10 device interrupts only when used.idx passes used_event", func(t *testing.T) {
		_, drv, dev := newPair(t, 8, ev)
		var c Chain
		for range 3 {
			addOne(t, drv)
		}
		push := func() {
			ok, err := dev.Pop(&c)
			require.True(t, ok)
			require.NoError(t, err)
			require.NoError(t, dev.Push(c.Head, 1))
		}
		push()
		assert.True(t, dev.NeedsInterrupt(), "0 -> 1 passes used_event 0")
		push()
		assert.False(t, dev.NeedsInterrupt(), "1 -> 2 does not pass used_event 0")
		for range 2 {
			_, _, ok, err := drv.Reclaim()
			require.True(t, ok)
			require.NoError(t, err)
		}
		// Finding no more used entries, the driver re-arms used_event = 2.
		_, _, ok, err := drv.Reclaim()
		require.False(t, ok)
		require.NoError(t, err)
		push()
		assert.True(t, dev.NeedsInterrupt(), "2 -> 3 passes used_event 2")
	})
	t.Run("2.7.10 driver with interrupts disabled does not move used_event", func(t *testing.T) {
		_, drv, dev := newPair(t, 8, ev)
		drv.DisableInterrupts()
		var c Chain
		for i := range 3 {
			addOne(t, drv)
			ok, err := dev.Pop(&c)
			require.True(t, ok)
			require.NoError(t, err)
			require.NoError(t, dev.Push(c.Head, 1))
			assert.Equal(t, i == 0, dev.NeedsInterrupt(), "push %d", i)
			_, _, ok, err = drv.Reclaim()
			require.True(t, ok)
			require.NoError(t, err)
		}
	})
}

func readAvailEvent(t *testing.T, mem *Memory, l Layout) uint16 {
	t.Helper()
	var b [2]byte
	require.NoError(t, mem.Read(l.Used+GuestAddr(4+8*int(l.Size)), b[:]))
	return binary.LittleEndian.Uint16(b[:])
}

// recLog records logged writes.
type recLog struct {
	writes [][2]uint64
	fail   error
}

func (l *recLog) LogWrite(addr, n uint64) error {
	if l.fail != nil {
		return l.fail
	}
	l.writes = append(l.writes, [2]uint64{addr, n})
	return nil
}

func TestWriteLogging(t *testing.T) {
	for _, tc := range []struct {
		name    string
		feat    virtio.Features
		usedLog GuestAddr
	}{
		{"used ring logged at its guest address", 0, 0},
		{"used ring logged at UsedLogAddr (vhost log_guest_addr)", 0, 0x7770000},
		{"avail_event logged with EVENT_IDX", virtio.Features(0).With(virtio.FEventIdx), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewMemfdRegion(0, 4<<20, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			l := ContiguousLayout(0x1000, 8)
			drv, err := NewDriverQueue(mem, DriverQueueOptions{Layout: l, Features: tc.feat})
			require.NoError(t, err)
			log := &recLog{}
			dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Features: tc.feat, Log: log, UsedLogAddr: tc.usedLog})
			require.NoError(t, err)
			base := uint64(l.Used)
			if tc.usedLog != 0 {
				base = uint64(tc.usedLog)
			}
			availEvent := [2]uint64{base + 4 + 8*8, 2}
			flagsIdx := [2]uint64{base, 2}
			if tc.feat.Has(virtio.FEventIdx) {
				assert.Equal(t, [][2]uint64{availEvent}, log.writes, "creation arms avail_event")
			} else {
				assert.Equal(t, [][2]uint64{flagsIdx}, log.writes, "creation clears NO_NOTIFY")
			}
			log.writes = nil
			_, err = drv.Add([]Buffer{{Addr: 0x100000, Len: 10}, {Addr: 0x200000, Len: 100, Writable: true}, {Addr: 0x300000, Len: 100, Writable: true}})
			require.NoError(t, err)
			drv.Publish()
			var c Chain
			ok, err := dev.Pop(&c)
			require.NoError(t, err)
			require.True(t, ok)
			require.NoError(t, dev.PushChain(&c, 150))
			assert.Equal(t, [][2]uint64{
				{0x200000, 100}, {0x300000, 50}, // written bytes
				{base + 2, 2 + 8}, // used.idx and used entry 0, one range
			}, log.writes)
			log.writes = nil
			ok, err = dev.Pop(&c)
			require.NoError(t, err)
			require.False(t, ok)
			if tc.feat.Has(virtio.FEventIdx) {
				assert.Equal(t, [][2]uint64{availEvent}, log.writes, "re-arming avail_event is logged")
			} else {
				assert.Empty(t, log.writes)
				dev.DisableNotify()
				assert.Equal(t, [][2]uint64{flagsIdx}, log.writes, "setting NO_NOTIFY is logged")
			}
		})
	}
	t.Run("a failing logger breaks the queue with ErrLogWrite", func(t *testing.T) {
		_, drv, dev := newPair(t, 8, 0)
		bad := errors.New("log full")
		log := &recLog{}
		dev.log = log
		addOne(t, drv)
		var c Chain
		ok, err := dev.Pop(&c)
		require.True(t, ok)
		require.NoError(t, err)
		log.fail = bad
		err = dev.PushChain(&c, 1)
		assert.ErrorIs(t, err, ErrLogWrite)
		assert.ErrorIs(t, err, bad)
		assert.ErrorIs(t, dev.Push(0, 0), ErrQueueBroken)
	})
}

func TestSaveRestoreState(t *testing.T) {
	mem, drv, dev := newPair(t, 8, 0)
	var heads []uint16
	for range 3 {
		heads = append(heads, addOne(t, drv))
	}
	var c Chain
	for range 2 {
		ok, err := dev.Pop(&c)
		require.True(t, ok)
		require.NoError(t, err)
	}
	require.NoError(t, dev.Push(heads[0], 1))
	st := dev.State()
	assert.Equal(t, QueueState{NextAvail: 2, NextUsed: 1}, st)

	// A new device (the migration destination) resumes from the state.
	dev2, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: dev.Layout(), State: st})
	require.NoError(t, err)
	require.NoError(t, dev2.Push(heads[1], 2), "the in-flight chain is pushed by the destination")
	ok, err := dev2.Pop(&c)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, heads[2], c.Head)
	require.NoError(t, dev2.Push(c.Head, 3))
	for i, want := range heads {
		h, n, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, want, h)
		assert.Equal(t, uint32(i+1), n)
	}
	assert.Equal(t, QueueState{NextAvail: 3, NextUsed: 3}, dev2.State())

	_, err = NewDeviceQueue(mem, DeviceQueueOptions{Layout: dev.Layout(), State: QueueState{NextAvail: 10, NextUsed: 1}})
	assert.ErrorIs(t, err, ErrInvalidState, "more chains in flight than the queue holds")
}

func TestPushMisuse(t *testing.T) {
	_, drv, dev := newPair(t, 4, 0)
	assert.ErrorIs(t, dev.Push(0, 0), ErrNotInFlight)
	addOne(t, drv)
	var c Chain
	ok, err := dev.Pop(&c)
	require.True(t, ok)
	require.NoError(t, err)
	assert.ErrorIs(t, dev.Push(4, 0), ErrNotInFlight)
	assert.ErrorIs(t, dev.PushChain(&c, 17), ErrWrittenTooLarge)
	assert.ErrorIs(t, dev.PushBatch([]UsedElem{{c.Head, 0}, {c.Head, 0}}), ErrNotInFlight)
	require.NoError(t, dev.Err(), "caller misuse does not break the queue")
	require.NoError(t, dev.PushChain(&c, 16))
}

func featuresOf(v uint64) virtio.Features { return virtio.Features(v) }

func TestCreationDoesNotRewriteUsedIdx(t *testing.T) {
	mem, _, dev := newPair(t, 8, 0)
	l := dev.Layout()
	require.NoError(t, mem.Write(l.Used, []byte{1, 0, 7, 0})) // NO_NOTIFY, used.idx 7
	_, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, State: QueueState{NextAvail: 7, NextUsed: 7}})
	require.NoError(t, err)
	var b [4]byte
	require.NoError(t, mem.Read(l.Used, b[:]))
	assert.Equal(t, []byte{0, 0, 7, 0}, b[:], "flags cleared, used.idx untouched")
}

func TestPushBatchWithBadHeadPublishesNothing(t *testing.T) {
	_, drv, dev := newPair(t, 8, 0)
	var cs [2]Chain
	addOne(t, drv)
	addOne(t, drv)
	n, err := dev.PopBatch(cs[:])
	require.NoError(t, err)
	require.Equal(t, 2, n)
	err = dev.PushBatch([]UsedElem{{cs[0].Head, 1}, {99, 1}})
	assert.ErrorIs(t, err, ErrNotInFlight)
	assert.Equal(t, QueueState{NextAvail: 2, NextUsed: 0}, dev.State())
	_, _, ok, err := drv.Reclaim()
	require.NoError(t, err)
	assert.False(t, ok, "nothing was published")
	require.NoError(t, dev.PushBatch([]UsedElem{{cs[0].Head, 1}, {cs[1].Head, 2}}))
	for i := range 2 {
		h, l, ok, err := drv.Reclaim()
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, cs[i].Head, h)
		assert.Equal(t, uint32(i+1), l)
	}
}

// TestUsedRingLogRanges checks which guest ranges a push logs: every used
// entry written and used.idx, as one range when they share used.idx's 4 KiB
// page (vhost's log page), as separate ranges otherwise.
func TestUsedRingLogRanges(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     uint16
		st       QueueState // used.idx in memory is st.NextUsed
		heads    []uint16   // one Push when len 1, else a PushBatch
		wantLogs func(base uint64) [][2]uint64
	}{
		{"entry in used.idx's page: one range from used.idx to the entry's end", 8,
			QueueState{NextAvail: 3, NextUsed: 2}, []uint16{5},
			func(b uint64) [][2]uint64 { return [][2]uint64{{b + 2, 4 + 8*2 + 8 - 2}} }},
		{"entry in a later page: entry and used.idx logged separately", 1024,
			QueueState{NextAvail: 601, NextUsed: 600}, []uint16{7},
			func(b uint64) [][2]uint64 { return [][2]uint64{{b + 4 + 8*600, 8}, {b + 2, 2}} }},
		{"batch in one page: one range over used.idx and all entries", 8,
			QueueState{NextAvail: 4, NextUsed: 1}, []uint16{1, 2, 3},
			func(b uint64) [][2]uint64 { return [][2]uint64{{b + 2, 4 + 8*3 + 8 - 2}} }},
		{"batch wrapping the ring end: the tail, then used.idx through the wrapped entries", 8,
			QueueState{NextAvail: 9, NextUsed: 6}, []uint16{1, 2, 3},
			func(b uint64) [][2]uint64 { return [][2]uint64{{b + 4 + 8*6, 16}, {b + 2, 4 + 8 - 2}} }},
		{"batch across pages: entries range, then used.idx", 1024,
			QueueState{NextAvail: 602, NextUsed: 600}, []uint16{1, 2},
			func(b uint64) [][2]uint64 { return [][2]uint64{{b + 4 + 8*600, 16}, {b + 2, 2}} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := NewMemfdRegion(0, 1<<20, nil)
			require.NoError(t, err)
			mem, err := NewMemory(r)
			require.NoError(t, err)
			defer mem.Close()
			l := ContiguousLayout(0x10000, tc.size)
			require.NoError(t, mem.Write(l.Used+2, []byte{byte(tc.st.NextUsed), byte(tc.st.NextUsed >> 8)}))
			log := &recLog{}
			dev, err := NewDeviceQueue(mem, DeviceQueueOptions{Layout: l, Log: log, State: tc.st})
			require.NoError(t, err)
			log.writes = nil
			if len(tc.heads) == 1 {
				require.NoError(t, dev.Push(tc.heads[0], 0))
			} else {
				var elems []UsedElem
				for _, h := range tc.heads {
					elems = append(elems, UsedElem{Head: h})
				}
				require.NoError(t, dev.PushBatch(elems))
			}
			assert.Equal(t, tc.wantLogs(uint64(l.Used)), log.writes)
			for i, h := range tc.heads {
				var e [8]byte
				require.NoError(t, mem.Read(l.Used+GuestAddr(4+8*((int(tc.st.NextUsed)+i)%int(tc.size))), e[:]))
				assert.Equal(t, []byte{byte(h), 0, 0, 0, 0, 0, 0, 0}, e[:], "used entry %d", i)
			}
		})
	}
}
