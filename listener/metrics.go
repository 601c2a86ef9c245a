package listener

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics exports the state of the jobs for Prometheus. Jobs by state are
// read from tat.migrations at each scrape (so every replica reports the same
// numbers: aggregate them with max, not sum); the per-job series cover the
// jobs this runner runs, labelled {job, table}.
type Metrics struct {
	l            *Listener
	finishedRuns *prometheus.CounterVec

	up, jobs, rowsCopied, rowsTotal, rate, backlog, lagBytes, lockAttempts, paused, throttled, running *prometheus.Desc
}

// Scrape timeout of the database query behind /metrics.
const scrapeTimeout = 5 * time.Second

func newMetrics(l *Listener) *Metrics {
	job := []string{"job", "table"}
	return &Metrics{
		l: l,
		finishedRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tat_runner_jobs_finished_total",
			Help: "Runs ended by this runner, by outcome (done, failed, cancelled, queued = handed back on shutdown).",
		}, []string{"state"}),
		up:           prometheus.NewDesc("tat_up", "1 when the last scrape could read tat.migrations.", nil, nil),
		jobs:         prometheus.NewDesc("tat_jobs", "Migrations in tat.migrations by state (the same on every replica).", []string{"state"}, nil),
		running:      prometheus.NewDesc("tat_runner_jobs", "Migrations this runner holds.", nil, nil),
		rowsCopied:   prometheus.NewDesc("tat_job_rows_copied", "Rows copied into the shadow table.", job, nil),
		rowsTotal:    prometheus.NewDesc("tat_job_rows_total_estimate", "Estimated rows of the table.", job, nil),
		rate:         prometheus.NewDesc("tat_job_rows_per_second", "Copy rate (smoothed).", job, nil),
		backlog:      prometheus.NewDesc("tat_job_delta_backlog", "Captured changes not yet applied to the shadow table.", job, nil),
		lagBytes:     prometheus.NewDesc("tat_job_capture_lag_bytes", "WAL not yet consumed by logical capture.", job, nil),
		lockAttempts: prometheus.NewDesc("tat_job_lock_attempts", "Cut-over lock attempts so far.", job, nil),
		paused:       prometheus.NewDesc("tat_job_paused", "1 while the job holds for tat.pause.", job, nil),
		throttled:    prometheus.NewDesc("tat_job_throttled", "1 while the job holds for a throttling limit.", job, nil),
	}
}

// Metrics is the listener's Prometheus collector; register it in a registry.
func (l *Listener) Metrics() *Metrics { return l.metrics }

// finished counts a run that ended with state ("" = not counted).
func (m *Metrics) finished(state string) {
	if state != "" {
		m.finishedRuns.WithLabelValues(state).Inc()
	}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.up, m.jobs, m.running, m.rowsCopied, m.rowsTotal, m.rate, m.backlog,
		m.lagBytes, m.lockAttempts, m.paused, m.throttled} {
		ch <- d
	}
	m.finishedRuns.Describe(ch)
}

const sqlMetricsStates = `select s.state, count(m.id)::float8
  from unnest(array['queued', 'running', 'paused', 'waiting_switch', 'kept', 'done', 'failed', 'cancelled', 'reverted']) s(state)
  left join tat.migrations m on m.state = s.state group by s.state`

const sqlMetricsJobs = `select id, coalesce(table_name, ''), rows_copied, coalesce(rows_total, 0), coalesce(rows_per_second, 0)::float8,
	coalesce(delta_backlog, 0), coalesce(capture_lag_bytes, 0), lock_attempts, state = 'paused', throttle_reason is not null
  from tat.migrations where runner = $1 and state in ('running', 'paused', 'waiting_switch') order by id`

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	m.finishedRuns.Collect(ch)
	m.l.mu.Lock()
	pool := m.l.pool
	n := len(m.l.jobs)
	m.l.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(m.running, prometheus.GaugeValue, float64(n))
	if pool == nil {
		ch <- prometheus.MustNewConstMetric(m.up, prometheus.GaugeValue, 0)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	ok := m.collectDB(ctx, ch)
	ch <- prometheus.MustNewConstMetric(m.up, prometheus.GaugeValue, map[bool]float64{true: 1, false: 0}[ok])
}

func (m *Metrics) collectDB(ctx context.Context, ch chan<- prometheus.Metric) bool {
	pool := m.l.pool
	rows, err := pool.Query(ctx, sqlMetricsStates)
	if err != nil {
		m.l.log.WithError(err).Warn("metrics")
		return false
	}
	for rows.Next() {
		var state string
		var n float64
		if err := rows.Scan(&state, &n); err != nil {
			rows.Close()
			return false
		}
		ch <- prometheus.MustNewConstMetric(m.jobs, prometheus.GaugeValue, n, state)
	}
	rows.Close()
	if rows.Err() != nil {
		return false
	}
	rows, err = pool.Query(ctx, sqlMetricsJobs, m.l.cfg.RunnerID)
	if err != nil {
		m.l.log.WithError(err).Warn("metrics")
		return false
	}
	defer rows.Close()
	for rows.Next() {
		var id, copied, total, backlog, lag int64
		var table string
		var rate float64
		var locks int
		var paused, throttled bool
		if err := rows.Scan(&id, &table, &copied, &total, &rate, &backlog, &lag, &locks, &paused, &throttled); err != nil {
			return false
		}
		lv := []string{strconv.FormatInt(id, 10), table}
		gauge := func(d *prometheus.Desc, v float64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, lv...)
		}
		gauge(m.rowsCopied, float64(copied))
		gauge(m.rowsTotal, float64(total))
		gauge(m.rate, rate)
		gauge(m.backlog, float64(backlog))
		gauge(m.lagBytes, float64(lag))
		gauge(m.lockAttempts, float64(locks))
		gauge(m.paused, b2f(paused))
		gauge(m.throttled, b2f(throttled))
	}
	return rows.Err() == nil
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
