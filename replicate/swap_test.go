package replicate_test

import (
	"os/exec"
	"regexp"
	"strings"
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
create publication pub_orders for table orders (id, customer, amount, n) where (amount > 1);
alter table orders replica identity full;
create statistics orders_stats (ndistinct) on customer, n from orders;
alter table orders cluster on orders_expr;
analyze orders;
`

// TestSwapKeepsEverything migrates a table with every kind of dependent and
// compares pg_dump -s of the whole database before and after: the only
// difference must be what the ALTER changed.
func TestSwapKeepsEverything(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(richSchema)
	t.Cleanup(func() {
		e.pool.Exec(t.Context(), "drop owned by tat_reader, tat_writer cascade; drop role tat_reader; drop role tat_writer")
	})
	before := e.dump(t)
	seqBefore := e.str("select last_value from orders_id_seq")
	codeBefore := e.str("select max(code) from orders")
	rowsBefore := e.str("select md5(string_agg(t::text, ',' order by id)) from orders t")

	if err := e.run(opts("alter table orders alter column n type bigint")); err != nil {
		t.Fatal(err)
	}
	after := e.dump(t)
	want := strings.Replace(before, "    n integer,", "    n bigint,", 1)
	if want != after {
		t.Fatalf("schema differs beyond the ALTER:\n%s", diff(want, after))
	}
	if got := e.str("select md5(string_agg(t::text, ',' order by id)) from orders t"); got != rowsBefore {
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
