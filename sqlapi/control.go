package sqlapi

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/replicate"
)

// ThrottleCheckInterval is how long the result of the throttle checks
// (replica lag, active sessions, throttle_query) is reused.
const ThrottleCheckInterval = time.Second

// Control implements replicate.Control and replicate.Steerer over the job
// row: switch_requested (tat.switch), pause_requested (tat.pause), the live
// options changed by tat.set (batch_size, lock_timeout, time_between_locks)
// and the throttling limits (max_replica_lag, max_active_sessions,
// throttle_query). It is safe for concurrent use.
type Control struct {
	db   DB
	id   int64
	base replicate.Options
	log  logrus.FieldLogger

	mu         sync.Mutex
	draining   bool
	changed    map[string]bool // a knob that differed once from base is always passed on
	lastCheck  time.Time
	lastReason string
	refusedBy  string // requester whose throttle_query was refused (recorded once as an event)
}

var (
	_ replicate.Control     = (*Control)(nil)
	_ replicate.Steerer     = (*Control)(nil)
	_ replicate.KeepControl = (*Control)(nil)
)

// NewControl controls job id. base is the options the run started with (a
// knob is handed to the engine only once tat.set changed it).
func NewControl(db DB, id int64) *Control {
	return &Control{db: db, id: id, base: replicate.DefaultOptions(), log: logrus.StandardLogger(), changed: map[string]bool{}}
}

// WithOptions sets the options the run started with and the logger.
func (c *Control) WithOptions(base replicate.Options, log logrus.FieldLogger) *Control {
	c.base = base
	if log != nil {
		c.log = log
	}
	return c
}

// Drain makes the engine hold at its next safe point (a graceful shutdown:
// the runner waits for the hold, then stops the run and hands the job back).
func (c *Control) Drain() {
	c.mu.Lock()
	c.draining = true
	c.mu.Unlock()
}

// KeepRequest reports whether tat.revert(id) or tat.finish(id) was called
// (keep_old, replicate.KeepControl).
func (c *Control) KeepRequest(ctx context.Context) (revert, finish bool, err error) {
	if err := c.db.QueryRow(ctx, `select revert_requested, finish_requested from tat.migrations where id = $1`, c.id).Scan(&revert, &finish); err != nil {
		return false, false, fmt.Errorf("read the keep_old requests of migration %d: %w", c.id, err)
	}
	return revert, finish, nil
}

// SwitchRequested reports whether tat.switch(id) was called.
func (c *Control) SwitchRequested(ctx context.Context) (bool, error) {
	var v bool
	if err := c.db.QueryRow(ctx, `select switch_requested from tat.migrations where id = $1`, c.id).Scan(&v); err != nil {
		return false, fmt.Errorf("read switch_requested of migration %d: %w", c.id, err)
	}
	return v, nil
}

const sqlSteer = `select pause_requested, coalesce(requested_by, ''),
	coalesce((options->>'batch_size')::int, 0),
	coalesce((extract(epoch from (options->>'lock_timeout')::interval) * 1000000)::bigint, 0),
	coalesce((extract(epoch from (options->>'time_between_locks')::interval) * 1000000)::bigint, -1),
	coalesce((extract(epoch from (options->>'max_replica_lag')::interval) * 1000000)::bigint, 0),
	coalesce((options->>'max_active_sessions')::int, 0),
	coalesce(options->>'throttle_query', '')
  from tat.migrations where id = $1`

// limits are the throttling options of a job.
type limits struct {
	requester      string
	maxReplicaLag  time.Duration
	maxActive      int
	throttleQuery  string
	hasAnyThrottle bool
}

// Steer reads the job row: pause, live options and throttling.
func (c *Control) Steer(ctx context.Context) (replicate.Steering, error) {
	var s replicate.Steering
	var batch int
	var lt, tbl, mrl int64
	var lim limits
	err := c.db.QueryRow(ctx, sqlSteer, c.id).Scan(&s.Paused, &lim.requester, &batch, &lt, &tbl, &mrl, &lim.maxActive, &lim.throttleQuery)
	if err != nil {
		return s, fmt.Errorf("read steering of migration %d: %w", c.id, err)
	}
	lim.maxReplicaLag = time.Duration(mrl) * time.Microsecond
	lim.hasAnyThrottle = lim.maxReplicaLag > 0 || lim.maxActive > 0 || lim.throttleQuery != ""

	c.mu.Lock()
	s.Paused = s.Paused || c.draining
	if c.knob("batch_size", batch > 0 && batch != c.base.BatchSize) {
		s.BatchSize = batch
	}
	if d := time.Duration(lt) * time.Microsecond; c.knob("lock_timeout", d > 0 && d != c.base.LockTimeout) {
		s.LockTimeout = d
	}
	if d := time.Duration(tbl) * time.Microsecond; c.knob("time_between_locks", d >= 0 && d != c.base.TimeBetweenLocks) {
		// Steering treats 0 as "unchanged": the shortest wait it can express is 1µs.
		s.BetweenLocks = max(d, time.Microsecond)
	}
	cached := time.Since(c.lastCheck) < ThrottleCheckInterval
	reason := c.lastReason
	c.mu.Unlock()

	if s.Paused || !lim.hasAnyThrottle {
		c.setReason("")
		return s, nil
	}
	if !cached {
		reason = c.throttleReason(ctx, lim)
		c.setReason(reason)
	}
	s.ThrottleReason = reason
	return s, nil
}

// knob reports whether a knob is to be handed to the engine: once it
// differed from the starting value, always (so setting it back works).
func (c *Control) knob(name string, differs bool) bool {
	if differs {
		c.changed[name] = true
	}
	return c.changed[name]
}

func (c *Control) setReason(r string) {
	c.mu.Lock()
	c.lastCheck, c.lastReason = time.Now(), r
	c.mu.Unlock()
}

const sqlReplicaLag = `select coalesce(max(extract(epoch from replay_lag)), 0)::float8 from pg_stat_replication`

// sqlActiveSessions counts the sessions of this database running a
// statement, except this one and tatd's own (same application_name).
const sqlActiveSessions = `select count(*)::int from pg_stat_activity
 where state = 'active' and backend_type = 'client backend' and pid <> pg_backend_pid()
   and datname = current_database()
   and application_name is distinct from current_setting('application_name')`

// throttleReason runs the checks; an empty result lets the engine go on.
func (c *Control) throttleReason(ctx context.Context, lim limits) string {
	if lim.maxReplicaLag > 0 {
		var lag float64
		if err := c.db.QueryRow(ctx, sqlReplicaLag).Scan(&lag); err != nil {
			c.log.WithError(err).Warn("throttle: read replica lag")
		} else if d := time.Duration(lag * float64(time.Second)); d > lim.maxReplicaLag {
			return fmt.Sprintf("replica lag %s > %s", shortDuration(d), shortDuration(lim.maxReplicaLag))
		}
	}
	if lim.maxActive > 0 {
		var n int
		if err := c.db.QueryRow(ctx, sqlActiveSessions).Scan(&n); err != nil {
			c.log.WithError(err).Warn("throttle: count active sessions")
		} else if n > lim.maxActive {
			return fmt.Sprintf("active sessions %d > %d", n, lim.maxActive)
		}
	}
	if lim.throttleQuery != "" {
		hold, err := c.runThrottleQuery(ctx, lim)
		var refused *throttleRefusedError
		if errors.As(err, &refused) {
			// The job holds (the limit its requester asked for is not
			// lifted silently) and says why, in throttle_reason and once in
			// the timeline: tat.set(id, 'throttle_query', null) frees it.
			c.recordRefusal(ctx, refused)
			return truncate(fmt.Sprintf("throttle_query refused: %s (tat.set(%d, 'throttle_query', null) removes it)", refused.Error(), c.id), 200)
		}
		if err != nil {
			if ctx.Err() != nil {
				return ""
			}
			return truncate("throttle_query failed: "+err.Error(), 200)
		}
		if hold {
			return "throttle_query returned true"
		}
	}
	return ""
}

type beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// throttleRefusedError: the job's requester is not a superuser, so its
// throttle_query is not run (see runThrottleQuery).
type throttleRefusedError struct{ requester string }

func (e *throttleRefusedError) Error() string {
	return fmt.Sprintf("requester %s is not a superuser", e.requester)
}

// recordRefusal logs a refused throttle_query and records it once (per
// requester) in the job's timeline.
func (c *Control) recordRefusal(ctx context.Context, e *throttleRefusedError) {
	c.mu.Lock()
	first := c.refusedBy != e.requester
	c.refusedBy = e.requester
	c.mu.Unlock()
	if !first {
		return
	}
	msg := fmt.Sprintf("throttle_query refused: %s, and the query would run inside tatd's own session, where SET ROLE can be undone; "+
		"the job holds until tat.set(%d, 'throttle_query', null) removes the query", e.Error(), c.id)
	c.log.WithField("job", c.id).Warn(msg)
	if err := AddEvent(ctx, c.db, c.id, "", msg); err != nil {
		c.log.WithError(err).Warn("throttle: record the refusal")
	}
}

const sqlRequesterIsSuperuser = `select coalesce((select rolsuper from pg_roles where rolname = $1), false)`

// runThrottleQuery runs the user's query with the rights of the job's
// requester (SET LOCAL ROLE), in a read-only transaction of its own with a
// short statement_timeout, and rolls it back. It never runs with tatd's
// own rights: when the role cannot be assumed, it fails. Only for a
// requester that is (still) a superuser: the query runs in tatd's session,
// where it could undo the SET ROLE (RESET ROLE, set_config('role', ...));
// tat.alter and tat.set refuse the option for other roles, and a requester
// who lost the attribute since gets a *throttleRefusedError.
func (c *Control) runThrottleQuery(ctx context.Context, lim limits) (bool, error) {
	b, ok := c.db.(beginner)
	if !ok {
		return false, errors.New("no transaction support")
	}
	if lim.requester == "" {
		return false, errors.New("the job has no requester")
	}
	var super bool
	if err := c.db.QueryRow(ctx, sqlRequesterIsSuperuser, lim.requester).Scan(&super); err != nil {
		return false, fmt.Errorf("check the requester %s: %w", lim.requester, err)
	}
	if !super {
		return false, &throttleRefusedError{requester: lim.requester}
	}
	tx, err := b.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, "set transaction read only"); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, "set local statement_timeout = '5s'"); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, "set local role "+pgx.Identifier{lim.requester}.Sanitize()); err != nil {
		return false, fmt.Errorf("cannot run as %s: %w", lim.requester, err)
	}
	var v *bool
	if err := tx.QueryRow(ctx, lim.throttleQuery).Scan(&v); err != nil {
		return false, err
	}
	return v != nil && *v, nil
}

// shortDuration prints 12s, 1.5s, 250ms, 3m0s.
func shortDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(100 * time.Millisecond).String()
	default:
		return d.Round(time.Millisecond).String()
	}
}

func truncate(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}
