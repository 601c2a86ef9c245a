package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// parseFilter checks Options.CopyDataFilter with the PostgreSQL parser and
// keeps the deparsed expression: whatever the text, what runs is one
// boolean expression, never more SQL.
func (m *migration) parseFilter() error {
	if strings.TrimSpace(m.opts.CopyDataFilter) == "" {
		m.filter = ""
		return nil
	}
	tree, err := pg_query.Parse("SELECT 1 FROM t WHERE " + m.opts.CopyDataFilter)
	if err != nil {
		return fmt.Errorf("%w: copy_data_filter: %v", ErrBadCommand, err)
	}
	sel := tree.Stmts[0].Stmt.GetSelectStmt()
	if len(tree.Stmts) != 1 || sel == nil || sel.Op != pg_query.SetOperation_SETOP_NONE || sel.WhereClause == nil ||
		sel.GroupClause != nil || sel.HavingClause != nil || sel.SortClause != nil || sel.LimitCount != nil ||
		sel.LimitOffset != nil || sel.LockingClause != nil || sel.WindowClause != nil {
		return fmt.Errorf("%w: copy_data_filter must be one boolean expression", ErrBadCommand)
	}
	// The original pg_tat calls the original table src in the filter; the
	// engine's queries call it t.
	walkTree(sel.WhereClause.ProtoReflect(), func(m protoreflect.Message) {
		if cr, ok := m.Interface().(*pg_query.ColumnRef); ok && len(cr.Fields) >= 2 && cr.Fields[0].GetString_().GetSval() == "src" {
			cr.Fields[0] = pg_query.MakeStrNode("t")
		}
	})
	expr := &pg_query.ParseResult{Version: tree.Version, Stmts: []*pg_query.RawStmt{{Stmt: &pg_query.Node{Node: &pg_query.Node_SelectStmt{
		SelectStmt: &pg_query.SelectStmt{TargetList: []*pg_query.Node{{Node: &pg_query.Node_ResTarget{
			ResTarget: &pg_query.ResTarget{Val: sel.WhereClause}}}}, LimitOption: pg_query.LimitOption_LIMIT_OPTION_DEFAULT, Op: pg_query.SetOperation_SETOP_NONE}}}}}}
	out, err := pg_query.Deparse(expr)
	if err != nil {
		return fmt.Errorf("%w: copy_data_filter: %v", ErrBadCommand, err)
	}
	m.filter = "(" + strings.TrimPrefix(out, "SELECT ") + ")"
	return nil
}

// walkTree calls fn for m and every message below it (a parse tree's nodes).
func walkTree(m protoreflect.Message, fn func(protoreflect.Message)) {
	fn(m)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap() || fd.Message() == nil:
		case fd.IsList():
			for i, l := 0, v.List(); i < l.Len(); i++ {
				walkTree(l.Get(i).Message(), fn)
			}
		default:
			walkTree(v.Message(), fn)
		}
		return true
	})
}

// filterAnd is " AND (filter)" for a WHERE over the original aliased t.
func (m *migration) filterAnd() string {
	if m.filter == "" {
		return ""
	}
	return " AND " + m.filter
}

// filterWhere turns a range condition (" WHERE ..." or "") into one that
// also applies the filter.
func (m *migration) filterWhere(cond string) string {
	if m.filter == "" {
		return cond
	}
	if cond == "" {
		return " WHERE " + m.filter
	}
	return cond + " AND " + m.filter
}

// switchCommand runs a user's --command-before-switch / -after-switch inside
// the cut-over transaction, with the requester's rights.
func (m *migration) switchCommand(ctx context.Context, tx pgx.Tx, sql, what string) error {
	if strings.TrimSpace(sql) == "" {
		return nil
	}
	if m.opts.RunAs != "" {
		// Checked again here: the requester may have lost superuser since prepare.
		if err := m.refuseSwitchCommands(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SET LOCAL ROLE "+qi(m.opts.RunAs)); err != nil {
			return fmt.Errorf("%s: act as %s: %w", what, m.opts.RunAs, err)
		}
	}
	// The caller's names resolve as in her own session, not with the
	// engine's pinned search_path; the engine's is back right after.
	path, err := m.ownerPath(ctx)
	if err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, "SELECT pg_catalog.set_config('search_path', $1, true)", path); err != nil {
		return err
	}
	if _, err := m.exec(ctx, tx, sql); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if _, err := tx.Exec(ctx, "SET LOCAL search_path = "+enginePath); err != nil {
		return err
	}
	if m.opts.RunAs != "" {
		if _, err := tx.Exec(ctx, "RESET ROLE"); err != nil {
			return err
		}
	}
	return nil
}

// analyze refreshes the shadow's statistics, and with VacuumFreeze also
// freezes it (VACUUM cannot run in a transaction: one session, pinned path).
func (m *migration) analyze(ctx context.Context) error {
	conn, err := m.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	stmt := "ANALYZE " + m.shadowIdent()
	if m.opts.VacuumFreeze {
		stmt = "VACUUM (FREEZE, ANALYZE) " + m.shadowIdent()
	}
	if _, err := conn.Exec(ctx, "SET search_path = pg_catalog, pg_temp"); err != nil {
		return err
	}
	defer conn.Exec(context.WithoutCancel(ctx), "RESET search_path") //nolint:errcheck
	_, err = m.exec(ctx, conn, stmt)
	return err
}

var errDryRun = errors.New("dry run")

// dryRun runs the checks and prepare in a transaction that is rolled back,
// printing every statement, then describes the remaining phases.
func (m *migration) dryRun(ctx context.Context) error {
	if !m.cmd.NeedsRewrite() {
		m.event(ctx, PhasePrepare, "dry run: the command needs no rewrite; it would run directly under lock_timeout: "+m.cmd.Text)
		return nil
	}
	if err := m.prepare(ctx); err != nil && !errors.Is(err, errDryRun) {
		return fmt.Errorf("prepare: %w", err)
	}
	p := m.plan
	m.event(ctx, PhasePrepare, fmt.Sprintf("dry run: capture %s into %s; copy about %d rows of %s into %s in batches of %d with %d workers",
		m.opts.Capture, p.Delta, m.t.EstRows, m.tableRef(), p.Shadow, m.opts.BatchSize, m.opts.CopyDataJobs))
	for _, si := range p.Indexes {
		m.event(ctx, PhaseIndex, "dry run: would build "+si.CreateSQL)
		if si.Constraint != "" {
			m.event(ctx, PhaseIndex, "dry run: would add "+si.Constraint)
		}
		for _, pi := range si.Parts {
			m.event(ctx, PhaseIndex, "dry run: would build "+pi.CreateSQL)
			if pi.Constraint != "" {
				m.event(ctx, PhaseIndex, "dry run: would add "+pi.Constraint)
			}
			m.event(ctx, PhaseIndex, "dry run: would attach "+pi.Name+" to "+pi.Parent)
		}
	}
	m.event(ctx, PhaseSwitch, fmt.Sprintf("dry run: switch under lock_timeout %s: drop %s, rename %s to %s, re-create dependents; nothing was changed",
		m.opts.LockTimeout, m.tableRef(), p.Shadow, p.Table))
	return nil
}
