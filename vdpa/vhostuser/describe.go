package vhostuser

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// describe renders a (validated) request in the one-line form of the
// back-end's debug log, which is also the line format of the recorded
// message-sequence fixtures under testdata/lifecycle:
//
//	REQUEST [index] [value] [key=value ...] [nofd] [need_reply]
//
// Values that only mean something in the recording process (memory-table
// and ring addresses, descriptors) are left out: a replay substitutes its
// own. Numbers are decimal except feature and status words (0x...).
func describe(m *Message) string {
	var b strings.Builder
	b.WriteString(m.Request.String())
	p := m.Payload
	switch m.Request {
	case ReqSetFeatures, ReqSetProtocolFeatures, ReqSetStatus:
		if len(p) == u64Size {
			fmt.Fprintf(&b, " %#x", binary.NativeEndian.Uint64(p))
		}
	case ReqSetVringNum, ReqSetVringBase, ReqSetVringEnable:
		if st, err := DecodeVringState(p); err == nil {
			fmt.Fprintf(&b, " %d %d", st.Index, st.Num)
		}
	case ReqGetVringBase:
		if st, err := DecodeVringState(p); err == nil {
			fmt.Fprintf(&b, " %d", st.Index)
		}
	case ReqSetVringAddr:
		if a, err := DecodeVringAddr(p); err == nil {
			fmt.Fprintf(&b, " %d flags=%#x", a.Index, a.Flags)
		}
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		if len(p) == u64Size {
			v := binary.NativeEndian.Uint64(p)
			fmt.Fprintf(&b, " %d", v&VringIndexMask)
			if v&VringNoFd != 0 {
				b.WriteString(" nofd")
			}
		}
	case ReqSetMemTable:
		if rs, err := DecodeMemTable(p); err == nil {
			fmt.Fprintf(&b, " regions=%d", len(rs))
		}
	case ReqSetLogBase:
		if l, err := DecodeLog(p); err == nil {
			fmt.Fprintf(&b, " size=%#x", l.MmapSize)
		}
	case ReqGetConfig, ReqSetConfig:
		if c, err := DecodeConfig(p); err == nil {
			fmt.Fprintf(&b, " offset=%d size=%d", c.Offset, len(c.Data))
		}
	}
	if m.NeedReply() {
		b.WriteString(" need_reply")
	}
	return b.String()
}

// describeReply renders a reply payload for the debug log.
func describeReply(r Request, p []byte) string {
	switch {
	case r == ReqGetVringBase:
		if st, err := DecodeVringState(p); err == nil {
			return fmt.Sprintf("%d %d", st.Index, st.Num)
		}
	case len(p) == u64Size:
		return fmt.Sprintf("%#x", binary.NativeEndian.Uint64(p))
	}
	return fmt.Sprintf("%d bytes", len(p))
}
