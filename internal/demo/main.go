// Command demo starts a throwaway PostgreSQL under a temp dir, installs
// schema tat, creates a sample table, starts tatd and runs the main job
// (alter column id type bigint) under a concurrent writer, printing
// tat.status as it goes and the result. On a terminal it then waits for
// Ctrl-C, so that you can try more from psql; otherwise it exits.
// It is what `make demo` runs.
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	pgtat "github.com/pgtat/pg_tat"
	"github.com/pgtat/pg_tat/internal/testpg"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP) // a closed terminal stops it too
	defer stop()
	c, err := testpg.Start(nil)
	if err != nil {
		return err
	}
	defer c.Stop()
	conn, err := pgx.Connect(ctx, c.URL)
	if err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, pgtat.InstallSQL); err != nil {
		return fmt.Errorf("install.sql: %w", err)
	}
	if _, err := conn.Exec(ctx, `create table if not exists orders (id int primary key, customer int not null, total numeric(12,2), note text);
		insert into orders select g, g % 1000, g * 1.5, md5(g::text) from generate_series(1, 200000) g on conflict do nothing;
		analyze orders`); err != nil {
		return fmt.Errorf("sample table: %w", err)
	}
	conn.Close(ctx)

	u, _ := url.Parse(c.URL)
	tatd := exec.CommandContext(ctx, "bin/tatd")
	tatd.Env = append(os.Environ(), "TAT_DATABASE_URL="+c.URL)
	tatd.Stdout, tatd.Stderr = os.Stdout, os.Stderr
	if err := tatd.Start(); err != nil {
		return fmt.Errorf("start tatd (run make build first): %w", err)
	}
	fmt.Printf(`
PostgreSQL is running under %s, with schema tat and a sample table "orders" (200000 rows).
Connect with:

    psql -h 127.0.0.1 -p %s -U postgres -d postgres

The demo now runs, while a writer updates and inserts orders:

    select tat.alter('alter table orders alter column id type bigint');

`, c.Dir, u.Port())
	if err := mainJob(ctx, c.URL); err != nil {
		return err
	}
	if interactive() {
		fmt.Print(`
Try more from psql, e.g.:

    select tat.alter('alter table orders add column region int default 1, alter column total type numeric(14,2)');
    select id, state, phase, progress, rows_copied, error from tat.status;  \watch 1

Ctrl-C stops tatd and PostgreSQL.
`)
		<-ctx.Done()
	} else {
		stop()
	}
	_ = tatd.Wait()
	return nil
}

// mainJob queues the ALTER, writes to the table meanwhile, prints
// tat.status until the job ends, then its timeline and the result.
func mainJob(ctx context.Context, dbURL string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	var writes atomic.Int64
	wctx, stopWriter := context.WithCancel(ctx)
	defer stopWriter()
	go func() {
		w, err := pgx.Connect(wctx, dbURL)
		if err != nil {
			return
		}
		defer w.Close(context.Background())
		for i := 1; wctx.Err() == nil; i++ {
			if _, err := w.Exec(wctx, `update orders set total = total + 1 where id = $1`, 1+i*7919%200000); err == nil {
				writes.Add(1)
			}
			if _, err := w.Exec(wctx, `insert into orders values (200000 + $1, 1, 1, 'new')`, i); err == nil {
				writes.Add(1)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	var id int64
	if err := conn.QueryRow(ctx, `select tat.alter('alter table orders alter column id type bigint')`).Scan(&id); err != nil {
		return fmt.Errorf("tat.alter: %w", err)
	}
	var state string
	for last := ""; ; {
		var phase, errText string
		var progress float64
		var copied int64
		err := conn.QueryRow(ctx, `select state, coalesce(phase, ''), coalesce(progress, 0)::float8, coalesce(rows_copied, 0), coalesce(error, '')
			from tat.status where id = $1`, id).Scan(&state, &phase, &progress, &copied, &errText)
		if err != nil {
			return fmt.Errorf("tat.status: %w", err)
		}
		line := fmt.Sprintf("job %d: %-8s %-9s %5.1f%%  %d rows copied", id, state, phase, progress, copied)
		if line != last {
			fmt.Println(line)
			last = line
		}
		if state == "done" || state == "failed" || state == "cancelled" {
			if errText != "" {
				fmt.Println("error:", errText)
			}
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	stopWriter()
	fmt.Println("\ntimeline (tat.events):")
	rows, err := conn.Query(ctx, `select to_char(at, 'HH24:MI:SS.MS'), coalesce(phase, ''), message from tat.events where job = $1 order by at`, id)
	if err != nil {
		return err
	}
	var at, phase, msg string
	if _, err := pgx.ForEachRow(rows, []any{&at, &phase, &msg}, func() error {
		fmt.Printf("  %s %-8s %s\n", at, phase, msg)
		return nil
	}); err != nil {
		return err
	}
	var typ string
	var n int64
	if err := conn.QueryRow(ctx, `select format_type(atttypid, atttypmod), (select count(*) from orders)
		from pg_attribute where attrelid = 'orders'::regclass and attname = 'id'`).Scan(&typ, &n); err != nil {
		return err
	}
	fmt.Printf("\nresult: orders.id is %s, %d rows; the writer committed %d statements during the job\n", typ, n, writes.Load())
	if state != "done" {
		return fmt.Errorf("the job ended %s", state)
	}
	return nil
}

// interactive: stdin is a terminal (a character device other than /dev/null).
func interactive() bool {
	fi, err := os.Stdin.Stat()
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return false
	}
	null, err := os.Stat(os.DevNull)
	return err != nil || !os.SameFile(fi, null)
}
