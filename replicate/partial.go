package replicate

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Partial mode: the table is one leaf partition or one inheritance child.
// The shadow is a standalone table, attached back to the parent at the switch.

// defaultGuardName names the CHECK that partial mode puts on the parent's
// DEFAULT partition while it migrates another partition.
func defaultGuardName(table string) string { return shadowName(table, "__tat_excl") }

// guardDefaultPartition: attaching a partition to a parent with a DEFAULT
// partition makes PostgreSQL scan the default one for rows of the new bound,
// under the switch's lock, unless a CHECK of the default partition proves
// there are none. That CHECK is added NOT VALID (a catalog change under a
// short lock_timeout) and validated without blocking writes (SHARE UPDATE
// EXCLUSIVE), before the switch; the switch drops it after ATTACH.
func (m *migration) guardDefaultPartition(ctx context.Context) error {
	pt := m.plan.Parent
	if pt == nil || pt.DefaultName == "" || pt.BoundCheck == "" {
		return nil
	}
	def := ident(pt.DefaultSchema, pt.DefaultName)
	name := defaultGuardName(m.plan.Table)
	var valid *bool
	err := m.pool.QueryRow(ctx, `select convalidated from pg_constraint where conrelid = $1::regclass and conname = $2`,
		def, name).Scan(&valid)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("look for the default partition's guard: %w", err)
	}
	if valid == nil {
		err := m.withLockRetries(ctx, m.admin, func(ctx context.Context, tx pgx.Tx) error {
			_, err := m.exec(ctx, tx, "ALTER TABLE "+def+" ADD CONSTRAINT "+qi(name)+" CHECK (NOT ("+pt.BoundCheck+")) NOT VALID")
			return err
		}, nil)
		if err != nil {
			return fmt.Errorf("guard default partition %s: %w", def, err)
		}
	}
	if valid == nil || !*valid {
		// In the owner's sandbox: the check evaluates the partition key,
		// whose expression may call the owner's functions.
		if _, err := m.exec(ctx, m.pool, "ALTER TABLE "+def+" VALIDATE CONSTRAINT "+qi(name)); err != nil {
			return fmt.Errorf("validate the guard of default partition %s: %w", def, err)
		}
		m.event(ctx, m.currentPhase(), fmt.Sprintf("default partition %s checked: attaching the new partition needs no scan of it", def))
	}
	return nil
}

// attachBack attaches the new table to the original's parent. ATTACH
// PARTITION skips its scan because the shadow's CHECK proves the bound (and
// the default partition's guard proves it holds none of the bound's rows),
// attaches the new table's indexes to the parent's and clones the parent's
// triggers; INHERIT is a catalog change. Copies of inherited columns and
// CHECK constraints stay marked local as well (PostgreSQL cannot unmark them
// on an inheritance child).
func (m *migration) attachBack(tbl string) []string {
	pt := m.plan.Parent
	switch {
	case pt == nil:
		return nil
	case pt.Bound == "":
		return []string{"ALTER TABLE " + tbl + " INHERIT " + pt.ident()}
	}
	stmts := []string{"ALTER TABLE " + pt.ident() + " ATTACH PARTITION " + tbl + " " + pt.Bound}
	if pt.BoundCheck != "" {
		stmts = append(stmts, "ALTER TABLE "+tbl+" DROP CONSTRAINT "+qi(boundCheckName))
	}
	if pt.DefaultName != "" {
		stmts = append(stmts, "ALTER TABLE "+ident(pt.DefaultSchema, pt.DefaultName)+" DROP CONSTRAINT IF EXISTS "+qi(defaultGuardName(m.plan.Table)))
	}
	return stmts
}

// dropDefaultGuard removes what guardDefaultPartition added, for a failed or
// cleaned-up run; table is the partition that was being migrated.
func dropDefaultGuard(ctx context.Context, m *migration, pool *pgxpool.Pool, schema, table string) error {
	rows, err := m.q(ctx, pool, `select quote_ident(n.nspname) || '.' || quote_ident(c.relname) from pg_constraint k
		join pg_class c on c.oid = k.conrelid join pg_namespace n on n.oid = c.relnamespace
		join pg_inherits h on h.inhrelid = c.oid
		join pg_inherits h2 on h2.inhparent = h.inhparent and h2.inhrelid = to_regclass($1)
		where k.conname = $2 and k.contype = 'c'`, ident(schema, table), defaultGuardName(table))
	if err != nil || len(rows) == 0 {
		return err
	}
	return m.withLockRetries(ctx, pool, func(ctx context.Context, tx pgx.Tx) error {
		_, err := m.exec(ctx, tx, "ALTER TABLE "+rows[0][0]+" DROP CONSTRAINT IF EXISTS "+qi(defaultGuardName(table)))
		return err
	}, nil)
}
