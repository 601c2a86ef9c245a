package replicate_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// pairWriter updates table and control in one transaction until stopped;
// the returned function stops it and fails the test when it wrote nothing.
func (e *env) pairWriter(t *testing.T, stmt, table, control string, maxID int) func() {
	var stop atomic.Bool
	var wg sync.WaitGroup
	var ops atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx := context.Background()
		for i := 0; !stop.Load(); i++ {
			tx, err := e.pool.Begin(ctx)
			if err != nil {
				return
			}
			id := 1 + i*53%maxID
			_, err1 := tx.Exec(ctx, sprintf(stmt, table), id)
			_, err2 := tx.Exec(ctx, sprintf(stmt, control), id)
			if err1 == nil && err2 == nil && tx.Commit(ctx) == nil {
				ops.Add(1)
			} else {
				_ = tx.Rollback(ctx)
			}
		}
	}()
	return func() {
		stop.Store(true)
		wg.Wait()
		if ops.Load() == 0 {
			t.Fatal("the writer wrote nothing: the test proves nothing")
		}
	}
}

// Partial mode on one leaf partition: the new partition is attached back
// (its bound proven by a CHECK built during the load, so ATTACH scans
// nothing under the lock), with the parent's indexes, PRIMARY KEY and
// cloned triggers attached, its own index, trigger state, grant, comment and
// view kept. The whole database dumps as after the in-place ALTER.
func TestPartialPartition(t *testing.T) {
	t.Parallel()
	const schema = `
create table m (id int not null, region int not null, n int, v text, primary key (id, region)) partition by list (region);
create table m1 partition of m for values in (1);
create table m2 partition of m for values in (2);
create table m_rest partition of m default;
create index m_n on m (n);
create index m1_v_idx on m1 (v);
create function m_trg() returns trigger language plpgsql as 'begin return new; end';
create trigger m_upd before update on m for each row execute function m_trg();
create trigger m1_own after insert on m1 for each row execute function m_trg();
alter table m1 disable trigger m1_own;
alter table m1 disable trigger m_upd;
comment on table m1 is 'region one';
grant select on m1 to public;
create view m1_v as select id, n from m1 where n > 10;
insert into m select g, g % 3, g, md5(g::text) from generate_series(1, 6000) g;
create table ctl as select * from m1;`
	const alter = "alter table m1 add constraint m1_n_positive check (n > 0), alter column v set not null"
	inPlace := newEnv(t)
	inPlace.exec(schema)
	inPlace.exec(alter)
	want := inPlace.snapshot(t)
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			partialPartition(t, schema, alter, capture, want)
		})
	}
}

func partialPartition(t *testing.T, schema, alter, capture, want string) {
	if v := testpg.Version(t); capture == replicate.CaptureLogical && v < 140000 {
		t.Skipf("logical capture needs PostgreSQL 14+ (server is %d)", v)
	}
	online := newEnv(t)
	online.exec(schema)
	stop := online.pairWriter(t, "update %s set n = n + 1, v = v || 'x' where id = $1", "m1", "ctl", 6000)
	err := online.run(captureOpts(capture, alter))
	stop()
	if err != nil {
		t.Fatal(err)
	}
	if got := online.snapshot(t); want != got {
		t.Fatalf("online differs from in place:\n%s", diff(want, got))
	}
	online.assertSame("m1", "ctl", "id, region, n, v")
	online.assertSame("(select * from m where region = 1) x", "ctl", "id, region, n, v")
	if n := online.str("select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid where c.relname like 'm%' and not i.indisvalid"); n != "0" {
		t.Fatalf("%s invalid indexes", n)
	}
	online.assertNoLeftovers("m1")
	// Rows still route to the new partition.
	online.exec("insert into m values (100001, 1, 5, 'routed')")
	if got := online.str("select count(*) from m1 where id = 100001"); got != "1" {
		t.Fatal("insert through the parent did not reach the new partition")
	}
}

// Partial mode refuses, before creating anything, what PostgreSQL refuses
// in place on a partition: changing an inherited column.
func TestPartialPartitionRefusesInheritedColumn(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table m (id int primary key, n int) partition by range (id);
		create table m1 partition of m for values from (0) to (100);
		insert into m select generate_series(1, 99), 1`)
	err := e.run(opts("alter table m1 alter column n type bigint"))
	if !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), "column n, which") {
		t.Fatalf("want a refusal naming the inherited column, got %v", err)
	}
	e.assertNoLeftovers("m1")
}

// Partial mode on an inheritance child: INHERIT attaches the new table back
// (a catalog change). Columns, constraints, indexes and the parent link are
// as after the in-place ALTER; the copies of inherited columns and CHECKs
// are also marked local (PostgreSQL has no way to unmark them).
func TestPartialInheritanceChild(t *testing.T) {
	t.Parallel()
	const schema = `
create table ih (id int primary key, n int not null, v text, constraint ih_n_check check (n >= 0));
create table ih_c (extra int, primary key (id)) inherits (ih);
create index ih_c_extra on ih_c (extra);
insert into ih select g, g, 'p' from generate_series(1, 100) g;
insert into ih_c select g, g, md5(g::text), g from generate_series(1000, 5000) g;
create table ctl as select * from ih_c;`
	const alter = "alter table ih_c alter column extra type bigint, add constraint ih_c_extra_check check (extra > 0)"
	const describe = `select string_agg(x, E'\n' order by x) from (
		select format('column %s %s %s %s', attname, format_type(atttypid, atttypmod), attnotnull, attinhcount)
		  from pg_attribute where attrelid = 'ih_c'::regclass and attnum > 0 and not attisdropped
		union all select format('constraint %s %s %s', conname, pg_get_constraintdef(oid), coninhcount)
		  from pg_constraint where conrelid = 'ih_c'::regclass
		union all select 'index ' || pg_get_indexdef(indexrelid) from pg_index where indrelid = 'ih_c'::regclass
		union all select 'parent ' || inhparent::regclass::text from pg_inherits where inhrelid = 'ih_c'::regclass) d(x)`
	inPlace, online := newEnv(t), newEnv(t)
	inPlace.exec(schema)
	inPlace.exec(alter)
	online.exec(schema)
	stop := online.pairWriter(t, "update %s set n = n + 1, extra = extra + 1 where id = $1 + 999", "ih_c", "ctl", 4000)
	err := online.run(opts(alter))
	stop()
	if err != nil {
		t.Fatal(err)
	}
	if want, got := inPlace.str(describe), online.str(describe); want != got {
		t.Fatalf("online differs from in place:\n%s", diff(want, got))
	}
	online.assertSame("ih_c", "ctl", "id, n, v, extra")
	if got := online.str("select count(*) from ih"); got != "4101" {
		t.Fatalf("the parent sees %s rows, want 4101", got)
	}
	online.assertNoLeftovers("ih_c")
}

// With a DEFAULT partition beside the migrated one, a validated CHECK on the
// default partition proves before the switch that it holds no rows of the
// bound (so ATTACH scans nothing under the lock); a job that does not
// switch leaves nothing of it behind once cleaned up.
func TestPartialPartitionDefaultGuard(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table m (id int not null, region int not null, n int, primary key (id, region)) partition by list (region);
		create table m1 partition of m for values in (1);
		create table m_rest partition of m default;
		insert into m select g, g % 3, g from generate_series(1, 3000) g`)
	o := opts("alter table m1 alter column n set not null")
	o.StopBeforeSwitch = true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	const guard = "select coalesce(string_agg(conname || ' ' || convalidated, ','), '') from pg_constraint where conrelid = 'm_rest'::regclass and contype = 'c'"
	if got := e.str(guard); got != "m1__tat_excl true" {
		t.Fatalf("default partition guard: %q", got)
	}
	if err := replicate.Cleanup(context.Background(), e.pool, "m1"); err != nil {
		t.Fatal(err)
	}
	if got := e.str(guard); got != "" {
		t.Fatalf("guard left after cleanup: %q", got)
	}
	e.assertNoLeftovers("m1")
	o.StopBeforeSwitch = false
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str(guard); got != "" {
		t.Fatalf("guard left after the switch: %q", got)
	}
	if got := e.str("select attnotnull from pg_attribute where attrelid = 'm1'::regclass and attname = 'n'"); got != "true" {
		t.Fatal("the ALTER did not apply")
	}
}
