package replicate_test

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/replicate"
)

// mvRows is mt's initial row count. The writer's k-th transaction inserts
// row mvRows+k and adds 1 to the amount of row (k*37 % mvRows)+1 (distinct
// rows while k < mvRows), so mt as of the k-th commit is known exactly:
// qMvExpected computes mt_sum's content over it.
const mvRows = 5000

const mvSetup = `create table mt (id int primary key, cat int not null, amount int not null, note text);
	insert into mt select g, g % 7, g, md5(g::text) from generate_series(1, 5000) g;
	create materialized view mt_sum as select cat, count(*) as n, sum(amount) as total from public.mt group by cat;
	create unique index mt_sum_cat on mt_sum (cat);
	create index mt_sum_total on mt_sum (total) where total > 0;
	comment on materialized view mt_sum is 'sums per category';
	comment on column mt_sum.total is 'total amount';
	comment on index mt_sum_cat is 'one row per category';
	grant select on mt_sum to ROLE_A;
	create view mt_sum_v as select cat, total from mt_sum where n > 0;
	grant select on mt_sum_v to ROLE_A;
	create materialized view mt_empty as select cat, max(amount) as top from public.mt group by cat with no data;
	create unique index mt_empty_cat on mt_empty (cat);
	analyze mt`

const qMvExpected = `select cat, sum(c)::bigint as n, sum(a)::bigint as total from (
	  select g % 7 as cat, 1 as c, g as a from generate_series(1, 5000) g
	  union all select j % 7, 1, j from generate_series(1, $1::int) j
	  union all select ((j * 37) % 5000 + 1) % 7, 0, 1 from generate_series(1, $1::int) j) x
	group by cat`

// mvWriter runs the writer's transactions, one after the other, until
// stopped; stop returns the last k committed.
func mvWriter(t *testing.T, e *env) (stop func() int) {
	var k atomic.Int64
	var quit atomic.Bool
	var wg sync.WaitGroup
	var failed atomic.Value
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx := context.Background()
		for !quit.Load() {
			n := k.Load() + 1
			tx, err := e.pool.Begin(ctx)
			if err == nil {
				_, err = tx.Exec(ctx, `insert into mt values ($1 + 5000, $1 % 7, $1, 'w')`, n)
			}
			if err == nil {
				_, err = tx.Exec(ctx, `update mt set amount = amount + 1 where id = ($1 * 37) % 5000 + 1`, n)
			}
			if err == nil {
				err = tx.Commit(ctx)
			}
			if err != nil {
				failed.Store(err.Error())
				return
			}
			k.Store(n)
			time.Sleep(time.Millisecond)
		}
	}()
	return func() int {
		quit.Store(true)
		wg.Wait()
		if f, _ := failed.Load().(string); f != "" {
			t.Fatalf("writer: %s", f)
		}
		if k.Load() == 0 || k.Load() >= mvRows {
			t.Fatalf("writer committed %d transactions: the test needs 1..%d", k.Load(), mvRows-1)
		}
		return int(k.Load())
	}
}

// A materialized view over the table (populated, two indexes, a grant, comments,
// a view over it) and an unpopulated one survive an ALTER of a column they
// do not use, under a concurrent writer: same names, indexes, grants and
// comments; the populated one holds its query's result over the table as of
// one commit of the writer (a refresh just before the switch), not a
// mixture; the lock stays short (the rebuild is not under it).
func TestMatViewRebuilt(t *testing.T) {
	t.Parallel()
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			if capture == replicate.CaptureLogical {
				needsLogical(t)
			}
			e := newEnv(t)
			roles := treeRoles(t, 1, e)
			e.exec(roles.Replace(mvSetup))
			role := roles.Replace("ROLE_A")
			const qShape = `select string_agg(x, E'\n' order by x) from (
				select 'index ' || pg_get_indexdef(indexrelid) || coalesce(' -- ' || obj_description(indexrelid, 'pg_class'), '') as x
				  from pg_index where indrelid in ('mt_sum'::regclass, 'mt_empty'::regclass)
				union all select 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, '') from pg_class c where c.relname in ('mt_sum', 'mt_sum_v', 'mt_empty')
				union all select 'comment ' || coalesce(obj_description('mt_sum'::regclass, 'pg_class'), '') || ' / ' || coalesce(col_description('mt_sum'::regclass, 3), '')
				union all select 'populated ' || relname || ' ' || relispopulated from pg_class where relname in ('mt_sum', 'mt_empty')
				union all select 'view ' || pg_get_viewdef('mt_sum_v'::regclass)
				union all select 'owner ' || relname || ' ' || pg_get_userbyid(relowner) from pg_class where relname in ('mt_sum', 'mt_empty')) s`
			before := e.str(qShape)
			oid := e.str("select 'mt_sum'::regclass::oid")
			stop := mvWriter(t, e)
			var mu sync.Mutex
			var events []string
			rep := reporterFunc(func(_, msg string) { mu.Lock(); events = append(events, msg); mu.Unlock() })
			err := runWith(e, captureOpts(capture, "alter table mt alter column id type bigint"), rep)
			last := stop()
			mu.Lock()
			joined := strings.Join(events, "\n")
			mu.Unlock()
			if err != nil {
				t.Fatalf("run: %v\n%s", err, joined)
			}
			if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'mt'::regclass and attname = 'id'"); got != "bigint" {
				t.Fatalf("id is %s", got)
			}
			if e.str("select 'mt_sum'::regclass::oid") == oid {
				t.Fatal("mt_sum was not rebuilt")
			}
			if after := e.str(qShape); after != before {
				t.Fatalf("materialized views changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			// The content is the query over mt as of the k-th commit, for
			// the k its row count tells.
			k := e.str("select (sum(n) - 5000)::int from mt_sum")
			var ki int
			if _, err := fmt.Sscan(k, &ki); err != nil || ki < 0 || ki > last {
				t.Fatalf("mt_sum counts %s rows written (writer: %d)", k, last)
			}
			diff := e.str(`select count(*) from ((select cat, n, total from mt_sum except all (`+qMvExpected+`))
				union all ((`+qMvExpected+`) except all select cat, n, total from mt_sum)) d`, ki)
			if diff != "0" {
				t.Fatalf("mt_sum is not its query over mt as of commit %d of %d (%s rows differ)", ki, last, diff)
			}
			t.Logf("mt_sum is mt as of commit %d of %d", ki, last)
			// The table itself is exact; a refresh now gives the same as the
			// query over it.
			if diff := e.str(`select count(*) from ((select cat, count(*), sum(amount) from mt group by cat except all (`+qMvExpected+`))
				union all ((`+qMvExpected+`) except all select cat, count(*), sum(amount) from mt group by cat)) d`, last); diff != "0" {
				t.Fatalf("mt differs from the writer's %d commits in %s categories", last, diff)
			}
			e.exec("refresh materialized view concurrently mt_sum")
			if diff := e.str(`select count(*) from ((select cat, n, total from mt_sum except all (`+qMvExpected+`))) d`, last); diff != "0" {
				t.Fatalf("refreshed mt_sum differs in %s rows", diff)
			}
			if got := e.str("select count(*) from mt_sum_v"); got != "7" {
				t.Fatalf("mt_sum_v has %s rows", got)
			}
			if got := e.str("select has_table_privilege($1, 'mt_sum', 'select')", role); got != "true" {
				t.Fatalf("grant lost: %s", got)
			}
			m := regexp.MustCompile(`lock held (\S+)`).FindStringSubmatch(joined)
			if m == nil {
				t.Fatalf("no switch:\n%s", joined)
			}
			if held, err := time.ParseDuration(m[1]); err != nil || held > 2*time.Second {
				t.Fatalf("lock held %s", m[1])
			}
			if !strings.Contains(joined, `materialized view "public"."mt_sum" rebuilt over the new table`) {
				t.Fatalf("no rebuild event:\n%s", joined)
			}
			e.assertNoLeftovers("mt")
			if n := e.str(`select count(*) from pg_class where relname like '%\_\_tat\_%'`); n != "0" {
				t.Fatalf("%s replacements left", n)
			}
		})
	}
}

// An ALTER that changes or drops a column a materialized view uses is
// refused before anything is created, with PostgreSQL's own words (which
// the same ALTER gets in place).
func TestMatViewColumnUsedRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(treeRoles(t, 1, e).Replace(mvSetup))
	for _, tc := range []struct{ alter, want string }{
		{"alter table mt alter column amount type bigint", "cannot alter type of a column used by a view or rule"},
		{"alter table mt alter column cat type bigint, add column extra int default 1", "cannot alter type of a column used by a view or rule"},
		{"alter table mt drop column amount", "cannot drop column"},
	} {
		ctx := context.Background()
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_, inPlace := tx.Exec(ctx, tc.alter)
		_ = tx.Rollback(ctx)
		if inPlace == nil || !strings.Contains(inPlace.Error(), tc.want) {
			t.Fatalf("in place %q: %v, want %q", tc.alter, inPlace, tc.want)
		}
		err = e.run(opts(tc.alter))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%q: %v, want %q", tc.alter, err, tc.want)
		}
		t.Logf("refused: %v (in place: %v)", err, inPlace)
		if n := e.str(`select count(*) from pg_class where relname like '%\_\_tat\_%'`); n != "0" {
			t.Fatalf("%s objects created before the refusal", n)
		}
	}
}

// A partitioned table: materialized views over the root and over one
// partition are rebuilt over the new tree.
func TestMatViewOverTree(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table pm (id int primary key, n int, w int) partition by range (id);
		create table pm_1 partition of pm for values from (0) to (1000);
		create table pm_2 partition of pm for values from (1000) to (3000);
		insert into pm select g, g, g from generate_series(1, 2500) g;
		create materialized view pm_all as select count(*) as c, sum(n) as s from pm;
		create materialized view pm_low as select id, n, w from pm_1 where n < 100;
		create unique index pm_low_id on pm_low (id)`)
	if err := e.run(opts("alter table pm alter column n type bigint")); err == nil ||
		!strings.Contains(err.Error(), "cannot alter type of a column used by a view or rule") {
		t.Fatalf("want the retype of n, used by pm_all, refused: %v", err)
	}
	if err := e.run(opts("alter table pm alter column w type bigint")); err == nil ||
		!strings.Contains(err.Error(), "cannot alter type of a column used by a view or rule") {
		t.Fatalf("want the retype of w, used by pm_low (over a partition), refused: %v", err)
	}
	e.exec("drop materialized view pm_low")
	e.exec("create materialized view pm_low as select id, n from pm_1 where n < 100; create unique index pm_low_id on pm_low (id)")
	if err := e.run(opts("alter table pm alter column w type bigint")); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select c || '/' || s from pm_all"); got != "2500/3126250" {
		t.Fatalf("pm_all: %s", got)
	}
	if got := e.str("select count(*) from pm_low"); got != "99" {
		t.Fatalf("pm_low: %s rows", got)
	}
	if got := e.str("select pg_get_indexdef('pm_low_id'::regclass)"); got != "CREATE UNIQUE INDEX pm_low_id ON public.pm_low USING btree (id)" {
		t.Fatalf("pm_low_id: %s", got)
	}
	e.exec("insert into pm values (2600, 1, 1)")
	e.exec("refresh materialized view pm_all")
	if got := e.str("select c from pm_all"); got != "2501" {
		t.Fatalf("pm_all after refresh: %s", got)
	}
	e.assertNoLeftovers("pm")
}
