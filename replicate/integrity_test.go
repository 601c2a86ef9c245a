package replicate_test

// Data-integrity cases (issue 7), each run for both capture methods: the
// migrated table must equal a control table that received the same writes
// in the same transactions, and a job that cannot finish must leave the
// original intact and nothing behind.

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

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// captures are the capture methods every integrity case runs under.
var captures = []string{replicate.CaptureTrigger, replicate.CaptureLogical}

// forEachCapture runs fn as one parallel subtest per capture method.
func forEachCapture(t *testing.T, fn func(t *testing.T, capture string)) {
	t.Helper()
	for _, c := range captures {
		t.Run(c, func(t *testing.T) {
			t.Parallel()
			if c == replicate.CaptureLogical {
				needsLogical(t)
			}
			fn(t, c)
		})
	}
}

// captureOpts is opts(cmd) with the given capture method.
func captureOpts(capture, cmd string) replicate.Options {
	o := opts(cmd)
	o.Capture = capture
	return o
}

// hookErrs collects errors of statements run from engine hooks (they run on
// the engine's goroutines, where t.Fatal must not be called).
type hookErrs struct {
	mu   sync.Mutex
	errs []error
}

func (h *hookErrs) add(err error) {
	if err != nil {
		h.mu.Lock()
		h.errs = append(h.errs, err)
		h.mu.Unlock()
	}
}

func (h *hookErrs) check(t *testing.T) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.errs) > 0 {
		t.Fatalf("hook statements failed: %v", errors.Join(h.errs...))
	}
}

// onBoth runs stmts in one transaction; a statement with a %s runs once per
// table (the migrated one and its control), the others once.
func (e *env) onBoth(tables []string, stmts ...string) error {
	ctx := context.Background()
	return pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
		for _, s := range stmts {
			if strings.Contains(s, "%") {
				if err := both(ctx, tx, s, tables...); err != nil {
					return err
				}
			} else if _, err := tx.Exec(ctx, s); err != nil {
				return fmt.Errorf("%s: %w", s, err)
			}
		}
		return nil
	})
}

// stages is a ShowQueries hook: batch[n] runs just before the n-th copy
// batch (all ranges counted), analyze just before the shadow's ANALYZE,
// that is after the copy and the index builds, with logical capture
// streaming, right before the catch-up. Both run synchronously, with no
// transaction of the engine open.
type stages struct {
	batch   map[int64]func()
	analyze func()
	n       atomic.Int64 // copy batches seen
	ran     atomic.Int64 // hooks run
}

func atStages(batch map[int64]func(), analyze func()) *stages {
	return &stages{batch: batch, analyze: analyze}
}

func (s *stages) show(sql string) {
	switch {
	case strings.HasPrefix(sql, "WITH src AS"):
		if f := s.batch[s.n.Add(1)]; f != nil {
			f()
			s.ran.Add(1)
		}
	case strings.HasPrefix(sql, "ANALYZE ") && s.analyze != nil:
		s.analyze()
		s.ran.Add(1)
	}
}

// check fails the test unless every hook ran (once): a copy that takes
// fewer batches than planned would silently skip the cases.
func (s *stages) check(t *testing.T) {
	t.Helper()
	want := int64(len(s.batch))
	if s.analyze != nil {
		want++
	}
	if got := s.ran.Load(); got != want {
		t.Fatalf("%d of %d hooks ran (%d copy batches): the test did not test what it should", got, want, s.n.Load())
	}
}

// stmtGen returns one DML statement (with %[1]s for the table) and its
// arguments; a writer runs it on the table and on the control in one
// transaction.
type stmtGen func(r *rand.Rand) (string, []any)

// startDML runs n writers of random statements from gens until stopped,
// pausing up to pause between transactions (0: flat out).
func (e *env) startDML(n int, tables []string, pause time.Duration, gens ...stmtGen) *writer {
	w := &writer{stop: make(chan struct{}), table: tables[0]}
	for i := 0; i < n; i++ {
		w.done.Add(1)
		go func(seed uint64) {
			defer w.done.Done()
			r := rand.New(rand.NewPCG(seed, 7))
			ctx := context.Background()
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				sql, args := gens[r.IntN(len(gens))](r)
				tx, err := e.pool.Begin(ctx)
				if err != nil {
					w.err.Store(err)
					return
				}
				ok := true
				for _, tb := range tables {
					if _, err := tx.Exec(ctx, fmt.Sprintf(sql, tb), args...); err != nil {
						ok = false
						break
					}
				}
				if ok && tx.Commit(ctx) == nil {
					w.ops.Add(1)
				} else {
					_ = tx.Rollback(ctx)
				}
				if pause > 0 {
					time.Sleep(time.Duration(r.Int64N(int64(pause))))
				}
			}
		}(uint64(i + 1))
	}
	return w
}

func (e *env) colType(table, col string) string {
	e.t.Helper()
	return e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = $1::regclass and attname = $2", table, col)
}

// assertNothingLeft: no shadow, delta or state table of any table (also
// when a long name was truncated), no capture trigger or function, no
// replication slot, no publication.
func (e *env) assertNothingLeft(table string) {
	e.t.Helper()
	e.assertNoLeftovers(table)
	if n := e.str(`select count(*) from pg_class where relname like '%\_\_tat\_%'`); n != "0" {
		e.t.Fatalf("%s pg_tat relations remain", n)
	}
	e.assertNoCapture()
}

// 1. Key updates during the copy and the catch-up: moves out of and into
// ranges already copied, chains (a→b→c, in one and in several
// transactions), a swap of two keys, a key moved away and back, a deleted
// key reused, a shifted run of keys — under a concurrent writer.
func TestIntegrityKeyUpdates(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.seed("orders", "control", 4000)
		// The writer keeps to ids 1..2000 (and moves keys to +1000000); the
		// scripted key updates below use 2001..4000 and 9000..9100.
		w := e.startWriter(2, "orders", "control", 2000)
		var errs hookErrs
		tables := []string{"orders", "control"}
		do := func(stmts ...string) { errs.add(e.onBoth(tables, stmts...)) }
		o := captureOpts(capture, "alter table orders alter column id type bigint")
		o.BatchSize = 200
		st := atStages(map[int64]func(){
			2: func() { do("update %s set id = id + 100000 where id <= 5") },
			4: func() {
				do("update %s set id = 9030 where id = 2003") // 3 → 30 → 40, two transactions
				do("update %s set id = 9040 where id = 9030")
			},
			6: func() {
				do("update %s set id = 9050 where id = 2010", "update %s set id = 9060 where id = 9050", // chain in one transaction
					"delete from %s where id = 2011", "update %s set id = 2011 where id = 2012") // a deleted key reused
			},
			8: func() {
				do("update %s set id = -1 where id = 2020", "update %s set id = 2020 where id = 2021", "update %s set id = 2021 where id = -1") // swap
			},
			10: func() {
				do("delete from %s where id in (3990, 2041)",
					"update %s set id = 3990 where id = 2040", // into a range copied last
					"update %s set id = 2041 where id = 3980", // into a range copied first
					"update %s set id = 9070 where id = 2030")
			},
		}, func() {
			do("update %s set id = 2030 where id = 9070", // moved back to its old key
				"update %s set id = id + 100000 where id between 2100 and 2105")
			do("delete from %s where id = 3011", "update %s set id = id + 200000 where id between 3000 and 3010",
				"update %s set id = id - 199999 where id between 203000 and 203010") // 3000..3010 → 3001..3011
			do("update %s set id = 9080 where id = 100004", "update %s set id = 9090 where id = 9080")
		})
		o.ShowQueries = st.show
		err := e.run(o)
		w.Stop(t)
		if err != nil {
			t.Fatal(err)
		}
		errs.check(t)
		st.check(t)
		if got := e.colType("orders", "id"); got != "bigint" {
			t.Fatalf("id is %s", got)
		}
		e.assertSame("orders", "control", "id::bigint, v, n")
		if got := e.str("select count(*) from orders where id in (9040, 9060, 2011, 2020, 2021, 3990, 2041, 2030, 3000, 3011, 102100)"); got != "10" {
			t.Fatalf("moved keys present: %s of 10", got)
		}
		if got := e.str("select count(*) from orders where id in (9030, 9050, 9070, 9080, 2003, 2010, 2012, 2040, 3980, 2100)"); got != "0" {
			t.Fatalf("%s old keys came back", got)
		}
		if got := e.str("select v = md5('2021') from orders where id = 2020"); got != "true" {
			t.Fatal("swapped keys lost their rows")
		}
		e.assertNothingLeft("orders")
	})
}

// 2. TRUNCATE during the copy and during the catch-up, with rows (and
// reused keys) written after it: the TRUNCATE is replayed, old rows never
// come back.
func TestIntegrityTruncate(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.seed("orders", "control", 3000)
		w := e.startWriter(2, "orders", "control", 3000)
		var errs hookErrs
		tables := []string{"orders", "control"}
		o := captureOpts(capture, "alter table orders alter column id type bigint")
		o.BatchSize = 200
		st := atStages(map[int64]func(){
			3: func() {
				errs.add(e.onBoth(tables, "truncate %s", "insert into %s select g, 'after1', g from generate_series(1, 800) g"))
			},
		}, func() {
			errs.add(e.onBoth(tables, "truncate %s", "insert into %s select g, 'after2', -g from generate_series(400, 600) g"))
			errs.add(e.onBoth(tables, "update %s set v = 'after3' where id between 450 and 460"))
		})
		o.ShowQueries = st.show
		err := e.run(o)
		w.Stop(t)
		if err != nil {
			t.Fatal(err)
		}
		errs.check(t)
		st.check(t)
		e.assertSame("orders", "control", "id::bigint, v, n")
		if got := e.str("select count(*) from orders where v like 'after1%'"); got != "0" {
			t.Fatalf("%s rows from before the TRUNCATE came back", got)
		}
		e.assertNothingLeft("orders")
	})
}

// TRUNCATE between a run stopped before the switch and its continuation.
func TestIntegrityTruncateBetweenRuns(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.seed("orders", "control", 3000)
		o := captureOpts(capture, "alter table orders alter column id type bigint")
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
		e.assertNothingLeft("orders")
	})
}

// 3. DDL on the original while the job runs (injected right before the
// catch-up, under a writer): the application's writes keep working, and the
// job fails with ErrConcurrentDDL instead of swapping in a table of a stale
// shape; nothing is left behind.
func TestIntegrityConcurrentDDL(t *testing.T) {
	cases := []struct {
		name, ddl string
		cols      string // columns compared with the control afterwards
		writes    bool   // the writer's statements still work after the DDL
	}{
		{"add column", "alter table orders add column extra int default 5", "id, v, n", true},
		{"create index concurrently", "create index concurrently orders_n_idx on orders (n)", "id, v, n", true},
		{"set not null", "alter table orders alter column v set not null", "id, v, n", true},
		{"another alter (rewrite)", "alter table orders alter column n type bigint", "id, v, n::int", true},
		{"rename column", "alter table orders rename column v to w", "id, n", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			forEachCapture(t, func(t *testing.T, capture string) {
				e := newEnv(t)
				e.seed("orders", "control", 2000)
				w := e.startWriter(2, "orders", "control", 2500)
				var errs hookErrs
				var opsAtDDL atomic.Int64
				o := captureOpts(capture, "alter table orders alter column id type bigint")
				st := atStages(nil, func() {
					_, err := e.pool.Exec(context.Background(), tc.ddl)
					errs.add(err)
					opsAtDDL.Store(w.ops.Load())
				})
				o.ShowQueries = st.show
				err := e.run(o)
				time.Sleep(200 * time.Millisecond)
				opsAfter := w.ops.Load()
				w.Stop(t)
				errs.check(t)
				st.check(t)
				if opsAtDDL.Load() == 0 {
					t.Fatal("the DDL was never run")
				}
				if !errors.Is(err, replicate.ErrConcurrentDDL) {
					t.Fatalf("want ErrConcurrentDDL, got %v", err)
				}
				if tc.writes && opsAfter <= opsAtDDL.Load() {
					t.Fatalf("no write committed after the DDL (%d before, %d after)", opsAtDDL.Load(), opsAfter)
				}
				if got := e.colType("orders", "id"); got != "integer" {
					t.Fatalf("switched anyway: id is %s", got)
				}
				e.assertNothingLeft("orders")
				if tc.writes {
					e.assertSame("orders", "control", tc.cols)
				}
				e.exec("delete from orders where id = 1") // still writable
			})
		})
	}
	// Between a run stopped before the switch and its continuation (trigger
	// capture only: a continued logical run starts over, and so sees the
	// new shape from its start).
	t.Run("between runs", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		e.seed("orders", "control", 2000)
		o := opts("alter table orders alter column id type bigint")
		o.StopBeforeSwitch = true
		if err := e.run(o); err != nil {
			t.Fatal(err)
		}
		e.exec("alter table orders add column extra int")
		e.exec("insert into orders (id, v, n) values (100000, 'x', 1)")
		o.StopBeforeSwitch, o.Continue = false, true
		if err := e.run(o); !errors.Is(err, replicate.ErrConcurrentDDL) {
			t.Fatalf("want ErrConcurrentDDL, got %v", err)
		}
		e.assertNothingLeft("orders")
		if got := e.colType("orders", "id"); got != "integer" {
			t.Fatalf("switched anyway: id is %s", got)
		}
	})
}

// 4. Transaction shapes: a transaction opened before capture started that
// writes and commits during the copy; one that wrote before capture
// started (capture waits for it); savepoints released, rolled back and
// nested; a transaction rolled back as a whole; INSERT ... ON CONFLICT (do
// update, do nothing, a key change through do update); and, all along, swaps
// of a DEFERRABLE unique column with the constraint deferred (transient
// duplicates inside the transaction). Small batches make the catch-up apply
// the delta in slices that cut through such transactions.
func TestIntegrityTransactions(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		tables := []string{"t", "control"}
		for _, tb := range tables {
			e.exec(fmt.Sprintf(`create table %s (id int primary key, v text, n int, u int not null,
				constraint %[1]s_u unique (u) deferrable initially immediate);
				insert into %[1]s select g, md5(g::text), g, g from generate_series(1, 3000) g`, tb))
		}
		ctx := context.Background()
		var errs hookErrs
		do := func(stmts ...string) { errs.add(e.onBoth(tables, stmts...)) }

		// Wrote before capture started: trigger capture's CREATE TRIGGER
		// and logical capture's slot wait for it; it commits once they do.
		early, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer early.Rollback(ctx) //nolint:errcheck
		if err := both(ctx, early, "update %s set v = 'early', id = id + 50000 where id between 2900 and 2910", tables...); err != nil {
			t.Fatal(err)
		}
		// Opened before capture started (a snapshot, a lock), writes later.
		pre, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer pre.Rollback(ctx) //nolint:errcheck
		if _, err := pre.Exec(ctx, "select count(*) from t"); err != nil {
			t.Fatal(err)
		}

		// The swapper: swaps u between two rows of 2000..2899, deferred.
		stop := make(chan struct{})
		var stopOnce sync.Once
		stopSwapper := func() { stopOnce.Do(func() { close(stop) }) }
		var swaps atomic.Int64
		var swg sync.WaitGroup
		swg.Add(1)
		go func() {
			defer swg.Done()
			r := rand.New(rand.NewPCG(1, 2))
			for {
				select {
				case <-stop:
					return
				default:
				}
				a := 2000 + r.IntN(450)
				b := 2450 + r.IntN(450)
				err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "set constraints all deferred"); err != nil {
						return err
					}
					var ua, ub int
					if err := tx.QueryRow(ctx, "select (select u from t where id = $1), (select u from t where id = $2)", a, b).Scan(&ua, &ub); err != nil {
						return err
					}
					for _, tb := range tables {
						if _, err := tx.Exec(ctx, "update "+tb+" set u = $2 where id = $1", a, ub); err != nil {
							return err
						}
						// u = ub twice in the table until the next statement
						if _, err := tx.Exec(ctx, "update "+tb+" set u = $2, n = n + 1 where id = $1", b, ua); err != nil {
							return err
						}
					}
					return nil
				})
				if err != nil {
					errs.add(fmt.Errorf("swap: %w", err))
					return
				}
				swaps.Add(1)
				time.Sleep(time.Millisecond)
			}
		}()

		savepoints := func(base int) {
			ctx := context.Background()
			errs.add(pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
				for _, s := range []string{
					fmt.Sprintf("insert into %%s values (%d, 'sp', 1, %d)", 200000+base, 200000+base),
					"savepoint a",
					fmt.Sprintf("update %%s set v = 'released' where id = %d", base+2),
					"release savepoint a",
					"savepoint b",
					fmt.Sprintf("delete from %%s where id = %d", base+3),
					fmt.Sprintf("update %%s set v = 'rolled back', id = id + 900000 where id = %d", base+4),
					"savepoint b2",
					fmt.Sprintf("insert into %%s values (%d, 'nested', 1, %d)", 210000+base, 210000+base),
					"rollback to savepoint b",
					"savepoint c",
					fmt.Sprintf("update %%s set id = %d where id = %d", 300000+base, base+5),
					"savepoint d",
					fmt.Sprintf("delete from %%s where id = %d", base+6),
					"release savepoint d",
					fmt.Sprintf("update %%s set v = 'after release' where id = %d", 300000+base),
				} {
					if strings.Contains(s, "%s") {
						if err := both(ctx, tx, s, tables...); err != nil {
							return err
						}
					} else if _, err := tx.Exec(ctx, s); err != nil {
						return err
					}
				}
				return nil
			}))
			// Rolled back as a whole.
			tx, err := e.pool.Begin(ctx)
			if err == nil {
				err = both(ctx, tx, fmt.Sprintf("delete from %%s where id between %d and %d", base, base+100), tables...)
				_ = tx.Rollback(ctx)
			}
			errs.add(err)
		}
		upserts := func(base int) {
			do(
				fmt.Sprintf("insert into %%s as x values (%d, 'upsert new', 1, %d) on conflict (id) do update set v = 'wrong', n = x.n + 1", 400000+base, 400000+base),
				fmt.Sprintf("insert into %%s as x values (%d, 'upsert', 1, %d) on conflict (id) do update set v = excluded.v, n = x.n + 1", base+10, 410000+base),
				fmt.Sprintf("insert into %%s as x values (%d, 'ignored', 1, %d) on conflict (id) do nothing", base+11, 420000+base),
				fmt.Sprintf("insert into %%s as x values (%d, 'moved', 1, %d) on conflict (id) do update set id = excluded.id + 800000, v = excluded.v", base+12, 430000+base),
				fmt.Sprintf("insert into %%s as x select g, 'multi', g, g + 500000 from generate_series(%d, %d) g on conflict (id) do update set n = x.n * 2", base+15, base+25),
			)
		}

		ev := &events{}
		var once sync.Once
		ev.on = func(msg string) {
			if strings.Contains(msg, "lock attempt") || strings.Contains(msg, "waiting for open write transactions") {
				once.Do(func() { errs.add(early.Commit(ctx)) })
			}
		}
		o := captureOpts(capture, "alter table t alter column n type bigint")
		o.BatchSize = 20 // the catch-up applies slices of 200 delta rows
		o.CopyDataJobs = 1
		o.LockTimeout = 50 * time.Millisecond
		st := atStages(map[int64]func(){
			3: func() {
				errs.add(both(ctx, pre, "update %s set v = 'pre', id = id + 60000 where id between 100 and 120", tables...))
				errs.add(both(ctx, pre, "delete from %s where id between 130 and 135", tables...))
				errs.add(both(ctx, pre, "insert into %s select g, 'pre', g, g from generate_series(600000, 600010) g", tables...))
			},
			8:  func() { errs.add(pre.Commit(ctx)) },
			10: func() { savepoints(1000); upserts(1000) },
		}, func() {
			savepoints(1500)
			upserts(1500)
		})
		o.ShowQueries = st.show
		err = runWith(e, o, ev)
		time.Sleep(100 * time.Millisecond)
		stopSwapper()
		swg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		errs.check(t)
		st.check(t)
		t.Logf("%d swaps", swaps.Load())
		if swaps.Load() == 0 {
			t.Fatal("no swap committed: the test proves nothing")
		}
		if ev.has("collided") {
			// The conflict closure re-reads rows whose unique value moved.
			t.Errorf("a slice of the delta collided with the unique constraint\nevents:\n%s", strings.Join(ev.msgs, "\n"))
		}
		e.assertSame("t", "control", "id, v, n::int, u")
		for want, q := range map[string]string{
			"11":   "select count(*) from t where v = 'early'",
			"32":   "select count(*) from t where v = 'pre'",
			"2":    "select count(*) from t where v = 'after release'",
			"0":    "select count(*) from t where v in ('rolled back', 'nested', 'wrong', 'ignored')",
			"true": "select count(distinct u) = count(*) from t",
		} {
			if got := e.str(q); got != want {
				t.Errorf("%s: %s, want %s", q, got, want)
			}
		}
		e.assertNothingLeft("t")
	})
}

// 5. Writes faster than the catch-up: writers updating 50 rows per
// transaction flat out (from right before the catch-up),
// min_delta_rows 0 and a costly USING expression (the apply re-evaluates it
// per changed row): the catch-up cannot get to an empty delta. It grows its
// slice, then gives up after CatchupTimeout with ErrCatchupTimeout; the
// original is intact and nothing is left behind.
func TestIntegrityCatchupOutpaced(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.seed("orders", "control", 2000)
		tables := []string{"orders", "control"}
		o := captureOpts(capture, "alter table orders alter column n type bigint using n + length(repeat(v, 1000)) * 0")
		o.BatchSize = 100 // apply slices start at 1000 delta rows
		o.MinDeltaRows = 0
		o.CatchupTimeout = 2 * time.Second
		var w atomic.Pointer[writer]
		st := atStages(nil, func() {
			w.Store(e.startDML(4, tables, 0, func(r *rand.Rand) (string, []any) {
				return "update %s set n = n + 1 where id between $1 and $1 + 49", []any{1 + r.IntN(40)*50}
			}))
			time.Sleep(300 * time.Millisecond) // a backlog before the first round
		})
		o.ShowQueries = st.show
		ev := &events{}
		started := time.Now()
		err := runWith(e, o, ev)
		took := time.Since(started)
		if w.Load() == nil {
			t.Fatalf("the writers never started: %v", err)
		}
		w.Load().Stop(t)
		if !errors.Is(err, replicate.ErrCatchupTimeout) || !strings.Contains(err.Error(), "writes outpace the catch-up") {
			t.Fatalf("want ErrCatchupTimeout, got %v\nevents:\n%s", err, strings.Join(ev.msgs, "\n"))
		}
		t.Logf("gave up after %s: %v\nevents:\n%s", took.Round(time.Millisecond), err, strings.Join(ev.msgs, "\n"))
		if took > 60*time.Second {
			t.Fatalf("took %s to give up", took)
		}
		if !ev.has("applying up to") {
			t.Errorf("the apply slice never grew: %v", ev.msgs)
		}
		if got := e.colType("orders", "n"); got != "integer" {
			t.Fatalf("switched anyway: n is %s", got)
		}
		e.assertSame("orders", "control", "*")
		e.assertNothingLeft("orders")
	})
}

// 6. A long reader holds a lock on the table when the cut-over comes: no
// other session ever waits much longer than lock_timeout behind the
// cut-over's lock request, and the job switches once the reader is gone.
func TestIntegrityLongReaderAtCutover(t *testing.T) {
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.seed("orders", "control", 3000)
		ctx := context.Background()
		reader, err := e.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer reader.Rollback(ctx) //nolint:errcheck
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
		// The reader ends a while after the cut-over has noticed it (a
		// fixed delay would race with slot creation on a busy server).
		var noticed atomic.Int64
		release := make(chan struct{})
		var once sync.Once
		ev := &events{on: func(msg string) {
			if strings.Contains(msg, "hold long locks") || strings.Contains(msg, "timed out") {
				noticed.Add(1)
				once.Do(func() {
					go func() { time.Sleep(800 * time.Millisecond); close(release) }()
				})
			}
		}}
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-release:
			case <-time.After(60 * time.Second):
			}
			_ = reader.Commit(ctx)
		}()
		o := captureOpts(capture, "alter table orders alter column id type bigint")
		o.LockTimeout = 100 * time.Millisecond
		o.TimeBetweenLocks = 100 * time.Millisecond
		err = runWith(e, o, ev)
		once.Do(func() { close(release) })
		close(stop)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if noticed.Load() == 0 {
			t.Fatalf("the cut-over never noticed the reader: %v", ev.msgs)
		}
		// lock_timeout grows to at most 4x; allow scheduling noise on 2 cores.
		if w := maxWait.Load(); w > 4*100+400 {
			t.Fatalf("a query waited %d ms behind the cut-over", w)
		}
		t.Logf("longest wait of a concurrent query: %d ms", maxWait.Load())
		e.assertSame("orders", "control", "*")
		e.assertNothingLeft("orders")
	})
}

// 8. Awkward names everywhere, under a writer: a text key with quotes and
// backslashes, mixed-case and reserved-word schema, table, column and index
// names; and unicode names of exactly 63 bytes (schema, table — whose
// shadow names are cut inside a multi-byte character —, columns, index),
// with a two-column key of reserved words.
func TestIntegrityAwkwardNames(t *testing.T) {
	// pad63 pads s with c to exactly 63 bytes (c is one byte).
	pad63 := func(s string, c string) string { return s + strings.Repeat(c, 63-len(s)) }
	// "x" then 31 two-byte runes: the shadow names cut a rune in half.
	longTable := "x" + strings.Repeat("Ä", 31)
	longSchema := pad63("Schéma «Ünïcødé» ", "s")
	longCol := pad63("Größe ", "g")
	longIdx := pad63("Índex \"x\" ", "i")
	if len(longTable) != 63 || len(longSchema) != 63 || len(longCol) != 63 || len(longIdx) != 63 {
		t.Fatal("names are not 63 bytes")
	}
	qi := func(s string) string { return pgx.Identifier{s}.Sanitize() }
	cases := []struct {
		name, setup, table, control, cmd, cols, check string
		gens                                          []stmtGen
	}{
		{
			name: "quotes and reserved words",
			setup: `create schema "My Schema";
				create table "My Schema"."Order" ("Select" text primary key, "Value" int, "from" text);
				create index "Idx ""quoted""" on "My Schema"."Order" ("from", "Value");
				insert into "My Schema"."Order" select 'O''Brien "' || g || E'\\', g, 'x' from generate_series(1, 3000) g;
				create table "My Schema"."Order ""ctl""" as table "My Schema"."Order";
				alter table "My Schema"."Order ""ctl""" add primary key ("Select")`,
			table:   `"My Schema"."Order"`,
			control: `"My Schema"."Order ""ctl"""`,
			cmd:     `ALTER TABLE "My Schema"."Order" ALTER COLUMN "Value" TYPE bigint`,
			cols:    `"Select", "Value"::int, "from"`,
			check:   `select count(*) from pg_class where relname = 'Idx "quoted"'`,
			gens: []stmtGen{
				func(r *rand.Rand) (string, []any) {
					return `insert into %s ("Select", "Value", "from") values ($1, $2, 'ins') on conflict do nothing`,
						[]any{fmt.Sprintf(`O'Brien "%d\`, 1+r.IntN(3500)), r.IntN(1000)}
				},
				func(r *rand.Rand) (string, []any) {
					return `update %s set "Value" = "Value" + 1, "from" = "from" || '''' where "Select" = $1`, []any{fmt.Sprintf(`O'Brien "%d\`, 1+r.IntN(3500))}
				},
				func(r *rand.Rand) (string, []any) {
					return `delete from %s where "Select" = $1`, []any{fmt.Sprintf(`O'Brien "%d\`, 1+r.IntN(3500))}
				},
				func(r *rand.Rand) (string, []any) { // key update to another quoted value
					return `update %s set "Select" = "Select" || 'ü''"' where "Select" = $1 and length("Select") < 40`, []any{fmt.Sprintf(`O'Brien "%d\`, 1+r.IntN(3500))}
				},
			},
		},
		{
			name: "unicode names at 63 bytes",
			setup: fmt.Sprintf(`create schema %[1]s;
				create table %[1]s.%[2]s ("user" text, "Order" int, %[3]s int, "select" text, primary key ("user", "Order"));
				create index %[4]s on %[1]s.%[2]s ("select", %[3]s);
				insert into %[1]s.%[2]s select 'Ü''"' || (g %% 50) || E'\\', g, g, 'x' from generate_series(1, 3000) g;
				create table %[1]s.ctl as table %[1]s.%[2]s;
				alter table %[1]s.ctl add primary key ("user", "Order")`, qi(longSchema), qi(longTable), qi(longCol), qi(longIdx)),
			table:   qi(longSchema) + "." + qi(longTable),
			control: qi(longSchema) + ".ctl",
			cmd:     fmt.Sprintf(`alter table %s.%s alter column %s type bigint`, qi(longSchema), qi(longTable), qi(longCol)),
			cols:    fmt.Sprintf(`"user", "Order", %s::int, "select"`, qi(longCol)),
			check:   fmt.Sprintf(`select count(*) from pg_class where relname = '%s'`, strings.ReplaceAll(longIdx, "'", "''")),
			gens: []stmtGen{
				func(r *rand.Rand) (string, []any) {
					g := 1 + r.IntN(3500)
					return `insert into %s values ($1, $2, $2, 'ins') on conflict ("user", "Order") do update set "select" = excluded."select" || '"'`,
						[]any{fmt.Sprintf(`Ü'"%d\`, g%50), g}
				},
				func(r *rand.Rand) (string, []any) {
					g := 1 + r.IntN(3500)
					return `update %s set ` + qi(longCol) + ` = ` + qi(longCol) + ` + 1 where "user" = $1 and "Order" = $2`, []any{fmt.Sprintf(`Ü'"%d\`, g%50), g}
				},
				func(r *rand.Rand) (string, []any) {
					g := 1 + r.IntN(3500)
					return `delete from %s where "user" = $1 and "Order" = $2`, []any{fmt.Sprintf(`Ü'"%d\`, g%50), g}
				},
				func(r *rand.Rand) (string, []any) {
					g := 1 + r.IntN(3500)
					return `update %s set "Order" = "Order" + 100000, "user" = "user" || 'ß' where "user" = $1 and "Order" = $2`, []any{fmt.Sprintf(`Ü'"%d\`, g%50), g}
				},
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			forEachCapture(t, func(t *testing.T, capture string) {
				e := newEnv(t)
				e.exec(tc.setup)
				w := e.startDML(2, []string{tc.table, tc.control}, 500*time.Microsecond, tc.gens...)
				o := captureOpts(capture, tc.cmd)
				o.BatchSize = 200
				err := e.run(o)
				w.Stop(t)
				if err != nil {
					t.Fatal(err)
				}
				e.assertSame(tc.table, tc.control, tc.cols)
				if got := e.str(tc.check); got != "1" {
					t.Fatal("index name lost")
				}
				e.assertNothingLeft("")
			})
		})
	}
}
