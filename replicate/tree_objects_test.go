package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// treeRoles creates n roles of the test's own (roles are cluster-wide) and
// returns a replacer of the tokens ROLE_A, ROLE_B, ... by their names; the
// roles and what they were granted in the envs' databases go when the test
// ends.
func treeRoles(t *testing.T, n int, envs ...*env) *strings.Replacer {
	t.Helper()
	uniq := fmt.Sprintf("%d", time.Now().UnixNano()%1e12)
	var pairs, roles []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("tat_tree_%c_%s", 'a'+i, uniq)
		envs[0].exec("create role " + name)
		roles = append(roles, name)
		pairs = append(pairs, fmt.Sprintf("ROLE_%c", 'A'+i), name)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, r := range roles {
			for _, e := range envs {
				_, _ = e.pool.Exec(ctx, "drop owned by "+r+" cascade")
			}
			_, _ = envs[0].pool.Exec(ctx, "drop role if exists "+r)
		}
	})
	return strings.NewReplacer(pairs...)
}

// treeWriter changes rows of the tree and of their controls alike, one
// transaction each, until stopped. stmts get the table (%s) and an id ($1).
type treeWriter struct {
	stop atomic.Bool
	wg   sync.WaitGroup
	ops  atomic.Int64
	fail atomic.Value // the first statement error (a message)
}

func startTreeWriter(e *env, pairs [][2]string, maxID int, stmts ...string) *treeWriter {
	w := &treeWriter{}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		r := rand.New(rand.NewPCG(1, 7))
		ctx := context.Background()
		for !w.stop.Load() {
			pair := pairs[r.IntN(len(pairs))]
			stmt := stmts[r.IntN(len(stmts))]
			id := 1 + r.IntN(maxID)
			tx, err := e.pool.Begin(ctx)
			if err != nil {
				return
			}
			_, err1 := tx.Exec(ctx, fmt.Sprintf(stmt, pair[0]), id)
			_, err2 := tx.Exec(ctx, fmt.Sprintf(stmt, pair[1]), id)
			if err1 == nil && err2 == nil && tx.Commit(ctx) == nil {
				w.ops.Add(1)
			} else {
				if err := errors.Join(err1, err2); err != nil {
					w.fail.CompareAndSwap(nil, err.Error())
				}
				_ = tx.Rollback(ctx)
			}
		}
	}()
	return w
}

func (w *treeWriter) Stop(t *testing.T) {
	t.Helper()
	w.stop.Store(true)
	w.wg.Wait()
	if w.ops.Load() == 0 {
		t.Fatalf("the writer wrote nothing (%v): the test proves nothing", w.fail.Load())
	}
	t.Logf("writer committed %d transactions", w.ops.Load())
}

// runTreeCase sets schema up in two databases, runs alter in place in one
// and through the engine in the other (under the writer), and compares
// their catalog snapshots; it returns the online env for content checks.
func runTreeCase(t *testing.T, schema func(ver int) string, alter string, pairs [][2]string, maxID int, stmts ...string) *env {
	t.Helper()
	inPlace, online := newEnv(t), newEnv(t)
	roles := treeRoles(t, 2, inPlace, online)
	sql := roles.Replace(schema(testpg.Version(t)))
	inPlace.exec(sql)
	inPlace.exec(alter)
	online.exec(sql)
	want := testpg.Schema(t, inPlace.pool)
	w := startTreeWriter(online, pairs, maxID, stmts...)
	err := online.run(opts(alter))
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	if got := testpg.Schema(t, online.pool); got != want {
		t.Fatalf("online differs from in place (- in place, + online):\n%s", diff(want, got))
	}
	return online
}

// Objects of a partition's own (2 levels, a default partition) are carried
// over by the switch as the root's are: triggers with their enabled state
// (and clones of the root's and of an intermediate partition's enabled
// otherwise than their parent), rules, row-level security and policies,
// outbound foreign keys (one NOT VALID) and one referencing a partition,
// publication membership (row filter and column list on 15+), views over a
// partition with their options, grants and comments, a function on a
// partition's row type, extended statistics, replica identity, column
// comments and grants, comments on partition indexes and constraints. The
// snapshot equals the in-place ALTER's; the content equals the control's.
func TestTreeObjectsPartitioned(t *testing.T) {
	t.Parallel()
	schema := func(ver int) string {
		pub := `create publication tree_pub for table m_r1, m_r2_h0 with (publish = 'insert');`
		if ver >= 150000 {
			pub = `create publication tree_pub for table m_r1 (id, region, v) where (v <> 'x'), m_r2_h0 with (publish = 'insert');`
		}
		return `
create table ref (id int primary key);
insert into ref select generate_series(1, 100);
create table m (id int not null, region int not null, n int, v text, r int, primary key (id, region)) partition by list (region);
create table m_r1 partition of m for values in (1);
create table m_r2 partition of m for values in (2) partition by hash (id);
create table m_r2_h0 partition of m_r2 for values with (modulus 2, remainder 0);
create table m_r2_h1 partition of m_r2 for values with (modulus 2, remainder 1);
create table m_rest partition of m default;
create index m_n on m (n);
create index m_r1_v on m_r1 (v);
comment on index m_r1_v is 'an index of m_r1 only';
comment on index m_r1_pkey is 'attached to the root''s';
comment on constraint m_r1_pkey on m_r1 is 'key of m_r1';
alter table m_r1 add constraint m_r1_chk check (id > 0);
comment on constraint m_r1_chk on m_r1 is 'positive';
create function tree_trg() returns trigger language plpgsql as $$begin return new; end$$;
create trigger m_audit before update on m for each row execute function tree_trg();
alter table m_r2_h0 enable always trigger m_audit;
create trigger m_r1_trg before insert or update on m_r1 for each row execute function tree_trg();
create trigger m_r1_off after delete on m_r1 for each statement execute function tree_trg();
alter table m_r1 disable trigger m_r1_off;
comment on trigger m_r1_trg on m_r1 is 'own trigger';
create trigger m_r2_trg after update on m_r2 for each row execute function tree_trg();
alter table m_r2_h1 disable trigger m_r2_trg;
alter table m_r2 enable replica trigger m_r2_trg;
create rule m_r1_keep as on delete to m_r1 where old.v = 'keep' do instead nothing;
alter table m_r1 enable always rule m_r1_keep;
comment on rule m_r1_keep on m_r1 is 'keep rows';
alter table m_r1 enable row level security;
alter table m_r1 force row level security;
create policy m_r1_read on m_r1 for select to ROLE_A using (id > 0);
create policy m_r1_write on m_r1 as restrictive for insert to ROLE_A, ROLE_B with check (v is not null);
comment on policy m_r1_read on m_r1 is 'readers';
alter table m_r2_h1 enable row level security;
create policy m_r2_h1_all on m_r2_h1 using (true);
alter table m_r1 add constraint m_r1_r_fk foreign key (r) references ref (id);
comment on constraint m_r1_r_fk on m_r1 is 'a partition''s own key';
alter table m_rest add constraint m_rest_r_fk foreign key (r) references ref (id) not valid;
create table m_ref (id int primary key, mid int, mregion int,
  constraint m_ref_fk foreign key (mid, mregion) references m_rest (id, region) on delete cascade);
` + pub + `
create view m_rest_v with (security_barrier) as select id, region, v from m_rest where id > 10;
create view m_rest_vv as select id from m_rest_v join m_r1 using (id, region);
grant select on m_rest_v to ROLE_B;
comment on view m_rest_v is 'over the default partition';
comment on column m_rest_v.v is 'v of rest';
comment on column m_r1.v is 'v of r1';
comment on column m_rest.n is 'n of rest';
grant select (v), update (n) on m_r2_h1 to ROLE_A;
grant select on m_rest to ROLE_B;
alter table m_r1 replica identity full;
alter table m_r2_h0 replica identity using index m_r2_h0_pkey;
create statistics m_r1_st on id, v from m_r1;
comment on statistics m_r1_st is 'stats of r1';
create function m_r1_id(m_r1) returns int language sql as 'select $1.id';
insert into m select g, g % 4, g, md5(g::text), case when g % 10 = 0 then g % 100 + 1 end from generate_series(1, 5000) g;
insert into m_ref select id, id, region from m where region in (0, 3) and id > 4000;
create table ctl as select * from m;`
	}
	// Rows move between partitions (region + 2); ids above 4000 stay, so
	// m_ref's references hold.
	e := runTreeCase(t, schema, "alter table m alter column n type bigint", [][2]string{{"m", "ctl"}}, 4000,
		"update %s set n = n + 1, region = (region + 2) %% 4 where id = $1",
		"update %s set v = v || 'x', r = 1 + $1 %% 100 where id = $1")
	e.assertSame("m", "ctl", "id, region, n, v, r")
	if got := e.str("select count(*) from m_ref"); got != "500" {
		t.Fatalf("m_ref has %s rows", got)
	}
	e.assertNoLeftovers("m")
}

// The same for an inheritance tree (a root and two children): the
// children's own triggers, rules, row-level security and policies, foreign
// keys (outbound, and one referencing a child), publication membership,
// views over a child, a serial column of a child's own, statistics, replica
// identity, column comments and grants.
func TestTreeObjectsInheritance(t *testing.T) {
	t.Parallel()
	schema := func(ver int) string {
		pub := `create publication tree_pub for table ih_b with (publish = 'insert');`
		if ver >= 150000 {
			pub = `create publication tree_pub for table only ih_b (id, v) where (v <> 'x') with (publish = 'insert');`
		}
		return `
create table ref (id int primary key);
insert into ref select generate_series(1, 100);
create table ih (id int primary key, n int, v text, r int);
create table ih_a (extra serial, primary key (id)) inherits (ih);
create table ih_b (primary key (id)) inherits (ih);
create function tree_trg() returns trigger language plpgsql as $$begin return new; end$$;
create trigger ih_a_trg before insert or update on ih_a for each row execute function tree_trg();
create trigger ih_a_off after delete on ih_a for each row execute function tree_trg();
alter table ih_a disable trigger ih_a_off;
create trigger ih_b_trg after truncate on ih_b for each statement execute function tree_trg();
alter table ih_b enable replica trigger ih_b_trg;
comment on trigger ih_a_trg on ih_a is 'own trigger';
create rule ih_b_keep as on delete to ih_b where old.v = 'keep' do instead nothing;
comment on rule ih_b_keep on ih_b is 'keep rows';
alter table ih_a enable row level security;
create policy ih_a_read on ih_a for select to ROLE_A using (id > 0);
comment on policy ih_a_read on ih_a is 'readers';
alter table ih_b enable row level security;
alter table ih_b force row level security;
create policy ih_b_all on ih_b as restrictive to ROLE_B using (v is not null);
alter table ih_a add constraint ih_a_r_fk foreign key (r) references ref (id);
alter table ih_b add constraint ih_b_r_fk foreign key (r) references ref (id) not valid;
alter table ih_b add constraint ih_b_root_fk foreign key (r) references ih (id);
comment on constraint ih_a_r_fk on ih_a is 'a child''s own key';
create table ih_ref (id int primary key, bid int constraint ih_ref_fk references ih_b (id) on delete cascade);
` + pub + `
create view ih_a_v as select id, v, extra from only ih_a where id > 10;
create view ih_both as select a.id from ih_a a join ih_b b using (id);
grant select on ih_a_v to ROLE_B;
comment on view ih_a_v is 'over a child';
comment on column ih_a.extra is 'extra of a';
comment on column ih_b.n is 'n of b';
grant select (v), update (n) on ih_b to ROLE_A;
grant select on ih_a to ROLE_B;
alter table ih_b replica identity full;
alter table ih_a replica identity using index ih_a_pkey;
create statistics ih_b_st on id, v from ih_b;
comment on statistics ih_b_st is 'stats of b';
create function ih_a_id(ih_a) returns int language sql as 'select $1.id';
insert into ih select g, g, md5(g::text), 1 + g % 100 from generate_series(1, 3000) g;
insert into ih_a (id, n, v, r) select g, g, md5(g::text), 1 + g % 100 from generate_series(1, 3000) g;
insert into ih_b select g, g, md5(g::text), 1 + g % 100 from generate_series(1, 3000) g;
insert into ih_ref select g, g from generate_series(2001, 3000) g;
create table c_ih as select * from only ih;
create table c_ih_a as select * from only ih_a;
create table c_ih_b as select * from only ih_b;`
	}
	// ih_b's r references ih's id: ids up to 2000 are updated, none deleted.
	e := runTreeCase(t, schema, "alter table ih alter column n type bigint",
		[][2]string{{"only ih", "c_ih"}, {"only ih_a", "c_ih_a"}, {"only ih_b", "c_ih_b"}}, 2000,
		"update %s set n = n + 1, v = v || 'x' where id = $1")
	e.assertSame("(select id, n, v, r from only ih) x", "(select id, n, v, r from c_ih) y", "*")
	e.assertSame("(select id, n, v, r, extra from only ih_a) x", "(select id, n, v, r, extra from c_ih_a) y", "*")
	e.assertSame("(select id, n, v, r from only ih_b) x", "(select id, n, v, r from c_ih_b) y", "*")
	if got := e.str("select count(*) from ih_ref"); got != "1000" {
		t.Fatalf("ih_ref has %s rows", got)
	}
	// The serial column goes on with its sequence.
	if got := e.str("insert into ih_a (id, n, v) values (-1, 0, 'new') returning extra > 3000"); got != "true" {
		t.Fatal("the serial sequence of ih_a did not continue")
	}
	e.assertNoLeftovers("ih")
}

// What the switch cannot carry over below the root is refused before
// anything is created, naming it: a materialized view over a partition
// through a view or using a column the ALTER retypes, a
// row type of a child used by a column, row-level security of a child that
// applies to the copying owner, and (before PostgreSQL 18, which cannot add
// it NOT VALID) a foreign key of a partitioned partition; on 18 that key is
// carried over and validated.
func TestTreeObjectsRefused(t *testing.T) {
	t.Parallel()
	const part = `create table m (id int primary key, n int, r int) partition by range (id);
		create table m_1 partition of m for values from (0) to (1000) partition by range (id);
		create table m_1a partition of m_1 for values from (0) to (500);
		create table m_1b partition of m_1 for values from (500) to (1000);
		create table m_2 partition of m default;
		insert into m select g, g, g from generate_series(1, 1500) g;`
	const inh = `create table ih (id int primary key, n int);
		create table ih_a (primary key (id)) inherits (ih);
		insert into ih_a select g, g from generate_series(1, 100) g;`
	cases := []struct {
		name, setup, alter, wantErr string
		fromVer                     int // the case passes from this version on
	}{
		{name: "materialized view", setup: part + `create view m_2_v as select id from m_2; create materialized view m_2_mv as select id from m_2_v`,
			alter: "alter table m alter column n type bigint", wantErr: "materialized view(s) m_2_mv depend on"},
		{name: "materialized view column", setup: part + `create materialized view m_2_mv as select id, n from m_2`,
			alter: "alter table m alter column n type bigint", wantErr: "cannot alter type of a column used by a view or rule"},
		{name: "row type", setup: inh + `create table holder (h ih_a)`,
			alter: "alter table ih alter column n type bigint", wantErr: "row type of"},
		{name: "forced row level security", setup: inh + `alter table ih owner to ROLE_A; alter table ih_a owner to ROLE_A;
			alter table ih_a enable row level security; alter table ih_a force row level security`,
			alter: "alter table ih alter column n type bigint", wantErr: "inheritance child ih_a has row-level security"},
		{name: "foreign key of a partitioned partition", setup: part + `create table ref (id int primary key);
			insert into ref select generate_series(1, 2000);
			alter table m_1 add constraint m_1_r_fk foreign key (r) references ref`,
			alter: "alter table m alter column n type bigint", wantErr: "foreign key m_1_r_fk on partitioned table", fromVer: 180000},
	}
	for _, tc := range cases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.exec(treeRoles(t, 1, e).Replace(tc.setup))
			err := e.run(opts(tc.alter))
			if tc.fromVer > 0 && testpg.Version(t) >= tc.fromVer {
				if err != nil {
					t.Fatal(err)
				}
				if got := e.str("select count(*) filter (where convalidated) || '/' || count(*) from pg_constraint where conname = 'm_1_r_fk'"); got != "3/3" {
					t.Fatalf("m_1_r_fk (and its clones) validated/all: %s", got)
				}
				e.assertNoLeftovers("m")
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("want an error with %q, got %v", tc.wantErr, err)
			}
			t.Logf("refused: %v", err)
			if n := e.str(`select count(*) from pg_class where relname like '%\_\_tat\_%'`); n != "0" {
				t.Fatalf("%s objects created before the refusal", n)
			}
		})
	}
}
