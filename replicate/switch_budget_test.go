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
// switch's lock, is not applied under the lock: the switch sees more changes
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
			var once sync.Once
			var hookErr error
			o.TestHook = func(ctx context.Context, point string, _ pgx.Tx) error {
				if point == "before-lock" {
					once.Do(func() {
						hookErr = pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
							_, err := tx.Exec(ctx, bulk)
							return err
						})
					})
				}
				return nil
			}
			var mu sync.Mutex
			var events []string
			rep := reporterFunc(func(phase, msg string) { mu.Lock(); events = append(events, msg); mu.Unlock() })
			if err := runWith(e, o, rep); err != nil {
				t.Fatal(err)
			}
			if hookErr != nil {
				t.Fatal(hookErr)
			}
			mu.Lock()
			joined := strings.Join(events, "\n")
			mu.Unlock()
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
