package replicate

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// buildIndexes builds the shadow's indexes (as the ALTER left them) with
// create_index_jobs sessions, each honouring maintenance_work_mem and
// max_parallel_maintenance_workers. Constraints are attached afterwards
// (USING INDEX is a catalog change), and exclusion constraints build their
// own index. The index of a partitioned table is built leaf by leaf, the
// leaves in parallel with everything else, and assembled afterwards. An
// index that already exists and is valid (a continued run) is kept.
func (m *migration) buildIndexes(ctx context.Context) error {
	p := m.plan
	tables := []string{m.shadowIdent()}
	for _, pt := range localPartitions(p.Partitions) {
		tables = append(tables, ident(pt.Schema, partShadow(pt)))
	}
	existing := map[string]bool{}
	rows, err := m.q(ctx, m.pool, `select n.nspname, c.relname, i.indisvalid::text, c.relkind::text
		from pg_index i join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
		where i.indrelid = any($1::regclass[])`, tables)
	if err != nil {
		return err
	}
	for _, r := range rows {
		if r[2] != "true" && r[3] == "i" {
			if _, err := m.exec(ctx, m.pool, "DROP INDEX "+ident(r[0], r[1])); err != nil {
				return fmt.Errorf("drop invalid leftover index %s: %w", r[1], err)
			}
			continue
		}
		existing[r[0]+"."+r[1]] = true
	}
	var todo []shadowIndex
	for _, si := range p.Indexes {
		if existing[si.Schema+"."+si.Name] {
			continue
		}
		for _, pi := range si.Parts {
			if pi.Leaf && !existing[pi.Schema+"."+pi.Name] {
				todo = append(todo, shadowIndex{Schema: pi.Schema, Table: pi.Table, Name: pi.Name, Final: pi.Name, CreateSQL: pi.CreateSQL})
			}
		}
		if !si.Exclusion && si.Parts == nil {
			todo = append(todo, si)
		}
	}
	if err := parallel(ctx, m.opts.CreateIndexJobs, todo, m.buildIndex); err != nil {
		return err
	}
	return pgx.BeginFunc(ctx, m.indexPool(), func(tx pgx.Tx) error {
		if err := m.sessionSettings(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, pinnedPath); err != nil {
			return err
		}
		for _, si := range p.Indexes {
			if si.Parts != nil && !existing[si.Schema+"."+si.Name] {
				if err := m.assemblePartitioned(ctx, tx, si); err != nil {
					return err
				}
				continue
			}
			if si.Constraint == "" {
				continue
			}
			var have bool
			if err := tx.QueryRow(ctx, `select exists(select 1 from pg_constraint c join pg_class i on i.oid = c.conindid
				where c.conrelid = $1::regclass and i.relname = $2)`, ident(si.Schema, si.Table), si.Name).Scan(&have); err != nil {
				return err
			}
			if have {
				continue
			}
			if _, err := m.exec(ctx, tx, si.Constraint); err != nil {
				return fmt.Errorf("constraint on index %s: %w", si.Name, err)
			}
		}
		for _, si := range p.Indexes {
			if si.Clustered {
				if _, err := m.exec(ctx, tx, "ALTER TABLE "+ident(si.Schema, si.Table)+" CLUSTER ON "+qi(si.Name)); err != nil {
					return err
				}
			}
		}
		if p.ReplIdent == "i" && p.ReplIndex != "" {
			if _, err := m.exec(ctx, tx, "ALTER TABLE "+m.shadowIdent()+" REPLICA IDENTITY USING INDEX "+qi(p.ReplIndex)); err != nil {
				return err
			}
		}
		return nil
	})
}

// assemblePartitioned creates a partitioned index (or its PRIMARY KEY or
// UNIQUE constraint) and those of partitioned partitions alone, gives the
// leaves' built indexes their constraints, and attaches every index to its
// parent's, deepest first. Only catalog changes: no scan, no build.
func (m *migration) assemblePartitioned(ctx context.Context, tx pgx.Tx, si shadowIndex) error {
	top := si.CreateSQL
	if si.Constraint != "" {
		top = si.Constraint
	}
	stmts := []string{top}
	for _, pi := range si.Parts {
		switch {
		case !pi.Leaf && pi.Constraint != "":
			stmts = append(stmts, pi.Constraint)
		case !pi.Leaf:
			stmts = append(stmts, pi.CreateSQL)
		case pi.Constraint != "":
			stmts = append(stmts, pi.Constraint)
		}
	}
	for i := len(si.Parts) - 1; i >= 0; i-- {
		pi := si.Parts[i]
		stmts = append(stmts, "ALTER INDEX "+ident(pi.ParentSch, pi.Parent)+" ATTACH PARTITION "+ident(pi.Schema, pi.Name))
	}
	for _, s := range stmts {
		if _, err := m.exec(ctx, tx, s); err != nil {
			return fmt.Errorf("assemble partitioned index %s: %w", si.Name, err)
		}
	}
	return nil
}

// buildIndex builds one index, retrying a build that failed with "missing
// chunk number ... for toast value": CREATE INDEX evaluates expressions
// also for rows dead only to its own, older horizon (rows the settle or
// catch-up replaced), whose TOAST chunks page pruning may already have
// removed. A new attempt takes a newer horizon and skips those rows.
func (m *migration) buildIndex(ctx context.Context, si shadowIndex) error {
	for attempt := 1; ; attempt++ {
		err := m.buildIndexOnce(ctx, si)
		var pe *pgconn.PgError
		if err == nil || attempt == 3 || !errors.As(err, &pe) || pe.Code != "XX001" || !strings.Contains(pe.Message, "toast") {
			return err
		}
		m.event(ctx, PhaseIndex, fmt.Sprintf("build of index %s read a replaced row's TOAST value that was already pruned; building it again", si.Final))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (m *migration) buildIndexOnce(ctx context.Context, si shadowIndex) error {
	conn, err := m.indexPool().Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := m.sessionSettings(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, pinnedPath); err != nil {
			return err
		}
		if _, err := m.exec(ctx, tx, si.CreateSQL); err != nil {
			return fmt.Errorf("build index %s: %w", si.Final, err)
		}
		m.event(ctx, PhaseIndex, "built index "+si.Final)
		return nil
	})
}

// sessionSettings applies the memory and parallelism options to a transaction.
func (m *migration) sessionSettings(ctx context.Context, tx pgx.Tx) error {
	set := func(name, v string) error {
		_, err := tx.Exec(ctx, "SELECT set_config($1, $2, true)", name, v)
		if err != nil {
			return fmt.Errorf("set %s = %s: %w", name, v, err)
		}
		return nil
	}
	if m.opts.MaintenanceWorkMem != "" {
		if err := set("maintenance_work_mem", m.opts.MaintenanceWorkMem); err != nil {
			return err
		}
	}
	if m.opts.WorkMem != "" {
		if err := set("work_mem", m.opts.WorkMem); err != nil {
			return err
		}
	}
	if m.opts.MaxParallelMaintenanceWorkers >= 0 {
		if err := set("max_parallel_maintenance_workers", strconv.Itoa(m.opts.MaxParallelMaintenanceWorkers)); err != nil {
			return err
		}
	}
	return nil
}

// indexPool builds the shadow's indexes: in the owner's sandbox, or, when
// she may not create in the schema (CREATE INDEX needs that, ALTER TABLE
// does not), as the engine's role. Either way PostgreSQL evaluates index
// expressions and predicates as the table's owner, in a security-restricted
// operation.
func (m *migration) indexPool() *pgxpool.Pool {
	if m.sb != nil && m.sb.handOver {
		return m.admin
	}
	return m.pool
}
