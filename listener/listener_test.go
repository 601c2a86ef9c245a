package listener

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
	"github.com/pgtat/pg_tat/sqlapi"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

func setup(t *testing.T) (string, *pgx.Conn) {
	t.Helper()
	url := testpg.NewDB(t)
	testpg.Install(t, url)
	c, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return url, c
}

func exec(t *testing.T, c *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := c.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func queue(t *testing.T, c *pgx.Conn, cmd string) int64 {
	t.Helper()
	var id int64
	if err := c.QueryRow(context.Background(), "select tat.alter($1)", cmd).Scan(&id); err != nil {
		t.Fatalf("tat.alter(%q): %v", cmd, err)
	}
	return id
}

// start runs a listener until the test ends (or stop is called).
func start(t *testing.T, cfg Config) (stop func()) {
	t.Helper()
	if cfg.Log == nil {
		log := logrus.New()
		log.SetLevel(logrus.WarnLevel)
		cfg.Log = log
	}
	l, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("listener: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Error("listener did not stop")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

type row struct {
	state, runner, phase, errText string
	started                       bool
}

func load(t *testing.T, c *pgx.Conn, id int64) row {
	t.Helper()
	var r row
	err := c.QueryRow(context.Background(), `select state, coalesce(runner, ''), coalesce(phase, ''),
		coalesce(error, ''), started_at is not null from tat.status where id = $1`, id).
		Scan(&r.state, &r.runner, &r.phase, &r.errText, &r.started)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// waitFor polls until cond holds for job id, or fails after timeout.
func waitFor(t *testing.T, c *pgx.Conn, id int64, timeout time.Duration, what string, cond func(row) bool) row {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r := load(t, c, id)
		if cond(r) {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %d: %s not reached in %v; row %+v", id, what, timeout, r)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func terminal(r row) bool { return r.state == "done" || r.state == "failed" || r.state == "cancelled" }

// The real engine: a committed tat.alter is picked up through NOTIFY (the
// poll interval is far longer than the allowed delay) and ends in a terminal
// state with a timeline in tat.events.
func TestNotifyClaimsJob(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table orders (id int primary key, note text); insert into orders select g, 'n' from generate_series(1, 100) g")
	start(t, Config{DatabaseURL: url, PollInterval: time.Minute, RunnerID: "notify-test"})
	time.Sleep(300 * time.Millisecond) // let it LISTEN and finish its first poll
	committed := time.Now()
	id := queue(t, c, "alter table orders alter column id type bigint")
	waitFor(t, c, id, 3*time.Second, "claimed", func(r row) bool { return r.state != "queued" })
	t.Logf("claimed after %v", time.Since(committed))
	r := waitFor(t, c, id, 60*time.Second, "terminal", terminal)
	t.Logf("final: %+v", r)
	if !r.started || r.runner != "notify-test" {
		t.Fatalf("row %+v", r)
	}
	if r.state == "failed" && r.errText == "" {
		t.Fatalf("failed without error: %+v", r)
	}
	var events int
	if err := c.QueryRow(context.Background(), "select count(*) from tat.events where job = $1", id).Scan(&events); err != nil || events < 2 {
		t.Fatalf("events = %d (err %v)", events, err)
	}
}

// A job queued while no sidecar listened is run when one starts.
func TestPollOnStart(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table t (id int primary key)")
	id := queue(t, c, "alter table t add column x int")
	var ran sync.Map
	start(t, Config{DatabaseURL: url, PollInterval: time.Minute,
		Run: func(ctx context.Context, _ *pgxpool.Pool, o replicate.Options, rep replicate.Reporter, _ replicate.Control) error {
			ran.Store(o.Command, true)
			rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, RowsCopied: 1, RowsTotal: 1})
			return nil
		}})
	r := waitFor(t, c, id, 5*time.Second, "done", terminal)
	if r.state != "done" || r.phase != "copy" {
		t.Fatalf("row %+v", r)
	}
	if _, ok := ran.Load("alter table t add column x int"); !ok {
		t.Fatal("engine not called with the command")
	}
}

// Two sidecars, 20 jobs on 20 tables: every job runs exactly once.
func TestTwoSidecarsRunEachJobOnce(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	var mu sync.Mutex
	runs := map[string]int{}
	byRunner := map[string]int{}
	fake := func(name string) RunFunc {
		return func(ctx context.Context, _ *pgxpool.Pool, o replicate.Options, _ replicate.Reporter, _ replicate.Control) error {
			mu.Lock()
			runs[o.Command]++
			byRunner[name]++
			mu.Unlock()
			select {
			case <-time.After(150 * time.Millisecond):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	start(t, Config{DatabaseURL: url, RunnerID: "a", MaxJobs: 3, PollInterval: 200 * time.Millisecond, Run: fake("a")})
	start(t, Config{DatabaseURL: url, RunnerID: "b", MaxJobs: 3, PollInterval: 200 * time.Millisecond, Run: fake("b")})
	time.Sleep(200 * time.Millisecond)
	ids := make([]int64, 20)
	for i := range ids {
		exec(t, c, fmt.Sprintf("create table t%d (id int primary key)", i))
		ids[i] = queue(t, c, fmt.Sprintf("alter table t%d add column x int", i))
	}
	for _, id := range ids {
		if r := waitFor(t, c, id, 30*time.Second, "done", terminal); r.state != "done" {
			t.Fatalf("job %d: %+v", id, r)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for i := range ids {
		if n := runs[fmt.Sprintf("alter table t%d add column x int", i)]; n != 1 {
			t.Errorf("job on t%d ran %d times", i, n)
		}
	}
	var starts int
	if err := c.QueryRow(context.Background(), "select count(*) from tat.events where message like 'started by%'").Scan(&starts); err != nil || starts != 20 {
		t.Fatalf("start events = %d (err %v)", starts, err)
	}
	t.Logf("jobs per runner: %v", byRunner)
}

// blockingRun blocks until its context is cancelled and reports when it starts.
func blockingRun(started chan<- string) RunFunc {
	return func(ctx context.Context, _ *pgxpool.Pool, o replicate.Options, rep replicate.Reporter, _ replicate.Control) error {
		rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy})
		started <- o.Command
		<-ctx.Done()
		return ctx.Err()
	}
}

// Stopping the sidecar puts its running job back to queued; the next one resumes it.
func TestShutdownRequeues(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table t (id int primary key)")
	id := queue(t, c, "alter table t add column x int")
	started := make(chan string, 1)
	stop := start(t, Config{DatabaseURL: url, RunnerID: "first", PollInterval: 100 * time.Millisecond, Run: blockingRun(started)})
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("job not started")
	}
	stop()
	if r := load(t, c, id); r.state != "queued" || r.runner != "" {
		t.Fatalf("after shutdown: %+v", r)
	}
	var continued bool
	start(t, Config{DatabaseURL: url, RunnerID: "second", PollInterval: 100 * time.Millisecond,
		Run: func(_ context.Context, _ *pgxpool.Pool, o replicate.Options, _ replicate.Reporter, _ replicate.Control) error {
			continued = o.Continue
			return nil
		}})
	if r := waitFor(t, c, id, 10*time.Second, "done", terminal); r.state != "done" || r.runner != "second" || !continued {
		t.Fatalf("after restart: %+v continue=%v", r, continued)
	}
}

// tat.cancel on a running job cancels the engine's context; the job ends cancelled.
func TestCancelRunningJob(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table t (id int primary key)")
	id := queue(t, c, "alter table t add column x int")
	started := make(chan string, 1)
	var cleaned sync.Map
	start(t, Config{DatabaseURL: url, PollInterval: time.Minute, Run: blockingRun(started),
		Cleanup: func(_ context.Context, _ *pgxpool.Pool, table string) error { cleaned.Store(table, true); return nil }})
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("job not started")
	}
	exec(t, c, "select tat.cancel($1)", id)
	if r := waitFor(t, c, id, 5*time.Second, "cancelled", terminal); r.state != "cancelled" {
		t.Fatalf("row %+v", r)
	}
	if _, ok := cleaned.Load("public.t"); !ok {
		t.Fatal("leftovers of the cancelled job not cleaned")
	}
	_, err := c.Exec(context.Background(), "select tat.wait($1)", id)
	if err == nil {
		t.Fatal("tat.wait on a cancelled job returned no error")
	}
}

// A job whose runner died (state running, nobody holds its lock) is taken over.
func TestTakeOverDeadRunner(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table t (id int primary key)")
	id := queue(t, c, "alter table t add column x int")
	exec(t, c, "update tat.migrations set state = 'running', runner = 'dead', started_at = now(), attempts = 1 where id = $1", id)
	start(t, Config{DatabaseURL: url, RunnerID: "alive", PollInterval: 100 * time.Millisecond,
		Run: func(context.Context, *pgxpool.Pool, replicate.Options, replicate.Reporter, replicate.Control) error {
			return nil
		}})
	if r := waitFor(t, c, id, 10*time.Second, "done", terminal); r.state != "done" || r.runner != "alive" {
		t.Fatalf("row %+v", r)
	}
}

// A cleanup request is run through the Cleanup function and recorded.
func TestCleanupRequest(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table t (id int primary key)")
	var req int64
	if err := c.QueryRow(context.Background(), "select tat.cleanup('t')").Scan(&req); err != nil {
		t.Fatal(err)
	}
	start(t, Config{DatabaseURL: url, PollInterval: 100 * time.Millisecond})
	deadline := time.Now().Add(10 * time.Second)
	for {
		var state, errText string
		if err := c.QueryRow(context.Background(), "select state, coalesce(error, '') from tat.requests where id = $1", req).Scan(&state, &errText); err != nil {
			t.Fatal(err)
		}
		if state == "done" || state == "failed" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cleanup request still %s", state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A custom channel: tat.settings 'channel' for the triggers, Config.Channel (TAT_CHANNEL) for tatd.
func TestCustomChannel(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "update tat.settings set value = 'pgtat_jobs' where key = 'channel'; create table t (id int primary key)")
	start(t, Config{DatabaseURL: url, Channel: "pgtat_jobs", PollInterval: time.Minute,
		Run: func(context.Context, *pgxpool.Pool, replicate.Options, replicate.Reporter, replicate.Control) error {
			return nil
		}})
	time.Sleep(300 * time.Millisecond)
	id := queue(t, c, "alter table t add column x int")
	if r := waitFor(t, c, id, 3*time.Second, "done", terminal); r.state != "done" {
		t.Fatalf("row %+v", r)
	}
}

// A cleanup request whose runner died (state running, nobody holds its
// advisory lock) is taken over; one whose runner is alive (holds the lock)
// is left alone until the lock goes.
func TestCleanupRequestTakeOver(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table dead (id int primary key); create table alive (id int primary key)")
	var deadReq, aliveReq int64
	if err := c.QueryRow(context.Background(), "select tat.cleanup('dead')").Scan(&deadReq); err != nil {
		t.Fatal(err)
	}
	if err := c.QueryRow(context.Background(), "select tat.cleanup('alive')").Scan(&aliveReq); err != nil {
		t.Fatal(err)
	}
	exec(t, c, "update tat.requests set state = 'running', runner = 'gone:1' where id = any($1)", []int64{deadReq, aliveReq})
	// the live runner of aliveReq: holds its lock on a connection of its own
	holder, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	var ok bool
	if err := holder.QueryRow(context.Background(), "select pg_try_advisory_lock($1::int4, $2::int4)",
		sqlapi.CleanupLockClass, sqlapi.LockKey(aliveReq)).Scan(&ok); err != nil || !ok {
		t.Fatalf("lock: %v %v", ok, err)
	}
	var mu sync.Mutex
	cleaned := map[string]int{}
	start(t, Config{DatabaseURL: url, RunnerID: "alive:2", PollInterval: 100 * time.Millisecond,
		Cleanup: func(_ context.Context, _ *pgxpool.Pool, table string) error {
			mu.Lock()
			cleaned[table]++
			mu.Unlock()
			return nil
		}})
	request := func(id int64) (state, runner string) {
		t.Helper()
		if err := c.QueryRow(context.Background(), "select state, coalesce(runner, '') from tat.requests where id = $1", id).Scan(&state, &runner); err != nil {
			t.Fatal(err)
		}
		return state, runner
	}
	waitRequest := func(id int64, timeout time.Duration) {
		t.Helper()
		deadline := time.Now().Add(timeout)
		for {
			state, runner := request(id)
			if state == "done" {
				if runner != "alive:2" {
					t.Fatalf("request %d done by %q", id, runner)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("request %d still %s (runner %q)", id, state, runner)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitRequest(deadReq, 10*time.Second)
	time.Sleep(500 * time.Millisecond) // several polls
	if state, runner := request(aliveReq); state != "running" || runner != "gone:1" {
		t.Fatalf("a request held by a live runner was taken: %s %s", state, runner)
	}
	// its runner dies
	holder.Close(context.Background())
	waitRequest(aliveReq, 10*time.Second)
	mu.Lock()
	defer mu.Unlock()
	if cleaned["public.dead"] != 1 || cleaned["public.alive"] != 1 {
		t.Fatalf("cleanups run: %v", cleaned)
	}
}

// A run that lasts longer than the bound on the final writes still records
// its end: the bound starts when the run ends. (It used to start with the
// run: every job longer than 30s could not be marked done, kept state
// running, lost its lock and was run a second time.)
func TestLongRunRecordsItsEnd(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	exec(t, c, "create table t (id int primary key)")
	id := queue(t, c, "alter table t add column x int")
	var runs sync.Map
	start(t, Config{DatabaseURL: url, RunnerID: "slow", PollInterval: 100 * time.Millisecond, finalTimeout: 300 * time.Millisecond,
		Run: func(ctx context.Context, _ *pgxpool.Pool, o replicate.Options, _ replicate.Reporter, _ replicate.Control) error {
			n, _ := runs.LoadOrStore(o.Command, new(int))
			*n.(*int)++
			select {
			case <-time.After(time.Second):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}})
	if r := waitFor(t, c, id, 10*time.Second, "done", terminal); r.state != "done" {
		t.Fatalf("row %+v", r)
	}
	time.Sleep(500 * time.Millisecond) // several polls: nobody runs it again
	var attempts int
	if err := c.QueryRow(context.Background(), "select attempts from tat.migrations where id = $1", id).Scan(&attempts); err != nil || attempts != 1 {
		t.Fatalf("attempts %d (%v)", attempts, err)
	}
	if n, _ := runs.Load("alter table t add column x int"); *n.(*int) != 1 {
		t.Fatalf("run %d times", *n.(*int))
	}
}

// Several ALTER TABLE statements of one table in one tat.alter (as the
// pg_tat CLI's repeated -c) are applied together by one job.
func TestSeveralStatementsOneJob(t *testing.T) {
	t.Parallel()
	db := testpg.NewDB(t)
	testpg.Install(t, db)
	testpg.Exec(t, db, `create table pair (id int primary key, a int, b int);
		insert into pair select g, g, -g from generate_series(1, 3000) g`)
	stop := start(t, Config{DatabaseURL: db, PollInterval: 200 * time.Millisecond})
	defer stop()
	pool := testpg.Pool(t, db)
	var id int64
	if err := pool.QueryRow(context.Background(), `select tat.alter('alter table pair alter column a type bigint;
		alter table pair alter column b type bigint using b * 2;')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	var state string
	if err := pool.QueryRow(context.Background(), "select tat.wait($1, '2 min')", id).Scan(&state); err != nil {
		t.Fatal(err)
	}
	var types string
	var sum int64
	if err := pool.QueryRow(context.Background(), `select string_agg(format_type(atttypid, atttypmod), ',' order by attnum),
		(select sum(b) from pair) from pg_attribute where attrelid = 'pair'::regclass and attname in ('a', 'b')`).Scan(&types, &sum); err != nil {
		t.Fatal(err)
	}
	if types != "bigint,bigint" || sum != -3000*3001 {
		t.Fatalf("%s: types %s, sum(b) %d", state, types, sum)
	}
	if _, err := pool.Exec(context.Background(), `select tat.alter('alter table pair add x int; alter table other add y int')`); err == nil ||
		!strings.Contains(err.Error(), "exactly one statement") {
		t.Fatalf("statements of two tables: %v", err)
	}
}
