package replicate_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// Each case migrates "orders" under a concurrent writer and compares the
// result with "control", to which the writer applied the same changes.
func TestCommandsUnderWriters(t *testing.T) {
	cases := []struct {
		name    string
		setup   string // extra DDL on orders (and not on control)
		command string
		cols    string // compared columns of orders
		ctrl    string // the same on control
		check   func(e *env)
		// twoStep stops before the switch (--no-switch-table), stops the
		// writer, then continues (--continue-switch-table): for commands
		// whose result depends on values at the switch.
		twoStep bool
	}{
		{name: "seed: alter column type", command: "alter table orders alter column id type bigint",
			cols: "id, v, n", ctrl: "id, v, n"},
		{name: "multiple subcommands", setup: "alter table orders add column y int default 7",
			command: "alter table orders alter column id type bigint, add column x int default 0, drop column y",
			cols:    "id, v, n, x", ctrl: "id, v, n, 0",
			check: func(e *env) {
				if got := e.str(`select string_agg(attname, ',' order by attnum) from pg_attribute where attrelid = 'orders'::regclass and attnum > 0 and not attisdropped`); got != "id,v,n,x" {
					e.t.Fatalf("columns %s", got)
				}
			}},
		{name: "using expression", command: "alter table orders alter column n type text using (n * 2)::text || '!'",
			cols: "id, v, n", ctrl: "id, v, (n * 2)::text || '!'"},
		{name: "using another column, two steps", command: "alter table orders alter column n type bigint using n + id",
			cols: "id, v, n", ctrl: "id, v, n + id", twoStep: true},
		{name: "volatile default", command: "alter table orders add column r float8 not null default random()",
			cols: "id, v, n", ctrl: "id, v, n",
			check: func(e *env) {
				if e.str("select count(distinct r) > 100 from orders") != "true" {
					e.t.Fatal("random() default not evaluated per row")
				}
			}},
		{name: "move column", command: "alter table orders move column n before v",
			cols: "id, v, n", ctrl: "id, v, n",
			check: func(e *env) {
				if got := e.str(`select string_agg(attname, ',' order by attnum) from pg_attribute where attrelid = 'orders'::regclass and attnum > 0 and not attisdropped`); got != "id,n,v" {
					e.t.Fatalf("columns %s", got)
				}
			}},
		{name: "set not null (rewrite path)", command: "alter table orders alter column v set not null, alter column n type numeric",
			cols: "id, v, n", ctrl: "id, v, n"},
		{name: "rename column (direct)", setup: "create view ov as select id, n from orders",
			command: "alter table orders rename column n to m", cols: "id, v, m", ctrl: "id, v, n",
			check: func(e *env) { e.str("select count(*) from ov") }},
		{name: "add column constant default (direct)", command: "alter table orders add column z int default 5",
			cols: "id, v, n, z", ctrl: "id, v, n, 5"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.seed("orders", "control", 5000)
			if tc.setup != "" {
				e.exec(tc.setup)
			}
			w := e.startWriter(2, "orders", "control", 6000)
			time.Sleep(100 * time.Millisecond)
			o := opts(tc.command)
			o.StopBeforeSwitch = tc.twoStep
			err := e.run(o)
			time.Sleep(100 * time.Millisecond)
			w.Stop(t)
			if err != nil {
				t.Fatal(err)
			}
			if tc.twoStep {
				if e.str("select count(*) from orders__tat_new") == "0" {
					t.Fatal("nothing copied before the switch")
				}
				o.StopBeforeSwitch, o.Continue = false, true
				if err := e.run(o); err != nil {
					t.Fatal(err)
				}
			}
			e.assertSame(fmt.Sprintf("(select %s from orders) a", tc.cols), fmt.Sprintf("(select %s from control) b", tc.ctrl), "*")
			e.assertNoLeftovers("orders")
			if tc.check != nil {
				tc.check(e)
			}
		})
	}
}

func TestSetTablespace(t *testing.T) {
	c := testpg.Shared()
	if c == nil {
		t.Skip("needs the harness's own cluster to create a tablespace directory")
	}
	e := newEnv(t)
	dir := filepath.Join(c.Dir, "ts_"+strings.ReplaceAll(t.Name(), "/", "_"))
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	testpg.ChownToPostgres(t, dir)
	name := fmt.Sprintf("ts%d", time.Now().UnixNano())
	e.exec(fmt.Sprintf("create tablespace %s location '%s'", name, dir))
	t.Cleanup(func() { e.pool.Exec(t.Context(), "drop table if exists orders; drop tablespace if exists "+name) })
	e.seed("orders", "control", 3000)
	e.exec("create index orders_n on orders (n)")
	w := e.startWriter(2, "orders", "control", 4000)
	err := e.run(opts("alter table orders set tablespace " + name))
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	if got := e.str(`select coalesce((select spcname from pg_tablespace where oid = reltablespace), 'default') from pg_class where relname = 'orders'`); got != name {
		t.Fatalf("table in %s", got)
	}
	if got := e.str(`select count(*) from pg_class where relname in ('orders_pkey', 'orders_n') and reltablespace = 0`); got != "2" {
		t.Fatalf("indexes moved: %s of 2 stayed", got)
	}
	if got := e.str(`select coalesce((select spcname from pg_tablespace where oid = t.reltablespace), 'default') from pg_class c join pg_class t on t.oid = c.reltoastrelid where c.relname = 'orders'`); got != name {
		t.Fatalf("toast in %s", got)
	}
	e.assertSame("orders", "control", "*")
}
