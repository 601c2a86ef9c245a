package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/replicate"
)

// The cut-over must never make other sessions wait much longer than
// lock_timeout, even while a long transaction holds a lock on the table.
func TestCutoverBehindLongReader(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 3000)
	ctx := context.Background()
	reader, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := reader.Exec(ctx, "select count(*) from orders"); err != nil {
		t.Fatal(err)
	}
	// A prober measures how long a plain query waits, all along.
	var maxWait atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			start := time.Now()
			_, _ = e.pool.Exec(ctx, "select 1 from orders where id = 1")
			if d := time.Since(start).Milliseconds(); d > maxWait.Load() {
				maxWait.Store(d)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	go func() { time.Sleep(1500 * time.Millisecond); _ = reader.Commit(ctx) }()
	o := opts("alter table orders alter column id type bigint")
	o.LockTimeout = 100 * time.Millisecond
	o.TimeBetweenLocks = 100 * time.Millisecond
	var events []string
	var mu sync.Mutex
	rep := reporterFunc(func(phase, msg string) { mu.Lock(); events = append(events, msg); mu.Unlock() })
	err = replicate.Run(ctx, e.pool, o, rep, nil)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	waited := false
	for _, ev := range events {
		if strings.Contains(ev, "hold long locks") || strings.Contains(ev, "timed out") {
			waited = true
		}
	}
	if !waited {
		t.Fatalf("the cut-over never noticed the reader: %v", events)
	}
	// lock_timeout grows to at most 4x; allow scheduling noise on 2 cores.
	if w := maxWait.Load(); w > 4*100+400 {
		t.Fatalf("a query waited %d ms behind the cut-over", w)
	}
	t.Logf("longest wait of a concurrent query: %d ms", maxWait.Load())
	e.assertSame("orders", "control", "*")
}

type reporterFunc func(phase, msg string)

func (f reporterFunc) Event(_ context.Context, phase, msg string) { f(phase, msg) }
func (reporterFunc) Progress(context.Context, replicate.Progress) {}

// An interrupted copy continues from its checkpoint.
func TestCopyResumesAfterInterruption(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 20000)
	w := e.startWriter(2, "orders", "control", 22000)
	o := opts("alter table orders alter column id type bigint")
	o.BatchSize = 200
	o.CopyDataJobs = 1
	ctx, cancel := context.WithCancel(context.Background())
	var batches atomic.Int64
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 30 {
			cancel()
		}
	}
	err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil)
	if !errors.Is(err, context.Canceled) {
		w.Stop(t)
		t.Fatalf("want interruption, got %v", err)
	}
	copied := e.str("select sum(rows) from orders__tat_state")
	if copied == "0" || copied == "<nil>" {
		w.Stop(t)
		t.Fatal("no checkpoint recorded")
	}
	// A fresh run refuses to start over the leftovers...
	o.ShowQueries = nil
	if err := e.run(o); err == nil || !strings.Contains(err.Error(), "continue it or run cleanup") {
		w.Stop(t)
		t.Fatalf("want refusal, got %v", err)
	}
	// ...and a continued one resumes from the checkpoint.
	batches.Store(0)
	o.Continue = true
	var first string
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 1 {
			first = sql
		}
	}
	err = e.run(o)
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	if n := batches.Load(); n > 20000/200-25 {
		t.Fatalf("continued run copied %d batches: it started over", n)
	}
	_ = first
	e.assertSame("orders", "control", "id::int, v, n")
	e.assertNoLeftovers("orders")
}

// Quotes in key values, mixed-case and reserved-word names, a text key.
func TestAwkwardNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create schema "My Schema";
		create table "My Schema"."Order" ("Select" text primary key, "Value" int, "from" text);
		insert into "My Schema"."Order" select 'O''Brien "' || g || E'\\', g, 'x' from generate_series(1, 3000) g;
		create index "Idx ""quoted""" on "My Schema"."Order" ("from", "Value")`)
	before := e.str(`select md5(string_agg("Select" || "Value" || "from", ',' order by "Select")) from "My Schema"."Order"`)
	o := opts(`ALTER TABLE "My Schema"."Order" ALTER COLUMN "Value" TYPE bigint`)
	o.BatchSize = 100
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	after := e.str(`select md5(string_agg("Select" || "Value" || "from", ',' order by "Select")) from "My Schema"."Order"`)
	if before != after {
		t.Fatal("rows changed")
	}
	if got := e.str(`select count(*) from pg_class where relname = 'Idx "quoted"'`); got != "1" {
		t.Fatal("index name lost")
	}
}

// TRUNCATE during the run is replicated: old rows never come back.
func TestTruncateDuringRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 3000)
	o := opts("alter table orders alter column id type bigint")
	o.StopBeforeSwitch = true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	e.exec("truncate orders; insert into orders select g, 'after', g from generate_series(10, 20) g")
	o.StopBeforeSwitch, o.Continue = false, true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select count(*) || ' ' || min(v) from orders"); got != "11 after" {
		t.Fatalf("after truncate: %s", got)
	}
}

// Refusals happen before anything is created, with a clear message.
func TestRefusals(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table nokey (a int, b text); create table t (id int primary key, a int, b text);
		insert into t select g, g, 'x' from generate_series(1, 100) g;
		create role tat_stranger`)
	t.Cleanup(func() { e.pool.Exec(t.Context(), "drop role if exists tat_stranger") })
	cases := []struct {
		cmd, runAs, want string
	}{
		{cmd: "alter table missing alter column a type bigint", want: "does not exist"},
		{cmd: "alter table nokey alter column a type bigint", want: "no usable key"},
		{cmd: "alter table t alter column a type bigint", runAs: "tat_stranger", want: "must own table"},
		{cmd: "alter table t drop column id, alter column a type bigint", want: "drops key column"},
		{cmd: "alter table t alter column a type bigint using nosuchcol + 1", want: `column "nosuchcol" does not exist`},
		{cmd: "alter table t alter column b type int", want: "cannot be cast automatically"},
		{cmd: "create table x (a int)", want: "not an ALTER TABLE"},
		{cmd: "alter table t alter column a type bigint; drop table t", want: "exactly one"},
	}
	for _, tc := range cases {
		o := opts(tc.cmd)
		o.RunAs = tc.runAs
		err := e.run(o)
		if err == nil || !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: want %q, got %v", tc.cmd, tc.want, err)
		}
	}
	e.assertNoLeftovers("t")
	e.assertNoLeftovers("nokey")
}

// A run that fails mid-way leaves nothing behind: no trigger, no delta.
func TestFailureCleansUp(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 2000)
	e.exec("update orders set n = 1 where id < 10")
	err := e.run(opts("alter table orders alter column id type bigint, add constraint n_unique unique (n)"))
	if err == nil || !strings.Contains(err.Error(), "could not create unique index") {
		t.Fatalf("want a unique violation, got %v", err)
	}
	e.assertNoLeftovers("orders")
	e.exec("insert into orders values (999999, 'still writable', 1)")
	if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'id'"); got != "integer" {
		t.Fatalf("original changed: id is %s", got)
	}
}

// DDL on the original during the run: the application keeps writing, and
// the job fails cleanly instead of swapping in a table of a stale shape.
func TestConcurrentDDL(t *testing.T) {
	for _, ddl := range []string{
		"alter table orders add column extra int",
		"create index concurrently orders_n_idx on orders (n)",
		"alter table orders alter column v set not null",
	} {
		t.Run(ddl, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.seed("orders", "control", 2000)
			o := opts("alter table orders alter column id type bigint")
			o.StopBeforeSwitch = true
			if err := e.run(o); err != nil {
				t.Fatal(err)
			}
			e.exec(ddl)
			e.exec("insert into orders (id, v, n) values (100000, 'x', 1)")
			o.StopBeforeSwitch, o.Continue = false, true
			err := e.run(o)
			if !errors.Is(err, replicate.ErrConcurrentDDL) {
				t.Fatalf("want concurrent DDL error, got %v", err)
			}
			e.assertNoLeftovers("orders")
			if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'id'"); got != "integer" {
				t.Fatalf("switched anyway: id is %s", got)
			}
		})
	}
}

// The command, the copy and the index builds run as the table's owner,
// never with the sidecar's (superuser) privileges.
func TestRunsAsOwner(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	role := fmt.Sprintf("tat_owner_%d", time.Now().UnixNano())
	e.exec("create role " + role)
	t.Cleanup(func() { e.pool.Exec(t.Context(), "drop owned by "+role+" cascade; drop role "+role) })
	e.exec(fmt.Sprintf(`grant create on schema public to %[1]s;
		create table owned (id int primary key, who text);
		insert into owned select g, 'x' from generate_series(1, 500) g;
		alter table owned owner to %[1]s;
		create function whoami() returns text language sql as 'select current_user::text'`, role))
	if err := e.run(opts("alter table owned alter column who type text using whoami() || ''")); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select string_agg(distinct who, ',') from owned"); got != role {
		t.Fatalf("the copy ran as %s, not as the owner %s", got, role)
	}
	if got := e.str("select pg_get_userbyid(relowner) from pg_class where relname = 'owned'"); got != role {
		t.Fatalf("owner is %s", got)
	}
}
