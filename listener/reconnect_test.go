package listener

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// The sidecar survives a crash-restart of PostgreSQL: it reconnects (with
// backoff) and runs jobs queued after the restart.
func TestReconnectAfterRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts its own cluster")
	}
	t.Parallel()
	cl, err := testpg.Start(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Stop)
	url := testpg.NewDBOn(t, cl.URL)
	testpg.Install(t, url)
	testpg.Exec(t, url, "create table t1 (id int primary key); create table t2 (id int primary key)")
	start(t, Config{DatabaseURL: url, PollInterval: 200 * time.Millisecond, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond,
		Run: func(context.Context, *pgxpool.Pool, replicate.Options, replicate.Reporter, replicate.Control) error {
			return nil
		}})

	ctx := context.Background()
	run := func(cmd string) {
		t.Helper()
		c, err := pgx.Connect(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		id := queue(t, c, cmd)
		if r := waitFor(t, c, id, 20*time.Second, "done", terminal); r.state != "done" {
			t.Fatalf("%s: %+v", cmd, r)
		}
	}
	run("alter table t1 add column x int")
	if err := cl.Restart("immediate"); err != nil {
		t.Fatal(err)
	}
	run("alter table t2 add column x int")
}
