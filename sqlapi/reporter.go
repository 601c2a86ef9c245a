package sqlapi

import (
	"context"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/replicate"
)

// ProgressInterval is the default minimum time between two progress writes
// of one job (a phase change is written at once).
const ProgressInterval = time.Second

// Reporter implements replicate.Reporter over tat.migrations (progress,
// throttled) and tat.events (every event). It is safe for concurrent use.
type Reporter struct {
	db       DB
	id       int64
	log      logrus.FieldLogger
	interval time.Duration

	mu        sync.Mutex
	phase     string
	lastWrite time.Time
	pending   *replicate.Progress
	last      replicate.Progress
	held      bool
	lag       lagTracker
	logical   bool   // the engine reported WAL not yet consumed: logical capture
	outcome   string // of a kept window (keep_old): "", reverted, finished
}

var _ replicate.Reporter = (*Reporter)(nil)

// NewReporter reports for job id through db (a pool: calls come from several
// goroutines). log may be nil.
func NewReporter(db DB, id int64, log logrus.FieldLogger) *Reporter {
	if log == nil {
		log = logrus.StandardLogger()
	}
	return &Reporter{db: db, id: id, log: log, interval: ProgressInterval}
}

// SetInterval changes the throttle (tests).
func (r *Reporter) SetInterval(d time.Duration) { r.mu.Lock(); r.interval = d; r.mu.Unlock() }

// Phase is the last phase the engine reported ("" before the first).
func (r *Reporter) Phase() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.phase
}

// sqlProgress writes a progress sample. The state follows the engine: paused
// while it holds for tat.pause (and the pause is still requested),
// waiting_switch while it waits for tat.switch. rows_per_second is smoothed
// from the samples (rate_rows / rate_at hold the previous one, taken at
// least a second earlier).
const sqlProgress = `update tat.migrations
   set phase = coalesce(nullif($2::text, ''), phase),
       phase_started_at = case when nullif($2::text, '') is distinct from phase and $2::text <> ''
                               then clock_timestamp() else coalesce(phase_started_at, clock_timestamp()) end,
       rows_copied = $3, rows_total = $4, delta_backlog = $5, lock_attempts = $6,
       state = case when $8::boolean and pause_requested then 'paused'
                    when $7::boolean then 'waiting_switch' else 'running' end,
       throttle_reason = nullif($9::text, ''),
       capture_lag_bytes = $10,
       capture_lag = $11::bigint * interval '1 microsecond',
       rows_per_second = case
           when rate_at is null or $3 < rate_rows then rows_per_second
           when clock_timestamp() - rate_at < interval '900 ms' then rows_per_second
           else round((coalesce(0.3 * rows_per_second, 0) + (case when rows_per_second is null then 1 else 0.7 end)
                      * ($3 - rate_rows) / extract(epoch from clock_timestamp() - rate_at))::numeric, 1) end,
       rate_rows = case when rate_at is null or $3 < rate_rows or clock_timestamp() - rate_at >= interval '900 ms'
                        then $3 else rate_rows end,
       rate_at = case when rate_at is null or $3 < rate_rows or clock_timestamp() - rate_at >= interval '900 ms'
                      then clock_timestamp() else rate_at end,
       updated_at = now()
 where id = $1 and runner is not null and state in ('running', 'waiting_switch', 'paused')`

// Progress writes p to the job row at most once per interval, and at once when
// the phase changes, or the job starts/stops waiting for a switch, being
// paused or being throttled.
func (r *Reporter) Progress(ctx context.Context, p replicate.Progress) {
	r.mu.Lock()
	defer r.mu.Unlock()
	changed := p.Phase != "" && p.Phase != r.phase
	if p.Phase != "" {
		r.phase = p.Phase
	}
	if p.Phase == "" {
		p.Phase = r.phase
	}
	prev := r.last
	if r.pending != nil {
		prev = *r.pending
	}
	held := p.Paused != prev.Paused || p.Throttle != prev.Throttle || p.Waiting != prev.Waiting
	r.held = p.Paused
	if !changed && !held && time.Since(r.lastWrite) < r.interval {
		cp := p
		r.pending = &cp
		return
	}
	r.write(ctx, p)
}

// Held reports whether the engine said it holds at a safe point (paused).
func (r *Reporter) Held() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.held
}

// Last is the last progress the engine reported.
func (r *Reporter) Last() replicate.Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending != nil {
		return *r.pending
	}
	return r.last
}

func (r *Reporter) write(ctx context.Context, p replicate.Progress) {
	r.pending = nil
	r.last = p
	r.lastWrite = time.Now()
	if _, err := r.db.Exec(ctx, sqlProgress, r.id, p.Phase, p.RowsCopied, p.RowsTotal, p.DeltaBacklog, p.LockAttempts,
		p.Waiting, p.Paused, p.Throttle, p.LagBytes, r.captureLag(ctx, p.LagBytes)); err != nil {
		r.log.WithError(err).Warn("cannot record progress")
	}
}

// captureLag is the capture lag as time (see lagTracker): nil until the
// engine reports WAL not yet consumed (trigger capture never does), 0 when
// it has consumed everything. It costs one query (the WAL end) per progress
// write while logical capture is behind.
// The result is in microseconds.
func (r *Reporter) captureLag(ctx context.Context, behind int64) *int64 {
	if behind <= 0 {
		if !r.logical {
			return nil
		}
		r.lag.samples = r.lag.samples[:0]
		var zero int64
		return &zero
	}
	r.logical = true
	var end int64
	if err := r.db.QueryRow(ctx, `select (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint`).Scan(&end); err != nil {
		r.log.WithError(err).Debug("cannot read the WAL end for the capture lag")
		return nil
	}
	us := r.lag.observe(time.Now(), uint64(end), behind).Microseconds()
	return &us
}

// Flush writes a progress report held back by the throttle.
func (r *Reporter) Flush(ctx context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending != nil {
		r.write(ctx, *r.pending)
	}
}

// Event records one event in tat.events and logs it.
func (r *Reporter) Event(ctx context.Context, phase, message string) {
	r.log.WithField("phase", phase).Info(message)
	if err := AddEvent(ctx, r.db, r.id, phase, message); err != nil {
		r.log.WithError(err).Warn("cannot record event")
	}
}

// sqlKept writes the kept window (keep_old): state kept while it lasts,
// the kept table, its backlog, its end and why a revert is impossible.
const sqlKept = `update tat.migrations
   set state = case when $6::text = '' then 'kept' else state end,
       phase = case when $6::text = '' then 'kept' else phase end,
       kept_table = case when $6::text = '' then (select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
                                                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                                                  where c.oid = pg_catalog.to_regclass($2::text)) end,
       revert_backlog = case when $6::text = '' then $3::bigint end,
       keep_until = case when $6::text = '' then $4::timestamptz end,
       revert_blocked = nullif($5::text, ''),
       updated_at = now()
 where id = $1 and runner is not null and state in ('running', 'kept')`

var _ replicate.KeepReporter = (*Reporter)(nil)

// Kept records the kept window; its outcome (reverted) decides the job's
// final state (Reverted).
func (r *Reporter) Kept(ctx context.Context, s replicate.KeepStatus) {
	r.mu.Lock()
	r.outcome = s.Outcome
	r.mu.Unlock()
	if _, err := r.db.Exec(ctx, sqlKept, r.id, s.Old, s.Backlog, s.Until, s.Blocked, s.Outcome); err != nil {
		r.log.WithError(err).Warn("cannot record the kept window")
	}
}

// Reverted reports whether the run ended with a revert to the kept old table.
func (r *Reporter) Reverted() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.outcome == replicate.OutcomeReverted
}
