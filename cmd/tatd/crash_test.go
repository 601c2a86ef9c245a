package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// tatdBinary builds ./cmd/tatd once per test binary.
func tatdBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tatd-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "tatd")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = err
			binPath = string(out)
		}
	})
	if buildErr != nil {
		t.Fatalf("go build: %v: %s", buildErr, binPath)
	}
	return binPath
}

// proc is a tatd subprocess.
type proc struct {
	cmd  *exec.Cmd
	log  *syncBuffer
	done chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func startTatd(t *testing.T, url string, env ...string) *proc {
	t.Helper()
	cmd := exec.Command(tatdBinary(t))
	cmd.Env = append(os.Environ(), "TAT_DATABASE_URL="+url, "TAT_POLL_INTERVAL=500ms", "TAT_LOG_LEVEL=info")
	cmd.Env = append(cmd.Env, env...)
	p := &proc{cmd: cmd, log: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("tatd %d log:\n%s", cmd.Process.Pid, p.log.String())
		}
	})
	return p
}

func (p *proc) signal(t *testing.T, sig syscall.Signal, timeout time.Duration) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
		p.done <- nil // for the cleanup
	case <-time.After(timeout):
		t.Fatalf("tatd did not exit %v after %v", timeout, sig)
	}
}

type job struct {
	state, phase, runner string
	copied               int64
	attempts             int
}

func jobOf(t *testing.T, c *pgx.Conn, id int64) job {
	t.Helper()
	var j job
	if err := c.QueryRow(context.Background(), `select state, coalesce(phase, ''), coalesce(runner, ''), rows_copied, attempts
		from tat.status where id = $1`, id).Scan(&j.state, &j.phase, &j.runner, &j.copied, &j.attempts); err != nil {
		t.Fatal(err)
	}
	return j
}

func waitJob(t *testing.T, c *pgx.Conn, id int64, timeout time.Duration, what string, cond func(job) bool) job {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		j := jobOf(t, c, id)
		if cond(j) {
			return j
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %d: %s not reached in %v: %+v", id, what, timeout, j)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func finished(j job) bool { return j.state == "done" || j.state == "failed" || j.state == "cancelled" }

// crashDB is a database with schema tat and a table of n rows.
func crashDB(t *testing.T, tables []string, n int) (string, *pgx.Conn) {
	t.Helper()
	url := testpg.NewDB(t)
	testpg.Install(t, url)
	c, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	for _, tbl := range tables {
		mustExec(t, c, "create table "+tbl+" (id int primary key, v int not null, s text)")
		mustExec(t, c, "insert into "+tbl+" select g, g % 1000, md5(g::text) from generate_series(1, $1) g", n)
		mustExec(t, c, "analyze "+tbl)
	}
	return url, c
}

func mustExec(t *testing.T, c *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := c.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func digest(t *testing.T, c *pgx.Conn, tbl string) string {
	t.Helper()
	var d string
	if err := c.QueryRow(context.Background(), "select md5(string_agg(format('%s:%s:%s', id, v, s), ',' order by id)) from "+tbl).Scan(&d); err != nil {
		t.Fatal(err)
	}
	return d
}

func queueSlow(t *testing.T, c *pgx.Conn, tbl string) int64 {
	t.Helper()
	var id int64
	if err := c.QueryRow(context.Background(), "select tat.alter(format('alter table %I alter column v type bigint', $1::text), batch_size => 20)", tbl).Scan(&id); err != nil {
		t.Fatal(err)
	}
	return id
}

func assertMigrated(t *testing.T, c *pgx.Conn, tbl, want string) {
	t.Helper()
	if got := digest(t, c, tbl); got != want {
		t.Fatalf("%s: content differs after the migration", tbl)
	}
	var typ string
	if err := c.QueryRow(context.Background(), "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = $1::regclass and attname = 'v'", tbl).Scan(&typ); err != nil || typ != "bigint" {
		t.Fatalf("%s.v is %q (%v)", tbl, typ, err)
	}
	var left []string
	rows, _ := c.Query(context.Background(), `select relname::text from pg_class where relname like '%\_\_tat\_%'`)
	left, _ = pgx.CollectRows(rows, pgx.RowTo[string])
	if len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
}

func hasEvent(t *testing.T, c *pgx.Conn, id int64, like string) bool {
	t.Helper()
	var ok bool
	if err := c.QueryRow(context.Background(), "select exists (select from tat.events where job = $1 and message like $2)", id, like).Scan(&ok); err != nil {
		t.Fatal(err)
	}
	return ok
}

// kill -9 of tatd during the copy: a new tatd takes the job over (the
// advisory lock died with the connection) and continues from the copy
// checkpoint; the job ends done with equal content.
func TestKill9DuringCopy(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 200000)
	want := digest(t, c, "big")
	first := startTatd(t, url)
	id := queueSlow(t, c, "big")
	j := waitJob(t, c, id, 60*time.Second, "copying", func(j job) bool { return j.phase == "copy" && j.copied > 2000 })
	first.signal(t, syscall.SIGKILL, 5*time.Second)
	t.Logf("killed at %+v", j)
	if j = jobOf(t, c, id); j.state != "running" {
		t.Fatalf("after kill -9: %+v", j)
	}
	startTatd(t, url)
	j = waitJob(t, c, id, 120*time.Second, "finished", finished)
	if j.state != "done" || j.attempts != 2 {
		t.Fatalf("final %+v", j)
	}
	if !hasEvent(t, c, id, "continuing the earlier run (% rows already copied)") {
		t.Error("the second attempt did not continue from the checkpoint")
	}
	assertMigrated(t, c, "big", want)
}

// SIGTERM: tatd holds the job at a safe point, hands it back (queued) and
// exits 0; the next tatd continues it.
func TestSIGTERMRequeues(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 200000)
	want := digest(t, c, "big")
	first := startTatd(t, url)
	id := queueSlow(t, c, "big")
	waitJob(t, c, id, 60*time.Second, "copying", func(j job) bool { return j.phase == "copy" && j.copied > 2000 })
	first.signal(t, syscall.SIGTERM, 20*time.Second)
	if code := first.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	if j := jobOf(t, c, id); j.state != "queued" || j.runner != "" {
		t.Fatalf("after SIGTERM: %+v", j)
	}
	if !hasEvent(t, c, id, "interrupted by shutdown of %") {
		t.Error("no shutdown event")
	}
	startTatd(t, url)
	j := waitJob(t, c, id, 120*time.Second, "finished", finished)
	if j.state != "done" {
		t.Fatalf("final %+v", j)
	}
	assertMigrated(t, c, "big", want)
}

// Three tatd processes, ten jobs on ten tables: every job ends done with
// equal content and nothing left behind; each attempt of a job is started by
// exactly one runner (attempt numbers 1..attempts, once each); one tatd is
// killed (-9) mid-job and the others take its jobs over (attempt 2 by a
// survivor); the killed one starts nothing after its death.
func TestSeveralTatdKillOne(t *testing.T) {
	t.Parallel()
	var tables []string
	for i := range 10 {
		tables = append(tables, fmt.Sprintf("t%d", i))
	}
	url, c := crashDB(t, tables, 40000)
	want := map[string]string{}
	for _, tbl := range tables {
		want[tbl] = digest(t, c, tbl)
	}
	procs := []*proc{
		startTatd(t, url, "TAT_MAX_JOBS=2"),
		startTatd(t, url, "TAT_MAX_JOBS=2"),
		startTatd(t, url, "TAT_MAX_JOBS=2"),
	}
	// All listening, so that the jobs spread over them: a state, not a delay
	// (a busy machine starts processes slowly).
	for deadline := time.Now().Add(60 * time.Second); ; {
		var n int
		if err := c.QueryRow(context.Background(), `select count(*) from pg_stat_activity
			where datname = current_database() and query ilike 'listen %'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n >= len(procs) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d tatd listening after 60s", n, len(procs))
		}
		time.Sleep(20 * time.Millisecond)
	}
	ids := map[string]int64{}
	for _, tbl := range tables {
		var id int64
		if err := c.QueryRow(context.Background(), "select tat.alter(format('alter table %I alter column v type bigint', $1::text), batch_size => 10)", tbl).Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids[tbl] = id
	}
	// kill the first tatd that copies a job
	var victim *proc
	deadline := time.Now().Add(60 * time.Second)
	for victim == nil {
		for _, p := range procs {
			var n int
			if err := c.QueryRow(context.Background(), "select count(*) from tat.migrations where runner like '%:' || $1 and phase = 'copy' and state = 'running'",
				strconv.Itoa(p.cmd.Process.Pid)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n > 0 {
				victim = p
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no tatd ever copied")
		}
		time.Sleep(20 * time.Millisecond)
	}
	victimID := fmt.Sprintf("%%:%d", victim.cmd.Process.Pid)
	victim.signal(t, syscall.SIGKILL, 5*time.Second)
	var killedAt time.Time
	if err := c.QueryRow(context.Background(), "select clock_timestamp()").Scan(&killedAt); err != nil {
		t.Fatal(err)
	}
	type orphan struct {
		ID     int64
		Copied bool
	}
	rows, _ := c.Query(context.Background(), "select id, rows_copied > 0 from tat.migrations where runner like $1 and state = 'running'", victimID)
	orphans, err := pgx.CollectRows(rows, pgx.RowToStructByPos[orphan])
	if err != nil || len(orphans) == 0 {
		t.Fatalf("jobs of the killed tatd: %v %v", orphans, err)
	}
	for _, tbl := range tables {
		j := waitJob(t, c, ids[tbl], 300*time.Second, "finished", finished)
		if j.state != "done" || strings.HasSuffix(j.runner, victimID[1:]) {
			t.Fatalf("%s: %+v", tbl, j)
		}
	}
	for _, tbl := range tables {
		assertMigrated(t, c, tbl, want[tbl])
	}
	if left := leftovers(t, c); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
	// one runner per attempt: the started events of each job name attempts
	// 1..attempts once each, one runner each
	type start struct {
		job     int64
		runner  string
		attempt int
		at      time.Time
	}
	rows, _ = c.Query(context.Background(), `select e.job, m[1], m[2]::int, e.at from tat.events e,
		regexp_match(e.message, '^started by (.*) \(attempt (\d+)\)$') m where m is not null order by e.job, e.id`)
	starts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (start, error) {
		var s start
		return s, r.Scan(&s.job, &s.runner, &s.attempt, &s.at)
	})
	if err != nil {
		t.Fatal(err)
	}
	byJob := map[int64][]start{}
	perRunner := map[string]int{}
	for _, s := range starts {
		byJob[s.job] = append(byJob[s.job], s)
		perRunner[s.runner]++
		if strings.HasSuffix(s.runner, victimID[1:]) && s.at.After(killedAt) {
			t.Errorf("job %d started by the killed tatd after its death", s.job)
		}
	}
	taken := map[int64]bool{}
	for _, tbl := range tables {
		id := ids[tbl]
		j := jobOf(t, c, id)
		ss := byJob[id]
		if len(ss) != j.attempts {
			t.Fatalf("job %d: %d attempts, %d starts: %+v", id, j.attempts, len(ss), ss)
		}
		for i, s := range ss {
			if s.attempt != i+1 {
				t.Fatalf("job %d: starts %+v", id, ss)
			}
		}
		if j.attempts > 1 {
			taken[id] = true
			if !strings.HasSuffix(ss[0].runner, victimID[1:]) || strings.HasSuffix(ss[len(ss)-1].runner, victimID[1:]) {
				t.Errorf("job %d: run again although its runner lives: %+v", id, ss)
			}
		}
	}
	for _, o := range orphans {
		if !taken[o.ID] {
			t.Errorf("job %d of the killed tatd was not taken over", o.ID)
		}
		if o.Copied && !hasEvent(t, c, o.ID, "continuing the earlier run (% rows already copied)") {
			t.Errorf("job %d: the takeover did not continue from the checkpoint", o.ID)
		}
	}
	t.Logf("starts per runner: %v; %d job(s) taken over from %s", perRunner, len(taken), victimID[1:])
}
