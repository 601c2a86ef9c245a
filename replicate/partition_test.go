package replicate_test

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// A multi-level partitioned table (list, then hash; a default partition;
// an index on one partition only) is migrated as a whole, under a writer
// whose updates also move rows between partitions. pg_dump -s must differ
// only by the ALTER, and the content must equal the control's.
func TestPartitionedTable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`
create table m (id int not null, region int not null, v text, n int, primary key (id, region)) partition by list (region);
create table m_r1 partition of m (constraint m_r1_n_positive check (n > 0)) for values in (1) with (fillfactor = 90);
create table m_r2 partition of m for values in (2) partition by hash (id);
create table m_r2_h0 partition of m_r2 for values with (modulus 2, remainder 0);
create table m_r2_h1 partition of m_r2 for values with (modulus 2, remainder 1);
create table m_other partition of m default;
create index m_n on m (n);
create index m_r1_only on m_r1 (v);
comment on table m_r1 is 'region one';
create table ctl (id int not null, region int not null, n int, v text, primary key (id, region));
insert into m select g, g % 4, md5(g::text), g from generate_series(1, 6000) g;
insert into ctl select id, region, n, v from m;
analyze m;`)
	before := e.dump(t)
	var stop atomic.Bool
	var wg sync.WaitGroup
	var ops, moves atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx := context.Background()
		for i := 0; !stop.Load(); i++ {
			id := 1 + i*37%6000
			stmt := []string{
				"update %s set n = n + 1 where id = $1",
				"update %s set region = (region + 1) %% 4 where id = $1 and not exists (select 1 from %[1]s x where x.id = $1 and x.region = (%[1]s.region + 1) %% 4)",
				"delete from %s where id = $1",
				"insert into %s (id, region, v, n) values ($1 + 10000, 1, 'new', 0) on conflict do nothing",
			}[i%4]
			tx, err := e.pool.Begin(ctx)
			if err != nil {
				return
			}
			tag, err1 := tx.Exec(ctx, sprintf(stmt, "m"), id)
			_, err2 := tx.Exec(ctx, sprintf(stmt, "ctl"), id)
			if err1 != nil || err2 != nil {
				_ = tx.Rollback(ctx)
				continue
			}
			if tx.Commit(ctx) == nil {
				ops.Add(1)
				if i%4 == 1 && tag.RowsAffected() > 0 {
					moves.Add(1)
				}
			}
			time.Sleep(time.Millisecond)
		}
	}()
	o := opts("alter table m alter column n type bigint")
	err := e.run(o)
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if ops.Load() == 0 || moves.Load() == 0 {
		t.Fatalf("writer committed %d transactions, %d moves between partitions", ops.Load(), moves.Load())
	}
	after := e.dump(t)
	// Every table of the tree (not the control) has n as bigint now.
	want := regexp.MustCompile(`(?s)CREATE TABLE public\.m[^;]*?;`).ReplaceAllStringFunc(before, func(b string) string {
		return regexp.MustCompile(`(?m)^    n integer`).ReplaceAllString(b, "    n bigint")
	})
	if want != after {
		t.Fatalf("schema differs beyond the ALTER:\n%s", diff(want, after))
	}
	e.assertSame("m", "ctl", "id, region, v, n")
	e.assertNoLeftovers("m")
	if got := e.str("select count(*) from m_r2_h1"); got == "0" {
		t.Fatal("hash partition empty")
	}
}

// TRUNCATE of one partition during the run empties only that partition.
func TestPartitionTruncate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table p (id int primary key, v text) partition by range (id);
		create table p1 partition of p for values from (0) to (1000);
		create table p2 partition of p for values from (1000) to (2000);
		insert into p select g, 'x' from generate_series(1, 1999) g`)
	o := opts("alter table p alter column v type varchar(20)")
	o.StopBeforeSwitch = true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	e.exec("update p set v = 'y' where id in (5, 1005); truncate p1; insert into p values (7, 'after')")
	o.StopBeforeSwitch, o.Continue = false, true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select count(*) || ' ' || count(*) filter (where v = 'y') || ' ' || (select v from p where id = 7) from p"); got != "1001 1 after" {
		t.Fatalf("after partition truncate: %s", got)
	}
	e.assertNoLeftovers("p")
	if n := e.str("select count(*) from pg_trigger t join pg_class c on c.oid = t.tgrelid where c.relname like 'p%'"); n != "0" {
		t.Fatalf("%s triggers left", n)
	}
}

// The same partitioned tree altered in place in one database and by the
// engine in another dumps the same, also for the indexes and constraints
// the ALTER adds (named by PostgreSQL on every partition), with the
// partitioned indexes assembled from per-leaf builds.
func TestPartitionedMatchesInPlace(t *testing.T) {
	t.Parallel()
	const schema = `
create table m (id int not null, region int not null, n int, v text, primary key (id, region)) partition by list (region);
create table m_r1 partition of m for values in (1);
create table m_r2 partition of m for values in (2) partition by hash (id);
create table m_r2_h0 partition of m_r2 for values with (modulus 2, remainder 0);
create table m_r2_h1 partition of m_r2 for values with (modulus 2, remainder 1);
create table m_rest partition of m default;
create unique index m_v_region on m (v, region, id) where v is not null;
create index on m (n desc nulls last) include (v);
create index m_r1_only on m_r1 (n);
insert into m select g, g % 4, g, md5(g::text) from generate_series(1, 5000) g;
create table ctl as select * from m;`
	const alter = "alter table m alter column n type bigint, add column w int not null default 0, add unique (id, region, w), add constraint m_n_check check (n > 0)"
	inPlace, online := newEnv(t), newEnv(t)
	inPlace.exec(schema)
	inPlace.exec(alter)
	online.exec(schema)
	stop := online.pairWriter(t, "update %s set n = n + 1, region = (region + 2) %% 4 where id = $1", "m", "ctl", 5000)
	err := online.run(opts(alter))
	stop()
	if err != nil {
		t.Fatal(err)
	}
	want, got := inPlace.snapshot(t), online.snapshot(t)
	if want != got {
		t.Fatalf("online differs from in place:\n%s", diff(want, got))
	}
	if n := online.str("select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid where c.relname like 'm%' and not i.indisvalid"); n != "0" {
		t.Fatalf("%s invalid indexes", n)
	}
	online.assertSame("m", "ctl", "id, region, n, v")
	online.assertNoLeftovers("m")
}

// Before PostgreSQL 18 a partitioned table's foreign keys (its own, or
// those of a partitioned table referencing the migrated one) cannot be
// re-added NOT VALID: refused up front, nothing created. On 18 they are
// carried over and validated.
func TestPartitionedForeignKeys(t *testing.T) {
	t.Parallel()
	for name, setup := range map[string]string{
		"outbound": `create table ref (id int primary key); insert into ref select generate_series(1, 10);
			create table m (id int not null, r int references ref, n int, primary key (id, r)) partition by list (r);
			create table m_1 partition of m for values in (1); create table m_rest partition of m default;
			insert into m select g, 1 + g % 10, g from generate_series(1, 1000) g`,
		"inbound": `create table m (id int primary key, n int);
			insert into m select g, g from generate_series(1, 1000) g;
			create table refs (id int not null, m_id int references m, primary key (id)) partition by range (id);
			create table refs_1 partition of refs for values from (minvalue) to (maxvalue);
			insert into refs select g, g from generate_series(1, 100) g`,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.exec(setup)
			err := e.run(opts("alter table m alter column n type bigint"))
			if testpg.Version(t) >= 180000 {
				if err != nil {
					t.Fatal(err)
				}
				if got := e.str("select count(*) from pg_constraint where contype = 'f' and not convalidated"); got != "0" {
					t.Fatalf("%s foreign keys left NOT VALID", got)
				}
			} else if !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), "before PostgreSQL 18") {
				t.Fatalf("want a refusal, got %v", err)
			}
			e.assertNoLeftovers("m")
		})
	}
}
