// Command genstreams writes frozen byte streams of the mdev wire formats
// under mdev/testdata/compat (run it with go generate in package mdev):
//
//   - state-v1.bin: a device state stream, version 1 (mdev.EncodeState);
//   - state-v2.bin: a device state stream, version 2: the version 1 layout
//     with packed virtqueues (RING_PACKED negotiated, sizes not powers of
//     two, positions as index | wrap counter << 15);
//   - migration-v1.bin: what MigrateSource sends in protocol version 1 for a
//     small migration (hello, pages, rounds, sync, device state, done).
//
// It encodes them by hand from the format descriptions in mdev/state.go and
// mdev/migrate.go and imports nothing from mdev, so the files record the
// formats as they were specified, not as the code happens to write them.
// The tests in mdev (compat_test.go) decode them and check every field
// against literal values.
package main

import (
	"encoding/binary"
	"flag"
	"hash/crc32"
	"log"
	"os"
	"path/filepath"
)

var le = binary.LittleEndian

func main() {
	dir := flag.String("dir", filepath.Join("testdata", "compat"), "output directory")
	flag.Parse()
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		log.Fatal(err)
	}
	state := stateV1()
	for name, b := range map[string][]byte{
		"state-v1.bin":     state,
		"state-v2.bin":     stateV2(),
		"migration-v1.bin": migrationV1(state),
	} {
		if err := os.WriteFile(filepath.Join(*dir, name), b, 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

// Feature bits (virtio 1.2 §6, §5.1.3).
const (
	fNetMTU       = 1 << 3
	fNetMAC       = 1 << 5
	fNetStatus    = 1 << 16
	fIndirectDesc = 1 << 28
	fEventIdx     = 1 << 29
	fVersion1     = 1 << 32
	fRingPacked   = 1 << 34
)

// queue is one queue record of a device state stream.
type queue struct {
	size                 uint16
	enabled              byte
	vector               uint16
	desc, driver, device uint64
	avail, used          uint16
}

// stateV1 is a version 1 device state stream:
//
//	magic "VDPAKMDV" | version u16 | reserved u16 | payload length u32 |
//	payload | CRC32C (Castagnoli) of everything before it
//
// payload: backend (u8 length, bytes) | device id u32 | device features u64
// | driver features u64 | status u8 | config generation u8 | isr u8 |
// msix config u16 | device feature select u32 | driver feature select u32 |
// queue select u16 | config (u16 length, bytes) | pci config (u16 length,
// bytes) | msix (u32 length, bytes) | queue count u16 | per queue: size u16,
// enabled u8, vector u16, desc u64, driver u64, device u64, next avail u16,
// next used u16.
//
// The values describe a virtio-net device with two queues that the mdev
// package's test fake (fakeBacking) can take.
func stateV1() []byte {
	return stateStream(1, fVersion1|fEventIdx|fIndirectDesc|fNetMAC|fNetStatus|fNetMTU,
		fVersion1|fEventIdx|fNetMAC, []queue{
			{128, 1, 1, 0x10000, 0x10800, 0x18000, 5, 5},
			{64, 1, 2, 0x20000, 0x20400, 0x28000, 65535, 65530},
		})
}

// stateV2 is a version 2 device state stream: the version 1 layout, with
// RING_PACKED offered and negotiated. Queue sizes are any value from 1
// (virtio 1.2 §2.8); desc is the descriptor ring, driver and device the
// event suppression areas (4-aligned); next avail and next used are packed
// positions, the ring index in bits 0..14 and the wrap counter in bit 15.
// Queue 0 is at index 5 of its second lap (wrap counters 1, nothing in
// flight); queue 1's avail position (index 3, wrap 0) is one lap ahead of
// its used position (index 97, wrap 1).
func stateV2() []byte {
	return stateStream(2, fVersion1|fEventIdx|fIndirectDesc|fNetMAC|fNetStatus|fNetMTU|fRingPacked,
		fVersion1|fEventIdx|fNetMAC|fRingPacked, []queue{
			{200, 1, 1, 0x10000, 0x10c84, 0x18004, 0x8000 | 5, 0x8000 | 5},
			{100, 1, 2, 0x20000, 0x20800, 0x28000, 3, 0x8000 | 97},
		})
}

// stateStream encodes a device state stream of the given version with the
// devices features, driver features and queues; the other fields are the
// same in every version's frozen stream.
func stateStream(version uint16, devFeatures, drvFeatures uint64, queues []queue) []byte {
	var p []byte
	backend := "software"
	p = append(p, byte(len(backend)))
	p = append(p, backend...)
	p = le.AppendUint32(p, 1) // virtio-net
	p = le.AppendUint64(p, devFeatures)
	p = le.AppendUint64(p, drvFeatures)
	p = append(p, 0x0f, 7, 3) // ACK|DRIVER|DRIVER_OK|FEATURES_OK, generation 7, ISR queue|config
	p = le.AppendUint16(p, 0) // msix config vector
	p = le.AppendUint32(p, 1) // device_feature_select
	p = le.AppendUint32(p, 0) // driver_feature_select
	p = le.AppendUint16(p, 1) // queue_select
	config := []byte{0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0xdc, 0x05}
	p = le.AppendUint16(p, uint16(len(config)))
	p = append(p, config...)
	pci := make([]byte, 256)
	for i := range pci {
		pci[i] = byte(i * 7)
	}
	p = le.AppendUint16(p, uint16(len(pci)))
	p = append(p, pci...)
	msix := make([]byte, 56) // 3 vectors of 16 bytes, 8 bytes of PBA
	for i := range msix {
		msix[i] = byte(0xa0 + i)
	}
	p = le.AppendUint32(p, uint32(len(msix)))
	p = append(p, msix...)
	p = le.AppendUint16(p, uint16(len(queues)))
	for _, q := range queues {
		p = le.AppendUint16(p, q.size)
		p = append(p, q.enabled)
		p = le.AppendUint16(p, q.vector)
		p = le.AppendUint64(p, q.desc)
		p = le.AppendUint64(p, q.driver)
		p = le.AppendUint64(p, q.device)
		p = le.AppendUint16(p, q.avail)
		p = le.AppendUint16(p, q.used)
	}
	out := []byte("VDPAKMDV")
	out = le.AppendUint16(out, version)
	out = le.AppendUint16(out, 0)
	out = le.AppendUint32(out, uint32(len(p)))
	out = append(out, p...)
	return le.AppendUint32(out, crc32.Checksum(out, crc32.MakeTable(crc32.Castagnoli)))
}

// Migration stream message types.
const (
	msgHello  = 1
	msgPages  = 3
	msgRound  = 4
	msgState  = 5
	msgDone   = 6
	msgSync   = 9
	pageSize  = 4096
	regionLen = 0x80000
)

// message is type u8 | length u32 | payload.
func message(typ byte, parts ...[]byte) []byte {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	out := le.AppendUint32([]byte{typ}, uint32(n))
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// page is the content of the page at addr in the frozen stream: every byte
// is addr/4096 xor 0x5a.
func page(addr uint64) []byte {
	b := make([]byte, pageSize)
	for i := range b {
		b[i] = byte(addr/pageSize) ^ 0x5a
	}
	return b
}

// pages is a msgPages: guest address u64 | n whole pages.
func pages(addr uint64, n int) []byte {
	p := le.AppendUint64(nil, addr)
	for i := range n {
		p = append(p, page(addr+uint64(i)*pageSize)...)
	}
	return message(msgPages, p)
}

// round is a msgRound: round u32 | pages u64.
func round(n uint32, pages uint64) []byte {
	return message(msgRound, le.AppendUint64(le.AppendUint32(nil, n), pages))
}

// migrationV1 is the source's side of a protocol version 1 migration of
// two 512 KiB regions at 0 and 0x80000 with 4 KiB pages: round 0 (reduced
// to a few pages, as if the rest were zero), a sync, the final round with a
// dirty run crossing the region boundary (split there), the device state
// and done.
func migrationV1(state []byte) []byte {
	hello := le.AppendUint16(nil, 1)          // protocol version
	hello = le.AppendUint32(hello, pageSize)  // dirty-log page size
	hello = le.AppendUint16(hello, 2)         // regions
	hello = le.AppendUint64(hello, 0)         // region 0 base
	hello = le.AppendUint64(hello, regionLen) // region 0 size
	hello = le.AppendUint64(hello, regionLen) // region 1 base
	hello = le.AppendUint64(hello, regionLen) // region 1 size
	var out []byte
	out = append(out, message(msgHello, hello)...)
	out = append(out, pages(0x3000, 2)...)
	out = append(out, round(0, 2)...)
	out = append(out, message(msgSync)...)
	out = append(out, pages(regionLen-pageSize, 1)...)
	out = append(out, pages(regionLen, 2)...)
	out = append(out, pages(0xff000, 1)...)
	out = append(out, round(1, 4)...)
	out = append(out, message(msgState, state)...)
	out = append(out, message(msgDone)...)
	return out
}
