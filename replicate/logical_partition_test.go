package replicate_test

// Logical capture of partitioned tables: the publication FOR TABLE T
// publishes T's leaf partitions, whose changes arrive with the partitions'
// own OIDs and column layouts; a row moved to another partition arrives as
// a DELETE and an INSERT; a TRUNCATE arrives as the list of truncated
// leaves and must become the same 'T' / 'P' markers trigger capture writes.

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

// partitionedTree is a list-partitioned table whose region 2 is
// hash-partitioned, with a default partition attached from a table of
// another column order (a dropped column, the key columns last), so that
// partitions and root describe their columns differently in the stream,
// and one leaf with REPLICA IDENTITY FULL (its old keys arrive as 'O'
// tuples). %[1]s is the table name.
const partitionedTree = `
create table %[1]s (id int not null, region int not null, v text, n int, primary key (id, region)) partition by list (region);
create table %[1]s_r1 partition of %[1]s for values in (1);
create table %[1]s_r2 partition of %[1]s for values in (2) partition by hash (id);
create table %[1]s_r2_h0 partition of %[1]s_r2 for values with (modulus 2, remainder 0);
create table %[1]s_r2_h1 partition of %[1]s_r2 for values with (modulus 2, remainder 1);
create table %[1]s_other (junk int, n int, v text, region int not null, id int not null);
alter table %[1]s_other drop column junk;
alter table %[1]s attach partition %[1]s_other default;
alter table %[1]s_r1 replica identity full;`

// A multi-level partitioned table migrated with logical capture under
// writers that update, delete, insert and move rows between partitions
// (partition key updates, and key updates that move rows between hash
// partitions), in the same transactions as a control table; a scripted
// round of moves runs while the stream is consumed.
func TestLogicalPartitionedUnderWriters(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	e.exec(fmt.Sprintf(partitionedTree, "m"))
	e.exec(`create table ctl (id int not null, region int not null, v text, n int, primary key (id, region));
		insert into m select g, g % 4, md5(g::text), g from generate_series(1, 6000) g;
		insert into ctl select id, region, v, n from m;
		analyze m`)
	tables := []string{"m", "ctl"}
	var stop atomic.Bool
	var wg sync.WaitGroup
	var ops, moves atomic.Int64
	var werr atomic.Value
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			ctx := context.Background()
			for i := w; !stop.Load(); i += 2 {
				id := 1 + i*37%6000
				stmt := []string{
					"update %s set n = n + 1, v = v || 'u' where id = $1",
					// to the next region: another partition (and level)
					"update %s set region = (region + 1) %% 4 where id = $1 and not exists (select 1 from %[1]s x where x.id = $1 and x.region = (%[1]s.region + 1) %% 4)",
					"delete from %s where id = $1 and region <> 2",
					"insert into %s (id, region, v, n) values ($1 + 10000, $1 %% 4, 'new', 0) on conflict do nothing",
					// a key update: moves rows between the hash partitions of region 2
					"update %s set id = id + 20000 where id = $1 and not exists (select 1 from %[1]s x where x.id = $1 + 20000)",
				}[i%5]
				tx, err := e.pool.Begin(ctx)
				if err != nil {
					werr.Store(err)
					return
				}
				var moved int64
				ok := true
				for _, tb := range tables {
					tag, err := tx.Exec(ctx, fmt.Sprintf(stmt, tb), id)
					if err != nil {
						ok = false
						break
					}
					moved = tag.RowsAffected()
				}
				if !ok {
					_ = tx.Rollback(ctx)
					continue
				}
				if tx.Commit(ctx) == nil {
					ops.Add(1)
					if i%5 == 1 || i%5 == 4 {
						moves.Add(moved)
					}
				}
				time.Sleep(500 * time.Microsecond)
			}
		}(w)
	}
	var hook hookErrs
	var scripted atomic.Bool
	o := logicalOpts("alter table m alter column n type bigint, add column extra int default 7")
	o.BatchSize = 200
	o.CopyDataJobs = 1
	o.ShowQueries = func(sql string) {
		if strings.Contains(sql, "ANALYZE ") && scripted.CompareAndSwap(false, true) {
			// While the stream is consumed: rows of every partition move
			// to another one, some changing their key as well.
			hook.add(e.onBoth(tables,
				"update %s set region = case region when 0 then 1 when 1 then 2 when 2 then 3 else 0 end where id between 3001 and 3100",
				"update %s set id = id + 50000, region = 2 where id between 3101 and 3140 and region <> 2",
				"delete from %s where id between 3141 and 3160"))
		}
	}
	err := e.run(o)
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	hook.check(t)
	if err, _ := werr.Load().(error); err != nil {
		t.Fatal(err)
	}
	if !scripted.Load() {
		t.Fatal("the scripted moves never ran")
	}
	if ops.Load() == 0 || moves.Load() == 0 {
		t.Fatalf("writers committed %d transactions, %d moves: the test proves nothing", ops.Load(), moves.Load())
	}
	t.Logf("writers committed %d transactions, %d rows moved between partitions", ops.Load(), moves.Load())
	if got := e.str(`select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'm_other'::regclass and attname = 'n'`); got != "bigint" {
		t.Fatalf("n of the default partition is %s", got)
	}
	e.assertSame("m", "ctl", "id, region, v, n")
	if got := e.str("select count(*) filter (where extra = 7) = count(*) from m"); got != "true" {
		t.Fatal("extra is not 7 everywhere")
	}
	for _, leaf := range []string{"m_r1", "m_r2_h0", "m_r2_h1", "m_other"} {
		if e.str("select count(*) from "+leaf) == "0" {
			t.Fatalf("partition %s is empty", leaf)
		}
	}
	e.assertNoLeftovers("m")
	e.assertNoCapture()
}

// switchGate is a Control whose switch is requested when open is closed.
type switchGate struct{ open chan struct{} }

func (g switchGate) SwitchRequested(context.Context) (bool, error) {
	select {
	case <-g.open:
		return true, nil
	default:
		return false, nil
	}
}

// TRUNCATE of one leaf partition, of an intermediate partitioned table and
// of the root, while the stream is consumed (the run waits for a manual
// switch: unlike StopBeforeSwitch + Continue, which would start a logical
// run over and copy the truncated state, this keeps the slot streaming).
// A partition's TRUNCATE must empty that partition's shadow only ('P'
// markers), the root's the whole shadow ('T'), and the rows written after
// it must survive.
func TestLogicalPartitionTruncate(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	e.exec(fmt.Sprintf(partitionedTree, "m"))
	e.exec(`create table ctl (id int not null, region int not null, v text, n int, primary key (id, region));
		insert into m select g, g % 4, md5(g::text), g from generate_series(1, 4000) g;
		insert into ctl select id, region, v, n from m`)
	tables := []string{"m", "ctl"}

	// run migrates m with cmd, running during the wait for the switch
	// writes on m and ctl (in one transaction per step); the applied
	// truncates must have been replayed on exactly the shadows replayed.
	run := func(t *testing.T, cmd string, steps [][]string, replayed []string) {
		t.Helper()
		e := &env{t: t, url: e.url, pool: e.pool} // fail this subtest, not its parent
		ev, switchNow := untilManualSwitch(t, e, logicalOpts(cmd))
		for _, st := range steps {
			if err := e.onBoth(tables, st...); err != nil {
				_ = switchNow()
				t.Fatal(err)
			}
		}
		// Let the catch-up rounds of the wait apply some of it; the
		// switch applies the rest under its lock.
		time.Sleep(700 * time.Millisecond)
		if err := switchNow(); err != nil {
			t.Fatal(err)
		}
		e.assertSame("m", "ctl", "id, region, v, n")
		e.assertNoLeftovers("m")
		e.assertNoCapture()
		ev.mu.Lock()
		var got []string
		for _, msg := range ev.msgs {
			if i := strings.Index(msg, "a TRUNCATE of the original was replayed on "); i >= 0 {
				got = append(got, msg[i+len("a TRUNCATE of the original was replayed on "):])
			}
		}
		ev.mu.Unlock()
		if strings.Join(got, " ") != strings.Join(replayed, " ") {
			t.Fatalf("truncates replayed on %v, want %v", got, replayed)
		}
	}

	t.Run("partitions", func(t *testing.T) {
		run(t, "alter table m alter column n type bigint", [][]string{
			{"update %s set v = 'before' where id between 1 and 40"},
			// one leaf; the control loses the same rows
			{"truncate m_r1", "delete from ctl where region = 1"},
			{"insert into %s (id, region, v, n) values (100001, 1, 'after', 1), (100002, 2, 'after', 2)"},
			// an intermediate partitioned table: both its hash leaves
			{"truncate m_r2", "delete from ctl where region = 2"},
			{"insert into %s (id, region, v, n) select g, 2, 'after r2', g from generate_series(100010, 100030) g",
				"update %s set region = 1 where id = 100020"},
			{"delete from %s where id between 41 and 60"},
		}, []string{`"public"."m_r1__tat_new"`, `"public"."m_r2_h0__tat_new"`, `"public"."m_r2_h1__tat_new"`})
		if got := e.str("select count(*) from m_r1"); got != "2" {
			t.Fatalf("m_r1 holds %s rows", got)
		}
	})
	t.Run("root", func(t *testing.T) {
		run(t, "alter table m alter column v type varchar(100)", [][]string{
			{"update %s set n = n + 1 where id between 1 and 100"},
			{"truncate m", "truncate ctl"},
			{"insert into %s (id, region, v, n) select g, g %% 4, 'after', g from generate_series(1, 50) g"},
			{"update %s set region = 2 where id = 7"},
		}, []string{`"public"."m__tat_new"`})
		if got := e.str("select count(*) from m"); got != "50" {
			t.Fatalf("m holds %s rows", got)
		}
	})
}

// Logical capture checks every leaf partition: each has its own
// persistence and replica identity.
func TestLogicalPartitionRefusals(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	cases := []struct{ ddl, want string }{
		{`create table %[1]s (id int primary key, a int) partition by range (id);
			create table %[1]s_1 partition of %[1]s for values from (0) to (10);
			create table %[1]s_2 partition of %[1]s for values from (10) to (20);
			alter table %[1]s_2 replica identity nothing`, `replica identity of partition "public"."%s_2"`},
		{`create table %[1]s (id int primary key, a int) partition by range (id);
			create table %[1]s_1 partition of %[1]s for values from (0) to (10);
			create unlogged table %[1]s_2 partition of %[1]s for values from (10) to (20)`, `partition "public"."%s_2" of "public"."%[1]s" is not WAL-logged`},
		// the key is a unique index, not a primary key: the partitions'
		// default replica identity has no index to use.
		{`create table %[1]s (id int not null, a int) partition by range (id);
			create unique index on %[1]s (id);
			create table %[1]s_1 partition of %[1]s for values from (0) to (10)`, `replica identity of partition "public"."%s_1"`},
	}
	for i, tc := range cases {
		tb := fmt.Sprintf("r%d", i)
		e.exec(fmt.Sprintf(tc.ddl, tb))
		err := e.run(logicalOpts(fmt.Sprintf("alter table %s alter column a type bigint", tb)))
		if want := fmt.Sprintf(tc.want, tb); err == nil || !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), want) {
			t.Fatalf("%s: want refusal with %q, got %v", tb, want, err)
		}
		e.assertNoLeftovers(tb)
		e.assertNoCapture()
	}
	// With the identity on the key, it runs.
	e.exec("alter table r0_2 replica identity default; insert into r0 select g, g from generate_series(0, 19) g")
	if err := e.run(logicalOpts("alter table r0 alter column a type bigint")); err != nil {
		t.Fatal(err)
	}
	e.assertNoCapture()
}

// untilManualSwitch runs the engine with o (switch: manual) until it waits
// for the switch; switchNow lets it switch and returns how the run ended.
func untilManualSwitch(t *testing.T, e *env, o replicate.Options) (ev *events, switchNow func() error) {
	t.Helper()
	ev = &events{}
	waiting := make(chan struct{})
	var once sync.Once
	ev.on = func(msg string) {
		if strings.Contains(msg, "waiting for a manual switch") {
			once.Do(func() { close(waiting) })
		}
	}
	o.ManualSwitch = true
	gate := switchGate{open: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- replicate.Run(context.Background(), e.pool, o, ev, gate) }()
	select {
	case <-waiting:
	case err := <-done:
		t.Fatalf("the run ended before waiting for the switch: %v", err)
	case <-time.After(60 * time.Second):
		close(gate.open)
		t.Fatal("the run never waited for the switch")
	}
	return ev, func() error {
		close(gate.open)
		return <-done
	}
}
