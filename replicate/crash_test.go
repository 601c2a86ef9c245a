package replicate_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// 7. PostgreSQL itself crashes (immediate shutdown) during the copy and
// during the cut-over: after recovery either the old or the new table is
// complete, never a mix, no replication slot survives, and the continued
// run (which starts over under logical capture) finishes with equal
// content and nothing left behind. Each method gets its own cluster, so
// the subtests do not run in parallel.
func TestIntegrityServerCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own clusters")
	}
	for _, capture := range captures {
		t.Run(capture, func(t *testing.T) {
			if capture == replicate.CaptureLogical {
				needsLogical(t)
			}
			e, c := newClusterEnv(t, nil)
			e.seed("orders", "control", 6000)
			sum := func() string {
				return e.str("select md5(string_agg(id::text || v || n, ',' order by id)) from orders")
			}
			noSlot := func(when string) {
				t.Helper()
				if n := e.str("select count(*) from pg_replication_slots"); n != "0" {
					t.Fatalf("%s: %s replication slot(s) survived the crash", when, n)
				}
			}
			ctx := context.Background()

			// 1. Crash in the middle of the copy.
			before := sum()
			o := captureOpts(capture, "alter table orders alter column id type bigint")
			o.BatchSize, o.CopyDataJobs = 300, 1
			var batches atomic.Int64
			var crashed atomic.Bool
			o.ShowQueries = func(sql string) {
				if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 3 {
					crashed.Store(true)
					if err := c.Restart("immediate"); err != nil {
						t.Error(err)
					}
				}
			}
			err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil)
			if !crashed.Load() {
				t.Fatalf("no crash during the copy (%d batches): %v", batches.Load(), err)
			}
			e.pool.Reset()
			noSlot("crash during the copy")
			if err == nil {
				// Trigger capture keeps all its state in logged tables: when
				// the pool reconnects in time, the run survives the crash.
				if capture == replicate.CaptureLogical {
					t.Fatal("a logical run survived the loss of its slot?")
				}
				t.Log("the run survived the crash")
			} else {
				if got := sum(); got != before {
					t.Fatal("original changed by a crash during the copy")
				}
				// changes while nobody runs the job
				e.exec("update orders set n = -n where id % 100 = 0; update control set n = -n where id % 100 = 0")
				o.ShowQueries = nil
				o.Continue = true
				if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); err != nil {
					t.Fatal(err)
				}
			}
			if got := e.colType("orders", "id"); got != "bigint" {
				t.Fatalf("id is %s", got)
			}
			e.assertSame("orders", "control", "id::int, v, n")
			e.assertNothingLeft("orders")

			// 2. Crash inside the cut-over transaction, before COMMIT.
			o = captureOpts(capture, "alter table orders alter column n type bigint")
			crashed.Store(false)
			o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
				if point == replicate.PhaseSwitch {
					crashed.Store(true)
					return c.Restart("immediate")
				}
				return nil
			}
			if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); err == nil {
				t.Fatal("the cut-over survived a server crash?")
			}
			if !crashed.Load() {
				t.Fatal("no crash during the cut-over")
			}
			e.pool.Reset()
			if got := e.colType("orders", "n"); got != "integer" {
				t.Fatalf("half a switch: n is %s", got)
			}
			noSlot("crash during the cut-over")
			e.exec("update orders set n = n + 1 where id % 77 = 0; update control set n = n + 1 where id % 77 = 0")
			e.assertSame("orders", "control", "id::int, v, n")

			// 3. Continue: finishes, equal, nothing left.
			o.TestHook = nil
			o.Continue = true
			if err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil); err != nil {
				t.Fatal(err)
			}
			if got := e.colType("orders", "n"); got != "bigint" {
				t.Fatalf("n is %s", got)
			}
			e.assertSame("orders", "control", "id::int, v, n::int")
			e.assertNothingLeft("orders")
			noSlot("the end")
		})
	}
}

// A run that died after prepare but before its capture and copy ranges were
// set up must not be "continued" into an empty swap: it starts over.
func TestResumeBeforeCaptureStartsOver(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 3000)
	o := opts("alter table orders alter column id type bigint")
	ctx, cancel := context.WithCancel(context.Background())
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "CREATE TABLE") && strings.Contains(sql, "__tat_delta") {
			cancel() // dies right after prepare committed
		}
	}
	_ = replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil)
	if e.str("select to_regclass('orders__tat_state') is not null") != "true" {
		t.Fatal("the interrupted run left no plan: the test proves nothing")
	}
	if left, err := replicate.HasEarlierRun(context.Background(), e.pool, "orders"); err != nil || !left {
		t.Fatalf("HasEarlierRun = %v, %v; want true", left, err)
	}
	o.ShowQueries, o.Continue = nil, true
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	e.assertSame("orders", "control", "id::int, v, n")
	e.assertNoLeftovers("orders")
	if left, err := replicate.HasEarlierRun(context.Background(), e.pool, "orders"); err != nil || left {
		t.Fatalf("HasEarlierRun after the switch = %v, %v; want false", left, err)
	}
}
