package replicate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// dependents is what must be taken off the original before it is dropped
// and put back on the new table after the rename, all inside the cut-over
// transaction. It is read right before the cut-over's lock and proven
// current under it (prelock.go), or read under it.
type dependents struct {
	before   []string  // run before DROP TABLE
	after    []string  // run after the rename
	validate []fkCheck // VALIDATE CONSTRAINT, after commit
	identity []string  // renames of identity sequences, after the rename of the table

	// notes are said once the switch is done (the dependents may be read
	// more than once: before each lock attempt).
	notes []string

	ver        int             // server_version_num
	restore    string          // SET LOCAL ROLE back to the transaction's role after acting as a grantor
	canGrantAs map[string]bool // grantor -> the session may act as it (cache)
}

// treeRel is one table whose own dependents the switch carries over: the
// root (the table the command names) or a partition or inheritance child
// below it. Each has a shadow, renamed to its name at the switch.
type treeRel struct {
	oid     uint32
	schema  string
	ident   string // the table, quoted
	shadow  string // its shadow, quoted
	root    bool
	foreign bool // a foreign table (foreign.go): no replica identity
}

// treeRels: the root, then the tables below it, parents first (so that a
// parent's trigger is re-created, and its enabled state set, before its
// partitions' clones are adjusted).
func (m *migration) treeRels() []treeRel {
	p := m.plan
	rels := []treeRel{{oid: p.TableID, schema: p.Schema, ident: ident(p.Schema, p.Table), shadow: m.shadowIdent(), root: true}}
	for _, pt := range p.Partitions {
		rels = append(rels, treeRel{oid: pt.OID, schema: pt.Schema, ident: ident(pt.Schema, pt.Name), shadow: ident(pt.Schema, partShadow(pt)), foreign: pt.Foreign})
	}
	return rels
}

// readDependents reads every dependent of the original and of the tables
// below it. tx runs with search_path = pg_catalog, so all definitions are
// schema-qualified.
func (m *migration) readDependents(ctx context.Context, tx pgx.Tx) (*dependents, error) {
	d := &dependents{canGrantAs: map[string]bool{}}
	var role string
	if err := tx.QueryRow(ctx, "select current_setting('server_version_num')::int, current_setting('role')").Scan(&d.ver, &role); err != nil {
		return nil, err
	}
	// SET LOCAL ROLE, not RESET ROLE: RESET would also drop a role the
	// session had set for itself, beyond this transaction.
	d.restore = "SET LOCAL ROLE NONE"
	if role != "none" {
		d.restore = "SET LOCAL ROLE " + qi(role)
	}
	rels := m.treeRels()
	oids := make([]uint32, len(rels))
	for i, r := range rels {
		oids[i] = r.oid
	}
	// Views and functions over any table of the tree, and foreign keys
	// from outside it: one query each, so that a view over two tables of
	// the tree is dropped and re-created once.
	if err := m.depViewsAndFunctions(ctx, tx, d, oids); err != nil {
		return nil, err
	}
	if err := m.depInboundFKs(ctx, tx, d, oids); err != nil {
		return nil, err
	}
	if err := m.depSequences(ctx, tx, d, rels); err != nil {
		return nil, err
	}
	// Names of the tree's top-level indexes after the switch (an index of
	// a partition attached to one of them survives with it).
	finalIdx := map[string]string{}
	for _, si := range m.plan.Indexes {
		if si.OrigName != "" {
			finalIdx[si.OrigName] = si.Final
		}
	}
	plain, err := m.plainMembers(ctx, tx, oids[1:])
	if err != nil {
		return nil, err
	}
	for _, r := range rels {
		if plain[r.oid] {
			continue
		}
		s, err := m.relDependents(ctx, tx, d, r, finalIdx)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.ident, err)
		}
		d.after = append(d.after, s...)
	}
	return d, nil
}

// qPlainMembers lists the tables of $1 (below the root) that have nothing
// for relDependents to carry over: the owner of the root (their shadows
// are created by it), default privileges, row-level security and replica
// identity, no foreign key, trigger (but clones enabled as their parents,
// plainly; the capture's own clones, ENABLE ALWAYS, do not count: relTriggers
// skips them too), rule, policy, publication (but the run's own, $5),
// statistics or comment of their own.
// Partitions usually are: this keeps the cut-over's reads (under its lock)
// from growing by a dozen queries per partition.
const qPlainMembers = `select c.oid::text from pg_class c, pg_class root
	where c.oid = any($1::oid[]) and root.oid = $2 and c.relowner = root.relowner
	  and c.relacl is null and not c.relrowsecurity and not c.relforcerowsecurity and c.relreplident = 'd'
	  and not exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attacl is not null)
	  and not exists (select 1 from pg_constraint k where k.conrelid = c.oid and k.contype = 'f' and k.conparentid = 0)
	  and not exists (select 1 from pg_trigger t left join pg_trigger pt on pt.oid = t.tgparentid where t.tgrelid = c.oid
	                  and t.tgname not in ($3, $4)
	                  and (not t.tgisinternal and t.tgparentid = 0
	                       or t.tgparentid <> 0 and t.tgconstraint = 0 and (t.tgenabled <> 'O' or pt.tgenabled <> 'O')))
	  and not exists (select 1 from pg_rewrite r where r.ev_class = c.oid and r.rulename <> '_RETURN')
	  and not exists (select 1 from pg_policy pl where pl.polrelid = c.oid)
	  and not exists (select 1 from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid
	                  where pr.prrelid = c.oid and p.pubname <> $5)
	  and not exists (select 1 from pg_statistic_ext x where x.stxrelid = c.oid)
	  and not exists (select 1 from pg_description d where d.classoid = 'pg_class'::regclass and (d.objoid = c.oid
	                  or d.objoid in (select i.indexrelid from pg_index i where i.indrelid = c.oid)))
	  and not exists (select 1 from pg_description d join pg_constraint k on k.oid = d.objoid
	                  where d.classoid = 'pg_constraint'::regclass and k.conrelid = c.oid)
	  and not exists (select 1 from pg_description d join pg_trigger t on t.oid = d.objoid
	                  where d.classoid = 'pg_trigger'::regclass and t.tgrelid = c.oid)`

// plainMembers runs qPlainMembers.
func (m *migration) plainMembers(ctx context.Context, tx pgx.Tx, oids []uint32) (map[uint32]bool, error) {
	plain := map[uint32]bool{}
	if len(oids) == 0 {
		return plain, nil
	}
	rows, err := m.q(ctx, tx, qPlainMembers, oids, m.plan.TableID, triggerName, truncTriggerName, m.capturePub())
	if err != nil {
		return nil, fmt.Errorf("tables of the tree with nothing of their own: %w", err)
	}
	for _, r := range rows {
		var oid uint32
		if _, err := fmt.Sscan(r[0], &oid); err != nil {
			return nil, err
		}
		plain[oid] = true
	}
	return plain, nil
}

// relDependents: what the new table r must get back after the rename, as
// the original had it: owner, grants, the constraints the shadow went
// without, triggers, rules, row-level security, publication membership,
// extended statistics and comments. For the root, the row-level security
// flags and replica identity are the shadow's own since prepare, and its
// foreign keys are those the ALTER left on the shadow; a table below it
// gets them here, read from the original.
func (m *migration) relDependents(ctx context.Context, tx pgx.Tx, d *dependents, r treeRel, finalIdx map[string]string) ([]string, error) {
	p := m.plan
	tbl := r.ident
	// What the new table will have once the shadow's constraints are back:
	// a property of a column or a constraint the ALTER dropped is not carried.
	shadowCols, err := m.nameSet(ctx, tx, `select attname from pg_attribute where attrelid = $1::regclass and attnum > 0 and not attisdropped`, r.shadow)
	if err != nil {
		return nil, err
	}
	newCol := func(c string) (string, bool) {
		n := p.renamedTo(c)
		return n, shadowCols[n]
	}
	idxNames, err := m.indexFinalNames(ctx, tx, r.oid, finalIdx)
	if err != nil {
		return nil, err
	}
	var out, readded []string // readded: constraints added back by name
	owner := m.t.Owner
	if !r.root {
		rows, err := m.q(ctx, tx, `select pg_get_userbyid(relowner)::text, relrowsecurity::text, relforcerowsecurity::text, relreplident::text,
			coalesce((select c.relname from pg_index i join pg_class c on c.oid = i.indexrelid where i.indrelid = $1 and i.indisreplident), '')
			from pg_class where oid = $1`, r.oid)
		if err != nil || len(rows) == 0 {
			return nil, fmt.Errorf("read table: %v", err)
		}
		owner = rows[0][0]
		out = append(out, "ALTER TABLE "+tbl+" OWNER TO "+qi(owner))
		if rows[0][1] == "true" {
			out = append(out, "ALTER TABLE "+tbl+" ENABLE ROW LEVEL SECURITY")
		}
		if rows[0][2] == "true" {
			out = append(out, "ALTER TABLE "+tbl+" FORCE ROW LEVEL SECURITY")
		}
		switch ri := rows[0][3]; {
		case r.foreign:
		case ri == "f":
			out = append(out, "ALTER TABLE "+tbl+" REPLICA IDENTITY FULL")
		case ri == "n":
			out = append(out, "ALTER TABLE "+tbl+" REPLICA IDENTITY NOTHING")
		case ri == "i":
			// Unless the ALTER dropped the index (in place the table would
			// then have no replica identity either).
			if n, ok := idxNames[rows[0][4]]; ok {
				out = append(out, "ALTER TABLE "+tbl+" REPLICA IDENTITY USING INDEX "+qi(n))
			}
		}
	} else {
		out = append(out, "ALTER TABLE "+tbl+" OWNER TO "+qi(owner))
	}
	g, err := m.relGrants(ctx, tx, d, r.oid, "TABLE", tbl, r.schema, owner, newCol)
	if err != nil {
		return nil, err
	}
	out = append(out, g...)
	if r.root {
		// Constraints of the shadow's own that were off during the load.
		for _, c := range p.Checks {
			out = append(out, "ALTER TABLE "+tbl+" ADD CONSTRAINT "+qi(c.Name)+" "+c.Def)
			readded = append(readded, c.Name)
		}
		for _, f := range p.FKs {
			out = append(out, m.addFK(d, tbl, f.Name, f.Def))
			readded = append(readded, f.Name)
		}
	} else {
		// The table's own outbound foreign keys (a partition's clones of
		// its parent's come back with the parent's), unless the ALTER
		// dropped one of their columns (in place the key goes with it).
		fks, err := m.q(ctx, tx, `select c.conname, pg_get_constraintdef(c.oid),
			coalesce((select string_agg(a.attname, E'\x1f') from pg_attribute a where a.attrelid = c.conrelid and a.attnum = any(c.conkey)), '')
			from pg_constraint c where c.conrelid = $1 and c.contype = 'f' and c.conparentid = 0 order by c.conname`, r.oid)
		if err != nil {
			return nil, err
		}
	fk:
		for _, f := range fks {
			for _, c := range strings.Split(f[2], "\x1f") {
				if _, ok := newCol(c); !ok {
					continue fk
				}
			}
			out = append(out, m.addFK(d, tbl, f[0], f[1]))
			readded = append(readded, f[0])
		}
	}
	trg, err := m.relTriggers(ctx, tx, r)
	if err != nil {
		return nil, err
	}
	out = append(out, trg...)
	rules, err := m.q(ctx, tx, `select rulename, pg_get_ruledef(oid), ev_enabled::text from pg_rewrite
		where ev_class = $1 and rulename <> '_RETURN' order by rulename`, r.oid)
	if err != nil {
		return nil, err
	}
	for _, rl := range rules {
		out = append(out, strings.TrimSuffix(rl[1], ";"))
		if s := enableStmt("RULE", tbl, rl[0], rl[2]); s != "" {
			out = append(out, s)
		}
	}
	// Row-level security policies.
	pols, err := m.q(ctx, tx, `select polname, polcmd::text, polpermissive::text,
		coalesce((select string_agg(case when r = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(r)) end, ', ')
		          from unnest(polroles) r), 'PUBLIC'),
		coalesce(pg_get_expr(polqual, polrelid), ''), coalesce(pg_get_expr(polwithcheck, polrelid), '')
		from pg_policy where polrelid = $1 order by polname`, r.oid)
	if err != nil {
		return nil, err
	}
	cmds := map[string]string{"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}
	for _, pl := range pols {
		s := "CREATE POLICY " + qi(pl[0]) + " ON " + tbl
		if pl[2] == "true" {
			s += " AS PERMISSIVE"
		} else {
			s += " AS RESTRICTIVE"
		}
		s += " FOR " + cmds[pl[1]] + " TO " + pl[3]
		if pl[4] != "" {
			s += " USING (" + pl[4] + ")"
		}
		if pl[5] != "" {
			s += " WITH CHECK (" + pl[5] + ")"
		}
		out = append(out, s)
	}
	// Publication membership, with row filter and column list.
	ver := d.ver
	pubQ := `select p.pubname, '', '' from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid where pr.prrelid = $1`
	if ver >= 150000 {
		pubQ = `select p.pubname, coalesce(pg_get_expr(pr.prqual, pr.prrelid), ''),
			coalesce((select string_agg(quote_ident(a.attname), ', ' order by a.attnum) from pg_attribute a
			          where a.attrelid = pr.prrelid and a.attnum = any(pr.prattrs)), '')
			from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid where pr.prrelid = $1`
	}
	pubs, err := m.q(ctx, tx, pubQ, r.oid)
	if err != nil {
		return nil, err
	}
	for _, pb := range pubs {
		if pb[0] == m.capturePub() {
			// Logical capture's own publication: it must not follow the
			// table to the shadow, and DROP TABLE takes the original out of
			// it, so nothing is carried over and nothing changes it under
			// the lock (which would change the dependents' fingerprint and
			// make the switch read them all again under the lock).
			continue
		}
		s := "ALTER PUBLICATION " + qi(pb[0]) + " ADD TABLE " + tbl
		if pb[2] != "" {
			s += " (" + pb[2] + ")"
		}
		if pb[1] != "" {
			s += " WHERE (" + pb[1] + ")"
		}
		out = append(out, s)
	}
	// Extended statistics go with the table; re-create them
	// (pg_get_statisticsobjdef is 10+, stxstattarget 13+).
	if ver >= 130000 {
		st, err := m.q(ctx, tx, `select pg_get_statisticsobjdef(oid), quote_ident(stxnamespace::regnamespace::text) || '.' || quote_ident(stxname),
			coalesce(stxstattarget, -1)::text, (pg_get_userbyid(stxowner) <> current_user)::text, pg_get_userbyid(stxowner)::text
			from pg_statistic_ext where stxrelid = $1`, r.oid)
		if err != nil {
			return nil, err
		}
		for _, s := range st {
			out = append(out, s[0])
			if s[2] != "-1" {
				out = append(out, "ALTER STATISTICS "+s[1]+" SET STATISTICS "+s[2])
			}
			if s[3] == "true" {
				// Re-created by this session: it would own it.
				out = append(out, "ALTER STATISTICS "+s[1]+" OWNER TO "+qi(s[4]))
			}
		}
	}
	// Comments last, once everything they are on exists again: the
	// shadow's constraints (checks, foreign keys), triggers, rules,
	// policies and statistics are all re-created above.
	com, err := m.tableComments(ctx, tx, d, r, newCol, idxNames, readded)
	if err != nil {
		return nil, err
	}
	return append(out, com...), nil
}

// addFK re-adds a foreign key NOT VALID (no scan under the switch's lock)
// and queues its validation after the commit, unless it was not valid (or
// not enforced) on the original.
func (m *migration) addFK(d *dependents, tbl, name, def string) string {
	// A NOT ENFORCED foreign key (PostgreSQL 18+) is never validated.
	if !strings.HasSuffix(def, " NOT VALID") && !strings.HasSuffix(def, " NOT ENFORCED") {
		def += " NOT VALID"
		if !m.opts.SkipFKValidation {
			d.validate = append(d.validate, fkCheck{Table: tbl, Name: name})
		}
	}
	return "ALTER TABLE " + tbl + " ADD CONSTRAINT " + qi(name) + " " + def
}

// relTriggers re-creates r's triggers (not ours) with their enabled state.
// A partition's clones of its parent's triggers come back with the parent's
// (or with ATTACH PARTITION, partial mode); only their enabled state is
// restored. Before PostgreSQL 15 the clones are tgisinternal.
func (m *migration) relTriggers(ctx context.Context, tx pgx.Tx, r treeRel) ([]string, error) {
	tbl := r.ident
	trg, err := m.q(ctx, tx, `select t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text, (t.tgparentid <> 0)::text,
		coalesce((select pt.tgenabled::text from pg_trigger pt where pt.oid = t.tgparentid), '')
		from pg_trigger t where t.tgrelid = $1 and (not t.tgisinternal or t.tgparentid <> 0 and t.tgconstraint = 0)
		  and t.tgname not in ($2, $3) order by t.tgname`, r.oid, triggerName, truncTriggerName)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, t := range trg {
		cloned := t[3] == "true"
		switch {
		case !cloned:
			out = append(out, t[1])
			if s := enableStmt("TRIGGER", tbl, t[0], t[2]); s != "" {
				out = append(out, s)
			}
		case r.root:
			// Partial mode: ATTACH PARTITION cloned it enabled.
			if s := enableStmt("TRIGGER", tbl, t[0], t[2]); s != "" {
				out = append(out, s)
			} else {
				out = append(out, "ALTER TABLE "+tbl+" ENABLE TRIGGER "+qi(t[0]))
			}
		case t[2] != "O" || t[4] != "O":
			// Below the root the clone takes its parent's state (set just
			// before, parents first, and recursing): set it where it may
			// differ. Where both are plainly enabled there is nothing to do.
			if s := enableStmt("TRIGGER", tbl, t[0], t[2]); s != "" {
				out = append(out, s)
			} else {
				out = append(out, "ALTER TABLE "+tbl+" ENABLE TRIGGER "+qi(t[0]))
			}
		}
	}
	return out, nil
}

// indexFinalNames maps the names of the indexes of table oid to their names
// on the new table, leaving out those the ALTER dropped. An index of its own
// is one of plan.Indexes (top: original name -> final name); a partition's
// index attached to its parent's survives with the top-level index it is
// attached to, under its own name (renamePartitionIndexes restores it).
func (m *migration) indexFinalNames(ctx context.Context, tx pgx.Tx, oid uint32, top map[string]string) (map[string]string, error) {
	rows, err := m.q(ctx, tx, `with recursive up(idx, top) as (
		  select indexrelid, indexrelid from pg_index where indrelid = $1
		  union all
		  select up.idx, h.inhparent from up join pg_inherits h on h.inhrelid = up.top)
		select c.relname, t.relname from up join pg_class c on c.oid = up.idx join pg_class t on t.oid = up.top
		where not exists (select 1 from pg_inherits h where h.inhrelid = up.top)`, oid)
	if err != nil {
		return nil, err
	}
	names := make(map[string]string, len(rows))
	for _, r := range rows {
		f, ok := top[r[1]]
		switch {
		case !ok:
		case r[0] == r[1]:
			names[r[0]] = f
		default:
			names[r[0]] = r[0]
		}
	}
	return names, nil
}

// depViewsAndFunctions: views (nested) over any of the tables oids and
// functions using their rowtypes are dropped and re-created, with owner,
// options, grants and comments. Views over a materialized view over the
// tables are among them; the materialized view itself is replaced by
// swapMatViews (matview.go).
func (m *migration) depViewsAndFunctions(ctx context.Context, tx pgx.Tx, d *dependents, oids []uint32) error {
	views, err := m.q(ctx, tx, `with recursive deps(oid, depth) as (
		  select r.ev_class, 1 from pg_depend d join pg_rewrite r on r.oid = d.objid
		  where d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
		    and d.refobjid = any($1::oid[]) and r.ev_class <> all($1::oid[])
		  union all
		  select r.ev_class, deps.depth + 1 from deps join pg_depend d on d.refobjid = deps.oid
		    and d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
		  join pg_rewrite r on r.oid = d.objid where r.ev_class <> deps.oid)
		select c.oid::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname), pg_get_viewdef(c.oid),
		       coalesce(array_to_string(c.reloptions, ', '), ''), pg_get_userbyid(c.relowner), n.nspname::text,
		       deps.depth::text
		from (select oid, max(depth) as depth from deps group by oid) deps
		join pg_class c on c.oid = deps.oid join pg_namespace n on n.oid = c.relnamespace
		where c.relkind <> 'm'
		order by deps.depth, c.oid`, oids)
	if err != nil {
		return err
	}
	for i := len(views) - 1; i >= 0; i-- {
		d.before = append(d.before, "DROP VIEW "+views[i][1])
	}
	// Functions on the row type, on its array type (which goes with the
	// table) or on the table.
	funcs, err := m.q(ctx, tx, `select distinct p.oid::regprocedure::text, pg_get_functiondef(p.oid), pg_get_userbyid(p.proowner),
		p.pronamespace::regnamespace::text, p.prokind::text, p.oid::text
		from pg_depend d join pg_proc p on p.oid = d.objid
		where d.classid = 'pg_proc'::regclass and d.deptype = 'n' and
		  ((d.refclassid = 'pg_type'::regclass and d.refobjid in (select ty.oid from pg_class c join pg_type ty on ty.oid = c.reltype where c.oid = any($1::oid[])
		                                                         union all select ty.typarray from pg_class c join pg_type ty on ty.oid = c.reltype where c.oid = any($1::oid[])))
		   or (d.refclassid = 'pg_class'::regclass and d.refobjid = any($1::oid[])))`, oids)
	if err != nil {
		return err
	}
	for _, f := range funcs {
		kind := "FUNCTION"
		if f[4] == "p" {
			kind = "PROCEDURE"
		}
		d.before = append(d.before, "DROP "+kind+" "+f[0])
		d.after = append(d.after, f[1], "ALTER "+kind+" "+f[0]+" OWNER TO "+qi(f[2]))
		set, acl, err := m.readACL(ctx, tx, qProcACL, f[5])
		if err != nil {
			return err
		}
		if set {
			nsp, err := m.q(ctx, tx, `select nspname::text from pg_namespace n join pg_proc p on p.pronamespace = n.oid where p.oid = $1::oid`, f[5])
			if err != nil || len(nsp) == 0 {
				return fmt.Errorf("read schema of %s: %v", f[0], err)
			}
			g, err := m.grantStmts(ctx, tx, d, kind, f[0], nsp[0][0], f[2], true, acl, nil)
			if err != nil {
				return err
			}
			d.after = append(d.after, g...)
		}
		com, err := m.q(ctx, tx, `select description from pg_description where objoid = $1::oid and classoid = 'pg_proc'::regclass`, f[5])
		if err != nil {
			return err
		}
		for _, c := range com {
			d.after = append(d.after, "COMMENT ON "+kind+" "+f[0]+" IS "+quoteLiteral(c[0]))
		}
	}
	for _, v := range views {
		def := strings.TrimSuffix(strings.TrimSpace(v[2]), ";")
		s := "CREATE VIEW " + v[1]
		if v[3] != "" {
			s += " WITH (" + v[3] + ")"
		}
		d.after = append(d.after, s+" AS "+def, "ALTER VIEW "+v[1]+" OWNER TO "+qi(v[4]))
		// Column defaults (for INSERTs through the view).
		defs, err := m.q(ctx, tx, `select a.attname, pg_get_expr(d.adbin, d.adrelid) from pg_attrdef d
			join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
			where d.adrelid = $1::oid and not a.attisdropped order by a.attnum`, v[0])
		if err != nil {
			return err
		}
		for _, df := range defs {
			d.after = append(d.after, "ALTER VIEW "+v[1]+" ALTER COLUMN "+qi(df[0])+" SET DEFAULT "+df[1])
		}
		// Privileges, on the view and on its columns.
		g, err := m.relGrants(ctx, tx, d, v[0], "TABLE", v[1], v[5], v[4], func(c string) (string, bool) { return c, true })
		if err != nil {
			return err
		}
		d.after = append(d.after, g...)
		// INSTEAD OF triggers and rules of its own (a view's triggers and
		// rules cannot be disabled: no enabled state to carry).
		trg, err := m.q(ctx, tx, `select pg_get_triggerdef(oid) from pg_trigger where tgrelid = $1::oid and not tgisinternal order by tgname`, v[0])
		if err != nil {
			return err
		}
		for _, t := range trg {
			d.after = append(d.after, t[0])
		}
		rules, err := m.q(ctx, tx, `select pg_get_ruledef(oid) from pg_rewrite where ev_class = $1::oid and rulename <> '_RETURN' order by rulename`, v[0])
		if err != nil {
			return err
		}
		for _, r := range rules {
			d.after = append(d.after, strings.TrimSuffix(r[0], ";"))
		}
		com, err := m.q(ctx, tx, `select objsubid::text, coalesce(a.attname, ''), description from pg_description d
			left join pg_attribute a on a.attrelid = d.objoid and a.attnum = d.objsubid
			where d.objoid = $1::oid and d.classoid = 'pg_class'::regclass`, v[0])
		if err != nil {
			return err
		}
		for _, c := range com {
			if c[0] == "0" {
				d.after = append(d.after, "COMMENT ON VIEW "+v[1]+" IS "+quoteLiteral(c[2]))
			} else {
				d.after = append(d.after, "COMMENT ON COLUMN "+v[1]+"."+qi(c[1])+" IS "+quoteLiteral(c[2]))
			}
		}
		sub, err := m.subObjectComments(ctx, tx, v[0], v[1])
		if err != nil {
			return err
		}
		d.after = append(d.after, sub...)
	}
	return nil
}

// depInboundFKs: foreign keys of tables outside the tree (oids) pointing at
// one of its tables are dropped and re-added NOT VALID (validated after the
// commit). Those between tables of the tree are outbound keys of one of them.
// A key of a partitioned table comes with clones on its partitions and on
// the referenced partitions (conparentid <> 0), which follow it.
func (m *migration) depInboundFKs(ctx context.Context, tx pgx.Tx, d *dependents, oids []uint32) error {
	fks, err := m.q(ctx, tx, `select conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated::text
		from pg_constraint where confrelid = any($1::oid[]) and contype = 'f' and conparentid = 0
		  and conrelid <> all($1::oid[]) order by 1, 2`, oids)
	if err != nil {
		return err
	}
	for _, f := range fks {
		d.before = append(d.before, "ALTER TABLE "+f[0]+" DROP CONSTRAINT "+qi(f[1]))
		def := f[2]
		if !strings.HasSuffix(def, " NOT VALID") {
			def += " NOT VALID"
		}
		d.after = append(d.after, "ALTER TABLE "+f[0]+" ADD CONSTRAINT "+qi(f[1])+" "+def)
		if f[3] == "true" && !m.opts.SkipFKValidation {
			d.validate = append(d.validate, fkCheck{Table: f[0], Name: f[1]})
		}
	}
	return nil
}

// depSequences: serial sequences (of a column of any table of the tree)
// are detached before the drop and owned by the new column after; identity
// sequences of the new table continue from the old ones and take their
// names.
func (m *migration) depSequences(ctx context.Context, tx pgx.Tx, d *dependents, rels []treeRel) error {
	p := m.plan
	tbl := ident(p.Schema, p.Table)
	oids := make([]uint32, len(rels))
	names := make(map[string]string, len(rels))
	for i, r := range rels {
		oids[i] = r.oid
		names[fmt.Sprint(r.oid)] = r.ident
	}
	owned, err := m.q(ctx, tx, `select d.objid::regclass::text, a.attname, d.refobjid::text from pg_depend d
		join pg_class s on s.oid = d.objid and s.relkind = 'S'
		join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
		where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = any($1::oid[]) and d.deptype = 'a'
		order by 3, 1`, oids)
	if err != nil {
		return err
	}
	for _, o := range owned {
		d.before = append(d.before, "ALTER SEQUENCE "+o[0]+" OWNED BY NONE")
		d.after = append(d.after, "ALTER SEQUENCE "+o[0]+" OWNED BY "+names[o[2]]+"."+qi(p.renamedTo(o[1])))
	}
	ids, err := m.q(ctx, tx, `select a.attname, pg_get_serial_sequence($2, a.attname),
		coalesce(pg_get_serial_sequence($3, a.attname), '')
		from pg_attribute a where a.attrelid = $1 and a.attidentity <> '' and not a.attisdropped`,
		p.TableID, tbl, m.shadowIdent())
	if err != nil {
		return err
	}
	for _, id := range ids {
		if id[2] == "" {
			continue // the command dropped the identity
		}
		var oldName string
		if err := tx.QueryRow(ctx, "select relname from pg_class where oid = $1::regclass", id[1]).Scan(&oldName); err != nil {
			return fmt.Errorf("read identity sequence %s: %w", id[1], err)
		}
		// The new sequence continues from the old one's position, read by
		// the statement itself under the lock (writers move it until then;
		// the dependents may be read before the lock), before the old one
		// goes with the table; then it takes the old one's name.
		d.before = append(d.before, "SELECT setval("+quoteLiteral(id[2])+"::regclass, s.last_value, s.is_called) FROM "+id[1]+" s")
		d.identity = append(d.identity, "ALTER SEQUENCE "+id[2]+" RENAME TO "+qi(oldName))
	}
	return nil
}

// aclItem renders one item of aclexplode(...) e: grantee (empty for
// PUBLIC), privilege, grantable, grantor.
const aclItem = `case when e.grantee = 0 then '' else pg_get_userbyid(e.grantee)::text end, e.privilege_type,
	e.is_grantable::text, pg_get_userbyid(e.grantor)::text`

// qRelACL: whether a relation has an ACL of its own (NULL is the default),
// then the items of it and of its columns' ACLs (column first, empty for the
// relation itself).
const qRelACL = `select 'set', (relacl is not null)::text, '', '', '' from pg_class where oid = $1::oid
	union all
	select '', ` + aclItem + ` from pg_class c, aclexplode(c.relacl) e where c.oid = $1::oid
	union all
	select a.attname::text, ` + aclItem + ` from pg_attribute a, aclexplode(a.attacl) e
	where a.attrelid = $1::oid and a.attnum > 0 and not a.attisdropped`

// qProcACL: the same for a function or procedure.
const qProcACL = `select 'set', (proacl is not null)::text, '', '', '' from pg_proc where oid = $1::oid
	union all
	select '', ` + aclItem + ` from pg_proc p, aclexplode(p.proacl) e where p.oid = $1::oid`

// aclEntry is one privilege granted on an object or on one of its columns.
type aclEntry struct {
	col       string // empty for the object itself
	grantee   string // empty for PUBLIC
	priv      string
	grantable bool
	grantor   string
}

// readACL runs qRelACL or qProcACL: set says whether the object's own ACL
// is set (not the default), entries are its items and its columns'.
func (m *migration) readACL(ctx context.Context, tx pgx.Tx, query string, oid any) (set bool, entries []aclEntry, err error) {
	rows, err := m.q(ctx, tx, query, oid)
	if err != nil {
		return false, nil, fmt.Errorf("read privileges: %w", err)
	}
	for _, r := range rows {
		if r[0] == "set" {
			set = r[1] == "true"
			continue
		}
		entries = append(entries, aclEntry{col: r[0], grantee: r[1], priv: r[2], grantable: r[3] == "true", grantor: r[4]})
	}
	return set, entries, nil
}

// relGrants re-grants the privileges on a relation and on its columns;
// newCol maps a column to its name on the new relation, false when it is
// gone.
func (m *migration) relGrants(ctx context.Context, tx pgx.Tx, d *dependents, oid any, kind, obj, schema, owner string,
	newCol func(string) (string, bool)) ([]string, error) {
	set, acl, err := m.readACL(ctx, tx, qRelACL, oid)
	if err != nil {
		return nil, err
	}
	return m.grantStmts(ctx, tx, d, kind, obj, schema, owner, set, acl, newCol)
}

// grantStmts turns an ACL into statements: when the object's own ACL is
// set, revoke the defaults; then grant each privilege as its grantor did.
//
// A privilege granted by a role other than the owner (which got it WITH
// GRANT OPTION) is granted again by that role, SET LOCAL ROLE to it and
// back, so the new ACL records the same grantor (a superuser's GRANT is
// recorded as the owner's). A grantor's grants come after the grant that
// gave it the option. A grantor the session cannot act as (not a member of
// it, or without USAGE on the schema, needed to name the object) is
// replaced by the owner, as before, and said so.
func (m *migration) grantStmts(ctx context.Context, tx pgx.Tx, d *dependents, kind, obj, schema, owner string, set bool,
	acl []aclEntry, newCol func(string) (string, bool)) ([]string, error) {
	var out []string
	if set {
		out = append(out, "REVOKE ALL ON "+kind+" "+obj+" FROM PUBLIC", "REVOKE ALL ON "+kind+" "+obj+" FROM "+qi(owner))
	}
	type option struct{ role, priv, col string }
	held := map[option]bool{}
	canGrant := func(e aclEntry) bool {
		return e.grantor == owner || held[option{e.grantor, e.priv, ""}] || (e.col != "" && held[option{e.grantor, e.priv, e.col}])
	}
	pending := acl
	for len(pending) > 0 {
		var next []aclEntry
		for _, e := range pending {
			if !canGrant(e) {
				next = append(next, e)
				continue
			}
			s, err := m.grantAs(ctx, tx, d, kind, obj, schema, owner, e, newCol)
			if err != nil {
				return nil, err
			}
			out = append(out, s...)
			if e.grantable && e.grantee != "" {
				held[option{e.grantee, e.priv, e.col}] = true
			}
		}
		if len(next) == len(pending) {
			// No grantor left holds its option through these grants (it
			// holds it through a role it is a member of): as they come.
			for _, e := range next {
				s, err := m.grantAs(ctx, tx, d, kind, obj, schema, owner, e, newCol)
				if err != nil {
					return nil, err
				}
				out = append(out, s...)
			}
			break
		}
		pending = next
	}
	return out, nil
}

// grantAs renders one ACL entry, as its grantor.
func (m *migration) grantAs(ctx context.Context, tx pgx.Tx, d *dependents, kind, obj, schema, owner string, e aclEntry,
	newCol func(string) (string, bool)) ([]string, error) {
	priv := e.priv
	if e.col != "" {
		c, ok := e.col, true
		if newCol != nil {
			c, ok = newCol(e.col)
		}
		if !ok {
			return nil, nil // the ALTER dropped the column
		}
		priv += " (" + qi(c) + ")"
	}
	grantee := "PUBLIC"
	if e.grantee != "" {
		grantee = qi(e.grantee)
	}
	s := grantStmt(priv, kind, obj, grantee, e.grantable)
	if e.grantor == owner {
		return []string{s}, nil
	}
	ok, err := m.canActAs(ctx, tx, d, e.grantor, schema)
	if err != nil {
		return nil, err
	}
	if !ok {
		d.notes = append(d.notes, fmt.Sprintf("%s on %s to %s was granted by %s; it is granted by the owner %s instead (this session cannot act as %s)",
			priv, obj, grantee, e.grantor, owner, e.grantor))
		return []string{s}, nil
	}
	return []string{"SET LOCAL ROLE " + qi(e.grantor), s, d.restore}, nil
}

// canActAs: the session may SET ROLE to role (membership, or the SET
// option on PostgreSQL 16+), and role may name objects in schema.
func (m *migration) canActAs(ctx context.Context, tx pgx.Tx, d *dependents, role, schema string) (bool, error) {
	key := role + "\x00" + schema
	if ok, seen := d.canGrantAs[key]; seen {
		return ok, nil
	}
	mode := "MEMBER"
	if d.ver >= 160000 {
		mode = "SET"
	}
	var ok bool
	err := tx.QueryRow(ctx, `select pg_has_role(session_user, $1::text::name, $2) and has_schema_privilege($1::text::name, $3::text, 'USAGE')`,
		role, mode, schema).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("check whether to act as grantor %s: %w", role, err)
	}
	d.canGrantAs[key] = ok
	return ok, nil
}

// grantStmt renders one ACL entry; grantee is a quoted role name or PUBLIC.
func grantStmt(priv, kind, obj, grantee string, grantable bool) string {
	s := "GRANT " + priv + " ON " + kind + " " + obj + " TO " + grantee
	if grantable {
		s += " WITH GRANT OPTION"
	}
	return s
}

// nameSet runs a query of one text column and returns its values as a set.
func (m *migration) nameSet(ctx context.Context, tx pgx.Tx, query string, args ...any) (map[string]bool, error) {
	rows, err := m.q(ctx, tx, query, args...)
	if err != nil {
		return nil, err
	}
	set := make(map[string]bool, len(rows))
	for _, r := range rows {
		set[r[0]] = true
	}
	return set, nil
}

// tableComments re-creates the comments on the table and on what the
// switch put back on it: columns, indexes, constraints (a PRIMARY KEY,
// UNIQUE or EXCLUDE constraint bears its index's name, which the switch
// restores), triggers, rules, policies, extended statistics. A comment on
// what the ALTER dropped goes with it.
//
// finalIdx maps the table's index names to their names on the new table;
// readded names the constraints the switch adds back to it.
func (m *migration) tableComments(ctx context.Context, tx pgx.Tx, d *dependents, r treeRel, newCol func(string) (string, bool),
	finalIdx map[string]string, readded []string) ([]string, error) {
	oid := r.oid
	tbl := r.ident
	com, err := m.q(ctx, tx, `select 'TABLE', '', description from pg_description where objoid = $1 and classoid = 'pg_class'::regclass and objsubid = 0
		union all select 'COLUMN', a.attname, d.description from pg_description d join pg_attribute a on a.attrelid = d.objoid and a.attnum = d.objsubid
		  where d.objoid = $1 and d.classoid = 'pg_class'::regclass and d.objsubid > 0
		union all select 'INDEX', c.relname, d.description from pg_index i join pg_class c on c.oid = i.indexrelid
		  join pg_description d on d.objoid = i.indexrelid and d.classoid = 'pg_class'::regclass where i.indrelid = $1
		union all select case when c.contype in ('p', 'u', 'x') then 'KEY' else 'CONSTRAINT' end, c.conname, d.description
		  from pg_constraint c join pg_description d on d.objoid = c.oid and d.classoid = 'pg_constraint'::regclass where c.conrelid = $1
		order by 1, 2`, oid)
	if err != nil {
		return nil, err
	}
	// Constraints other than keys keep their names: those on the shadow now
	// and those the switch adds back.
	cons, err := m.nameSet(ctx, tx, `select conname from pg_constraint where conrelid = $1::regclass`, r.shadow)
	if err != nil {
		return nil, err
	}
	for _, c := range readded {
		cons[c] = true
	}
	var out []string
	for _, c := range com {
		switch c[0] {
		case "TABLE":
			kind := "TABLE "
			if r.foreign {
				kind = "FOREIGN TABLE "
			}
			out = append(out, "COMMENT ON "+kind+tbl+" IS "+quoteLiteral(c[2]))
		case "COLUMN":
			if n, ok := newCol(c[1]); ok {
				out = append(out, "COMMENT ON COLUMN "+tbl+"."+qi(n)+" IS "+quoteLiteral(c[2]))
			}
		case "INDEX":
			if f, ok := finalIdx[c[1]]; ok {
				out = append(out, "COMMENT ON INDEX "+ident(r.schema, f)+" IS "+quoteLiteral(c[2]))
			}
		case "KEY":
			if f, ok := finalIdx[c[1]]; ok {
				out = append(out, "COMMENT ON CONSTRAINT "+qi(f)+" ON "+tbl+" IS "+quoteLiteral(c[2]))
			}
		case "CONSTRAINT":
			if cons[c[1]] {
				out = append(out, "COMMENT ON CONSTRAINT "+qi(c[1])+" ON "+tbl+" IS "+quoteLiteral(c[2]))
			}
		}
	}
	sub, err := m.subObjectComments(ctx, tx, oid, tbl)
	if err != nil {
		return nil, err
	}
	out = append(out, sub...)
	if d.ver >= 130000 { // statistics are re-created from 13 on (see above)
		st, err := m.q(ctx, tx, `select quote_ident(s.stxnamespace::regnamespace::text) || '.' || quote_ident(s.stxname), d.description
			from pg_statistic_ext s join pg_description d on d.objoid = s.oid and d.classoid = 'pg_statistic_ext'::regclass
			where s.stxrelid = $1 order by 1`, oid)
		if err != nil {
			return nil, err
		}
		for _, s := range st {
			out = append(out, "COMMENT ON STATISTICS "+s[0]+" IS "+quoteLiteral(s[1]))
		}
	}
	return out, nil
}

// subObjectComments: the comments on the triggers, rules and policies of
// relation oid (all re-created under their names), as statements on rel.
func (m *migration) subObjectComments(ctx context.Context, tx pgx.Tx, oid any, rel string) ([]string, error) {
	rows, err := m.q(ctx, tx, `select 'TRIGGER', t.tgname, d.description from pg_trigger t
		  join pg_description d on d.objoid = t.oid and d.classoid = 'pg_trigger'::regclass
		  where t.tgrelid = $1::oid and not t.tgisinternal and t.tgname not in ($2, $3)
		union all select 'RULE', r.rulename, d.description from pg_rewrite r
		  join pg_description d on d.objoid = r.oid and d.classoid = 'pg_rewrite'::regclass
		  where r.ev_class = $1::oid and r.rulename <> '_RETURN'
		union all select 'POLICY', p.polname, d.description from pg_policy p
		  join pg_description d on d.objoid = p.oid and d.classoid = 'pg_policy'::regclass
		  where p.polrelid = $1::oid
		order by 1, 2`, oid, triggerName, truncTriggerName)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(rows))
	for _, r := range rows {
		out = append(out, "COMMENT ON "+r[0]+" "+qi(r[1])+" ON "+rel+" IS "+quoteLiteral(r[2]))
	}
	return out, nil
}

func enableStmt(what, tbl, name, state string) string {
	switch state {
	case "D":
		return "ALTER TABLE " + tbl + " DISABLE " + what + " " + qi(name)
	case "R":
		return "ALTER TABLE " + tbl + " ENABLE REPLICA " + what + " " + qi(name)
	case "A":
		return "ALTER TABLE " + tbl + " ENABLE ALWAYS " + what + " " + qi(name)
	}
	return ""
}

func (p *plan) renamedTo(col string) string {
	if n, ok := p.Renames[col]; ok {
		return n
	}
	return col
}
