package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// Foreign members of a tree: a foreign-table partition or inheritance child
// (an archive on another server through postgres_fdw, say) holds no local
// rows, so it is neither copied nor captured. The in-place ALTER would
// change its definition too (a column type, a new column): to get exactly
// that, prepare creates a foreign table of the same definition (server,
// options, column options, defaults) inside the shadow tree, lets the ALTER
// recurse into it, and detaches it again at once, so that no statement of
// the copy or the catch-up can ever reach the remote table through the
// shadow. The switch drops the original with the old tree and attaches the
// new definition, under the old name, to the new tree: a catalog change,
// the remote data untouched. Reads of the original (copy, catch-up,
// verify) read its local tables only (srcRel).

// leafKey finds the key of a partitioned table that has none of its own:
// every local leaf has one on the same columns (the original pg_tat's
// multi-level trees have primary keys on the leaves only). It is unique per
// leaf only; the delta apply (set-based per key value) and a copy by key
// value windows are exact without more, a keyset copy is not (it could
// stop between two rows of the same value), so the key must be one integer
// column.
func leafKey(ctx context.Context, conn pgx.Tx, t *table, rel string) error {
	var first []string
	var firstLeaf string
	for _, p := range t.Partitions {
		if p.PartKey != "" || p.Foreign || p.Inherit {
			continue
		}
		var key, types []string
		err := conn.QueryRow(ctx, qKey, p.OID, t.replIdentKey).Scan(&key, &types)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: neither %s nor its partition %s has one", ErrNoKey, rel, ident(p.Schema, p.Name))
		}
		if err != nil {
			return fmt.Errorf("find key of %s: %w", ident(p.Schema, p.Name), err)
		}
		if first == nil {
			first, firstLeaf = key, ident(p.Schema, p.Name)
			continue
		}
		if strings.Join(key, "\x00") != strings.Join(first, "\x00") {
			return fmt.Errorf("%w: %s has none, and its partitions' keys differ: (%s) on %s, (%s) on %s", ErrNoKey, rel,
				strings.Join(first, ", "), firstLeaf, strings.Join(key, ", "), ident(p.Schema, p.Name))
		}
	}
	if first == nil {
		return pgx.ErrNoRows
	}
	types := make([]string, len(first))
	for i, k := range first {
		for _, c := range t.Columns {
			if c.Name == k {
				types[i] = c.Type
			}
		}
	}
	if len(first) != 1 || !isIntType(types[0]) {
		return fmt.Errorf("%w: %s has none of its own; its partitions' key (%s) is not one integer column, which a key unique per partition only needs",
			ErrNoKey, rel, strings.Join(first, ", "))
	}
	t.Key, t.KeyTypes, t.KeyPerLeaf = first, types, true
	return nil
}

// checkForeignMembers refuses what the switch could not attach back without
// a scan under its lock: a foreign partition beside a DEFAULT partition
// (ATTACH PARTITION scans the default one for rows of the new bound).
func checkForeignMembers(ctx context.Context, conn pgx.Tx, t *table, rel string) error {
	for _, p := range t.Partitions {
		if !p.Foreign || p.Inherit {
			continue
		}
		var def string
		err := conn.QueryRow(ctx, `select case when pt.partdefid = 0 then '' else pt.partdefid::regclass::text end from pg_partitioned_table pt
			where pt.partrelid = to_regclass($1)`, ident(p.ParentSchema, p.Parent)).Scan(&def)
		if err != nil {
			return fmt.Errorf("read default partition of %s: %w", ident(p.ParentSchema, p.Parent), err)
		}
		if def != "" {
			return fmt.Errorf("%w: %s has a foreign partition (%s) beside a DEFAULT partition (%s): attaching it to the new tree would scan the default partition under the switch's lock",
				ErrBadCommand, rel, ident(p.Schema, p.Name), def)
		}
	}
	return nil
}

// foreignClause renders " SERVER s OPTIONS (...)" of a foreign table.
func (m *migration) foreignClause(ctx context.Context, tx pgx.Tx, oid uint32) (string, error) {
	var server string
	var opts []string
	err := tx.QueryRow(ctx, `select s.srvname, coalesce(f.ftoptions, '{}') from pg_foreign_table f
		join pg_foreign_server s on s.oid = f.ftserver where f.ftrelid = $1`, oid).Scan(&server, &opts)
	if err != nil {
		return "", fmt.Errorf("read foreign table %d: %w", oid, err)
	}
	s := " SERVER " + qi(server)
	if len(opts) > 0 {
		s += " OPTIONS (" + fdwOptions(opts, "") + ")"
	}
	return s, nil
}

// fdwOptions renders {k=v,...} as k 'v', ... (with add = "ADD " for ALTER).
func fdwOptions(opts []string, add string) string {
	out := make([]string, 0, len(opts))
	for _, o := range opts {
		k, v, _ := strings.Cut(o, "=")
		out = append(out, add+qi(k)+" "+quoteLiteral(v))
	}
	return strings.Join(out, ", ")
}

// foreignPartitionShadow creates the stand-in of a foreign partition in
// the shadow tree, with the partition's own defaults, NOT NULL and column
// options where they differ from the root's.
func (m *migration) foreignPartitionShadow(ctx context.Context, tx pgx.Tx, pt partition, parent string) ([]string, error) {
	srv, err := m.foreignClause(ctx, tx, pt.OID)
	if err != nil {
		return nil, err
	}
	shadow := ident(pt.Schema, partShadow(pt))
	stmts := []string{"CREATE FOREIGN TABLE " + shadow + " PARTITION OF " + parent + " " + pt.Bound + srv}
	cols, err := loadColumns(ctx, tx, m.t.Version, pt.OID, pt.Schema, pt.Name)
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", pt.Name, err)
	}
	root := columnMap(m.t.Columns)
	for _, c := range cols {
		rc := root[c.Name]
		col := "ALTER FOREIGN TABLE " + shadow + " ALTER COLUMN " + qi(c.Name)
		if c.Default != rc.Default && c.Generated == "" {
			if c.Default == "" {
				stmts = append(stmts, col+" DROP DEFAULT")
			} else {
				stmts = append(stmts, col+" SET DEFAULT "+c.Default)
			}
		}
		if c.NotNull && !rc.NotNull {
			stmts = append(stmts, col+" SET NOT NULL")
		}
	}
	colOpts, err := m.foreignColumnOptions(ctx, tx, pt.OID, shadow)
	if err != nil {
		return nil, err
	}
	return append(stmts, colOpts...), nil
}

// foreignColumnOptions: the per-column FDW options (column_name, ...).
func (m *migration) foreignColumnOptions(ctx context.Context, tx pgx.Tx, oid uint32, shadow string) ([]string, error) {
	rows, err := tx.Query(ctx, `select attname, attfdwoptions from pg_attribute
		where attrelid = $1 and attnum > 0 and not attisdropped and attfdwoptions is not null order by attnum`, oid)
	if err != nil {
		return nil, fmt.Errorf("read column options of foreign table %d: %w", oid, err)
	}
	var stmts []string
	for rows.Next() {
		var col string
		var opts []string
		if err := rows.Scan(&col, &opts); err != nil {
			rows.Close()
			return nil, err
		}
		stmts = append(stmts, "ALTER FOREIGN TABLE "+shadow+" ALTER COLUMN "+qi(col)+" OPTIONS ("+fdwOptions(opts, "ADD ")+")")
	}
	return stmts, rows.Err()
}

// detachForeignShadows takes the foreign stand-ins out of the shadow tree
// once the ALTER has recursed into them, with the partial mode's bound
// CHECK that recursed with it.
func (m *migration) detachForeignShadows(ctx context.Context, tx pgx.Tx, p *plan) error {
	for _, pt := range p.Partitions {
		if !pt.Foreign {
			continue
		}
		shadow := ident(pt.Schema, partShadow(pt))
		parent := ident(pt.ParentSchema, shadowName(pt.Parent, "__tat_new"))
		stmts := []string{"ALTER TABLE " + parent + " DETACH PARTITION " + shadow}
		if pt.Inherit {
			stmts = []string{"ALTER FOREIGN TABLE " + shadow + " NO INHERIT " + parent}
		}
		if p.Parent != nil && p.Parent.BoundCheck != "" {
			stmts = append(stmts, "ALTER FOREIGN TABLE "+shadow+" DROP CONSTRAINT IF EXISTS "+qi(boundCheckName))
		}
		for _, s := range stmts {
			if _, err := m.exec(ctx, tx, s); err != nil {
				return fmt.Errorf("detach foreign table %s from the shadow tree: %w", shadow, err)
			}
		}
	}
	return nil
}

// attachForeign puts the foreign members, renamed to their names, back into
// the new tree (the switch, after the renames).
func (p *plan) attachForeign() []string {
	var stmts []string
	for _, pt := range p.Partitions {
		if !pt.Foreign {
			continue
		}
		if pt.Inherit {
			stmts = append(stmts, "ALTER FOREIGN TABLE "+ident(pt.Schema, pt.Name)+" INHERIT "+ident(pt.ParentSchema, pt.Parent))
		} else {
			stmts = append(stmts, "ALTER TABLE "+ident(pt.ParentSchema, pt.Parent)+" ATTACH PARTITION "+ident(pt.Schema, pt.Name)+" "+pt.Bound)
		}
	}
	return stmts
}

// srcRel is the original as the copy, the catch-up and verify read it:
// the table itself, or, for a partition tree with foreign partitions, its
// local leaves (the root's columns, in its order) as one UNION ALL, into
// which PostgreSQL pushes each read's conditions: reading the root would
// scan the foreign partitions remotely (a batch of the copy would depend
// on the archive server being up) or fail (an FDW without handler).
// Inheritance trees are read table by table (treeTables), never through
// their foreign children.
func (m *migration) srcRel() string {
	p := m.plan
	if p == nil || p.inherits() || !p.hasForeign() {
		return m.t.ident()
	}
	cols := make([]string, len(m.t.Columns))
	for i, c := range m.t.Columns {
		cols[i] = qi(c.Name)
	}
	list := strings.Join(cols, ", ")
	// The root first: no rows (ONLY a partitioned table), but the UNION ALL
	// is never empty.
	parts := []string{"SELECT " + list + " FROM ONLY " + m.t.ident()}
	for _, pt := range p.Partitions {
		if pt.PartKey == "" && !pt.Foreign {
			parts = append(parts, "SELECT "+list+" FROM ONLY "+ident(pt.Schema, pt.Name))
		}
	}
	return "(" + strings.Join(parts, " UNION ALL ") + ")"
}

// hasForeign reports whether the tree has foreign members.
func (p *plan) hasForeign() bool {
	for _, pt := range p.Partitions {
		if pt.Foreign {
			return true
		}
	}
	return false
}

// localPartitions: the tables below the root that hold rows.
func localPartitions(parts []partition) []partition {
	out := make([]partition, 0, len(parts))
	for _, pt := range parts {
		if !pt.Foreign {
			out = append(out, pt)
		}
	}
	return out
}

// dropForeignShadows drops the foreign stand-ins of a failed or cleaned-up
// run (detached, they do not go with the shadow tree).
func dropForeignShadows(ctx context.Context, m *migration, db execer, schema, name string) error {
	rows, err := m.q(ctx, db, `with recursive tree(oid) as (
		  select inhrelid from pg_inherits where inhparent = to_regclass($1)
		  union all select h.inhrelid from tree join pg_inherits h on h.inhparent = tree.oid)
		select n.nspname, c.relname from tree join pg_class c on c.oid = tree.oid
		join pg_namespace n on n.oid = c.relnamespace where c.relkind = 'f'`, ident(schema, name))
	if err != nil {
		return err
	}
	for _, r := range rows {
		// Only a foreign table of the tree's owner is a stand-in of a run.
		shadow := ident(r[0], shadowName(r[1], "__tat_new"))
		mine, err := m.q(ctx, db, `select 1 from pg_class s, pg_class t where s.oid = to_regclass($1) and s.relkind = 'f'
			and t.oid = to_regclass($2) and s.relowner = t.relowner`, shadow, ident(schema, name))
		if err != nil {
			return err
		}
		if len(mine) == 0 {
			continue
		}
		if _, err := m.exec(ctx, db, "DROP FOREIGN TABLE IF EXISTS "+shadow); err != nil {
			return err
		}
	}
	return nil
}

// shadowSQLForTree is the command for the shadow tree. With foreign members
// its USING clauses are left out: PostgreSQL refuses USING on a foreign
// table ("is not a table"), which holds no local rows to convert anyway,
// and the shadow is empty when the ALTER runs (the copy converts the rows
// with the USING expressions, planCopy). A type change that needs USING
// (no assignment cast) then fails here, before anything is copied.
func (m *migration) shadowSQLForTree(p *plan) (string, error) {
	if !p.hasForeign() || m.cmd.alter == nil {
		return m.cmd.ShadowSQL(p.Schema, p.Shadow, p.IndexMap)
	}
	type saved struct {
		def *pg_query.ColumnDef
		raw *pg_query.Node
	}
	var restore []saved
	for _, cn := range m.cmd.alter.Cmds {
		cmd := cn.GetAlterTableCmd()
		if cmd.Subtype != pg_query.AlterTableType_AT_AlterColumnType {
			continue
		}
		if def := cmd.Def.GetColumnDef(); def != nil && def.RawDefault != nil {
			restore = append(restore, saved{def, def.RawDefault})
			def.RawDefault = nil
		}
	}
	defer func() {
		for _, r := range restore {
			r.def.RawDefault = r.raw
		}
	}()
	return m.cmd.ShadowSQL(p.Schema, p.Shadow, p.IndexMap)
}
