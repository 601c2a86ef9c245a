package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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

// Two tatd processes, four jobs: each job is run by one of them; one is
// killed mid-job and the other takes its jobs over.
func TestTwoTatdKillOne(t *testing.T) {
	t.Parallel()
	tables := []string{"t1", "t2", "t3", "t4"}
	url, c := crashDB(t, tables, 60000)
	want := map[string]string{}
	for _, tbl := range tables {
		want[tbl] = digest(t, c, tbl)
	}
	a := startTatd(t, url, "TAT_MAX_JOBS=2")
	startTatd(t, url, "TAT_MAX_JOBS=2")
	ids := map[string]int64{}
	for _, tbl := range tables {
		ids[tbl] = queueSlow(t, c, tbl)
	}
	// wait until a's jobs are copying, then kill it
	pidA := a.cmd.Process.Pid
	deadline := time.Now().Add(60 * time.Second)
	for {
		var n int
		if err := c.QueryRow(context.Background(), "select count(*) from tat.migrations where runner like '%:' || $1 and phase = 'copy' and rows_copied > 0",
			strconv.Itoa(pidA)).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first tatd never copied")
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.signal(t, syscall.SIGKILL, 5*time.Second)
	for _, tbl := range tables {
		j := waitJob(t, c, ids[tbl], 180*time.Second, "finished", finished)
		if j.state != "done" {
			t.Fatalf("%s: %+v", tbl, j)
		}
	}
	for _, tbl := range tables {
		assertMigrated(t, c, tbl, want[tbl])
	}
	// each job ran on one runner at a time: no attempt without a claim, and
	// the runners of the started events are distinct per attempt
	var n int
	if err := c.QueryRow(context.Background(), `select count(*) from (select job, count(*) from tat.events where message like 'started by %'
		group by job having count(*) <> count(distinct message)) x`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("a job was started twice by the same attempt: %d %v", n, err)
	}
	var takenOver int
	_ = c.QueryRow(context.Background(), "select count(*) from tat.migrations where attempts > 1").Scan(&takenOver)
	t.Logf("%d job(s) taken over", takenOver)
	if takenOver == 0 {
		t.Fatal("no job was taken over from the killed tatd")
	}
}
