package sqlapi

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

func TestControlFunctions(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	ctx := context.Background()
	mustExec(t, c, "create table a (id int primary key); create table b (id int primary key)")
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table a add x int', switch => 'manual')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	state := func() string {
		var s string
		if err := c.QueryRow(ctx, "select state from tat.migrations where id = $1", id).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	mustExec(t, c, "select tat.switch($1)", id)
	var sw bool
	if sw, _ = NewControl(c, id).SwitchRequested(ctx); !sw {
		t.Fatal("switch_requested not set")
	}
	mustExec(t, c, "select tat.pause($1)", id)
	if s := state(); s != StatePaused {
		t.Fatalf("after pause: %s", s)
	}
	_, err := c.Exec(ctx, "select tat.alter('alter table a add y int')")
	wantPgError(t, err, "55006", "active migration")
	mustExec(t, c, "select tat.resume($1)", id)
	if s := state(); s != StateQueued {
		t.Fatalf("after resume: %s", s)
	}
	_, err = c.Exec(ctx, "select tat.wait($1, '300ms')", id)
	wantPgError(t, err, "57014", "timeout")
	mustExec(t, c, "select tat.cancel($1)", id)
	if s := state(); s != StateCancelled {
		t.Fatalf("after cancel: %s", s)
	}
	_, err = c.Exec(ctx, "select tat.cancel($1)", id)
	wantPgError(t, err, "55000", "already cancelled")
	_, err = c.Exec(ctx, "select tat.wait($1)", id)
	wantPgError(t, err, "P0001", "cancelled")
	_, err = c.Exec(ctx, "select tat.pause(424242)")
	wantPgError(t, err, "P0002", "does not exist")
	var n int
	if err := c.QueryRow(ctx, "select count(*) from tat.events where job = $1 and message like '%requested by%'", id).Scan(&n); err != nil || n != 4 {
		t.Fatalf("control events = %d (err %v)", n, err)
	}
	// a cancelled job frees the table
	if err := c.QueryRow(ctx, "select tat.alter('alter table a add y int')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	// cleanup: refused while a job is active, queued otherwise
	_, err = c.Exec(ctx, "select tat.cleanup('a')")
	wantPgError(t, err, "55006", "active migration")
	var req int64
	if err := c.QueryRow(ctx, "select tat.cleanup('b')").Scan(&req); err != nil {
		t.Fatal(err)
	}
	ids, err := PendingCleanups(ctx, c)
	if err != nil || len(ids) != 1 || ids[0] != req {
		t.Fatalf("pending cleanups %v, %v", ids, err)
	}
}

func TestClaimReportFinish(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	pool := testpg.Pool(t, url)
	mustExec(t, c, "create table a (id int primary key)")
	capture := "logical"
	if testpg.Version(t) < 140000 {
		capture = "trigger" // logical capture is refused before PostgreSQL 14
	}
	var id int64
	if err := c.QueryRow(ctx, `select tat.alter('alter table a alter column id type bigint', capture => '`+capture+`',
		copy_data_jobs => 3, batch_size => 500, lock_timeout => '1.5s', time_between_locks => '0', switch => 'manual',
		work_mem => '64MB', max_parallel_maintenance_workers => 2, skip_fk_validation => true,
		verify => true, copy_data_filter => 'id > 0', command_before_switch => 'select 1', command_after_switch => 'select 2',
		vacuum_freeze => true, catchup_timeout => '90s')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	ok, err := TryLock(ctx, c, id)
	if err != nil || !ok {
		t.Fatalf("lock: %v %v", ok, err)
	}
	other := connect(t, url)
	if ok, err := TryLock(ctx, other, id); err != nil || ok {
		t.Fatalf("second lock taken: %v %v", ok, err)
	}
	job, ok, err := Claim(ctx, c, id, "r1")
	if err != nil || !ok {
		t.Fatalf("claim: %v %v", ok, err)
	}
	opts, err := Options(job)
	if err != nil {
		t.Fatal(err)
	}
	want := replicate.DefaultOptions()
	want.Command = "alter table a alter column id type bigint"
	want.RunAs = "postgres"
	want.Capture = capture
	want.CopyDataJobs = 3
	want.BatchSize = 500
	want.LockTimeout = 1500 * time.Millisecond
	want.ManualSwitch = true
	want.WorkMem = "64MB"
	want.MaxParallelMaintenanceWorkers = 2
	want.SkipFKValidation = true
	opts.ShowQueries, want.ShowQueries = nil, nil
	if opts.CatchupTimeout != 90*time.Second {
		t.Fatalf("catchup_timeout = %v", opts.CatchupTimeout)
	}
	if !opts.Verify || !opts.VacuumFreeze || opts.CopyDataFilter != "id > 0" || opts.CommandBeforeSwitch != "select 1" || opts.CommandAfterSwitch != "select 2" {
		t.Fatalf("extra options not mapped: %+v", opts)
	}
	if opts.TimeBetweenLocks != 0 {
		t.Fatalf("time_between_locks = %v, want 0", opts.TimeBetweenLocks)
	}
	if opts.Command != want.Command || opts.RunAs != want.RunAs || opts.Capture != want.Capture ||
		opts.CopyDataJobs != 3 || opts.CreateIndexJobs != 2 || opts.BatchSize != 500 ||
		opts.LockTimeout != want.LockTimeout || !opts.ManualSwitch || opts.WorkMem != "64MB" ||
		opts.MaintenanceWorkMem != "" || opts.MaxParallelMaintenanceWorkers != 2 || !opts.SkipFKValidation ||
		opts.MinDeltaRows != 1000 || opts.Continue {
		t.Fatalf("options = %+v", opts)
	}

	rep := NewReporter(pool, id, nil)
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, RowsCopied: 10, RowsTotal: 100})
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, RowsCopied: 50, RowsTotal: 100}) // throttled
	var copied int64
	var phase string
	if err := c.QueryRow(ctx, "select rows_copied, phase from tat.status where id = $1", id).Scan(&copied, &phase); err != nil {
		t.Fatal(err)
	}
	if copied != 10 || phase != "copy" {
		t.Fatalf("after first progress: %d %s", copied, phase)
	}
	rep.Flush(ctx)
	var progress float64
	if err := c.QueryRow(ctx, "select rows_copied, progress::float8 from tat.status where id = $1", id).Scan(&copied, &progress); err != nil {
		t.Fatal(err)
	}
	if copied != 50 || progress != 50 {
		t.Fatalf("after flush: %d %v", copied, progress)
	}
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseSwitch, Waiting: true, LockAttempts: 2})
	var st string
	var la int
	if err := c.QueryRow(ctx, "select state, lock_attempts from tat.status where id = $1", id).Scan(&st, &la); err != nil {
		t.Fatal(err)
	}
	if st != StateWaitingSwitch || la != 2 {
		t.Fatalf("waiting: %s %d", st, la)
	}
	rep.Event(ctx, replicate.PhaseSwitch, "lock timeout, retrying")

	// only the runner that holds the job may finish it
	if err := MarkDone(ctx, pool, id, "r2"); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("foreign runner finished the job: %v", err)
	}
	if err := MarkFailed(ctx, pool, id, "r1", rep.Phase(), errors.New("engine not implemented")); err != nil {
		t.Fatal(err)
	}
	var errText, errPhase string
	if err := c.QueryRow(ctx, "select error, phase from tat.errors where id = $1", id).Scan(&errText, &errPhase); err != nil {
		t.Fatal(err)
	}
	if errText != "engine not implemented" || errPhase != "switch" {
		t.Fatalf("errors: %q %q", errText, errPhase)
	}
	_, err = c.Exec(ctx, "select tat.wait($1)", id)
	wantPgError(t, err, "P0001", "engine not implemented")

	// resume re-queues a failed job; the next claim continues it
	mustExec(t, c, "select tat.resume($1)", id)
	job, ok, err = Claim(ctx, c, id, "r1")
	if err != nil || !ok || job.Attempts != 2 {
		t.Fatalf("reclaim: %v %v %+v", ok, err, job)
	}
	if opts, _ := Options(job); !opts.Continue {
		t.Fatal("second attempt does not continue")
	}
	if err := MarkDone(ctx, pool, id, "r1"); err != nil {
		t.Fatal(err)
	}
	var res string
	if err := c.QueryRow(ctx, "select tat.wait($1)", id).Scan(&res); err != nil || res != "done" {
		t.Fatalf("wait: %q %v", res, err)
	}
}
