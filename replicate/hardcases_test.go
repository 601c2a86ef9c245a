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

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// reporterFunc is a Reporter passing events to a function.
type reporterFunc func(phase, msg string)

func (f reporterFunc) Event(_ context.Context, phase, msg string) { f(phase, msg) }
func (reporterFunc) Progress(context.Context, replicate.Progress) {}

// onceAt is a TestHook running fn the first time the run reaches point
// (on the engine's goroutine, where t.Fatal must not be called); check
// fails the test when it never ran or failed.
type onceAt struct {
	point string
	fn    func(ctx context.Context) error
	once  sync.Once
	ran   atomic.Bool
	err   error
}

func (h *onceAt) hook(ctx context.Context, point string, _ pgx.Tx) error {
	if point == h.point {
		h.once.Do(func() { h.err = h.fn(ctx); h.ran.Store(true) })
	}
	return nil
}

func (h *onceAt) check(t *testing.T) {
	t.Helper()
	if !h.ran.Load() {
		t.Fatalf("the run never reached hook point %s: the test did not test what it should", h.point)
	}
	if h.err != nil {
		t.Fatalf("at %s: %v", h.point, h.err)
	}
}

// eventLog collects a run's events (the engine reports from several
// goroutines).
type eventLog struct {
	mu  sync.Mutex
	all []string
}

func (l *eventLog) Event(_ context.Context, _, msg string) {
	l.mu.Lock()
	l.all = append(l.all, msg)
	l.mu.Unlock()
}

func (*eventLog) Progress(context.Context, replicate.Progress) {}

// String is every event so far, one per line.
func (l *eventLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.all, "\n")
}

func (l *eventLog) reset() {
	l.mu.Lock()
	l.all = nil
	l.mu.Unlock()
}

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
	if n := batches.Load(); n > 20000/200-10 { // a fresh run takes over 100
		t.Fatalf("continued run copied %d batches: it started over", n)
	}
	_ = first
	e.assertSame("orders", "control", "id::int, v, n")
	e.assertNoLeftovers("orders")
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

// FORCE ROW LEVEL SECURITY subjects the owner, who copies the rows, to the
// policies: the job is refused up front rather than copying only the rows
// they show. Without FORCE the owner sees every row and the job runs.
func TestForcedRowSecurity(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	role := fmt.Sprintf("tat_rls_%d", time.Now().UnixNano())
	e.exec("create role " + role)
	t.Cleanup(func() { e.pool.Exec(t.Context(), "drop owned by "+role+" cascade; drop role "+role) })
	e.exec(fmt.Sprintf(`grant create on schema public to %[1]s;
		create table sec (id int primary key, n int);
		insert into sec select g, g from generate_series(1, 500) g;
		alter table sec owner to %[1]s;
		alter table sec enable row level security; alter table sec force row level security;
		create policy few on sec using (id <= 10)`, role))
	err := e.run(opts("alter table sec alter column n type bigint"))
	if !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), "FORCE ROW LEVEL SECURITY") {
		t.Fatalf("want a refusal naming FORCE ROW LEVEL SECURITY, got %v", err)
	}
	e.assertNoLeftovers("sec")
	e.exec("alter table sec no force row level security")
	if err := e.run(opts("alter table sec alter column n type bigint")); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select count(*) from sec"); got != "500" {
		t.Fatalf("%s rows after the migration, want 500", got)
	}
}
