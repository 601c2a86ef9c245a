package sqlapi

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// security_test.go: what a role that is not a superuser can do with schema
// tat, tried as an attacker would. mallory owns tables of her own and tries
// to see, control or alter the jobs and tables of victim (another ordinary
// role) and of the superuser; install.sql must refuse her clearly and leave
// everything as it was.

// cast is the set of roles of one test; names are cluster-wide, so they are
// made unique to the test's database.
type cast struct {
	url                              string
	su                               *pgx.Conn // superuser
	mallory, victim, bystander, boss string    // boss: a superuser role
}

func newCast(t *testing.T) *cast {
	t.Helper()
	url, su := setup(t)
	ctx := context.Background()
	var db string
	if err := su.QueryRow(ctx, "select current_database()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	k := &cast{url: url, su: su, mallory: db + "_mallory", victim: db + "_victim", bystander: db + "_bystander", boss: db + "_boss"}
	roles := []string{k.mallory, k.victim, k.bystander, k.boss}
	for _, r := range roles[:3] {
		mustExec(t, su, "create role "+r+" nosuperuser")
		mustExec(t, su, "grant create on schema public to "+r)
	}
	mustExec(t, su, "create role "+k.boss+" superuser")
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), url)
		if err == nil {
			_, _ = c.Exec(context.Background(), "drop owned by "+strings.Join(roles, ", ")+" cascade")
			c.Close(context.Background())
		}
		for _, r := range roles {
			testpg.Exec(t, testpg.Shared().URL, "drop role if exists "+r)
		}
	})
	return k
}

// as opens a session whose session and current user are role (SET SESSION
// AUTHORIZATION: as if it had logged in). notices collects the NOTICEs.
func (k *cast) as(t *testing.T, role string, notices *[]string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(k.url)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	if notices != nil {
		cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
			mu.Lock()
			*notices = append(*notices, n.Message)
			mu.Unlock()
		}
	}
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	mustExec(t, c, "set session authorization "+role)
	return c
}

// queue queues command on c and returns the job id.
func queue(t *testing.T, c *pgx.Conn, command string) int64 {
	t.Helper()
	var id int64
	if err := c.QueryRow(context.Background(), "select tat.alter($1)", command).Scan(&id); err != nil {
		t.Fatalf("tat.alter(%q): %v", command, err)
	}
	return id
}

// ids runs a query returning job ids and gives them sorted, without duplicates.
func ids(t *testing.T, c *pgx.Conn, sql string) []int64 {
	t.Helper()
	rows, err := c.Query(context.Background(), sql)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	seen := map[int64]bool{}
	var out []int64
	for _, id := range got {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// dump is every row of a view as text, to look for what must not be there.
func dump(t *testing.T, c *pgx.Conn, view string) string {
	t.Helper()
	var s string
	if err := c.QueryRow(context.Background(), "select coalesce(string_agg(v::text, E'\\n'), '') from "+view+" v").Scan(&s); err != nil {
		t.Fatalf("%s: %v", view, err)
	}
	return s
}

// jobState is what an attacker must not change about a job.
func jobState(t *testing.T, su *pgx.Conn, id int64) string {
	t.Helper()
	var s string
	if err := su.QueryRow(context.Background(), `select format('%s %s %s %s %s %s %s', state, switch_requested, cancel_requested,
		pause_requested, options, (select count(*) from tat.events where job = $1), (select count(*) from tat.requests))
		from tat.migrations where id = $1`, id).Scan(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// The status views show every role exactly the jobs it requested or that
// are on tables it owns, on every PostgreSQL version (the filter is in the
// views, which read their tables as their owner).
func TestSecurityStatusViewsShowOwnJobsOnly(t *testing.T) {
	t.Parallel()
	k := newCast(t)
	ctx := context.Background()
	victim := k.as(t, k.victim, nil)
	mustExec(t, victim, "create table vt1 (id int primary key); create table vt2 (id int primary key); create table vt3 (id int primary key)")
	a := queue(t, victim, "alter table vt1 add column secret_victim_a int")
	// queued by the superuser on the victim's table: the victim sees it (owner)
	b := queue(t, k.su, "alter table vt2 add column secret_su_b int")
	// queued by the superuser on its own table: only the superuser (and monitors)
	mustExec(t, k.su, "create table st (id int primary key)")
	s := queue(t, k.su, "alter table st add column secret_su_s int")

	var notices []string
	mallory := k.as(t, k.mallory, &notices)
	mustExec(t, mallory, "create table mt (id int primary key); create table gone (id int primary key)")
	m := queue(t, mallory, "alter table mt add column mallory_m int")
	g := queue(t, mallory, "alter table gone add column mallory_g int")
	mustExec(t, k.su, "update tat.migrations set state = 'failed', error = 'mallory error', error_phase = 'copy', finished_at = now() where id = $1", g)
	mustExec(t, mallory, "drop table gone") // a job whose table is gone: its requester still sees it
	// failed jobs of the others (tat.errors) and phases (tat.phase_timings)
	mustExec(t, k.su, "update tat.migrations set state = 'failed', error = 'secret_error_a', error_phase = 'copy', finished_at = now() where id = $1", a)
	for _, id := range []int64{a, b, s, m, g} {
		mustExec(t, k.su, "insert into tat.events (job, phase, message) values ($1, 'copy', 'phase copy')", id)
	}
	mustExec(t, k.su, "insert into tat.events (job, phase, message) values ($1, 'copy', 'secret_event_b')", b)

	views := map[string]string{ // view -> its job id column
		"tat.status": "id", "tat.progress": "id", "tat.errors": "id", "tat.events": "job",
		"tat.phase_timings": "job", "tat.migrations": "id",
	}
	want := func(who string, c *pgx.Conn, expect map[string][]int64, secrets ...string) {
		t.Helper()
		for view, col := range views {
			got := ids(t, c, fmt.Sprintf("select %s from %s", col, view))
			if fmt.Sprint(got) != fmt.Sprint(expect[view]) {
				t.Errorf("%s sees jobs %v in %s, want %v", who, got, view, expect[view])
			}
			text := dump(t, c, view)
			for _, secret := range secrets {
				if strings.Contains(text, secret) {
					t.Errorf("%s sees %q in %s", who, secret, view)
				}
			}
		}
	}
	// mallory: her two jobs (the failed one also in tat.errors), nothing of the others
	want("mallory", mallory, map[string][]int64{
		"tat.status": {m, g}, "tat.progress": {m, g}, "tat.errors": {g}, "tat.events": {m, g},
		"tat.phase_timings": {m, g}, "tat.migrations": {m, g},
	}, "secret", "vt1", "vt2", "public.st")
	// the victim: its job and the superuser's job on its table
	want("victim", victim, map[string][]int64{
		"tat.status": {a, b}, "tat.progress": {a, b}, "tat.errors": {a}, "tat.events": {a, b},
		"tat.phase_timings": {a, b}, "tat.migrations": {a, b},
	}, "mallory", "secret_su_s")
	// a role with no job and no table: nothing, and no error
	bystander := k.as(t, k.bystander, nil)
	want("bystander", bystander, map[string][]int64{}, "secret", "mallory")
	// the superuser sees every job
	all := []int64{a, b, s, m, g}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	want("superuser", k.su, map[string][]int64{
		"tat.status": all, "tat.progress": all, "tat.errors": {a, g}, "tat.events": all,
		"tat.phase_timings": all, "tat.migrations": all,
	})
	// the monitoring grant (an explicit SELECT on tat.status) shows every job
	// in every view; tat.migrations stays what the role may control
	mustExec(t, k.su, "grant select on tat.status to "+k.bystander)
	want("monitor", bystander, map[string][]int64{
		"tat.status": all, "tat.progress": all, "tat.errors": {a, g}, "tat.events": all,
		"tat.phase_timings": all, "tat.migrations": nil,
	})
	mustExec(t, k.su, "revoke select on tat.status from "+k.bystander)
	want("former monitor", bystander, map[string][]int64{}, "secret")

	// A cheap function of mallory in her WHERE clause must not see the rows
	// the view hides (the views are security barriers).
	mustExec(t, mallory, `create function leak(text) returns boolean language plpgsql immutable cost 0.0000001
		as $$ begin raise notice 'leak: %', $1; return true; end $$`)
	for view, col := range map[string]string{"tat.status": "command", "tat.progress": `"table"`, "tat.errors": "command",
		"tat.events": "message", "tat.phase_timings": "job::text", "tat.migrations": "command"} {
		if _, err := mallory.Exec(ctx, fmt.Sprintf("select * from %s where leak(%s)", view, col)); err != nil {
			t.Fatalf("%s: %v", view, err)
		}
		if _, err := mallory.Exec(ctx, fmt.Sprintf("select * from %s v where leak(v::text)", view)); err != nil {
			t.Fatalf("%s: %v", view, err)
		}
	}
	if len(notices) == 0 {
		t.Fatal("the leak function never ran: the test proves nothing")
	}
	for _, n := range notices {
		if strings.Contains(n, "secret") || strings.Contains(n, "vt") || strings.Contains(n, "public.st") ||
			n == fmt.Sprintf("leak: %d", a) || n == fmt.Sprintf("leak: %d", b) || n == fmt.Sprintf("leak: %d", s) {
			t.Errorf("leaked through a condition on a view: %q", n)
		}
	}
}

// After the switch the table is a new relation (a new OID) under the same
// name: its owner keeps seeing the job. A table dropped and re-created under
// the same name by another role does not show that role the old jobs.
func TestSecurityStatusAfterSwitchAndDrop(t *testing.T) {
	t.Parallel()
	k := newCast(t)
	ctx := context.Background()
	victim := k.as(t, k.victim, nil)
	mustExec(t, victim, "create table swapped (id int primary key); create table dropped (id int primary key)")
	sw := queue(t, k.su, "alter table swapped add column secret_swapped int")
	dr := queue(t, k.su, "alter table dropped add column secret_dropped int")
	// what the switch does: the shadow, built meanwhile, replaces the table
	mustExec(t, victim, "create table swapped__tat_new (id bigint primary key)")
	if _, ok, err := Claim(ctx, k.su, sw, "r1"); err != nil || !ok {
		t.Fatalf("claim: %v %v", ok, err)
	}
	mustExec(t, victim, "drop table swapped; alter table swapped__tat_new rename to swapped")
	if err := MarkDone(ctx, k.su, sw, "r1"); err != nil {
		t.Fatal(err)
	}
	if got := ids(t, victim, "select id from tat.status"); fmt.Sprint(got) != fmt.Sprint([]int64{sw, dr}) {
		t.Fatalf("victim sees %v after the switch, want [%d %d]", got, sw, dr)
	}
	// the victim drops a table; mallory creates one with the same name
	mustExec(t, k.su, "update tat.migrations set state = 'cancelled', finished_at = now() where id = $1", dr)
	mustExec(t, victim, "drop table dropped")
	mallory := k.as(t, k.mallory, nil)
	mustExec(t, mallory, "create table dropped (id int primary key)")
	for _, view := range []string{"tat.status", "tat.migrations", "tat.events"} {
		col := "id"
		if view == "tat.events" {
			col = "job"
		}
		if got := ids(t, mallory, fmt.Sprintf("select %s from %s", col, view)); len(got) != 0 {
			t.Errorf("mallory sees the jobs %v of the table she re-created, in %s", got, view)
		}
	}
}

// mallory cannot see, control or alter what is not hers: every control
// function refuses her clearly and changes nothing.
func TestSecurityControlOfOthersRefused(t *testing.T) {
	t.Parallel()
	k := newCast(t)
	ctx := context.Background()
	victim := k.as(t, k.victim, nil)
	mustExec(t, victim, `create table vt (id int primary key); create table "it's ""quoted""" (id int primary key);
		create table done_t (id int primary key)`)
	vj := queue(t, victim, "alter table vt add column x int")
	sj := queue(t, k.su, "alter table done_t add column x int") // the superuser's job on the victim's table
	mallory := k.as(t, k.mallory, nil)
	mustExec(t, mallory, "create table mt (id int primary key)")

	for _, job := range []int64{vj, sj} {
		before := jobState(t, k.su, job)
		for _, call := range []string{
			"select tat.cancel($1)", "select tat.pause($1)", "select tat.resume($1)", "select tat.switch($1)",
			"select tat.set($1, 'batch_size', '1')", "select tat.set($1, 'max_active_sessions', null)",
			"select tat.wait($1, '1s')",
		} {
			_, err := mallory.Exec(ctx, call, job)
			wantPgError(t, err, "P0002", fmt.Sprintf("migration %d does not exist", job))
		}
		// not through the tables either
		for _, sql := range []string{
			"insert into tat.requests (action, job) values ('cancel', $1)",
			"update tat.migrations set cancel_requested = true where id = $1",
			"delete from tat.migrations where id = $1",
			"delete from tat.events where job = $1",
			"insert into tat.events (job, message) values ($1, 'forged')",
			"insert into tat.requests (action, job, requested_by) values ('cancel', $1, 'postgres')",
		} {
			_, err := mallory.Exec(ctx, sql, job)
			if err == nil {
				t.Errorf("%s: accepted", sql)
				continue
			}
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || (pe.Code != "42501" && pe.Code != "P0002") {
				t.Errorf("%s: %v", sql, err)
			}
		}
		if after := jobState(t, k.su, job); after != before {
			t.Errorf("job %d changed: %s -> %s", job, before, after)
		}
	}
	// tables of another role: refused with 42501, by name or by OID, quotes and all
	var vtOID, quotedOID uint32
	if err := k.su.QueryRow(ctx, `select 'vt'::regclass::oid, '"it''s ""quoted"""'::regclass::oid`).Scan(&vtOID, &quotedOID); err != nil {
		t.Fatal(err)
	}
	var requests int
	_ = k.su.QueryRow(ctx, "select count(*) from tat.requests").Scan(&requests)
	for _, tc := range []struct{ sql, msg string }{
		{"select tat.cleanup('vt')", "must be owner of table vt"},
		{fmt.Sprintf("select tat.cleanup(%d::oid::regclass)", quotedOID), `must be owner of table it's "quoted"`},
		{fmt.Sprintf("insert into tat.requests (action, table_oid) values ('cleanup', %d)", vtOID), "must be owner of table vt"},
		{"select tat.alter('alter table vt add column y int')", "must be owner of table vt"},
		{"select tat.alter('alter table public.vt add column y int')", "must be owner of table vt"},
		{`select tat.alter('alter table "it''s ""quoted""" add column y int')`, `must be owner of table it's "quoted"`},
		{"select tat.alter('alter table only vt add column y int', copy_data_jobs => 2)", "must be owner of table vt"},
		{"insert into tat.migrations (command) values ('alter table vt add column y int')", "must be owner of table vt"},
	} {
		_, err := mallory.Exec(ctx, tc.sql)
		wantPgError(t, err, "42501", tc.msg)
	}
	var n, after int
	if err := k.su.QueryRow(ctx, "select count(*) from tat.migrations where table_oid in ($1, $2)", vtOID, quotedOID).Scan(&n); err != nil || n != 1 {
		t.Fatalf("jobs on the victim's tables: %d (err %v)", n, err)
	}
	if err := k.su.QueryRow(ctx, "select count(*) from tat.requests").Scan(&after); err != nil || after != requests {
		t.Fatalf("requests %d -> %d (err %v)", requests, after, err)
	}
	// the definer helpers are not hers to call
	for _, sql := range []string{
		"select * from tat._active_job('vt'::regclass)", "select tat._notify('cancel:1')", "select tat._channel()",
		"select tat._runner_alive(1)", "select tat._insert_trigger('mt', 'x', 'before', 'tat._migrations_before_insert')",
		"select * from tat.settings", "select * from tat.requests",
	} {
		_, err := mallory.Exec(ctx, sql)
		wantPgError(t, err, "42501", "permission denied")
	}

	// her own table, named with quotes, is hers to migrate; the job's name is quoted right
	mustExec(t, mallory, `create table "m'y ""t""" (id int primary key)`)
	mj := queue(t, mallory, `alter table "m'y ""t""" add column c text default '''); drop table vt; --'`)
	var table, event string
	if err := mallory.QueryRow(ctx, "select table_name, (select message from tat.events where job = $1) from tat.status where id = $1", mj).
		Scan(&table, &event); err != nil {
		t.Fatal(err)
	}
	if table != `public."m'y ""t"""` || !strings.HasSuffix(event, `default '''); drop table vt; --'`) {
		t.Fatalf("table_name %s, event %q", table, event)
	}
	// a failed job of hers, cancelled: the cleanup request is recorded as hers
	mustExec(t, k.su, "update tat.migrations set state = 'failed', error = 'x' where id = $1", mj)
	mustExec(t, mallory, "select tat.cancel($1)", mj)
	var by string
	if err := k.su.QueryRow(ctx, "select requested_by from tat.requests where action = 'cleanup' order by id desc limit 1").Scan(&by); err != nil || by != k.mallory {
		t.Fatalf("cleanup after cancel requested by %q (err %v), want %s", by, err, k.mallory)
	}
	if err := k.su.QueryRow(ctx, "select count(*) from pg_class where relname = 'vt'").Scan(&n); err != nil || n != 1 {
		t.Fatalf("vt: %d %v", n, err)
	}
}

// The checks of tat.alter are not hers to replace: functions and operators
// of her own, first in her search_path, change nothing.
func TestSecuritySearchPathCannotSubvertChecks(t *testing.T) {
	t.Parallel()
	k := newCast(t)
	ctx := context.Background()
	victim := k.as(t, k.victim, nil)
	mustExec(t, victim, "create table vt (id int primary key)")
	mustExec(t, k.su, "create schema evil authorization "+k.mallory)
	mallory := k.as(t, k.mallory, nil)
	mustExec(t, mallory, `create table mt (id int primary key);
		create function evil.yes(name, name) returns boolean language sql immutable as 'select true';
		create function evil.yes(oid, oid) returns boolean language sql immutable as 'select true';
		create function evil.pg_has_role(name, oid, text) returns boolean language sql as 'select true';
		create function evil.pg_has_role(oid, oid, text) returns boolean language sql as 'select true';
		create function evil.pg_has_role(name, name, text) returns boolean language sql as 'select true';
		create function evil.to_regclass(text) returns regclass language sql as 'select ''mt''::regclass';
		create function evil.btrim(text, text) returns text language sql as 'select ''x''';
		create operator evil.= (leftarg = name, rightarg = name, function = evil.yes);
		create operator evil.= (leftarg = oid, rightarg = oid, function = evil.yes);
		set search_path = evil, pg_catalog, public`)
	vj := queue(t, victim, "alter table vt add column z int")
	before := jobState(t, k.su, vj)
	for _, tc := range []struct{ sql, code, msg string }{
		{"select tat.alter('alter table vt add column y int')", "42501", "must be owner of table vt"},
		{"insert into tat.migrations (command) values ('alter table vt add column y int')", "42501", "must be owner of table vt"},
		{"select tat.alter('alter table mt add column y int', throttle_query => 'select true')", "42501", "only a superuser may set throttle_query"},
		{"select tat.alter('alter table mt add column y int', command_before_switch => 'reset role')", "42501", "only a superuser"},
		{"select tat.cleanup('public.vt')", "42501", "must be owner of table vt"},
		{"select tat.alter('  ')", "22023", "command must not be empty"},
	} {
		_, err := mallory.Exec(ctx, tc.sql)
		wantPgError(t, err, tc.code, tc.msg)
	}
	var n int
	if err := k.su.QueryRow(ctx, "select count(*) from tat.migrations where requested_by = $1", k.mallory).Scan(&n); err != nil || n != 0 {
		t.Fatalf("mallory queued %d jobs (err %v)", n, err)
	}
	if after := jobState(t, k.su, vj); after != before {
		t.Errorf("the victim's job changed: %s -> %s", before, after)
	}
	// her own table still resolves with her search_path
	queue(t, mallory, "alter table mt add column y int")
}

// throttle_query, command_before_switch and command_after_switch would run
// her SQL in tatd's own sessions: refused for roles that are not superusers
// (42501), accepted for superusers.
func TestSecurityCallerSQLOptionsNeedSuperuser(t *testing.T) {
	t.Parallel()
	k := newCast(t)
	ctx := context.Background()
	mallory := k.as(t, k.mallory, nil)
	mustExec(t, mallory, "create table mt (id int primary key); create table mt2 (id int primary key)")
	for _, opt := range []string{"throttle_query", "command_before_switch", "command_after_switch"} {
		value := "select pg_catalog.set_config('role', session_user::text, true) is not null"
		for _, sql := range []string{
			fmt.Sprintf("select tat.alter('alter table mt add column y int', %s => $1)", opt),
			`insert into tat.migrations (command, options) values ('alter table mt add column y int', jsonb_build_object('` + opt + `', $1::text))`,
		} {
			_, err := mallory.Exec(ctx, sql, value)
			wantPgError(t, err, "42501", "only a superuser may set "+opt)
			var pe *pgconn.PgError
			if errors.As(err, &pe) && !strings.Contains(pe.Message, "pg_tat command-line tool") {
				t.Errorf("the refusal does not say what to do: %s", pe.Message)
			}
		}
		// a superuser may
		var id int64
		if err := k.su.QueryRow(ctx, fmt.Sprintf("select tat.alter('alter table mt2 add column y int', %s => 'select false')", opt)).Scan(&id); err != nil {
			t.Fatalf("superuser refused %s: %v", opt, err)
		}
		mustExec(t, k.su, "select tat.cancel($1)", id)
	}
	// blank values are no SQL: accepted
	mj := queue(t, mallory, "alter table mt add column y int")
	mustExec(t, mallory, "select tat.cancel($1)", mj)
	var blank int64
	if err := mallory.QueryRow(ctx, "select tat.alter('alter table mt add column y int', throttle_query => '  ')").Scan(&blank); err != nil {
		t.Fatalf("blank throttle_query: %v", err)
	}
	// tat.set: not by her, not on her job; removing it is allowed
	_, err := mallory.Exec(ctx, "select tat.set($1, 'throttle_query', 'select true')", blank)
	wantPgError(t, err, "42501", "only a superuser may set throttle_query")
	mustExec(t, mallory, "select tat.set($1, 'throttle_query', null)", blank)
	_, err = k.su.Exec(ctx, "select tat.set($1, 'throttle_query', 'select true')", blank)
	wantPgError(t, err, "42501", "only be set on jobs queued by a superuser")
	var tq *string
	if err := k.su.QueryRow(ctx, "select options->>'throttle_query' from tat.migrations where id = $1", blank).Scan(&tq); err != nil || tq != nil {
		t.Fatalf("throttle_query = %v (err %v)", tq, err)
	}
	// on a superuser's job, a superuser may
	mustExec(t, k.su, "select tat.cancel($1)", blank)
	boss := k.as(t, k.boss, nil)
	bj := queue(t, boss, "alter table mt add column y int")
	mustExec(t, k.su, "select tat.set($1, 'throttle_query', 'select false')", bj)
}

// A requester who lost the superuser attribute after queueing: tatd does not
// run her throttle query; the job holds, saying why, in throttle_reason and
// once in the timeline.
func TestSecurityThrottleQueryRequesterNoLongerSuperuser(t *testing.T) {
	t.Parallel()
	k := newCast(t)
	ctx := context.Background()
	boss := k.as(t, k.boss, nil)
	mustExec(t, boss, "create table bt (id int primary key)")
	var id int64
	if err := boss.QueryRow(ctx, "select tat.alter('alter table bt add column y int', throttle_query => format('select current_user = %L', current_user))").Scan(&id); err != nil {
		t.Fatal(err)
	}
	pool := testpg.Pool(t, k.url)
	ctl := NewControl(pool, id)
	if s, err := ctl.Steer(ctx); err != nil || s.ThrottleReason != "throttle_query returned true" {
		t.Fatalf("superuser requester: %+v %v", s, err)
	}
	mustExec(t, k.su, "alter role "+k.boss+" nosuperuser")
	for i := 0; i < 3; i++ {
		ctl.mu.Lock()
		ctl.lastCheck = ctl.lastCheck.AddDate(0, 0, -1) // past the cache
		ctl.mu.Unlock()
		s, err := ctl.Steer(ctx)
		if err != nil || !strings.HasPrefix(s.ThrottleReason, "throttle_query refused: requester "+k.boss+" is not a superuser") {
			t.Fatalf("after demotion: %+v %v", s, err)
		}
	}
	var n int
	if err := k.su.QueryRow(ctx, "select count(*) from tat.events where job = $1 and message like 'throttle_query refused: %'", id).Scan(&n); err != nil || n != 1 {
		t.Fatalf("refusal events: %d (err %v)", n, err)
	}
	// removing the query frees the job
	mustExec(t, boss, "select tat.set($1, 'throttle_query', null)", id)
	ctl = NewControl(pool, id)
	if s, err := ctl.Steer(ctx); err != nil || s.ThrottleReason != "" {
		t.Fatalf("without the query: %+v %v", s, err)
	}
}

// Every SECURITY DEFINER function of schema tat pins search_path, runs no
// dynamic SQL and is not callable by PUBLIC unless harmless; every other
// function pins search_path too, except the two that must resolve the
// caller's table name with the caller's search_path.
func TestSecurityDefinerFunctionsPinned(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	ctx := context.Background()
	rows, err := c.Query(ctx, `select p.proname::text, p.prosecdef, coalesce(array_to_string(p.proconfig, ';'), ''), p.prosrc,
		has_function_privilege('public', p.oid, 'execute')
		from pg_proc p where p.pronamespace = 'tat'::regnamespace order by 1`)
	if err != nil {
		t.Fatal(err)
	}
	type fn struct {
		name, config, src string
		definer, public   bool
	}
	var fns []fn
	for rows.Next() {
		var f fn
		if err := rows.Scan(&f.name, &f.definer, &f.config, &f.src, &f.public); err != nil {
			t.Fatal(err)
		}
		fns = append(fns, f)
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	unpinned := map[string]bool{"alter": true, "_migrations_before_insert": true}
	publicDefiners := map[string]bool{"_check_logical_capture": true}
	definers := 0
	for _, f := range fns {
		pinned := f.config == "search_path=pg_catalog, pg_temp"
		switch {
		case f.definer && !pinned:
			t.Errorf("SECURITY DEFINER tat.%s has config %q", f.name, f.config)
		case !f.definer && !pinned && !unpinned[f.name]:
			t.Errorf("tat.%s has no pinned search_path (%q)", f.name, f.config)
		case unpinned[f.name] && pinned:
			t.Errorf("tat.%s must resolve names with the caller's search_path", f.name)
		}
		if !f.definer {
			continue
		}
		definers++
		if regexp.MustCompile(`(?i)\bexecute\b`).MatchString(f.src) {
			t.Errorf("SECURITY DEFINER tat.%s runs dynamic SQL", f.name)
		}
		if f.public != publicDefiners[f.name] {
			t.Errorf("SECURITY DEFINER tat.%s: EXECUTE for PUBLIC = %v", f.name, f.public)
		}
	}
	if definers < 6 {
		t.Fatalf("only %d SECURITY DEFINER functions found", definers)
	}
	// the unpinned trigger only resolves the name, with qualified calls
	for _, f := range fns {
		if f.name == "_migrations_before_insert" && strings.Count(f.src, ";") > 2 {
			t.Errorf("tat._migrations_before_insert does more than resolve the table name:\n%s", f.src)
		}
	}
}
