package replicate_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

// env is one test's database.
type env struct {
	t    *testing.T
	url  string
	pool *pgxpool.Pool
}

func newEnv(t *testing.T) *env {
	t.Helper()
	url := testpg.NewDB(t)
	return &env{t: t, url: url, pool: testpg.Pool(t, url)}
}

// newClusterEnv starts a cluster of the test's own (settings over
// testpg's defaults), stopped when the test ends, and a database on it.
func newClusterEnv(t *testing.T, settings map[string]string) (*env, *testpg.Cluster) {
	t.Helper()
	c, err := testpg.Start(settings)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	url := testpg.NewDBOn(t, c.URL)
	return &env{t: t, url: url, pool: testpg.Pool(t, url)}, c
}

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.pool.Exec(context.Background(), sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

func (e *env) scalar(sql string, args ...any) any {
	e.t.Helper()
	var v any
	if err := e.pool.QueryRow(context.Background(), sql, args...).Scan(&v); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
	return v
}

func (e *env) str(sql string, args ...any) string {
	return fmt.Sprint(e.scalar(sql, args...))
}

// writer hammers table and, in the same transaction, its control copy with
// inserts, updates, deletes and key updates, until stopped.
type writer struct {
	stop  chan struct{}
	done  sync.WaitGroup
	ops   atomic.Int64
	err   atomic.Value
	table string
}

// startWriter runs n concurrent writers. table has columns (id int key, v text, n int);
// control has the same columns and is never migrated.
func (e *env) startWriter(n int, table, control string, maxID int) *writer {
	w := &writer{stop: make(chan struct{}), table: table}
	for i := 0; i < n; i++ {
		w.done.Add(1)
		go func(seed uint64) {
			defer w.done.Done()
			r := rand.New(rand.NewPCG(seed, 42))
			ctx := context.Background()
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				id := r.IntN(maxID) + 1
				var stmts []string
				switch r.IntN(10) {
				case 0, 1, 2:
					stmts = []string{"insert into %s (id, v, n) values ($1, md5($1::text), $1) on conflict (id) do update set n = excluded.n + 1"}
				case 3, 4, 5:
					stmts = []string{"update %s set n = n + 1, v = v || 'x' where id = $1"}
				case 6, 7:
					stmts = []string{"delete from %s where id = $1"}
				case 8:
					stmts = []string{"update %s set id = id + 1000000 where id = $1 and not exists (select 1 from %[1]s where id = $1 + 1000000)"}
				case 9:
					stmts = []string{"update %s set v = repeat(md5(v), 200) where id = $1"}
				}
				tx, err := e.pool.Begin(ctx)
				if err != nil {
					w.err.Store(err)
					return
				}
				ok := true
				for _, s := range stmts {
					for _, tb := range []string{table, control} {
						if _, err := tx.Exec(ctx, fmt.Sprintf(s, tb), id); err != nil {
							ok = false
							break
						}
					}
				}
				if ok {
					if err := tx.Commit(ctx); err == nil {
						w.ops.Add(1)
					}
				} else {
					_ = tx.Rollback(ctx)
				}
				time.Sleep(time.Duration(r.IntN(500)) * time.Microsecond)
			}
		}(uint64(i + 1))
	}
	return w
}

func (w *writer) Stop(t *testing.T) {
	close(w.stop)
	w.done.Wait()
	if err, _ := w.err.Load().(error); err != nil {
		t.Fatalf("writer: %v", err)
	}
	if w.ops.Load() == 0 {
		t.Fatalf("writer on %s committed nothing: the test proves nothing", w.table)
	}
	t.Logf("writer committed %d transactions", w.ops.Load())
}

// seed creates table and control with rows rows each.
func (e *env) seed(table, control string, rows int) {
	for _, tb := range []string{table, control} {
		e.exec(fmt.Sprintf(`create table %s (id int primary key, v text, n int);
			insert into %[1]s select g, md5(g::text), g from generate_series(1, %d) g`, tb, rows))
	}
}

// assertSame compares table and control row by row, through text.
func (e *env) assertSame(table, control, cols string) {
	e.t.Helper()
	diff := e.str(fmt.Sprintf(`select count(*) from (
		(select %[3]s from %[1]s except all select %[3]s from %[2]s)
		union all
		(select %[3]s from %[2]s except all select %[3]s from %[1]s)) d`, table, control, cols))
	if diff != "0" {
		rows := e.str(fmt.Sprintf(`select coalesce(string_agg(side || ' ' || r, E'\n'), '') from (
			(select 'table', a::text from (select %[3]s from %[1]s except all select %[3]s from %[2]s) a)
			union all
			(select 'control', b::text from (select %[3]s from %[2]s except all select %[3]s from %[1]s) b) limit 10) d(side, r)`, table, control, cols))
		e.t.Fatalf("%s differs from %s in %s rows:\n%s", table, control, diff, rows)
	}
	n := e.str("select count(*) from " + table)
	if n == "0" {
		e.t.Fatalf("%s is empty", table)
	}
}

func (e *env) assertNoLeftovers(table string) {
	e.t.Helper()
	left := e.str(`select count(*) from pg_class where relname like $1 || '\_\_tat\_%'`, table)
	if left != "0" {
		e.t.Fatalf("%s leftovers remain", left)
	}
	if n := e.str(`select count(*) from pg_trigger where tgname like '%tat%'`); n != "0" {
		e.t.Fatalf("capture triggers remain: %s", n)
	}
	if n := e.str(`select count(*) from pg_proc where proname like '%\_\_tat\_%'`); n != "0" {
		e.t.Fatalf("capture functions remain: %s", n)
	}
}

func opts(cmd string) replicate.Options {
	o := replicate.DefaultOptions()
	o.Command = cmd
	o.BatchSize = 500
	o.CopyDataJobs = 2
	o.MinDeltaRows = 10
	o.TimeBetweenLocks = 50 * time.Millisecond
	return o
}

func (e *env) run(o replicate.Options) error {
	return replicate.Run(context.Background(), e.pool, o, replicate.NopReporter{}, nil)
}

func runWith(e *env, o replicate.Options, rep replicate.Reporter) error {
	return replicate.Run(context.Background(), e.pool, o, rep, nil)
}

func sprintf(format string, table string) string { return fmt.Sprintf(format, table) }
