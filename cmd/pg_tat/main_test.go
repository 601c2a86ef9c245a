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
