package replicate

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Conflict closure. A delta apply deletes its keys from the shadow and
// re-reads their current rows from the original. The shadow rows of other
// keys may be stale: a UNIQUE value that moved between rows (row A freed
// u = 5, row B took it) is then held by A's stale row when B's current row
// is inserted. With logical capture the delta lags the original, so no
// slice — not even the whole delta — is guaranteed to contain both sides.
//
// The apply therefore, before inserting, deletes from the shadow every row
// whose unique columns equal those of a re-read row ("displaces" it) and
// re-reads the displaced keys too, in the same snapshot, repeating until
// nothing more is displaced. The rows inserted are then all current rows of
// one snapshot of the original, mutually consistent with its unique
// constraints, and no row left in the shadow shares a unique value with any
// of them. A displaced row is only re-read, never lost: re-reading any key
// at any time is what every apply does anyway.
//
// It covers the shadow's UNIQUE indexes on plain columns (partial ones with
// their predicate) that hold NULLs distinct; an expression index, a NULLS
// NOT DISTINCT index or an exclusion constraint is left to the whole-delta
// retry in applyDelta.

// uniqueClosure holds the statements of the closure, built once the
// shadow's indexes exist (see loadClosure).
type uniqueClosure struct {
	indexes []string // names, for messages
	// displace deletes the conflicting shadow rows of the re-read rows of
	// the delta keys with $1 < seq < $2; displaceKeys those of the keys
	// given as text arrays ($1..$n, one per key column). Both return the
	// displaced keys as text.
	displace, displaceKeys string
	// insertKeys re-inserts the keys given as text arrays from the original.
	insertKeys string
}

// closureIndex is one unique index of the shadow as the catalog has it.
type closureIndex struct {
	Schema, Table, Name string
	Cols                []string // key columns
	Pred                string   // predicate of a partial index, schema-qualified, or ""
	PredCols            []string // columns the predicate reads
	Exprs               bool     // has expression columns
	NullsNotDistinct    bool
}

// qClosureIndexes lists the top-level unique indexes of the shadow tables
// (an index of a partition attached to its parent's is enforced through
// the parent's). Run under catalogPath so predicates come out
// schema-qualified. pg_depend records the columns an index's predicate
// reads; indnullsnotdistinct exists from PostgreSQL 15 (read through
// to_jsonb so that the query runs on every version).
const qClosureIndexes = `select n.nspname::text, c.relname::text, ic.relname::text,
	coalesce((select array_agg(a.attname::text order by k.ord) from unnest(i.indkey[0:i.indnkeyatts - 1]) with ordinality k(n, ord)
	  join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n), '{}'),
	coalesce(pg_get_expr(i.indpred, i.indrelid), ''),
	coalesce((select array_agg(distinct a.attname::text) from pg_depend d
	  join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
	  where d.classid = 'pg_class'::regclass and d.objid = i.indexrelid
	    and d.refclassid = 'pg_class'::regclass and d.refobjsubid > 0), '{}'),
	i.indexprs is not null or 0 = any(i.indkey[0:i.indnkeyatts - 1]),
	coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false)
	from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
	join pg_class ic on ic.oid = i.indexrelid
	where i.indrelid = any($1::regclass[]) and i.indisunique and i.indisvalid
	  and not exists (select 1 from pg_inherits h where h.inhrelid = i.indexrelid)
	order by ic.relname`

// loadClosure builds the closure for the unique indexes the shadow has now;
// it runs once the indexes are built. Before that (the copy settling) the
// shadow has no index to collide with. Without a unique index besides the
// key it is nil and the apply does no extra work.
func (m *migration) loadClosure(ctx context.Context) error {
	m.closure = nil
	p := m.plan
	if !p.hasUniqueBesidesKey() || p.inherits() {
		// An inheritance tree's unique indexes are per table (and its
		// capture is by trigger, where the whole-delta apply is exact).
		return nil
	}
	var idx []closureIndex
	types := map[string]string{}
	err := pgx.BeginFunc(ctx, m.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, catalogPath); err != nil {
			return err
		}
		tables := []string{m.shadowIdent()}
		for _, pt := range localPartitions(p.Partitions) {
			tables = append(tables, ident(pt.Schema, partShadow(pt)))
		}
		rows, err := tx.Query(ctx, qClosureIndexes, tables)
		if err != nil {
			return err
		}
		idx, err = pgx.CollectRows(rows, pgx.RowToStructByPos[closureIndex])
		if err != nil {
			return err
		}
		rows, err = tx.Query(ctx, `select attname::text, format_type(atttypid, atttypmod) from pg_attribute
			where attrelid = $1::regclass and attnum > 0 and not attisdropped`, m.shadowIdent())
		if err != nil {
			return err
		}
		var name, typ string
		_, err = pgx.ForEachRow(rows, []any{&name, &typ}, func() error {
			types[name] = typ
			return nil
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("unique indexes of the shadow: %w", err)
	}
	c, skipped := m.buildClosure(idx, types)
	for _, s := range skipped {
		m.event(ctx, m.currentPhase(), "unique index "+s+" is on expressions, treats NULLs as equal or is on columns the copy "+
			"does not fill: a value moving between its rows makes a catch-up round apply the whole delta at once")
	}
	m.closure = c
	return nil
}

// buildClosure writes the closure's statements for the indexes it covers
// (nil when none) and returns the names of those it cannot cover.
func (m *migration) buildClosure(idx []closureIndex, types map[string]string) (*uniqueClosure, []string) {
	p := m.plan
	expr := map[string]string{} // shadow column (quoted) -> expression over the original
	for i, c := range p.InsertCols {
		expr[c] = p.SelectExprs[i]
	}
	covered := func(cols []string) bool {
		for _, c := range cols {
			if _, ok := expr[qi(c)]; !ok || types[c] == "" {
				return false
			}
		}
		return true
	}
	var use []closureIndex
	var skipped []string
	for _, ix := range idx {
		if !ix.Exprs && ix.Pred == "" && slices.Equal(ix.Cols, p.ShadowKey) {
			continue // the key: its rows were deleted by key before
		}
		if ix.Pred == "" {
			ix.PredCols = nil // pg_depend also lists key and INCLUDE columns
		}
		if ix.Exprs || ix.NullsNotDistinct || len(ix.Cols) == 0 || !covered(ix.Cols) || !covered(ix.PredCols) {
			skipped = append(skipped, p.finalIndexName(ix.Name))
			continue
		}
		use = append(use, ix)
	}
	if len(use) == 0 {
		return nil, skipped
	}
	// The re-read rows: the columns the indexes need, computed as the copy
	// computes them and cast to the shadow's types so they compare as the
	// index does.
	var need []string
	for _, ix := range use {
		for _, c := range append(append([]string(nil), ix.Cols...), ix.PredCols...) {
			if !slices.Contains(need, c) {
				need = append(need, c)
			}
		}
	}
	sel := make([]string, len(need))
	for i, c := range need {
		sel[i] = fmt.Sprintf("(%s)::%s AS %s", expr[qi(c)], types[c], qi(c))
	}
	n := len(p.Key)
	src := make([]string, n)
	dk := make([]string, n)
	ret := make([]string, n)
	kn := make([]string, n)
	unnest := make([]string, n)
	cast := make([]string, n)
	for i := range p.Key {
		src[i] = "t." + qi(p.Key[i])
		dk[i] = fmt.Sprintf("k%d", i+1)
		ret[i] = fmt.Sprintf("s.%s::text AS k%d", qi(p.ShadowKey[i]), i+1)
		kn[i] = fmt.Sprintf("k%d", i+1)
		unnest[i] = fmt.Sprintf("$%d::text[]", i+1)
		cast[i] = fmt.Sprintf("u.k%d::%s", i+1, p.KeyTypes[i])
	}
	byDelta := fmt.Sprintf("(%s) IN (SELECT %s FROM %s WHERE seq > $1 AND seq < $2 AND op NOT IN ('T', 'P'))",
		strings.Join(src, ", "), strings.Join(dk, ", "), m.deltaIdent())
	byKeys := fmt.Sprintf("(%s) IN (SELECT %s FROM unnest(%s) AS u(%s))",
		strings.Join(src, ", "), strings.Join(cast, ", "), strings.Join(unnest, ", "), strings.Join(kn, ", "))
	// One data-modifying CTE per index over the same re-read rows; a row
	// displaced through two indexes is deleted once (the second DELETE of
	// the same statement skips it) and returned once (UNION). The re-read
	// rows are aliased __tat_r and their columns renamed __tat_c<i> inside
	// each DELETE so that a predicate's bare column names resolve to the
	// shadow row.
	stmt := func(where string) string {
		ctes := []string{fmt.Sprintf("reread AS (SELECT %s FROM %s t WHERE %s%s)",
			strings.Join(sel, ", "), m.srcRel(), where, m.filterAnd())}
		var outs []string
		for j, ix := range use {
			rcols := make([]string, len(ix.Cols))
			eq := make([]string, len(ix.Cols))
			for i, c := range ix.Cols {
				rcols[i] = fmt.Sprintf("%s AS __tat_c%d", qi(c), i+1)
				eq[i] = fmt.Sprintf("s.%s = __tat_r.__tat_c%d", qi(c), i+1)
			}
			rsel := "SELECT " + strings.Join(rcols, ", ") + " FROM reread"
			cond := strings.Join(eq, " AND ")
			if ix.Pred != "" {
				rsel += " WHERE " + ix.Pred
				cond += " AND (" + ix.Pred + ")"
			}
			ctes = append(ctes, fmt.Sprintf("d%d AS (DELETE FROM %s s USING (%s) __tat_r WHERE %s RETURNING %s)",
				j+1, ident(ix.Schema, ix.Table), rsel, cond, strings.Join(ret, ", ")))
			outs = append(outs, fmt.Sprintf("SELECT %s FROM d%d", strings.Join(kn, ", "), j+1))
		}
		return "WITH " + strings.Join(ctes, ",\n") + "\n" + strings.Join(outs, " UNION ")
	}
	c := &uniqueClosure{displace: stmt(byDelta), displaceKeys: stmt(byKeys)}
	for _, ix := range use {
		c.indexes = append(c.indexes, p.finalIndexName(ix.Name))
	}
	c.insertKeys = fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t WHERE %s%s",
		m.shadowIdent(), strings.Join(p.InsertCols, ", "), strings.Join(p.SelectExprs, ", "), m.srcRel(), byKeys, m.filterAnd())
	return c, skipped
}

// closeOver runs the closure for the delta keys with from < seq < to, whose
// rows are already deleted from the shadow and not yet re-inserted: it
// displaces the conflicting shadow rows, transitively, and re-inserts the
// displaced keys.
func (m *migration) closeOver(ctx context.Context, tx pgx.Tx, from, to int64) error {
	c := m.closure
	if c == nil {
		return nil
	}
	n := len(m.plan.Key)
	all := make([][]string, n)
	got, err := m.displaced(ctx, tx, c.displace, from, to)
	for err == nil && len(got[0]) > 0 {
		for i := range all {
			all[i] = append(all[i], got[i]...)
		}
		// Each round deletes rows from the shadow and inserts none, so it
		// ends: at worst when every stale row is displaced.
		args := make([]any, n)
		for i := range got {
			args[i] = got[i]
		}
		got, err = m.displaced(ctx, tx, c.displaceKeys, args...)
	}
	if err != nil {
		return fmt.Errorf("apply delta (unique closure over %s): %w", strings.Join(c.indexes, ", "), err)
	}
	if len(all[0]) == 0 {
		return nil
	}
	args := make([]any, n)
	for i := range all {
		args[i] = all[i]
	}
	if _, err := m.exec(ctx, tx, c.insertKeys, args...); err != nil {
		return fmt.Errorf("apply delta (re-insert displaced rows): %w", err)
	}
	return nil
}

// displaced runs one displacing statement and returns the keys it
// displaced, column by column, as text.
func (m *migration) displaced(ctx context.Context, tx pgx.Tx, sql string, args ...any) ([][]string, error) {
	if m.opts.ShowQueries != nil {
		m.opts.ShowQueries(sql)
	}
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	n := len(m.plan.Key)
	out := make([][]string, n)
	vals := make([]string, n)
	dst := make([]any, n)
	for i := range vals {
		dst[i] = &vals[i]
	}
	for rows.Next() {
		if err := rows.Scan(dst...); err != nil {
			return nil, err
		}
		for i := range vals {
			out[i] = append(out[i], vals[i])
		}
	}
	return out, rows.Err()
}

// finalIndexName is the name a shadow index will have after the switch.
func (p *plan) finalIndexName(name string) string {
	for _, si := range p.Indexes {
		if si.Name == name {
			return si.Final
		}
	}
	return name
}
