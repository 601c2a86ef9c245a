package replicate

import (
	"strings"
	"testing"
)

// FuzzParseCommand: no input crashes the parser or the rewriter, and a
// rewritten command never names a table other than the shadow.
func FuzzParseCommand(f *testing.F) {
	for _, s := range []string{
		"alter table orders alter column id type bigint",
		`ALTER TABLE "My Schema"."Order" ALTER COLUMN "Id" TYPE bigint USING "Id"::bigint`,
		"alter table orders alter column id type bigint, add column x int default 0, drop column y",
		"alter table t move column a before b",
		"alter table t rename column a to b",
		"alter table t drop constraint t_pkey, add primary key (id)",
		"alter table t replica identity using index t_idx",
		"alter table t set tablespace x; drop table t",
		"alter table only t add constraint c check (a > 0) not valid",
		"select 1",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCommand(s)
		if err != nil {
			return
		}
		c.NeedsRewrite()
		out, err := c.ShadowSQL("s", "t__tat_new", map[string]string{"t_pkey": "tmp"})
		if err != nil || c.Move != nil {
			return // refused: nothing runs
		}
		again, err := ParseCommand(out)
		if err != nil {
			t.Fatalf("rewritten command does not parse: %q -> %q: %v", s, out, err)
		}
		if again.Schema != "s" || again.Table != "t__tat_new" {
			t.Fatalf("rewritten command targets %q.%q: %q", again.Schema, again.Table, out)
		}
		if strings.Count(out, ";") > 0 && again.Text == "" {
			t.Fatal("unreachable")
		}
	})
}
