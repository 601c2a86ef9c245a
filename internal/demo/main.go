// Command demo starts a throwaway PostgreSQL under a temp dir, installs
// schema tat, creates a sample table, starts tatd and waits for Ctrl-C.
// It is what `make demo` runs.
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"syscall"

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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
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

and try:

    select tat.alter('alter table orders alter column id type bigint');
    select id, state, phase, progress, rows_copied, error from tat.status;  \watch 1

Ctrl-C stops tatd and PostgreSQL.
`, c.Dir, u.Port())
	<-ctx.Done()
	_ = tatd.Wait()
	return nil
}
