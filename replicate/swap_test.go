package replicate_test

import (
	"context"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/pgtat/pg_tat/internal/testpg"
)

const richSchema = `
create role tat_reader; create role tat_writer;
create table customers (id int primary key, name text);
insert into customers select g, 'c' || g from generate_series(1, 100) g;
create table orders (
  id serial primary key,
  code int generated always as identity,
  customer int not null references customers(id) on delete cascade,
  amount numeric(10,2) check (amount >= 0),
  doubled numeric generated always as (amount * 2) stored,
  gone int,
  body text,
  n int,
  parent int references orders(id) deferrable initially deferred,
  unique (code) deferrable initially deferred,
  exclude using btree (body with =) where (body like 'x%')
) with (fillfactor = 80, autovacuum_enabled = false);
alter table orders drop column gone;
alter table orders alter column body set storage external;
alter table orders alter column n set statistics 500;
create index orders_partial on orders (customer) where amount > 10;
create index orders_expr on orders (lower(body) text_pattern_ops desc nulls last) include (amount);
create index "orders_Ünïcode_index_name_that_is_exactly_sixty_three_bytes_x" on orders (n);
insert into orders (customer, amount, body, n) select 1 + g % 100, g, repeat(md5(g::text), 300), g from generate_series(1, 3000) g;
update orders set parent = id - 1 where id > 1;
set constraints all immediate;
create table lines (id int primary key, order_id int references orders(id) on update cascade, qty int);
insert into lines select g, g, g from generate_series(1, 500) g;
create view v_orders with (security_barrier) as select id, customer, amount, n from orders where amount > 5;
create view v_nested as select id, n from v_orders where n > 10 with local check option;
create function order_rows() returns setof orders language sql stable as 'select * from orders';
create function count_orders(o orders) returns int language sql as 'select 1';
create function trg_f() returns trigger language plpgsql as 'begin return new; end';
create trigger orders_trg before update on orders for each row execute function trg_f();
create trigger orders_trg2 after insert on orders for each row execute function trg_f();
alter table orders disable trigger orders_trg2;
create rule orders_rule as on delete to orders where old.amount < 0 do instead nothing;
alter table orders enable row level security;
create policy p_read on orders for select to tat_reader using (amount > 0);
grant select on orders to tat_reader; grant insert, update on orders to tat_writer with grant option;
grant select (id, amount) on orders to public;
grant select on v_orders to tat_reader;
comment on table orders is 'the orders';
comment on column orders.amount is 'in euros';
comment on index orders_partial is 'partial index';
comment on view v_orders is 'a view';
create publication pub_orders for table orders where (amount > 1);
create publication pub_lines for table lines (id, order_id);
alter table orders replica identity full;
create statistics orders_stats (ndistinct) on customer, n from orders;
alter table orders cluster on orders_expr;
create table orders_ctl (id int primary key, amount numeric(10,2));
insert into orders_ctl select id, amount from orders;
analyze orders;
`

// TestSwapKeepsEverything migrates a table with every kind of dependent and
// compares pg_dump -s of the whole database before and after: the only
// difference must be what the ALTER changed.
func TestSwapKeepsEverything(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(pubFeatures(t, richSchema))
	t.Cleanup(func() {
		e.pool.Exec(t.Context(), "drop owned by tat_reader, tat_writer cascade; drop role tat_reader; drop role tat_writer")
	})
	before := e.dump(t)
	seqBefore := e.str("select last_value from orders_id_seq")
	codeBefore := e.str("select max(code) from orders")
	const stable = "select md5(string_agg(concat_ws('|', id, code, customer, body, parent, n), ',' order by id)) from orders"
	rowsBefore := e.str(stable)

	// A writer updates amount (and through it the generated column) in
	// orders and its control, in one transaction, during the whole run.
	var stop atomic.Bool
	var wg sync.WaitGroup
	var writes atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		ctx := context.Background()
		for i := 0; !stop.Load(); i++ {
			id := 1 + i*7%3000
			tx, err := e.pool.Begin(ctx)
			if err != nil {
				return
			}
			_, err1 := tx.Exec(ctx, "update orders set amount = amount + 1 where id = $1", id)
			_, err2 := tx.Exec(ctx, "update orders_ctl set amount = amount + 1 where id = $1", id)
			if err1 == nil && err2 == nil && tx.Commit(ctx) == nil {
				writes.Add(1)
			} else {
				_ = tx.Rollback(ctx)
			}
		}
	}()
	err := e.run(opts("alter table orders alter column n type bigint"))
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if writes.Load() == 0 {
		t.Fatal("the writer wrote nothing")
	}
	e.assertSame("(select id, amount, doubled from orders) a", "(select id, amount, amount * 2 from orders_ctl) b", "*")
	after := e.dump(t)
	want := strings.Replace(before, "    n integer,", "    n bigint,", 1)
	if want != after {
		t.Fatalf("schema differs beyond the ALTER:\n%s", diff(want, after))
	}
	if got := e.str(stable); got != rowsBefore {
		t.Fatal("rows changed")
	}
	if got := e.str("select last_value from orders_id_seq"); got != seqBefore {
		t.Fatalf("serial sequence at %s, was %s", got, seqBefore)
	}
	// Identity continues past the highest value; serial default works; FKs validated.
	e.exec("insert into orders (customer, amount) values (1, 1)")
	if got := e.str("select code > " + codeBefore + " from orders where id = (select max(id) from orders)"); got != "true" {
		t.Fatal("identity did not continue")
	}
	if got := e.str("select count(*) from pg_constraint where not convalidated"); got != "0" {
		t.Fatalf("%s constraints left NOT VALID", got)
	}
	e.str("select count(*) from v_nested")
	e.str("select count(*) from order_rows()")
	e.assertNoLeftovers("orders")
}

// snapshot is the schema of the whole database for comparing two databases:
// pg_dump -s when a pg_dump for the server is installed, else the catalog
// snapshot (servers newer than Debian's client).
func (e *env) snapshot(t *testing.T) string {
	t.Helper()
	if p, _ := testpg.LookPgDump(t, e.url); p == "" {
		return testpg.Schema(t, e.pool)
	}
	return e.dump(t)
}

func (e *env) dump(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(testpg.PgDump(t, e.url), "-s", "-d", e.url).CombinedOutput()
	if err != nil {
		t.Fatalf("pg_dump: %v: %s", err, out)
	}
	// Dump comments carry no OIDs, but settings lines vary; keep the DDL.
	s := regexp.MustCompile(`(?m)^(--|\\restrict|\\unrestrict).*$\n?`).ReplaceAllString(string(out), "")
	return regexp.MustCompile(`\n{2,}`).ReplaceAllString(s, "\n")
}

// pubFeatures drops publication column lists and row filters (PostgreSQL
// 15+) from "create publication NAME for table TABLE ...;" lines before 15.
func pubFeatures(t *testing.T, sql string) string {
	if testpg.Version(t) >= 150000 {
		return sql
	}
	return regexp.MustCompile(`(?m)(create publication \w+ for table \w+)[^;\n]*;`).ReplaceAllString(sql, "$1;")
}

func diff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	in := func(l []string) map[string]int {
		m := map[string]int{}
		for _, x := range l {
			m[x]++
		}
		return m
	}
	am, bm := in(al), in(bl)
	var out []string
	for _, x := range al {
		if bm[x] == 0 {
			out = append(out, "- "+x)
		} else {
			bm[x]--
		}
	}
	for _, x := range bl {
		if am[x] == 0 {
			out = append(out, "+ "+x)
		} else {
			am[x]--
		}
	}
	if len(out) == 0 {
		return "(same lines, different order)"
	}
	return strings.Join(out, "\n")
}

// Publication column list and row filter, and REPLICA IDENTITY USING INDEX.
func TestSwapKeepsPublicationColumnsAndIdentityIndex(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(pubFeatures(t, `create table pubt (id int primary key, a int not null, b int);
		create unique index pubt_a on pubt (a);
		alter table pubt replica identity using index pubt_a;
		create publication p_cols for table pubt (id, a) where (a > 0);
		insert into pubt select g, g, g from generate_series(1, 1000) g`))
	before := e.dump(t)
	if err := e.run(opts("alter table pubt alter column b type bigint")); err != nil {
		t.Fatal(err)
	}
	want := strings.Replace(before, "    b integer\n", "    b bigint\n", 1)
	if after := e.dump(t); want != after {
		t.Fatalf("schema differs beyond the ALTER:\n%s", diff(want, after))
	}
	e.exec("update pubt set b = b + 1 where id = 1")
}
