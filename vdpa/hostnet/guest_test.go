package hostnet_test

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/vdpakit/vdpakit/vdpa"
	"github.com/vdpakit/vdpakit/vdpa/softnet"
	"github.com/vdpakit/vdpakit/virtio"
	"github.com/vdpakit/vdpakit/vring"
	"github.com/vdpakit/vdpakit/vring/vringtest"
)

// kernelGuest plays the guest of a softnet device with a Linux kernel: a
// tap device in its own network namespace, bridged to the device's driver
// side by a vringtest driver. What the namespace's kernel sends out of its
// tap is transmitted on the device's transmitq 0 with the virtio-net
// header the kernel gave it (its tap's offloads are the HOST_* features
// negotiated, so it hands over GSO frames exactly when the device accepts
// them); what the device puts in receiveq 0 is written into that tap with
// its header. So the kernel's TCP and UDP talk through the device.
type kernelGuest struct {
	t        testing.TB
	dev      *softnet.Device
	local    *vdpa.Local
	features virtio.Features
	ns       *netns
	tap      *os.File
	drv      [2]*vringtest.Driver
	kick     [2]*vdpa.EventFD
	call     [2]*vdpa.EventFD
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	mu       sync.Mutex
	txFrames int // frames the kernel sent into the device
	txGSO    int
	txUSO    int // of txGSO, UDP_L4
	// uso: the guest's tap hands over UDP_L4 frames (HOST_USO negotiated
	// and the kernel's tap knows USO, Linux 6.2 and later).
	uso        bool
	rxFrames   int // frames the device delivered to the kernel
	rxGSO      int
	maxRxFrame int
}

const (
	guestQueueSize = 64
	guestSlot      = 1 << 17
	guestRxBuf     = virtio.NetHdrSize + softnet.MaxFrame
)

// newKernelGuest negotiates f with dev and bridges it to a tap named
// tapName in ns, which gets address addr (CIDR).
func newKernelGuest(t testing.TB, dev *softnet.Device, f virtio.Features, ns *netns, tapName, addr string) *kernelGuest {
	t.Helper()
	return newKernelGuestOnPair(t, dev, f, ns, tapName, addr, 0)
}

// newKernelGuestOnPair is newKernelGuest driving queue pair pair only
// (receiveq 2*pair and transmitq 2*pair+1).
func newKernelGuestOnPair(t testing.TB, dev *softnet.Device, f virtio.Features, ns *netns, tapName, addr string, pair int) *kernelGuest {
	t.Helper()
	g := startDriver(t, dev, f, pair)
	g.ns = ns
	g.attachTap(t, f, ns, tapName, addr)
	return g
}

// startDriver negotiates f with dev and starts a vringtest driver on queue
// pair pair (receiveq 2*pair, transmitq 2*pair+1), with no buffers
// posted; the pumps are not started.
func startDriver(t testing.TB, dev *softnet.Device, f virtio.Features, pair int) *kernelGuest {
	t.Helper()
	g := &kernelGuest{t: t, dev: dev, features: f}
	l := vdpa.NewLocal(dev, nil)
	g.local = l
	ringBytes := (vring.ContiguousLayoutBytes(guestQueueSize) + 4095) &^ 4095
	dopts := vringtest.DriverOptions{Layout: vring.Layout{Size: guestQueueSize}, SlotSize: guestSlot}
	per := ringBytes + (dopts.DataBytes()+4095)&^4095
	region, err := vring.NewMemfdRegion(0, 2*per, &vring.RegionOptions{Name: "hostnet-guest"})
	require.NoError(t, err)
	mem, err := vring.NewMemory(region)
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	require.NoError(t, l.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver))
	require.NoError(t, l.SetFeatures(f))
	require.NoError(t, l.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK))
	st, err := l.Status()
	require.NoError(t, err)
	require.NotZero(t, st&virtio.StatusFeaturesOK, "device refused %s", f.Format(virtio.DeviceNet))
	require.NoError(t, l.SetMemory(mem))
	for i := 0; i < 2; i++ {
		base := vring.GuestAddr(uint64(i) * per)
		layout := vring.ContiguousLayout(base, guestQueueSize)
		q := 2*pair + i
		d, err := vringtest.NewDriver(mem, vringtest.DriverOptions{Index: q, Layout: layout, Features: f,
			Data: base + vring.GuestAddr(ringBytes), SlotSize: guestSlot})
		require.NoError(t, err)
		g.drv[i] = d
		g.kick[i], err = vdpa.NewEventFD()
		require.NoError(t, err)
		g.call[i], err = vdpa.NewEventFD()
		require.NoError(t, err)
		require.NoError(t, l.SetQueueNum(q, guestQueueSize))
		require.NoError(t, l.SetQueueAddr(q, vdpa.QueueAddr{Desc: layout.Desc, Avail: layout.Avail, Used: layout.Used}))
		require.NoError(t, l.SetQueueKick(q, g.kick[i]))
		require.NoError(t, l.SetQueueCall(q, g.call[i]))
		require.NoError(t, l.EnableQueue(q, true))
	}
	require.NoError(t, l.SetStatus(virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK))
	t.Cleanup(func() { // after the pumps' (cleanups run last first)
		_ = g.local.Close()
		for i := range g.kick {
			g.kick[i].Close()
			g.call[i].Close()
		}
	})
	return g
}

// postRx posts n receive buffers of guestRxBuf bytes to receiveq and
// kicks the device if it wants it.
func (g *kernelGuest) postRx(n int) error {
	for range n {
		if _, err := g.drv[0].Add(nil, []uint32{guestRxBuf}); err != nil {
			return err
		}
	}
	g.drv[0].Queue.Publish()
	if g.drv[0].Queue.NeedsKick() {
		return g.kick[0].Signal()
	}
	return nil
}

// newKernelGuestOnPair, continued: the tap and the pumps.
func (g *kernelGuest) attachTap(t testing.TB, f virtio.Features, ns *netns, tapName, addr string) {
	// The guest's own tap, with the offloads the driver may transmit.
	fdc := make(chan int, 1)
	ns.run(func() {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		require.NoError(t, err)
		ifr, err := unix.NewIfreq(tapName)
		require.NoError(t, err)
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		require.NoError(t, unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr))
		require.NoError(t, unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, virtio.NetHdrSize))
		var off int
		if f.Has(virtio.NetFCsum) {
			off |= unix.TUN_F_CSUM
			if f.Has(virtio.NetFHostTSO4) {
				off |= unix.TUN_F_TSO4
			}
			if f.Has(virtio.NetFHostTSO6) {
				off |= unix.TUN_F_TSO6
			}
			if f.Has(virtio.NetFHostECN) {
				off |= unix.TUN_F_TSO_ECN
			}
		}
		if f.Has(virtio.NetFHostUSO) && unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, off|unix.TUN_F_USO4|unix.TUN_F_USO6) == nil {
			g.uso = true
		} else {
			require.NoError(t, unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, off))
		}
		fdc <- fd
	})
	g.tap = os.NewFile(uintptr(<-fdc), "guest-tap")
	ns.ip("addr", "add", addr, "dev", tapName)
	ns.ip("link", "set", tapName, "up")

	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	g.wg.Add(2)
	go g.txPump()
	go g.rxPump(ctx)
	t.Cleanup(g.close)
}

func (g *kernelGuest) close() {
	g.cancel()
	g.tap.Close()
	g.wg.Wait()
}

// txPump moves what the kernel sends out of its tap to transmitq 0.
func (g *kernelGuest) txPump() {
	defer g.wg.Done()
	buf := make([]byte, virtio.NetHdrSize+softnet.MaxFrame)
	hdrLen := virtio.NetHdrLen(g.features)
	for {
		n, err := g.tap.Read(buf)
		if err != nil {
			return
		}
		h, _ := virtio.DecodeNetHdr(buf[:virtio.NetHdrSize], virtio.NetHdrSize)
		hb := make([]byte, hdrLen)
		_ = h.Encode(hb, hdrLen)
		for {
			for {
				_, ok, err := g.drv[1].Receive()
				if err != nil || !ok {
					break
				}
			}
			_, err := g.drv[1].Add([][]byte{hb, buf[virtio.NetHdrSize:n]}, nil)
			if err == nil {
				break
			}
			if !errors.Is(err, vringtest.ErrFull) {
				g.t.Errorf("transmit: %v", err)
				return
			}
			time.Sleep(20 * time.Microsecond)
		}
		g.drv[1].Queue.Publish()
		if g.drv[1].Queue.NeedsKick() {
			_ = g.kick[1].Signal()
		}
		g.mu.Lock()
		g.txFrames++
		if h.GSOType != 0 {
			g.txGSO++
		}
		if h.GSOType == virtio.NetHdrGSOUDPL4 {
			g.txUSO++
		}
		g.mu.Unlock()
	}
}

// rxPump keeps receiveq 0 full of buffers and writes what the device
// delivers into the kernel's tap.
func (g *kernelGuest) rxPump(ctx context.Context) {
	defer g.wg.Done()
	hdrLen := virtio.NetHdrLen(g.features)
	post := func(n int) {
		if err := g.postRx(n); err != nil {
			g.t.Errorf("post rx: %v", err)
		}
	}
	post(guestQueueSize)
	out := make([]byte, virtio.NetHdrSize+softnet.MaxFrame)
	for ctx.Err() == nil {
		c, ok, err := g.drv[0].Receive()
		if err != nil {
			g.t.Errorf("receive: %v", err)
			return
		}
		if !ok {
			wctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
			_, err := g.call[0].Wait(wctx)
			cancel()
			if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, os.ErrDeadlineExceeded) &&
				!errors.Is(err, context.Canceled) {
				g.t.Errorf("wait rx: %v", err)
				return
			}
			continue
		}
		h, err := virtio.DecodeNetHdr(c.Data, hdrLen)
		if err != nil {
			g.t.Errorf("rx header: %v", err)
			return
		}
		h.NumBuffers = 0
		_ = h.Encode(out, virtio.NetHdrSize)
		n := copy(out[virtio.NetHdrSize:], c.Data[hdrLen:])
		// Into the kernel: a tap write does not block for room.
		_, _ = g.tap.Write(out[:virtio.NetHdrSize+n])
		g.mu.Lock()
		g.rxFrames++
		if h.GSOType != 0 {
			g.rxGSO++
		}
		g.maxRxFrame = max(g.maxRxFrame, n)
		g.mu.Unlock()
		post(1)
	}
}

type guestCounts struct{ txFrames, txGSO, txUSO, rxFrames, rxGSO, maxRxFrame int }

func (g *kernelGuest) counts() guestCounts {
	g.mu.Lock()
	defer g.mu.Unlock()
	return guestCounts{g.txFrames, g.txGSO, g.txUSO, g.rxFrames, g.rxGSO, g.maxRxFrame}
}
