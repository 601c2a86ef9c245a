package testpg

import (
	"context"
	"os"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// The snapshot names what it should, carries no OIDs, does not depend on
// physical state, and sees a change of one property as a change of one line.
func TestSchema(t *testing.T) {
	url := NewDB(t)
	pool := Pool(t, url)
	ctx := context.Background()
	exec := func(sql string) {
		t.Helper()
		if _, err := pool.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec(`create domain posint as int check (value > 0);
		create type pair as (a int, b text);
		create table t (id int primary key, gone int, n posint not null default 1, p pair[],
			g int generated always as (id * 2) stored, s serial, c text collate "C");
		alter table t drop column gone;
		alter table t alter column c set statistics 100;
		create index t_n on t (n desc nulls last) where n > 1;
		comment on column t.n is 'n''s comment';
		create view v as select id, n from t;
		create function f(t) returns int language sql as 'select 1';
		create statistics t_st on id, n from t;
		create publication pub for table t;
		insert into t (id) select generate_series(1, 100)`)
	s := Schema(t, pool)
	t.Log("\n" + s)
	for _, want := range []string{
		"table public.t columns: id, n, p, g, s, c\n",
		"table public.t column n: type posint not null default 1 comment 'n''s comment'\n",
		"table public.t column g: type integer generated always as (id * 2) stored\n",
		`table public.t column c: type text collate "C" statistics 100` + "\n",
		"table public.t column s: type integer not null default nextval('t_s_seq'::regclass)\n",
		"sequence public.t_s_seq owned by: t.s auto\n",
		"index public.t_n on t: CREATE INDEX t_n ON public.t USING btree (n DESC NULLS LAST) WHERE ((n)::integer > 1) tablespace default\n",
		"constraint posint_check on domain public.posint: CHECK ((VALUE > 0))\n",
		"composite type public.pair column b: type text\n",
		"publication pub table t\n",
		"statistics public.t_st on t: CREATE STATISTICS public.t_st ON id, n FROM t owner postgres\n",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("snapshot lacks %q", want)
		}
	}
	if strings.Contains(s, "pg_toast_") {
		t.Error("snapshot names a TOAST table (its name carries an OID)")
	}
	// Physical changes only: the same snapshot.
	exec("vacuum full t")
	exec("analyze t")
	exec("select nextval('t_s_seq')")
	if again := Schema(t, pool); again != s {
		t.Fatalf("snapshot changed by VACUUM FULL:\n%s\n---\n%s", s, again)
	}
	exec("alter table t alter column c set storage main")
	after := Schema(t, pool)
	if strings.Count(after, "\n") != strings.Count(s, "\n") || !strings.Contains(after, "column c: type text collate \"C\" storage m statistics 100\n") {
		t.Fatalf("SET STORAGE: want one line changed, got:\n%s", after)
	}
}
