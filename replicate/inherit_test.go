package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// An inheritance tree (root, two children, a grandchild; each with its own
// key, one with columns and an index of its own) is migrated as a whole:
// shadows of the children inherit from the root's shadow, so the ALTER
// recurses into them as in place; each table is copied and caught up from
// its own rows, under writers on every table (rows of one table change
// with its control in one transaction). The catalog snapshot equals the
// in-place ALTER's, and every table equals its control.
func TestInheritanceTree(t *testing.T) {
	t.Parallel()
	const schema = `
create table ih (id int primary key, n int not null, v text, constraint ih_n_check check (n >= 0));
create table ih_a (extra int default 3, primary key (id)) inherits (ih);
create table ih_b (primary key (id)) inherits (ih);
create table ih_a1 (more text, primary key (id)) inherits (ih_a);
alter table ih_b alter column v set default 'b';
create index ih_a_extra on ih_a (extra);
comment on table ih_b is 'child b';
insert into ih select g, g, 'root' from generate_series(1, 2000) g;
insert into ih_a select g, g, 'a', g from generate_series(1, 2000) g;
insert into ih_b select g, g, 'b' from generate_series(3000, 5000) g;
insert into ih_a1 select g, g, 'a1', g, 'm' from generate_series(1, 1500) g;
create table c_ih as select * from only ih;
create table c_ih_a as select * from only ih_a;
create table c_ih_b as select * from only ih_b;
create table c_ih_a1 as select * from only ih_a1;`
	const alter = "alter table ih alter column n type bigint, add column w int not null default 7, add constraint ih_v_check check (v <> '')"
	inPlace := newEnv(t)
	inPlace.exec(schema)
	inPlace.exec(alter)
	want := testpg.Schema(t, inPlace.pool)
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			if v := testpg.Version(t); capture == replicate.CaptureLogical && v < 140000 {
				t.Skipf("logical capture needs PostgreSQL 14+ (server is %d)", v)
			}
			inheritanceTree(t, schema, alter, capture, want)
		})
	}
}

func inheritanceTree(t *testing.T, schema, alter, capture, want string) {
	online := newEnv(t)
	online.exec(schema)

	var stop atomic.Bool
	var wg sync.WaitGroup
	var ops atomic.Int64
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 7))
			ctx := context.Background()
			tables := []string{"ih", "ih_a", "ih_b", "ih_a1"}
			for !stop.Load() {
				tb := tables[r.IntN(len(tables))]
				id := 1 + r.IntN(5000)
				stmt := []string{
					"update only %s set n = n + 1, v = v || 'x' where id = $1",
					"delete from only %s where id = $1",
					"update only %s set id = id + 100000 where id = $1",
				}[r.IntN(3)]
				tx, err := online.pool.Begin(ctx)
				if err != nil {
					return
				}
				_, err1 := tx.Exec(ctx, fmt.Sprintf(stmt, tb), id)
				_, err2 := tx.Exec(ctx, fmt.Sprintf(stmt, "c_"+tb), id)
				if err1 == nil && err2 == nil && tx.Commit(ctx) == nil {
					ops.Add(1)
				} else {
					_ = tx.Rollback(ctx)
				}
			}
		}(uint64(w + 1))
	}
	o := captureOpts(capture, alter)
	o.BatchSize = 200
	err := online.run(o)
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if ops.Load() == 0 {
		t.Fatal("the writers wrote nothing")
	}
	if got := testpg.Schema(t, online.pool); got != want {
		t.Fatalf("online differs from in place:\n%s", diff(want, got))
	}
	online.assertSame("(select id, n, v from only ih) x", "(select id, n, v from c_ih) y", "*")
	online.assertSame("(select id, n, v, extra from only ih_a) x", "(select id, n, v, extra from c_ih_a) y", "*")
	online.assertSame("(select id, n, v from only ih_b) x", "(select id, n, v from c_ih_b) y", "*")
	online.assertSame("(select id, n, v, extra, more from only ih_a1) x", "(select id, n, v, extra, more from c_ih_a1) y", "*")
	if got := online.str("select count(*) filter (where w = 7) = count(*) from ih"); got != "true" {
		t.Fatal("the new column's default is not in every table")
	}
	online.assertNoLeftovers("ih")
	online.assertNoLeftovers("ih_a")
}

// treeCounts: rows per table of the ih tree, and how many of them the
// truncate tests' writes left (rows/written).
const treeCounts = `select string_agg(tableoid::regclass::text || ':' || n, ' ' order by tableoid::regclass::text) from (
	select tableoid, count(*) || '/' || count(*) filter (where v in ('u', 'ub', 'new', 'new a1')) n from ih group by tableoid) x`

// TRUNCATE in an inheritance tree empties exactly the tables it names (ONLY
// one, or one with its children); cleanup of a stopped job removes the
// capture triggers from every table and the shadows of every child.
func TestInheritanceTruncateAndCleanup(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table ih (id int primary key, v text);
		create table ih_a (primary key (id)) inherits (ih);
		create table ih_a1 (primary key (id)) inherits (ih_a);
		create table ih_b (primary key (id)) inherits (ih);
		insert into ih select g, 'r' from generate_series(1, 500) g;
		insert into ih_a select g, 'a' from generate_series(1, 500) g;
		insert into ih_a1 select g, 'a1' from generate_series(1, 500) g;
		insert into ih_b select g, 'b' from generate_series(1, 500) g`)
	o := opts("alter table ih alter column v type varchar(10)")
	o.StopBeforeSwitch = true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	e.exec(`update ih set v = 'u' where id = 5; truncate only ih; insert into ih values (7, 'new');
		truncate ih_a; insert into ih_a1 values (9, 'new a1'); update ih_b set v = 'ub' where id = 3`)
	o.StopBeforeSwitch, o.Continue = false, true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str(treeCounts); got != "ih:1/1 ih_a1:1/1 ih_b:500/2" {
		t.Fatalf("after truncates: %s", got)
	}
	e.assertNoLeftovers("ih")

	o = opts("alter table ih alter column v type varchar(20)")
	o.StopBeforeSwitch = true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if n := e.str("select count(*) from pg_trigger where tgname like '%tat%'"); n != "8" {
		t.Fatalf("%s capture triggers, want two per table", n)
	}
	if err := replicate.Cleanup(context.Background(), e.pool, "ih"); err != nil {
		t.Fatal(err)
	}
	for _, tb := range []string{"ih", "ih_a", "ih_a1", "ih_b"} {
		e.assertNoLeftovers(tb)
	}
}

// An inheritance tree's copy interrupted midway continues from each table's
// checkpoint: every table ends up equal to its control, none copied twice.
func TestInheritanceCopyResumes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table ih (id int primary key, v text);
		create table ih_a (primary key (id)) inherits (ih);
		create table ih_b (extra int, primary key (id)) inherits (ih);
		insert into ih select g, 'r' || g from generate_series(1, 1500) g;
		insert into ih_a select g, 'a' || g from generate_series(1, 1500) g;
		insert into ih_b select g, 'b' || g, g from generate_series(1, 1500) g;
		create table c as select tableoid::regclass::text tbl, * from ih`)
	o := opts("alter table ih alter column v type varchar(20)")
	o.BatchSize = 100
	o.CopyDataJobs = 1
	ctx, cancel := context.WithCancel(context.Background())
	var batches atomic.Int64
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 20 {
			cancel()
		}
	}
	if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("want interruption, got %v", err)
	}
	if got := e.str("select count(*) filter (where rows > 0) > 1 from ih__tat_state"); got != "true" {
		t.Fatal("checkpoints of more than one table expected")
	}
	batches.Store(0)
	o.Continue = true
	if err := replicate.Run(context.Background(), e.pool, o, replicate.NopReporter{}, nil); err != nil {
		t.Fatal(err)
	}
	if n := batches.Load(); n >= 45 { // a fresh run takes 3 × 16
		t.Fatalf("the continued run copied in %d batches: it started over", n)
	}
	e.assertSame("(select tableoid::regclass::text tbl, * from ih) x", "(select tbl, id, v from c) y", "*")
	e.assertSame("(select id, v, extra from only ih_b) x", "(select id, v, id from c where tbl = 'ih_b') y", "*")
	e.assertNoLeftovers("ih")
}

// The same TRUNCATEs under logical capture, made while the job waits for a
// manual switch (a continued logical run would start over): pgoutput lists
// every table a TRUNCATE emptied, each replayed on its own shadow only.
func TestInheritanceTruncateLogical(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	e.exec(`create table ih (id int primary key, v text);
		create table ih_a (primary key (id)) inherits (ih);
		create table ih_a1 (primary key (id)) inherits (ih_a);
		create table ih_b (primary key (id)) inherits (ih);
		insert into ih select g, 'r' from generate_series(1, 500) g;
		insert into ih_a select g, 'a' from generate_series(1, 500) g;
		insert into ih_a1 select g, 'a1' from generate_series(1, 500) g;
		insert into ih_b select g, 'b' from generate_series(1, 500) g`)
	_, switchNow := untilManualSwitch(t, e, logicalOpts("alter table ih alter column v type varchar(10)"))
	e.exec(`update ih set v = 'u' where id = 5; truncate only ih; insert into ih values (7, 'new');
		truncate ih_a; insert into ih_a1 values (9, 'new a1'); update ih_b set v = 'ub' where id = 3`)
	time.Sleep(700 * time.Millisecond)
	if err := switchNow(); err != nil {
		t.Fatal(err)
	}
	if got := e.str(treeCounts); got != "ih:1/1 ih_a1:1/1 ih_b:500/2" {
		t.Fatalf("after truncates: %s", got)
	}
	e.assertNoLeftovers("ih")
	e.assertNoCapture()
}
