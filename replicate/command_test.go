package replicate

import (
	"errors"
	"strings"
	"testing"
)

func TestParseCommand(t *testing.T) {
	cases := []struct {
		in      string
		schema  string
		table   string
		rewrite bool
		shadow  string // substring of the shadow SQL
		err     string
	}{
		{in: "alter table orders alter column id type bigint", table: "orders", rewrite: true, shadow: `ALTER TABLE public.orders__tat_new ALTER COLUMN id TYPE bigint`},
		{in: "ALTER TABLE \"My Schema\".\"Order\" ALTER COLUMN \"Id\" TYPE bigint", schema: "My Schema", table: "Order", rewrite: true},
		{in: "Alter Table orders alter column id type bigint, add column x int default 0, drop column y", table: "orders", rewrite: true},
		{in: "alter table orders add column x int", table: "orders"},
		{in: "alter table orders add column x int default 0", table: "orders"},
		{in: "alter table orders add column x float default random()", table: "orders", rewrite: true},
		{in: "alter table orders rename column a to b", table: "orders", shadow: "RENAME COLUMN a TO b"},
		{in: "alter table orders set tablespace ts", table: "orders", rewrite: true},
		{in: "alter table orders drop constraint orders_pkey", table: "orders", shadow: "DROP CONSTRAINT tmp_pkey"},
		{in: "alter table s.orders move column c before a", schema: "s", table: "orders", rewrite: true},
		{in: "alter table \"Select\" move column \"Weird\" before b;", table: "Select", rewrite: true},
		{in: "", err: "empty"},
		{in: "select 1", err: "not an ALTER TABLE"},
		{in: "alter table a add column x int; drop table a", err: "exactly one"},
		{in: "alter index i set tablespace x", err: "only ALTER TABLE"},
		{in: "alter table a rename to b", err: "RENAME TO"},
		{in: "alter table a attach partition b for values in (1)", err: "not supported online"},
		{in: "alter tabel a", err: "syntax error"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			c, err := ParseCommand(tc.in)
			if tc.err != "" {
				if err == nil || !errors.Is(err, ErrBadCommand) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("want error %q, got %v", tc.err, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Schema != tc.schema || c.Table != tc.table {
				t.Fatalf("table %q.%q, want %q.%q", c.Schema, c.Table, tc.schema, tc.table)
			}
			if c.NeedsRewrite() != tc.rewrite {
				t.Fatalf("NeedsRewrite = %v", c.NeedsRewrite())
			}
			sql, err := c.ShadowSQL("public", "orders__tat_new", map[string]string{"orders_pkey": "tmp_pkey"})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(sql, tc.shadow) {
				t.Fatalf("shadow SQL %q lacks %q", sql, tc.shadow)
			}
		})
	}
}

func TestMoveAndUsing(t *testing.T) {
	c, err := ParseCommand(`alter table t move column "B c" before a`)
	if err != nil {
		t.Fatal(err)
	}
	if c.Move == nil || c.Move.Column != "B c" || c.Move.Before != "a" {
		t.Fatalf("move = %+v", c.Move)
	}
	c, err = ParseCommand(`alter table t alter column v type int using length(v) + "W"`)
	if err != nil {
		t.Fatal(err)
	}
	expr, ok, err := c.UsingExpr("v")
	if err != nil || !ok || expr != `length(v) + "W"` {
		t.Fatalf("using = %q %v %v", expr, ok, err)
	}
}
