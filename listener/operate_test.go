package listener

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// bigTable creates a table of n rows for jobs slow enough to act on.
func bigTable(t *testing.T, c *pgx.Conn, name string, n int) {
	t.Helper()
	exec(t, c, "create table "+name+" (id int primary key, v int not null, s text)")
	exec(t, c, "insert into "+name+" select g, g % 1000, md5(g::text) from generate_series(1, $1) g", n)
	exec(t, c, "analyze "+name)
}

// digest is an order-independent fingerprint of a table's content.
func digest(t *testing.T, c *pgx.Conn, name string) string {
	t.Helper()
	var d string
	if err := c.QueryRow(context.Background(), "select md5(string_agg(format('%s:%s:%s', id, v, s), ',' order by id)) from "+name).Scan(&d); err != nil {
		t.Fatal(err)
	}
	return d
}

type live struct {
	state, phase, throttle string
	copied                 int64
}

func progressOf(t *testing.T, c *pgx.Conn, id int64) live {
	t.Helper()
	var l live
	if err := c.QueryRow(context.Background(), `select state, coalesce(phase, ''), coalesce(throttle_reason, ''), rows_copied
		from tat.status where id = $1`, id).Scan(&l.state, &l.phase, &l.throttle, &l.copied); err != nil {
		t.Fatal(err)
	}
	return l
}

func waitLive(t *testing.T, c *pgx.Conn, id int64, timeout time.Duration, what string, cond func(live) bool) live {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		l := progressOf(t, c, id)
		if cond(l) {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %d: %s not reached in %v; %+v", id, what, timeout, l)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func shadowObjects(t *testing.T, c *pgx.Conn) []string {
	t.Helper()
	rows, err := c.Query(context.Background(), `select relname::text from pg_class where relname like '%\_\_tat\_%'
		union all select tgname::text from pg_trigger where tgname like '%tat%'`)
	if err != nil {
		t.Fatal(err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// pause holds the engine at a safe point (no rows copied, state paused, the
// runner keeps the job); tat.set changes the batch size while paused;
// resume continues; the job ends done with the same content.
func TestPauseSetResume(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	bigTable(t, c, "big", 200000)
	want := digest(t, c, "big")
	start(t, Config{DatabaseURL: url, PollInterval: time.Second, RunnerID: "pause-test"})
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table big alter column v type bigint', batch_size => 20)").Scan(&id); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	waitLive(t, c, id, 30*time.Second, "copying", func(l live) bool { return l.phase == "copy" && l.copied > 0 })
	t.Logf("copying after %v", time.Since(began))
	exec(t, c, "select tat.pause($1)", id)
	paused := time.Now()
	waitLive(t, c, id, 5*time.Second, "paused", func(l live) bool { return l.state == "paused" })
	t.Logf("paused %v after tat.pause", time.Since(paused))
	// The copy's last progress sample reaches tat.status within a progress
	// interval or so (later on a loaded machine): wait for it to show
	// every row the shadow holds.
	var shadowBefore int64
	before := waitLive(t, c, id, 30*time.Second, "the last progress sample", func(l live) bool {
		_ = c.QueryRow(ctx, "select count(*) from big__tat_new").Scan(&shadowBefore)
		return l.copied == shadowBefore
	})
	time.Sleep(2 * time.Second)
	after := progressOf(t, c, id)
	var shadowAfter int64
	_ = c.QueryRow(ctx, "select count(*) from big__tat_new").Scan(&shadowAfter)
	if after.copied != before.copied || shadowAfter != shadowBefore || after.state != "paused" {
		t.Fatalf("paused job copied rows: %+v (%d in shadow) -> %+v (%d in shadow)", before, shadowBefore, after, shadowAfter)
	}
	var runner string
	if err := c.QueryRow(ctx, "select runner from tat.migrations where id = $1", id).Scan(&runner); err != nil || runner != "pause-test" {
		t.Fatalf("paused job lost its runner: %q %v", runner, err)
	}
	exec(t, c, "select tat.set($1, 'batch_size', '5000')", id)
	exec(t, c, "select tat.resume($1)", id)
	resumed := time.Now()
	waitLive(t, c, id, 5*time.Second, "copying again", func(l live) bool { return l.state == "running" && l.copied > after.copied })
	t.Logf("copying again %v after tat.resume", time.Since(resumed))
	r := waitFor(t, c, id, 120*time.Second, "terminal", terminal)
	if r.state != "done" {
		t.Fatalf("final %+v", r)
	}
	var events []string
	rows, _ := c.Query(ctx, "select message from tat.events where job = $1 order by id", id)
	events, _ = pgx.CollectRows(rows, pgx.RowTo[string])
	all := strings.Join(events, "\n")
	for _, w := range []string{"pause requested by", "paused", "batch_size set to 5000 by", "resume requested by", "batch_size set to 5000"} {
		if !strings.Contains(all, w) {
			t.Errorf("no event %q in\n%s", w, all)
		}
	}
	if got := digest(t, c, "big"); got != want {
		t.Fatal("content changed")
	}
	var typ string
	_ = c.QueryRow(ctx, "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'big'::regclass and attname = 'v'").Scan(&typ)
	if typ != "bigint" {
		t.Fatalf("v is %s", typ)
	}
	var timings int
	if err := c.QueryRow(ctx, "select count(*) from tat.phase_timings where job = $1 and phase = 'copy' and duration > interval '0'", id).Scan(&timings); err != nil || timings < 1 {
		t.Fatalf("phase timings: %d %v", timings, err)
	}
	if s := shadowObjects(t, c); len(s) > 0 {
		t.Fatalf("left behind: %v", s)
	}
}

// cancel stops a copying job and drops every shadow object; a throttled job
// shows its reason and copies nothing.
func TestThrottleThenCancel(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	bigTable(t, c, "big", 200000)
	want := digest(t, c, "big")
	start(t, Config{DatabaseURL: url, PollInterval: time.Second, RunnerID: "cancel-test"})
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table big alter column v type bigint', batch_size => 20)").Scan(&id); err != nil {
		t.Fatal(err)
	}
	waitLive(t, c, id, 30*time.Second, "copying", func(l live) bool { return l.phase == "copy" && l.copied > 0 })
	exec(t, c, "select tat.set($1, 'throttle_query', 'select true')", id)
	l := waitLive(t, c, id, 5*time.Second, "throttled", func(l live) bool { return l.throttle != "" })
	if l.throttle != "throttle_query returned true" || l.state != "running" {
		t.Fatalf("throttled: %+v", l)
	}
	time.Sleep(1500 * time.Millisecond)
	before := progressOf(t, c, id)
	time.Sleep(1500 * time.Millisecond)
	if after := progressOf(t, c, id); after.copied != before.copied {
		t.Fatalf("throttled job copied rows: %+v -> %+v", before, after)
	}
	var note string
	if err := c.QueryRow(ctx, "select note from tat.progress where id = $1", id).Scan(&note); err != nil || note != "throttle_query returned true" {
		t.Fatalf("tat.progress note %q %v", note, err)
	}
	exec(t, c, "select tat.cancel($1)", id)
	r := waitFor(t, c, id, 10*time.Second, "cancelled", terminal)
	if r.state != "cancelled" {
		t.Fatalf("final %+v", r)
	}
	if s := shadowObjects(t, c); len(s) > 0 {
		t.Fatalf("left behind: %v", s)
	}
	if got := digest(t, c, "big"); got != want {
		t.Fatal("original changed")
	}
}

// cancel of a job held by tat.pause: the runner still holds it, so the
// runner stops it and cleans up.
func TestCancelPausedJob(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	bigTable(t, c, "big", 200000)
	start(t, Config{DatabaseURL: url, PollInterval: time.Second, RunnerID: "cancel-paused"})
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table big alter column v type bigint', batch_size => 20)").Scan(&id); err != nil {
		t.Fatal(err)
	}
	waitLive(t, c, id, 30*time.Second, "copying", func(l live) bool { return l.phase == "copy" && l.copied > 0 })
	exec(t, c, "select tat.pause($1)", id)
	waitLive(t, c, id, 5*time.Second, "paused", func(l live) bool { return l.state == "paused" })
	exec(t, c, "select tat.cancel($1)", id)
	r := waitFor(t, c, id, 10*time.Second, "cancelled", terminal)
	if r.state != "cancelled" {
		t.Fatalf("final %+v", r)
	}
	time.Sleep(500 * time.Millisecond)
	if s := shadowObjects(t, c); len(s) > 0 {
		t.Fatalf("left behind: %v", s)
	}
}
