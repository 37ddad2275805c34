package vring

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"
)

// Traffic for the concurrency tests: the driver and the device each hold an
// identically seeded generator, so the device can check every chain's shape
// and content, and the driver every response, without sharing any state
// except the ring.

const (
	maxReadable  = 3
	maxSegLen    = 64
	maxWritable  = 128
	trafficSlot  = 512 // >= maxReadable*maxSegLen + maxWritable
	respSeedSalt = 0x9e3779b97f4a7c15
)

// idler backs off a polling loop that found nothing to do: it yields at
// first and then sleeps briefly, so a poller does not starve its peer on a
// loaded machine. It affects speed only, never correctness.
type idler struct{ n int }

func (i *idler) idle() {
	i.n++
	if i.n < 64 {
		runtime.Gosched()
		return
	}
	time.Sleep(20 * time.Microsecond)
}

func (i *idler) busy() { i.n = 0 }

type gen struct{ r *rand.Rand }

func newGen(seed uint64) gen { return gen{rand.New(rand.NewPCG(seed, seed^0xdeadbeef))} }

type chainSpec struct {
	nr   int
	rlen [maxReadable]uint32
	wlen uint32
}

func (g gen) spec() chainSpec {
	var s chainSpec
	v := g.r.Uint64()
	s.nr = 1 + int(v%maxReadable)
	v /= maxReadable
	for i := range s.nr {
		s.rlen[i] = 1 + uint32(v%maxSegLen)
		v /= maxSegLen
	}
	s.wlen = 1 + uint32(v%maxWritable)
	return s
}

// fill writes the next len(p) pseudo-random bytes into p.
func (g gen) fill(p []byte) {
	for len(p) >= 8 {
		v := g.r.Uint64()
		for i := range 8 {
			p[i] = byte(v >> (8 * i))
		}
		p = p[8:]
	}
	if len(p) > 0 {
		v := g.r.Uint64()
		for i := range p {
			p[i] = byte(v >> (8 * i))
		}
	}
}

type trafficOpts struct {
	n        int
	seed     uint64
	batch    int
	data     GuestAddr // slots: size*trafficSlot bytes
	indirect bool      // driver uses indirect tables at data+size*trafficSlot
	// kick and waitIntr (driver) / interrupt and waitKick (device) connect
	// notifications; nil means busy polling.
	kick, interrupt    func()
	waitKick, waitIntr func(context.Context) error
	idleTimeout        time.Duration
}

// runDriver adds opts.n chains and reclaims them, checking every response.
func runDriver(mem *Memory, q *DriverQueue, o trafficOpts) error {
	g, resp := newGen(o.seed), newGen(o.seed^respSeedSalt)
	size := int(q.Size())
	type slotInfo struct {
		head  uint16
		waddr GuestAddr
		wlen  uint32
	}
	slots := make([]slotInfo, size)
	var bufs [maxReadable + 1]Buffer
	scratch := make([]byte, maxWritable)
	sent, recvd := 0, 0
	var idl idler
	for recvd < o.n {
		progress := false
		for sent < o.n && q.NumFree() > maxReadable && q.Outstanding() < size {
			s := g.spec()
			slot := sent % size
			base := o.data + GuestAddr(slot*trafficSlot)
			addr := base
			for i := range s.nr {
				b, err := mem.Slice(addr, uint64(s.rlen[i]))
				if err != nil {
					return err
				}
				g.fill(b)
				bufs[i] = Buffer{Addr: addr, Len: s.rlen[i]}
				addr += GuestAddr(s.rlen[i])
			}
			bufs[s.nr] = Buffer{Addr: addr, Len: s.wlen, Writable: true}
			var head uint16
			var err error
			if o.indirect {
				head, err = q.AddIndirect(o.data+GuestAddr(size*trafficSlot+slot*16*(maxReadable+1)), bufs[:s.nr+1])
			} else {
				head, err = q.Add(bufs[:s.nr+1])
			}
			if err != nil {
				return fmt.Errorf("add chain %d: %w", sent, err)
			}
			slots[slot] = slotInfo{head, addr, s.wlen}
			sent++
			progress = true
		}
		q.Publish()
		if q.NeedsKick() && o.kick != nil {
			o.kick()
		}
		for {
			head, n, ok, err := q.Reclaim()
			if err != nil {
				return fmt.Errorf("reclaim %d: %w", recvd, err)
			}
			if !ok {
				break
			}
			si := slots[recvd%size]
			if head != si.head {
				return fmt.Errorf("chain %d: reclaimed head %d, want %d", recvd, head, si.head)
			}
			rl := uint32(resp.r.Uint64() % uint64(si.wlen+1))
			if n != rl {
				return fmt.Errorf("chain %d: used len %d, want %d", recvd, n, rl)
			}
			resp.fill(scratch[:rl])
			got, err := mem.Slice(si.waddr, uint64(rl))
			if err != nil {
				return err
			}
			if !bytes.Equal(got, scratch[:rl]) {
				return fmt.Errorf("chain %d: response content differs", recvd)
			}
			recvd++
			progress = true
		}
		if progress {
			idl.busy()
			continue
		}
		if o.waitIntr == nil {
			idl.idle()
			continue
		}
		pending, err := q.EnableInterrupts()
		if err != nil {
			return err
		}
		if !pending {
			ctx, cancel := context.WithTimeout(context.Background(), o.idleTimeout)
			err := o.waitIntr(ctx)
			cancel()
			if err != nil {
				return fmt.Errorf("driver waiting for an interrupt after %d chains (lost notification?): %w", recvd, err)
			}
		}
	}
	return nil
}

// runDevice pops opts.n chains, checks them and pushes responses.
func runDevice(q *DeviceQueue, o trafficOpts) error {
	g, resp := newGen(o.seed), newGen(o.seed^respSeedSalt)
	cs := make([]Chain, o.batch)
	elems := make([]UsedElem, o.batch)
	scratch := make([]byte, maxSegLen)
	wbuf := make([]byte, maxWritable)
	done := 0
	var idl idler
	if o.waitKick != nil {
		q.DisableNotify()
	}
	for round := 0; done < o.n; round++ {
		if round%2 == 0 {
			// Prefetch on every other round, as a device does at the
			// start of a batch: it reads the ring the driver is writing
			// (under -race, with plain reads ordered as Pop's are) and
			// must change nothing Pop then sees.
			if n := q.Prefetch(o.batch); n < 0 || n > o.batch {
				return fmt.Errorf("Prefetch(%d) = %d", o.batch, n)
			}
		}
		k, err := q.PopBatch(cs)
		if err != nil {
			return fmt.Errorf("pop after %d chains: %w", done, err)
		}
		if k == 0 {
			if o.waitKick == nil {
				idl.idle()
				continue
			}
			pending, err := q.EnableNotify()
			if err != nil {
				return err
			}
			if !pending {
				ctx, cancel := context.WithTimeout(context.Background(), o.idleTimeout)
				err := o.waitKick(ctx)
				cancel()
				if err != nil {
					return fmt.Errorf("device waiting for a kick after %d chains (lost notification?): %w", done, err)
				}
			}
			q.DisableNotify()
			continue
		}
		for i := range k {
			c := &cs[i]
			s := g.spec()
			if c.Readable != s.nr || len(c.Segs) != s.nr+1 || c.WritableLen != uint64(s.wlen) {
				return fmt.Errorf("chain %d: shape %d/%d segs, %d writable; want %d/%d, %d",
					done+i, c.Readable, len(c.Segs), c.WritableLen, s.nr, s.nr+1, s.wlen)
			}
			for j := range s.nr {
				g.fill(scratch[:s.rlen[j]])
				if !bytes.Equal(c.Segs[j].Buf, scratch[:s.rlen[j]]) {
					return fmt.Errorf("chain %d segment %d: content differs", done+i, j)
				}
			}
			rl := uint32(resp.r.Uint64() % uint64(s.wlen+1))
			resp.fill(wbuf[:rl])
			c.Scatter(wbuf[:rl])
			elems[i] = UsedElem{Head: c.Head, Len: rl}
		}
		if k == 1 {
			err = q.PushChain(&cs[0], elems[0].Len)
		} else {
			err = q.PushBatch(elems[:k])
		}
		if err != nil {
			return err
		}
		done += k
		idl.busy()
		if q.NeedsInterrupt() && o.interrupt != nil {
			o.interrupt()
		}
	}
	return nil
}
