package sqlapi

import (
	"errors"
	"testing"
)

func TestValidateCommand(t *testing.T) {
	t.Parallel()
	cases := []struct {
		cmd string
		ok  bool
	}{
		{"alter table orders alter column id type bigint", true},
		{"ALTER TABLE public.orders ADD COLUMN note text DEFAULT 'a;b';", true},
		{"alter table if exists only \"Orders\" drop column x", true},
		{"alter table orders rename column a to b", true},
		{"alter table orders alter column id type bigint using id::bigint, add column y int", true},
		{"alter table orders move column a before b", true},
		{"ALTER TABLE IF EXISTS ONLY s.\"T\" MOVE COLUMN \"A\" BEFORE data;", true},
		{"alter table orders move column a before b /* trailing */", true},
		{"", false},
		{" ; ", false},
		{"select 1", false},
		{"drop table orders", false},
		{"alter table orders add column x int; drop table orders", false},
		{"alter table orders add column x int; alter table orders add column y int", true}, // applied together
		{"alter table orders add column x int; alter table other add column y int", false},
		{"alter table orders add column x int; alter table orders rename column a to b", false},
		{"alter index orders_pkey rename to x", false},
		{"alter view v rename column a to b", false},
		{"alter table orders rename to orders2", false},
		{"alter table orders set schema other", false},
		{"alter table all in tablespace a set tablespace b", false},
		{"alter table orders move column a", false},
		{"alter table orders move column a before b; drop table x", false},
		{"alter table orders move column a after b", false},
		{"alter table orders add column", false},
		{"create table x (id int)", false},
	}
	for _, c := range cases {
		err := ValidateCommand(c.cmd)
		if c.ok && err != nil {
			t.Errorf("ValidateCommand(%q) = %v, want ok", c.cmd, err)
		}
		if !c.ok {
			if err == nil {
				t.Errorf("ValidateCommand(%q) = nil, want refusal", c.cmd)
			} else if !errors.Is(err, ErrInvalidCommand) {
				t.Errorf("ValidateCommand(%q) = %v, not ErrInvalidCommand", c.cmd, err)
			}
		}
	}
}
