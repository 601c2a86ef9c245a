package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// kill -9 in the later phases (index build, catch-up, waiting_switch): a new
// tatd takes the job over and it ends done, with the same content as a
// control table that got the same writes, and nothing left behind.

// leftovers lists what a run may leave behind: shadow relations, capture
// triggers and functions, publications and replication slots.
func leftovers(t *testing.T, c *pgx.Conn) []string {
	t.Helper()
	rows, _ := c.Query(context.Background(), `
		select 'relation ' || relname from pg_class where relname like '%\_\_tat\_%'
		union all select 'trigger ' || tgname from pg_trigger where tgname like 'replicate\_\_tat\_%'
		union all select 'function ' || proname from pg_proc where proname like '%\_\_tat\_%'
		union all select 'publication ' || pubname from pg_publication where pubname like '%\_\_tat\_%'
		union all select 'slot ' || slot_name from pg_replication_slots where database = current_database()`)
	left, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return left
}

// waitNoLeftovers waits a little: a slot of a killed run goes away when its
// walsender notices the dead connection.
func waitNoLeftovers(t *testing.T, c *pgx.Conn) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		left := leftovers(t, c)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// withControl adds table ctl, a copy of tbl that gets the same writes.
func withControl(t *testing.T, c *pgx.Conn, tbl string) {
	t.Helper()
	mustExec(t, c, "create table ctl (id int primary key, v int not null, s text)")
	mustExec(t, c, "insert into ctl select * from "+tbl)
}

// writeBoth applies one random write to tbl and to ctl in one statement.
func writeBoth(ctx context.Context, c *pgx.Conn, tbl string, r *rand.Rand, nextID *atomic.Int64) error {
	var sql string
	var args []any
	switch op := r.IntN(10); {
	case op < 6:
		id, v, s := r.Int64N(nextID.Load())+1, r.IntN(1000), fmt.Sprintf("u%d", r.Int64())
		sql, args = `with a as (update `+tbl+` set v = $2, s = $3 where id = $1) update ctl set v = $2, s = $3 where id = $1`, []any{id, v, s}
	case op < 8:
		id := nextID.Add(1)
		sql, args = `with a as (insert into `+tbl+` values ($1, $2, $3)) insert into ctl values ($1, $2, $3)`, []any{id, r.IntN(1000), "i"}
	default:
		id := r.Int64N(nextID.Load()) + 1
		sql, args = `with a as (delete from `+tbl+` where id = $1) delete from ctl where id = $1`, []any{id}
	}
	_, err := c.Exec(ctx, sql, args...)
	return err
}

// writer runs writeBoth in a loop on its own connection until stop is called;
// stop returns the number of writes once the last one has committed (writes
// are not interrupted: a cancelled statement could still commit after stop).
// A failed write fails the test.
func writer(t *testing.T, url, tbl string, n int) (stop func() int) {
	t.Helper()
	c, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	var stopping atomic.Bool
	var writes atomic.Int64
	var nextID atomic.Int64
	nextID.Store(int64(n))
	done := make(chan error, 1)
	go func() {
		r := rand.New(rand.NewPCG(1, 2))
		for !stopping.Load() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			err := writeBoth(ctx, c, tbl, r, &nextID)
			cancel()
			if err != nil {
				done <- err
				return
			}
			writes.Add(1)
			time.Sleep(time.Millisecond)
		}
		done <- nil
	}()
	var once sync.Once
	stop = func() int {
		once.Do(func() {
			stopping.Store(true)
			if err := <-done; err != nil {
				t.Errorf("writer: %v", err)
			}
			c.Close(context.Background())
		})
		return int(writes.Load())
	}
	t.Cleanup(func() { stop() })
	return stop
}

// someWrites applies n writes to tbl and ctl while no tatd runs: the capture
// must keep them for the next runner.
func someWrites(t *testing.T, c *pgx.Conn, tbl string, n int) {
	t.Helper()
	var max int64
	if err := c.QueryRow(context.Background(), "select max(id) from ctl").Scan(&max); err != nil {
		t.Fatal(err)
	}
	var nextID atomic.Int64
	nextID.Store(max)
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < n; i++ {
		if err := writeBoth(context.Background(), c, tbl, r, &nextID); err != nil {
			t.Fatal(err)
		}
	}
}

func countEvents(t *testing.T, c *pgx.Conn, id int64, like string) int {
	t.Helper()
	var n int
	if err := c.QueryRow(context.Background(), "select count(*) from tat.events where job = $1 and message like $2", id, like).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// assertDoneLikeControl checks the job's end: done after attempts runs, tbl
// equal to ctl, v migrated to bigint, wantIndexes valid indexes, nothing
// left behind.
func assertDoneLikeControl(t *testing.T, c *pgx.Conn, id int64, tbl string, wantIndexes, attempts int) {
	t.Helper()
	j := waitJob(t, c, id, 180*time.Second, "finished", finished)
	if j.state != "done" || j.attempts != attempts {
		var errText string
		_ = c.QueryRow(context.Background(), "select coalesce(error, '') from tat.migrations where id = $1", id).Scan(&errText)
		t.Fatalf("final %+v: %s", j, errText)
	}
	if got, want := digest(t, c, tbl), digest(t, c, "ctl"); got != want {
		rows, _ := c.Query(context.Background(), `select format('%s: %s | ctl: %s', coalesce(b.id, x.id), b, x)
			from `+tbl+` b full join ctl x on x.id = b.id
			where b is distinct from x limit 20`)
		diff, _ := pgx.CollectRows(rows, pgx.RowTo[string])
		var n int
		_ = c.QueryRow(context.Background(), `select count(*) from `+tbl+` b full join ctl x on x.id = b.id where b is distinct from x`).Scan(&n)
		t.Fatalf("%s differs from the control after the migration: %d rows, e.g. %v", tbl, n, diff)
	}
	var typ string
	if err := c.QueryRow(context.Background(), "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = $1::regclass and attname = 'v'", tbl).Scan(&typ); err != nil || typ != "bigint" {
		t.Fatalf("%s.v is %q (%v)", tbl, typ, err)
	}
	var n int
	if err := c.QueryRow(context.Background(), "select count(*) from pg_index where indrelid = $1::regclass and indisvalid", tbl).Scan(&n); err != nil || n != wantIndexes {
		t.Fatalf("%s has %d valid indexes, want %d (%v)", tbl, n, wantIndexes, err)
	}
	waitNoLeftovers(t, c)
}

// kill -9 while the shadow's indexes are built (several, one at a time, with
// a small maintenance_work_mem): the next tatd keeps the finished ones,
// builds the others and switches.
func TestKill9DuringIndex(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 200000)
	withControl(t, c, "big")
	for i, def := range []string{"(s)", "(v, s)", "(md5(s))", "(s text_pattern_ops)", "(lower(s), v)", "(md5(s || v))"} {
		mustExec(t, c, fmt.Sprintf("create index big_i%d on big %s", i, def))
	}
	first := startTatd(t, url)
	var id int64
	if err := c.QueryRow(context.Background(), `select tat.alter('alter table big alter column v type bigint',
		create_index_jobs => 1, maintenance_work_mem => '1MB')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	// kill once the first index is built, while the others are
	j := waitJob(t, c, id, 120*time.Second, "index phase", func(j job) bool {
		return j.phase == "index" && countEvents(t, c, id, "built index %") > 0 || finished(j) || j.phase == "analyze" || j.phase == "catchup"
	})
	first.signal(t, syscall.SIGKILL, 5*time.Second)
	built := countEvents(t, c, id, "built index %")
	t.Logf("killed at %+v, %d index(es) built", j, built)
	if j.phase != "index" || built >= 6 {
		t.Fatalf("never killed in the index phase: %+v", j)
	}
	someWrites(t, c, "big", 200)
	startTatd(t, url)
	assertDoneLikeControl(t, c, id, "big", 7, 2)
	if !hasEvent(t, c, id, "continuing the earlier run (% rows already copied)") {
		t.Error("the second attempt did not continue the first")
	}
}

// kill -9 during the catch-up, under a concurrent writer. A throttle_query
// holds the engine at the first catch-up round while table hold says so
// (three extra indexes make index + analyze outlast the engine's 500ms
// steering cache, so the query is asked again there): the kill hits the
// catch-up for sure, also with logical capture, whose catch-up is otherwise
// over in a few milliseconds. Trigger capture continues the earlier run;
// logical capture cannot (its temporary slot died with the connection) and
// starts over. Either way: done, equal to the control, nothing left behind.
func TestKill9DuringCatchup(t *testing.T) {
	t.Parallel()
	for _, capture := range []string{"trigger", "logical"} {
		t.Run(capture, func(t *testing.T) {
			if v := testpg.Version(t); capture == "logical" && v < 140000 {
				t.Skipf("logical capture needs PostgreSQL 14+ (server is %d)", v)
			}
			url, c := crashDB(t, []string{"big"}, 200000)
			withControl(t, c, "big")
			for i, def := range []string{"(s)", "(v, s)", "(md5(s))"} {
				mustExec(t, c, fmt.Sprintf("create index big_i%d on big %s", i, def))
			}
			mustExec(t, c, "create table hold (id int primary key, hold boolean not null); insert into hold values (1, true)")
			stop := writer(t, url, "big", 200000)
			first := startTatd(t, url)
			var id int64
			if err := c.QueryRow(context.Background(), `select tat.alter('alter table big alter column v type bigint',
				capture => $1, min_delta_rows => 0, throttle_query => $2)`, capture,
				`select (select hold from public.hold) and exists (select from tat.migrations
				  where table_name = 'public.big' and phase in ('index', 'analyze', 'catchup') and state = 'running')`).Scan(&id); err != nil {
				t.Fatal(err)
			}
			j := waitJob(t, c, id, 120*time.Second, "catchup phase", func(j job) bool { return j.phase == "catchup" || finished(j) })
			if !finished(j) {
				time.Sleep(300 * time.Millisecond) // a few catch-up rounds, or held
			}
			first.signal(t, syscall.SIGKILL, 5*time.Second)
			var reason string
			_ = c.QueryRow(context.Background(), "select coalesce(throttle_reason, '') from tat.migrations where id = $1", id).Scan(&reason)
			t.Logf("killed at %+v (throttle: %q)", j, reason)
			if j = jobOf(t, c, id); j.phase != "catchup" || j.state != "running" {
				if finished(j) && j.state == "done" {
					// The catch-up was over before the kill landed (the
					// throttle is polled through caches): the scenario was
					// not reached, which proves nothing either way.
					t.Skipf("the job finished before the kill reached its catch-up: %+v", j)
				}
				t.Fatalf("not killed in the catch-up: %+v", j)
			}
			startTatd(t, url)
			// the second attempt reaches the catch-up under the writer (held
			// again), then it may finish; then the writer stops
			deadline := time.Now().Add(120 * time.Second)
			for countEvents(t, c, id, "phase catchup") < 2 {
				if j := jobOf(t, c, id); finished(j) || time.Now().After(deadline) {
					t.Fatalf("the second attempt never reached the catch-up: %+v", j)
				}
				time.Sleep(50 * time.Millisecond)
			}
			time.Sleep(500 * time.Millisecond)
			mustExec(t, c, "update hold set hold = false")
			time.Sleep(500 * time.Millisecond)
			t.Logf("%d writes", stop())
			assertDoneLikeControl(t, c, id, "big", 4, 2)
			if capture == "trigger" && !hasEvent(t, c, id, "continuing the earlier run (% rows already copied)") {
				t.Error("the second attempt did not continue the first")
			}
			if capture == "logical" && !hasEvent(t, c, id, "%cannot be continued with logical capture%") {
				t.Error("the second attempt did not start over")
			}
		})
	}
}

// kill -9 while the job waits for tat.switch (switch => 'manual'): the next
// tatd takes it over, catches up what was written meanwhile, waits again;
// tat.switch then finishes it.
func TestKill9WhileWaitingSwitch(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 100000)
	withControl(t, c, "big")
	first := startTatd(t, url)
	var id int64
	if err := c.QueryRow(context.Background(), `select tat.alter('alter table big alter column v type bigint', switch => 'manual')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, c, id, 120*time.Second, "waiting_switch", func(j job) bool { return j.state == "waiting_switch" || finished(j) })
	if j.state != "waiting_switch" {
		t.Fatalf("never waited for the switch: %+v", j)
	}
	first.signal(t, syscall.SIGKILL, 5*time.Second)
	if j = jobOf(t, c, id); j.state != "waiting_switch" {
		t.Fatalf("after kill -9: %+v", j)
	}
	someWrites(t, c, "big", 300)
	startTatd(t, url)
	deadline := time.Now().Add(120 * time.Second)
	for countEvents(t, c, id, "waiting for a manual switch") < 2 {
		if j := jobOf(t, c, id); finished(j) || time.Now().After(deadline) {
			t.Fatalf("the second attempt never waited for the switch: %+v", j)
		}
		time.Sleep(50 * time.Millisecond)
	}
	j = jobOf(t, c, id)
	if j.state != "waiting_switch" || j.attempts != 2 || strings.HasSuffix(j.runner, fmt.Sprintf(":%d", first.cmd.Process.Pid)) {
		t.Fatalf("after the takeover: %+v", j)
	}
	var backlog int64
	waitBacklog := time.Now().Add(30 * time.Second)
	for {
		if err := c.QueryRow(context.Background(), "select coalesce(delta_backlog, -1) from tat.migrations where id = $1", id).Scan(&backlog); err != nil {
			t.Fatal(err)
		}
		if backlog == 0 || time.Now().After(waitBacklog) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if backlog != 0 {
		t.Errorf("the writes made while no tatd ran are not applied while waiting: backlog %d", backlog)
	}
	mustExec(t, c, "select tat.switch($1)", id)
	assertDoneLikeControl(t, c, id, "big", 1, 2)
}

// kill -9 during the capture phase (before the copy is planned): the capture
// trigger waits for a lock held by an open transaction, tatd dies there.
// The next tatd must not continue a run that never planned its copy (the
// engine's resume would copy nothing and swap in an empty table): the
// listener drops the leftovers and starts over.
func TestKill9DuringCapture(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 50000)
	withControl(t, c, "big")
	blocker, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close(context.Background())
	tx, err := blocker.Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	// ROW EXCLUSIVE: the capture trigger needs SHARE ROW EXCLUSIVE
	if _, err := tx.Exec(context.Background(), "lock table big in row exclusive mode"); err != nil {
		t.Fatal(err)
	}
	first := startTatd(t, url)
	var id int64
	if err := c.QueryRow(context.Background(), "select tat.alter('alter table big alter column v type bigint')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, c, id, 60*time.Second, "capture phase", func(j job) bool { return j.phase == "capture" || finished(j) })
	time.Sleep(time.Second) // a few lock attempts
	first.signal(t, syscall.SIGKILL, 5*time.Second)
	t.Logf("killed at %+v", j)
	if err := tx.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	someWrites(t, c, "big", 100)
	startTatd(t, url)
	assertDoneLikeControl(t, c, id, "big", 1, 2)
	if !hasEvent(t, c, id, "the earlier attempt stopped in phase capture, before the copy: dropping its leftovers and starting over") {
		t.Error("the second attempt did not start over")
	}
}

// kill -9 of tatd in the kept window (keep_old): writes go on on the new
// table while no tatd runs (the reverse capture is a trigger: its delta
// persists); a new tatd resumes the reverse sync, and tat.revert brings the
// old table back under its name with every write and its old type.
func TestKill9InKeptWindow(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 50000)
	withControl(t, c, "big")
	first := startTatd(t, url)
	stop := writer(t, url, "big", 50000)
	var id int64
	if err := c.QueryRow(context.Background(), `select tat.alter('alter table big alter column v type bigint', keep_old => interval '1 hour')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, c, id, 120*time.Second, "kept", func(j job) bool { return j.state == "kept" || finished(j) })
	if j.state != "kept" {
		t.Fatalf("the old table was not kept: %+v", j)
	}
	if n := stop(); n == 0 {
		t.Fatal("the writer wrote nothing")
	}
	first.signal(t, syscall.SIGKILL, 5*time.Second)
	someWrites(t, c, "big", 300) // no tatd: they wait in the reverse delta
	var pending int64
	if err := c.QueryRow(context.Background(), "select count(*) from big__tat_rdelta").Scan(&pending); err != nil || pending == 0 {
		t.Fatalf("no reverse delta while no tatd ran: %d (%v)", pending, err)
	}
	startTatd(t, url)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := c.QueryRow(context.Background(), "select count(*) from big__tat_rdelta").Scan(&pending); err != nil {
			t.Fatal(err)
		}
		if pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new tatd did not resume the reverse sync: %d changes pending; %+v", pending, jobOf(t, c, id))
		}
		time.Sleep(50 * time.Millisecond)
	}
	someWrites(t, c, "big", 100)
	mustExec(t, c, "select tat.revert($1)", id)
	j = waitJob(t, c, id, 120*time.Second, "reverted", func(j job) bool { return j.state == "reverted" || finished(j) })
	if j.state != "reverted" {
		t.Fatalf("revert after the takeover: %+v", j)
	}
	if digest(t, c, "big") != digest(t, c, "ctl") {
		t.Fatal("after the revert big differs from the control")
	}
	var typ string
	if err := c.QueryRow(context.Background(), "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'big'::regclass and attname = 'v'").Scan(&typ); err != nil || typ != "integer" {
		t.Fatalf("big.v is %q after the revert (%v)", typ, err)
	}
	waitNoLeftovers(t, c)
}
