package vhostcore_test

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// recorder is a vdpa.Device that records the queue calls SetupQueue makes
// and fails the one named in failAt.
type recorder struct {
	vdpa.Device
	calls  []string
	failAt string
}

var errInjected = errors.New("injected")

func (r *recorder) rec(call string) error {
	r.calls = append(r.calls, call)
	if call == r.failAt {
		return errInjected
	}
	return nil
}

func (r *recorder) SetQueueNum(q int, n uint16) error { return r.rec(fmt.Sprintf("num %d %d", q, n)) }
func (r *recorder) SetQueueAddr(q int, a vdpa.QueueAddr) error {
	return r.rec(fmt.Sprintf("addr %d %#x %#x %#x", q, a.Desc, a.Avail, a.Used))
}
func (r *recorder) SetQueueBase(q int, st vdpa.QueueState) error {
	return r.rec(fmt.Sprintf("base %d %d/%d", q, st.NextAvail, st.NextUsed))
}
func (r *recorder) SetQueueKick(q int, e *vdpa.EventFD) error {
	return r.rec(fmt.Sprintf("kick %d %d", q, vhostcore.Fd(e)))
}
func (r *recorder) SetQueueCall(q int, e *vdpa.EventFD) error {
	return r.rec(fmt.Sprintf("call %d %d", q, vhostcore.Fd(e)))
}
func (r *recorder) EnableQueue(q int, on bool) error {
	return r.rec(fmt.Sprintf("enable %d %v", q, on))
}

// Queue setup follows the virtio initialization order (virtio 1.2
// §3.1.1 step 7, as vhost takes it: size, addresses, base, notifiers,
// enable) and stops at the first refusal.
func TestSetupQueueFollowsInitializationOrder(t *testing.T) {
	l := vring.ContiguousLayout(0x10000, 16)
	kick, err := vdpa.NewEventFD()
	require.NoError(t, err)
	defer kick.Close()
	want := []string{
		"num 1 16",
		fmt.Sprintf("addr 1 %#x %#x %#x", l.Desc, l.Avail, l.Used),
		"base 1 7/7",
		fmt.Sprintf("kick 1 %d", kick.Fd()),
		fmt.Sprintf("call 1 %d", vhostsys.FileUnbind),
		"enable 1 true",
	}
	r := &recorder{}
	require.NoError(t, vhostcore.SetupQueue(r, 1, l, vdpa.QueueState{NextAvail: 7, NextUsed: 7}, kick, nil))
	assert.Equal(t, want, r.calls)

	for i, call := range want {
		r := &recorder{failAt: call}
		err := vhostcore.SetupQueue(r, 1, l, vdpa.QueueState{NextAvail: 7, NextUsed: 7}, kick, nil)
		assert.ErrorIs(t, err, errInjected, call)
		assert.Equal(t, want[:i+1], r.calls, "nothing after the failing %q", call)
	}
}

func TestClosedErr(t *testing.T) {
	assert.ErrorIs(t, vhostcore.ClosedErr(fmt.Errorf("ioctl: %w", os.ErrClosed)), vdpa.ErrClosed)
	assert.NoError(t, vhostcore.ClosedErr(nil))
	other := errors.New("other")
	assert.Same(t, other, vhostcore.ClosedErr(other))
}

// The used ring's idx is the little-endian u16 after its flags (virtio 1.2
// §2.7.8); outside guest memory it is an error, not a zero.
func TestUsedIdx(t *testing.T) {
	reg, err := vring.NewMemfdRegion(0x1000, 0x1000, nil)
	require.NoError(t, err)
	mem, err := vring.NewMemory(reg)
	require.NoError(t, err)
	defer mem.Close()
	require.NoError(t, mem.Write(0x1800, []byte{0x01, 0x00, 0x34, 0x12}))
	idx, err := vhostcore.UsedIdx(mem, 0x1800)
	require.NoError(t, err)
	assert.Equal(t, uint16(0x1234), idx)

	_, err = vhostcore.UsedIdx(mem, 0x1fff)
	assert.ErrorIs(t, err, vring.ErrOutOfRange)
	_, err = vhostcore.UsedIdx(mem, 0x4000)
	assert.ErrorIs(t, err, vring.ErrOutOfRange)
}

// The vhost base word, written out from the encoding Linux vhost and QEMU
// use: split carries the avail index alone; packed carries avail (bits
// 0..14 index, bit 15 wrap counter) in the low half and used in the high.
func TestVringBaseEncoding(t *testing.T) {
	packed := virtio.Features(0).With(virtio.FRingPacked, virtio.FVersion1)
	split := virtio.Features(0).With(virtio.FVersion1)
	for _, tc := range []struct {
		name string
		st   vdpa.QueueState
		f    virtio.Features
		num  uint32
	}{
		{"split fresh", vdpa.QueueState{}, split, 0},
		{"split wrapped", vdpa.QueueState{NextAvail: 0xfffe, NextUsed: 0xfffe}, split, 0xfffe},
		{"packed fresh: both wrap counters 1", vdpa.QueueState{NextAvail: 0x8000, NextUsed: 0x8000}, packed, 0x8000_8000},
		{"packed avail 5 wrap 1, used 3 wrap 0", vdpa.QueueState{NextAvail: 1<<15 | 5, NextUsed: 3}, packed, 0x0003_8005},
		{"packed last slot of 32768", vdpa.QueueState{NextAvail: 0x7fff, NextUsed: 1<<15 | 0x7fff}, packed, 0xffff_7fff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.num, vhostcore.VringBase(tc.st, tc.f))
			got, err := vhostcore.BaseState(tc.num, tc.f)
			require.NoError(t, err)
			if tc.f.Has(virtio.FRingPacked) {
				assert.Equal(t, tc.st, got)
			} else {
				assert.Equal(t, tc.st.NextAvail, got.NextAvail)
			}
		})
	}
	_, err := vhostcore.BaseState(0x1_0000, split)
	require.ErrorIs(t, err, vhostcore.ErrBaseRange)
}
