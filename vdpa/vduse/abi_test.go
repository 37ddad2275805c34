package vduse

import (
	"flag"
	"testing"

	"github.com/vdpakit/vdpakit/internal/vhostsys/cabi"
)

// The VDUSE ABI check, as internal/vhostsys's for vhost: TestABIMatchesHeaders
// compiles <linux/vduse.h> with gcc and compares what it prints with the
// golden files (testdata/abi-6.1.txt from the system headers, abi-6.12.txt
// from the 6.12 headers); TestABIMatchesGolden compares every ioctl number,
// structure size, field offset and constant of uapi.go with the golden
// files, with no compiler, so it runs everywhere (the real-kernel harness
// too).

var update = flag.Bool("update", false, "rewrite testdata/abi-*.txt from the C headers")

const (
	golden61  = "testdata/abi-6.1.txt"
	golden612 = "testdata/abi-6.12.txt"
)

// linux/vduse.h uses the _IO* macros without including their header.
var headers = []string{"linux/ioctl.h", "linux/vduse.h"}

func goABI() []cabi.Entry {
	var out []cabi.Entry
	m := func(name string, v uint64) { out = append(out, cabi.Entry{Name: name, Value: v, Macro: true}) }
	e := func(name string, v uint64) { out = append(out, cabi.Entry{Name: name, Value: v}) }
	s := func(ctype string, size uint64) { e("sizeof(struct "+ctype+")", size) }
	o := func(ctype, field string, off uint64) { e("offsetof(struct "+ctype+", "+field+")", off) }

	m("VDUSE_GET_API_VERSION", uint64(ioctlGetAPIVersion))
	m("VDUSE_SET_API_VERSION", uint64(ioctlSetAPIVersion))
	m("VDUSE_CREATE_DEV", uint64(ioctlCreateDev))
	m("VDUSE_DESTROY_DEV", uint64(ioctlDestroyDev))
	m("VDUSE_IOTLB_GET_FD", uint64(ioctlIOTLBGetFD))
	m("VDUSE_DEV_GET_FEATURES", uint64(ioctlDevGetFeatures))
	m("VDUSE_DEV_SET_CONFIG", uint64(ioctlDevSetConfig))
	m("VDUSE_DEV_INJECT_CONFIG_IRQ", uint64(ioctlInjectConfigIRQ))
	m("VDUSE_VQ_SETUP", uint64(ioctlVQSetup))
	m("VDUSE_VQ_GET_INFO", uint64(ioctlVQGetInfo))
	m("VDUSE_VQ_SETUP_KICKFD", uint64(ioctlVQSetupKickFD))
	m("VDUSE_VQ_INJECT_IRQ", uint64(ioctlVQInjectIRQ))
	m("VDUSE_BASE", vduseBase)
	m("VDUSE_API_VERSION", APIVersion)
	m("VDUSE_NAME_MAX", nameMax)
	m("VDUSE_ACCESS_RO", accessRO)
	m("VDUSE_ACCESS_WO", accessWO)
	m("VDUSE_ACCESS_RW", accessRW)
	m("VDUSE_REQ_RESULT_OK", resultOK)
	m("VDUSE_REQ_RESULT_FAILED", resultFailed)
	deassign := int64(eventfdDeassign)
	m("VDUSE_EVENTFD_DEASSIGN", uint64(deassign))
	e("VDUSE_GET_VQ_STATE", reqGetVQState)
	e("VDUSE_SET_STATUS", reqSetStatus)
	e("VDUSE_UPDATE_IOTLB", reqUpdateIOTLB)

	s("vduse_dev_config", sizeDevConfig)
	o("vduse_dev_config", "name", offDevConfigName)
	o("vduse_dev_config", "vendor_id", offDevConfigVendorID)
	o("vduse_dev_config", "device_id", offDevConfigDeviceID)
	o("vduse_dev_config", "features", offDevConfigFeatures)
	o("vduse_dev_config", "vq_num", offDevConfigVQNum)
	o("vduse_dev_config", "vq_align", offDevConfigVQAlign)
	o("vduse_dev_config", "reserved", offDevConfigReserved)
	o("vduse_dev_config", "config_size", offDevConfigConfigSize)
	o("vduse_dev_config", "config", offDevConfigConfig)

	s("vduse_iotlb_entry", sizeIOTLBEntry)
	o("vduse_iotlb_entry", "offset", offIOTLBOffset)
	o("vduse_iotlb_entry", "start", offIOTLBStart)
	o("vduse_iotlb_entry", "last", offIOTLBLast)
	o("vduse_iotlb_entry", "perm", offIOTLBPerm)

	s("vduse_config_data", sizeConfigData)
	o("vduse_config_data", "offset", offConfigDataOffset)
	o("vduse_config_data", "length", offConfigDataLength)
	o("vduse_config_data", "buffer", offConfigDataBuffer)

	s("vduse_vq_config", sizeVQConfig)
	o("vduse_vq_config", "index", offVQConfigIndex)
	o("vduse_vq_config", "max_size", offVQConfigMaxSize)

	s("vduse_vq_info", sizeVQInfo)
	o("vduse_vq_info", "index", offVQInfoIndex)
	o("vduse_vq_info", "num", offVQInfoNum)
	o("vduse_vq_info", "desc_addr", offVQInfoDescAddr)
	o("vduse_vq_info", "driver_addr", offVQInfoDriverAddr)
	o("vduse_vq_info", "device_addr", offVQInfoDeviceAddr)
	o("vduse_vq_info", "split.avail_index", offVQInfoSplitAvailIdx)
	o("vduse_vq_info", "packed.last_avail_counter", offVQInfoPackedAvailCtr)
	o("vduse_vq_info", "packed.last_avail_idx", offVQInfoPackedAvailIdx)
	o("vduse_vq_info", "packed.last_used_counter", offVQInfoPackedUsedCtr)
	o("vduse_vq_info", "packed.last_used_idx", offVQInfoPackedUsedIdx)
	o("vduse_vq_info", "ready", offVQInfoReady)

	s("vduse_vq_eventfd", sizeVQEventfd)
	o("vduse_vq_eventfd", "index", offVQEventfdIndex)
	o("vduse_vq_eventfd", "fd", offVQEventfdFd)

	s("vduse_dev_request", sizeDevRequest)
	o("vduse_dev_request", "type", offRequestType)
	o("vduse_dev_request", "request_id", offRequestID)
	o("vduse_dev_request", "vq_state", offRequestUnion)
	o("vduse_dev_request", "vq_state.index", offRequestVQStateIndex)
	o("vduse_dev_request", "s.status", offRequestStatus)
	o("vduse_dev_request", "iova.start", offRequestIOVAStart)
	o("vduse_dev_request", "iova.last", offRequestIOVALast)

	s("vduse_dev_response", sizeDevResponse)
	o("vduse_dev_response", "request_id", offResponseID)
	o("vduse_dev_response", "result", offResponseResult)
	o("vduse_dev_response", "vq_state.index", offResponseVQStateIndex)
	o("vduse_dev_response", "vq_state.split.avail_index", offResponseVQStateAvail)
	o("vduse_dev_response", "vq_state.packed.last_avail_counter", offResponsePackedAvailC)
	o("vduse_dev_response", "vq_state.packed.last_avail_idx", offResponsePackedAvailI)
	o("vduse_dev_response", "vq_state.packed.last_used_counter", offResponsePackedUsedC)
	o("vduse_dev_response", "vq_state.packed.last_used_idx", offResponsePackedUsedI)
	s("vduse_vq_state_packed", sizeVQStatePacked)
	// Scalars the ioctls take by value: their sizes are in the numbers above.
	return out
}

func TestABIMatchesHeaders(t *testing.T) {
	cabi.CheckHeaders(t, headers, goABI(), golden61, golden612, *update)
}

func TestABIMatchesGolden(t *testing.T) {
	cabi.CheckGolden(t, goABI(), golden61, golden612)
}
