package sqlapi

import (
	"context"
	"testing"
)

func TestAlterRefusals(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	ctx := context.Background()
	mustExec(t, c, `create table orders (id int primary key, note text);
		create table busy (id int primary key);
		create view v as select * from orders;
		create sequence s;
		create table parted (id int) partition by range (id);`)
	if _, err := c.Exec(ctx, "select tat.alter('alter table busy add column x int')"); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, sql, code, msg string
	}{
		{"null command", "select tat.alter(null)", "22023", "command must not be empty"},
		{"empty command", "select tat.alter('  ')", "22023", "command must not be empty"},
		{"only semicolon", "select tat.alter(' ; ')", "22023", "command must not be empty"},
		{"not alter table", "select tat.alter('drop table orders')", "0A000", "only runs ALTER TABLE"},
		{"alter index", "select tat.alter('alter index orders_pkey rename to x')", "0A000", "only runs ALTER TABLE"},
		{"two statements", "select tat.alter('alter table orders add x int; drop table orders')", "42601", "exactly one statement"},
		{"two statements after comment", "select tat.alter('alter table orders add x int; -- c\n drop table orders')", "42601", "exactly one statement"},
		{"unterminated quote", "select tat.alter('alter table orders add x text default ''a')", "42601", "unterminated"},
		{"missing table", "select tat.alter('alter table nope add x int')", "42P01", `"nope" does not exist`},
		{"missing table if exists", "select tat.alter('alter table if exists nope add x int')", "42P01", `"nope" does not exist`},
		{"missing schema table", "select tat.alter('alter table public.nope add x int')", "42P01", `"public.nope" does not exist`},
		{"a view", "select tat.alter('alter table v add x int')", "42809", "is not a table"},
		{"a sequence", "select tat.alter('alter table s add x int')", "42809", "is not a table"},
		{"active job", "select tat.alter('alter table busy add y int')", "55006", "already has an active migration"},
		{"bad capture", "select tat.alter('alter table orders add x int', capture => 'wal')", "22023", "capture must be"},
		{"bad switch", "select tat.alter('alter table orders add x int', switch => 'later')", "22023", "switch must be"},
		{"zero copy jobs", "select tat.alter('alter table orders add x int', copy_data_jobs => 0)", "22023", "copy_data_jobs"},
		{"zero index jobs", "select tat.alter('alter table orders add x int', create_index_jobs => 0)", "22023", "create_index_jobs"},
		{"negative batch", "select tat.alter('alter table orders add x int', batch_size => -1)", "22023", "batch_size"},
		{"zero lock timeout", "select tat.alter('alter table orders add x int', lock_timeout => '0s')", "22023", "lock_timeout"},
		{"negative pause", "select tat.alter('alter table orders add x int', time_between_locks => '-1s')", "22023", "time_between_locks"},
		{"negative delta", "select tat.alter('alter table orders add x int', min_delta_rows => -1)", "22023", "min_delta_rows"},
		{"bad work_mem", "select tat.alter('alter table orders add x int', work_mem => 'lots')", "22023", "work_mem"},
		{"bad workers", "select tat.alter('alter table orders add x int', max_parallel_maintenance_workers => -2)", "22023", "max_parallel_maintenance_workers"},
		{"null skip", "select tat.alter('alter table orders add x int', skip_fk_validation => null)", "22023", "skip_fk_validation"},
		{"unknown option direct", `insert into tat.migrations (command, options) values ('alter table orders add x int', '{"speed": 9}')`, "22023", "unknown option"},
		{"direct insert checked", `insert into tat.migrations (command) values ('drop table orders')`, "0A000", "only runs ALTER TABLE"},
	}
	for _, tc := range cases {
		_, err := c.Exec(ctx, tc.sql)
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
			continue
		}
		t.Run(tc.name, func(t *testing.T) { wantPgError(t, err, tc.code, tc.msg) })
	}

	// accepted forms
	for _, sql := range []string{
		"alter table orders alter column id type bigint;",
		"ALTER TABLE IF EXISTS ONLY public.\"parted\"\n  ADD COLUMN y int; -- trailing comment",
	} {
		var id int64
		if err := c.QueryRow(ctx, "select tat.alter($1)", sql).Scan(&id); err != nil {
			t.Fatalf("%q: %v", sql, err)
		}
	}
	var opts, table, capture string
	if err := c.QueryRow(ctx, `select options::text, table_name, capture from tat.migrations where table_name = 'public.orders'`).Scan(&opts, &table, &capture); err != nil {
		t.Fatal(err)
	}
	if capture != "trigger" || table != "public.orders" {
		t.Fatalf("capture=%q table=%q", capture, table)
	}
	job, err := Load(ctx, c, 0)
	if err == nil {
		t.Fatalf("load of job 0: %+v", job)
	}
}

func TestMoveColumnAccepted(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	mustExec(t, c, `create schema "My Schema"; create table "My Schema"."Orders" (a int, b int)`)
	ctx := context.Background()
	var id int64
	if err := c.QueryRow(ctx, `select tat.alter('alter table "My Schema"."Orders" move column b before a')`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	job, err := Load(ctx, c, id)
	if err != nil {
		t.Fatal(err)
	}
	table := job.TableName
	if err := ValidateCommand(job.Command); err != nil {
		t.Fatal(err)
	}
	if table != `"My Schema"."Orders"` {
		t.Fatalf("table_name = %s", table)
	}
}

func TestPrivileges(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	// role names are cluster-wide: make them unique to this database
	var db string
	if err := c.QueryRow(ctx, "select current_database()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	owner, stranger, member := db+"_owner", db+"_stranger", db+"_member"
	mustExec(t, c, "create role "+owner+"; create role "+stranger+"; create role "+member+" in role "+owner)
	t.Cleanup(func() {
		c2 := connect(t, url)
		_, _ = c2.Exec(ctx, "drop owned by "+owner+", "+stranger+", "+member+"; drop role "+owner+"; drop role "+stranger+"; drop role "+member)
	})
	mustExec(t, c, "create table owned (id int primary key); alter table owned owner to "+owner)
	mustExec(t, c, "create table other (id int primary key)")

	// The owner, with nothing but PUBLIC's USAGE + EXECUTE, queues a job on its table.
	mustExec(t, c, "set role "+owner)
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table owned add column x int')").Scan(&id); err != nil {
		t.Fatalf("owner refused: %v", err)
	}
	var by string
	if err := c.QueryRow(ctx, "select requested_by from tat.migrations where id = $1", id).Scan(&by); err != nil {
		t.Fatal(err)
	}
	if by != owner {
		t.Fatalf("requested_by = %q, want %q", by, owner)
	}
	// not the superuser's table
	_, err := c.Exec(ctx, "select tat.alter('alter table other add column x int')")
	wantPgError(t, err, "42501", "must be owner of table other")
	// cannot fake requested_by, nor write other columns
	_, err = c.Exec(ctx, "insert into tat.migrations (command, requested_by) values ('alter table owned add y int', 'postgres')")
	wantPgError(t, err, "42501", "permission denied")
	_, err = c.Exec(ctx, "update tat.migrations set state = 'done'")
	wantPgError(t, err, "42501", "permission denied")
	// the timeline of its own job (security_test.go tests what others see)
	var events int
	if err := c.QueryRow(ctx, "select count(*) from tat.events where job = $1", id).Scan(&events); err != nil || events != 1 {
		t.Fatalf("owner sees %d events of its job (err %v)", events, err)
	}
	mustExec(t, c, "reset role")

	// a stranger is refused and cannot see or control the job
	mustExec(t, c, "set role "+stranger)
	_, err = c.Exec(ctx, "select tat.alter('alter table owned add column z int')")
	wantPgError(t, err, "42501", "must be owner of table owned")
	var n int
	if err := c.QueryRow(ctx, "select count(*) from tat.migrations").Scan(&n); err != nil || n != 0 {
		t.Fatalf("stranger sees %d jobs (err %v)", n, err)
	}
	_, err = c.Exec(ctx, "select tat.cancel($1)", id)
	wantPgError(t, err, "P0002", "does not exist")
	mustExec(t, c, "reset role")

	// a member of the owning role may control it
	mustExec(t, c, "set role "+member)
	mustExec(t, c, "select tat.pause($1)", id)
	mustExec(t, c, "reset role")
	var state string
	if err := c.QueryRow(ctx, "select state from tat.migrations where id = $1", id).Scan(&state); err != nil || state != "paused" {
		t.Fatalf("state = %q, err %v", state, err)
	}

	// a monitoring role with only SELECT on tat.status sees every job
	mustExec(t, c, "grant select on tat.status to "+stranger)
	mustExec(t, c, "set role "+stranger)
	if err := c.QueryRow(ctx, "select count(*) from tat.status").Scan(&n); err != nil || n != 1 {
		t.Fatalf("monitor sees %d jobs (err %v)", n, err)
	}
	mustExec(t, c, "reset role")
}
