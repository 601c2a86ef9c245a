package replicate_test

import (
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/pgtat/pg_tat/replicate"
)

// --copy-data-filter: only matching rows are copied, and rows changed during
// the run are re-read with the filter.
func TestCopyDataFilter(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 5000)
	w := e.startWriter(2, "orders", "control", 6000)
	o := opts("alter table orders alter column id type bigint")
	o.CopyDataFilter = "n % 2 = 0 or v like 'a%'"
	o.StopBeforeSwitch = true
	err := e.run(o)
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	o.StopBeforeSwitch, o.Continue = false, true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	e.assertSame("orders", "(select * from control where n % 2 = 0 or v like 'a%') c", "id::int, v, n")
	for _, bad := range []string{"true) union select 1 --", "1; drop table orders", "true order by 1"} {
		o := opts("alter table orders alter column n type bigint")
		o.CopyDataFilter = bad
		if err := e.run(o); !errors.Is(err, replicate.ErrBadCommand) {
			t.Errorf("filter %q accepted: %v", bad, err)
		}
	}
}

// --command-before-switch / --command-after-switch run in the cut-over
// transaction; a failing one rolls the switch back.
func TestSwitchCommands(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 1000)
	e.exec("create table audit (msg text, cols int)")
	o := opts("alter table orders add column z int default (random() * 10)::int")
	o.CommandBeforeSwitch = "insert into audit select 'before', count(*) from pg_attribute where attrelid = 'orders'::regclass and attnum > 0"
	o.CommandAfterSwitch = "insert into audit select 'after', count(*) from pg_attribute where attrelid = 'orders'::regclass and attnum > 0"
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select string_agg(msg || cols, ',' order by msg desc) from audit"); got != "before3,after4" {
		t.Fatalf("audit: %s", got)
	}
	o = opts("alter table orders alter column z type bigint")
	o.CommandAfterSwitch = "select 1/0"
	err := e.run(o)
	if err == nil || !strings.Contains(err.Error(), "division by zero") {
		t.Fatalf("want the after-switch command's error, got %v", err)
	}
	if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'z'"); got != "integer" {
		t.Fatalf("switched anyway: %s", got)
	}
	e.assertNoLeftovers("orders")
}

// --dry-run prints the plan and the statements and changes nothing.
func TestDryRun(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 100)
	e.exec("create index orders_v on orders (v)")
	before := e.dump(t)
	o := opts("alter table orders alter column id type bigint")
	o.DryRun = true
	var mu sync.Mutex
	var out []string
	o.ShowQueries = func(s string) { mu.Lock(); out = append(out, s); mu.Unlock() }
	rep := reporterFunc(func(_, msg string) { mu.Lock(); out = append(out, msg); mu.Unlock() })
	if err := runWith(e, o, rep); err != nil {
		t.Fatal(err)
	}
	all := strings.Join(out, "\n")
	for _, want := range []string{"CREATE TABLE", "ALTER TABLE public.orders__tat_new ALTER COLUMN id TYPE bigint", "would build", "nothing was changed"} {
		if !strings.Contains(all, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, all)
		}
	}
	if after := e.dump(t); after != before {
		t.Fatalf("dry run changed the schema:\n%s", diff(before, after))
	}
}

// VACUUM (FREEZE, ANALYZE) after the load: no tuple of the new table needs freezing later.
func TestVacuumFreeze(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 2000)
	o := opts("alter table orders alter column id type bigint")
	o.VacuumFreeze = true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(t.Context(), "create extension if not exists pg_visibility"); err != nil {
		t.Skipf("pg_visibility not available: %v", err)
	}
	if got := e.str("select count(*) filter (where not all_frozen) || '/' || count(*) from pg_visibility_map('orders')"); !strings.HasPrefix(got, "0/") || got == "0/0" {
		t.Fatalf("pages not all frozen: %s", got)
	}
	// Control: without the option the pages are not frozen (the check can fail).
	o = opts("alter table orders alter column v type varchar")
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select count(*) filter (where not all_frozen) from pg_visibility_map('orders')"); got == "0" {
		t.Fatal("pages frozen without VacuumFreeze: the check proves nothing")
	}
}

// Constraints the ALTER adds without a name get the names the in-place
// ALTER would give them.
func TestAddedConstraintNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 500)
	e.exec("create table ref (n int primary key); insert into ref select generate_series(1, 100000)")
	if err := e.run(opts("alter table orders alter column id type bigint, add column x int check (x > 0), add foreign key (n) references ref")); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select string_agg(conname, ',' order by conname) from pg_constraint where conrelid = 'orders'::regclass and contype in ('c', 'f')"); got != "orders_n_fkey,orders_x_check" {
		t.Fatalf("constraint names %s", got)
	}
}
