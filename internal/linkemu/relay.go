package linkemu

import (
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// lateAfter is how late a packet may be written before it counts as late.
const lateAfter = time.Millisecond

// early is how long before its time a packet may be written: timers wake
// up late by tens to hundreds of microseconds, so writing what is due
// within early keeps the mean delay on the configured one.
const early = 500 * time.Microsecond

// packet is one IP packet in flight, due at at.
type packet struct {
	buf []byte
	at  time.Time
	seq uint64 // keeps packets due at the same time in order
}

// pipe is one direction of the link: it reads packets from in, decides
// their fate and time, and writes them to out when they are due.
type pipe struct {
	in, out *os.File
	d       Direction
	rng     *rand.Rand
	cut     *atomic.Bool
	pool    sync.Pool

	mu   sync.Mutex
	q    []packet // min-heap on (at, seq)
	seq  uint64
	wake chan struct{}
	done chan struct{}
	shut sync.Once

	// nextFree is when the rate limit finishes sending what is queued;
	// only readLoop touches it.
	nextFree time.Time

	packets, bytes, lost, overflow, reordered, late atomic.Int64
	delivered                                       atomic.Int64
	maxLate                                         atomic.Int64
}

func newPipe(in, out *os.File, d Direction, mtu int, rng *rand.Rand, cut *atomic.Bool) *pipe {
	p := &pipe{in: in, out: out, d: d, rng: rng, cut: cut, wake: make(chan struct{}, 1), done: make(chan struct{})}
	size := mtu + 64
	p.pool.New = func() any { b := make([]byte, size); return &b }
	return p
}

func (p *pipe) close() { p.shut.Do(func() { close(p.done) }) }

// readLoop reads packets until the TUN device is closed.
func (p *pipe) readLoop() {
	defer p.close()
	for {
		bp := p.pool.Get().(*[]byte)
		n, err := p.in.Read(*bp)
		if err != nil {
			return
		}
		if at, ok := p.schedule(n, time.Now()); ok {
			p.push(packet{buf: (*bp)[:n], at: at})
		} else {
			p.pool.Put(bp)
		}
	}
}

// schedule decides whether a packet of n bytes read at now goes on, and
// when it is due at the other end.
func (p *pipe) schedule(n int, now time.Time) (time.Time, bool) {
	p.packets.Add(1)
	p.bytes.Add(int64(n))
	if p.cut.Load() || (p.d.Loss > 0 && p.rng.Float64() < p.d.Loss) {
		p.lost.Add(1)
		return time.Time{}, false
	}
	depart := now
	if p.d.Rate > 0 {
		start := p.nextFree
		if start.Before(now) {
			start = now
		}
		queued := start.Sub(now).Seconds() * p.d.Rate / 8
		if int(queued)+n > p.d.Queue {
			p.overflow.Add(1)
			return time.Time{}, false
		}
		depart = start.Add(time.Duration(float64(n) * 8 / p.d.Rate * 1e9))
		p.nextFree = depart
	}
	at := depart.Add(p.d.Delay)
	if p.d.Reorder > 0 && p.rng.Float64() < p.d.Reorder {
		p.reordered.Add(1)
		at = at.Add(p.d.ReorderDelay)
	}
	return at, true
}

func (p *pipe) push(pk packet) {
	p.mu.Lock()
	pk.seq = p.seq
	p.seq++
	p.q = append(p.q, pk)
	p.up(len(p.q) - 1)
	first := len(p.q) == 1 || p.q[0].seq == pk.seq
	p.mu.Unlock()
	if first {
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
}

// writeLoop writes packets to out when they are due, until close.
func (p *pipe) writeLoop() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var due []packet
	for {
		now := time.Now()
		p.mu.Lock()
		for len(p.q) > 0 && p.q[0].at.Before(now.Add(early)) {
			due = append(due, p.pop())
		}
		var next time.Time
		if len(p.q) > 0 {
			next = p.q[0].at
		}
		p.mu.Unlock()
		for i, pk := range due {
			if late := now.Sub(pk.at); late > lateAfter {
				p.late.Add(1)
				if int64(late) > p.maxLate.Load() {
					p.maxLate.Store(int64(late))
				}
			}
			_, _ = p.out.Write(pk.buf) // a full queue in the kernel drops, as a link would
			p.delivered.Add(int64(len(pk.buf)))
			b := pk.buf[:cap(pk.buf)]
			p.pool.Put(&b)
			due[i] = packet{}
		}
		due = due[:0]
		wait := time.Hour
		if !next.IsZero() {
			wait = time.Until(next) - early
		}
		if wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-p.wake:
				if !timer.Stop() {
					<-timer.C
				}
			case <-p.done:
				return
			}
		}
		select {
		case <-p.done:
			return
		default:
		}
	}
}

func (p *pipe) less(i, j int) bool {
	a, b := &p.q[i], &p.q[j]
	if a.at.Equal(b.at) {
		return a.seq < b.seq
	}
	return a.at.Before(b.at)
}

func (p *pipe) up(i int) {
	for i > 0 {
		parent := (i - 1) / 2
		if !p.less(i, parent) {
			return
		}
		p.q[i], p.q[parent] = p.q[parent], p.q[i]
		i = parent
	}
}

func (p *pipe) pop() packet {
	top := p.q[0]
	last := len(p.q) - 1
	p.q[0] = p.q[last]
	p.q[last] = packet{}
	p.q = p.q[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(p.q) && p.less(l, m) {
			m = l
		}
		if r < len(p.q) && p.less(r, m) {
			m = r
		}
		if m == i {
			break
		}
		p.q[i], p.q[m] = p.q[m], p.q[i]
		i = m
	}
	return top
}

func (p *pipe) stats() Stats {
	return Stats{Packets: p.packets.Load(), Bytes: p.bytes.Load(), Delivered: p.delivered.Load(), Lost: p.lost.Load(), Overflow: p.overflow.Load(),
		Reordered: p.reordered.Load(), Late: p.late.Load(), MaxLate: time.Duration(p.maxLate.Load())}
}
