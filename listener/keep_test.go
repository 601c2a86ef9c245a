package listener

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// keepWriter writes the same changes to table and control in one
// transaction until stopped.
func keepWriter(t *testing.T, url, table, control string) (stop func()) {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var ops atomic.Int64
	done := make(chan struct{})
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 7))
			for {
				select {
				case <-done:
					return
				default:
				}
				id := r.IntN(3000) + 1
				var s string
				switch r.IntN(3) {
				case 0:
					s = "insert into %s values ($1, md5($1::text), $1) on conflict (id) do update set n = excluded.n + 1"
				case 1:
					s = "update %s set n = n + 1, v = v || 'x' where id = $1"
				default:
					s = "delete from %s where id = $1"
				}
				err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
					for _, tb := range []string{table, control} {
						if _, err := tx.Exec(context.Background(), strings.ReplaceAll(s, "%s", tb), id); err != nil {
							return err
						}
					}
					return nil
				})
				if err == nil {
					ops.Add(1)
				}
				time.Sleep(time.Millisecond)
			}
		}(uint64(i + 1))
	}
	return func() {
		close(done)
		wg.Wait()
		pool.Close()
		if ops.Load() == 0 {
			t.Fatal("the writer committed nothing")
		}
	}
}

func keepTables(t *testing.T, c *pgx.Conn) {
	t.Helper()
	for _, tb := range []string{"k", "kctl"} {
		exec(t, c, "create table "+tb+" (id int primary key, v text, n int)")
		exec(t, c, "insert into "+tb+" select g, md5(g::text), g from generate_series(1, 2000) g")
	}
	exec(t, c, "create index k_v on k (v)")
	exec(t, c, "create view k_small as select id, n from k where n < 100")
	exec(t, c, "do $$ begin create role k_reader; exception when duplicate_object then null; end $$")
	exec(t, c, "grant select on k to k_reader")
}

func keepDigest(t *testing.T, c *pgx.Conn, table string) string {
	t.Helper()
	var d string
	if err := c.QueryRow(context.Background(), "select count(*) || ':' || coalesce(md5(string_agg(format('%s:%s:%s', id, v, n), ',' order by id)), '') from "+table).Scan(&d); err != nil {
		t.Fatal(err)
	}
	return d
}

type keptRow struct {
	state, kept, blocked string
	backlog              int64
	until                bool
}

func keptOf(t *testing.T, c *pgx.Conn, id int64) keptRow {
	t.Helper()
	var k keptRow
	if err := c.QueryRow(context.Background(), `select state, coalesce(kept_table, ''), coalesce(revert_blocked, ''), coalesce(revert_backlog, -1),
		kept_until is not null from tat.status where id = $1`, id).Scan(&k.state, &k.kept, &k.blocked, &k.backlog, &k.until); err != nil {
		t.Fatal(err)
	}
	return k
}

func waitKeptRow(t *testing.T, c *pgx.Conn, id int64, what string, cond func(keptRow) bool) keptRow {
	t.Helper()
	deadline := time.Now().Add(120 * time.Second)
	for {
		k := keptOf(t, c, id)
		if cond(k) {
			return k
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %d: %s not reached; %+v %+v", id, what, k, load(t, c, id))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// keep_old through SQL: the job switches under a writer and keeps the old
// table (state kept, tat.status shows it); tatd stops and starts again in
// the kept window; more writes; tat.revert brings the old table back with
// every write, its types, index, view and grant (state reverted).
func TestKeepOldRevertSQL(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	keepTables(t, c)
	stop := start(t, Config{DatabaseURL: url, PollInterval: time.Second, RunnerID: "keep-1"})
	stopWriter := keepWriter(t, url, "k", "kctl")
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table k alter column n type bigint', keep_old => interval '1 hour', min_delta_rows => 10)").Scan(&id); err != nil {
		t.Fatal(err)
	}
	k := waitKeptRow(t, c, id, "kept", func(k keptRow) bool { return k.state == "kept" })
	if k.kept != "public.k__tat_old" || !k.until {
		t.Fatalf("tat.status in the kept window: %+v", k)
	}
	var state string
	if err := c.QueryRow(ctx, "select tat.wait($1, interval '10 seconds')", id).Scan(&state); err != nil || state != "kept" {
		t.Fatalf("tat.wait on a kept job: %q %v", state, err)
	}
	time.Sleep(500 * time.Millisecond)
	stop() // tatd goes away in the kept window: the job stays kept
	if r := load(t, c, id); r.state != "kept" {
		t.Fatalf("after tatd stopped: %+v", r)
	}
	time.Sleep(500 * time.Millisecond) // writes with nobody applying them
	start(t, Config{DatabaseURL: url, PollInterval: 200 * time.Millisecond, RunnerID: "keep-2"})
	waitFor(t, c, id, 30*time.Second, "taken over", func(r row) bool { return r.runner == "keep-2" })
	stopWriter()
	exec(t, c, "insert into k values (900001, 'new', 1); insert into kctl values (900001, 'new', 1)")
	exec(t, c, "update k set n = n + 7 where id % 10 = 3; update kctl set n = n + 7 where id % 10 = 3")
	exec(t, c, "delete from k where id % 10 = 4; delete from kctl where id % 10 = 4")
	exec(t, c, "select tat.revert($1)", id)
	r := waitFor(t, c, id, 120*time.Second, "reverted", func(r row) bool { return r.state == "reverted" || terminal(r) })
	if r.state != "reverted" {
		t.Fatalf("final %+v", r)
	}
	if got, want := keepDigest(t, c, "k"), keepDigest(t, c, "kctl"); got != want {
		t.Fatalf("after the revert k is %s, the control %s", got, want)
	}
	var typ, small, ctlSmall string
	var granted bool
	if err := c.QueryRow(ctx, `select format_type(atttypid, atttypmod), (select count(*) from k_small)::text,
		(select count(*) from kctl where n < 100)::text, has_table_privilege('k_reader', 'k', 'select')
		from pg_attribute where attrelid = 'k'::regclass and attname = 'n'`).Scan(&typ, &small, &ctlSmall, &granted); err != nil {
		t.Fatal(err)
	}
	if typ != "integer" || small != ctlSmall || !granted {
		t.Fatalf("after the revert: n %s, view %s rows (want %s), grant %v", typ, small, ctlSmall, granted)
	}
	var idx int
	_ = c.QueryRow(ctx, "select count(*) from pg_index where indrelid = 'k'::regclass and indexrelid in (to_regclass('k_v'), to_regclass('k_pkey'))").Scan(&idx)
	if idx != 2 {
		t.Fatalf("indexes of k after the revert: %d of 2", idx)
	}
	if left := shadowObjects(t, c); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// A value that cannot go back: tat.status names the row and the reason, the
// writer and the new table are unaffected, tat.revert is refused with a
// clear error, tat.finish drops everything.
func TestKeepOldBlockedSQL(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	keepTables(t, c)
	start(t, Config{DatabaseURL: url, PollInterval: time.Second, RunnerID: "keep-blocked"})
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table k alter column n type bigint', keep_old => interval '1 hour')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	waitKeptRow(t, c, id, "kept", func(k keptRow) bool { return k.state == "kept" })
	exec(t, c, "update k set n = 5000000000 where id = 42")
	k := waitKeptRow(t, c, id, "blocked", func(k keptRow) bool { return k.blocked != "" })
	if !strings.Contains(k.blocked, "(42)") || !strings.Contains(k.blocked, "out of range") {
		t.Fatalf("revert_blocked %q does not say which row and why", k.blocked)
	}
	_, err := c.Exec(ctx, "select tat.revert($1)", id)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "55000" || !strings.Contains(pe.Message, "cannot be reverted") {
		t.Fatalf("tat.revert on a blocked job: %v", err)
	}
	exec(t, c, "update k set n = n + 1 where id = 43") // writers never fail
	exec(t, c, "select tat.finish($1)", id)
	r := waitFor(t, c, id, 60*time.Second, "done", terminal)
	if r.state != "done" {
		t.Fatalf("final %+v", r)
	}
	var n int64
	if err := c.QueryRow(ctx, "select n from k where id = 42").Scan(&n); err != nil || n != 5000000000 {
		t.Fatalf("the new table: n = %d, %v", n, err)
	}
	if left := shadowObjects(t, c); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// keep_old with a USING expression has no way back: the job is refused at
// its start with a clear message, the table untouched.
func TestKeepOldUsingRefusedSQL(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	keepTables(t, c)
	start(t, Config{DatabaseURL: url, PollInterval: time.Second, RunnerID: "keep-using"})
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table k alter column v type text using lower(v)', keep_old => interval '1 hour')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	r := waitFor(t, c, id, 60*time.Second, "ended", terminal)
	if r.state != "failed" || !strings.Contains(r.errText, "USING expression") || !strings.Contains(r.errText, "keep_old") {
		t.Fatalf("keep_old with USING: %+v", r)
	}
	if left := shadowObjects(t, c); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
}
