package sqlapi

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// tat.set validates option names and values (22023), refuses finished jobs
// (55000), records an event and a request row, and Steer hands the new
// values to the engine.
func TestSetOption(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	mustExec(t, c, "create table a (id int primary key)")
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table a alter column id type bigint', batch_size => 500)").Scan(&id); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ option, value, code, msg string }{
		{"bogus", "1", "22023", "cannot change option 'bogus'"},
		{"capture", "logical", "22023", "cannot change option"},
		{"batch_size", "0", "22023", "batch_size must be at least 1"},
		{"batch_size", "many", "22023", "invalid option value"},
		{"lock_timeout", "-1s", "22023", "lock_timeout must be positive"},
		{"max_active_sessions", "0", "22023", "max_active_sessions must be at least 1"},
		{"max_replica_lag", "0", "22023", "max_replica_lag must be positive"},
		{"throttle_query", "select 1; select 2", "22023", "throttle_query"},
		{"throttle_query", "delete from a", "22023", "throttle_query must be one query"},
	} {
		_, err := c.Exec(ctx, "select tat.set($1, $2, $3)", id, tc.option, tc.value)
		wantPgError(t, err, tc.code, tc.msg)
	}
	mustExec(t, c, "select tat.set($1, 'batch_size', '2000')", id)
	mustExec(t, c, "select tat.set($1, 'lock_timeout', '1s')", id)
	mustExec(t, c, "select tat.set($1, 'max_replica_lag', '5s')", id)
	mustExec(t, c, "select tat.set($1, 'max_replica_lag', null)", id)
	var batch int
	var lag *string
	if err := c.QueryRow(ctx, "select (options->>'batch_size')::int, options->>'max_replica_lag' from tat.status where id = $1", id).Scan(&batch, &lag); err != nil {
		t.Fatal(err)
	}
	if batch != 2000 || lag != nil {
		t.Fatalf("options after set: batch %d, max_replica_lag %v", batch, lag)
	}
	var n int
	if err := c.QueryRow(ctx, `select count(*) from tat.events where job = $1 and message like 'batch_size set to 2000 by %'`, id).Scan(&n); err != nil || n != 1 {
		t.Fatalf("set event: %d %v", n, err)
	}
	if err := c.QueryRow(ctx, `select count(*) from tat.requests where job = $1 and action = 'set'`, id).Scan(&n); err != nil || n != 4 {
		t.Fatalf("set requests: %d %v", n, err)
	}

	// Steer passes only what changed from the options the run started with
	pool := testpg.Pool(t, url)
	base := replicate.DefaultOptions()
	base.BatchSize = 500
	ctl := NewControl(pool, id).WithOptions(base, nil)
	s, err := ctl.Steer(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.BatchSize != 2000 || s.LockTimeout != time.Second || s.BetweenLocks != 0 || s.Paused || s.ThrottleReason != "" {
		t.Fatalf("steering %+v", s)
	}
	mustExec(t, c, "select tat.set($1, 'batch_size', '500')", id) // back to the start value: still passed on
	if s, _ = ctl.Steer(ctx); s.BatchSize != 500 {
		t.Fatalf("batch size set back: %+v", s)
	}
	mustExec(t, c, "update tat.migrations set state = 'done' where id = $1", id)
	_, err = c.Exec(ctx, "select tat.set($1, 'batch_size', '10')", id)
	wantPgError(t, err, "55000", "can no longer change")
}

// Throttling: active sessions over the limit and a throttle query that is
// true for the requester (it runs as the requester, not as tatd). Only a
// superuser may give a throttle query (security_test.go), so the requester
// is one.
func TestSteerThrottle(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	mustExec(t, c, "create role app_throttle login superuser")
	t.Cleanup(func() {
		testpg.Exec(t, url, "drop owned by app_throttle")
		testpg.Exec(t, testpg.Shared().URL, "drop role if exists app_throttle")
	})
	mustExec(t, c, "create table a (id int primary key); alter table a owner to app_throttle; grant usage on schema tat to app_throttle")
	var id int64
	mustExec(t, c, "set role app_throttle")
	if err := c.QueryRow(ctx, `select tat.alter('alter table a alter column id type bigint',
		throttle_query => 'select current_user = ''app_throttle''')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	mustExec(t, c, "reset role")
	pcfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	pcfg.ConnConfig.RuntimeParams["application_name"] = "tatd" // as the listener's pool: left out of the count
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ctl := NewControl(pool, id)
	s, err := ctl.Steer(ctx)
	if err != nil || s.ThrottleReason != "throttle_query returned true" {
		t.Fatalf("steering %+v %v", s, err)
	}
	mustExec(t, c, "select tat.set($1, 'throttle_query', null)", id)
	mustExec(t, c, "select tat.set($1, 'max_active_sessions', '1')", id)
	// two other sessions busy in this database
	var busyWG sync.WaitGroup
	for i := 0; i < 2; i++ {
		busy := connect(t, url)
		busyWG.Add(1)
		go func() { defer busyWG.Done(); _, _ = busy.Exec(context.Background(), "select pg_sleep(2)") }()
	}
	defer busyWG.Wait() // before the connections are closed
	time.Sleep(300 * time.Millisecond)
	ctl = NewControl(pool, id)
	if s, err = ctl.Steer(ctx); err != nil || s.ThrottleReason != "active sessions 2 > 1" {
		t.Fatalf("steering %+v %v", s, err)
	}
	mustExec(t, c, "select tat.set($1, 'max_active_sessions', null)", id)
	mustExec(t, c, "select tat.set($1, 'throttle_query', 'select 42')", id)
	ctl = NewControl(pool, id)
	if s, err = ctl.Steer(ctx); err != nil || s.ThrottleReason == "" {
		t.Fatalf("a broken throttle query must hold the job: %+v %v", s, err)
	}
	t.Logf("broken query: %s", s.ThrottleReason)

	// the reporter shows the reason and the paused state
	mustExec(t, c, "update tat.migrations set state = 'running', runner = 'r', pause_requested = true where id = $1", id)
	rep := NewReporter(pool, id, nil)
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, Throttle: "replica lag 12s > 5s", LagBytes: 4096})
	var st, reason string
	var lagBytes int64
	if err := c.QueryRow(ctx, "select state, throttle_reason, capture_lag_bytes from tat.status where id = $1", id).Scan(&st, &reason, &lagBytes); err != nil {
		t.Fatal(err)
	}
	if st != "running" || reason != "replica lag 12s > 5s" || lagBytes != 4096 {
		t.Fatalf("status %s %q %d", st, reason, lagBytes)
	}
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, Paused: true})
	if err := c.QueryRow(ctx, "select state from tat.status where id = $1", id).Scan(&st); err != nil || st != "paused" {
		t.Fatalf("paused: %s %v", st, err)
	}
	if !rep.Held() {
		t.Fatal("reporter does not know it is held")
	}
}

// tat.wait in the transaction that queued the job fails at once.
func TestWaitInSameTransaction(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	ctx := context.Background()
	mustExec(t, c, "create table a (id int primary key)")
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var id int64
	if err := tx.QueryRow(ctx, "select tat.alter('alter table a add x int')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = tx.Exec(ctx, "select tat.wait($1, '10s')", id)
	wantPgError(t, err, "25001", "queued by this transaction")
	if time.Since(start) > 2*time.Second {
		t.Fatalf("took %v", time.Since(start))
	}
	_ = tx.Rollback(ctx)
	// committed: waiting is allowed (and times out: no sidecar here)
	if err := c.QueryRow(ctx, "select tat.alter('alter table a add x int')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	_, err = c.Exec(ctx, "select tat.wait($1, '200ms')", id)
	wantPgError(t, err, "57014", "timeout")
}

// capture => 'logical' is refused at call time when the server cannot give it.
func TestLogicalCaptureRefusals(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two extra clusters")
	}
	ctx := context.Background()
	if v := testpg.Version(t); v < 140000 {
		url := testpg.NewDB(t)
		testpg.Install(t, url)
		c := connect(t, url)
		mustExec(t, c, "create table a (id int primary key)")
		_, err := c.Exec(ctx, "select tat.alter('alter table a add x int', capture => 'logical')")
		wantPgError(t, err, "55000", "needs PostgreSQL 14 or later")
		mustExec(t, c, "select tat.alter('alter table a add x int')") // trigger capture is fine
		return
	}
	for _, tc := range []struct {
		name     string
		settings map[string]string
		prep     string
		msg      string
	}{
		{"wal_level", map[string]string{"wal_level": "replica"}, "", "needs wal_level = logical (it is replica)"},
		{"slots", map[string]string{"max_replication_slots": "0"}, "", "needs a free replication slot"},
		{"replication", nil, "create role tat_owner nologin; alter schema tat owner to tat_owner", "needs the REPLICATION attribute for role tat_owner"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			server := testpg.Shared().URL
			if tc.settings != nil {
				cl, err := testpg.Start(tc.settings)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(cl.Stop)
				server = cl.URL
			}
			url := testpg.NewDBOn(t, server)
			testpg.Install(t, url)
			c := connect(t, url)
			mustExec(t, c, "create table a (id int primary key)")
			if tc.prep != "" {
				mustExec(t, c, tc.prep)
				t.Cleanup(func() {
					testpg.Exec(t, url, "alter schema tat owner to postgres")
					testpg.Exec(t, server, "drop role if exists tat_owner")
				})
			}
			_, err := c.Exec(ctx, "select tat.alter('alter table a add x int', capture => 'logical')")
			wantPgError(t, err, "55000", tc.msg)
			mustExec(t, c, "select tat.alter('alter table a add x int')") // trigger capture is fine
		})
	}
}
