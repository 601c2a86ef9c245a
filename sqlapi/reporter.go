package sqlapi

import (
	"context"
	"fmt"
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

const sqlProgress = `update tat.migrations
   set phase = coalesce(nullif($2::text, ''), phase),
       rows_copied = $3, rows_total = $4, delta_backlog = $5, lock_attempts = $6,
       state = case when $7::boolean then 'waiting_switch' else 'running' end,
       updated_at = now()
 where id = $1 and state in ('running', 'waiting_switch')`

// Progress writes p to the job row at most once per interval, and at once when
// the phase changes or the job starts/stops waiting for a switch.
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
	waitChanged := r.pending != nil && r.pending.Waiting != p.Waiting
	if !changed && !waitChanged && time.Since(r.lastWrite) < r.interval {
		cp := p
		r.pending = &cp
		return
	}
	r.write(ctx, p)
}

func (r *Reporter) write(ctx context.Context, p replicate.Progress) {
	r.pending = nil
	r.lastWrite = time.Now()
	if _, err := r.db.Exec(ctx, sqlProgress, r.id, p.Phase, p.RowsCopied, p.RowsTotal, p.DeltaBacklog, p.LockAttempts, p.Waiting); err != nil {
		r.log.WithError(err).Warn("cannot record progress")
	}
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

// Control implements replicate.Control over tat.migrations.switch_requested.
type Control struct {
	db DB
	id int64
}

var _ replicate.Control = (*Control)(nil)

// NewControl controls job id.
func NewControl(db DB, id int64) *Control { return &Control{db: db, id: id} }

// SwitchRequested reports whether tat.switch(id) was called.
func (c *Control) SwitchRequested(ctx context.Context) (bool, error) {
	var v bool
	if err := c.db.QueryRow(ctx, `select switch_requested from tat.migrations where id = $1`, c.id).Scan(&v); err != nil {
		return false, fmt.Errorf("read switch_requested of migration %d: %w", c.id, err)
	}
	return v, nil
}
