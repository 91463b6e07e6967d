package linkemu

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"syscall"
	"time"
)

// CheckResult is what Check measured on a link.
type CheckResult struct {
	// RTT is the quickest of several TCP handshakes across the link: the
	// round trip, as a ping would show it.
	RTT time.Duration
	// Rate is what one TCP connection (bbr, large socket buffers) moved
	// across the link, in bits per second of IP packets as the relay
	// delivered them, over the second half of the transfer, once slow
	// start is over.
	Rate float64
	// Bytes is the volume of the transfer.
	Bytes int64
	// Problems lists what did not match the configuration; empty when the
	// link behaves as configured.
	Problems []string
}

// String renders r on one line.
func (r CheckResult) String() string {
	s := fmt.Sprintf("handshake rtt %s, one TCP stream %.1f Mbit/s", r.RTT.Round(10*time.Microsecond), r.Rate/1e6)
	if len(r.Problems) > 0 {
		s += fmt.Sprintf(" (%d problems: %v)", len(r.Problems), r.Problems)
	}
	return s
}

// Check measures the link: the round trip from TCP handshakes, and the rate
// from one TCP transfer lasting about d (default 3s, and at least 30 round
// trips). A problem is reported when the round trip is off by more than
// 10% (and 2ms), and, on a link without loss, when the rate is under 85% or
// over 102% of the configured one, or when the relay wrote more than 1% of
// the packets late. Check fails only when it cannot
// measure at all.
func (l *Link) Check(ctx context.Context, d time.Duration) (CheckResult, error) {
	var r CheckResult
	cfg := l.cfg
	if d <= 0 {
		d = 3 * time.Second
	}
	d = max(d, 30*cfg.RTT())
	ln, err := l.ListenTCP(B, &net.ListenConfig{Control: bulkSocket}, AddrB+":0")
	if err != nil {
		return r, err
	}
	defer ln.Close()
	addr := ln.Addr().String()

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	context.AfterFunc(ctx, func() { ln.Close() })
	type recv struct {
		n   int64
		err error
	}
	results := make(chan recv, 16)
	wg.Add(1)
	go func() { // the receiver: reads each connection to its end
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				stop := context.AfterFunc(ctx, func() { c.Close() })
				defer stop()
				n, err := io.Copy(io.Discard, c)
				results <- recv{n, err}
			}()
		}
	}()

	dialer := &net.Dialer{Control: bulkSocket}
	// The round trip: handshakes that carry nothing (a loss would show as
	// a retransmitted SYN, a second late, hence the minimum).
	var rtts []time.Duration
	for range 5 {
		t0 := time.Now()
		c, err := l.DialTCP(ctx, A, dialer, addr)
		if err != nil {
			return r, fmt.Errorf("linkemu: check: %w", err)
		}
		rtts = append(rtts, time.Since(t0))
		c.Close()
		<-results
	}
	r.RTT = slices.Min(rtts)
	want := cfg.RTT()
	if diff := r.RTT - want; diff < -time.Millisecond || diff > max(2*time.Millisecond, want/10) {
		r.Problems = append(r.Problems, fmt.Sprintf("round trip %s, configured %s", r.RTT, want))
	}

	// The rate: one stream for d.
	c, err := l.DialTCP(ctx, A, dialer, addr)
	if err != nil {
		return r, fmt.Errorf("linkemu: check: %w", err)
	}
	wg.Add(1)
	go func() { // the sender: writes until c is closed
		defer wg.Done()
		buf := make([]byte, 1<<20)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	// The rate is what the relay delivered over the second half.
	wait := func(d time.Duration) error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	err = wait(d / 2)
	atob0, _ := l.Stats()
	t0 := time.Now()
	if err == nil {
		err = wait(d / 2)
	}
	atob1, _ := l.Stats()
	r.Rate = float64(atob1.Delivered-atob0.Delivered) * 8 / time.Since(t0).Seconds()
	c.SetLinger(0) // a reset: the megabytes still queued need not cross
	c.Close()
	rv := <-results
	if err != nil {
		return r, fmt.Errorf("linkemu: check transfer: %w", err)
	}
	r.Bytes = rv.n
	dir := cfg.AtoB
	if dir.Rate > 0 && dir.Loss == 0 && cfg.BtoA.Loss == 0 && (r.Rate < 0.85*dir.Rate || r.Rate > 1.02*dir.Rate) {
		r.Problems = append(r.Problems, fmt.Sprintf("one TCP stream at %.1f Mbit/s, configured %s", r.Rate/1e6, FormatRate(dir.Rate)))
	}
	if pk := atob1.Packets - atob0.Packets; pk > 0 && float64(atob1.Late-atob0.Late) > 0.01*float64(pk) {
		r.Problems = append(r.Problems, fmt.Sprintf("relay late on %d of %d packets (max %s): it cannot keep up",
			atob1.Late-atob0.Late, pk, atob1.MaxLate))
	}
	return r, nil
}

// bulkSocket makes a socket fit for one fast stream over a long path: bbr
// and 32 MiB buffers (forced past the sysctl limits, as root may).
func bulkSocket(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptString(int(fd), syscall.IPPROTO_TCP, syscall.TCP_CONGESTION, "bbr")
		for _, o := range []int{syscall.SO_SNDBUFFORCE, syscall.SO_RCVBUFFORCE} {
			if e := syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, o, 32<<20); e != nil {
				serr = e
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}
