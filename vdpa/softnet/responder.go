package softnet

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/vdpakit/vdpakit/internal/netreply"
)

// Responder is a FrameHandler that plays a host on the other end of the
// link: it answers ARP requests for IP with MAC and ICMP echo requests
// addressed to MAC and IP with echo replies (zero-padded to the 60-byte
// Ethernet minimum). Every other frame is ignored (counted in Ignored). It
// is safe for use by many queue pairs at once, and allocates nothing once
// its reply buffer has grown to the largest reply.
type Responder struct {
	mac [6]byte
	ip  [4]byte

	mu  sync.Mutex // guards buf
	buf []byte

	arpReplies  atomic.Uint64
	echoReplies atomic.Uint64
	ignored     atomic.Uint64
}

// NewResponder returns a responder for the IPv4 address ip at mac.
func NewResponder(mac [6]byte, ip netip.Addr) (*Responder, error) {
	if !ip.Is4() {
		return nil, fmt.Errorf("softnet: responder address %v is not IPv4", ip)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("softnet: responder MAC %x is multicast", mac)
	}
	return &Responder{mac: mac, ip: ip.As4(), buf: make([]byte, 0, 2048)}, nil
}

// ResponderStats counts what a Responder did.
type ResponderStats struct {
	ARPReplies, EchoReplies, Ignored uint64
}

// Stats returns the responder's counters.
func (r *Responder) Stats() ResponderStats {
	return ResponderStats{ARPReplies: r.arpReplies.Load(), EchoReplies: r.echoReplies.Load(), Ignored: r.ignored.Load()}
}

// HandleFrame implements FrameHandler.
func (r *Responder) HandleFrame(tx *Tx, frame []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var k netreply.Kind
	r.buf, k = netreply.Append(r.buf[:0], r.mac, r.ip, frame)
	switch k {
	case netreply.ARP:
		r.arpReplies.Add(1)
	case netreply.Echo:
		r.echoReplies.Add(1)
	default:
		r.ignored.Add(1)
		return
	}
	_ = tx.Reply(r.buf) // Reply copies the frame
}
