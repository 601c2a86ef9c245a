package replicate_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// faithCase is one bullet of "Faithful swap": after the cut-over every
// property of the table and of its dependents is as before, except what the
// ALTER changed. The table is always t, with at least (id int unique, v
// text, n int); the harness fills it, copies it to the control ctl, and
// runs the ALTER under a writer that changes both in one transaction.
type faithCase struct {
	name string
	min  int    // server_version_num the case needs
	ext  string // an extension the case needs (skipped when the server lacks it)
	bug  string // known engine bug: the case runs only with TAT_KNOWN_BUGS set
	// setup creates t and its dependents. Tokens ROLE_A, ROLE_B, ROLE_C
	// (roles), TS_1, TS_2 (tablespaces), NAME63_1, NAME63_2 (63-byte
	// names) are replaced by names of the test's own.
	setup string
	// more is version-dependent setup, run after setup.
	more func(ver int) string
	// after runs once t holds its rows (data-dependent setup).
	after string
	alter string // default: alter table t alter column n type bigint
	// change is the ALTER's effect on the snapshot; default: n becomes
	// bigint in t (retype("t")).
	change func(s string) string
	// notInPlace says why the ALTER run in place (in a transaction rolled
	// back) must not give the same snapshot as change; empty: it must, which
	// checks the expectation itself.
	notInPlace string
	// wantErr: the engine refuses the ALTER with this message, before
	// anything is created.
	wantErr string
	opt     func(o *replicate.Options)
	check   func(t *testing.T, e *env, ev *events)
}

// retype is the default ALTER's effect: column n of the given tables (and
// partitions) goes from integer to bigint.
func retype(tables ...string) func(string) string {
	re := regexp.MustCompile(`(?m)^((?:partitioned )?table public\.(?:` + strings.Join(tables, "|") + `) column n: type )integer\b`)
	return func(s string) string { return re.ReplaceAllString(s, "${1}bigint") }
}

// dropLines removes the snapshot lines matching re.
func dropLines(s string, re string) string {
	return regexp.MustCompile(`(?m)^`+re+`.*\n`).ReplaceAllString(s, "")
}

const baseTable = `create table t (id int primary key, v text, n int);`

const defaultAlter = "alter table t alter column n type bigint"

func faithCases() []faithCase {
	return []faithCase{
		{name: "owner", setup: baseTable + `grant create on schema public to ROLE_A; create sequence t_seq;
			alter table t owner to ROLE_A; alter sequence t_seq owner to ROLE_A; alter sequence t_seq owned by t.v;
			create index t_n on t (n)`},
		{name: "unlogged", setup: `create unlogged table t (id int primary key, v text, n int,
			code int generated always as identity, s serial); create index t_n on t (n)`},
		{name: "tablespaces", setup: `create table t (id int primary key, v text, n int) tablespace TS_1;
			create index t_v on t (v) tablespace TS_2; create index t_n on t (n); create index t_n_ts on t (n, id) tablespace TS_1`},
		{name: "tablespace and options of constraint indexes",
			setup: `create table t (id int, v text, n int, constraint t_pkey primary key (id) with (fillfactor = 90) using index tablespace TS_1,
				constraint t_v_uniq unique (v, id) using index tablespace TS_2)`},
		{name: "access method", setup: `create access method heap2 type table handler heap_tableam_handler;
			create table t (id int primary key, v text, n int) using heap2`},
		{name: "reloptions", setup: `create table t (id int primary key, v text, n int) with (fillfactor = 50,
				autovacuum_enabled = false, toast.autovacuum_enabled = false, toast_tuple_target = 256, parallel_workers = 2,
				autovacuum_vacuum_scale_factor = 0.05);
			alter table t set (toast.autovacuum_vacuum_cost_delay = 5);
			create index t_n on t (n) with (fillfactor = 70)`,
			check: func(t *testing.T, e *env, _ *events) {
				// Rows the writer never touched (id > 2000) were written by the
				// copy: at fillfactor 50 a page holds about half the rows it
				// holds in the control (fillfactor 100).
				per := func(tb string) float64 {
					v := e.str(fmt.Sprintf(`select count(*)::float8 / count(distinct (ctid::text::point)[0]) from %s where id between 2200 and 2900`, tb))
					var f float64
					fmt.Sscan(v, &f)
					return f
				}
				if got, ctl := per("t"), per("ctl"); got > 0.65*ctl {
					t.Fatalf("fillfactor not honoured by the copy: %.1f rows per page, control %.1f", got, ctl)
				}
			}},
		{name: "row level security", setup: baseTable + `alter table t enable row level security; alter table t force row level security;
			create policy p_sel on t for select to ROLE_A using (id > 0);
			create policy p_ins on t as restrictive for insert to ROLE_A, ROLE_B with check (v is not null);
			create policy p_all on t using (true) with check (id < 100000000);
			comment on table t is 'rls'`},
		{name: "comments", setup: `create table t (id int primary key, v text, n int constraint t_n_check check (n > 0));
			create index t_n on t (n); create index t_v on t (v);
			comment on table t is 'the table'; comment on column t.v is 'v''s comment'; comment on column t.n is 'n';
			comment on index t_pkey is 'the key'; comment on index t_n is 'on n'; comment on index t_v is 'on v';
			comment on constraint t_n_check on t is 'positive'`},
		{name: "comments on key constraints, triggers, rules, policies and statistics",
			setup: baseTable + `create function t_trg() returns trigger language plpgsql as $$begin return new; end$$;
			create trigger t_a before update on t for each row execute function t_trg();
			create rule t_r1 as on update to t where new.v = 'nope' do instead nothing;
			create policy p_sel on t for select using (id > 0);
			comment on constraint t_pkey on t is 'pk'; comment on trigger t_a on t is 'before update';
			comment on rule t_r1 on t is 'no nope'; comment on policy p_sel on t is 'readers';
			create statistics t_s1 on id, v from t; comment on statistics t_s1 is 'mcv'`},
		{name: "grants", setup: baseTable + `grant select on t to ROLE_A; grant insert, update on t to ROLE_B with grant option;
			grant select on t to public; grant update (v) on t to ROLE_A; grant select (id, n) on t to public;
			grant references (id) on t to ROLE_C with grant option; grant update (n) on t to ROLE_B with grant option`},
		{name: "grants by another grantor",
			setup: baseTable + `grant insert on t to ROLE_B with grant option; grant update (n) on t to ROLE_B with grant option;
			set role ROLE_B; grant insert on t to ROLE_C; grant update (n) on t to ROLE_C; reset role`},
		{name: "extended statistics", setup: baseTable + `create statistics t_s1 (ndistinct, dependencies) on id, n from t;
			create statistics t_s2 (mcv) on v, n from t; create statistics t_s3 on id, v from t;
			alter statistics t_s3 set statistics 50`,
			more: func(ver int) string {
				if ver >= 140000 {
					return "create statistics t_s4 on (n + 1), lower(v) from t"
				}
				return ""
			}},
		{name: "column attributes", setup: `create table t (id int primary key, v text, n int, c text);
			alter table t alter column v set statistics 500, alter column v set storage external,
				alter column n set statistics 50, alter column n set (n_distinct = -0.5),
				alter column v set (n_distinct = 100, n_distinct_inherited = 50), alter column c set storage main`,
			more: func(ver int) string {
				if ver >= 140000 {
					return "alter table t alter column c set compression pglz, alter column v set compression pglz"
				}
				return ""
			}},
		{name: "replica identity full", setup: baseTable + `alter table t replica identity full`},
		{name: "replica identity index", setup: baseTable + `create unique index t_ri on t (id) include (v);
			alter table t replica identity using index t_ri`},
		{name: "publication", setup: baseTable + `create publication tp1 for table t;
			create publication tp2 for table t with (publish = 'insert, update', publish_via_partition_root = true)`},
		{name: "publication row filter and column list", min: 150000, setup: baseTable + `
			create publication tp1 for table t where (id > 10); create publication tp2 for table t (id, v);
			create publication tp3 for table t (id, v) where (id % 2 = 0)`},
		{name: "cluster on", setup: baseTable + `create index t_n on t (n); alter table t cluster on t_n`,
			after: "cluster t"},
		{name: "identity always", setup: `create table t (id int primary key, v text, n int,
			code int generated always as identity (start with 100 increment by 5 cache 3))`,
			check: identityContinues},
		{name: "identity by default", setup: `create table t (id int primary key, v text, n int,
			code bigint generated by default as identity (minvalue 10 maxvalue 100000000 cycle))`,
			check: identityContinues},
		{name: "serial", setup: `create table t (id int primary key, v text, n int, s serial, b bigserial)`,
			check: func(t *testing.T, e *env, _ *events) {
				max := e.str("select max(s) from t")
				if got := e.str("insert into t (id, v, n) values (-1, 'x', 1) returning s > " + max); got != "true" {
					t.Fatalf("serial did not continue past %s", max)
				}
			}},
		{name: "generated stored", setup: `create table t (id int primary key, v text, n int,
			g text generated always as (v || id::text) stored, h int generated always as (id * 2) stored)`,
			check: func(t *testing.T, e *env, _ *events) {
				if got := e.str("select count(*) from t where g is distinct from v || id::text or h <> id * 2"); got != "0" {
					t.Fatalf("%s rows with a stale generated column", got)
				}
			}},
		{name: "generated virtual", min: 180000, setup: `create table t (id int primary key, v text, n int,
			g text generated always as (v || id::text) virtual)`},
		{name: "collations", setup: `create collation t_coll from "C";
			create table t (id int primary key, v text, n int, c text collate "C", d varchar(20) collate t_coll, e text collate "POSIX");
			create index t_c on t (c collate "POSIX"); create index t_d on t (d)`},
		{name: "domains", setup: `create domain posint as int check (value > 0);
			create domain code_t as text collate "C" default 'x' constraint code_len check (length(value) < 50);
			create domain nn_t as int not null default 7;
			create table t (id int primary key, v text, n int, d posint, c code_t, m nn_t)`},
		{name: "composite and array types", setup: `create type pair as (a int, b text); create type mood as enum ('sad', 'ok');
			create type span as range (subtype = int4);
			create table t (id int primary key, v text, n int, p pair, pa pair[], ia int[], m mood default 'ok', ma mood[], s span)`,
			after: `update t set p = row(id, v), pa = array[row(id, 'x')::pair], ia = array[id, n], ma = '{sad,ok}', s = span(id, id + 5)`},
		{name: "defaults", setup: `create sequence t_free_seq;
			create table t (id int primary key, v text default 'dv', n int default 42, d1 int default 42,
			d2 timestamptz default now(), d3 text default 'a' || 'b', d4 bigint default nextval('t_free_seq'))`},
		{name: "primary key", setup: `create table t (id int, v text, n int, constraint t_key primary key (id));
			comment on index t_key is 'the key'`},
		{name: "primary key with include",
			setup: `create table t (id int, v text, n int, constraint t_key primary key (id) include (v))`},
		{name: "unique deferrable", setup: `create table t (id int primary key, v text, n int, u int,
			constraint t_u unique (u) deferrable initially deferred, constraint t_vid unique (v, id) deferrable)`,
			after: "update t set u = id",
			more: func(ver int) string {
				if ver >= 150000 {
					return "alter table t add constraint t_w unique nulls not distinct (u, id)"
				}
				return ""
			}},
		{name: "check", setup: `create table t (id int primary key, v text, n int check (n > 0),
			constraint t_id_check check (id > 0) no inherit, constraint t_v_check check (length(v) < 100000));
			alter table t add constraint t_nv check (id < 2000000000) not valid`},
		{name: "not null", setup: `create table t (id int primary key, v text not null, n int not null, w int)`,
			more: func(ver int) string {
				if ver >= 180000 {
					// Named and NOT VALID NOT NULL constraints (18+).
					return "alter table t alter column w set default 0, add constraint t_w_named not null w not valid"
				}
				return ""
			}},
		{name: "exclude", setup: `create table t (id int primary key, v text, n int, r int4range,
			exclude using gist (r with &&), constraint t_ex_v exclude using btree (v with =) where (v like 'zz%'))`,
			after: "update t set r = int4range(id * 10, id * 10 + 5)"},
		{name: "indexes", setup: `create function t_imm(int) returns int language sql immutable as 'select $1 * 2';
			create table t (id int primary key, v text, n int);
			create index t_part on t (n) where n > 100; create index t_expr on t (lower(v));
			create unique index t_inc on t (id) include (v, n); create index t_ops on t (v text_pattern_ops);
			create index t_desc on t (n desc nulls last, v asc nulls first); create index t_hash on t using hash (v);
			create index t_brin on t using brin (id) with (pages_per_range = 16);
			create index t_gin on t using gin (to_tsvector('simple', v)); create index t_fn on t (t_imm(id))`},
		{name: "invalid index",
			setup: baseTable + `create index t_n on t (n)`,
			// CREATE UNIQUE INDEX CONCURRENTLY fails on duplicates and leaves an invalid index.
			after:  "invalid index",
			change: func(s string) string { return dropLines(retype("t")(s), `index public\.t_bad `) },
			// In place the invalid index stays (ALTER TYPE does not touch it);
			// the engine does not rebuild it (building it would fail as it did)
			// and reports that with an event: after the swap it is gone.
			notInPlace: "the engine drops an invalid index instead of carrying it over",
			check: func(t *testing.T, e *env, ev *events) {
				if !ev.has("index t_bad is invalid on the original and is not rebuilt") {
					t.Fatalf("no event about the invalid index: %v", ev.msgs)
				}
			}},
		{name: "names of 63 bytes", setup: `create table t (id int primary key, v text, n int, constraint "NAME63_2" check (n > 0));
			create index "NAME63_1" on t (n); comment on index "NAME63_1" is 'long'`},
		{name: "triggers", setup: baseTable + `
			create table t_audit (tbl text, op text);
			create function t_trg() returns trigger language plpgsql as $$begin return coalesce(new, old); end$$;
			create function t_aud() returns trigger language plpgsql as
				$$begin insert into t_audit values (tg_table_name, tg_op); return null; end$$;
			create function t_stmt() returns trigger language plpgsql as $$begin return null; end$$;
			create trigger t_a before update on t for each row execute function t_trg();
			create trigger t_d after insert on t for each row execute function t_trg(); alter table t disable trigger t_d;
			create trigger t_r before insert on t for each row execute function t_trg(); alter table t enable replica trigger t_r;
			create trigger t_al after delete on t for each row execute function t_trg(); alter table t enable always trigger t_al;
			create trigger t_when before update of v on t for each row when (old.v is distinct from new.v) execute function t_trg();
			create trigger t_tt after update on t referencing new table as nt old table as ot for each statement execute function t_stmt();
			create constraint trigger t_con after insert on t deferrable initially deferred for each row execute function t_trg();
			create trigger t_audit after insert or update or delete on t for each row execute function t_aud()`,
			// The control gets the same audit trigger: the swap must neither
			// fire user triggers while copying nor lose them after.
			after: "audit ctl",
			check: func(t *testing.T, e *env, _ *events) {
				if got := e.str(`select count(*) filter (where tbl = 't') || '/' || count(*) filter (where tbl = 'ctl') from t_audit`); strings.Split(got, "/")[0] != strings.Split(got, "/")[1] {
					t.Fatalf("audit rows t/ctl: %s", got)
				}
			}},
		{name: "rules", setup: baseTable + `create table t_log (id int, what text);
			create rule t_r1 as on update to t where new.v = 'nope' do instead nothing;
			create rule t_r2 as on delete to t where old.id < 0 do also insert into t_log values (old.id, 'del');
			create rule t_r3 as on insert to t where new.id < -100 do instead nothing;
			alter table t disable rule t_r3`},
		{name: "views", setup: baseTable + `
			create view t_v1 with (security_barrier) as select id, v from t where id > 0;
			create view t_v2 as select id, v from t_v1 where id > 10 with local check option;
			create view t_v3 with (check_option = cascaded) as select id from t_v2;
			create view t_vj as select a.id, b.v from t a join t b using (id);
			create function t_vj_ins() returns trigger language plpgsql as $$begin return new; end$$;
			create trigger t_vj_io instead of insert on t_vj for each row execute function t_vj_ins();
			grant select on t_v1 to ROLE_A; grant insert on t_v2 to ROLE_B; grant select on t_v3 to public;
			comment on view t_v1 is 'barrier'; comment on column t_v1.v is 'vee'`,
			more: func(ver int) string {
				if ver >= 150000 {
					return "create view t_v4 with (security_invoker = true) as select id, v from t_v1"
				}
				return ""
			},
			check: func(t *testing.T, e *env, _ *events) {
				e.str("select count(*) from t_v3")
				e.exec("insert into t_v2 (id, v) values (1000001, 'through the view')")
			}},
		{name: "view column defaults and grants",
			setup: baseTable + `create view t_v1 as select id, v from t;
			alter view t_v1 alter column v set default 'dflt'; grant insert (id, v) on t_v1 to ROLE_A`,
			check: func(t *testing.T, e *env, _ *events) {
				e.exec("insert into t_v1 (id) values (1000001)")
				if got := e.str("select v from t where id = 1000001"); got != "dflt" {
					t.Fatalf("view default lost: %s", got)
				}
			}},
		{name: "materialized view", setup: baseTable + `create materialized view t_mv as select id, v from t;
			create unique index t_mv_id on t_mv (id); comment on materialized view t_mv is 'snap';
			comment on column t_mv.v is 'vee'; comment on index t_mv_id is 'key'; grant select on t_mv to ROLE_A;
			create view t_mv_v as select id from t_mv where id > 10; grant select on t_mv_v to ROLE_B;
			create materialized view t_mv_empty with (fillfactor = 70) as select id, length(v) as l from t with no data`,
			// Rebuilt over the new table before the lock (matview.go).
			check: func(t *testing.T, e *env, _ *events) {
				if got := e.str("select string_agg(relname || '=' || relispopulated, ',' order by relname) from pg_class where relname in ('t_mv', 't_mv_empty')"); got != "t_mv=true,t_mv_empty=false" {
					t.Fatalf("populated: %s", got)
				}
				e.str("select count(*) from t_mv_v")
				e.exec("refresh materialized view t_mv")
			}},
		{name: "materialized view through a view", setup: baseTable + `create view t_v as select id, v from t;
			create materialized view t_mv as select id from t_v`,
			wantErr: "through a view or another materialized view"},
		{name: "functions and procedures", setup: baseTable + `
			create function t_f1(r t) returns int language sql as 'select r.id';
			create function t_f2() returns setof t language sql stable as 'select * from t';
			create function t_f3(i int) returns t language sql as 'select * from t where id = i';
			create procedure t_p1(inout r t) language plpgsql as $$begin r.v := 'p'; end$$;
			create function t_f4() returns int language plpgsql as
				$$declare r t%rowtype; begin select * into r from t order by id limit 1; return r.id; end$$;
			comment on function t_f1(t) is 'rowtype'`,
			more: func(ver int) string {
				if ver >= 140000 {
					return "create function t_f5() returns bigint language sql begin atomic select count(*) from t; end"
				}
				return ""
			},
			check: func(t *testing.T, e *env, _ *events) {
				e.str("select count(*) from t_f2()")
				e.str("select t_f1(t) from t limit 1")
				e.str("select (t_f3(2500)).v")
				e.str("select t_f4()")
				e.exec("call t_p1(null)")
				if testpg.Version(t) >= 140000 {
					if got, want := e.str("select t_f5()"), e.str("select count(*) from t"); got != want {
						t.Fatalf("t_f5() = %s, want %s", got, want)
					}
				}
			}},
		{name: "foreign keys", setup: `create table t_par (id int primary key); insert into t_par select generate_series(1, 100);
			create table t (id int primary key, v text, n int,
				par int constraint t_par_fk references t_par on delete set null on update cascade deferrable,
				parent int, constraint t_self foreign key (parent) references t (id) on update cascade on delete set null deferrable initially deferred,
				constraint t_id_v unique (id, v));
			create table t_child (id int primary key, tid int constraint t_child_fk references t (id) on delete cascade on update cascade);
			create table t_child2 (id int primary key, tid int, tv text,
				constraint t_child2_fk foreign key (tid, tv) references t (id, v) match full on update cascade on delete cascade)`,
			after: `update t set par = 1 + id % 100, parent = id - 1 where id > 1;
				insert into t_child select g, g from generate_series(1, 2500) g;
				insert into t_child2 select id, id, v from t where id <= 2500`,
			check: func(t *testing.T, e *env, _ *events) {
				if got := e.str(`select count(*) from t_child c where not exists (select 1 from t where t.id = c.tid)`); got != "0" {
					t.Fatalf("%s orphans in t_child", got)
				}
				if got := e.str(`select count(*) from t_child2 c where not exists (select 1 from t where t.id = c.tid and t.v = c.tv)`); got != "0" {
					t.Fatalf("%s orphans in t_child2", got)
				}
				// The actions work on the new table.
				e.exec("delete from t where id = 2400")
				if got := e.str("select count(*) from t_child where tid = 2400"); got != "0" {
					t.Fatal("ON DELETE CASCADE did not reach t_child")
				}
				e.exec("update t set id = 5000000 where id = 2401")
				if got := e.str("select count(*) from t_child where tid = 5000000"); got != "1" {
					t.Fatal("ON UPDATE CASCADE did not reach t_child")
				}
				if got := e.str("select count(*) from pg_constraint where not convalidated"); got != "0" {
					t.Fatalf("%s constraints left NOT VALID", got)
				}
			}},
		{name: "vacuum freeze", setup: baseTable,
			opt: func(o *replicate.Options) { o.VacuumFreeze = true },
			check: func(t *testing.T, e *env, _ *events) {
				// VACUUM (FREEZE) sets the visibility map (ANALYZE alone leaves
				// relallvisible at 0 on a freshly loaded table), but the writer
				// may have dirtied every page since: then the vacuum counter
				// of the new table (its statistics moved with its OID) tells.
				// Before 15 statistics reach the views with a delay: poll.
				vacuumed := false
				for i := 0; i < 50 && !vacuumed; i++ {
					vacuumed = e.str(`select c.relallvisible > 0 or s.vacuum_count > 0 from pg_class c
						join pg_stat_user_tables s on s.relid = c.oid where c.oid = 't'::regclass`) == "true"
					if !vacuumed {
						time.Sleep(200 * time.Millisecond)
					}
				}
				if !vacuumed {
					t.Fatal("the new table was not vacuumed")
				}
				if got := e.str("select age(relfrozenxid) < (select age(relfrozenxid) from pg_class where oid = 'ctl'::regclass) from pg_class where oid = 't'::regclass"); got != "true" {
					t.Fatal("relfrozenxid did not advance past the control's")
				}
			}},
		{name: "partitions range", setup: `create table t (id int primary key, v text, n int) partition by range (id);
			create table t_p1 partition of t for values from (minvalue) to (1000);
			create table t_p2 partition of t for values from (1000) to (2000) with (fillfactor = 80);
			create table t_p3 partition of t for values from (2000) to (maxvalue);
			create index t_n on t (n); create index t_p2_v on t_p2 (v); comment on table t_p2 is 'middle';
			alter table t_p3 add constraint t_p3_chk check (id >= 0)`,
			change: retype("t", "t_p1", "t_p2", "t_p3")},
		{name: "partitions list", setup: `create table t (id int, region int not null default 0, v text, n int,
				primary key (id, region)) partition by list (region);
			create table t_r0 partition of t for values in (0);
			create table t_r12 partition of t for values in (1, 2);
			create table t_rdef partition of t default;
			create index t_n on t (n)`,
			after:  "update t set region = id % 4",
			change: retype("t", "t_r0", "t_r12", "t_rdef")},
		{name: "partitions hash", setup: `create table t (id int primary key, v text, n int) partition by hash (id);
			create table t_h0 partition of t for values with (modulus 3, remainder 0);
			create table t_h1 partition of t for values with (modulus 3, remainder 1);
			create table t_h2 partition of t for values with (modulus 3, remainder 2) with (autovacuum_enabled = false);
			create index t_v on t (v)`,
			change: retype("t", "t_h0", "t_h1", "t_h2")},
		{name: "partitions multi-level", setup: `create table t (id int primary key, v text, n int) partition by range (id);
			create table t_a partition of t for values from (minvalue) to (1500) partition by hash (id);
			create table t_a0 partition of t_a for values with (modulus 2, remainder 0);
			create table t_a1 partition of t_a for values with (modulus 2, remainder 1);
			create table t_b partition of t for values from (1500) to (2500) partition by range (id);
			create table t_b1 partition of t_b for values from (1500) to (2000);
			create table t_bdef partition of t_b default;
			create table t_def partition of t default;
			create index t_n on t (n); create index t_a0_v on t_a0 (v);
			alter table t_b1 add constraint t_b1_chk check (n > 0);
			create function t_trg() returns trigger language plpgsql as $$begin return new; end$$;
			create trigger t_upd before update on t for each row execute function t_trg();
			comment on table t_bdef is 'default of b'`,
			change: retype("t", "t_a", "t_a0", "t_a1", "t_b", "t_b1", "t_bdef", "t_def")},
		{name: "foreign partition, keys on the leaves", ext: "file_fdw", setup: `create server tat_srv foreign data wrapper file_fdw;
			create table t (id int, v text, n int) partition by range (id);
			create table t_p1 partition of t for values from (minvalue) to (2000) partition by range (id);
			create table t_p1a partition of t_p1 for values from (-999000) to (1000);
			create table t_p1b partition of t_p1 for values from (1000) to (2000);
			create table t_p2 partition of t for values from (2000) to (100000);
			alter table t_p1a add constraint t_p1a_pk primary key (id); alter table t_p1b add primary key (id);
			alter table t_p2 add primary key (id) with (fillfactor = 90); create index t_p2_n on t_p2 (n);
			create foreign table t_f partition of t_p1 for values from (minvalue) to (-999000) server tat_srv options (filename '/dev/null', format 'csv');
			alter foreign table t_f alter column v options (add force_not_null 'true'); alter foreign table t_f alter column n set default 7;
			comment on foreign table t_f is 'archive'; grant select on t_f to ROLE_A;
			create view t_view as select id, n from t`,
			alter: "alter table t alter column n type bigint using n::bigint",
			// In place PostgreSQL refuses USING on a foreign table.
			notInPlace: "USING on a tree with a foreign partition is refused in place",
			change: func(s string) string {
				s = retype("t", "t_p1", "t_p1a", "t_p1b", "t_p2")(s)
				return regexp.MustCompile(`(?m)^((?:foreign table public\.t_f|view public\.t_view) column n: type )integer\b`).ReplaceAllString(s, "${1}bigint")
			}},
	}
}

// identityContinues: the identity sequence goes on past the highest value.
func identityContinues(t *testing.T, e *env, _ *events) {
	max := e.str("select max(code) from t")
	if got := e.str("insert into t (id, v, n) values (-1, 'x', 1) returning code > " + max); got != "true" {
		t.Fatalf("identity did not continue past %s", max)
	}
}

// TestFaithfulSwap runs one ALTER per bullet of "Faithful swap" and
// compares the catalog snapshot (testpg.Schema, no pg_dump: it runs on
// every server of the matrix) before and after: the only difference must be
// the ALTER's, the content must equal the control's.
func TestFaithfulSwap(t *testing.T) {
	t.Parallel()
	for _, tc := range faithCases() {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			runFaithCase(t, tc)
		})
	}
}

// TestFaithfulRefusals: what the engine refuses, it refuses before
// creating anything, with a clear message. (Separate from TestFaithfulSwap
// so a case moves there once the engine supports it.)
func TestFaithfulRefusals(t *testing.T) {
	t.Parallel()
	cases := []faithCase{
		{name: "temporary table", wantErr: "temporary table"},
		{name: "system catalog", alter: "alter table pg_catalog.pg_description alter column description type varchar", wantErr: "system catalog"},
		{name: "no usable key", setup: `create table t (id int, v text, n int)`, wantErr: "no usable key"},
		{name: "inheritance parent", setup: baseTable + `create table t_kid (k int) inherits (t)`,
			wantErr: `inheritance child "public"."t_kid" has none on (id)`},
		{name: "inheritance child", setup: `create table t_base (id int primary key, v text, n int);
			create table t (w int) inherits (t_base); alter table t add primary key (id)`,
			wantErr: "inherit"},
		{name: "foreign-table partition beside a default partition", setup: `create foreign data wrapper tat_fdw; create server tat_srv foreign data wrapper tat_fdw;
			create table t (id int, v text, n int) partition by range (id);
			create table t_p1 partition of t for values from (minvalue) to (100000); alter table t_p1 add primary key (id);
			create table t_def partition of t default; alter table t_def add primary key (id);
			create foreign table t_f partition of t for values from (100000) to (200000) server tat_srv`,
			wantErr: "beside a DEFAULT partition"},
		{name: "partitions without a common key", setup: `create table t (id int, v text, n int) partition by range (id);
			create table t_p1 partition of t for values from (minvalue) to (1000); alter table t_p1 add primary key (id);
			create table t_p2 partition of t for values from (1000) to (maxvalue); alter table t_p2 add primary key (id, n)`,
			wantErr: "partitions' keys differ"},
		{name: "column of a publication's column list", min: 150000, setup: baseTable + `create publication tp for table t (id, n)`,
			// In place: "cannot alter type of a column used by a publication WHERE clause".
			wantErr: "publication"},
		{name: "rowtype used by a column", setup: baseTable + `create table t_holder (id int primary key, r t)`,
			wantErr: "t_holder"},
	}
	for _, tc := range cases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			runFaithCase(t, tc)
		})
	}
}

func runFaithCase(t *testing.T, tc faithCase) {
	if tc.min > 0 && testpg.Version(t) < tc.min {
		t.Skipf("needs server_version_num %d", tc.min)
	}
	if tc.bug != "" && os.Getenv("TAT_KNOWN_BUGS") == "" {
		t.Skip("known bug: " + tc.bug)
	}
	e := newEnv(t)
	ctx := context.Background()
	alter := tc.alter
	if alter == "" {
		alter = defaultAlter
	}
	change := tc.change
	if change == nil {
		change = retype("t")
	}
	setup := faithTokens(t, e, tc.setup)
	if tc.more != nil {
		setup += ";\n" + tc.more(testpg.Version(t))
	}
	if tc.name == "temporary table" {
		// A temporary table lives in its session's pg_temp_N, which the
		// engine's sessions can name but not read.
		conn, err := e.pool.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Release()
		var ns string
		if _, err := conn.Exec(ctx, "create temp table t (id int primary key, v text, n int)"); err != nil {
			t.Fatal(err)
		}
		if err := conn.QueryRow(ctx, "select pg_my_temp_schema()::regnamespace::text").Scan(&ns); err != nil {
			t.Fatal(err)
		}
		alter = "alter table " + ns + ".t alter column n type bigint"
	}
	if tc.ext != "" {
		if e.str("select count(*)::text from pg_available_extensions where name = '"+tc.ext+"'") != "1" {
			t.Skipf("the server has no %s", tc.ext)
		}
		e.exec("create extension if not exists " + tc.ext)
	}
	if setup != "" {
		e.exec(setup)
	}
	hasT := e.str("select to_regclass('public.t') is not null") == "true"
	if hasT {
		e.exec("insert into t (id, v, n) select g, md5(g::text), g from generate_series(1, 3000) g")
		switch tc.after {
		case "":
		case "invalid index":
			if _, err := e.pool.Exec(ctx, "create unique index concurrently t_bad on t ((id % 10))"); err == nil {
				t.Fatal("t_bad was built: the case needs an invalid index")
			}
		case "audit ctl":
		default:
			e.exec(tc.after)
		}
		if tc.wantErr == "" {
			e.exec("create table ctl (id int primary key, v text, n int); insert into ctl select id, v, n from t; analyze t")
		}
		if tc.after == "audit ctl" {
			e.exec("create trigger t_audit after insert or update or delete on ctl for each row execute function t_aud(); truncate t_audit")
		}
	}
	before := testpg.Schema(t, e.pool)
	want := before
	if tc.wantErr == "" {
		want = change(before)
		if want == before {
			t.Fatal("the expected change changes nothing: the case checks nothing")
		}
		if tc.notInPlace == "" {
			if inPlace := e.inPlaceSchema(alter); inPlace != want {
				t.Fatalf("the expected change is not what the ALTER does in place:\n%s", diff(want, inPlace))
			}
		}
	}

	o := opts(alter)
	if tc.opt != nil {
		tc.opt(&o)
	}
	ev := &events{}
	var w *writer
	if hasT && tc.wantErr == "" {
		w = e.startDML(1, []string{"t", "ctl"}, 2*time.Millisecond, faithWrites...)
	}
	err := runWith(e, o, ev)
	if w != nil {
		w.Stop(t)
	}
	if tc.wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			// Go on: what the schema and the leftovers look like matters too.
			t.Errorf("want an error with %q, got %v", tc.wantErr, err)
		}
		t.Logf("refused: %v", err)
	} else if err != nil {
		t.Fatal(err)
	}
	after := testpg.Schema(t, e.pool)
	if after != want {
		t.Errorf("schema differs beyond the ALTER (- want, + got):\n%s", diff(want, after))
	}
	if hasT {
		if tc.wantErr == "" {
			e.assertSame("t", "ctl", "id, v, n")
		}
		e.assertNoLeftovers("t")
	}
	if tc.check != nil {
		tc.check(t, e, ev)
	}
}

// faithWrites change t and ctl alike: rows 1..2000 only, so rows above stay
// as the copy wrote them. Key updates move rows between partitions.
var faithWrites = []stmtGen{
	func(r *rand.Rand) (string, []any) {
		return "update %s set n = n + 1, v = v || 'x' where id = $1", []any{1 + r.IntN(2000)}
	},
	func(r *rand.Rand) (string, []any) {
		return "delete from %s where id = $1", []any{1 + r.IntN(2000)}
	},
	func(r *rand.Rand) (string, []any) {
		return "insert into %s (id, v, n) select $1::int, md5($1::text), $1::int where not exists (select 1 from %[1]s where id = $1::int)", []any{1 + r.IntN(2000)}
	},
	func(r *rand.Rand) (string, []any) {
		return "update %s set id = id + 1000000 where id = $1 and not exists (select 1 from %[1]s where id = $1 + 1000000)", []any{1 + r.IntN(2000)}
	},
}

// inPlaceSchema is the snapshot the ALTER leaves when run in place, in a
// transaction that is rolled back.
func (e *env) inPlaceSchema(cmd string) string {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, cmd); err != nil {
		e.t.Fatalf("in place: %s: %v", cmd, err)
	}
	return testpg.Schema(e.t, tx)
}

// faithTokens replaces the tokens of a case's setup by names of the test's
// own, creating the roles and tablespaces (cluster-wide objects, hence the
// unique names) and dropping them when the test ends.
func faithTokens(t *testing.T, e *env, sql string) string {
	t.Helper()
	uniq := fmt.Sprintf("%d", time.Now().UnixNano()%1e12)
	var roles, spaces []string
	for _, tok := range []string{"ROLE_A", "ROLE_B", "ROLE_C"} {
		if strings.Contains(sql, tok) {
			name := "tat_" + strings.ToLower(tok) + "_" + uniq
			e.exec("create role " + name)
			roles = append(roles, name)
			sql = strings.ReplaceAll(sql, tok, name)
		}
	}
	for _, tok := range []string{"TS_1", "TS_2"} {
		if !strings.Contains(sql, tok) {
			continue
		}
		c := testpg.Shared()
		if c == nil {
			t.Skip("needs the harness's own cluster to create a tablespace directory")
		}
		name := "tat_" + strings.ToLower(tok) + "_" + uniq
		dir := filepath.Join(c.Dir, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Skipf("cannot create a tablespace directory: %v", err)
		}
		testpg.ChownToPostgres(t, dir)
		e.exec(fmt.Sprintf("create tablespace %s location '%s'", name, dir))
		spaces = append(spaces, name)
		sql = strings.ReplaceAll(sql, tok, name)
	}
	// 63 bytes, the longest name: multibyte, so truncation by bytes would
	// cut a character.
	sql = strings.ReplaceAll(sql, "NAME63_1", "t_Ünïcode_index_name_that_is_exactly_sixty_three_bytes_xxxxxx")
	sql = strings.ReplaceAll(sql, "NAME63_2", "t_Ünïcode_check_name_that_is_exactly_sixty_three_bytes_xxxxxx")
	if len(roles)+len(spaces) > 0 {
		t.Cleanup(func() {
			ctx := context.Background()
			if len(spaces) > 0 {
				// A tablespace is dropped only once empty.
				_, _ = e.pool.Exec(ctx, "drop schema public cascade")
				for _, s := range spaces {
					_, _ = e.pool.Exec(ctx, "drop tablespace if exists "+s)
				}
			}
			for _, r := range roles {
				_, _ = e.pool.Exec(ctx, "drop owned by "+r+" cascade")
				_, _ = e.pool.Exec(ctx, "drop role if exists "+r)
			}
		})
	}
	return sql
}
