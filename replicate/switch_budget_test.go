package replicate_test

import (
	"context"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgtat/pg_tat/replicate"
)

// A bulk transaction that commits after the last catch-up, right before the
// switch's lock request (hook point dependents-read), is not applied under the lock: the switch sees more changes
// than its budget, lets go, catches up, and switches with a short lock. The
// result equals a control that took the same changes.
func TestSwitchBudgetBulkChangeBeforeLock(t *testing.T) {
	t.Parallel()
	testSwitchBudget(t, 30000, `update orders set n = n + 7 where id <= 20000;
		delete from orders where id > 25000;
		update control set n = n + 7 where id <= 20000;
		delete from control where id > 25000`, 3*time.Second)
}

// The original pg_tat's regression test deletes most of a table while the
// tool runs: a bulk UPDATE and DELETE of 200k rows committed right before
// the lock. The lock window stays that of a switch without a backlog; the
// bound is generous for a loaded machine (a backlog applied under the lock
// takes seconds), the figure is logged.
func TestSwitchBudgetBulk200kBeforeLock(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 250k rows")
	}
	t.Parallel()
	testSwitchBudget(t, 250000, `update orders set n = n + 7 where id <= 100000;
		delete from orders where id > 150000;
		update control set n = n + 7 where id <= 100000;
		delete from control where id > 150000`, time.Second)
}

func testSwitchBudget(t *testing.T, rows int, bulk string, bound time.Duration) {
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			if capture == replicate.CaptureLogical {
				needsLogical(t)
			}
			e := newEnv(t)
			e.seed("orders", "control", rows)
			o := captureOpts(capture, "alter table orders alter column n type bigint using n * 2")
			late := &onceAt{point: "dependents-read", fn: func(ctx context.Context) error {
				return pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
					_, err := tx.Exec(ctx, bulk)
					return err
				})
			}}
			o.TestHook = late.hook
			rep := &eventLog{}
			if err := runWith(e, o, rep); err != nil {
				t.Fatal(err)
			}
			late.check(t)
			joined := rep.String()
			if !strings.Contains(joined, "switch postponed") {
				t.Fatalf("the bulk change was applied under the lock, not postponed:\n%s", joined)
			}
			m := regexp.MustCompile(`lock held (\S+)`).FindStringSubmatch(joined)
			if m == nil {
				t.Fatalf("no switch:\n%s", joined)
			}
			held, err := time.ParseDuration(m[1])
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d rows changed right before the lock: lock held %s", rows, held)
			// Generous: catches a backlog applied under the lock (seconds),
			// not a slow machine.
			if held > bound {
				t.Fatalf("lock held %s (bound %s)", held, bound)
			}
			e.assertSame("orders", "(select id, v, n * 2 as n from control) c", "id, v, n")
			e.assertNoLeftovers("orders")
		})
	}
}

// The last delta under the lock looks its keys up through indexes, however
// the delta's size on disk misleads the planner: a bulk change right before
// the switch is caught up before the lock (settleBeforeLock) and leaves the
// delta's pages full of trimmed rows; planned from that size, the few
// hundred changes left for the lock were a hash join over a sequential scan
// of the shadow and the original, a scan of the whole table under the
// lock. The switch's own transaction counts its scans of the shadow
// (pg_stat_xact_user_tables), read under the lock at the end of the swap.
func TestSwitchLastDeltaByIndex(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 200k rows")
	}
	t.Parallel()
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			if capture == replicate.CaptureLogical {
				needsLogical(t)
			}
			e := newEnv(t)
			e.seed("orders", "control", 200000)
			o := captureOpts(capture, "alter table orders alter column n type bigint")
			var shadow uint32
			var seqScans, idxScans int64 = -1, -1
			var bulkOnce sync.Once
			var hookErr error
			change := func(ctx context.Context, sql string) {
				if err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
					_, err := tx.Exec(ctx, sql)
					return err
				}); err != nil && hookErr == nil {
					hookErr = err
				}
			}
			o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
				switch point {
				case "before-lock":
					bulkOnce.Do(func() {
						change(ctx, `update orders set n = n + 1 where id <= 100000; update control set n = n + 1 where id <= 100000`)
						// As autovacuum does after a bulk change: the delta's
						// statistics say 100k rows from now on. (Logical
						// capture: once the stream has brought them.)
						for i := 0; i < 600 && e.str("select count(*) >= 100000 from orders__tat_delta") != "true"; i++ {
							time.Sleep(50 * time.Millisecond)
						}
						change(ctx, "analyze orders__tat_delta")
					})
				case "dependents-read":
					// Every attempt: the one that switches has these
					// changes to apply under its lock.
					if err := e.pool.QueryRow(ctx, "select 'orders__tat_new'::regclass::oid").Scan(&shadow); err != nil {
						return err
					}
					change(ctx, `update orders set n = n + 3 where id % 500 = 0; update control set n = n + 3 where id % 500 = 0`)
				case replicate.PhaseSwitch:
					return tx.QueryRow(ctx, "select coalesce(seq_scan, 0), coalesce(idx_scan, 0) from pg_stat_xact_user_tables where relid = $1",
						shadow).Scan(&seqScans, &idxScans)
				}
				return nil
			}
			rep := &eventLog{}
			if err := runWith(e, o, rep); err != nil {
				t.Fatal(err)
			}
			if hookErr != nil {
				t.Fatal(hookErr)
			}
			joined := rep.String()
			last := regexp.MustCompile(`last delta under the lock: (\d+) changes`).FindStringSubmatch(joined)
			if last == nil || last[1] == "0" {
				t.Fatalf("the switch applied no delta under its lock (the test proves nothing):\n%s", joined)
			}
			t.Logf("%s; the switch's scans of the shadow: %d sequential, %d by index", last[0], seqScans, idxScans)
			if seqScans != 0 || idxScans <= 0 {
				t.Fatalf("the last delta scanned the shadow sequentially under the lock (%d seq scans, %d index scans)", seqScans, idxScans)
			}
			e.assertSame("orders", "control", "id, v, n")
			e.assertNoLeftovers("orders")
		})
	}
}
