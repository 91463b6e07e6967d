package proxy

import (
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/migtun/migtun/control"
	"github.com/migtun/migtun/tunnel"
)

// Metric names all start with this prefix; docs/metrics.md lists them.
const metricsNamespace = "migtun"

// metrics are a server's Prometheus metrics, in a registry of its own.
// Event counts are kept by counters; byte counts and what is open now are
// read from the server's state at scrape time, so per-session series
// vanish with their session and bytes rise while streams flow.
type metrics struct {
	reg           *prometheus.Registry
	streams       *prometheus.CounterVec   // channel, result
	refusedTotal  *prometheus.CounterVec   // reason
	sessionsTotal *prometheus.CounterVec   // result
	handshakes    *prometheus.HistogramVec // transport
	peerConns     *prometheus.CounterVec   // transport, direction
	controlBusy   *prometheus.CounterVec   // scope

	// bytes of ended streams, by channel: forward and return.
	mu        sync.Mutex
	doneBytes map[string]*[2]atomic.Int64
}

func newMetrics(s *Server) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		streams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "streams_total",
			Help: "Streams relayed, by channel and result (ok: ended cleanly; failed: aborted or broken).",
		}, []string{"channel", "result"}),
		refusedTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "streams_refused_total",
			Help: "Incoming streams and control requests refused, by reason.",
		}, []string{"reason"}),
		sessionsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "sessions_total",
			Help: "Migration sessions ended, by result: finished, aborted or expired.",
		}, []string{"result"}),
		handshakes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "handshake_duration_seconds",
			Help:    "Duration of TLS and QUIC handshakes with peers that succeeded, by transport.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"transport"}),
		peerConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "peer_connections_total",
			Help: "Authenticated connections with peers, by transport and direction (in: accepted, out: dialed).",
		}, []string{"transport", "direction"}),
		controlBusy: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "control_requests_refused_total",
			Help: "Peers' control requests refused because too many were in flight, by scope (peer: the peer's own bound; all: the host's).",
		}, []string{"scope"}),
		doneBytes: make(map[string]*[2]atomic.Int64),
	}
	m.reg.MustRegister(m.streams, m.refusedTotal, m.sessionsTotal, m.handshakes, m.peerConns, m.controlBusy,
		&stateCollector{s: s}, collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{Namespace: metricsNamespace}))
	return m
}

// onHandshake is the tunnel's OnHandshake hook.
func (m *metrics) onHandshake(t tunnel.Transport, direction string, took time.Duration) {
	m.peerConns.WithLabelValues(string(t), direction).Inc()
	if took >= 0 {
		m.handshakes.WithLabelValues(string(t)).Observe(took.Seconds())
	}
}

func (m *metrics) refused(r tunnel.Reason) { m.refusedTotal.WithLabelValues(r.String()).Inc() }

// streamEnded records a relay that ended.
func (m *metrics) streamEnded(r *activeRelay, err error) {
	result := "ok"
	if err != nil && !isClosed(err) {
		result = "failed"
	}
	m.streams.WithLabelValues(r.channel, result).Inc()
	fwd, ret := r.directions(r.role)
	m.mu.Lock()
	b := m.doneBytes[r.channel]
	if b == nil {
		b = new([2]atomic.Int64)
		m.doneBytes[r.channel] = b
	}
	m.mu.Unlock()
	b[0].Add(fwd)
	b[1].Add(ret)
}

func (m *metrics) sessionEnded(st control.State) { m.sessionsTotal.WithLabelValues(string(st)).Inc() }

// handler serves the exposition.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

var (
	descBytes = prometheus.NewDesc(metricsNamespace+"_stream_bytes_total",
		"Bytes relayed, by channel and direction (forward: source to destination; return: back).",
		[]string{"channel", "direction"}, nil)
	descActive = prometheus.NewDesc(metricsNamespace+"_streams_active",
		"Streams being relayed now, by channel.", []string{"channel"}, nil)
	descSessions = prometheus.NewDesc(metricsNamespace+"_sessions_active",
		"Migration sessions open now (prepared, active or finishing).", nil, nil)
	descSessionBytes = prometheus.NewDesc(metricsNamespace+"_session_bytes_total",
		"Bytes relayed by an open session, by channel and direction; the series ends with the session.",
		[]string{"session", "channel", "direction"}, nil)
	descSessionRate = prometheus.NewDesc(metricsNamespace+"_session_rate_bytes_per_second",
		"Throughput of an open session over the last second, by channel and direction.",
		[]string{"session", "channel", "direction"}, nil)
	descRAMRemaining = prometheus.NewDesc(metricsNamespace+"_migration_ram_remaining_bytes",
		"RAM still to send, as QEMU reports it to migtun migrate, by session.", []string{"session"}, nil)
	descRAMTransferred = prometheus.NewDesc(metricsNamespace+"_migration_ram_transferred_bytes",
		"RAM sent so far, as QEMU reports it to migtun migrate, by session.", []string{"session"}, nil)
	descDirtyRate = prometheus.NewDesc(metricsNamespace+"_migration_dirty_pages_per_second",
		"Guest pages dirtied per second during the migration, as QEMU reports it, by session.", []string{"session"}, nil)
	descMirrorDone = prometheus.NewDesc(metricsNamespace+"_migration_mirror_done_bytes",
		"Bytes of a disk the mirror has copied, by session and disk node.", []string{"session", "disk"}, nil)
	descMirrorTotal = prometheus.NewDesc(metricsNamespace+"_migration_mirror_total_bytes",
		"Bytes of a disk the mirror has to copy, by session and disk node.", []string{"session", "disk"}, nil)
	descCertExpiry = prometheus.NewDesc(metricsNamespace+"_certificate_expiry_timestamp_seconds",
		"When the certificate this host presents expires, as Unix time.", nil, nil)
	descConnecting = prometheus.NewDesc(metricsNamespace+"_streams_connecting",
		"Incoming streams not yet connected to their route: waiting for the earlier streams of their session's channel, or for the local connect.", nil, nil)
	descControlInFlight = prometheus.NewDesc(metricsNamespace+"_control_requests_in_flight",
		"Peers' control requests being served now.", nil, nil)
	descCertReloadFailed = prometheus.NewDesc(metricsNamespace+"_certificate_reload_failed",
		"1 while the certificate and key files in place are not the ones presented (a file is missing or unreadable, or a replaced pair could not be used; the previous pair is still presented), else 0.", nil, nil)
)

// stateCollector reads byte counts and open streams and sessions from the
// server at scrape time.
type stateCollector struct{ s *Server }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descBytes, descActive, descSessions, descControlInFlight, descConnecting, descSessionBytes, descSessionRate,
		descRAMRemaining, descRAMTransferred, descDirtyRate, descMirrorDone, descMirrorTotal,
		descCertExpiry, descCertReloadFailed} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	bytes := map[string]*[2]int64{}
	active := map[string]float64{}
	add := func(channel string, fwd, ret int64) {
		b := bytes[channel]
		if b == nil {
			b = new([2]int64)
			bytes[channel] = b
		}
		b[0] += fwd
		b[1] += ret
	}
	s.metrics.mu.Lock()
	for channel, b := range s.metrics.doneBytes {
		add(channel, b[0].Load(), b[1].Load())
	}
	s.metrics.mu.Unlock()
	s.mu.Lock()
	for r := range s.relays {
		fwd, ret := r.directions(r.role)
		add(r.channel, fwd, ret)
		active[r.channel]++
	}
	s.mu.Unlock()
	for channel, b := range bytes {
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(b[0]), channel, "forward")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(b[1]), channel, "return")
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, active[channel], channel)
	}
	if s.cfg.Certificate != nil {
		leaf, err := s.cfg.Certificate()
		failed := 0.0
		if err != nil {
			failed = 1
		}
		ch <- prometheus.MustNewConstMetric(descCertReloadFailed, prometheus.GaugeValue, failed)
		if leaf != nil {
			ch <- prometheus.MustNewConstMetric(descCertExpiry, prometheus.GaugeValue, float64(leaf.NotAfter.Unix()))
		}
	}
	ch <- prometheus.MustNewConstMetric(descControlInFlight, prometheus.GaugeValue, float64(s.inflight.count()))
	ch <- prometheus.MustNewConstMetric(descConnecting, prometheus.GaugeValue, float64(s.connecting.Load()))
	open := s.sessions.all()
	ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(len(open)))
	for _, sess := range open {
		id := sess.idString()
		for _, sc := range sess.order {
			ci := sess.channelInfo(sc)
			ch <- prometheus.MustNewConstMetric(descSessionBytes, prometheus.CounterValue, float64(ci.BytesForward), id, ci.Name, "forward")
			ch <- prometheus.MustNewConstMetric(descSessionBytes, prometheus.CounterValue, float64(ci.BytesReturn), id, ci.Name, "return")
			ch <- prometheus.MustNewConstMetric(descSessionRate, prometheus.GaugeValue, ci.RateForward, id, ci.Name, "forward")
			ch <- prometheus.MustNewConstMetric(descSessionRate, prometheus.GaugeValue, ci.RateReturn, id, ci.Name, "return")
		}
		sess.mu.Lock()
		p := sess.progress
		sess.mu.Unlock()
		if p == nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(descRAMRemaining, prometheus.GaugeValue, float64(p.RAMRemaining), id)
		ch <- prometheus.MustNewConstMetric(descRAMTransferred, prometheus.GaugeValue, float64(p.RAMTransferred), id)
		ch <- prometheus.MustNewConstMetric(descDirtyRate, prometheus.GaugeValue, float64(p.DirtyPagesRate), id)
		for _, d := range p.Disks {
			ch <- prometheus.MustNewConstMetric(descMirrorDone, prometheus.GaugeValue, float64(d.Done), id, d.Node)
			ch <- prometheus.MustNewConstMetric(descMirrorTotal, prometheus.GaugeValue, float64(d.Total), id, d.Node)
		}
	}
}
