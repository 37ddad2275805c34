package mdev

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/vdpakit/vdpakit/virtio"
)

// Region names one of the register structures a VMM traps and forwards to
// Device.Read and Device.Write.
type Region int

const (
	// RegionCommon is the common configuration structure
	// (struct virtio_pci_common_cfg, virtio 1.2 §4.1.4.3).
	RegionCommon Region = iota + 1
	// RegionNotify is the notification area (§4.1.4.4): one
	// NotifyOffMultiplier-byte slot per queue.
	RegionNotify
	// RegionISR is the ISR status byte (§4.1.4.5). Reading clears it.
	RegionISR
	// RegionDevice is the device-specific configuration (§4.1.4.6), for
	// virtio-net struct virtio_net_config.
	RegionDevice
	// RegionPCIConfig is the 256-byte PCI configuration space.
	RegionPCIConfig
	// RegionMSIX is the MSI-X table followed by the pending bit array.
	RegionMSIX
)

func (r Region) String() string {
	switch r {
	case RegionCommon:
		return "common"
	case RegionNotify:
		return "notify"
	case RegionISR:
		return "isr"
	case RegionDevice:
		return "device"
	case RegionPCIConfig:
		return "pci-config"
	case RegionMSIX:
		return "msix"
	}
	return fmt.Sprintf("region(%d)", int(r))
}

// Virtio PCI capability types (virtio 1.2 §4.1.4, cfg_type).
const (
	CapCommonCfg uint8 = 1 // VIRTIO_PCI_CAP_COMMON_CFG
	CapNotifyCfg uint8 = 2 // VIRTIO_PCI_CAP_NOTIFY_CFG
	CapISRCfg    uint8 = 3 // VIRTIO_PCI_CAP_ISR_CFG
	CapDeviceCfg uint8 = 4 // VIRTIO_PCI_CAP_DEVICE_CFG
	CapPCICfg    uint8 = 5 // VIRTIO_PCI_CAP_PCI_CFG
)

// Common configuration field offsets (virtio 1.2 §4.1.4.3,
// struct virtio_pci_common_cfg).
const (
	OffDeviceFeatureSelect = 0x00 // le32 RW
	OffDeviceFeature       = 0x04 // le32 RO
	OffDriverFeatureSelect = 0x08 // le32 RW
	OffDriverFeature       = 0x0c // le32 RW
	OffMSIXConfig          = 0x10 // le16 RW
	OffNumQueues           = 0x12 // le16 RO
	OffDeviceStatus        = 0x14 // u8 RW
	OffConfigGeneration    = 0x15 // u8 RO
	OffQueueSelect         = 0x16 // le16 RW
	OffQueueSize           = 0x18 // le16 RW
	OffQueueMSIXVector     = 0x1a // le16 RW
	OffQueueEnable         = 0x1c // le16 RW
	OffQueueNotifyOff      = 0x1e // le16 RO
	OffQueueDesc           = 0x20 // le64 RW
	OffQueueDriver         = 0x28 // le64 RW
	OffQueueDevice         = 0x30 // le64 RW
	// CommonCfgLen is the length of the structure this device implements:
	// it does not offer VIRTIO_F_NOTIFICATION_DATA or VIRTIO_F_RING_RESET,
	// so queue_notif_config_data (0x38) and queue_reset (0x3a) are absent.
	CommonCfgLen = 0x38
)

// NoVector is VIRTIO_MSI_NO_VECTOR.
const NoVector uint16 = 0xffff

// ISR status bits (§4.1.4.5).
const (
	ISRQueue  uint8 = 1 << 0
	ISRConfig uint8 = 1 << 1
)

// Layout of BAR 4, the 64-bit memory BAR that holds every virtio structure,
// and BAR 1, which holds the MSI-X table and PBA.
const (
	ModernBAR           = 4
	MSIXBAR             = 1
	BarOffCommon        = 0x0000
	BarOffISR           = 0x1000
	BarOffDevice        = 0x2000
	BarOffNotify        = 0x3000
	NotifyOffMultiplier = 4
	msixTableEntrySize  = 16
)

// PCI identity (virtio 1.2 §4.1.2).
const (
	PCIVendorID        = 0x1af4
	PCIDeviceIDBase    = 0x1040 // + virtio device id for non-transitional devices
	PCIRevision        = 1
	defaultSubsysID    = 0x1100
	pciCapIDVendor     = 0x09
	pciCapIDMSIX       = 0x11
	pciConfigSize      = 256
	pciStatusCapList   = 0x0010
	pciStatusInterrupt = 0x0008 // Interrupt Status
	pciOffStatus       = 0x06
	msixCtlEnable      = 0x80   // MSI-X Enable, in the message control's high byte
	pciCommandMask     = 0x0407 // I/O, memory, bus master, INTx disable
	pciBarMem64Prefet  = 0x0c   // memory, 64-bit, prefetchable
)

// Offsets of the capabilities in the configuration space image.
const (
	capOffCommon = 0x40
	capOffNotify = 0x50
	capOffISR    = 0x64
	capOffDevice = 0x74
	capOffPCICfg = 0x84
	capOffMSIX   = 0x98
	capLen       = 16
	capLenNotify = 20
	capLenPCICfg = 20
	capLenMSIX   = 12
)

// Capability describes one virtio vendor-specific PCI capability
// (struct virtio_pci_cap).
type Capability struct {
	ConfigOffset int   // offset of the capability in PCI config space
	CfgType      uint8 // CapCommonCfg ...
	Bar          uint8
	Offset       uint32 // within the BAR
	Length       uint32
	// NotifyOffMultiplier is set for CapNotifyCfg.
	NotifyOffMultiplier uint32
}

// BAR describes one base address register the VMM must expose.
type BAR struct {
	Index  int
	Size   uint64 // a power of two
	Is64   bool
	Prefet bool
}

// Layout is everything a VMM needs to place the device on its PCI bus.
type Layout struct {
	Capabilities []Capability
	BARs         []BAR
	MSIXVectors  int
	MSIXTable    uint32 // offset of the table in MSIXBAR
	MSIXPBA      uint32 // offset of the pending bit array in MSIXBAR
}

func pow2AtLeast(n uint64) uint64 {
	p := uint64(1)
	for p < n {
		p <<= 1
	}
	return p
}

func pciClass(id virtio.DeviceID) uint32 {
	switch id {
	case virtio.DeviceNet:
		return 0x020000 // network controller, ethernet
	case virtio.DeviceBlock:
		return 0x018000 // mass storage, other
	case virtio.DeviceConsole:
		return 0x078000 // communication, other
	}
	return 0xff0000
}

// pciConfig is the emulated PCI configuration space.
type pciConfig struct {
	img     [pciConfigSize]byte
	wmask   [pciConfigSize]byte // writable bits
	barSize [6]uint64
}

func (d *Device) buildPCIConfig() {
	c := &d.pci
	le := binary.LittleEndian
	le.PutUint16(c.img[0x00:], PCIVendorID)
	le.PutUint16(c.img[0x02:], uint16(PCIDeviceIDBase+uint32(d.devID)))
	le.PutUint16(c.img[0x06:], pciStatusCapList)
	class := pciClass(d.devID)
	c.img[0x08] = PCIRevision
	c.img[0x09] = byte(class)
	c.img[0x0a] = byte(class >> 8)
	c.img[0x0b] = byte(class >> 16)
	c.img[0x0e] = 0 // header type 0
	le.PutUint16(c.img[0x2c:], d.opts.SubsystemVendorID)
	le.PutUint16(c.img[0x2e:], d.opts.SubsystemID)
	c.img[0x34] = capOffCommon
	c.img[0x3d] = 1 // INTA#
	le.PutUint16(c.wmask[0x04:], pciCommandMask)
	c.wmask[0x3c] = 0xff // interrupt line

	// BAR 1: MSI-X table and PBA, 32-bit memory.
	c.barSize[MSIXBAR] = d.layout.BARs[0].Size
	// BAR 4/5: the virtio structures, 64-bit prefetchable memory.
	c.barSize[ModernBAR] = d.layout.BARs[1].Size
	le.PutUint32(c.img[0x10+4*ModernBAR:], pciBarMem64Prefet)
	for i, sz := range c.barSize {
		if sz == 0 {
			continue
		}
		le.PutUint32(c.wmask[0x10+4*i:], ^uint32(sz-1)&^0xf)
		if i == ModernBAR {
			le.PutUint32(c.wmask[0x10+4*(i+1):], ^uint32((sz-1)>>32))
		}
	}

	caps := d.layout.Capabilities
	for i, cp := range caps {
		o := cp.ConfigOffset
		next := byte(capOffMSIX)
		if i+1 < len(caps) {
			next = byte(caps[i+1].ConfigOffset)
		}
		c.img[o] = pciCapIDVendor
		c.img[o+1] = next
		c.img[o+3] = cp.CfgType
		c.img[o+4] = cp.Bar
		le.PutUint32(c.img[o+8:], cp.Offset)
		le.PutUint32(c.img[o+12:], cp.Length)
		switch cp.CfgType {
		case CapNotifyCfg:
			c.img[o+2] = capLenNotify
			le.PutUint32(c.img[o+16:], cp.NotifyOffMultiplier)
		case CapPCICfg:
			c.img[o+2] = capLenPCICfg
			// bar, offset, length and pci_cfg_data are driver-writable.
			c.wmask[o+4] = 0xff
			for j := 8; j < 20; j++ {
				c.wmask[o+j] = 0xff
			}
		default:
			c.img[o+2] = capLen
		}
	}
	o := capOffMSIX
	c.img[o] = pciCapIDMSIX
	c.img[o+1] = 0
	le.PutUint16(c.img[o+2:], uint16(d.layout.MSIXVectors-1))
	le.PutUint32(c.img[o+4:], d.layout.MSIXTable|MSIXBAR)
	le.PutUint32(c.img[o+8:], d.layout.MSIXPBA|MSIXBAR)
	c.wmask[o+3] = 0xc0 // MSI-X enable and function mask
}

func (d *Device) computeLayout() {
	vectors := d.opts.MSIXVectors
	tableLen := uint32(vectors * msixTableEntrySize)
	pbaOff := (tableLen + 7) &^ 7
	pbaLen := uint32((vectors + 63) / 64 * 8)
	msixSize := pow2AtLeast(uint64(max(pbaOff+pbaLen, 0x1000)))
	notifyLen := uint32(d.numQueues * NotifyOffMultiplier)
	modernSize := pow2AtLeast(uint64(BarOffNotify) + uint64(max(notifyLen, 0x1000)))
	caps := []Capability{
		{ConfigOffset: capOffCommon, CfgType: CapCommonCfg, Bar: ModernBAR, Offset: BarOffCommon, Length: CommonCfgLen},
		{ConfigOffset: capOffNotify, CfgType: CapNotifyCfg, Bar: ModernBAR, Offset: BarOffNotify, Length: notifyLen,
			NotifyOffMultiplier: NotifyOffMultiplier},
		{ConfigOffset: capOffISR, CfgType: CapISRCfg, Bar: ModernBAR, Offset: BarOffISR, Length: 1},
	}
	if d.cfgSize > 0 {
		caps = append(caps, Capability{ConfigOffset: capOffDevice, CfgType: CapDeviceCfg, Bar: ModernBAR,
			Offset: BarOffDevice, Length: uint32(d.cfgSize)})
	}
	caps = append(caps, Capability{ConfigOffset: capOffPCICfg, CfgType: CapPCICfg})
	d.layout = Layout{
		Capabilities: caps,
		BARs: []BAR{
			{Index: MSIXBAR, Size: msixSize},
			{Index: ModernBAR, Size: modernSize, Is64: true, Prefet: true},
		},
		MSIXVectors: vectors,
		MSIXTable:   0,
		MSIXPBA:     pbaOff,
	}
}

// Layout returns the device's PCI capability and BAR layout.
func (d *Device) Layout() Layout {
	l := d.layout
	l.Capabilities = append([]Capability(nil), l.Capabilities...)
	l.BARs = append([]BAR(nil), l.BARs...)
	return l
}

// RegionAt maps an access at offset off of BAR bar to the region and the
// offset within it, for VMMs that trap whole BARs.
func (d *Device) RegionAt(bar int, off uint64) (Region, uint64, error) {
	switch bar {
	case MSIXBAR:
		if off < d.layout.BARs[0].Size {
			return RegionMSIX, off, nil
		}
	case ModernBAR:
		switch {
		case off >= BarOffCommon && off < BarOffCommon+CommonCfgLen:
			return RegionCommon, off - BarOffCommon, nil
		case off == BarOffISR:
			return RegionISR, 0, nil
		case off >= BarOffDevice && off < BarOffDevice+uint64(d.cfgSize):
			return RegionDevice, off - BarOffDevice, nil
		case off >= BarOffNotify && off < BarOffNotify+uint64(d.numQueues*NotifyOffMultiplier):
			return RegionNotify, off - BarOffNotify, nil
		}
	}
	return 0, 0, fmt.Errorf("mdev: BAR %d offset %#x: %w", bar, off, ErrOutOfRange)
}

// ReadBAR reads size bytes at offset off of BAR bar.
func (d *Device) ReadBAR(bar int, off uint64, size int) (uint64, error) {
	r, o, err := d.RegionAt(bar, off)
	if err != nil {
		return 0, err
	}
	return d.Read(r, o, size)
}

// WriteBAR writes size bytes at offset off of BAR bar.
func (d *Device) WriteBAR(bar int, off uint64, size int, v uint64) error {
	return d.WriteBARContext(context.Background(), bar, off, size, v)
}

// WriteBARContext is WriteBAR with ctx bounding the wait for a back-end
// operation in progress (see WriteContext).
func (d *Device) WriteBARContext(ctx context.Context, bar int, off uint64, size int, v uint64) error {
	r, o, err := d.RegionAt(bar, off)
	if err != nil {
		return err
	}
	return d.WriteContext(ctx, r, o, size, v)
}

func readLE(b []byte, size int) uint64 {
	switch size {
	case 1:
		return uint64(b[0])
	case 2:
		return uint64(binary.LittleEndian.Uint16(b))
	case 4:
		return uint64(binary.LittleEndian.Uint32(b))
	}
	return binary.LittleEndian.Uint64(b)
}

func writeLE(b []byte, size int, v uint64) {
	switch size {
	case 1:
		b[0] = byte(v)
	case 2:
		binary.LittleEndian.PutUint16(b, uint16(v))
	case 4:
		binary.LittleEndian.PutUint32(b, uint32(v))
	default:
		binary.LittleEndian.PutUint64(b, v)
	}
}

// pciRead reads the configuration space. Caller holds d.mu.
func (d *Device) pciRead(off uint64, size int, withBacking bool) (uint64, error) {
	if !validSize(size, 4) || off%uint64(size) != 0 {
		return 0, ErrAccessSize
	}
	if !fits(off, size, pciConfigSize) {
		return 0, ErrOutOfRange
	}
	// pci_cfg_data of the PCI_CFG capability: a window onto the BAR.
	data := uint64(capOffPCICfg + 16)
	if off >= data && off < data+4 {
		d.pciCfgWindowRead(withBacking)
	}
	if off <= pciOffStatus && pciOffStatus < off+uint64(size) {
		// §4.1.4.5.1: with MSI-X disabled, the Interrupt Status bit is
		// the OR of the ISR status bits (the guest's INTx handler, and
		// a VMM sharing the line, read it). With MSI-X enabled the ISR
		// is not an interrupt source and the bit stays clear.
		st := uint16(pciStatusCapList)
		if d.isr != 0 && !d.msixEnabled() {
			st |= pciStatusInterrupt
		}
		binary.LittleEndian.PutUint16(d.pci.img[pciOffStatus:], st)
	}
	return readLE(d.pci.img[off:], size), nil
}

// pciWrite writes the configuration space honouring the writable mask.
// Caller holds d.mu.
func (d *Device) pciWrite(off uint64, size int, v uint64) error {
	if !validSize(size, 4) || off%uint64(size) != 0 {
		return ErrAccessSize
	}
	if !fits(off, size, pciConfigSize) {
		return ErrOutOfRange
	}
	c := &d.pci
	msix := d.msixEnabled()
	for i := 0; i < size; i++ {
		o := int(off) + i
		b := byte(v >> (8 * i))
		c.img[o] = c.img[o]&^c.wmask[o] | b&c.wmask[o]
	}
	data := uint64(capOffPCICfg + 16)
	if off >= data && off < data+4 {
		d.pciCfgWindowWrite()
	}
	if d.msixEnabled() != msix && d.live {
		// The guest turned MSI-X on or off while the data path runs:
		// its queues' interrupts move between their vectors and the
		// line (vectorFD). The caller holds d.ops (writeMayUseBacking);
		// a refusal is the guest's NEEDS_RESET, not the write's error.
		_ = d.rewireAll()
	}
	return nil
}

// msixEnabled reports the MSI-X Enable bit of the MSI-X capability's
// message control, as the guest last wrote it. Caller holds d.mu.
func (d *Device) msixEnabled() bool {
	return d.pci.img[capOffMSIX+3]&msixCtlEnable != 0
}

// pciCfgWindow returns the BAR access the VIRTIO_PCI_CAP_PCI_CFG capability
// currently selects (§4.1.4.9).
func (d *Device) pciCfgWindow() (bar int, off uint64, size int, ok bool) {
	o := capOffPCICfg
	bar = int(d.pci.img[o+4])
	off = uint64(binary.LittleEndian.Uint32(d.pci.img[o+8:]))
	size = int(binary.LittleEndian.Uint32(d.pci.img[o+12:]))
	return bar, off, size, size == 1 || size == 2 || size == 4
}

func (d *Device) pciCfgWindowRead(withBacking bool) {
	dataOff := capOffPCICfg + 16
	bar, off, size, ok := d.pciCfgWindow()
	var v uint64
	if ok {
		if r, ro, err := d.RegionAt(bar, off); err == nil {
			v, _ = d.readLocked(r, ro, size, withBacking)
		}
	}
	binary.LittleEndian.PutUint32(d.pci.img[dataOff:], uint32(v))
}

func (d *Device) pciCfgWindowWrite() {
	dataOff := capOffPCICfg + 16
	bar, off, size, ok := d.pciCfgWindow()
	if !ok {
		return
	}
	v := readLE(d.pci.img[dataOff:], size)
	if r, ro, err := d.RegionAt(bar, off); err == nil {
		_ = d.writeLocked(r, ro, size, v)
	}
}

// fits reports whether size bytes at off lie within a region of limit
// bytes, without computing off+size: the offset of a guest access can be
// anything up to 2^64-1, and one just below it would wrap off+size around
// to a small number, pass a plain `off+size > limit` test and index far
// outside the region (a panic, with the device's locks held). size is
// positive (validSize).
func fits(off uint64, size int, limit uint64) bool {
	return off <= limit && uint64(size) <= limit-off
}

func validSize(size, maxSize int) bool {
	return (size == 1 || size == 2 || size == 4 || size == 8) && size <= maxSize
}
