package replicate_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// A transaction is decoded as soon as its commit record is flushed, but
// other sessions see it only once it leaves the proc array; with a
// synchronous standby that does not answer, it stays committed-but-invisible
// for as long as the standby is away. Its key must not be re-read (and
// trimmed) in that window: the re-read would see the row without the
// change, and the change would be lost. The writer here commits with
// synchronous_commit = on to a standby that never comes (a private
// cluster: every other session commits locally); its wait is canceled
// (the commit then shows) only when the job reaches its switch, or after
// a few seconds. The engine must wait for it (and say so), and the
// switched table must hold the update. Before waitVisible the key was
// applied while the update was invisible, and the update lost: the row
// kept its old value.
func TestLogicalWaitsForVisibleCommit(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own cluster")
	}
	needsLogical(t)
	t.Parallel()
	e, _ := newClusterEnv(t, map[string]string{
		"synchronous_standby_names": "'tat_never'",
		"synchronous_commit":        "local",
	})
	e.seed("orders", "control", 2000)
	ctx := context.Background()

	w, err := pgx.Connect(ctx, e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close(ctx)
	var pid int
	if err := w.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	var (
		hookErrs   hookErrs
		writerDone = make(chan error, 1)
		switching  = make(chan struct{})
		once, sw   sync.Once
		canceled   atomic.Bool
	)
	release := func() {
		_, err := e.pool.Exec(ctx, "select pg_cancel_backend($1)", pid)
		hookErrs.add(err)
		canceled.Store(true)
	}
	o := captureOpts(replicate.CaptureLogical, "alter table orders alter column id type bigint")
	st := atStages(nil, func() {
		once.Do(func() {
			go func() {
				_, err := w.Exec(ctx, "set synchronous_commit = on; update orders set v = 'late' where id = 7")
				writerDone <- err
			}()
			// Committed locally, waiting for the standby: invisible.
			deadline := time.Now().Add(20 * time.Second)
			for {
				var waiting bool
				if err := e.pool.QueryRow(ctx, "select exists (select from pg_stat_activity where pid = $1 and wait_event = 'SyncRep')", pid).Scan(&waiting); err != nil {
					hookErrs.add(err)
					return
				}
				if waiting {
					break
				}
				if time.Now().After(deadline) {
					hookErrs.add(errors.New("the writer never waited for the standby"))
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
			go func() {
				select {
				case <-switching:
				case <-time.After(7 * time.Second):
				}
				release()
			}()
		})
	})
	o.ShowQueries = st.show
	o.TestHook = func(_ context.Context, point string, _ pgx.Tx) error {
		if point == "dependents-read" {
			sw.Do(func() { close(switching) })
		}
		return nil
	}
	rep := &eventLog{}
	err = runWith(e, o, rep)
	sw.Do(func() { close(switching) })
	select {
	case werr := <-writerDone:
		// The cancel ends the wait; the commit stays (a warning).
		if werr != nil {
			t.Logf("writer: %v", werr)
		}
	case <-time.After(30 * time.Second):
		t.Error("the writer never returned")
	}
	if err != nil {
		t.Fatal(err)
	}
	hookErrs.check(t)
	st.check(t)
	if !canceled.Load() {
		t.Fatal("the writer was never released")
	}
	if got := e.str("select v from orders where id = 7"); got != "late" {
		t.Fatalf("the update committed while the job ran is lost: row 7 holds %q\nevents:\n%s", got, rep)
	}
	if !strings.Contains(rep.String(), "to become visible") {
		t.Fatalf("no event about the wait:\n%s", rep)
	}
	e.assertNothingLeft("orders")
}
