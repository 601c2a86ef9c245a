package main

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// The original pg_tat's own regression sequence (tests/regress/run_test.sh
// of andruche/pg-transparent-alter-table), ported: the same schema (a
// composite key, a directory under a publication, a multi-level partition
// tree with keys on the leaves only and a foreign partition on an "archive"
// server through postgres_fdw, an inheritance tree with a foreign child),
// the same command lines, the same writes started about a second after each
// run, the same count/sum checks; and the resulting schema is compared with
// the same ALTERs run in place on a copy of the source schema.

// regressSchema is the source database. ARCHIVE_TS, DBNAME and PORT are
// replaced by the test.
const regressSchema = `
create extension postgres_fdw;
create schema regress;
create schema archive_db;
comment on schema archive_db is 'stands for another database';
create type regress.entity_type as enum ('a', 'b', 'c');

create table regress.composite_pk (id integer not null, type regress.entity_type not null, val integer,
  constraint pk_composite_pk primary key (id, type));

create table regress.directory (id serial, val integer, constraint pk_directory primary key (id));
alter table regress.directory replica identity full;
grant select, update on regress.directory to REGRESS_USER1;

create table regress.uuid_pk_table (id uuid, val bigint, constraint pk_uuid_pk_table primary key (id));
alter table regress.uuid_pk_table replica identity full;
grant select, update, delete on regress.uuid_pk_table to REGRESS_USER1;

create server archive foreign data wrapper postgres_fdw options (dbname 'DBNAME', host '127.0.0.1', port 'PORT');
create user mapping for public server archive options (user 'postgres');

create table regress.multi_level_partitioning (id serial, directory_id integer, ts timestamp not null,
  is_loaded boolean not null, duration integer) partition by list (is_loaded);
create table regress.multi_level_partitioning_loaded partition of regress.multi_level_partitioning for values in (true);
alter table regress.multi_level_partitioning_loaded add constraint pk_multi_level_partitioning_loaded primary key (id);
alter table regress.multi_level_partitioning_loaded add constraint fk_multi_level_partitioning__directory
  foreign key (directory_id) references regress.directory (id);
create index idx_multi_level_partitioning_loaded on regress.multi_level_partitioning_loaded (ts);
alter table regress.multi_level_partitioning_loaded replica identity nothing;
create table regress.multi_level_partitioning_noloaded partition of regress.multi_level_partitioning
  for values in (false, null) partition by range (ts);
create table regress.multi_level_partitioning_2024_01 partition of regress.multi_level_partitioning_noloaded
  for values from ('2024-01-01') to ('2024-02-01');
create table regress.multi_level_partitioning_2024_02 partition of regress.multi_level_partitioning_noloaded
  for values from ('2024-02-01') to ('2024-03-01');
create table archive_db.multi_level_partitioning_2023_12 (
  id integer not null default nextval('regress.multi_level_partitioning_id_seq'), directory_id integer,
  ts timestamp not null, is_loaded boolean not null, duration integer,
  constraint pk_multi_level_partitioning_2023_12 primary key (id));
create foreign table regress.multi_level_partitioning_2023_12 partition of regress.multi_level_partitioning_noloaded
  for values from ('2023-12-01') to ('2024-01-01')
  server archive options (schema_name 'archive_db', table_name 'multi_level_partitioning_2023_12');
do $$ declare m text; begin
  foreach m in array array['2024_01', '2024_02'] loop
    execute format('alter table regress.multi_level_partitioning_%s add constraint pk_multi_level_partitioning_%s primary key (id)', m, m);
    execute format('alter table regress.multi_level_partitioning_%s add constraint fk_multi_level_partitioning__directory foreign key (directory_id) references regress.directory (id)', m);
    execute format('create index idx_multi_level_partitioning_%s on regress.multi_level_partitioning_%s (ts)', m, m);
    execute format('alter table regress.multi_level_partitioning_%s replica identity using index pk_multi_level_partitioning_%s', m, m);
  end loop;
end $$;
create view regress.full_multi_level_partitioning as
  select mlp.id, mlp.directory_id, mlp.ts, mlp.is_loaded, mlp.duration, d.val
  from regress.multi_level_partitioning mlp join regress.directory d on d.id = mlp.directory_id;
grant select on regress.full_multi_level_partitioning to REGRESS_USER1;

create table regress.inheritance_partitioning (id serial, ts timestamp not null, val integer,
  constraint pk_inheritance_partitioning primary key (id));
create index idx_inheritance_partitioning__ts on regress.inheritance_partitioning (ts);
grant insert, delete on regress.inheritance_partitioning to REGRESS_USER2;
create table regress.inheritance_partitioning_2024_01 (
  id integer not null default nextval('regress.inheritance_partitioning_id_seq'), ts timestamp not null, val integer,
  constraint pk_inheritance_partitioning_2024_01 primary key (id),
  constraint chk_inheritance_partitioning_ts check (ts >= '2024-01-01' and ts < '2024-02-01'))
  inherits (regress.inheritance_partitioning);
create index idx_inheritance_partitioning_2024_01__ts on regress.inheritance_partitioning_2024_01 (ts);
create table regress.inheritance_partitioning_2024_02 (
  id integer not null default nextval('regress.inheritance_partitioning_id_seq'), ts timestamp not null, val integer,
  constraint pk_inheritance_partitioning_2024_02 primary key (id),
  constraint chk_inheritance_partitioning_ts check (ts >= '2024-02-01' and ts < '2024-03-01'))
  inherits (regress.inheritance_partitioning);
create index idx_inheritance_partitioning_2024_02__ts on regress.inheritance_partitioning_2024_02 (ts);
create table archive_db.inheritance_partitioning_2023_12 (
  id integer not null default nextval('regress.inheritance_partitioning_id_seq'), ts timestamp not null, val integer,
  constraint pk_inheritance_partitioning_2023_12 primary key (id));
create foreign table regress.inheritance_partitioning_2023_12 (
  id integer not null default nextval('regress.inheritance_partitioning_id_seq'), ts timestamp not null, val integer)
  inherits (regress.inheritance_partitioning)
  server archive options (schema_name 'archive_db', table_name 'inheritance_partitioning_2023_12');
create function regress.get_inheritance_partitioning() returns setof regress.inheritance_partitioning
  language plpgsql as $$ begin return query select * from regress.inheritance_partitioning; end $$;
revoke all on function regress.get_inheritance_partitioning() from public;
grant all on function regress.get_inheritance_partitioning() to REGRESS_USER2;

create publication logical_replica for table regress.directory, regress.inheritance_partitioning_2024_01,
  regress.inheritance_partitioning_2024_02;
`

// regressStep is one run of the original's script: its rows, its command
// line, the writes it starts about a second later.
type regressStep struct {
	name    string
	table   string // held by a reader until the writes are done
	load    string
	args    []string
	inPlace []string // the same change, in place, on the reference database
	writes  []string
}

// regressRows scales the original's 1M-row loads down (at 1M the test
// takes 8 minutes here): the checks do not depend on it (the writes delete
// all but the first rows). A copy of that size may end before the writes
// start, a second after the run; a reader holding the table then keeps the
// switch waiting until they are done, so they always go through the
// capture and the catch-up.
const regressRows = 200000

var regressSteps = []regressStep{{
	name: "batch mode multi column primary key", table: "regress.composite_pk",
	load: fmt.Sprintf(`insert into regress.composite_pk (id, type, val) select i, type, i %% 100
		from generate_series(1, %d) i cross join unnest(enum_range(null::regress.entity_type)) as type`, regressRows/2),
	args:    []string{"-c", "alter table regress.composite_pk alter column id type bigint;", "--copy-data-jobs", "2", "--create-index-jobs", "4", "--batch-size", "100000"},
	inPlace: []string{"alter table regress.composite_pk alter column id type bigint"},
	writes: []string{
		"update regress.composite_pk set val = val + 20 where id between 20 and 30",
		"delete from regress.composite_pk where id > 200",
		`insert into regress.composite_pk (id, type, val) select i, type, i % 100
		 from generate_series(1000001, 1000100) i cross join unnest(enum_range(null::regress.entity_type)) as type`,
	},
}, {
	name: "batch mode single column primary key", table: "regress.directory",
	load:    fmt.Sprintf("insert into regress.directory (val) select generate_series(1, %d)", regressRows),
	args:    []string{"-c", "alter table regress.directory alter column id type bigint;", "--copy-data-jobs", "2", "--create-index-jobs", "4", "--batch-size", "100000"},
	inPlace: []string{"drop view regress.full_multi_level_partitioning", "alter table regress.directory alter column id type bigint", regressView},
	writes: []string{
		"update regress.directory set val = val + 20 where id between 20 and 30",
		"delete from regress.directory where id > 200",
		"insert into regress.directory (val) select generate_series(1, 100)",
	},
}, {
	name: "declarative multi level partitioning", table: "regress.multi_level_partitioning",
	load: fmt.Sprintf(`insert into regress.multi_level_partitioning (directory_id, ts, is_loaded, duration)
		select i %% 200 + 1, '2024-01-01'::date + (random() * 58)::int, random() < 0.1, i %% 10 from generate_series(1, %d) i`, regressRows),
	args: []string{"-c", "alter table regress.multi_level_partitioning alter column id type bigint using id::bigint",
		"-c", "alter table regress.multi_level_partitioning alter column directory_id type bigint using directory_id::bigint",
		"--copy-data-jobs", "2", "--create-index-jobs", "4"},
	inPlace: []string{"drop view regress.full_multi_level_partitioning",
		// In place PostgreSQL refuses USING on a tree with a foreign
		// table ("is not a table"); pg_tat applies it to the local rows.
		"alter table regress.multi_level_partitioning alter column id type bigint, alter column directory_id type bigint",
		regressView},
	writes: []string{
		"update regress.multi_level_partitioning set duration = duration + 20 where id < 1000",
		"delete from regress.multi_level_partitioning where id > 2000",
		`insert into regress.multi_level_partitioning (directory_id, ts, is_loaded, duration)
		 select i % 200 + 1, '2024-01-01'::date + (random() * 58)::int, random() < 0.1, i % 10 from generate_series(1, 1000) i`,
		`insert into regress.multi_level_partitioning (directory_id, ts, is_loaded, duration)
		 select i % 200 + 1, '2023-12-01'::date + (random() * 20)::int, false, i % 10 from generate_series(1, 100) i`,
	},
}, {
	name: "old style inheritance partitioning", table: "regress.inheritance_partitioning",
	load: fmt.Sprintf(`insert into regress.inheritance_partitioning_2024_01 (ts, val)
		select '2024-01-01'::date + (random() * 20)::int, i %% 10 from generate_series(1, %d) i`, regressRows),
	args:    []string{"-c", "alter table regress.inheritance_partitioning alter column id type bigint", "--copy-data-jobs", "2", "--create-index-jobs", "4"},
	inPlace: []string{"alter table regress.inheritance_partitioning alter column id type bigint"},
	writes: []string{
		"update regress.inheritance_partitioning set val = val + 20 where id < 1000",
		"delete from regress.inheritance_partitioning where id > 2000",
		`insert into regress.inheritance_partitioning_2024_02 (ts, val)
		 select '2024-02-01'::date + (random() * 20)::int, i % 10 from generate_series(1, 1000) i`,
		`insert into regress.inheritance_partitioning_2023_12 (ts, val)
		 select '2023-12-01'::date + (random() * 20)::int, i % 10 from generate_series(1, 100) i`,
	},
}, {
	name:    "alter partition table",
	args:    []string{"-c", "alter table regress.multi_level_partitioning_noloaded set tablespace ARCHIVE_TS", "--partial-mode"},
	inPlace: []string{"alter table regress.multi_level_partitioning_noloaded set tablespace ARCHIVE_TS"},
}, {
	name:    "alter child table",
	args:    []string{"-c", "alter table regress.inheritance_partitioning_2024_02 set tablespace ARCHIVE_TS", "--partial-mode"},
	inPlace: []string{"alter table regress.inheritance_partitioning_2024_02 set tablespace ARCHIVE_TS"},
}}

const regressView = `create view regress.full_multi_level_partitioning as
  select mlp.id, mlp.directory_id, mlp.ts, mlp.is_loaded, mlp.duration, d.val
  from regress.multi_level_partitioning mlp join regress.directory d on d.id = mlp.directory_id;
grant select on regress.full_multi_level_partitioning to REGRESS_USER1`

func TestOriginalRegression(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 1M rows")
	}
	c := testpg.Shared()
	if c == nil {
		t.Skip("needs the harness's own cluster (a tablespace directory, a foreign server pointing back at it)")
	}
	db, ref := testpg.NewDB(t), testpg.NewDB(t)
	if !hasExtension(t, db, "postgres_fdw") {
		t.Skip("postgres_fdw is not installed with this server")
	}
	uniq := strconv.FormatInt(time.Now().UnixNano()%1e12, 10)
	ts, u1, u2 := "tat_archive_"+uniq, "tat_user1_"+uniq, "tat_user2_"+uniq
	dir := filepath.Join(c.Dir, ts)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	testpg.ChownToPostgres(t, dir)
	testpg.Exec(t, db, fmt.Sprintf("create role %s; create role %s", u1, u2))
	testpg.Exec(t, db, fmt.Sprintf("create tablespace %s location '%s'", ts, dir))
	t.Cleanup(func() {
		for _, d := range []string{db, ref} {
			if p, err := pgx.Connect(context.Background(), d); err == nil {
				_, _ = p.Exec(context.Background(), "drop schema regress cascade; drop schema archive_db cascade; drop publication if exists logical_replica; drop server if exists archive cascade")
				p.Close(context.Background())
			}
		}
		testpg.Exec(t, c.URL, "drop tablespace if exists "+ts)
		testpg.Exec(t, c.URL, fmt.Sprintf("drop role if exists %s; drop role if exists %s", u1, u2))
	})
	dbName := dbNameOf(t, db)
	subst := strings.NewReplacer("ARCHIVE_TS", ts, "REGRESS_USER1", u1, "REGRESS_USER2", u2, "DBNAME", dbName, "PORT", strconv.Itoa(c.Port))
	testpg.Exec(t, db, subst.Replace(regressSchema))
	// The reference points its server at the same database: the two
	// schemas then read alike.
	testpg.Exec(t, ref, subst.Replace(regressSchema))

	// PostgreSQL 18 refuses, in place too, a type change of a column that a
	// foreign inheritance child declares NOT NULL itself ("cannot create
	// not-null constraint ... already exists for this column"): pg_tat
	// refuses it the same way, before anything is created.
	pg18 := testpg.ServerVersionNum(t, db) >= 180000
	for _, st := range regressSteps {
		if st.load != "" {
			testpg.Exec(t, db, st.load)
		}
		args := make([]string, len(st.args))
		for i, a := range st.args {
			args[i] = subst.Replace(a)
		}
		if pg18 && st.table == "regress.inheritance_partitioning" {
			var out, errb bytes.Buffer
			if code := run(append(connFlags(t, db), args...), &out, &errb); code != 2 || !strings.Contains(errb.String(), "cannot create not-null constraint") {
				t.Fatalf("%s on PostgreSQL 18: exit %d, want 2 with PostgreSQL's refusal:\n%s", st.name, code, errb.String())
			}
			if err := execErr(ref, subst.Replace(st.inPlace[0])); err == nil || !strings.Contains(err.Error(), "cannot create not-null constraint") {
				t.Fatalf("%s in place on PostgreSQL 18: %v, want the same refusal", st.name, err)
			}
			continue
		}
		var reader pgx.Tx
		if st.table != "" {
			rc, err := pgx.Connect(context.Background(), db)
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close(context.Background())
			if reader, err = rc.Begin(context.Background()); err != nil {
				t.Fatal(err)
			}
			if _, err := reader.Exec(context.Background(), "select 1 from "+st.table+" limit 1"); err != nil {
				t.Fatal(err)
			}
		}
		var wg sync.WaitGroup
		var code int
		var out, errb bytes.Buffer
		wg.Add(1)
		go func() {
			defer wg.Done()
			code = run(append(connFlags(t, db), args...), &out, &errb)
		}()
		var werr error
		if len(st.writes) > 0 {
			time.Sleep(1100 * time.Millisecond) // as the original's script
			for _, w := range st.writes {
				if werr = execErr(db, w); werr != nil {
					break
				}
			}
		}
		if reader != nil {
			_ = reader.Rollback(context.Background())
		}
		wg.Wait()
		if werr != nil {
			t.Fatalf("%s: concurrent write: %v", st.name, werr)
		}
		if code != 0 {
			t.Fatalf("%s: pg_tat %s: exit %d\n%s\n%s", st.name, strings.Join(args, " "), code, out.String(), errb.String())
		}
		for _, s := range st.inPlace {
			testpg.Exec(t, ref, subst.Replace(s))
		}
	}

	// The original's expected values.
	for _, c := range []struct{ table, sum, want string }{
		{"regress.composite_pk", "val", "900/45210"},
		{"regress.directory", "val", "300/25370"},
		{"regress.multi_level_partitioning", "duration", "3100/33930"},
		{"regress.inheritance_partitioning", "val", "3100/33930"},
	} {
		if pg18 && c.table == "regress.inheritance_partitioning" {
			continue // not migrated, see above
		}
		if got := query(t, db, fmt.Sprintf("select count(1) || '/' || sum(%s) from %s", c.sum, c.table)); got != c.want {
			t.Errorf("%s: count/sum %s, want %s", c.table, got, c.want)
		}
	}
	// The foreign members stayed in their trees, their rows remote.
	if got := query(t, db, `select count(*) || '/' || (select count(*) from archive_db.multi_level_partitioning_2023_12)
		from regress.multi_level_partitioning where tableoid = 'regress.multi_level_partitioning_2023_12'::regclass`); got != "100/100" {
		t.Errorf("foreign partition rows (through the tree / remote): %s", got)
	}
	if got := query(t, db, `select count(*)::text from regress.inheritance_partitioning where tableoid = 'regress.inheritance_partitioning_2023_12'::regclass`); got != "100" && !pg18 {
		t.Errorf("foreign child rows through the tree: %s", got)
	}
	left := query(t, db, `select count(*)::text from pg_class where relname like '%\_\_tat\_%'`)
	if left != "0" {
		t.Errorf("%s objects of pg_tat left behind", left)
	}
	got, want := testpg.Schema(t, testpg.Pool(t, db)), testpg.Schema(t, testpg.Pool(t, ref))
	if pg18 {
		// Known difference (README, Known limitations): on 18 a leaf's NOT
		// NULL inherited from its parent comes back also marked local, as
		// its primary key is re-added USING INDEX at the switch.
		re := regexp.MustCompile(`(?m)^(constraint \S+ on \S+: NOT NULL \S+ inherited \d+ local) [tf]$`)
		got, want = re.ReplaceAllString(got, "$1 ?"), re.ReplaceAllString(want, "$1 ?")
	}
	if got != want {
		t.Errorf("schema differs from the same ALTERs in place:\n%s", diffLines(want, got))
	}
}

func hasExtension(t *testing.T, db, name string) bool {
	return query(t, db, fmt.Sprintf("select count(*)::text from pg_available_extensions where name = '%s'", name)) == "1"
}

func dbNameOf(t *testing.T, db string) string {
	u, err := url.Parse(db)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimPrefix(u.Path, "/")
}

func execErr(db, sql string) error {
	ctx := context.Background()
	c, err := pgx.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, sql)
	return err
}

// diffLines lists the lines only in want (-) and only in got (+).
func diffLines(want, got string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	w, g := in(want), in(got)
	var b strings.Builder
	for _, l := range strings.Split(want, "\n") {
		if !g[l] {
			b.WriteString("- " + l + "\n")
		}
	}
	for _, l := range strings.Split(got, "\n") {
		if !w[l] {
			b.WriteString("+ " + l + "\n")
		}
	}
	return b.String()
}
