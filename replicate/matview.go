package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Materialized views over the table.
//
// In place, an ALTER that leaves a materialized view's columns alone keeps
// the view (and its content). Here the table is replaced, and re-creating
// the view under the switch's lock would hold it for a full refresh. So a
// replacement is built over the shadow before the lock: created WITH NO
// DATA (which evaluates nothing), then, in the owner's sandbox, refreshed
// in the same REPEATABLE READ transaction that applies the whole delta (its
// content is the view's query over the original as of that snapshot: a
// refresh just before the switch) and indexed. The switch drops the old view
// and renames the replacement and its indexes; owner, grants and comments
// are read under the lock, views over it are dropped and re-created with the
// table's dependent views.
//
// Supported: a materialized view whose query reads tables of the tree
// directly. Refused up front: one that reads them through a view or another
// materialized view (those are dropped and re-created at the switch), and
// a command that changes the type of, or drops, a column a materialized
// view uses (PostgreSQL refuses the same in place).

// matView is one materialized view over a table of the tree and its
// replacement over the shadows.
type matView struct {
	OID        uint32
	Schema     string
	Name       string
	Owner      string
	Def        string // pg_get_viewdef, schema-qualified
	Populated  bool
	Tablespace string
	Options    []string
	Indexes    []matViewIndex
	Repl       string // the replacement's name, in Schema
}

type matViewIndex struct {
	OID        uint32
	Name       string
	Def        string
	Tablespace string
	Clustered  bool
}

func (v *matView) ident() string     { return ident(v.Schema, v.Name) }
func (v *matView) replIdent() string { return ident(v.Schema, v.Repl) }

// replIndexName is the name of an index of the replacement until the switch
// (index names are unique per schema).
func replIndexName(name string) string { return shadowName(name, "__tat_new") }

// qMatViewDeps is the closure of the relations whose query (view or
// materialized view) reads one of $1, directly or through others.
const qMatViewDeps = `with recursive deps(oid) as (
	  select r.ev_class from pg_depend d join pg_rewrite r on r.oid = d.objid
	  where d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
	    and d.refobjid = any($1::oid[]) and r.ev_class <> all($1::oid[])
	  union
	  select r.ev_class from deps join pg_depend d on d.refobjid = deps.oid
	    and d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
	  join pg_rewrite r on r.oid = d.objid where r.ev_class <> deps.oid)`

// qMatViews lists the materialized views over $1 that the switch cannot
// carry over: those that read them through a view or another materialized
// view of the closure (the views are dropped and re-created at the switch,
// and a materialized view over them would block that).
const qMatViews = qMatViewDeps + `
	select coalesce(string_agg(c.oid::regclass::text, ', ' order by c.oid::regclass::text), '')
	from deps join pg_class c on c.oid = deps.oid
	where c.relkind = 'm' and exists (
	  select 1 from pg_rewrite r join pg_depend d on d.objid = r.oid and d.classid = 'pg_rewrite'::regclass
	    and d.refclassid = 'pg_class'::regclass
	  where r.ev_class = c.oid and d.refobjid <> c.oid and d.refobjid in (select oid from deps))`

// qMatViewColumns: (materialized view, column of $1 it uses) for every
// materialized view reading one of $1 directly.
const qMatViewColumns = `select distinct c.oid::regclass::text, a.attname::text
	from pg_depend d join pg_rewrite r on r.oid = d.objid join pg_class c on c.oid = r.ev_class
	join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
	where d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
	  and d.refobjid = any($1::oid[]) and d.refobjsubid > 0 and c.relkind = 'm'
	order by 1, 2`

// qMatViewOwners: materialized views reading one of $1 directly whose
// owner the table's owner $2 cannot act for (REFRESH and CREATE INDEX of the
// replacement run in the owner's sandbox).
const qMatViewOwners = `select coalesce(string_agg(c.oid::regclass::text || ' (owned by ' || pg_get_userbyid(c.relowner) || ')', ', '), '')
	from pg_class c where c.relkind = 'm' and c.oid in (
	  select r.ev_class from pg_depend d join pg_rewrite r on r.oid = d.objid
	  where d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = any($1::oid[]))
	  and not pg_has_role($2::text::name, c.relowner, 'MEMBER')`

// refuseMatViews refuses, before anything is created, the materialized
// views over the tables oids that the switch cannot carry over, and a
// command touching a column one of them uses, with PostgreSQL's own words.
func (m *migration) refuseMatViews(ctx context.Context, tx pgx.Tx, oids []uint32, what string) error {
	var mv string
	if err := tx.QueryRow(ctx, qMatViews, oids).Scan(&mv); err != nil {
		return fmt.Errorf("look for materialized views on %s: %w", what, err)
	}
	if mv != "" {
		return fmt.Errorf("%w: materialized view(s) %s depend on %s through a view or another materialized view; "+
			"only materialized views that read the table directly are rebuilt by the switch: drop them first", ErrBadCommand, mv, what)
	}
	typed, dropped := m.cmd.changedColumns()
	if len(typed)+len(dropped) > 0 {
		rows, err := m.q(ctx, tx, qMatViewColumns, oids)
		if err != nil {
			return fmt.Errorf("look for columns materialized views use on %s: %w", what, err)
		}
		for _, r := range rows {
			if typed[r[1]] {
				return fmt.Errorf("%w: cannot alter type of a column used by a view or rule: rule _RETURN on materialized view %s depends on column %s",
					ErrBadCommand, r[0], `"`+r[1]+`"`)
			}
			if dropped[r[1]] {
				return fmt.Errorf("%w: cannot drop column %s of table %s because other objects depend on it: materialized view %s depends on column %[2]s "+
					"(drop the materialized view first)", ErrBadCommand, qi(r[1]), what, r[0])
			}
		}
	}
	owner := m.t.Owner
	if owner == "" {
		return nil
	}
	var foreign string
	if err := tx.QueryRow(ctx, qMatViewOwners, oids, owner).Scan(&foreign); err != nil {
		return fmt.Errorf("check the owners of materialized views on %s: %w", what, err)
	}
	if foreign != "" {
		// Their query must run as their owner, in the sandbox of the
		// table's owner; never with the engine's rights.
		return fmt.Errorf("%w: materialized view(s) %s depend on %s, and %s (its owner, whose sandbox rebuilds them) is not a member of their owner; "+
			"grant that role to %[4]s, or drop them first", ErrBadCommand, foreign, what, owner)
	}
	return nil
}

// changedColumns: the columns whose type the command changes, and those it
// drops.
func (c *Command) changedColumns() (typed, dropped map[string]bool) {
	typed, dropped = map[string]bool{}, map[string]bool{}
	if c.alter == nil {
		return typed, dropped
	}
	for _, cn := range c.alter.Cmds {
		cmd := cn.GetAlterTableCmd()
		switch {
		case cmd == nil:
		case cmd.Subtype == pg_query.AlterTableType_AT_AlterColumnType:
			typed[cmd.Name] = true
		case cmd.Subtype == pg_query.AlterTableType_AT_DropColumn:
			dropped[cmd.Name] = true
		}
	}
	return typed, dropped
}

// treeShadows maps every table of the tree ("schema\x00name") to the name of
// its shadow (in the same schema).
func (m *migration) treeShadows() map[string]string {
	p := m.plan
	out := map[string]string{p.Schema + "\x00" + p.Table: p.Shadow}
	for _, pt := range p.Partitions {
		out[pt.Schema+"\x00"+pt.Name] = partShadow(pt)
	}
	return out
}

func (m *migration) treeOIDs() []uint32 {
	return append([]uint32{m.plan.TableID}, oidsOf(m.plan.Partitions)...)
}

// qMatViewsDirect describes the materialized views reading one of $1
// directly (check refused the others).
const qMatViewsDirect = `select c.oid, n.nspname::text, c.relname::text, pg_get_userbyid(c.relowner)::text, pg_get_viewdef(c.oid),
	c.relispopulated, coalesce(ts.spcname::text, ''), coalesce(c.reloptions, '{}')::text[]
	from pg_class c join pg_namespace n on n.oid = c.relnamespace left join pg_tablespace ts on ts.oid = c.reltablespace
	where c.relkind = 'm' and c.oid in (
	  select r.ev_class from pg_depend d join pg_rewrite r on r.oid = d.objid
	  where d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = any($1::oid[]))
	order by c.oid`

const qMatViewIndexes = `select i.indexrelid, c.relname::text, pg_get_indexdef(i.indexrelid), coalesce(ts.spcname::text, ''), i.indisclustered
	from pg_index i join pg_class c on c.oid = i.indexrelid left join pg_tablespace ts on ts.oid = c.reltablespace
	where i.indrelid = $1 order by c.relname`

// readMatViews reads the materialized views over the tree (through db,
// whose search_path is the engine's: definitions come out qualified).
func (m *migration) readMatViews(ctx context.Context, db execer) ([]*matView, error) {
	rows, err := db.Query(ctx, qMatViewsDirect, m.treeOIDs())
	if err != nil {
		return nil, fmt.Errorf("read materialized views: %w", err)
	}
	var out []*matView
	for rows.Next() {
		v := &matView{}
		if err := rows.Scan(&v.OID, &v.Schema, &v.Name, &v.Owner, &v.Def, &v.Populated, &v.Tablespace, &v.Options); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read materialized views: %w", err)
		}
		v.Repl = shadowName(v.Name, "__tat_new")
		out = append(out, v)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read materialized views: %w", err)
	}
	for _, v := range out {
		if v.Indexes, err = m.readMatViewIndexes(ctx, db, v.OID); err != nil {
			return nil, fmt.Errorf("read indexes of %s: %w", v.ident(), err)
		}
	}
	return out, nil
}

func (m *migration) readMatViewIndexes(ctx context.Context, db execer, oid uint32) ([]matViewIndex, error) {
	rows, err := db.Query(ctx, qMatViewIndexes, oid)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []matViewIndex
	for rows.Next() {
		var ix matViewIndex
		if err := rows.Scan(&ix.OID, &ix.Name, &ix.Def, &ix.Tablespace, &ix.Clustered); err != nil {
			return nil, err
		}
		out = append(out, ix)
	}
	return out, rows.Err()
}

// rewriteMatViewQuery is def (a query PostgreSQL printed schema-qualified)
// reading the shadows instead of the tables of the tree: the parser finds
// every relation it names, and those of the tree are renamed. What runs must
// parse back to one SELECT.
func rewriteMatViewQuery(def string, shadows map[string]string) (string, error) {
	tree, err := pg_query.Parse(strings.TrimSuffix(strings.TrimSpace(def), ";"))
	if err != nil {
		return "", fmt.Errorf("parse the definition: %w", err)
	}
	if len(tree.Stmts) != 1 || tree.Stmts[0].Stmt.GetSelectStmt() == nil {
		return "", fmt.Errorf("the definition is not one SELECT")
	}
	n := 0
	renamed := map[string]string{} // relation name -> shadow name, where the query names it unaliased
	walkTree(tree.ProtoReflect(), func(msg protoreflect.Message) {
		rv, ok := msg.Interface().(*pg_query.RangeVar)
		if !ok || rv.Schemaname == "" {
			return // unqualified: a CTE (PostgreSQL prints relations qualified here)
		}
		if s, ok := shadows[rv.Schemaname+"\x00"+rv.Relname]; ok {
			if rv.Alias == nil {
				renamed[rv.Relname] = s
			}
			rv.Relname = s
			n++
		}
	})
	// Unaliased, the query names their columns by the relation's name
	// (mt.cat): name them by the shadow's. (An alias would do too, but it
	// would stay in the definition after the switch; without one the view
	// prints the relation's name, as the original does. PostgreSQL prints
	// every reference qualified, with names unique in the whole query.)
	walkTree(tree.ProtoReflect(), func(msg protoreflect.Message) {
		cr, ok := msg.Interface().(*pg_query.ColumnRef)
		if !ok || len(cr.Fields) < 2 {
			return
		}
		first := cr.Fields[0].GetString_()
		if first == nil {
			return
		}
		if s, ok := renamed[first.Sval]; ok {
			cr.Fields[0] = pg_query.MakeStrNode(s)
			return
		}
		// schema.table.column
		if second := cr.Fields[1].GetString_(); second != nil && len(cr.Fields) >= 3 {
			if s, ok := shadows[first.Sval+"\x00"+second.Sval]; ok {
				cr.Fields[1] = pg_query.MakeStrNode(s)
			}
		}
	})
	if n == 0 {
		return "", fmt.Errorf("the definition names no table of the tree")
	}
	out, err := pg_query.Deparse(tree)
	if err != nil {
		return "", fmt.Errorf("deparse the definition: %w", err)
	}
	if back, err := pg_query.Parse(out); err != nil || len(back.Stmts) != 1 || back.Stmts[0].Stmt.GetSelectStmt() == nil {
		return "", fmt.Errorf("the rewritten definition does not parse back to one SELECT (%q)", out)
	}
	return out, nil
}

// rewriteIndexDef is def (pg_get_indexdef) named name, on relation schema.rel.
func rewriteIndexDef(def, name, schema, rel, tablespace string) (string, error) {
	tree, err := pg_query.Parse(def)
	if err != nil {
		return "", fmt.Errorf("parse index definition: %w", err)
	}
	var is *pg_query.IndexStmt
	if len(tree.Stmts) == 1 {
		is = tree.Stmts[0].Stmt.GetIndexStmt()
	}
	if is == nil || is.Relation == nil {
		return "", fmt.Errorf("not one CREATE INDEX: %q", def)
	}
	is.Idxname = name
	is.Relation.Schemaname, is.Relation.Relname = schema, rel
	is.TableSpace = tablespace
	out, err := pg_query.Deparse(tree)
	if err != nil {
		return "", fmt.Errorf("deparse index definition: %w", err)
	}
	return out, nil
}

// buildMatViews builds, before the switch's lock, the replacement of each
// materialized view over the tree: created (WITH NO DATA, so nothing is
// evaluated) by the engine's role and given to the view's owner, then
// refreshed and indexed in the owner's sandbox (REFRESH runs the query as
// the view's owner in a security-restricted operation). m.matViews is set.
func (m *migration) buildMatViews(ctx context.Context) error {
	vs, err := m.readMatViews(ctx, m.admin)
	if err != nil {
		return err
	}
	m.matViews = vs
	if len(vs) == 0 {
		return nil
	}
	shadows := m.treeShadows()
	for _, v := range vs {
		started := time.Now()
		if err := m.dropMatViewLeftover(ctx, v); err != nil {
			return err
		}
		q, err := rewriteMatViewQuery(v.Def, shadows)
		if err != nil {
			return fmt.Errorf("materialized view %s: %w", v.ident(), err)
		}
		create := "CREATE MATERIALIZED VIEW " + v.replIdent()
		if len(v.Options) > 0 {
			create += " WITH (" + relOptions(v.Options) + ")"
		}
		if v.Tablespace != "" {
			create += " TABLESPACE " + qi(v.Tablespace)
		}
		create += " AS " + q + " WITH NO DATA"
		err = pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, catalogPath); err != nil {
				return err
			}
			if _, err := m.exec(ctx, tx, create); err != nil {
				return err
			}
			if _, err := m.exec(ctx, tx, "ALTER MATERIALIZED VIEW "+v.replIdent()+" OWNER TO "+qi(v.Owner)); err != nil {
				return err
			}
			return m.sameColumns(ctx, tx, v)
		})
		if err != nil {
			return fmt.Errorf("create the replacement of materialized view %s: %w", v.ident(), err)
		}
		if err := m.fillMatView(ctx, v); err != nil {
			return fmt.Errorf("fill the replacement of materialized view %s: %w", v.ident(), err)
		}
		state := "unpopulated, as the original"
		if v.Populated {
			state = "refreshed"
		}
		m.event(ctx, PhaseSwitch, fmt.Sprintf("materialized view %s rebuilt over the new table (%s, %d index(es)) in %s, before the lock",
			v.ident(), state, len(v.Indexes), time.Since(started).Round(time.Millisecond)))
	}
	return nil
}

// sameColumns: the replacement has the original's columns (names, types,
// collations), or the rewritten query is not the original's.
func (m *migration) sameColumns(ctx context.Context, tx pgx.Tx, v *matView) error {
	var diff int
	err := tx.QueryRow(ctx, `select count(*) from (
		(select attnum, attname, atttypid, atttypmod, attcollation from pg_attribute where attrelid = $1 and attnum > 0
		 except select attnum, attname, atttypid, atttypmod, attcollation from pg_attribute where attrelid = $2::regclass and attnum > 0)
		union all
		(select attnum, attname, atttypid, atttypmod, attcollation from pg_attribute where attrelid = $2::regclass and attnum > 0
		 except select attnum, attname, atttypid, atttypmod, attcollation from pg_attribute where attrelid = $1 and attnum > 0)) d`,
		v.OID, v.replIdent()).Scan(&diff)
	if err != nil {
		return fmt.Errorf("compare columns: %w", err)
	}
	if diff != 0 {
		return fmt.Errorf("the replacement's columns differ from the original's (the definition did not survive the rewrite)")
	}
	return nil
}

// dropMatViewLeftover drops the replacement an interrupted run left (a
// materialized view of that name reading one of the shadows); anything else
// of that name is in the way.
func (m *migration) dropMatViewLeftover(ctx context.Context, v *matView) error {
	var kind string
	var ours bool
	err := m.admin.QueryRow(ctx, `select c.relkind::text, exists (select 1 from pg_depend d join pg_rewrite r on r.oid = d.objid
		  where r.ev_class = c.oid and d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
		    and d.refobjid in (select to_regclass(s) from unnest($2::text[]) s))
		from pg_class c where c.oid = to_regclass($1)`, v.replIdent(), m.shadowIdents()).Scan(&kind, &ours)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look for a leftover %s: %w", v.replIdent(), err)
	}
	if kind != "m" || !ours {
		return fmt.Errorf("%w: %s, the name of the replacement of materialized view %s, is taken by another object", ErrBadCommand, v.replIdent(), v.ident())
	}
	if _, err := m.exec(ctx, m.admin, "DROP MATERIALIZED VIEW "+v.replIdent()); err != nil {
		return fmt.Errorf("drop the leftover %s: %w", v.replIdent(), err)
	}
	return nil
}

func (m *migration) shadowIdents() []string {
	out := []string{m.shadowIdent()}
	for _, pt := range m.plan.Partitions {
		out = append(out, ident(pt.Schema, partShadow(pt)))
	}
	return out
}

// fillMatView refreshes (when the original is populated) and indexes the
// replacement in the owner's sandbox. The refresh runs in the REPEATABLE
// READ transaction that applies the whole delta first: with trigger capture
// the delta and the original are read under that one snapshot, so the
// shadow the query reads is the transformed original exactly as of it.
// With logical capture the delta lags the original by what the stream has
// not delivered yet: the refresh waits for the stream to reach the WAL
// position of its start, so only changes committed in the milliseconds
// since can be missing (they are in the table after the switch, not in the
// view: a refresh a moment earlier).
func (m *migration) fillMatView(ctx context.Context, v *matView) error {
	if v.Populated {
		if err := m.waitStream(ctx); err != nil {
			return err
		}
	}
	var err error
	for i := 0; ; i++ {
		err = pgx.BeginTxFunc(ctx, m.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead}, func(tx pgx.Tx) error {
			if v.Populated {
				if _, err := m.applyDeltaTx(ctx, tx, 0); err != nil {
					return fmt.Errorf("apply the delta: %w", err)
				}
				if _, err := m.exec(ctx, tx, "REFRESH MATERIALIZED VIEW "+v.replIdent()); err != nil {
					return err
				}
			}
			// As for the shadow's indexes: definitions were read qualified.
			if _, err := tx.Exec(ctx, pinnedPath); err != nil {
				return err
			}
			for _, ix := range v.Indexes {
				s, err := rewriteIndexDef(ix.Def, replIndexName(ix.Name), v.Schema, v.Repl, ix.Tablespace)
				if err != nil {
					return err
				}
				if _, err := m.exec(ctx, tx, s); err != nil {
					return fmt.Errorf("index %s: %w", ix.Name, err)
				}
			}
			return nil
		})
		// A value that moved between rows (logical capture: the stream has
		// not delivered its other side yet) collides: retry, as the catch-up.
		if err == nil || !isConstraintConflict(err) || m.opts.Capture != CaptureLogical || i >= conflictRetries {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(conflictWait):
		}
	}
}

// waitStream waits until the logical stream has delivered every change
// committed before now (nothing to wait for with trigger capture).
func (m *migration) waitStream(ctx context.Context) error {
	mark, err := m.streamMark(ctx)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(logicalSyncTimeout)
	for !m.streamReached(mark) {
		if err := m.streamErr(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the logical stream did not reach %s within %s", mark, logicalSyncTimeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// swapMatViews: under the switch's lock, what takes each materialized view
// off before the original is dropped (d.before, after the views over it)
// and puts its replacement in its place (d.after, before the views over it
// are re-created): its current name, owner, grants and comments, read now.
// A materialized view created or changed since the build fails the switch
// (nothing switched) rather than losing it.
func (m *migration) swapMatViews(ctx context.Context, tx pgx.Tx, d *dependents) error {
	now, err := m.readMatViews(ctx, tx)
	if err != nil {
		return err
	}
	built := map[uint32]*matView{}
	for _, v := range m.matViews {
		built[v.OID] = v
	}
	var before, after []string
	for _, cur := range now {
		v, ok := built[cur.OID]
		if !ok {
			return fmt.Errorf("%w: materialized view %s was created over %s during the migration; nothing was switched", ErrConcurrentDDL, cur.ident(), m.tableRef())
		}
		delete(built, cur.OID)
		if cur.Def != v.Def || cur.Schema != v.Schema || cur.Populated != v.Populated || !sameIndexes(cur.Indexes, v.Indexes) {
			return fmt.Errorf("%w: materialized view %s was changed (definition, indexes or refreshed WITH NO DATA or not) during the migration; nothing was switched",
				ErrConcurrentDDL, cur.ident())
		}
		before = append(before, "DROP MATERIALIZED VIEW "+cur.ident())
		mv := cur.ident()
		after = append(after, "ALTER MATERIALIZED VIEW "+v.replIdent()+" RENAME TO "+qi(cur.Name))
		for _, ix := range v.Indexes {
			after = append(after, "ALTER INDEX "+ident(v.Schema, replIndexName(ix.Name))+" RENAME TO "+qi(ix.Name))
			if ix.Clustered {
				after = append(after, "ALTER MATERIALIZED VIEW "+mv+" CLUSTER ON "+qi(ix.Name))
			}
		}
		after = append(after, "ALTER MATERIALIZED VIEW "+mv+" OWNER TO "+qi(cur.Owner))
		g, err := m.relGrants(ctx, tx, d, cur.OID, "TABLE", mv, cur.Schema, cur.Owner, func(c string) (string, bool) { return c, true })
		if err != nil {
			return fmt.Errorf("grants on %s: %w", mv, err)
		}
		after = append(after, g...)
		com, err := m.q(ctx, tx, `select 'MATERIALIZED VIEW', '', description from pg_description
			  where objoid = $1 and classoid = 'pg_class'::regclass and objsubid = 0
			union all select 'COLUMN', a.attname, d.description from pg_description d
			  join pg_attribute a on a.attrelid = d.objoid and a.attnum = d.objsubid
			  where d.objoid = $1 and d.classoid = 'pg_class'::regclass and d.objsubid > 0
			union all select 'INDEX', c.relname, d.description from pg_index i join pg_class c on c.oid = i.indexrelid
			  join pg_description d on d.objoid = i.indexrelid and d.classoid = 'pg_class'::regclass and d.objsubid = 0
			  where i.indrelid = $1
			order by 1, 2`, cur.OID)
		if err != nil {
			return fmt.Errorf("comments on %s: %w", mv, err)
		}
		for _, c := range com {
			switch c[0] {
			case "MATERIALIZED VIEW":
				after = append(after, "COMMENT ON MATERIALIZED VIEW "+mv+" IS "+quoteLiteral(c[2]))
			case "COLUMN":
				after = append(after, "COMMENT ON COLUMN "+mv+"."+qi(c[1])+" IS "+quoteLiteral(c[2]))
			case "INDEX":
				after = append(after, "COMMENT ON INDEX "+ident(cur.Schema, c[1])+" IS "+quoteLiteral(c[2]))
			}
		}
	}
	for _, v := range built {
		// Dropped during the migration: so is its replacement.
		after = append(after, "DROP MATERIALIZED VIEW IF EXISTS "+v.replIdent())
	}
	// The views over them were listed by depViewsAndFunctions: dropped
	// first, re-created last.
	d.before = append(d.before, before...)
	d.after = append(after, d.after...)
	return nil
}

func sameIndexes(a, b []matViewIndex) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].OID != b[i].OID || a[i].Def != b[i].Def || a[i].Tablespace != b[i].Tablespace {
			return false
		}
	}
	return true
}
