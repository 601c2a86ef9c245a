package replicate_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// PostgreSQL itself crashes (immediate shutdown) during the copy and during
// the cut-over: after recovery either the old or the new table is complete,
// never a mix, and the continued run finishes with equal content.
func TestServerCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own cluster")
	}
	c, err := testpg.Start(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	url := testpg.NewDBOn(t, c.URL)
	e := &env{t: t, url: url, pool: testpg.Pool(t, url)}
	e.seed("orders", "control", 20000)
	sum := func() string {
		return e.str("select md5(string_agg(id::text || v || n, ',' order by id)) from orders")
	}
	before := sum()
	ctx := context.Background()

	// 1. Crash in the middle of the copy.
	o := opts("alter table orders alter column id type bigint")
	o.BatchSize, o.CopyDataJobs = 500, 1
	var batches atomic.Int64
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 10 {
			if err := c.Restart("immediate"); err != nil {
				t.Error(err)
			}
		}
	}
	if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); err == nil {
		t.Fatal("the run survived a server crash?")
	}
	e.pool.Reset()
	if got := sum(); got != before {
		t.Fatal("original changed by a crash during the copy")
	}
	e.exec("update orders set n = -n where id % 100 = 0") // changes while nobody runs the job

	// 2. Continue; crash inside the cut-over transaction, before COMMIT.
	o.ShowQueries = nil
	o.Continue = true
	o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
		if point == replicate.PhaseSwitch {
			return c.Restart("immediate")
		}
		return nil
	}
	if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); err == nil {
		t.Fatal("the cut-over survived a server crash?")
	}
	e.pool.Reset()
	if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'id'"); got != "integer" {
		t.Fatalf("half a switch: id is %s", got)
	}
	e.exec("update control set n = -n where id % 100 = 0")
	e.assertSame("orders", "control", "*")

	// 3. Continue again: finishes, equal.
	o.TestHook = nil
	if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); err != nil {
		t.Fatal(err)
	}
	e.assertSame("orders", "control", "id::int, v, n")
	e.assertNoLeftovers("orders")
}
