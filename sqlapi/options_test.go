package sqlapi

import (
	"strings"
	"testing"
)

// The engine runs the command as the PostgreSQL parser reads it: a job
// whose command names another table than the one tat.alter resolved (and
// checked the requester's ownership of) is refused before it runs.
func TestOptionsRefuseCommandOfAnotherTable(t *testing.T) {
	opts := []byte(`{"capture": "trigger"}`)
	for _, tc := range []struct {
		table, command, err string
	}{
		{"public.t", "alter table t add column x int", ""},
		{"public.t", "alter table public.t add column x int", ""},
		{`"My Schema"."Orders"`, `alter table "My Schema"."Orders" move column b before a`, ""},
		{`public."it's ""q"""`, `alter table "it's ""q""" add column x int`, ""},
		{"public.t", "alter table if exists t add column x int", ""}, // the engine refuses IF EXISTS itself
		// what tat.alter's scanner read as "only" (a table of the requester)
		// is ALTER TABLE ONLY victim to the parser
		{`public."only"`, "alter table only/**/victim add column x int", `alters table "victim"`},
		{"public.t", "alter table other.t add column x int", `alters table "other.t"`},
		{"public.t", "alter table u add column x int", `alters table "u"`},
	} {
		_, err := Options(Job{ID: 7, Command: tc.command, TableName: tc.table, Options: opts, RequestedBy: "r"})
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s on %s: %v", tc.command, tc.table, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s on %s: got %v, want %q", tc.command, tc.table, err, tc.err)
		}
	}
}

func TestSplitQualifiedName(t *testing.T) {
	for in, want := range map[string][2]string{
		"public.t":             {"public", "t"},
		`"My Schema"."Orders"`: {"My Schema", "Orders"},
		`public."a.b"`:         {"public", "a.b"},
		`"x""y".z`:             {`x"y`, "z"},
		"t":                    {"", ""},
		"a.b.c":                {"", ""},
		`"unterminated.t`:      {"", ""},
		`public."t"x`:          {"", ""},
	} {
		s, tb, ok := splitQualifiedName(in)
		if ok != (want[0] != "") || s != want[0] || tb != want[1] {
			t.Errorf("splitQualifiedName(%q) = %q, %q, %v", in, s, tb, ok)
		}
	}
}
