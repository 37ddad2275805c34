package kernel

import (
	"fmt"
	"maps"
	"slices"

	"github.com/vdpakit/vdpakit/internal/vhostcore"
	"github.com/vdpakit/vdpakit/internal/vhostsys"
	"github.com/vdpakit/vdpakit/vring"
)

// Perm is the device's access to a mapping.
type Perm uint8

// Mapping permissions (VHOST_ACCESS_*).
const (
	PermRO Perm = vhostsys.VHOST_ACCESS_RO // device reads
	PermWO Perm = vhostsys.VHOST_ACCESS_WO // device writes
	PermRW Perm = vhostsys.VHOST_ACCESS_RW
)

// Mapping is one IOTLB entry: the device's I/O virtual addresses [IOVA,
// IOVA+Size) in address space ASID translate to this process's addresses
// from UAddr on.
type Mapping struct {
	ASID  uint32
	IOVA  vring.GuestAddr
	Size  uint64
	UAddr vring.HostAddr
	Perm  Perm
}

func (m Mapping) last() uint64 { return uint64(m.IOVA) + m.Size - 1 }

func (m Mapping) String() string {
	return fmt.Sprintf("asid %d iova [%#x, %#x] -> %v %s", m.ASID, uint64(m.IOVA), m.last(), m.UAddr, m.Perm)
}

func (p Perm) String() string {
	switch p {
	case PermRO:
		return "ro"
	case PermWO:
		return "wo"
	case PermRW:
		return "rw"
	}
	return fmt.Sprintf("perm(%d)", uint8(p))
}

// IOVARange is VHOST_VDPA_GET_IOVA_RANGE: the inclusive range of addresses
// the device can map.
func (d *Device) IOVARange() (first, last vring.GuestAddr) {
	return vring.GuestAddr(d.iova.First), vring.GuestAddr(d.iova.Last)
}

func (d *Device) validate(m Mapping) error {
	switch {
	case m.Size == 0:
		return fmt.Errorf("%w: %v: empty", ErrIOVARange, m)
	case uint64(m.IOVA) > ^uint64(0)-m.Size+1:
		return fmt.Errorf("%w: %v: wraps the address space", ErrIOVARange, m)
	case uint64(m.IOVA) < d.iova.First || m.last() > d.iova.Last:
		return fmt.Errorf("%w: %v outside [%#x, %#x]", ErrIOVARange, m, d.iova.First, d.iova.Last)
	case m.Perm < PermRO || m.Perm > PermRW:
		return fmt.Errorf("vdpa/kernel: %v: invalid permission", m)
	case m.ASID != 0 && !d.backend.Has(BackendIOTLBASID):
		return fmt.Errorf("mapping in address space %d: %w (IOTLB_ASID not negotiated)", m.ASID, ErrNotSupported)
	}
	return nil
}

// msg writes one IOTLB v2 message.
func (d *Device) msg(asid uint32, typ uint8, m Mapping) error {
	err := d.f.WriteMsgV2(&vhostsys.MsgV2{
		Type: vhostsys.VHOST_IOTLB_MSG_V2,
		ASID: asid,
		IOTLB: vhostsys.IOTLBMsg{
			IOVA: uint64(m.IOVA), Size: m.Size, UAddr: uint64(m.UAddr), Perm: uint8(m.Perm), Type: typ,
		},
	})
	return vhostcore.ClosedErr(err)
}

func (d *Device) batch(asid uint32, typ uint8) error {
	if !d.backend.Has(BackendIOTLBBatch) {
		return nil
	}
	return d.msg(asid, typ, Mapping{})
}

// MapDMA adds IOTLB mappings with VHOST_IOTLB_UPDATE messages, batched
// (BATCH_BEGIN/END) per address space when IOTLB_BATCH is negotiated. It is
// all or nothing: when the kernel refuses one mapping, the ones this call
// added are removed again. Overlapping an existing mapping is refused by
// the kernel.
func (d *Device) MapDMA(ms ...Mapping) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	return d.mapDMA(ms)
}

func (d *Device) mapDMA(ms []Mapping) error {
	for _, m := range ms {
		if err := d.validate(m); err != nil {
			return err
		}
	}
	// Group by address space, keeping order: a batch carries one ASID.
	var order []uint32
	groups := map[uint32][]Mapping{}
	for _, m := range ms {
		if _, ok := groups[m.ASID]; !ok {
			order = append(order, m.ASID)
		}
		groups[m.ASID] = append(groups[m.ASID], m)
	}
	var done []Mapping
	for _, asid := range order {
		n, err := d.updateBatch(asid, groups[asid])
		done = append(done, groups[asid][:n]...)
		if err != nil {
			d.invalidate(done)
			return err
		}
	}
	for _, m := range done {
		d.maps[m.ASID] = append(d.maps[m.ASID], m)
	}
	return nil
}

// updateBatch sends one address space's updates; it returns how many the
// kernel took.
func (d *Device) updateBatch(asid uint32, ms []Mapping) (int, error) {
	if err := d.batch(asid, vhostsys.VHOST_IOTLB_BATCH_BEGIN); err != nil {
		return 0, err
	}
	n := 0
	var uerr error
	for _, m := range ms {
		if uerr = d.msg(asid, vhostsys.VHOST_IOTLB_UPDATE, m); uerr != nil {
			uerr = fmt.Errorf("map %v: %w", m, uerr)
			break
		}
		n++
	}
	if err := d.batch(asid, vhostsys.VHOST_IOTLB_BATCH_END); err != nil && uerr == nil {
		return n, err
	}
	return n, uerr
}

// invalidate removes mappings from the kernel, best effort (used to roll
// back); it does not touch d.maps.
func (d *Device) invalidate(ms []Mapping) {
	for _, m := range ms {
		_ = d.msg(m.ASID, vhostsys.VHOST_IOTLB_INVALIDATE, m)
	}
}

// UnmapDMA sends VHOST_IOTLB_INVALIDATE for [iova, iova+size) in address
// space asid. As in the kernel, every mapping that overlaps the range is
// removed whole.
func (d *Device) UnmapDMA(asid uint32, iova vring.GuestAddr, size uint64) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	return d.unmapDMA(asid, iova, size)
}

func (d *Device) unmapDMA(asid uint32, iova vring.GuestAddr, size uint64) error {
	m := Mapping{ASID: asid, IOVA: iova, Size: size, Perm: PermRW}
	if err := d.validate(m); err != nil {
		return err
	}
	if err := d.msg(asid, vhostsys.VHOST_IOTLB_INVALIDATE, m); err != nil {
		return fmt.Errorf("unmap %v: %w", m, err)
	}
	kept := d.maps[asid][:0]
	for _, x := range d.maps[asid] {
		if uint64(x.IOVA) > m.last() || x.last() < uint64(iova) {
			kept = append(kept, x)
		}
	}
	d.maps[asid] = kept
	return nil
}

// Mappings returns the mappings this Device has made, per address space in
// the order they were made.
func (d *Device) Mappings() []Mapping {
	d.mu.Lock()
	defer d.mu.Unlock()
	asids := slices.Sorted(maps.Keys(d.maps))
	var out []Mapping
	for _, asid := range asids {
		out = append(out, d.maps[asid]...)
	}
	return out
}

// SetMemory maps guest memory into address space 0 (MapMemory(0, mem)).
func (d *Device) SetMemory(mem *vring.Memory) error { return d.MapMemory(0, mem) }

// MapMemory maps every region of mem into address space asid at its guest
// address (IOVA = Region.Base, user address = Region.HostAddr, read-write,
// or read-only for a Region.ReadOnly region),
// replacing the memory an earlier MapMemory put there. Regions must be
// shared and file-backed (ErrMemoryNotShared otherwise). The Device keeps
// mem to check the ring layouts of the queues whose group is bound to asid
// and to read their used indices (QueueBase); it does not close it.
func (d *Device) MapMemory(asid uint32, mem *vring.Memory) error {
	if err := d.lock(); err != nil {
		return err
	}
	defer d.mu.Unlock()
	var ms []Mapping
	for _, r := range mem.Regions() {
		if r.Fd() < 0 {
			return fmt.Errorf("%w: %v", ErrMemoryNotShared, r)
		}
		perm := PermRW
		if r.ReadOnly() {
			// The kernel pins a PermRW range for writing, which fails on
			// memory this process mapped read-only, and with it the
			// whole memory table.
			perm = PermRO
		}
		ms = append(ms, Mapping{ASID: asid, IOVA: r.Base(), Size: r.Size(), UAddr: r.HostAddr(), Perm: perm})
	}
	for _, m := range ms {
		if err := d.validate(m); err != nil {
			return err
		}
	}
	// Drop what the previous memory mapped here.
	for _, old := range d.memASID[asid] {
		if err := d.unmapDMA(asid, old.IOVA, old.Size); err != nil {
			return err
		}
	}
	delete(d.memASID, asid)
	delete(d.mems, asid)
	if err := d.mapDMA(ms); err != nil {
		return err
	}
	d.memASID[asid] = ms
	d.mems[asid] = mem
	return nil
}

// replayMaps re-sends every mapping after a reset that dropped the
// device's (not vhost-vdpa's) translations: invalidate, then update.
func (d *Device) replayMaps() error {
	for asid, ms := range d.maps {
		if len(ms) == 0 {
			continue
		}
		if err := d.batch(asid, vhostsys.VHOST_IOTLB_BATCH_BEGIN); err != nil {
			return err
		}
		for _, m := range ms {
			if err := d.msg(asid, vhostsys.VHOST_IOTLB_INVALIDATE, m); err != nil {
				return fmt.Errorf("replaying mappings after reset: unmap %v: %w", m, err)
			}
		}
		if err := d.batch(asid, vhostsys.VHOST_IOTLB_BATCH_END); err != nil {
			return err
		}
		n, err := d.updateBatch(asid, ms)
		if err != nil {
			d.maps[asid] = ms[:n]
			return fmt.Errorf("replaying mappings after reset: %w", err)
		}
	}
	return nil
}
