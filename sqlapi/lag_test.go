package sqlapi

import (
	"context"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

func TestLagTracker(t *testing.T) {
	var lt lagTracker
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	// the WAL grows 1000 bytes a second; the stream consumes nothing for 3s
	if got := lt.observe(at(0), 10000, 0); got != 0 {
		t.Fatalf("caught up: %v", got)
	}
	if got := lt.observe(at(1), 11000, 1000); got != time.Second {
		t.Fatalf("1s behind: %v", got)
	}
	if got := lt.observe(at(3), 13000, 3000); got != 3*time.Second {
		t.Fatalf("stuck at the 0s position: %v", got)
	}
	// consumed up to 12500: written at 2.5s (interpolated between the samples at 1s and 3s)
	if got := lt.observe(at(4), 14000, 1500); got != 1500*time.Millisecond {
		t.Fatalf("interpolated: %v", got)
	}
	// behind the oldest sample kept: a lower bound, growing
	if got := lt.observe(at(6), 15000, 5000); got < 5*time.Second {
		t.Fatalf("lower bound: %v", got)
	}
	if got := lt.observe(at(7), 15000, 0); got != 0 {
		t.Fatalf("caught up again: %v", got)
	}
	if len(lt.samples) != 1 {
		t.Fatalf("samples kept after catching up: %d", len(lt.samples))
	}
}

// The reporter writes capture_lag: NULL for trigger capture (no WAL behind),
// a growing interval while logical capture consumes nothing, 0 caught up.
func TestReporterCaptureLag(t *testing.T) {
	t.Parallel()
	url, c := setup(t)
	ctx := context.Background()
	pool := testpg.Pool(t, url)
	mustExec(t, c, "create table a (id int primary key)")
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table a alter column id type bigint')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := Claim(ctx, c, id, "r1"); err != nil || !ok {
		t.Fatalf("claim: %v %v", ok, err)
	}
	lag := func() *time.Duration {
		t.Helper()
		var us *int64
		if err := c.QueryRow(ctx, "select (extract(epoch from capture_lag) * 1000000)::bigint from tat.status where id = $1", id).Scan(&us); err != nil {
			t.Fatal(err)
		}
		if us == nil {
			return nil
		}
		d := time.Duration(*us) * time.Microsecond
		return &d
	}
	rep := NewReporter(pool, id, nil)
	rep.SetInterval(0)
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy})
	if l := lag(); l != nil {
		t.Fatalf("trigger capture: capture_lag %v", *l)
	}
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, LagBytes: 100})
	mustExec(t, c, "create table wal as select g from generate_series(1, 1000) g") // the WAL moves on
	time.Sleep(600 * time.Millisecond)
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy, LagBytes: 1 << 30}) // still behind the first sample
	if l := lag(); l == nil || *l < 500*time.Millisecond || *l > 5*time.Second {
		t.Fatalf("behind: capture_lag %v", l)
	}
	rep.Progress(ctx, replicate.Progress{Phase: replicate.PhaseCopy})
	if l := lag(); l == nil || *l != 0 {
		t.Fatalf("caught up: capture_lag %v", l)
	}
}
