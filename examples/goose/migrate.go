// Package goose shows pg_tat in an application's migrations run by goose
// (github.com/pressly/goose/v3): one SQL migration queues the ALTER with
// tat.alter, and waits for it with tat.wait outside the transaction that
// queued it (see migrations/00002_accounts_balance_bigint.sql), and a Go
// migration does the same with two statements in autocommit.
package goose

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"

	"github.com/pressly/goose/v3"
)

//go:embed migrations/*.sql
var embedded embed.FS

// Migrations are this example's SQL migrations.
func Migrations() fs.FS {
	sub, err := fs.Sub(embedded, "migrations")
	if err != nil {
		panic(err)
	}
	return sub
}

// AlterOnline is a Go migration body: it queues command with tat.alter and
// waits for the job. It must run without a transaction (goose's RunDB, or
// NewGoMigration with a DB function), because the job becomes visible to
// tatd only when the statement that queued it commits.
func AlterOnline(command, timeout string) func(ctx context.Context, db *sql.DB) error {
	return func(ctx context.Context, db *sql.DB) error {
		var id int64
		if err := db.QueryRowContext(ctx, "select tat.alter($1)", command).Scan(&id); err != nil {
			return fmt.Errorf("tat.alter: %w", err)
		}
		if _, err := db.ExecContext(ctx, "select tat.wait($1, $2::interval)", id, timeout); err != nil {
			return fmt.Errorf("tat.wait(%d): %w", id, err)
		}
		return nil
	}
}

// NewProvider returns a goose provider over db with the SQL migrations and
// the extra Go migrations.
func NewProvider(db *sql.DB, extra ...*goose.Migration) (*goose.Provider, error) {
	return goose.NewProvider(goose.DialectPostgres, db, Migrations(), goose.WithGoMigrations(extra...))
}
