package sqlapi

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DB is what sqlapi needs from a connection: *pgx.Conn, *pgxpool.Pool and
// pgx.Tx all satisfy it.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Job states (tat.migrations.state).
const (
	StateQueued        = "queued"
	StateRunning       = "running"
	StatePaused        = "paused"
	StateWaitingSwitch = "waiting_switch"
	StateDone          = "done"
	StateFailed        = "failed"
	StateCancelled     = "cancelled"
	// StateKept: switched, the old table kept in sync (keep_old) until
	// tat.finish / tat.revert or the end of the window; the runner keeps
	// the job. StateReverted: tat.revert switched back to the old table.
	StateKept     = "kept"
	StateReverted = "reverted"
)

// AdvisoryLockClass is the first key of the two-int advisory lock a runner
// holds on a job for the whole run: pg_advisory_lock(AdvisoryLockClass,
// int4(job id)). The constant ('tat' in ASCII) keeps clear of user locks.
const AdvisoryLockClass int32 = 0x746174

// LockKey is the second key of a job's advisory lock.
func LockKey(id int64) int32 { return int32(uint32(id)) }

// Job is one row of tat.migrations as the runner needs it.
type Job struct {
	ID              int64
	Command         string
	TableName       string
	TableOID        uint32
	Options         []byte // jsonb, every option resolved by the insert trigger
	RequestedBy     string
	State           string
	Phase           string
	SwitchRequested bool
	CancelRequested bool
	PauseRequested  bool
	Attempts        int
	Runner          string

	// Intervals of Options, converted by the server; negative when absent.
	LockTimeout      time.Duration
	TimeBetweenLocks time.Duration
	CatchupTimeout   time.Duration
	KeepOld          time.Duration // keep_old; 0 when absent
}

const jobColumns = `id, command, coalesce(table_name, ''), coalesce(table_oid, 0), options,
	coalesce(requested_by, ''), state, coalesce(phase, ''), switch_requested, cancel_requested,
	pause_requested, attempts, coalesce(runner, ''),
	coalesce((extract(epoch from (options->>'lock_timeout')::interval) * 1000000)::bigint, -1),
	coalesce((extract(epoch from (options->>'time_between_locks')::interval) * 1000000)::bigint, -1),
	coalesce((extract(epoch from (options->>'catchup_timeout')::interval) * 1000000)::bigint, -1),
	coalesce((extract(epoch from (options->>'keep_old')::interval) * 1000000)::bigint, 0)`

func scanJob(row pgx.Row) (Job, error) {
	var j Job
	var lt, tbl, cto, keep int64
	err := row.Scan(&j.ID, &j.Command, &j.TableName, &j.TableOID, &j.Options, &j.RequestedBy, &j.State,
		&j.Phase, &j.SwitchRequested, &j.CancelRequested, &j.PauseRequested, &j.Attempts, &j.Runner, &lt, &tbl, &cto, &keep)
	j.KeepOld = time.Duration(keep) * time.Microsecond
	j.CatchupTimeout = time.Duration(cto) * time.Microsecond
	j.LockTimeout = time.Duration(lt) * time.Microsecond
	j.TimeBetweenLocks = time.Duration(tbl) * time.Microsecond
	return j, err
}

const sqlLoad = `select ` + jobColumns + ` from tat.migrations where id = $1`

// Load reads job id. It returns pgx.ErrNoRows (wrapped) when there is none.
func Load(ctx context.Context, db DB, id int64) (Job, error) {
	j, err := scanJob(db.QueryRow(ctx, sqlLoad, id))
	if err != nil {
		return Job{}, fmt.Errorf("load migration %d: %w", id, err)
	}
	return j, nil
}

// TryLock takes the job's session advisory lock on conn without waiting. conn
// must stay open (and be used for nothing else that could release it) for as
// long as the job runs.
func TryLock(ctx context.Context, conn DB, id int64) (bool, error) {
	var ok bool
	if err := conn.QueryRow(ctx, `select pg_try_advisory_lock($1::int4, $2::int4)`, AdvisoryLockClass, LockKey(id)).Scan(&ok); err != nil {
		return false, fmt.Errorf("advisory lock for migration %d: %w", id, err)
	}
	return ok, nil
}

// sqlClaim counts the attempt and records who started it in one statement:
// a runner that dies right after its claim still leaves its "started by"
// event (one per attempt, always).
const sqlClaim = `with c as (
  update tat.migrations
     set state = case when state = 'queued' then 'running' else state end,
         runner = $2, started_at = coalesce(started_at, now()), updated_at = now(),
         attempts = attempts + 1
   where id = $1 and state in ('queued', 'running', 'waiting_switch', 'kept')
  returning *),
e as (
  insert into tat.events (job, phase, message)
  select c.id, nullif(c.phase, ''), format('started by %s (attempt %s)', $2::text, c.attempts)
    from c where not c.cancel_requested and not c.pause_requested)
select ` + jobColumns + ` from c`

// Claim marks job id as run by runner, if it is still queued (or running /
// waiting_switch with a dead runner: the caller holds the job's advisory
// lock, so nobody else runs it). ok is false when the job is no longer to be
// run (done, cancelled, paused, failed, or gone).
func Claim(ctx context.Context, db DB, id int64, runner string) (job Job, ok bool, err error) {
	j, err := scanJob(db.QueryRow(ctx, sqlClaim, id, runner))
	if errors.Is(err, pgx.ErrNoRows) {
		return Job{}, false, nil
	}
	if err != nil {
		return Job{}, false, fmt.Errorf("claim migration %d: %w", id, err)
	}
	return j, true, nil
}

const sqlPending = `select id from tat.migrations
 where state in ('queued', 'running', 'waiting_switch', 'kept') order by id limit $1`

// Pending lists jobs a runner may claim: queued ones, and running ones whose
// runner may have died (claiming checks the advisory lock).
func Pending(ctx context.Context, db DB, limit int) ([]int64, error) {
	rows, err := db.Query(ctx, sqlPending, limit)
	if err != nil {
		return nil, fmt.Errorf("list pending migrations: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("list pending migrations: %w", err)
	}
	return ids, nil
}

// Flags are the control requests on a running job.
type Flags struct {
	Cancel, Pause, Switch bool
}

// ControlFlags reads the control flags of the given jobs.
func ControlFlags(ctx context.Context, db DB, ids []int64) (map[int64]Flags, error) {
	rows, err := db.Query(ctx, `select id, cancel_requested, pause_requested, switch_requested
		from tat.migrations where id = any($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("read control flags: %w", err)
	}
	defer rows.Close()
	out := make(map[int64]Flags, len(ids))
	for rows.Next() {
		var id int64
		var f Flags
		if err := rows.Scan(&id, &f.Cancel, &f.Pause, &f.Switch); err != nil {
			return nil, fmt.Errorf("read control flags: %w", err)
		}
		out[id] = f
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read control flags: %w", err)
	}
	return out, nil
}

// finish moves a job this runner holds to state and records message as an
// event, in one statement. A job handed back (queued) while tat.pause was
// pending is parked as paused instead; a parked job (queued or paused) has no
// runner.
const sqlFinish = `with t as (
  select case when $3::text = 'queued' and state = 'kept' then 'kept'  -- a kept job stays kept for the next runner
              when $3::text = 'queued' and pause_requested then 'paused' else $3::text end as state
    from tat.migrations where id = $1),
m as (
  update tat.migrations
     set state = t.state,
         phase = coalesce(nullif($4::text, ''), phase),
         error = nullif($5::text, ''),
         error_phase = case when $5 = '' then null else nullif($4, '') end,
         finished_at = case when t.state in ('done', 'failed', 'cancelled', 'reverted') then now() end,
         runner = case when t.state in ('queued', 'paused', 'kept') then null else runner end,
         cancel_requested = case when t.state = 'cancelled' then true else cancel_requested end,
         pause_requested = case when t.state = 'paused' then false else pause_requested end,
         throttle_reason = null,
         rows_per_second = case when t.state in ('done', 'failed', 'cancelled') then null else rows_per_second end,
         rate_at = null,
         -- the switch replaced the table by its shadow (a new OID): follow
         -- it, so that the table's owner keeps seeing the job (tat._may_control)
         table_oid = case when t.state in ('done', 'reverted') then coalesce(to_regclass(table_name)::oid, table_oid) else table_oid end,
         updated_at = now()
    from t
   where id = $1 and runner = $2 and tat.migrations.state in ('running', 'waiting_switch', 'paused', 'kept')
  returning id, phase, t.state)
insert into tat.events (job, phase, message)
select id, phase, case when state = 'paused' and $3 = 'queued' then 'paused (the runner stopped while a pause was requested)' else $6::text end from m`

func finish(ctx context.Context, db DB, id int64, runner, state, phase, errText, message string) error {
	tag, err := db.Exec(ctx, sqlFinish, id, runner, state, phase, errText, message)
	if err != nil {
		return fmt.Errorf("mark migration %d %s: %w", id, state, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("mark migration %d %s: %w", id, state, ErrNotHeld)
	}
	return nil
}

// ErrNotHeld is returned when a runner changes the state of a job it no
// longer holds (another runner took it over, or it was cancelled in SQL).
var ErrNotHeld = errors.New("job is not running on this runner")

// MarkDone ends a job successfully.
func MarkDone(ctx context.Context, db DB, id int64, runner string) error {
	return finish(ctx, db, id, runner, StateDone, "", "", "done")
}

// MarkReverted ends a job whose kept old table tat.revert switched back to.
func MarkReverted(ctx context.Context, db DB, id int64, runner string) error {
	return finish(ctx, db, id, runner, StateReverted, "", "", "reverted")
}

// MarkFailed ends a job with an error that happened in phase.
func MarkFailed(ctx context.Context, db DB, id int64, runner, phase string, cause error) error {
	msg := "unknown error"
	if cause != nil {
		msg = cause.Error()
	}
	if phase == "" {
		phase = "prepare"
	}
	return finish(ctx, db, id, runner, StateFailed, phase, msg, "failed: "+msg)
}

// MarkCancelled ends a job cancelled by tat.cancel.
func MarkCancelled(ctx context.Context, db DB, id int64, runner string) error {
	return finish(ctx, db, id, runner, StateCancelled, "", "", "cancelled")
}

// MarkPaused parks a job paused by tat.pause; tat.resume queues it again.
func MarkPaused(ctx context.Context, db DB, id int64, runner string) error {
	return finish(ctx, db, id, runner, StatePaused, "", "", "paused")
}

// Requeue hands a job interrupted by a runner's shutdown back to the queue,
// so the next runner resumes it.
func Requeue(ctx context.Context, db DB, id int64, runner string) error {
	return finish(ctx, db, id, runner, StateQueued, "", "", "interrupted by shutdown of "+runner+"; queued again")
}

// AddEvent records one event of job id.
func AddEvent(ctx context.Context, db DB, id int64, phase, message string) error {
	if _, err := db.Exec(ctx, `insert into tat.events (job, phase, message) values ($1, nullif($2, ''), $3)`, id, phase, message); err != nil {
		return fmt.Errorf("record event of migration %d: %w", id, err)
	}
	return nil
}
