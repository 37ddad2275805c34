package vhostuser

import (
	"testing"
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
