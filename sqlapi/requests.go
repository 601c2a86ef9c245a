package sqlapi

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// PendingCleanups lists the queued tat.cleanup requests.
func PendingCleanups(ctx context.Context, db DB) ([]int64, error) {
	rows, err := db.Query(ctx, `select id from tat.requests where action = 'cleanup' and state = 'queued' order by id`)
	if err != nil {
		return nil, fmt.Errorf("list cleanup requests: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("list cleanup requests: %w", err)
	}
	return ids, nil
}

// ClaimCleanup takes a queued cleanup request; ok is false when another
// runner took it first (the update is atomic under READ COMMITTED).
func ClaimCleanup(ctx context.Context, db DB, id int64, runner string) (table string, ok bool, err error) {
	err = db.QueryRow(ctx, `update tat.requests set state = 'running', runner = $2
		where id = $1 and action = 'cleanup' and state = 'queued' returning table_name`, id, runner).Scan(&table)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("claim cleanup request %d: %w", id, err)
	}
	return table, true, nil
}

// FinishCleanup records the outcome of a cleanup request.
func FinishCleanup(ctx context.Context, db DB, id int64, runner string, cause error) error {
	state, msg := "done", ""
	if cause != nil {
		state, msg = "failed", cause.Error()
	}
	if _, err := db.Exec(ctx, `update tat.requests set state = $3, error = nullif($4, ''), finished_at = now()
		where id = $1 and runner = $2`, id, runner, state, msg); err != nil {
		return fmt.Errorf("finish cleanup request %d: %w", id, err)
	}
	return nil
}
