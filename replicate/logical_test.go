package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// logicalOpts is opts(cmd) with capture => 'logical'.
func logicalOpts(cmd string) replicate.Options {
	o := opts(cmd)
	o.Capture = replicate.CaptureLogical
	return o
}

// needsLogical skips a logical-capture test before PostgreSQL 14, where
// logical capture is refused by design (TestLogicalRefusedBefore14).
func needsLogical(t *testing.T) {
	t.Helper()
	if v := testpg.Version(t); v < 140000 {
		t.Skipf("logical capture needs PostgreSQL 14+ (server is %d); its refusal is TestLogicalRefusedBefore14", v)
	}
}

// Before PostgreSQL 14 (pgoutput sends no logical messages, the cut-over
// marker) logical capture is refused up front, leaving no slot or publication.
func TestLogicalRefusedBefore14(t *testing.T) {
	t.Parallel()
	if v := testpg.Version(t); v >= 140000 {
		t.Skipf("server is %d: logical capture is available", v)
	}
	e := newEnv(t)
	e.seed("orders", "control", 100)
	err := e.run(logicalOpts("alter table orders alter column id type bigint"))
	if err == nil || !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), "needs PostgreSQL 14 or later") {
		t.Fatalf("want refusal before 14, got %v", err)
	}
	e.assertNoCapture()
	e.assertNoLeftovers("orders")
}

// events collects a run's events for assertions.
type events struct {
	mu   sync.Mutex
	msgs []string
	on   func(msg string)
}

func (ev *events) Event(_ context.Context, phase, msg string) {
	ev.mu.Lock()
	ev.msgs = append(ev.msgs, phase+": "+msg)
	on := ev.on
	ev.mu.Unlock()
	if on != nil {
		on(msg)
	}
}
func (ev *events) Progress(context.Context, replicate.Progress) {}

func (ev *events) has(sub string) bool {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	for _, m := range ev.msgs {
		if strings.Contains(m, sub) {
			return true
		}
	}
	return false
}

// assertNoCapture: no replication slot of this database, no publication.
func (e *env) assertNoCapture() {
	e.t.Helper()
	if n := e.str(`select count(*) from pg_replication_slots where database = current_database()`); n != "0" {
		e.t.Fatalf("%s replication slot(s) remain", n)
	}
	if n := e.str(`select count(*) from pg_publication where pubname like '%\_\_tat\_pub'`); n != "0" {
		e.t.Fatalf("%s publication(s) remain", n)
	}
}

// both runs a statement (a %s for the table) on table and control in tx.
func both(ctx context.Context, tx pgx.Tx, sql string, tables ...string) error {
	for _, tb := range tables {
		if _, err := tx.Exec(ctx, fmt.Sprintf(sql, tb)); err != nil {
			return fmt.Errorf("%s: %w", fmt.Sprintf(sql, tb), err)
		}
	}
	return nil
}

// The concurrent-writer equality test, for both capture methods.
func TestCaptureMethodsUnderWriters(t *testing.T) {
	t.Parallel()
	cmds := []struct{ name, cmd, cols string }{
		{"bigint", "alter table orders alter column id type bigint", "id::bigint, v, n"},
		{"multi", "alter table orders alter column id type bigint, add column extra int default 7, alter column n type bigint", "id::bigint, v, n::bigint"},
	}
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		for _, tc := range cmds {
			t.Run(capture+"/"+tc.name, func(t *testing.T) {
				if capture == replicate.CaptureLogical {
					needsLogical(t)
				}
				e := newEnv(t)
				e.seed("orders", "control", 10000)
				w := e.startWriter(3, "orders", "control", 12000)
				time.Sleep(100 * time.Millisecond)
				o := opts(tc.cmd)
				o.Capture = capture
				ev := &events{}
				err := replicate.Run(context.Background(), e.pool, o, ev, nil)
				time.Sleep(100 * time.Millisecond)
				w.Stop(t)
				if err != nil {
					t.Fatal(err)
				}
				if got := e.str(`select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'id'`); got != "bigint" {
					t.Fatalf("id is %s", got)
				}
				e.assertSame("orders", "control", tc.cols)
				e.assertNoLeftovers("orders")
				e.assertNoCapture()
				if used := ev.has("replication slot"); used != (capture == replicate.CaptureLogical) {
					t.Fatalf("capture %s: slot used = %v", capture, used)
				}
			})
		}
	}
}

// Key updates, savepoints (released, rolled back), a rolled-back
// transaction, TOASTed values changed and left unchanged ('u' in pgoutput),
// a generated column and a truncate, during the copy and during the stream.
func TestLogicalChangeKinds(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	for _, tb := range []string{"t", "control"} {
		e.exec(fmt.Sprintf(`create table %s (id int primary key, v text, n int, big text,
			g int generated always as (n * 2) stored);
			alter table %[1]s alter column big set storage external;
			insert into %[1]s (id, v, n, big) select g, md5(g::text), g,
				case when g %% 10 = 0 then (select string_agg(md5(g::text || i::text), '') from generate_series(1, 300) i) end
			from generate_series(1, 5000) g`, tb))
	}
	if e.str(`select pg_relation_size(reltoastrelid) > 0 from pg_class where relname = 't'`) != "true" {
		t.Fatal("no TOASTed values: the test proves nothing")
	}
	ctx := context.Background()
	script := func(base int) error {
		steps := []func(tx pgx.Tx) error{
			// key updates, one of them on a TOASTed row (its big stays 'u')
			func(tx pgx.Tx) error {
				return both(ctx, tx, fmt.Sprintf("update %%s set id = id + 100000 where id in (%d, %d)", base+1, base+10), "t", "control")
			},
			// TOASTed value left unchanged: only n (and so g) change
			func(tx pgx.Tx) error {
				return both(ctx, tx, fmt.Sprintf("update %%s set n = n + 1 where id between %d and %d", base+20, base+60), "t", "control")
			},
			// TOASTed value changed
			func(tx pgx.Tx) error {
				return both(ctx, tx, fmt.Sprintf("update %%s set big = big || 'changed' where id in (%d, %d)", base+70, base+80), "t", "control")
			},
			// savepoints: released, rolled back, key change after a rollback
			func(tx pgx.Tx) error {
				for _, s := range []string{
					fmt.Sprintf("insert into %%s (id, v, n) values (%d, 'sp', 1)", 200000+base),
					"savepoint a",
					fmt.Sprintf("update %%s set v = 'released' where id = %d", base+2),
					"release savepoint a",
					"savepoint b",
					fmt.Sprintf("delete from %%s where id = %d", base+3),
					fmt.Sprintf("update %%s set v = 'rolled back' where id = %d", base+4),
					"rollback to savepoint b",
					"savepoint c",
					fmt.Sprintf("update %%s set id = %d where id = %d", 300000+base, base+5),
					fmt.Sprintf("delete from %%s where id = %d", base+6),
				} {
					if strings.Contains(s, "%s") {
						if err := both(ctx, tx, s, "t", "control"); err != nil {
							return err
						}
					} else if _, err := tx.Exec(ctx, s); err != nil {
						return err
					}
				}
				return nil
			},
			// deletes, one of a TOASTed row
			func(tx pgx.Tx) error {
				return both(ctx, tx, fmt.Sprintf("delete from %%s where id in (%d, %d)", base+7, base+90), "t", "control")
			},
		}
		for _, st := range steps {
			if err := pgx.BeginFunc(ctx, e.pool, st); err != nil {
				return err
			}
		}
		// A transaction rolled back as a whole.
		tx, err := e.pool.Begin(ctx)
		if err != nil {
			return err
		}
		if err := both(ctx, tx, "delete from %s where id < 1000", "t"); err != nil {
			return err
		}
		return tx.Rollback(ctx)
	}
	var scriptErr atomic.Value
	var batches atomic.Int64
	o := logicalOpts("alter table t alter column id type bigint")
	o.BatchSize = 200
	o.ShowQueries = func(sql string) {
		switch {
		case strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 3:
			// during the copy: after the slot, before most batches
			if err := script(100); err != nil {
				scriptErr.Store(err)
			}
		case strings.Contains(sql, "ANALYZE "):
			// while streaming
			if err := script(2000); err != nil {
				scriptErr.Store(err)
			}
			err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
				return both(ctx, tx, "insert into %s (id, v, n) select g, 'late', g from generate_series(400001, 400100) g", "t", "control")
			})
			if err != nil {
				scriptErr.Store(err)
			}
		}
	}
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if err, _ := scriptErr.Load().(error); err != nil {
		t.Fatal(err)
	}
	e.assertSame("t", "control", "id::bigint, v, n, big, g")
	if got := e.str("select count(*) from t where big like '%changed'"); got != "4" {
		t.Fatalf("changed TOAST values: %s", got)
	}
	e.assertNoLeftovers("t")
	e.assertNoCapture()

	// A TRUNCATE while streaming empties the shadow; later rows survive.
	e.exec("create table tr (id int primary key, v text); insert into tr select g, 'before' from generate_series(1, 3000) g")
	o = logicalOpts("alter table tr alter column id type bigint")
	o.ShowQueries = func(sql string) {
		if strings.Contains(sql, "ANALYZE ") {
			if _, err := e.pool.Exec(ctx, "truncate tr; insert into tr select g, 'after' from generate_series(10, 20) g"); err != nil {
				scriptErr.Store(err)
			}
		}
	}
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select count(*) || ' ' || min(v) from tr"); got != "11 after" {
		t.Fatalf("after truncate: %s", got)
	}
	e.assertNoCapture()
}

// A transaction that wrote before the slot delays the slot (and is in the
// snapshot); one that began before the slot but writes and commits during
// the copy is in the stream. Neither is missed.
func TestLogicalTransactionsAroundTheSlot(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	e.seed("orders", "control", 10000)
	ctx := context.Background()

	// Wrote before the slot: the slot waits for it.
	early, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer early.Rollback(ctx) //nolint:errcheck
	if err := both(ctx, early, "update %s set v = 'early', id = id + 50000 where id between 100 and 150", "orders", "control"); err != nil {
		t.Fatal(err)
	}
	// Began (snapshot taken, no write) before the slot.
	late, err := e.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		t.Fatal(err)
	}
	defer late.Rollback(ctx) //nolint:errcheck
	var n int
	if err := late.QueryRow(ctx, "select count(*) from orders").Scan(&n); err != nil {
		t.Fatal(err)
	}

	var hookErr atomic.Value
	ev := &events{}
	waited := make(chan struct{})
	var once sync.Once
	ev.on = func(msg string) {
		if strings.Contains(msg, "waiting for open write transactions") {
			once.Do(func() { close(waited) })
		}
	}
	var batches atomic.Int64
	o := logicalOpts("alter table orders alter column id type bigint")
	o.BatchSize = 200
	o.CopyDataJobs = 1
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 10 {
			err := both(ctx, late, "update %s set v = 'late', id = id + 70000 where id between 9000 and 9050", "orders", "control")
			if err == nil {
				err = both(ctx, late, "delete from %s where id between 200 and 220", "orders", "control")
			}
			if err == nil {
				err = late.Commit(ctx)
			}
			if err != nil {
				hookErr.Store(err)
			}
		}
	}
	done := make(chan error, 1)
	go func() { done <- replicate.Run(ctx, e.pool, o, ev, nil) }()
	select {
	case <-waited:
	case err := <-done:
		t.Fatalf("the run did not wait for the open write transaction: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no wait reported")
	}
	if err := early.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err, _ := hookErr.Load().(error); err != nil {
		t.Fatal(err)
	}
	if got := e.str("select count(*) from orders where v = 'late'"); got != "51" {
		t.Fatalf("late rows: %s", got)
	}
	if got := e.str("select count(*) from orders where v = 'early'"); got != "51" {
		t.Fatalf("early rows: %s", got)
	}
	e.assertSame("orders", "control", "id::bigint, v, n")
	e.assertNoCapture()
}

// Logical capture is refused before anything is created when the server or
// the engine's role or the table cannot support it.
func TestLogicalRefusals(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	check := func(t *testing.T, e *env, table string, o replicate.Options, want string) {
		t.Helper()
		err := e.run(o)
		if err == nil || !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), want) {
			t.Fatalf("want refusal with %q, got %v", want, err)
		}
		e.assertNoLeftovers(table)
		e.assertNoCapture()
	}
	t.Run("wal_level=replica", func(t *testing.T) {
		c, err := testpg.Start(map[string]string{"wal_level": "replica", "max_wal_senders": "10"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Stop)
		e := &env{t: t, url: c.URL, pool: testpg.Pool(t, c.URL)}
		e.exec("create table t (id int primary key, a int); insert into t select g, g from generate_series(1, 100) g")
		check(t, e, "t", logicalOpts("alter table t alter column a type bigint"), "wal_level")
	})
	t.Run("no REPLICATION", func(t *testing.T) {
		e := newEnv(t)
		role := fmt.Sprintf("tat_norepl_%d", time.Now().UnixNano())
		e.exec(fmt.Sprintf(`create role %s login; grant create on schema public to %[1]s`, role))
		t.Cleanup(func() {
			e.pool.Exec(context.Background(), fmt.Sprintf("drop owned by %s; drop role %[1]s", role)) //nolint:errcheck
		})
		u, _ := url.Parse(e.url)
		u.User = url.User(role)
		re := &env{t: t, url: u.String(), pool: testpg.Pool(t, u.String())}
		re.exec("create table t (id int primary key, a int); insert into t select g, g from generate_series(1, 100) g")
		check(t, re, "t", logicalOpts("alter table t alter column a type bigint"), "REPLICATION")
		// The same role may still use trigger capture.
		if err := re.run(opts("alter table t alter column a type bigint")); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("replica identity", func(t *testing.T) {
		e := newEnv(t)
		e.exec(`create table t (id int primary key, a int); alter table t replica identity nothing;
			create table u (id int not null, a int); create unique index u_id on u (id);
			create table ul (id int primary key, a int); alter table ul set unlogged`)
		check(t, e, "t", logicalOpts("alter table t alter column a type bigint"), "replica identity")
		check(t, e, "u", logicalOpts("alter table u alter column a type bigint"), "replica identity")
		check(t, e, "ul", logicalOpts("alter table ul alter column a type bigint"), "not WAL-logged")
		// With the identity on the key, it runs.
		e.exec("alter table u replica identity using index u_id; insert into u select g, g from generate_series(1, 100) g")
		if err := e.run(logicalOpts("alter table u alter column a type bigint")); err != nil {
			t.Fatal(err)
		}
		e.assertNoCapture()
	})
	t.Run("replica identity index beside the primary key", func(t *testing.T) {
		// The stream carries the identity's columns (code), not the primary
		// key's: code is the key, under a writer that changes both.
		e := newEnv(t)
		e.exec(`create table t (id int primary key, code text not null unique, a int);
			alter table t replica identity using index t_code_key;
			create table c (id int primary key, code text not null unique, a int);
			insert into t select g, 'c' || g, g from generate_series(1, 3000) g; insert into c select * from t`)
		stop := make(chan struct{})
		done := make(chan error, 1)
		go func() {
			i := 0
			for {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				i++
				err := pgx.BeginFunc(context.Background(), e.pool, func(tx pgx.Tx) error {
					for _, tbl := range []string{"t", "c"} {
						if _, err := tx.Exec(context.Background(), "update "+tbl+" set a = a + 1, code = code || 'x' where id = $1", i%3000+1); err != nil {
							return err
						}
						if _, err := tx.Exec(context.Background(), "delete from "+tbl+" where id = $1", 3000-i%1500); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					done <- err
					return
				}
			}
		}()
		err := e.run(logicalOpts("alter table t alter column a type bigint"))
		close(stop)
		if werr := <-done; werr != nil {
			t.Fatal(werr)
		}
		if err != nil {
			t.Fatal(err)
		}
		e.assertSame("t", "c", "id, code, a")
		e.assertNoCapture()
	})
}

// An interrupted run (crash mid-copy, mid-catch-up) leaves no slot and no
// publication; a continued run starts over and finishes.
func TestLogicalInterruptedRun(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	cases := []struct {
		name   string
		prefix string
		nth    int64
	}{
		{"mid-copy", "WITH src AS", 30},
		{"mid-catchup", "DELETE FROM", 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.seed("orders", "control", 15000)
			w := e.startWriter(2, "orders", "control", 17000)
			o := logicalOpts("alter table orders alter column id type bigint")
			o.BatchSize = 200
			o.CopyDataJobs = 1
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var hits atomic.Int64
			o.ShowQueries = func(sql string) {
				if strings.HasPrefix(sql, tc.prefix) && hits.Add(1) == tc.nth {
					cancel()
				}
			}
			err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil)
			if !errors.Is(err, context.Canceled) {
				w.Stop(t)
				t.Fatalf("want interruption, got %v", err)
			}
			e.assertNoCapture()
			o.ShowQueries = nil
			o.Continue = true
			ev := &events{}
			err = replicate.Run(context.Background(), e.pool, o, ev, nil)
			w.Stop(t)
			if err != nil {
				t.Fatal(err)
			}
			if !ev.has("starting over") {
				t.Fatal("the continued run did not start over")
			}
			e.assertSame("orders", "control", "id::bigint, v, n")
			e.assertNoLeftovers("orders")
			e.assertNoCapture()
		})
	}
}

// Cleanup drops what a crashed logical run leaves (its publication, an
// inactive slot), and a FOR ALL TABLES publication is warned about.
func TestLogicalLeftoversAndAllTables(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	e.seed("orders", "control", 2000)
	slot := e.str(`select 'tat_' || d.oid || '_' || 'orders'::regclass::oid from pg_database d where datname = current_database()`)
	e.exec(`create publication orders__tat_pub for table orders`)
	e.exec(`select pg_create_logical_replication_slot($1, 'pgoutput')`, slot)
	if err := replicate.Cleanup(context.Background(), e.pool, "orders"); err != nil {
		t.Fatal(err)
	}
	e.assertNoCapture()

	e.exec("create publication tat_test_all for all tables")
	t.Cleanup(func() { e.pool.Exec(context.Background(), "drop publication if exists tat_test_all") }) //nolint:errcheck
	ev := &events{}
	o := logicalOpts("alter table orders alter column n type bigint")
	var hookErr error
	o.ShowQueries = func(sql string) {
		if strings.Contains(sql, "ANALYZE ") {
			// updates and deletes for the apply (the shadow has its key by now)
			hookErr = pgx.BeginFunc(context.Background(), e.pool, func(tx pgx.Tx) error {
				return both(context.Background(), tx, "update %s set n = n + 1, id = id + 100000 where id < 50; delete from %[1]s where id between 50 and 60", "orders", "control")
			})
		}
	}
	if err := replicate.Run(context.Background(), e.pool, o, ev, nil); err != nil {
		t.Fatal(err)
	}
	if !ev.has("tat_test_all") {
		t.Fatalf("no warning about the FOR ALL TABLES publication: %v", ev.msgs)
	}
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	e.assertSame("orders", "control", "id, v, n::bigint")
	if n := e.str(`select count(*) from pg_replication_slots where database = current_database()`); n != "0" {
		t.Fatalf("%s slots remain", n)
	}
}

// A table owned by another role: the data work runs as that owner (SET
// ROLE pool), the publication and the slot belong to the engine's role.
func TestLogicalTableOfAnotherOwner(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	role := fmt.Sprintf("tat_owner_%d", time.Now().UnixNano())
	e.exec(fmt.Sprintf(`create role %s; grant create on schema public to %[1]s`, role))
	t.Cleanup(func() {
		e.pool.Exec(context.Background(), fmt.Sprintf("drop owned by %s; drop role %[1]s", role)) //nolint:errcheck
	})
	e.seed("orders", "control", 5000)
	e.exec(fmt.Sprintf("alter table orders owner to %s", role))
	w := e.startWriter(2, "orders", "control", 6000)
	err := e.run(logicalOpts("alter table orders alter column id type bigint"))
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	if got := e.str("select pg_get_userbyid(relowner) from pg_class where oid = 'orders'::regclass"); got != role {
		t.Fatalf("owner is %s", got)
	}
	e.assertSame("orders", "control", "id::bigint, v, n")
	e.assertNoLeftovers("orders")
	e.assertNoCapture()
}
