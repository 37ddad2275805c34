package vfiouser_test

import (
	"errors"
	"testing"

	"github.com/vdpakit/vdpakit/mdev/vfiouser"
	"github.com/vdpakit/vdpakit/mdev/vfiouser/vfiousertest"
)

// FuzzDecode feeds arbitrary bytes (and a descriptor count) to the message
// decoder: it must never panic, and every error must wrap a sentinel and
// carry an errno.
func FuzzDecode(f *testing.F) {
	f.Add(vfiousertest.Message(1, vfiouser.CmdVersion, 0, vfiouser.Version{}.Marshal()), 0)
	f.Add(vfiousertest.Message(2, vfiouser.CmdDMAMap, 0, vfiouser.DMAMap{Argsz: 32, Flags: 3, Size: 4096}.Marshal()), 1)
	f.Add(vfiousertest.Message(3, vfiouser.CmdDeviceSetIRQs, 0, vfiouser.IRQSet{Flags: vfiouser.IRQSetDataBool | vfiouser.IRQSetActionTrigger, Index: 2, Count: 2, Bools: []byte{1, 0}}.Marshal()), 0)
	f.Add(vfiousertest.Message(4, vfiouser.CmdDeviceGetRegionInfo, 0, vfiouser.RegionInfo{Index: 4, Size: 4096, Sparse: []vfiouser.SparseArea{{0, 4096}}}.Marshal(64)), 0)
	f.Add(vfiousertest.Message(5, vfiouser.CmdRegionWriteMulti, 0, make([]byte, 8+24)), 0)
	f.Fuzz(func(t *testing.T, b []byte, nfds int) {
		_, err := vfiouser.Decode(b, nfds&15)
		if err == nil {
			return
		}
		var pe *vfiouser.Error
		if !errors.As(err, &pe) || pe.Errno == 0 {
			t.Fatalf("untyped error %v", err)
		}
		for _, s := range []error{vfiouser.ErrTruncated, vfiouser.ErrTooLarge, vfiouser.ErrArgsz, vfiouser.ErrFlags,
			vfiouser.ErrCommand, vfiouser.ErrRange, vfiouser.ErrFds, vfiouser.ErrVersion} {
			if errors.Is(err, s) {
				return
			}
		}
		t.Fatalf("error %v wraps no sentinel", err)
	})
}

func TestRegionInfoRoundTrip(t *testing.T) {
	in := vfiouser.RegionInfo{Index: 4, Flags: vfiouser.RegionFlagRead, Size: 0x4000,
		Sparse: []vfiouser.SparseArea{{0x1000, 0x1000}, {0x3000, 0x1000}}}
	out, err := vfiouser.ParseRegionInfo(in.Marshal(256))
	if err != nil || len(out.Sparse) != 2 || out.Sparse[1] != in.Sparse[1] || out.Flags&vfiouser.RegionFlagCaps == 0 {
		t.Fatalf("%+v %v", out, err)
	}
	// Too small an argsz: the structure only, argsz saying what is needed.
	short, err := vfiouser.ParseRegionInfo(in.Marshal(32))
	if err != nil || len(short.Sparse) != 0 || short.Argsz != 32+16+32 || short.Flags&vfiouser.RegionFlagCaps != 0 {
		t.Fatalf("%+v %v", short, err)
	}
}
