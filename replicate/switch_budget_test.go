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
	for _, capture := range []string{replicate.CaptureTrigger, replicate.CaptureLogical} {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			if capture == replicate.CaptureLogical {
				needsLogical(t)
			}
			e := newEnv(t)
			e.seed("orders", "control", 30000)
			o := captureOpts(capture, "alter table orders alter column n type bigint using n * 2")
			var once sync.Once
			var hookErr error
			o.TestHook = func(ctx context.Context, point string, _ pgx.Tx) error {
				if point == "before-lock" {
					once.Do(func() {
						hookErr = pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error {
							_, err := tx.Exec(ctx, `update orders set n = n + 7 where id <= 20000;
								delete from orders where id > 25000;
								update control set n = n + 7 where id <= 20000;
								delete from control where id > 25000`)
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
				t.Fatalf("the bulk change (25000 rows) was applied under the lock, not postponed:\n%s", joined)
			}
			m := regexp.MustCompile(`lock held (\S+)`).FindStringSubmatch(joined)
			if m == nil {
				t.Fatalf("no switch:\n%s", joined)
			}
			// Generous: catches a backlog applied under the lock (seconds),
			// not a slow machine.
			if held, err := time.ParseDuration(m[1]); err != nil || held > 3*time.Second {
				t.Fatalf("lock held %s", m[1])
			}
			e.assertSame("orders", "(select id, v, n * 2 as n from control) c", "id, v, n")
			e.assertNoLeftovers("orders")
		})
	}
}
