package vhostuser

import (
	"fmt"
	"math/bits"
	"strings"
)

// Request is a vhost-user front-end request type (the header's request
// field).
type Request uint32

// Front-end request types (vhost-user protocol, "Front-end message types").
const (
	ReqGetFeatures         Request = 1
	ReqSetFeatures         Request = 2
	ReqSetOwner            Request = 3
	ReqResetOwner          Request = 4
	ReqSetMemTable         Request = 5
	ReqSetLogBase          Request = 6
	ReqSetLogFd            Request = 7
	ReqSetVringNum         Request = 8
	ReqSetVringAddr        Request = 9
	ReqSetVringBase        Request = 10
	ReqGetVringBase        Request = 11
	ReqSetVringKick        Request = 12
	ReqSetVringCall        Request = 13
	ReqSetVringErr         Request = 14
	ReqGetProtocolFeatures Request = 15
	ReqSetProtocolFeatures Request = 16
	ReqGetQueueNum         Request = 17
	ReqSetVringEnable      Request = 18
	ReqSendRARP            Request = 19
	ReqNetSetMTU           Request = 20
	ReqSetBackendReqFd     Request = 21
	ReqIOTLBMsg            Request = 22
	ReqSetVringEndian      Request = 23
	ReqGetConfig           Request = 24
	ReqSetConfig           Request = 25
	ReqCreateCryptoSession Request = 26
	ReqCloseCryptoSession  Request = 27
	ReqPostcopyAdvise      Request = 28
	ReqPostcopyListen      Request = 29
	ReqPostcopyEnd         Request = 30
	ReqGetInflightFd       Request = 31
	ReqSetInflightFd       Request = 32
	ReqGPUSetSocket        Request = 33
	ReqResetDevice         Request = 34
	ReqVringKick           Request = 35
	ReqGetMaxMemSlots      Request = 36
	ReqAddMemReg           Request = 37
	ReqRemMemReg           Request = 38
	ReqSetStatus           Request = 39
	ReqGetStatus           Request = 40

	reqMax = ReqGetStatus
)

var requestNames = [...]string{
	ReqGetFeatures: "GET_FEATURES", ReqSetFeatures: "SET_FEATURES", ReqSetOwner: "SET_OWNER",
	ReqResetOwner: "RESET_OWNER", ReqSetMemTable: "SET_MEM_TABLE", ReqSetLogBase: "SET_LOG_BASE",
	ReqSetLogFd: "SET_LOG_FD", ReqSetVringNum: "SET_VRING_NUM", ReqSetVringAddr: "SET_VRING_ADDR",
	ReqSetVringBase: "SET_VRING_BASE", ReqGetVringBase: "GET_VRING_BASE",
	ReqSetVringKick: "SET_VRING_KICK", ReqSetVringCall: "SET_VRING_CALL",
	ReqSetVringErr: "SET_VRING_ERR", ReqGetProtocolFeatures: "GET_PROTOCOL_FEATURES",
	ReqSetProtocolFeatures: "SET_PROTOCOL_FEATURES", ReqGetQueueNum: "GET_QUEUE_NUM",
	ReqSetVringEnable: "SET_VRING_ENABLE", ReqSendRARP: "SEND_RARP", ReqNetSetMTU: "NET_SET_MTU",
	ReqSetBackendReqFd: "SET_BACKEND_REQ_FD", ReqIOTLBMsg: "IOTLB_MSG",
	ReqSetVringEndian: "SET_VRING_ENDIAN", ReqGetConfig: "GET_CONFIG", ReqSetConfig: "SET_CONFIG",
	ReqCreateCryptoSession: "CREATE_CRYPTO_SESSION", ReqCloseCryptoSession: "CLOSE_CRYPTO_SESSION",
	ReqPostcopyAdvise: "POSTCOPY_ADVISE", ReqPostcopyListen: "POSTCOPY_LISTEN",
	ReqPostcopyEnd: "POSTCOPY_END", ReqGetInflightFd: "GET_INFLIGHT_FD",
	ReqSetInflightFd: "SET_INFLIGHT_FD", ReqGPUSetSocket: "GPU_SET_SOCKET",
	ReqResetDevice: "RESET_DEVICE", ReqVringKick: "VRING_KICK", ReqGetMaxMemSlots: "GET_MAX_MEM_SLOTS",
	ReqAddMemReg: "ADD_MEM_REG", ReqRemMemReg: "REM_MEM_REG", ReqSetStatus: "SET_STATUS",
	ReqGetStatus: "GET_STATUS",
}

// Known reports whether r is a request type defined by the protocol.
func (r Request) Known() bool { return r >= ReqGetFeatures && r <= reqMax }

func (r Request) String() string {
	if r.Known() {
		return requestNames[r]
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Flags is the header's flags field.
type Flags uint32

// Header flag bits.
const (
	FlagVersionMask Flags = 0x3 // lower two bits: protocol version
	Version         Flags = 0x1 // the only defined version
	FlagReply       Flags = 0x4 // set on every reply from the back-end
	FlagNeedReply   Flags = 0x8 // REPLY_ACK: the sender wants an acknowledgement

	flagsKnown = FlagVersionMask | FlagReply | FlagNeedReply
)

// ProtocolFeature is a vhost-user protocol feature bit number.
type ProtocolFeature uint

// ProtocolFeatures is a set of protocol feature bits.
type ProtocolFeatures uint64

// Protocol feature bits ("Protocol features").
const (
	PFMQ                  ProtocolFeature = 0
	PFLogShmfd            ProtocolFeature = 1
	PFRARP                ProtocolFeature = 2
	PFReplyAck            ProtocolFeature = 3
	PFMTU                 ProtocolFeature = 4
	PFBackendReq          ProtocolFeature = 5
	PFCrossEndian         ProtocolFeature = 6
	PFCryptoSession       ProtocolFeature = 7
	PFPagefault           ProtocolFeature = 8
	PFConfig              ProtocolFeature = 9
	PFBackendSendFd       ProtocolFeature = 10
	PFHostNotifier        ProtocolFeature = 11
	PFInflightShmfd       ProtocolFeature = 12
	PFResetDevice         ProtocolFeature = 13
	PFInbandNotifications ProtocolFeature = 14
	PFConfigureMemSlots   ProtocolFeature = 15
	PFStatus              ProtocolFeature = 16
)

var protocolFeatureNames = [...]string{
	PFMQ: "MQ", PFLogShmfd: "LOG_SHMFD", PFRARP: "RARP", PFReplyAck: "REPLY_ACK", PFMTU: "MTU",
	PFBackendReq: "BACKEND_REQ", PFCrossEndian: "CROSS_ENDIAN", PFCryptoSession: "CRYPTO_SESSION",
	PFPagefault: "PAGEFAULT", PFConfig: "CONFIG", PFBackendSendFd: "BACKEND_SEND_FD",
	PFHostNotifier: "HOST_NOTIFIER", PFInflightShmfd: "INFLIGHT_SHMFD",
	PFResetDevice: "RESET_DEVICE", PFInbandNotifications: "INBAND_NOTIFICATIONS",
	PFConfigureMemSlots: "CONFIGURE_MEM_SLOTS", PFStatus: "STATUS",
}

// Bit returns the mask of f.
func (f ProtocolFeature) Bit() ProtocolFeatures { return 1 << f }

func (f ProtocolFeature) String() string {
	if int(f) < len(protocolFeatureNames) {
		return protocolFeatureNames[f]
	}
	return fmt.Sprintf("BIT_%d", uint(f))
}

// Has reports whether every feature in fs is set.
func (s ProtocolFeatures) Has(fs ...ProtocolFeature) bool {
	for _, f := range fs {
		if s&f.Bit() == 0 {
			return false
		}
	}
	return true
}

// With returns s with the given features set.
func (s ProtocolFeatures) With(fs ...ProtocolFeature) ProtocolFeatures {
	for _, f := range fs {
		s |= f.Bit()
	}
	return s
}

// String renders s as "0x... (NAME|NAME)".
func (s ProtocolFeatures) String() string {
	var names []string
	for v := uint64(s); v != 0; v &= v - 1 {
		names = append(names, ProtocolFeature(bits.TrailingZeros64(v)).String())
	}
	return fmt.Sprintf("%#x (%s)", uint64(s), strings.Join(names, "|"))
}

// Limits of the protocol and of this implementation.
const (
	// HeaderSize is the size of the message header.
	HeaderSize = 12
	// MaxRegions is the largest memory table SET_MEM_TABLE carries
	// (VHOST_MEMORY_MAX_NREGIONS) and the most file descriptors any
	// message may carry.
	MaxRegions = 8
	// MaxFds is the most file descriptors a message may carry.
	MaxFds = MaxRegions
	// MaxConfigSize is the largest device configuration access.
	MaxConfigSize = 256
	// MaxPayload caps the payload size this package accepts: the largest
	// defined payload is a config access (12 + 256 bytes).
	MaxPayload = configHeaderSize + MaxConfigSize
	// MaxQueues is the largest queue index+1 a vring message can address
	// (the index field of fd-carrying messages is 8 bits wide).
	MaxQueues = 256
)

// Payload sizes.
const (
	u64Size          = 8
	vringStateSize   = 8
	vringAddrSize    = 40
	memTableHdrSize  = 8
	memRegionSize    = 32
	logSize          = 16
	configHeaderSize = 12
	inflightMinSize  = 20 // two u64 and two u16; senders may pad to 24
	inflightMaxSize  = 24
	singleRegionSize = 8 + memRegionSize
	iotlbSize        = 8*3 + 2
	iotlbMaxSize     = 8 * 4
)

// Vring message fields.
const (
	// VringIndexMask selects the queue index in the u64 payload of
	// SET_VRING_KICK/CALL/ERR.
	VringIndexMask = 0xff
	// VringNoFd is the "invalid FD" flag of SET_VRING_KICK/CALL/ERR: no
	// descriptor accompanies the message (poll instead).
	VringNoFd = 0x100
	// VringFLog is the flag bit of VringAddr.Flags that enables used-ring
	// logging at VringAddr.Log (VHOST_VRING_F_LOG).
	VringFLog = 1 << 0
)
