package sqlapi

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// CleanupLockClass is the first key of the advisory lock a runner holds on a
// tat.cleanup request while it runs it: pg_advisory_lock(CleanupLockClass,
// int4(request id)) ('tac' in ASCII). As for jobs, a runner that dies
// releases it with its connection, so a 'running' request nobody locks is
// taken over.
const CleanupLockClass int32 = 0x746163

// TryLockCleanup takes the session advisory lock of cleanup request id on
// conn without waiting. conn must stay open for as long as the cleanup runs.
func TryLockCleanup(ctx context.Context, conn DB, id int64) (bool, error) {
	var ok bool
	if err := conn.QueryRow(ctx, `select pg_try_advisory_lock($1::int4, $2::int4)`, CleanupLockClass, LockKey(id)).Scan(&ok); err != nil {
		return false, fmt.Errorf("advisory lock for cleanup request %d: %w", id, err)
	}
	return ok, nil
}

// PendingCleanups lists the tat.cleanup requests a runner may claim: queued
// ones, and running ones whose runner may have died (claiming checks the
// advisory lock).
func PendingCleanups(ctx context.Context, db DB) ([]int64, error) {
	rows, err := db.Query(ctx, `select id from tat.requests where action = 'cleanup' and state in ('queued', 'running') order by id`)
	if err != nil {
		return nil, fmt.Errorf("list cleanup requests: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("list cleanup requests: %w", err)
	}
	return ids, nil
}

// ClaimCleanup takes a cleanup request that is queued, or running with a
// dead runner: the caller must hold its advisory lock (TryLockCleanup), so
// nobody else runs it. ok is false when it is finished (or gone); previous
// is the runner that held it before ("" when it was queued).
func ClaimCleanup(ctx context.Context, db DB, id int64, runner string) (table, previous string, ok bool, err error) {
	err = db.QueryRow(ctx, `with old as (select id, runner from tat.requests where id = $1)
		update tat.requests r set state = 'running', runner = $2
		  from old
		 where r.id = old.id and r.action = 'cleanup' and r.state in ('queued', 'running')
		returning r.table_name, coalesce(old.runner, '')`, id, runner).Scan(&table, &previous)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", "", false, nil
	}
	if err != nil {
		return "", "", false, fmt.Errorf("claim cleanup request %d: %w", id, err)
	}
	return table, previous, true, nil
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
