package replicate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// plan is what prepare decides and later phases (possibly after a restart)
// need. It is stored as JSON in the comment of the state table, so that a
// --continue run picks it up without the tat schema.
type plan struct {
	Shadow  string `json:"shadow"`
	Delta   string `json:"delta"`
	State   string `json:"state"`
	Schema  string `json:"schema"`
	Table   string `json:"table"`
	TableID uint32 `json:"table_oid"`
	Command string `json:"command"`
	Capture string `json:"capture"`
	// Fingerprint of the original's shape at prepare (see qFingerprint).
	Fingerprint string `json:"fingerprint"`

	Key       []string `json:"key"`        // key columns on the original
	KeyTypes  []string `json:"key_types"`  // their types
	ShadowKey []string `json:"shadow_key"` // the same columns on the shadow

	// Copy: INSERT INTO shadow (InsertCols) SELECT SelectExprs FROM original.
	InsertCols  []string `json:"insert_cols"`
	SelectExprs []string `json:"select_exprs"`

	Indexes   []shadowIndex     `json:"indexes"`    // built in phase index
	FKs       []namedDef        `json:"fks"`        // outbound FKs, added NOT VALID at the switch
	Checks    []namedDef        `json:"checks"`     // NOT VALID checks, re-added at the switch
	IndexMap  map[string]string `json:"index_map"`  // original index name -> shadow name
	ReplIdent string            `json:"repl_ident"` // d, n, f or i
	ReplIndex string            `json:"repl_index"` // shadow index name for i
	Renames   map[string]string `json:"renames"`    // column renames of the command

	// Publications: those publishing every table of the run's schemas
	// (publication.go); PubHidden: the run's tables are kept out of them.
	Publications string `json:"publications,omitempty"`
	PubHidden    bool   `json:"pub_hidden,omitempty"`

	// Partitions of a partitioned table, parents first; each has a shadow
	// named shadowName(name, "__tat_new") in its own schema.
	Partitions []partition `json:"partitions"`
	// Parent: partial mode, the table is attached back to it at the switch.
	Parent *parentTable `json:"parent,omitempty"`
}

func partShadow(pt partition) string { return shadowName(pt.Name, "__tat_new") }

// inherits: the table is the root of an inheritance tree, whose tables are
// copied and caught up one by one (each holds its own rows).
func (p *plan) inherits() bool { return len(p.Partitions) > 0 && p.Partitions[0].Inherit }

// treeTable is one table of an inheritance tree with its shadow: rel 0 is
// the root, rel i the (i-1)th of plan.Partitions.
type treeTable struct {
	OID         uint32
	Src, Dst    string // ONLY original; shadow (INSERT takes no ONLY: it writes the one table anyway)
	InsertCols  []string
	SelectExprs []string
}

func (m *migration) treeTables() []treeTable {
	p := m.plan
	out := []treeTable{{OID: p.TableID, Src: "ONLY " + ident(p.Schema, p.Table), Dst: m.shadowIdent(),
		InsertCols: p.InsertCols, SelectExprs: p.SelectExprs}}
	for _, pt := range localPartitions(p.Partitions) {
		out = append(out, treeTable{OID: pt.OID, Src: "ONLY " + ident(pt.Schema, pt.Name), Dst: ident(pt.Schema, partShadow(pt)),
			InsertCols: pt.InsertCols, SelectExprs: pt.SelectExprs})
	}
	return out
}

// shadowIndex is one index of the shadow, captured after the ALTER ran on it.
type shadowIndex struct {
	Schema     string `json:"schema"`     // of the index and its table
	Table      string `json:"table"`      // the shadow (or a shadow partition) it is on
	Name       string `json:"name"`       // name on the shadow
	Final      string `json:"final"`      // name after the switch
	CreateSQL  string `json:"create_sql"` // CREATE INDEX on the shadow
	Constraint string `json:"constraint"` // ALTER TABLE ... ADD CONSTRAINT, empty for plain indexes
	Exclusion  bool   `json:"exclusion"`  // built by the constraint itself
	Clustered  bool   `json:"clustered"`  // CLUSTER ON mark
	OrigName   string `json:"orig_name"`  // name on the original, empty when the ALTER added it
	IsKeyIndex bool   `json:"is_key"`
	// Parts: for an index of a partitioned table, the indexes of its
	// partitions, parents before children. CreateSQL then builds the parent
	// alone (ON ONLY), the leaves are built in parallel with the other
	// indexes, and ALTER INDEX ... ATTACH PARTITION assembles the tree.
	Parts []partIndex `json:"parts,omitempty"`
}

// partIndex is the index of one partition below a partitioned index.
type partIndex struct {
	Schema     string `json:"schema"`
	Table      string `json:"table"`
	Name       string `json:"name"`
	Parent     string `json:"parent"` // the index it is attached to, in ParentSchema
	ParentSch  string `json:"parent_schema"`
	Leaf       bool   `json:"leaf"`
	Level      int    `json:"level"`
	CreateSQL  string `json:"create_sql"` // ON ONLY for a partitioned partition
	Constraint string `json:"constraint"` // the partition's PRIMARY KEY or UNIQUE
}

type namedDef struct {
	Name string `json:"name"`
	Def  string `json:"def"`
}

// prepare creates the shadow with the original's definition, applies the
// ALTER to it, records the resulting indexes and constraints, and drops them
// so that the copy loads a bare heap. Nothing on the original changes.
//
// It is one transaction of the owner's sandbox, except for what the owner
// may not do herself (sandbox.handOver, sandbox.adminState): what those
// steps committed is dropped again when prepare fails (or is a dry run).
func (m *migration) prepare(ctx context.Context) error {
	committed := false
	err := m.prepareShadow(ctx, &committed)
	if err != nil && committed {
		if cerr := cleanup(context.WithoutCancel(ctx), m.admin, m.t.Schema, m.t.Name, m); cerr != nil {
			m.event(ctx, PhasePrepare, "cleanup after prepare: "+cerr.Error())
		}
	}
	return err
}

func (m *migration) prepareShadow(ctx context.Context, committed *bool) error {
	tx, err := m.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	t := m.t
	if err := m.refusePartitionKeyCode(ctx, tx); err != nil {
		return err
	}
	p := &plan{
		Shadow: shadowName(t.Name, "__tat_new"), Delta: shadowName(t.Name, "__tat_delta"),
		State: shadowName(t.Name, "__tat_state"), Schema: t.Schema, Table: t.Name, TableID: t.OID,
		Command: m.cmd.Text, Capture: m.opts.Capture, Fingerprint: t.Fingerprint, Key: t.Key, KeyTypes: t.KeyTypes, IndexMap: map[string]string{},
		Renames: m.cmd.renames, Partitions: t.Partitions, Parent: t.Parent,
	}
	shadow := ident(p.Schema, p.Shadow)
	if err := m.checkTree(ctx, tx, p); err != nil {
		return err
	}

	// Columns, in the original order or the moved one.
	cols := append([]column(nil), t.Columns...)
	if mv := m.cmd.Move; mv != nil {
		cols, err = moveColumn(cols, mv.Column, mv.Before)
		if err != nil {
			return err
		}
	}
	defs := make([]string, 0, len(cols))
	for _, c := range cols {
		defs = append(defs, columnDDL(c))
	}
	// Valid CHECK constraints stay on the shadow during the load: the copy is
	// checked as the in-place ALTER would check it. NOT VALID NOT NULL
	// constraints (PostgreSQL 18+, contype 'n') come back at the switch.
	checks, err := m.q(ctx, tx, `select conname, pg_get_constraintdef(oid), convalidated from pg_constraint
		where conrelid = $1 and (contype = 'c' or contype = 'n' and not convalidated) order by conname`, t.OID)
	if err != nil {
		return err
	}
	for _, c := range checks {
		if c[2] == "true" {
			defs = append(defs, "CONSTRAINT "+qi(c[0])+" "+c[1])
		} else {
			p.Checks = append(p.Checks, namedDef{Name: c[0], Def: c[1]})
		}
	}
	create := "CREATE "
	if t.Persistence == "u" {
		create += "UNLOGGED "
	}
	create += "TABLE " + shadow + " (\n  " + strings.Join(defs, ",\n  ") + "\n)"
	if t.Kind == "p" {
		create += " PARTITION BY " + t.PartKey
	}
	if t.AccessMethod != "" && t.AccessMethod != "heap" {
		create += " USING " + qi(t.AccessMethod)
	}
	opts := append([]string(nil), t.RelOptions...)
	for _, o := range t.ToastOptions {
		opts = append(opts, "toast."+o)
	}
	if len(opts) > 0 {
		create += " WITH (" + relOptions(opts) + ")"
	}
	if t.Tablespace != "" {
		create += " TABLESPACE " + qi(t.Tablespace)
	}
	stmts := []string{create}
	// The partition tree, parents first, each partition with its own bound,
	// persistence, storage parameters and tablespace.
	treeCols := map[string]map[string]column{ident(t.Schema, t.Name): columnMap(t.Columns)}
	// An inheritance child's own column settings, after the root's (which
	// recurse into the children).
	var childCols []string
	for _, pt := range t.Partitions {
		parent := ident(pt.ParentSchema, shadowName(pt.Parent, "__tat_new"))
		if pt.Foreign && !pt.Inherit {
			s, err := m.foreignPartitionShadow(ctx, tx, pt, parent)
			if err != nil {
				return err
			}
			stmts = append(stmts, s[0])
			childCols = append(childCols, s[1:]...)
			continue
		}
		if pt.Inherit {
			s, err := m.inheritedShadow(ctx, tx, pt, parent, treeCols)
			if err != nil {
				return err
			}
			stmts = append(stmts, s[0])
			childCols = append(childCols, s[1:]...)
			continue
		}
		s := "CREATE "
		if pt.Persistence == "u" {
			s += "UNLOGGED "
		}
		s += "TABLE " + ident(pt.Schema, partShadow(pt)) + " PARTITION OF " + parent + " " + pt.Bound
		if pt.PartKey != "" {
			s += " PARTITION BY " + pt.PartKey
		}
		if len(pt.RelOptions) > 0 && pt.PartKey == "" {
			s += " WITH (" + relOptions(pt.RelOptions) + ")"
		}
		if pt.Tablespace != "" {
			s += " TABLESPACE " + qi(pt.Tablespace)
		}
		stmts = append(stmts, s)
	}
	for _, c := range cols {
		col := shadow + " ALTER COLUMN " + qi(c.Name)
		if c.Storage != "" {
			stmts = append(stmts, "ALTER TABLE "+col+" SET STORAGE "+c.Storage)
		}
		if c.Compress != "" {
			stmts = append(stmts, "ALTER TABLE "+col+" SET COMPRESSION "+c.Compress)
		}
		if c.StatTgt >= 0 {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s SET STATISTICS %d", col, c.StatTgt))
		}
		if len(c.Options) > 0 {
			stmts = append(stmts, "ALTER TABLE "+col+" SET ("+relOptions(c.Options)+")")
		}
	}
	stmts = append(stmts, childCols...)
	var rowSec, forceSec bool
	var replIdent string
	if err := tx.QueryRow(ctx, `select relrowsecurity, relforcerowsecurity, relreplident::text from pg_class where oid = $1`,
		t.OID).Scan(&rowSec, &forceSec, &replIdent); err != nil {
		return fmt.Errorf("read table flags: %w", err)
	}
	if rowSec && forceSec {
		var bypass bool
		if err := tx.QueryRow(ctx, `select rolsuper or rolbypassrls from pg_roles where rolname = $1`, t.Owner).Scan(&bypass); err != nil {
			return fmt.Errorf("read the owner of %s: %w", t.ident(), err)
		}
		if !bypass {
			// The copy reads as the owner, whom FORCE subjects to the
			// policies: it would see only the rows they let it see.
			return fmt.Errorf("%w: %s has FORCE ROW LEVEL SECURITY and its owner %s is subject to its policies, so the copy could not read every row; "+
				"run ALTER TABLE ... NO FORCE ROW LEVEL SECURITY during the migration, or give %[3]s BYPASSRLS", ErrBadCommand, m.tableRef(), t.Owner)
		}
	}
	if rowSec {
		stmts = append(stmts, "ALTER TABLE "+shadow+" ENABLE ROW LEVEL SECURITY")
	}
	if forceSec {
		stmts = append(stmts, "ALTER TABLE "+shadow+" FORCE ROW LEVEL SECURITY")
	}
	if replIdent == "f" {
		stmts = append(stmts, "ALTER TABLE "+shadow+" REPLICA IDENTITY FULL")
	} else if replIdent == "n" {
		stmts = append(stmts, "ALTER TABLE "+shadow+" REPLICA IDENTITY NOTHING")
	}
	if t.Parent != nil && t.Parent.BoundCheck != "" {
		// Checked row by row during the load, it spares ATTACH PARTITION a
		// scan of the new partition under the switch's lock.
		stmts = append(stmts, "ALTER TABLE "+shadow+" ADD CONSTRAINT "+qi(boundCheckName)+" CHECK ("+t.Parent.BoundCheck+")")
	}
	// CHECK constraints of a partition's own (not inherited from its parent)
	// are copied to that partition's shadow; the ALTER then sees them as it
	// would in place. They are created with the (empty) tables, in the same
	// transaction: added later by the engine's role (handOver), a CHECK would
	// evaluate her expression on rows she could have put there meanwhile.
	for _, pt := range t.Partitions {
		cks, err := m.q(ctx, tx, `select conname, pg_get_constraintdef(oid) from pg_constraint
			where conrelid = $1 and contype = 'c' and conislocal and coninhcount = 0 order by conname`, pt.OID)
		if err != nil {
			return err
		}
		for _, c := range cks {
			stmts = append(stmts, "ALTER TABLE "+ident(pt.Schema, partShadow(pt))+" ADD CONSTRAINT "+qi(c[0])+" "+c[1])
		}
	}
	owned := []string{"TABLE " + shadow}
	for _, pt := range t.Partitions {
		if pt.Foreign {
			owned = append(owned, "FOREIGN TABLE "+ident(pt.Schema, partShadow(pt)))
			continue
		}
		owned = append(owned, "TABLE "+ident(pt.Schema, partShadow(pt)))
	}
	*committed = m.sb != nil && m.sb.handOver
	if err := m.createOwned(ctx, tx, stmts, owned); err != nil {
		return fmt.Errorf("create shadow %s: %w", shadow, err)
	}

	// The shadow's indexes and constraints: in the owner's transaction, or,
	// when she may not create in the schema (CREATE INDEX needs that), as the
	// engine's role, each committed at once (the owner's transaction takes
	// no lock on the shadow before the ALTER). Nothing here evaluates her
	// code: the shadow is empty, and PostgreSQL builds indexes as the
	// table's owner, restricted.
	var ddl execer = tx
	if m.sb != nil && m.sb.handOver {
		ddl = m.admin
	}
	// Indexes and index-backed constraints, under names of their own
	// (index names are unique per schema), so the ALTER sees them.
	idx, err := m.q(ctx, tx, `select ic.relname, i.indexrelid::text, pg_get_indexdef(i.indexrelid),
		coalesce(ts.spcname, ''), coalesce(con.contype::text, ''), coalesce(pg_get_constraintdef(con.oid), ''),
		i.indisvalid::text, i.indisclustered::text, coalesce(con.condeferrable, false)::text, coalesce(con.condeferred, false)::text
		from pg_index i join pg_class ic on ic.oid = i.indexrelid
		left join pg_tablespace ts on ts.oid = ic.reltablespace
		left join pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid and con.contype in ('p','u','x')
		where i.indrelid = $1 order by ic.relname`, t.OID)
	if err != nil {
		return err
	}
	for _, r := range idx {
		name, oid, def, ts, contype, condef := r[0], r[1], r[2], r[3], r[4], r[5]
		if r[6] != "true" {
			m.event(ctx, PhasePrepare, fmt.Sprintf("index %s is invalid on the original and is not rebuilt", name))
			continue
		}
		tmp := truncName(name, 63-len("_tat")-len(oid)) + "_tat" + oid
		p.IndexMap[name] = tmp
		var stmts []string
		switch {
		case (contype == "p" || contype == "u") && t.Kind != "p":
			// The index first, then the constraint on it: pg_get_constraintdef
			// leaves out the index's storage parameters and tablespace.
			s, err := retargetIndex(def, tmp, p.Schema, p.Shadow, ts)
			if err != nil {
				return err
			}
			stmts = append(stmts, s, usingIndex(shadow, tmp, tmp, contype, r[8] == "true", r[9] == "true"))
		case contype != "":
			stmts = append(stmts, "ALTER TABLE "+shadow+" ADD CONSTRAINT "+qi(tmp)+" "+condef)
		default:
			s, err := retargetIndex(def, tmp, p.Schema, p.Shadow, ts)
			if err != nil {
				return err
			}
			stmts = append(stmts, s)
		}
		for _, s := range stmts {
			if _, err := m.exec(ctx, ddl, s); err != nil {
				return fmt.Errorf("copy index %s to shadow: %w", name, err)
			}
		}
		if r[7] == "true" {
			if _, err := m.exec(ctx, ddl, "ALTER TABLE "+shadow+" CLUSTER ON "+qi(tmp)); err != nil {
				return err
			}
		}
	}
	if replIdent == "i" {
		var ri string
		if err := tx.QueryRow(ctx, `select c.relname from pg_index i join pg_class c on c.oid = i.indexrelid
			where i.indrelid = $1 and i.indisreplident`, t.OID).Scan(&ri); err == nil && p.IndexMap[ri] != "" {
			if _, err := m.exec(ctx, ddl, "ALTER TABLE "+shadow+" REPLICA IDENTITY USING INDEX "+qi(p.IndexMap[ri])); err != nil {
				return err
			}
		}
	}
	// Indexes that exist on one partition only (not attached to an index of
	// the parent), their constraints included, are copied to that
	// partition's shadow; an inheritance child's all are its own.
	for _, pt := range t.Partitions {
		idx, err := m.q(ctx, tx, `select ic.relname, i.indexrelid::text, pg_get_indexdef(i.indexrelid), coalesce(ts.spcname, ''),
			coalesce(pg_get_constraintdef(con.oid), ''), coalesce(con.contype::text, ''),
			coalesce(con.condeferrable, false)::text, coalesce(con.condeferred, false)::text
			from pg_index i join pg_class ic on ic.oid = i.indexrelid
			left join pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid and con.contype in ('p', 'u', 'x')
			left join pg_tablespace ts on ts.oid = ic.reltablespace
			where i.indrelid = $1 and i.indisvalid
			  and not exists (select 1 from pg_inherits h where h.inhrelid = i.indexrelid)`, pt.OID)
		if err != nil {
			return err
		}
		for _, r := range idx {
			tmp := truncName(r[0], 63-len("_tat")-len(r[1])) + "_tat" + r[1]
			p.IndexMap[r[0]] = tmp
			s, err := retargetIndex(r[2], tmp, pt.Schema, partShadow(pt), r[3])
			if err != nil {
				return err
			}
			stmts := []string{s}
			switch on := ident(pt.Schema, partShadow(pt)); r[5] {
			case "p", "u": // as for the root's: keeps the index's storage parameters and tablespace
				stmts = append(stmts, usingIndex(on, tmp, tmp, r[5], r[6] == "true", r[7] == "true"))
			case "x":
				stmts = []string{"ALTER TABLE " + on + " ADD CONSTRAINT " + qi(tmp) + " " + r[4]}
			}
			for _, s := range stmts {
				if _, err := m.exec(ctx, ddl, s); err != nil {
					return fmt.Errorf("copy index %s of partition %s: %w", r[0], pt.Name, err)
				}
			}
		}
	}
	// Outbound foreign keys, so that an ALTER naming them works; they are
	// taken off again below and come back NOT VALID at the switch.
	fks, err := m.q(ctx, tx, `select conname, pg_get_constraintdef(oid) from pg_constraint
		where conrelid = $1 and contype = 'f' order by conname`, t.OID)
	if err != nil {
		return err
	}
	if err := m.checkPartitionedFKs(ctx, tx, p, len(fks)); err != nil {
		return err
	}
	for _, f := range fks {
		def := f[1]
		if !strings.HasSuffix(def, " NOT VALID") {
			def += " NOT VALID"
		}
		if _, err := m.exec(ctx, ddl, "ALTER TABLE "+shadow+" ADD CONSTRAINT "+qi(f[0])+" "+def); err != nil {
			return fmt.Errorf("copy foreign key %s to shadow: %w", f[0], err)
		}
	}

	// The ALTER itself, rewritten by the parser to target the shadow.
	if sql, err := m.shadowSQLForTree(p); err != nil {
		return err
	} else if sql != "" {
		if _, err := m.exec(ctx, tx, sql); err != nil {
			return fmt.Errorf("%w: the command fails on a copy of %s: %v", ErrBadCommand, t.ident(), err)
		}
	}
	if err := m.detachForeignShadows(ctx, tx, p); err != nil {
		return err
	}
	if err := m.checkInherited(ctx, tx, p); err != nil {
		return err
	}
	if err := m.checkPublished(ctx, tx, p); err != nil {
		return err
	}
	if err := m.renameNotNulls(ctx, tx, p); err != nil {
		return err
	}
	if err := m.renameShadowNamed(ctx, tx, p); err != nil {
		return err
	}

	if err := m.capturePlan(ctx, tx, p, fks); err != nil {
		return err
	}
	if err := m.planCopy(ctx, tx, p); err != nil {
		return err
	}
	if err := m.planPublications(ctx, tx, p); err != nil {
		return err
	}
	adminState := m.sb != nil && m.sb.adminState
	if !adminState {
		if err := createState(ctx, m, tx, p); err != nil {
			return err
		}
	}
	m.plan = p
	if m.opts.DryRun {
		return errDryRun // the deferred rollback undoes everything
	}
	if err := tx.Commit(ctx); err != nil {
		m.plan = nil
		return fmt.Errorf("commit prepare: %w", err)
	}
	*committed = true
	if adminState {
		// The engine's role owns the state table: the plan in its comment
		// drives the switch, run with the engine's rights, and must be
		// beyond the owner's reach; she only writes the checkpoints.
		err := pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
			if err := createState(ctx, m, tx, p); err != nil {
				return err
			}
			_, err := m.exec(ctx, tx, "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON "+ident(p.Schema, p.State)+" TO "+qi(m.sb.owner))
			return err
		})
		if err != nil {
			m.plan = nil
			return err
		}
	}
	return nil
}

// refusePartitionKeyCode: in partial mode the switch attaches the new
// partition as the engine's role. ATTACH PARTITION scans nothing when the
// shadow's CHECK proves the bound, but the owner of the shadow (or of the
// default partition) can drop that proof, and the scan would evaluate the
// partition key, with the engine's rights. A key that calls functions other
// than PostgreSQL's own is therefore refused when the owner's code runs in
// the sandbox.
func (m *migration) refusePartitionKeyCode(ctx context.Context, tx pgx.Tx) error {
	if m.t.Parent == nil || m.sb == nil || m.sb.mode != modeLogin {
		return nil
	}
	var fns string
	err := tx.QueryRow(ctx, `select coalesce(string_agg(distinct p.oid::regprocedure::text, ', '), '')
		from pg_partition_ancestors($1) a
		join pg_partitioned_table pt on pt.partrelid = a.relid and pt.partexprs is not null
		join pg_depend d on d.classid = 'pg_class'::regclass and d.objid = pt.partrelid and d.refclassid = 'pg_proc'::regclass
		join pg_proc p on p.oid = d.refobjid
		where p.pronamespace <> 'pg_catalog'::regnamespace`, m.t.OID).Scan(&fns)
	if err != nil {
		return fmt.Errorf("read the partition keys above %s: %w", m.tableRef(), err)
	}
	if fns != "" {
		return fmt.Errorf("%w: the partition key above %s calls %s, which attaching the new partition could evaluate with the sidecar's rights; "+
			"run this migration as the table's owner (pg_tat CLI with her credentials)", errDenied, m.tableRef(), fns)
	}
	return nil
}

// capturePlan records the shadow's indexes and foreign keys as the ALTER left
// them, then drops them: the copy is fastest into a bare heap.
func (m *migration) capturePlan(ctx context.Context, tx pgx.Tx, p *plan, origFKs [][]string) error {
	shadow := ident(p.Schema, p.Shadow)
	if _, err := tx.Exec(ctx, catalogPath); err != nil {
		return err
	}
	defer tx.Exec(ctx, "reset search_path") //nolint:errcheck
	tables := []string{shadow}
	for _, pt := range p.Partitions {
		tables = append(tables, ident(pt.Schema, partShadow(pt)))
	}
	// Top-level indexes only: those of partitions that are attached to a
	// parent's index are built by the parent's.
	rows, err := m.q(ctx, tx, `select ic.relname, pg_get_indexdef(i.indexrelid), coalesce(ts.spcname, ''),
		coalesce(con.contype::text, ''), coalesce(con.conname, ''), coalesce(pg_get_constraintdef(con.oid), ''),
		i.indisclustered::text, i.indisreplident::text,
		coalesce(con.condeferrable, false)::text, coalesce(con.condeferred, false)::text,
		n.nspname, t.relname, t.relkind::text,
		case when i.indisunique and i.indpred is null and i.indexprs is null then
		  (select string_agg(a.attname, E'\x1f' order by k.ord) from unnest(i.indkey[0:i.indnkeyatts - 1]) with ordinality k(n, ord)
		   join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.n) else '' end,
		i.indexrelid::text
		from pg_index i join pg_class ic on ic.oid = i.indexrelid join pg_class t on t.oid = i.indrelid
		join pg_namespace n on n.oid = t.relnamespace
		left join pg_tablespace ts on ts.oid = ic.reltablespace
		left join pg_constraint con on con.conindid = i.indexrelid and con.conrelid = i.indrelid and con.contype in ('p','u','x')
		where i.indrelid = any($1::regclass[])
		  and not exists (select 1 from pg_inherits h where h.inhrelid = i.indexrelid)
		order by ic.relname`, tables)
	if err != nil {
		return err
	}
	shadowKey := make([]string, len(p.Key))
	for i, k := range p.Key {
		shadowKey[i] = m.cmd.RenamedTo(k)
	}
	var replIdent string
	if err := tx.QueryRow(ctx, `select relreplident::text from pg_class where oid = $1::regclass`, shadow).Scan(&replIdent); err != nil {
		return err
	}
	p.ReplIdent = replIdent
	orig := map[string]string{}
	for o, s := range p.IndexMap {
		orig[s] = o
	}
	ver := m.t.Version
	var drops []string
	for _, r := range rows {
		name, def, ts, contype, conname, condef := r[0], r[1], r[2], r[3], r[4], r[5]
		si := shadowIndex{Schema: r[10], Table: r[11], Name: name, Clustered: r[6] == "true", OrigName: orig[name]}
		si.IsKeyIndex = r[13] != "" && r[13] == strings.Join(shadowKey, "\x1f")
		on := ident(si.Schema, si.Table)
		si.Final = si.OrigName
		if si.Final == "" {
			si.Final = name
			if strings.HasPrefix(name, p.Shadow) {
				// An index the ALTER named after the shadow: name it after the table.
				si.Final = truncName(p.Table+strings.TrimPrefix(name, p.Shadow), 63)
			}
		}
		if r[7] == "true" {
			p.ReplIndex = name
		}
		var err error
		si.CreateSQL, err = retargetIndex(def, name, si.Schema, si.Table, ts)
		if err != nil {
			return err
		}
		switch {
		case r[12] == "p" && (contype == "p" || contype == "u") && ver >= 180000:
			// Since 18 a leaf's PRIMARY KEY added on its own (USING INDEX)
			// marks the NOT NULL constraints it inherited as local too: let
			// the parent's constraint build its leaves, as in place.
			si.Exclusion = true
			si.Constraint = "ALTER TABLE " + on + " ADD CONSTRAINT " + qi(conname) + " " + condef
			drops = append(drops, "ALTER TABLE "+on+" DROP CONSTRAINT "+qi(conname))
		case r[12] == "p" && contype != "x":
			// As pg_dump restores it: the parent's index (or PRIMARY KEY or
			// UNIQUE constraint) alone, ON ONLY; each leaf's index built on
			// its own, in parallel; then ATTACH PARTITION, which makes the
			// parent valid once every partition has its index.
			if si.CreateSQL, err = retarget(def, name, si.Schema, si.Table, ts, false); err != nil {
				return err
			}
			if si.Parts, err = m.partIndexes(ctx, tx, r[14], contype, r[8] == "true", r[9] == "true"); err != nil {
				return err
			}
			if contype != "" {
				si.Constraint = "ALTER TABLE ONLY " + on + " ADD CONSTRAINT " + qi(conname) + " " + condef
				drops = append(drops, "ALTER TABLE "+on+" DROP CONSTRAINT "+qi(conname))
			} else {
				drops = append(drops, "DROP INDEX "+ident(si.Schema, name))
			}
		case contype == "p" || contype == "u":
			si.Constraint = usingIndex(on, conname, name, contype, r[8] == "true", r[9] == "true")
			drops = append(drops, "ALTER TABLE "+on+" DROP CONSTRAINT "+qi(conname))
		case contype == "x":
			si.Exclusion = true
			si.Constraint = "ALTER TABLE " + on + " ADD CONSTRAINT " + qi(conname) + " " + condef
			drops = append(drops, "ALTER TABLE "+on+" DROP CONSTRAINT "+qi(conname))
		default:
			drops = append(drops, "DROP INDEX "+ident(si.Schema, name))
		}
		p.Indexes = append(p.Indexes, si)
	}
	fks, err := m.q(ctx, tx, `select conname, pg_get_constraintdef(oid) from pg_constraint
		where conrelid = $1::regclass and contype = 'f' order by conname`, shadow)
	if err != nil {
		return err
	}
	validOrig := map[string]bool{}
	for _, f := range origFKs {
		validOrig[f[0]] = !strings.HasSuffix(f[1], " NOT VALID")
	}
	for _, f := range fks {
		def := f[1]
		if v, ok := validOrig[f[0]]; ok && v {
			def = strings.TrimSuffix(def, " NOT VALID")
		}
		p.FKs = append(p.FKs, namedDef{Name: f[0], Def: def})
		drops = append(drops, "ALTER TABLE "+shadow+" DROP CONSTRAINT "+qi(f[0]))
	}
	for _, s := range drops {
		if _, err := m.exec(ctx, tx, s); err != nil {
			return fmt.Errorf("strip shadow for the load: %w", err)
		}
	}
	return nil
}

// planCopy maps the shadow's columns to expressions over the original.
func (m *migration) planCopy(ctx context.Context, tx pgx.Tx, p *plan) error {
	shadow := ident(p.Schema, p.Shadow)
	src := make([]string, len(m.t.Columns))
	for i, c := range m.t.Columns {
		src[i] = c.Name
	}
	rows, err := m.copyLists(ctx, tx, shadow, src, &p.InsertCols, &p.SelectExprs)
	if err != nil {
		return err
	}
	// An inheritance child has columns of its own.
	for i, pt := range p.Partitions {
		if !pt.Inherit || pt.Foreign {
			continue
		}
		names, err := m.q(ctx, tx, `select attname from pg_attribute where attrelid = $1 and attnum > 0 and not attisdropped order by attnum`, pt.OID)
		if err != nil {
			return err
		}
		src := make([]string, len(names))
		for j, n := range names {
			src[j] = n[0]
		}
		if _, err := m.copyLists(ctx, tx, ident(pt.Schema, partShadow(pt)), src, &p.Partitions[i].InsertCols, &p.Partitions[i].SelectExprs); err != nil {
			return err
		}
	}
	for _, k := range p.Key {
		nk := m.cmd.RenamedTo(k)
		found := false
		for _, r := range rows {
			if r[0] == nk {
				found = true
			}
		}
		if !found {
			return fmt.Errorf("%w: the command drops key column %s, which change capture needs", ErrBadCommand, k)
		}
		p.ShadowKey = append(p.ShadowKey, nk)
	}
	// Fail now, not after the copy, when a USING expression does not fit
	// the original's columns (the original tool found out at the switch).
	probe := fmt.Sprintf("SELECT %s FROM %s t WHERE false", strings.Join(p.SelectExprs, ", "), m.t.ident())
	if _, err := m.exec(ctx, tx, probe); err != nil {
		return fmt.Errorf("%w: the command's expressions do not apply to %s: %v", ErrBadCommand, m.t.ident(), err)
	}
	return nil
}

// partIndexes lists the indexes below the partitioned index oid, parents
// first, with the statements that re-create each one on its own.
func (m *migration) partIndexes(ctx context.Context, tx pgx.Tx, oid, contype string, deferrable, deferred bool) ([]partIndex, error) {
	rows, err := m.q(ctx, tx, `select n.nspname, t.relname, c.relname, pn.nspname, pc.relname, pt.isleaf::text, pt.level::text,
		pg_get_indexdef(c.oid), coalesce(ts.spcname, ''), coalesce(pg_get_constraintdef(con.oid), '')
		from pg_partition_tree($1::regclass) pt
		join pg_class c on c.oid = pt.relid join pg_index i on i.indexrelid = c.oid
		join pg_class t on t.oid = i.indrelid join pg_namespace n on n.oid = t.relnamespace
		join pg_class pc on pc.oid = pt.parentrelid join pg_namespace pn on pn.oid = pc.relnamespace
		left join pg_tablespace ts on ts.oid = c.reltablespace
		left join pg_constraint con on con.conindid = c.oid and con.conrelid = t.oid and con.contype in ('p', 'u')
		where pt.level > 0 order by pt.level, c.relname`, oid)
	if err != nil {
		return nil, fmt.Errorf("partition indexes: %w", err)
	}
	parts := make([]partIndex, 0, len(rows))
	for _, r := range rows {
		pi := partIndex{Schema: r[0], Table: r[1], Name: r[2], ParentSch: r[3], Parent: r[4], Leaf: r[5] == "true"}
		pi.Level, _ = strconv.Atoi(r[6])
		if pi.CreateSQL, err = retarget(r[7], pi.Name, pi.Schema, pi.Table, r[8], pi.Leaf); err != nil {
			return nil, err
		}
		on := ident(pi.Schema, pi.Table)
		switch {
		case contype == "" || r[9] == "":
		case pi.Leaf:
			pi.Constraint = usingIndex(on, pi.Name, pi.Name, contype, deferrable, deferred)
		default:
			pi.Constraint = "ALTER TABLE ONLY " + on + " ADD CONSTRAINT " + qi(pi.Name) + " " + r[9]
		}
		parts = append(parts, pi)
	}
	return parts, nil
}

// copyLists appends to ins and sel the shadow's columns and the expressions
// over the original (columns src) that fill them; it returns the shadow's
// columns as (name, generated) rows.
func (m *migration) copyLists(ctx context.Context, tx pgx.Tx, shadow string, srcCols []string, ins, sel *[]string) ([][]string, error) {
	rows, err := m.q(ctx, tx, `select attname, (attgenerated <> '')::text from pg_attribute
		where attrelid = $1::regclass and attnum > 0 and not attisdropped order by attnum`, shadow)
	if err != nil {
		return nil, err
	}
	src := map[string]bool{}
	for _, c := range srcCols {
		src[m.cmd.RenamedTo(c)] = true
	}
	back := map[string]string{}
	for o, n := range m.cmd.renames {
		back[n] = o
	}
	for _, r := range rows {
		name, generated := r[0], r[1] == "true"
		if generated || !src[name] {
			continue // recomputed, or new: its default applies
		}
		orig := name
		if o, ok := back[name]; ok {
			orig = o
		}
		expr := "t." + qi(orig)
		if u, ok, err := m.cmd.UsingExpr(orig); err != nil {
			return nil, err
		} else if ok {
			expr = "(" + u + ")"
		}
		*ins = append(*ins, qi(name))
		*sel = append(*sel, expr)
	}
	return rows, nil
}

// retargetIndex rewrites an index definition to a new name, table and
// tablespace, through the parser. On a partitioned table it builds the
// index on every partition.
func retargetIndex(def, name, schema, table, tablespace string) (string, error) {
	return retarget(def, name, schema, table, tablespace, true)
}

// retarget is retargetIndex; with inh false the index of a partitioned
// table is created alone (ON ONLY).
func retarget(def, name, schema, table, tablespace string, inh bool) (string, error) {
	tree, err := pg_query.Parse(def)
	if err != nil {
		return "", fmt.Errorf("parse index definition %q: %w", def, err)
	}
	st := tree.Stmts[0].Stmt.GetIndexStmt()
	if st == nil {
		return "", fmt.Errorf("not an index definition: %q", def)
	}
	st.Idxname = name
	st.Relation.Schemaname, st.Relation.Relname = schema, table
	st.Relation.Inh = inh
	st.TableSpace = tablespace
	out, err := pg_query.Deparse(tree)
	if err != nil {
		return "", fmt.Errorf("deparse index definition: %w", err)
	}
	return out, nil
}

func moveColumn(cols []column, col, before string) ([]column, error) {
	from, to := -1, -1
	for i, c := range cols {
		if c.Name == col {
			from = i
		}
		if c.Name == before {
			to = i
		}
	}
	if from < 0 || to < 0 {
		return nil, fmt.Errorf("%w: MOVE COLUMN: column %q or %q does not exist", ErrBadCommand, col, before)
	}
	c := cols[from]
	out := append(append([]column(nil), cols[:from]...), cols[from+1:]...)
	if from < to {
		to--
	}
	out = append(out[:to], append([]column{c}, out[to:]...)...)
	return out, nil
}

// relOptions renders reloptions ("fillfactor=70") as a WITH list with quoted values.
func relOptions(opts []string) string {
	parts := make([]string, len(opts))
	for i, o := range opts {
		k, v, _ := strings.Cut(o, "=")
		parts[i] = k + "=" + quoteLiteral(v)
	}
	return strings.Join(parts, ", ")
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// createState makes the state table: the plan (as its comment) and the copy
// checkpoints, so a restarted run continues where this one stopped; per
// range also the source checksum the copy took (src_sum, src_hash) and
// whether a captured change has touched the range since (dirty), which
// verify uses (verify.go).
func createState(ctx context.Context, m *migration, tx pgx.Tx, p *plan) error {
	st := ident(p.Schema, p.State)
	keyTypes := make([]string, len(p.KeyTypes))
	copy(keyTypes, p.KeyTypes)
	if _, err := m.exec(ctx, tx, "CREATE TABLE "+st+` (range_id int PRIMARY KEY, lo text[], hi text[], last text[],
		rows bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false, rel int NOT NULL DEFAULT 0,
		src_sum numeric DEFAULT 0, src_hash text, dirty boolean NOT NULL DEFAULT false)`); err != nil {
		return fmt.Errorf("create state table: %w", err)
	}
	js, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if _, err := m.exec(ctx, tx, "COMMENT ON TABLE "+st+" IS "+quoteLiteral(string(js))); err != nil {
		return fmt.Errorf("store plan: %w", err)
	}
	return nil
}

// loadPlan reads the plan of an earlier run, if there is one.
func loadPlan(ctx context.Context, q querier, schema, stateTable string) (*plan, error) {
	var js *string
	err := q.QueryRow(ctx, `select obj_description(to_regclass($1), 'pg_class')`, ident(schema, stateTable)).Scan(&js)
	if err != nil {
		return nil, fmt.Errorf("read plan: %w", err)
	}
	if js == nil {
		return nil, nil
	}
	p := &plan{}
	if err := json.Unmarshal([]byte(*js), p); err != nil {
		return nil, fmt.Errorf("decode plan: %w", err)
	}
	return p, nil
}

// renameNotNulls: since PostgreSQL 18 NOT NULL is a named constraint, and one
// that the ALTER adds on the shadow (SET NOT NULL, ADD COLUMN ... NOT NULL) is
// named after the shadow, "orders__tat_new_c_not_null". It gets the name the
// in-place ALTER would give, "orders_c_not_null". Before 18 there are no
// contype 'n' rows and nothing to do.
func (m *migration) renameNotNulls(ctx context.Context, tx pgx.Tx, p *plan) error {
	// The root's shadow, then each partition's (a partition's own primary
	// key adds one there too); inherited ones keep their parent's name.
	tables := [][2]string{{p.Schema, p.Shadow}}
	names := []string{p.Table}
	for _, pt := range p.Partitions {
		tables = append(tables, [2]string{pt.Schema, partShadow(pt)})
		names = append(names, pt.Name)
	}
	for i, t := range tables {
		shadow := ident(t[0], t[1])
		rows, err := m.q(ctx, tx, `select c.conname, a.attname, c.coninhcount::text from pg_constraint c
			join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
			where c.conrelid = $1::regclass and c.contype = 'n' order by c.conname`, shadow)
		if err != nil {
			return err
		}
		taken := map[string]bool{}
		for _, r := range rows {
			taken[r[0]] = true
		}
		for _, r := range rows {
			if r[0] != objectName(t[1], r[1], "not_null") || r[2] != "0" {
				continue
			}
			name := objectName(names[i], r[1], "not_null")
			if taken[name] {
				continue
			}
			if _, err := m.exec(ctx, tx, "ALTER TABLE "+shadow+" RENAME CONSTRAINT "+qi(r[0])+" TO "+qi(name)); err != nil {
				return fmt.Errorf("rename constraint %s on the shadow: %w", r[0], err)
			}
			taken[name] = true
		}
	}
	return nil
}

// objectName is PostgreSQL's makeObjectName: name1_name2_label, the longer
// of name1 and name2 shortened until it fits in 63 bytes.
func objectName(name1, name2, label string) string {
	avail := 63 - len(label) - 2
	n1, n2 := len(name1), len(name2)
	for n1+n2 > avail {
		if n1 > n2 {
			n1--
		} else {
			n2--
		}
	}
	return truncName(name1, n1) + "_" + truncName(name2, n2) + "_" + label
}

// hasUniqueBesidesKey reports whether the shadow will have a UNIQUE or
// EXCLUDE index other than the key's (see settleCopy).
func (p *plan) hasUniqueBesidesKey() bool {
	for _, si := range p.Indexes {
		if si.IsKeyIndex {
			continue
		}
		if si.Exclusion || strings.Contains(si.CreateSQL, "CREATE UNIQUE") {
			return true
		}
	}
	return false
}

// renameShadowNamed gives CHECK and FOREIGN KEY constraints that the ALTER
// added without a name ("orders__tat_new_x_check") the name the in-place
// ALTER would have given them ("orders_x_check").
func (m *migration) renameShadowNamed(ctx context.Context, tx pgx.Tx, p *plan) error {
	shadow := ident(p.Schema, p.Shadow)
	rows, err := m.q(ctx, tx, `select conname from pg_constraint where conrelid = $1::regclass and contype in ('c', 'f')`, shadow)
	if err != nil {
		return err
	}
	taken := map[string]bool{}
	for _, r := range rows {
		taken[r[0]] = true
	}
	for _, r := range rows {
		if !strings.HasPrefix(r[0], p.Shadow+"_") {
			continue
		}
		name := truncName(p.Table+strings.TrimPrefix(r[0], p.Shadow), 63)
		if taken[name] {
			continue
		}
		if _, err := m.exec(ctx, tx, "ALTER TABLE "+shadow+" RENAME CONSTRAINT "+qi(r[0])+" TO "+qi(name)); err != nil {
			return fmt.Errorf("rename constraint %s on the shadow: %w", r[0], err)
		}
		taken[name] = true
	}
	return nil
}

// checkInherited refuses, in partial mode, a command that changes what the
// table inherits from its parent: the shadow could not be attached back.
// PostgreSQL refuses the same in place ("cannot alter inherited column").
func (m *migration) checkInherited(ctx context.Context, tx pgx.Tx, p *plan) error {
	if p.Parent == nil {
		return nil
	}
	cols := func(rel string) string {
		return `select attname, format_type(atttypid, atttypmod), attcollation, attnotnull
		from pg_attribute where attrelid = ` + rel + `::regclass and attnum > 0 and not attisdropped`
	}
	rows, err := m.q(ctx, tx, `select x.attname from (`+cols("$1")+`) x
		where not exists (select 1 from (`+cols("$2")+`) s where s.attname = x.attname and s.format_type = x.format_type
		  and s.attcollation = x.attcollation and (s.attnotnull or not x.attnotnull))
		order by 1`, p.Parent.ident(), ident(p.Schema, p.Shadow))
	if err != nil {
		return fmt.Errorf("compare with parent: %w", err)
	}
	if len(rows) > 0 {
		return fmt.Errorf("%w: the command changes column %s, which %s inherits from %s; alter %[4]s instead",
			ErrBadCommand, rows[0][0], m.tableRef(), p.Parent.ident())
	}
	if p.Parent.Bound == "" {
		return nil
	}
	rows, err = m.q(ctx, tx, `select attname from pg_attribute s where attrelid = $1::regclass and attnum > 0 and not attisdropped
		and not exists (select 1 from pg_attribute x where x.attrelid = $2::regclass and x.attname = s.attname and not x.attisdropped)`,
		ident(p.Schema, p.Shadow), p.Parent.ident())
	if err != nil {
		return fmt.Errorf("compare with parent: %w", err)
	}
	if len(rows) > 0 {
		return fmt.Errorf("%w: the command adds column %s, which partition %s cannot have unless %s has it",
			ErrBadCommand, rows[0][0], m.tableRef(), p.Parent.ident())
	}
	return nil
}

func columnMap(cols []column) map[string]column {
	m := make(map[string]column, len(cols))
	for _, c := range cols {
		m[c.Name] = c
	}
	return m
}

// inheritedShadow creates the shadow of an inheritance child as a child of
// its parent's shadow, so that the ALTER on the root's shadow recurses into
// it as it does in place: its own columns declared, the inherited ones
// taken from the parent, with the child's own default, NOT NULL and column
// options where they differ from the parent's.
func (m *migration) inheritedShadow(ctx context.Context, tx pgx.Tx, pt partition, parent string, treeCols map[string]map[string]column) ([]string, error) {
	cols, err := loadColumns(ctx, tx, m.t.Version, pt.OID, pt.Schema, pt.Name)
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", pt.Name, err)
	}
	treeCols[ident(pt.Schema, pt.Name)] = columnMap(cols)
	pcols := treeCols[ident(pt.ParentSchema, pt.Parent)]
	shadow := ident(pt.Schema, partShadow(pt))
	// Inherited columns the child also declares (attislocal) are declared
	// on its shadow too, so they stay its own as in place.
	local, err := m.nameSet(ctx, tx, `select attname from pg_attribute where attrelid = $1 and attnum > 0
		and not attisdropped and attislocal and attinhcount > 0`, pt.OID)
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", pt.Name, err)
	}
	var defs, after []string
	for _, c := range cols {
		pc, inherited := pcols[c.Name]
		if !inherited {
			defs = append(defs, columnDDL(c))
			continue
		}
		col := "ALTER TABLE ONLY " + shadow + " ALTER COLUMN " + qi(c.Name)
		if local[c.Name] {
			defs = append(defs, columnDDL(c))
		} else if c.Default != pc.Default && c.Generated == "" {
			if c.Default == "" {
				after = append(after, col+" DROP DEFAULT")
			} else {
				after = append(after, col+" SET DEFAULT "+c.Default)
			}
		}
		if c.NotNull && !pc.NotNull && !local[c.Name] {
			after = append(after, col+" SET NOT NULL")
		}
		if c.Storage != pc.Storage && c.Storage != "" {
			after = append(after, col+" SET STORAGE "+c.Storage)
		}
		if c.StatTgt != pc.StatTgt && c.StatTgt >= 0 {
			after = append(after, fmt.Sprintf("%s SET STATISTICS %d", col, c.StatTgt))
		}
	}
	// Since 18 NOT NULL is a named constraint; a child's own (declared
	// with its key, say) keeps its name rather than the inherited one's.
	nn, err := m.q(ctx, tx, `select c.conname, a.attname from pg_constraint c
		join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
		where c.conrelid = $1 and c.contype = 'n' and c.conislocal and c.coninhcount > 0 order by 1`, pt.OID)
	if err != nil {
		return nil, fmt.Errorf("read NOT NULL constraints of %s: %w", pt.Name, err)
	}
	for _, r := range nn {
		defs = append(defs, "CONSTRAINT "+qi(r[0])+" NOT NULL "+qi(r[1]))
	}
	if pt.Foreign {
		srv, err := m.foreignClause(ctx, tx, pt.OID)
		if err != nil {
			return nil, err
		}
		opts, err := m.foreignColumnOptions(ctx, tx, pt.OID, shadow)
		if err != nil {
			return nil, err
		}
		for i, a := range after {
			after[i] = strings.Replace(a, "ALTER TABLE ONLY ", "ALTER FOREIGN TABLE ONLY ", 1)
		}
		s := "CREATE FOREIGN TABLE " + shadow + " (" + strings.Join(defs, ", ") + ") INHERITS (" + parent + ")" + srv
		return append(append([]string{s}, after...), opts...), nil
	}
	s := "CREATE "
	if pt.Persistence == "u" {
		s += "UNLOGGED "
	}
	s += "TABLE " + shadow + " (" + strings.Join(defs, ", ") + ") INHERITS (" + parent + ")"
	if len(pt.RelOptions) > 0 {
		s += " WITH (" + relOptions(pt.RelOptions) + ")"
	}
	if pt.Tablespace != "" {
		s += " TABLESPACE " + qi(pt.Tablespace)
	}
	return append([]string{s}, after...), nil
}

// checkTree refuses a partition or inheritance tree with what the switch
// cannot carry over to the new tables below the root, and what inheritance
// trees do not support yet. The tables' own triggers, rules, policies,
// foreign keys (outbound and inbound), publication membership, statistics,
// views and functions over them are re-created by the switch as the root's
// are (dependents.go), materialized views over them rebuilt as the root's
// (matview.go). Refused: materialized views the switch cannot rebuild
// (refuseMatViews), other users of
// their row types (a column of another table, a domain, ...: their values
// are of the old type), and before PostgreSQL 18 a foreign key of a
// partitioned table below the root or from a partitioned table to one of
// them (it cannot be re-added NOT VALID, and validating it would scan under
// the switch's lock).
func (m *migration) checkTree(ctx context.Context, tx pgx.Tx, p *plan) error {
	if len(p.Partitions) == 0 {
		return nil
	}
	for _, pt := range p.Partitions {
		rel := ident(pt.Schema, pt.Name)
		var users string
		if err := m.refuseMatViews(ctx, tx, []uint32{pt.OID}, rel+" (a table of the tree of "+m.tableRef()+")"); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, qRowtypeUsers, pt.OID).Scan(&users); err != nil {
			return fmt.Errorf("look for users of the row type of %s: %w", rel, err)
		}
		if users != "" {
			return fmt.Errorf("%w: the row type of %s, a table of the tree of %s, is used by %s; the new table would have another row type, so these must be changed or dropped first",
				ErrBadCommand, rel, m.tableRef(), users)
		}
	}
	if p.Partitions[0].Inherit {
		// Each child is copied and caught up from its own rows (ONLY), as
		// the root's owner: a child's row-level security policies would
		// apply to those reads (unlike a partition's, read through its
		// parent) and hide rows from the copy.
		var rls string
		if err := tx.QueryRow(ctx, `select coalesce(min(c.oid::regclass::text), '') from pg_class c, pg_class root
			where c.oid = any($1::oid[]) and root.oid = $2 and c.relrowsecurity
			  and (c.relforcerowsecurity or c.relowner <> root.relowner)
			  and not exists (select 1 from pg_roles r where r.oid = root.relowner and (r.rolsuper or r.rolbypassrls))`,
			oidsOf(p.Partitions), p.TableID).Scan(&rls); err != nil {
			return fmt.Errorf("check row-level security of the tree: %w", err)
		}
		if rls != "" {
			return fmt.Errorf("%w: inheritance child %s has row-level security that applies to the owner of %s, who copies its rows; "+
				"disable it (or its FORCE) during the migration, or give the owner BYPASSRLS", ErrBadCommand, rls, m.tableRef())
		}
	}
	ver := m.t.Version
	if ver >= 180000 {
		return nil
	}
	rows, err := m.q(ctx, tx, `select c.conname::text, c.conrelid::regclass::text from pg_constraint c join pg_class r on r.oid = c.conrelid
		where c.contype = 'f' and c.conparentid = 0 and r.relkind = 'p' and c.conrelid <> $2
		  and (c.conrelid = any($1::oid[]) or c.confrelid = any($1::oid[])) order by 2, 1 limit 1`, oidsOf(p.Partitions), p.TableID)
	if err != nil {
		return fmt.Errorf("check the foreign keys of the tree: %w", err)
	}
	if len(rows) > 0 {
		return fmt.Errorf("%w: foreign key %s on partitioned table %s: before PostgreSQL 18 it cannot be re-added NOT VALID at the switch "+
			"(validating it there would scan under the lock); drop it first and add it back after", ErrBadCommand, rows[0][0], rows[0][1])
	}
	return nil
}

// usingIndex is ALTER TABLE on ADD CONSTRAINT name PRIMARY KEY|UNIQUE USING
// INDEX idx, for contype p or u, with its deferral.
func usingIndex(on, name, idx, contype string, deferrable, deferred bool) string {
	kind := "PRIMARY KEY"
	if contype == "u" {
		kind = "UNIQUE"
	}
	return "ALTER TABLE " + on + " ADD CONSTRAINT " + qi(name) + " " + kind + " USING INDEX " + qi(idx) + deferral(deferrable, deferred)
}

// deferral renders a constraint's DEFERRABLE clause.
func deferral(deferrable, deferred bool) string {
	switch {
	case deferred:
		return " DEFERRABLE INITIALLY DEFERRED"
	case deferrable:
		return " DEFERRABLE"
	}
	return ""
}

// checkPublished refuses, as PostgreSQL does in place, a type change of a
// column that a publication's column list or row filter uses (subscribers
// and the filter were defined against the old type).
func (m *migration) checkPublished(ctx context.Context, tx pgx.Tx, p *plan) error {
	// Every table of a tree is published on its own (a partition, a child).
	shadows := map[string]string{fmt.Sprint(p.TableID): ident(p.Schema, p.Shadow)}
	for _, pt := range p.Partitions {
		shadows[fmt.Sprint(pt.OID)] = ident(pt.Schema, partShadow(pt))
	}
	rows, err := m.q(ctx, tx, `select distinct a.attname, pub.pubname, format_type(a.atttypid, a.atttypmod), d.refobjid::text
		from pg_depend d join pg_publication_rel r on r.oid = d.objid
		join pg_publication pub on pub.oid = r.prpubid
		join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
		where d.classid = 'pg_publication_rel'::regclass and d.refclassid = 'pg_class'::regclass
		  and d.refobjid = any($1::oid[]) and d.refobjsubid > 0 order by 1, 2`, append([]uint32{p.TableID}, oidsOf(p.Partitions)...))
	if err != nil || len(rows) == 0 {
		return err
	}
	for _, r := range rows {
		var typ *string
		if err := tx.QueryRow(ctx, `select format_type(atttypid, atttypmod) from pg_attribute
			where attrelid = $1::regclass and attname = $2 and not attisdropped`, shadows[r[3]], m.cmd.RenamedTo(r[0])).Scan(&typ); err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		if typ != nil && *typ != r[2] {
			return fmt.Errorf("%w: cannot alter type of column %s: publication %s uses it in its column list or row filter (PostgreSQL refuses the same in place)",
				ErrBadCommand, r[0], r[1])
		}
	}
	return nil
}

// checkPartitionedFKs: before PostgreSQL 18 a foreign key of a partitioned
// table cannot be added NOT VALID, so neither the table's own (outbound)
// keys nor those of partitioned tables referencing it could be re-created
// at the switch without a validating scan under the lock.
func (m *migration) checkPartitionedFKs(ctx context.Context, tx pgx.Tx, p *plan, outbound int) error {
	ver := m.t.Version
	if ver >= 180000 {
		return nil
	}
	if m.t.Kind == "p" && outbound > 0 {
		return fmt.Errorf("%w: partitioned table %s has foreign keys: before PostgreSQL 18 they cannot be re-added NOT VALID at the switch "+
			"(validating them there would scan under the lock); drop them first and add them back after", ErrBadCommand, m.tableRef())
	}
	rows, err := m.q(ctx, tx, `select c.conname::text, c.conrelid::regclass::text from pg_constraint c join pg_class r on r.oid = c.conrelid
		where c.contype = 'f' and c.conparentid = 0 and r.relkind = 'p' and c.confrelid = $1 and c.conrelid <> $1 order by 2, 1 limit 1`, p.TableID)
	if err != nil {
		return fmt.Errorf("check the foreign keys referencing %s: %w", m.tableRef(), err)
	}
	if len(rows) > 0 {
		return fmt.Errorf("%w: foreign key %s of partitioned table %s references %s: before PostgreSQL 18 it cannot be re-added NOT VALID at the switch "+
			"(validating it there would scan under the lock); drop it first and add it back after", ErrBadCommand, rows[0][0], rows[0][1], m.tableRef())
	}
	return nil
}
