package main

import (
	"bytes"
	"context"
	"net/url"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

// connFlags turns a test database URL into the CLI's connection flags.
func connFlags(t *testing.T, dbURL string) []string {
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	f := []string{"-h", u.Hostname(), "-p", u.Port(), "-d", strings.TrimPrefix(u.Path, "/"), "-U", u.User.Username()}
	if pw, ok := u.User.Password(); ok {
		f = append(f, "-W", pw)
	}
	return f
}

func query(t *testing.T, dbURL, sql string) string {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	var s string
	if err := c.QueryRow(context.Background(), sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

func TestCLI(t *testing.T) {
	db := testpg.NewDB(t)
	testpg.Exec(t, db, `create table mytable (id int primary key, a int, b text);
		insert into mytable select g, g, md5(g::text) from generate_series(1, 5000) g`)
	before := query(t, db, "select md5(string_agg(id::text || a || b, ',' order by id)) from mytable")
	run1 := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(append(connFlags(t, db), args...), &out, &errb)
		return code, out.String(), errb.String()
	}

	// The seed README's three examples.
	if code, out, errs := run1("-c", "alter table mytable alter column id type bigint", "--batch-size", "700", "--copy-data-jobs", "2"); code != 0 {
		t.Fatalf("exit %d: %s %s", code, out, errs)
	}
	if code, _, errs := run1("-c", "alter table mytable move column b before a"); code != 0 {
		t.Fatalf("move: %s", errs)
	}
	if got := query(t, db, "select string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' order by attnum) from pg_attribute where attrelid = 'mytable'::regclass and attnum > 0"); got != "id:bigint,b:text,a:integer" {
		t.Fatalf("columns %s", got)
	}
	if code, _, errs := run1("-c", "ALTER TABLE mytable SET TABLESPACE pg_default", "--show-queries"); code != 0 || !strings.Contains(errs, "CREATE TABLE") {
		t.Fatalf("set tablespace / --show-queries: exit %d, %s", code, errs)
	}
	if got := query(t, db, "select md5(string_agg(id::text || a || b, ',' order by id)) from mytable"); got != before {
		t.Fatal("content changed")
	}

	// --no-switch-table, then --continue-switch-table.
	if code, _, errs := run1("-c", "alter table mytable alter column a type bigint", "--no-switch-table"); code != 0 {
		t.Fatalf("no-switch: %s", errs)
	}
	if got := query(t, db, "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'mytable'::regclass and attname = 'a'"); got != "integer" {
		t.Fatal("--no-switch-table switched")
	}
	testpg.Exec(t, db, "update mytable set a = -a where id <= 10")
	if code, _, errs := run1("-c", "alter table mytable alter column a type bigint", "--continue-switch-table"); code != 0 {
		t.Fatalf("continue-switch: %s", errs)
	}
	if got := query(t, db, "select (select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'mytable'::regclass and attname = 'a') || (select sum(a) from mytable)::text"); got != "bigint12502390" {
		t.Fatalf("after continue: %s", got)
	}

	// --cleanup removes the leftovers of a stopped run.
	if code, _, errs := run1("-c", "alter table mytable alter column a type int", "--no-switch-table"); code != 0 {
		t.Fatalf("no-switch: %s", errs)
	}
	if code, _, errs := run1("-c", "alter table mytable alter column a type int", "--cleanup"); code != 0 {
		t.Fatalf("cleanup: %s", errs)
	}
	if got := query(t, db, `select count(*)::text from pg_class where relname like 'mytable\_\_tat%'`); got != "0" {
		t.Fatalf("%s leftovers", got)
	}
	if got := query(t, db, `select count(*)::text from pg_trigger where tgrelid = 'mytable'::regclass`); got != "0" {
		t.Fatalf("%s triggers left", got)
	}

	// Refusals exit 2 with the reason.
	if code, _, errs := run1("-c", "drop table mytable"); code != 2 || !strings.Contains(errs, "not an ALTER TABLE") {
		t.Fatalf("drop table: exit %d %s", code, errs)
	}
	if code, _, errs := run1("-c", "alter table mytable alter column a type int", "--lock-timeout", "soon"); code != 2 || !strings.Contains(errs, "--lock-timeout") {
		t.Fatalf("bad flag: exit %d %s", code, errs)
	}
}

func TestFlags(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"--help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "--continue-switch-table") {
		t.Fatalf("--help: %d %s", code, out.String())
	}
	c, err := parse([]string{"-h", "db1", "-p", "6543", "-d", "x", "-U", "u", "-W", "p'w", "-c", "alter table t add column x int",
		"--work-mem", "64MB", "--maintenance-work-mem", "1GB", "--max-parallel-maintenance-workers", "2",
		"--copy-data-jobs", "3", "--create-index-jobs", "4", "--continue-create-indexes", "--lock-timeout", "5",
		"--time-between-locks", "10", "--min-delta-rows", "100", "--skip-fk-validation", "--batch-size", "500", "--verify",
		"--copy-data-filter", "a > 0", "--command-before-switch", "select 1", "--command-after-switch", "select 2", "--vacuum-freeze"}, &errb)
	if err != nil {
		t.Fatal(err)
	}
	o, err := c.options()
	if err != nil {
		t.Fatal(err)
	}
	if o.CopyDataJobs != 3 || o.CreateIndexJobs != 4 || o.BatchSize != 500 || o.MinDeltaRows != 100 || !o.SkipFKValidation ||
		!o.Continue || o.LockTimeout.Seconds() != 5 || o.TimeBetweenLocks.Seconds() != 10 || o.WorkMem != "64MB" ||
		o.MaintenanceWorkMem != "1GB" || o.MaxParallelMaintenanceWorkers != 2 || !o.Verify ||
		o.CopyDataFilter != "a > 0" || o.CommandBeforeSwitch != "select 1" || o.CommandAfterSwitch != "select 2" || !o.VacuumFreeze {
		t.Fatalf("options %+v", o)
	}
	if dsn := c.dsn(); !strings.Contains(dsn, `password='p\'w'`) || !strings.Contains(dsn, "host='db1'") {
		t.Fatalf("dsn %s", dsn)
	}
}

// Verify is on by default; --no-verify turns it off, and of the two flags
// the last one given wins.
func TestVerifyFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{nil, true},
		{[]string{"--verify"}, true},
		{[]string{"--no-verify"}, false},
		{[]string{"--no-verify", "--verify"}, true},
		{[]string{"--verify", "--no-verify"}, false},
		{[]string{"--verify=false"}, false},
	} {
		var errb bytes.Buffer
		c, err := parse(append([]string{"-c", "alter table t add column x int"}, tc.args...), &errb)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		o, err := c.options()
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if o.Verify != tc.want {
			t.Errorf("%v: verify %v, want %v", tc.args, o.Verify, tc.want)
		}
	}
}

// The original pg_tat's own command lines (its tests/regress/run_test.sh):
// several -c of one table applied together, --batch-size 0, the src alias
// of --copy-data-filter, repeated --command-after-switch, --version and
// --copy-progress-interval.
func TestOriginalCommandLines(t *testing.T) {
	db := testpg.NewDB(t)
	testpg.Exec(t, db, `create schema regress;
		create table regress.multi_level_partitioning (id serial, directory_id int not null, ts date not null, duration int,
		  primary key (id, ts)) partition by range (ts);
		create table regress.multi_level_partitioning_2024_01 partition of regress.multi_level_partitioning
		  for values from ('2024-01-01') to ('2024-02-01');
		create table regress.multi_level_partitioning_2024_02 partition of regress.multi_level_partitioning
		  for values from ('2024-02-01') to ('2024-03-01');
		insert into regress.multi_level_partitioning (directory_id, ts, duration)
		  select i % 200 + 1, '2024-01-01'::date + (i % 58), i % 10 - 2 from generate_series(1, 3000) i;
		create table regress.after_log (what text)`)
	run1 := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(append(connFlags(t, db), args...), &out, &errb)
		return code, out.String(), errb.String()
	}
	sum := query(t, db, "select count(*) || '/' || sum(duration) from regress.multi_level_partitioning")
	code, out, errs := run1("-c", "alter table regress.multi_level_partitioning alter column id type bigint using id::bigint",
		"-c", "alter table regress.multi_level_partitioning alter column directory_id type bigint using directory_id::bigint",
		"--copy-data-jobs", "2", "--create-index-jobs", "4", "--batch-size", "0", "--copy-progress-interval", "1",
		"--command-after-switch", "insert into regress.after_log values ('one')",
		"--command-after-switch", "insert into regress.after_log values ('two');")
	if code != 0 {
		t.Fatalf("several -c: exit %d: %s %s", code, out, errs)
	}
	if got := query(t, db, `select string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' order by attnum)
		from pg_attribute where attrelid = 'regress.multi_level_partitioning'::regclass and attname in ('id', 'directory_id')`); got != "id:bigint,directory_id:bigint" {
		t.Fatalf("not both commands applied: %s", got)
	}
	if got := query(t, db, "select count(*) || '/' || sum(duration) from regress.multi_level_partitioning"); got != sum {
		t.Fatalf("content %s, want %s", got, sum)
	}
	if got := query(t, db, "select string_agg(what, ',' order by what) from regress.after_log"); got != "one,two" {
		t.Fatalf("repeated --command-after-switch ran %q", got)
	}

	// --copy-data-filter with the original's alias src for the table.
	if code, _, errs := run1("-c", "alter table regress.multi_level_partitioning alter column duration type bigint",
		"--copy-data-filter", "src.duration >= 0"); code != 0 {
		t.Fatalf("filter with src: %s", errs)
	}
	if got := query(t, db, "select count(*) filter (where duration < 0) || '/' || count(*) from regress.multi_level_partitioning"); got != "0/2400" {
		t.Fatalf("filtered content: %s", got)
	}

	// Commands of two tables cannot be applied together: refused, nothing done.
	if code, _, errs := run1("-c", "alter table regress.multi_level_partitioning alter column duration type int",
		"-c", "alter table regress.after_log alter column what type varchar"); code != 2 || !strings.Contains(errs, "same table") {
		t.Fatalf("two tables: exit %d %s", code, errs)
	}
	if code, out, _ := run1("--version"); code != 0 || !strings.HasPrefix(out, "pg_tat ") {
		t.Fatalf("--version: %d %q", code, out)
	}
}
