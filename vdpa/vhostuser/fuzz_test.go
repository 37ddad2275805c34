package vhostuser

import (
	"context"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa/vhostuser/vhostusertest"
)

// FuzzDecode feeds arbitrary bytes and a descriptor count to the decoder
// and the typed payload parsers: they must never panic, and every
// descriptor handed over must be closed or owned by the message.
func FuzzDecode(f *testing.F) {
	f.Add(rawMsg(ReqGetFeatures, Version, 0, nil), uint8(0))
	f.Add(rawMsg(ReqSetMemTable, Version, 8+32, memTablePayload(1, 1)), uint8(1))
	f.Add(rawMsg(ReqSetVringAddr, Version, 40, VringAddr{Index: 1, Desc: 0x1000}.Encode()), uint8(0))
	f.Add(rawMsg(ReqSetVringKick, Version, 8, u64p(VringNoFd|1)), uint8(0))
	f.Add(rawMsg(ReqGetConfig, Version|FlagNeedReply, 12+6, Config{Data: make([]byte, 6)}.Encode()), uint8(0))
	f.Add(rawMsg(ReqSetLogBase, Version, 16, Log{MmapSize: 4096}.Encode()), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, nfds uint8) {
		fds := pipeFds(t, int(nfds%(MaxFds+2)))
		m, err := Decode(b, fds)
		if err != nil {
			for _, fd := range fds {
				if fdOpen(fd) {
					t.Fatalf("fd %d left open after error %v", fd, err)
				}
			}
			return
		}
		defer m.Close()
		switch m.Request {
		case ReqSetVringNum, ReqSetVringBase, ReqGetVringBase, ReqSetVringEnable:
			if _, err := DecodeVringState(m.Payload); err != nil {
				t.Fatalf("validated vring state does not parse: %v", err)
			}
		case ReqSetVringAddr:
			if _, err := DecodeVringAddr(m.Payload); err != nil {
				t.Fatalf("validated vring addr does not parse: %v", err)
			}
		case ReqSetMemTable:
			rs, err := DecodeMemTable(m.Payload)
			if err != nil || len(rs) != len(m.Fds) {
				t.Fatalf("validated mem table: %d regions, %d fds, %v", len(rs), len(m.Fds), err)
			}
		case ReqAddMemReg, ReqRemMemReg:
			if _, err := DecodeSingleRegion(m.Payload); err != nil {
				t.Fatalf("validated region does not parse: %v", err)
			}
		case ReqSetLogBase:
			if _, err := DecodeLog(m.Payload); err != nil {
				t.Fatalf("validated log does not parse: %v", err)
			}
		case ReqGetConfig, ReqSetConfig:
			if _, err := DecodeConfig(m.Payload); err != nil {
				t.Fatalf("validated config does not parse: %v", err)
			}
		case ReqGetInflightFd, ReqSetInflightFd:
			if _, err := DecodeInflight(m.Payload); err != nil {
				t.Fatalf("validated inflight does not parse: %v", err)
			}
		}
	})
}

// fuzzSessionSeed is a valid session the way DPDK's virtio-user runs it,
// with its rings inside a 1 MiB region at user address 0x7f0000000000.
func fuzzSessionSeed() []byte { return fuzzSessionSeedWith(false) }

// fuzzSessionSeedWith is fuzzSessionSeed with, when slots, the memory sent
// region by region as QEMU does with CONFIGURE_MEM_SLOTS (the ring's
// region twice, as QEMU 7.2's second queue pair repeats it, and a region
// added and removed while the rings run).
func fuzzSessionSeedWith(slots bool) []byte {
	const ua = 0x7f0000000000
	var b []byte
	add := func(r Request, f Flags, p []byte) { b = Encode(b, Header{Request: r, Flags: Version | f}, p) }
	add(ReqSetOwner, 0, nil)
	add(ReqGetFeatures, 0, nil)
	add(ReqGetProtocolFeatures, 0, nil)
	add(ReqSetProtocolFeatures, 0, putU64(uint64(SupportedProtocolFeatures)))
	add(ReqSetVringCall, 0, putU64(0))
	add(ReqSetVringCall, 0, putU64(1))
	add(ReqSetFeatures, 0, putU64(1<<32|1<<30|1<<15))
	add(ReqSetStatus, FlagNeedReply, putU64(0xb))
	if slots {
		add(ReqGetMaxMemSlots, 0, nil)
		for range 2 {
			add(ReqAddMemReg, FlagNeedReply, EncodeSingleRegion(MemoryRegion{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: ua}))
		}
	} else {
		add(ReqSetMemTable, FlagNeedReply, EncodeMemTable([]MemoryRegion{{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: ua}}))
	}
	add(ReqSetLogBase, 0, Log{MmapSize: 4096}.Encode())
	for q := uint32(0); q < 2; q++ {
		base := uint64(ua) + uint64(q)*0x10000
		add(ReqSetVringNum, 0, VringState{Index: q, Num: 256}.Encode())
		add(ReqSetVringBase, 0, VringState{Index: q}.Encode())
		add(ReqSetVringAddr, 0, VringAddr{Index: q, Desc: base, Avail: base + 0x1000, Used: base + 0x2000, Log: base - ua + 0x2000}.Encode())
		add(ReqSetVringKick, 0, putU64(uint64(q)))
		add(ReqSetVringEnable, 0, VringState{Index: q, Num: 1}.Encode())
	}
	add(ReqSetStatus, FlagNeedReply, putU64(0xf))
	if slots {
		other := MemoryRegion{GuestPhysAddr: 1 << 30, MemorySize: 1 << 20, UserspaceAddr: ua + 1<<32}
		add(ReqAddMemReg, FlagNeedReply, EncodeSingleRegion(other))
		add(ReqRemMemReg, FlagNeedReply, EncodeSingleRegion(other))
	}
	add(ReqGetConfig, FlagNeedReply, Config{Data: make([]byte, 6)}.Encode())
	add(ReqGetVringBase, 0, VringState{Index: 1}.Encode())
	add(ReqSetStatus, 0, putU64(0))
	return b
}

// FuzzBackendSession feeds a sequence of messages to a back-end session.
// The harness attaches descriptors the way a front-end would (memfds for
// SET_MEM_TABLE and SET_LOG_BASE, eventfds for SET_VRING_KICK/CALL/ERR
// without the invalid-fd flag), so the fuzzer reaches running rings. The
// session must end (no hang, no panic) and every descriptor must be closed.
func FuzzBackendSession(f *testing.F) {
	f.Add(fuzzSessionSeed())
	f.Add(fuzzSessionSeedWith(true))
	f.Add(Encode(nil, Header{Request: ReqSetMemTable, Flags: Version}, memTablePayload(9, 8)))
	f.Fuzz(func(t *testing.T, in []byte) {
		before := openFdSet(t)
		a, b := socketpair(t)
		// Replies are discarded by a reader so the back-end never blocks.
		go func() { _, _ = io.Copy(io.Discard, a) }()
		done := make(chan error, 1)
		h := vhostusertest.New(vhostusertest.Loopback, [6]byte{})
		go func() { done <- NewBackend(h, nil).ServeConn(context.Background(), b) }()
		for len(in) >= HeaderSize {
			hd := Header{Request: Request(binary.NativeEndian.Uint32(in)), Flags: Flags(binary.NativeEndian.Uint32(in[4:])),
				Size: binary.NativeEndian.Uint32(in[8:])}
			n := HeaderSize + int(min(hd.Size, MaxPayload+1))
			if n > len(in) {
				n = len(in)
			}
			msg := in[:n]
			in = in[n:]
			var fds []int
			p := msg[HeaderSize:]
			switch hd.Request {
			case ReqSetMemTable:
				if len(p) >= 4 {
					for i := 0; i < int(min(binary.NativeEndian.Uint32(p), MaxRegions)); i++ {
						fd, err := unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC)
						if err == nil {
							_ = unix.Ftruncate(fd, 1<<20)
							fds = append(fds, fd)
						}
					}
				}
			case ReqAddMemReg:
				if fd, err := unix.MemfdCreate("fuzzslot", unix.MFD_CLOEXEC); err == nil {
					_ = unix.Ftruncate(fd, 1<<20)
					fds = append(fds, fd)
				}
			case ReqSetLogBase:
				if fd, err := unix.MemfdCreate("fuzzlog", unix.MFD_CLOEXEC); err == nil {
					_ = unix.Ftruncate(fd, 1<<16)
					fds = append(fds, fd)
				}
			case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
				if len(p) >= 8 && binary.NativeEndian.Uint64(p)&VringNoFd == 0 {
					if fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err == nil {
						fds = append(fds, fd)
					}
				}
			}
			var oob []byte
			if len(fds) > 0 {
				oob = unix.UnixRights(fds...)
			}
			_, _, err := a.WriteMsgUnix(msg, oob, nil)
			closeFds(fds)
			if err != nil {
				break
			}
		}
		_ = a.CloseWrite()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("back-end session did not end")
		}
		_ = a.Close()
		_ = b.Close()
		if leaked := leakedSince(t, before); len(leaked) != 0 {
			t.Fatalf("descriptors leaked: %v", leaked)
		}
	})
}
