package softnet

import (
	"encoding/binary"
	"testing"

	"github.com/vdpakit/vdpakit/dirty"
	"github.com/vdpakit/vdpakit/internal/fuzzinput"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

// newFuzzQueue returns the device side of the fuzzed ring, starting at
// state and logging into log through a per-queue cache, as vdpa.Local
// runs a queue.
func newFuzzQueue(t *testing.T, mem *vring.Memory, log *dirty.Bitmap, l vring.Layout, f virtio.Features, state vring.QueueState) *vring.DeviceQueue {
	t.Helper()
	dq, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Layout: l, Features: f, State: state, Log: log.NewCache()})
	if err != nil {
		t.Fatal(err)
	}
	return dq
}

// fuzzMemory returns guest memory of one region at 0 over backing, and a
// dirty log over it (closed when the test ends) of 8-byte pages: pages that
// small tell the ring's entries apart, which the vhost log's 4096 would
// not (FuzzReceiveRing, FuzzTransmitRing).
func fuzzMemory(t *testing.T, backing []byte) (*vring.Memory, *dirty.Bitmap) {
	t.Helper()
	region, err := vring.NewRegion(0, backing, nil)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := vring.NewMemory(region)
	if err != nil {
		t.Fatal(err)
	}
	log, err := dirty.New(uint64(len(backing)), &dirty.Options{PageSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = log.Close() })
	return mem, log
}

// hostileDriver is the driver side of FuzzReceiveRing and
// FuzzTransmitRing: it writes a queue's descriptors and available
// positions in guest memory as the input says. Each write goes into mirror
// too (what guest memory held at the last check, with the driver's writes
// since: a byte that differs from it, the device wrote) and, when shadow
// is not nil, into shadow (a split ring's descriptor table and available
// ring as the driver wrote them).
type hostileDriver struct {
	in                  *fuzzinput.Reader
	mem, mirror, shadow []byte
	layout              vring.Layout
	size                uint16
	packed              bool
	dataAt, dataBytes   uint64 // the buffers' area
	// The split ring's next avail index, or the packed ring's next
	// position and wrap counter.
	availIdx, pos uint16
	wrap          bool
}

func newHostileDriver(in *fuzzinput.Reader, mem, mirror []byte, l vring.Layout, size uint16, packed bool,
	dataAt, dataBytes uint64) *hostileDriver {
	return &hostileDriver{in: in, mem: mem, mirror: mirror, layout: l, size: size, packed: packed,
		dataAt: dataAt, dataBytes: dataBytes, wrap: true}
}

func (h *hostileDriver) put16(at uint64, v uint16) {
	binary.LittleEndian.PutUint16(h.mem[at:], v)
	binary.LittleEndian.PutUint16(h.mirror[at:], v)
	if h.shadow != nil {
		binary.LittleEndian.PutUint16(h.shadow[at-uint64(h.layout.Desc):], v)
	}
}

// writeDesc writes descriptor i: its address and length, then a and b
// (split: flags and next; packed: buffer id and flags).
func (h *hostileDriver) writeDesc(i uint16, addr uint64, length uint32, a, b uint16) {
	at := uint64(h.layout.Desc) + 16*uint64(i)
	binary.LittleEndian.PutUint64(h.mem[at:], addr)
	binary.LittleEndian.PutUint32(h.mem[at+8:], length)
	copy(h.mirror[at:], h.mem[at:at+12])
	if h.shadow != nil {
		copy(h.shadow[at-uint64(h.layout.Desc):], h.mem[at:at+12])
	}
	h.put16(at+12, a)
	h.put16(at+14, b)
}

// desc reads a descriptor operation, i a b l fl nx: descriptor i gets a
// buffer at data+5*(a<<8|b) (any alignment), or with a's top bit at
// (a&0x7f)<<24|b<<8 (anywhere, mostly outside memory), of 16*l bytes
// (l 255: 0xffffffff), flags NEXT, WRITE, INDIRECT from fl's low bits (and
// on a packed ring AVAIL and USED from bits 3 and 4, as given) and link
// (or buffer id) nx. It reports whether the descriptor may lend the device
// the rings' memory: a buffer below the buffers' area, or an indirect
// table.
func (h *hostileDriver) desc() (lends bool) {
	next := h.in.Next
	i := uint16(next()) % h.size
	a, b, l, fl, nx := next(), next(), next(), next(), next()
	addr := h.dataAt + (uint64(a&0x7f)<<8|uint64(b))*5%h.dataBytes
	if a&0x80 != 0 {
		addr = uint64(a&0x7f)<<24 | uint64(b)<<8
	}
	length := uint32(l) * 16
	if l == 255 {
		length = 0xffffffff
	}
	flags := uint16(fl & 7) // NEXT, WRITE, INDIRECT
	lends = addr < h.dataAt || flags&vring.DescFIndirect != 0
	if h.packed {
		flags |= uint16(fl>>3&1)<<7 | uint16(fl>>4&1)<<15 // AVAIL, USED as given
		h.writeDesc(i, addr, length, uint16(nx), flags)
	} else {
		h.writeDesc(i, addr, length, flags, uint16(nx)%(h.size+2))
	}
	return lends
}

// post reads a byte b and makes a chain available: on a split ring head
// b%(size+2) (two out of range), on a packed ring the descriptor at the
// driver's position, which gets the AVAIL/USED bits of its wrap counter
// (of the other one when b is odd).
func (h *hostileDriver) post() {
	b := h.in.Next()
	if h.packed {
		at := uint64(h.layout.Desc) + 16*uint64(h.pos) + 14
		fl := binary.LittleEndian.Uint16(h.mem[at:]) &^ (vring.DescFAvail | vring.DescFUsed)
		if h.wrap != (b&1 != 0) {
			fl |= vring.DescFAvail
		} else {
			fl |= vring.DescFUsed
		}
		h.put16(at, fl)
		if h.pos++; h.pos == h.size {
			h.pos, h.wrap = 0, !h.wrap
		}
		return
	}
	head := uint16(b) % (h.size + 2)
	h.put16(uint64(h.layout.Avail)+4+2*uint64(h.availIdx%h.size), head)
	h.availIdx++
	h.put16(uint64(h.layout.Avail)+2, h.availIdx)
}

// setAvailIdx reads two bytes (low, high) into a split ring's avail.idx,
// anywhere.
func (h *hostileDriver) setAvailIdx() {
	h.availIdx = uint16(h.in.Next()) | uint16(h.in.Next())<<8
	h.put16(uint64(h.layout.Avail)+2, h.availIdx)
}
