package kernel

import (
	"fmt"
	"math/bits"
	"strings"

	"github.com/vdpakit/vdpakit/internal/vhostsys"
)

// BackendFeature is a vhost backend feature bit (VHOST_BACKEND_F_*).
type BackendFeature uint

// Backend feature bits (linux/vhost_types.h).
const (
	BackendIOTLBMsgV2          BackendFeature = vhostsys.VHOST_BACKEND_F_IOTLB_MSG_V2
	BackendIOTLBBatch          BackendFeature = vhostsys.VHOST_BACKEND_F_IOTLB_BATCH
	BackendIOTLBASID           BackendFeature = vhostsys.VHOST_BACKEND_F_IOTLB_ASID
	BackendSuspend             BackendFeature = vhostsys.VHOST_BACKEND_F_SUSPEND
	BackendResume              BackendFeature = vhostsys.VHOST_BACKEND_F_RESUME
	BackendEnableAfterDriverOK BackendFeature = vhostsys.VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK
	BackendDescASID            BackendFeature = vhostsys.VHOST_BACKEND_F_DESC_ASID
	BackendIOTLBPersist        BackendFeature = vhostsys.VHOST_BACKEND_F_IOTLB_PERSIST
)

// BackendFeatures is a set of backend feature bits.
type BackendFeatures uint64

// Bit is f's mask.
func (f BackendFeature) Bit() BackendFeatures { return 1 << f }

// Has reports whether every feature in fs is set.
func (s BackendFeatures) Has(fs ...BackendFeature) bool {
	for _, f := range fs {
		if s&f.Bit() == 0 {
			return false
		}
	}
	return true
}

// With returns s with fs set.
func (s BackendFeatures) With(fs ...BackendFeature) BackendFeatures {
	for _, f := range fs {
		s |= f.Bit()
	}
	return s
}

// Supported are the backend features this package knows how to use. It
// negotiates all of them that the kernel offers unless Options says
// otherwise.
const Supported = BackendFeatures(1<<BackendIOTLBMsgV2 | 1<<BackendIOTLBBatch | 1<<BackendIOTLBASID |
	1<<BackendSuspend | 1<<BackendResume | 1<<BackendEnableAfterDriverOK | 1<<BackendDescASID |
	1<<BackendIOTLBPersist)

var backendNames = map[BackendFeature]string{
	BackendIOTLBMsgV2: "IOTLB_MSG_V2", BackendIOTLBBatch: "IOTLB_BATCH", BackendIOTLBASID: "IOTLB_ASID",
	BackendSuspend: "SUSPEND", BackendResume: "RESUME", BackendEnableAfterDriverOK: "ENABLE_AFTER_DRIVER_OK",
	BackendDescASID: "DESC_ASID", BackendIOTLBPersist: "IOTLB_PERSIST",
}

func (f BackendFeature) String() string {
	if n, ok := backendNames[f]; ok {
		return n
	}
	return fmt.Sprintf("BIT_%d", uint(f))
}

// String renders s as "0x... (NAME|NAME)".
func (s BackendFeatures) String() string {
	var names []string
	for v := uint64(s); v != 0; v &= v - 1 {
		names = append(names, BackendFeature(bits.TrailingZeros64(v)).String())
	}
	return fmt.Sprintf("%#x (%s)", uint64(s), strings.Join(names, "|"))
}
