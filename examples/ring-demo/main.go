// Command ring-demo moves real Ethernet/IPv4/UDP frames through a pair of
// virtio-net split virtqueues in shared (memfd) guest memory: a "guest"
// goroutine is the driver, transmitting frames on the TX queue and posting
// receive buffers on the RX queue; a "device" goroutine pops each TX frame,
// parses it with gopacket, builds the UDP echo reply and writes it into an RX
// buffer. Both directions use notification suppression (VIRTIO_F_EVENT_IDX)
// with kicks and interrupts modelled as channels. Every frame carries the
// 12-byte virtio-net header (VIRTIO_F_VERSION_1).
//
//	go run ./examples/ring-demo [-frames N]
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
)

const (
	queueSize = 256
	bufSize   = 2048
	txQueue   = 1 // virtio-net queue indices: RX 0, TX 1
	rxQueue   = 0
	memBytes  = 4 << 20
	txRing    = vring.GuestAddr(0x0)
	rxRing    = vring.GuestAddr(0x4000)
	txBufs    = vring.GuestAddr(0x100000)
	rxBufs    = vring.GuestAddr(0x200000)
)

var (
	guestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	peerMAC  = net.HardwareAddr{0x52, 0x54, 0x00, 0xab, 0xcd, 0xef}
	guestIP  = net.IPv4(10, 0, 0, 2).To4()
	peerIP   = net.IPv4(10, 0, 0, 1).To4()
)

// features are what the demo's driver and device agreed on.
var features = virtio.Features(0).With(virtio.FVersion1, virtio.FEventIdx)

// doorbell is a kick or interrupt line: a non-blocking signal.
type doorbell chan struct{}

func (d doorbell) ring() {
	select {
	case d <- struct{}{}:
	default:
	}
}

type stats struct {
	frames, bytes             int
	kicks, kicksSuppressed    int
	irqs, irqsSuppressed      int
	rxReposted, parsedEchoOK  int
	deviceParsed, deviceEchos int
}

func main() {
	frames := flag.Int("frames", 20000, "number of frames to send")
	flag.Parse()
	if err := run(*frames); err != nil {
		fmt.Fprintln(os.Stderr, "ring-demo:", err)
		os.Exit(1)
	}
}

// frame builds frame i as the guest sends it: Ethernet/IPv4/UDP to the
// peer's echo port with a payload naming the frame.
func frame(i int) ([]byte, error) {
	payload := fmt.Appendf(nil, "vdpakit frame %d ", i)
	for len(payload) < 18+(i*37)%1200 {
		payload = append(payload, byte('a'+len(payload)%26))
	}
	return build(guestMAC, peerMAC, guestIP, peerIP, layers.UDPPort(40000+i%20000), 7, payload)
}

func build(srcMAC, dstMAC net.HardwareAddr, src, dst net.IP, sport, dport layers.UDPPort, payload []byte) ([]byte, error) {
	eth := &layers.Ethernet{SrcMAC: srcMAC, DstMAC: dstMAC, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: src, DstIP: dst}
	udp := &layers.UDP{SrcPort: sport, DstPort: dport}
	if err := udp.SetNetworkLayerForChecksum(ip); err != nil {
		return nil, err
	}
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	if err := gopacket.SerializeLayers(buf, opts, eth, ip, udp, gopacket.Payload(payload)); err != nil {
		return nil, err
	}
	return append([]byte(nil), buf.Bytes()...), nil
}

// echo is the device's reply to a parsed frame: addresses and ports
// swapped, same payload.
func echo(p gopacket.Packet) ([]byte, error) {
	eth, _ := p.Layer(layers.LayerTypeEthernet).(*layers.Ethernet)
	ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
	if eth == nil || ip == nil || udp == nil {
		return nil, errors.New("not an Ethernet/IPv4/UDP frame")
	}
	return build(eth.DstMAC, eth.SrcMAC, ip.DstIP, ip.SrcIP, udp.DstPort, udp.SrcPort, udp.Payload)
}

func run(n int) error {
	region, err := vring.NewMemfdRegion(0, memBytes, &vring.RegionOptions{Name: "ring-demo"})
	if err != nil {
		return err
	}
	mem, err := vring.NewMemory(region)
	if err != nil {
		return err
	}
	defer mem.Close()
	hdrLen := virtio.NetHdrLen(features)
	txL, rxL := vring.ContiguousLayout(txRing, queueSize), vring.ContiguousLayout(rxRing, queueSize)

	// The guest's driver side, then the device side on the same rings.
	txDrv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: txQueue, Layout: txL, Features: features})
	if err != nil {
		return err
	}
	rxDrv, err := vring.NewDriverQueue(mem, vring.DriverQueueOptions{Index: rxQueue, Layout: rxL, Features: features})
	if err != nil {
		return err
	}
	txDev, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: txQueue, Layout: txL, Features: features})
	if err != nil {
		return err
	}
	rxDev, err := vring.NewDeviceQueue(mem, vring.DeviceQueueOptions{Index: rxQueue, Layout: rxL, Features: features})
	if err != nil {
		return err
	}
	fmt.Printf("ring-demo: virtio-net RX/TX queues of %d in %d MiB of memfd guest memory (fd %d), features %s, %d-byte net header\n",
		queueSize, memBytes>>20, region.Fd(), features.Format(virtio.DeviceNet), hdrLen)

	txKick, rxKick, txIRQ, rxIRQ := make(doorbell, 1), make(doorbell, 1), make(doorbell, 1), make(doorbell, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var dev stats
	devErr := make(chan error, 1)
	go func() { devErr <- device(ctx, mem, txDev, rxDev, txKick, rxKick, txIRQ, rxIRQ, hdrLen, n, &dev) }()

	start := time.Now()
	drv, err := guest(ctx, mem, txDrv, rxDrv, txKick, rxKick, txIRQ, rxIRQ, hdrLen, n)
	if err != nil {
		return err
	}
	if err := <-devErr; err != nil {
		return err
	}
	elapsed := time.Since(start)

	fmt.Printf("guest:  sent %d frames (%d bytes incl. headers) on TX, received %d echoes on RX, re-posted %d RX buffers\n",
		drv.frames, drv.bytes, drv.parsedEchoOK, drv.rxReposted)
	fmt.Printf("device: parsed %d TX frames with gopacket, wrote %d UDP echoes into RX buffers\n", dev.deviceParsed, dev.deviceEchos)
	fmt.Printf("kicks:  %d sent, %d suppressed by the device's avail_event\n", drv.kicks, drv.kicksSuppressed)
	fmt.Printf("irqs:   %d sent, %d suppressed by the guest's used_event\n", dev.irqs, dev.irqsSuppressed)
	fmt.Printf("state:  TX %+v, RX %+v, %.0f frames/s round trip\n", txDev.State(), rxDev.State(), float64(n)/elapsed.Seconds())
	if drv.parsedEchoOK != n || dev.deviceEchos != n {
		return fmt.Errorf("check FAILED: %d of %d echoes matched", drv.parsedEchoOK, n)
	}
	fmt.Printf("check:  OK, all %d echoes parsed and matched byte for byte\n", n)
	return nil
}

func wait(ctx context.Context, a, b doorbell) error {
	select {
	case <-a:
	case <-b:
	case <-ctx.Done():
		return fmt.Errorf("waiting for a notification: %w", ctx.Err())
	}
	return nil
}

// guest is the driver: it transmits n frames and checks every echo.
func guest(ctx context.Context, mem *vring.Memory, tx, rx *vring.DriverQueue, txKick, rxKick, txIRQ, rxIRQ doorbell, hdrLen, n int) (stats, error) {
	var s stats
	hdr := make([]byte, hdrLen)
	h := virtio.NetHdr{NumBuffers: 1}
	if err := h.Encode(hdr, hdrLen); err != nil {
		return s, err
	}
	rxBuf := func(slot uint16) vring.GuestAddr { return rxBufs + vring.GuestAddr(slot)*bufSize }
	rxSlot := make(map[uint16]uint16, queueSize)
	post := func(slot uint16) error {
		head, err := rx.Add([]vring.Buffer{{Addr: rxBuf(slot), Len: bufSize, Writable: true}})
		rxSlot[head] = slot
		return err
	}
	kick := func(q *vring.DriverQueue, bell doorbell) {
		q.Publish()
		if q.NeedsKick() {
			s.kicks++
			bell.ring()
		} else {
			s.kicksSuppressed++
		}
	}
	for i := range uint16(queueSize) {
		if err := post(i); err != nil {
			return s, err
		}
	}
	kick(rx, rxKick)

	txSlots := make([]uint16, 0, queueSize/2)
	for i := range uint16(queueSize / 2) {
		txSlots = append(txSlots, i)
	}
	txSlotOf := make(map[uint16]uint16, queueSize)
	sent, got := 0, 0
	got0 := make([]byte, bufSize)
	for got < n {
		progress := false
		added := false
		for sent < n && len(txSlots) > 0 && tx.NumFree() >= 2 {
			f, err := frame(sent)
			if err != nil {
				return s, err
			}
			slot := txSlots[len(txSlots)-1]
			addr := txBufs + vring.GuestAddr(slot)*bufSize
			if err := mem.Write(addr, hdr); err != nil {
				return s, err
			}
			if err := mem.Write(addr+vring.GuestAddr(hdrLen), f); err != nil {
				return s, err
			}
			head, err := tx.Add([]vring.Buffer{{Addr: addr, Len: uint32(hdrLen)}, {Addr: addr + vring.GuestAddr(hdrLen), Len: uint32(len(f))}})
			if err != nil {
				return s, err
			}
			txSlots = txSlots[:len(txSlots)-1]
			txSlotOf[head] = slot
			s.frames++
			s.bytes += hdrLen + len(f)
			sent++
			added = true
		}
		if added {
			kick(tx, txKick)
			progress = true
		}
		for { // TX completions free buffers
			head, _, ok, err := tx.Reclaim()
			if err != nil {
				return s, err
			}
			if !ok {
				break
			}
			txSlots = append(txSlots, txSlotOf[head])
			progress = true
		}
		reposted := false
		for { // RX: check each echo, then give the buffer back
			head, length, ok, err := rx.Reclaim()
			if err != nil {
				return s, err
			}
			if !ok {
				break
			}
			slot := rxSlot[head]
			p := got0[:length]
			if err := mem.Read(rxBuf(slot), p); err != nil {
				return s, err
			}
			if _, err := virtio.DecodeNetHdr(p, hdrLen); err != nil {
				return s, err
			}
			pkt := gopacket.NewPacket(p[hdrLen:], layers.LayerTypeEthernet, gopacket.Default)
			want, err := frame(got)
			if err != nil {
				return s, err
			}
			wantEcho, err := echo(gopacket.NewPacket(want, layers.LayerTypeEthernet, gopacket.Default))
			if err != nil {
				return s, err
			}
			if pkt.Layer(layers.LayerTypeUDP) == nil || !bytes.Equal(p[hdrLen:], wantEcho) {
				return s, fmt.Errorf("echo %d does not match", got)
			}
			s.parsedEchoOK++
			got++
			if err := post(slot); err != nil {
				return s, err
			}
			s.rxReposted++
			reposted = true
			progress = true
		}
		if reposted {
			kick(rx, rxKick)
		}
		if progress {
			continue
		}
		// Idle: ask for interrupts and re-check before sleeping.
		p1, err := tx.EnableInterrupts()
		if err != nil {
			return s, err
		}
		p2, err := rx.EnableInterrupts()
		if err != nil {
			return s, err
		}
		if !p1 && !p2 {
			if err := wait(ctx, txIRQ, rxIRQ); err != nil {
				return s, err
			}
		}
	}
	return s, nil
}

// device is the virtio-net device: TX frames come back as UDP echoes on RX.
func device(ctx context.Context, mem *vring.Memory, tx, rx *vring.DeviceQueue, txKick, rxKick, txIRQ, rxIRQ doorbell, hdrLen, n int, s *stats) error {
	var txc, rxc vring.Chain
	haveRx := false
	frame := make([]byte, bufSize)
	out := make([]byte, 0, bufSize)
	interrupt := func(q *vring.DeviceQueue, bell doorbell) {
		if q.NeedsInterrupt() {
			s.irqs++
			bell.ring()
		} else {
			s.irqsSuppressed++
		}
	}
	for s.deviceEchos < n {
		if !haveRx {
			ok, err := rx.Pop(&rxc)
			if err != nil {
				return err
			}
			if !ok {
				// No receive buffer: wait for the guest to post one.
				if pending, err := rx.EnableNotify(); err != nil {
					return err
				} else if !pending {
					if err := wait(ctx, rxKick, rxKick); err != nil {
						return err
					}
				}
				continue
			}
			haveRx = true
		}
		ok, err := tx.Pop(&txc)
		if err != nil {
			return err
		}
		if !ok {
			interrupt(tx, txIRQ)
			interrupt(rx, rxIRQ)
			if pending, err := tx.EnableNotify(); err != nil {
				return err
			} else if !pending {
				if err := wait(ctx, txKick, txKick); err != nil {
					return err
				}
			}
			continue
		}
		// Copy the frame out of guest memory before parsing: the guest may
		// change its buffers at any time.
		m := txc.Gather(frame)
		if m < hdrLen {
			return fmt.Errorf("TX chain %d: %d bytes, shorter than the net header", txc.Head, m)
		}
		pkt := gopacket.NewPacket(frame[hdrLen:m], layers.LayerTypeEthernet, gopacket.NoCopy)
		s.deviceParsed++
		reply, err := echo(pkt)
		if err != nil {
			return fmt.Errorf("TX chain %d: %w", txc.Head, err)
		}
		out = append(out[:0], frame[:hdrLen]...)
		out = append(out, reply...)
		if uint64(len(out)) > rxc.WritableLen {
			return fmt.Errorf("RX buffer of %d bytes too small for %d", rxc.WritableLen, len(out))
		}
		rxc.Scatter(out)
		if err := rx.PushChain(&rxc, uint32(len(out))); err != nil {
			return err
		}
		haveRx = false
		if err := tx.Push(txc.Head, 0); err != nil {
			return err
		}
		s.deviceEchos++
	}
	interrupt(tx, txIRQ)
	interrupt(rx, rxIRQ)
	return nil
}
