package replicate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// dependents is what must be taken off the original before it is dropped
// and put back on the new table after the rename, all inside the cut-over
// transaction. It is read under the cut-over's lock, so it is current.
type dependents struct {
	before   []string // run before DROP TABLE
	after    []string // run after the rename
	validate []string // VALIDATE CONSTRAINT, after commit
	identity []identitySeq
}

type identitySeq struct {
	oldSeq, oldName, newSeq string
	last                    int64
	called                  bool
}

// readDependents reads every dependent of the original. tx runs with
// search_path = pg_catalog, so all definitions are schema-qualified.
func (m *migration) readDependents(ctx context.Context, tx pgx.Tx) (*dependents, error) {
	d := &dependents{}
	p := m.plan
	oid := p.TableID
	tbl := ident(p.Schema, p.Table)
	steps := []func(context.Context, pgx.Tx, *dependents) error{
		m.depViewsAndFunctions, m.depInboundFKs, m.depSequences,
	}
	for _, s := range steps {
		if err := s(ctx, tx, d); err != nil {
			return nil, err
		}
	}
	// After the rename: the table's own properties.
	owner := m.t.Owner
	d.after = append(d.after, "ALTER TABLE "+tbl+" OWNER TO "+qi(owner))
	acl, err := m.q(ctx, tx, `select coalesce(relacl::text, '') from pg_class where oid = $1`, oid)
	if err != nil {
		return nil, err
	}
	if acl[0][0] != "" {
		g, err := m.grants(ctx, tx, "TABLE", tbl, owner, `select case when grantee = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(grantee)) end, privilege_type, is_grantable::text
			from aclexplode((select relacl from pg_class where oid = $1))`, oid)
		if err != nil {
			return nil, err
		}
		d.after = append(d.after, g...)
	}
	cols, err := m.q(ctx, tx, `select attname from pg_attribute where attrelid = $1 and attnum > 0 and not attisdropped and attacl is not null`, oid)
	if err != nil {
		return nil, err
	}
	for _, c := range cols {
		nc := p.renamedTo(c[0])
		rows, err := m.q(ctx, tx, `select case when e.grantee = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(e.grantee)) end, e.privilege_type, e.is_grantable::text
			from pg_attribute a, aclexplode(a.attacl) e where a.attrelid = $1 and a.attname = $2`, oid, c[0])
		if err != nil {
			return nil, err
		}
		for _, r := range rows {
			d.after = append(d.after, grantStmt(r[1]+" ("+qi(nc)+")", "TABLE", tbl, r[0], r[2] == "true"))
		}
	}
	// Partitions: owner, grants and comments of each.
	for _, pt := range p.Partitions {
		part := ident(pt.Schema, pt.Name)
		rows, err := m.q(ctx, tx, `select pg_get_userbyid(relowner)::text, coalesce(relacl::text, ''),
			coalesce(obj_description(oid, 'pg_class'), '') from pg_class where oid = $1`, pt.OID)
		if err != nil || len(rows) == 0 {
			return nil, fmt.Errorf("read partition %s: %v", pt.Name, err)
		}
		d.after = append(d.after, "ALTER TABLE "+part+" OWNER TO "+qi(rows[0][0]))
		if rows[0][1] != "" {
			g, err := m.grants(ctx, tx, "TABLE", part, rows[0][0], `select case when grantee = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(grantee)) end, privilege_type, is_grantable::text
				from aclexplode((select relacl from pg_class where oid = $1))`, pt.OID)
			if err != nil {
				return nil, err
			}
			d.after = append(d.after, g...)
		}
		if rows[0][2] != "" {
			d.after = append(d.after, "COMMENT ON TABLE "+part+" IS "+quoteLiteral(rows[0][2]))
		}
	}
	// Comments: table, columns, indexes, constraints.
	com, err := m.q(ctx, tx, `select 'TABLE', '', description from pg_description where objoid = $1 and classoid = 'pg_class'::regclass and objsubid = 0
		union all select 'COLUMN', a.attname, d.description from pg_description d join pg_attribute a on a.attrelid = d.objoid and a.attnum = d.objsubid
		  where d.objoid = $1 and d.classoid = 'pg_class'::regclass and d.objsubid > 0
		union all select 'INDEX', c.relname, d.description from pg_index i join pg_class c on c.oid = i.indexrelid
		  join pg_description d on d.objoid = i.indexrelid and d.classoid = 'pg_class'::regclass where i.indrelid = $1
		union all select 'CONSTRAINT', c.conname, d.description from pg_constraint c join pg_description d on d.objoid = c.oid
		  and d.classoid = 'pg_constraint'::regclass where c.conrelid = $1 and c.contype not in ('p', 'u', 'x')`, oid)
	if err != nil {
		return nil, err
	}
	finalIdx := map[string]string{}
	for _, si := range p.Indexes {
		if si.OrigName != "" {
			finalIdx[si.OrigName] = si.Final
		}
	}
	for _, c := range com {
		switch c[0] {
		case "TABLE":
			d.after = append(d.after, "COMMENT ON TABLE "+tbl+" IS "+quoteLiteral(c[2]))
		case "COLUMN":
			d.after = append(d.after, "COMMENT ON COLUMN "+tbl+"."+qi(p.renamedTo(c[1]))+" IS "+quoteLiteral(c[2]))
		case "INDEX":
			if f, ok := finalIdx[c[1]]; ok {
				d.after = append(d.after, "COMMENT ON INDEX "+ident(p.Schema, f)+" IS "+quoteLiteral(c[2]))
			}
		case "CONSTRAINT":
			d.after = append(d.after, "COMMENT ON CONSTRAINT "+qi(c[1])+" ON "+tbl+" IS "+quoteLiteral(c[2]))
		}
	}
	// Constraints of the shadow's own that were off during the load.
	for _, c := range p.Checks {
		d.after = append(d.after, "ALTER TABLE "+tbl+" ADD CONSTRAINT "+qi(c.Name)+" "+c.Def)
	}
	for _, f := range p.FKs {
		def := f.Def
		// A NOT ENFORCED foreign key (PostgreSQL 18+) is never validated.
		if !strings.HasSuffix(def, " NOT VALID") && !strings.HasSuffix(def, " NOT ENFORCED") {
			def += " NOT VALID"
			if !m.opts.SkipFKValidation {
				d.validate = append(d.validate, "ALTER TABLE "+tbl+" VALIDATE CONSTRAINT "+qi(f.Name))
			}
		}
		d.after = append(d.after, "ALTER TABLE "+tbl+" ADD CONSTRAINT "+qi(f.Name)+" "+def)
	}
	// Triggers (not ours), with their enabled state, and rules.
	// A partition's clones of its parent's triggers come back with ATTACH
	// PARTITION (partial mode); only their enabled state is restored.
	trg, err := m.q(ctx, tx, `select tgname, pg_get_triggerdef(oid), tgenabled::text, (tgparentid <> 0)::text from pg_trigger
		where tgrelid = $1 and not tgisinternal and tgname not in ($2, $3) order by tgname`, oid, triggerName, truncTriggerName)
	if err != nil {
		return nil, err
	}
	for _, t := range trg {
		cloned := t[3] == "true"
		if !cloned {
			d.after = append(d.after, t[1])
		}
		if s := enableStmt("TRIGGER", tbl, t[0], t[2]); s != "" {
			d.after = append(d.after, s)
		} else if cloned {
			d.after = append(d.after, "ALTER TABLE "+tbl+" ENABLE TRIGGER "+qi(t[0]))
		}
	}
	rules, err := m.q(ctx, tx, `select rulename, pg_get_ruledef(oid), ev_enabled::text from pg_rewrite
		where ev_class = $1 and rulename <> '_RETURN' order by rulename`, oid)
	if err != nil {
		return nil, err
	}
	for _, r := range rules {
		d.after = append(d.after, strings.TrimSuffix(r[1], ";"))
		if s := enableStmt("RULE", tbl, r[0], r[2]); s != "" {
			d.after = append(d.after, s)
		}
	}
	// Row-level security policies.
	pols, err := m.q(ctx, tx, `select polname, polcmd::text, polpermissive::text,
		coalesce((select string_agg(case when r = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(r)) end, ', ')
		          from unnest(polroles) r), 'PUBLIC'),
		coalesce(pg_get_expr(polqual, polrelid), ''), coalesce(pg_get_expr(polwithcheck, polrelid), '')
		from pg_policy where polrelid = $1 order by polname`, oid)
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
		d.after = append(d.after, s)
	}
	// Publication membership, with row filter and column list.
	var ver int
	if err := tx.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&ver); err != nil {
		return nil, err
	}
	pubQ := `select p.pubname, '', '' from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid where pr.prrelid = $1`
	if ver >= 150000 {
		pubQ = `select p.pubname, coalesce(pg_get_expr(pr.prqual, pr.prrelid), ''),
			coalesce((select string_agg(quote_ident(a.attname), ', ' order by a.attnum) from pg_attribute a
			          where a.attrelid = pr.prrelid and a.attnum = any(pr.prattrs)), '')
			from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid where pr.prrelid = $1`
	}
	pubs, err := m.q(ctx, tx, pubQ, oid)
	if err != nil {
		return nil, err
	}
	for _, pb := range pubs {
		s := "ALTER PUBLICATION " + qi(pb[0]) + " ADD TABLE " + tbl
		if pb[2] != "" {
			s += " (" + pb[2] + ")"
		}
		if pb[1] != "" {
			s += " WHERE (" + pb[1] + ")"
		}
		d.after = append(d.after, s)
	}
	// Extended statistics go with the table; re-create them
	// (pg_get_statisticsobjdef is 10+, stxstattarget 13+).
	if ver >= 130000 {
		st, err := m.q(ctx, tx, `select pg_get_statisticsobjdef(oid), quote_ident(stxnamespace::regnamespace::text) || '.' || quote_ident(stxname),
			coalesce(stxstattarget, -1)::text from pg_statistic_ext where stxrelid = $1`, oid)
		if err != nil {
			return nil, err
		}
		for _, s := range st {
			d.after = append(d.after, s[0])
			if s[2] != "-1" {
				d.after = append(d.after, "ALTER STATISTICS "+s[1]+" SET STATISTICS "+s[2])
			}
		}
	}
	return d, nil
}

// depViewsAndFunctions: views (nested) and functions using the rowtype are
// dropped and re-created, with owner, options, grants and comments.
func (m *migration) depViewsAndFunctions(ctx context.Context, tx pgx.Tx, d *dependents) error {
	oid := m.plan.TableID
	views, err := m.q(ctx, tx, `with recursive deps(oid, depth) as (
		  select r.ev_class, 1 from pg_depend d join pg_rewrite r on r.oid = d.objid
		  where d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
		    and d.refobjid = $1 and r.ev_class <> $1
		  union all
		  select r.ev_class, deps.depth + 1 from deps join pg_depend d on d.refobjid = deps.oid
		    and d.classid = 'pg_rewrite'::regclass and d.refclassid = 'pg_class'::regclass
		  join pg_rewrite r on r.oid = d.objid where r.ev_class <> deps.oid)
		select c.oid::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname), pg_get_viewdef(c.oid),
		       coalesce(array_to_string(c.reloptions, ', '), ''), pg_get_userbyid(c.relowner), coalesce(c.relacl::text, ''),
		       deps.depth::text
		from (select oid, max(depth) as depth from deps group by oid) deps
		join pg_class c on c.oid = deps.oid join pg_namespace n on n.oid = c.relnamespace
		order by deps.depth, c.oid`, oid)
	if err != nil {
		return err
	}
	for i := len(views) - 1; i >= 0; i-- {
		d.before = append(d.before, "DROP VIEW "+views[i][1])
	}
	funcs, err := m.q(ctx, tx, `select distinct p.oid::regprocedure::text, pg_get_functiondef(p.oid), pg_get_userbyid(p.proowner),
		coalesce(p.proacl::text, ''), p.prokind::text, p.oid::text
		from pg_depend d join pg_proc p on p.oid = d.objid
		where d.classid = 'pg_proc'::regclass and d.deptype = 'n' and
		  ((d.refclassid = 'pg_type'::regclass and d.refobjid = (select reltype from pg_class where oid = $1))
		   or (d.refclassid = 'pg_class'::regclass and d.refobjid = $1))`, oid)
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
		if f[3] != "" {
			g, err := m.grants(ctx, tx, kind, f[0], f[2], `select case when grantee = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(grantee)) end, privilege_type, is_grantable::text
				from aclexplode((select proacl from pg_proc where oid = $1))`, f[5])
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
		if v[5] != "" {
			g, err := m.grants(ctx, tx, "TABLE", v[1], v[4], `select case when grantee = 0 then 'PUBLIC' else quote_ident(pg_get_userbyid(grantee)) end, privilege_type, is_grantable::text
				from aclexplode((select relacl from pg_class where oid = $1::oid))`, v[0])
			if err != nil {
				return err
			}
			d.after = append(d.after, g...)
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
		trg, err := m.q(ctx, tx, `select pg_get_triggerdef(oid) from pg_trigger where tgrelid = $1::oid and not tgisinternal`, v[0])
		if err != nil {
			return err
		}
		for _, t := range trg {
			d.after = append(d.after, t[0])
		}
	}
	return nil
}

// depInboundFKs: foreign keys of other tables pointing at the original are
// dropped and re-added NOT VALID (validated after the commit).
func (m *migration) depInboundFKs(ctx context.Context, tx pgx.Tx, d *dependents) error {
	fks, err := m.q(ctx, tx, `select conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated::text
		from pg_constraint where confrelid = $1 and contype = 'f' and conrelid <> $1 order by 1, 2`, m.plan.TableID)
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
			d.validate = append(d.validate, "ALTER TABLE "+f[0]+" VALIDATE CONSTRAINT "+qi(f[1]))
		}
	}
	return nil
}

// depSequences: serial sequences are detached before the drop and owned by
// the new column after; identity sequences of the new table continue from
// the old ones and take their names.
func (m *migration) depSequences(ctx context.Context, tx pgx.Tx, d *dependents) error {
	p := m.plan
	tbl := ident(p.Schema, p.Table)
	owned, err := m.q(ctx, tx, `select d.objid::regclass::text, a.attname from pg_depend d
		join pg_class s on s.oid = d.objid and s.relkind = 'S'
		join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
		where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = $1 and d.deptype = 'a'`, p.TableID)
	if err != nil {
		return err
	}
	for _, o := range owned {
		d.before = append(d.before, "ALTER SEQUENCE "+o[0]+" OWNED BY NONE")
		d.after = append(d.after, "ALTER SEQUENCE "+o[0]+" OWNED BY "+tbl+"."+qi(p.renamedTo(o[1])))
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
		is := identitySeq{oldSeq: id[1], newSeq: id[2]}
		if err := tx.QueryRow(ctx, "select last_value, is_called from "+id[1]).Scan(&is.last, &is.called); err != nil {
			return fmt.Errorf("read identity sequence %s: %w", id[1], err)
		}
		if err := tx.QueryRow(ctx, "select relname from pg_class where oid = $1::regclass", id[1]).Scan(&is.oldName); err != nil {
			return err
		}
		d.identity = append(d.identity, is)
	}
	return nil
}

// grants turns an ACL into statements: revoke the defaults, grant what was there.
func (m *migration) grants(ctx context.Context, tx pgx.Tx, kind, obj, owner, aclQuery string, arg any) ([]string, error) {
	rows, err := m.q(ctx, tx, aclQuery, arg)
	if err != nil {
		return nil, err
	}
	out := []string{"REVOKE ALL ON " + kind + " " + obj + " FROM PUBLIC", "REVOKE ALL ON " + kind + " " + obj + " FROM " + qi(owner)}
	for _, r := range rows {
		out = append(out, grantStmt(r[1], kind, obj, r[0], r[2] == "true"))
	}
	return out, nil
}

// grantStmt renders one ACL entry; grantee is a quoted role name or PUBLIC.
func grantStmt(priv, kind, obj, grantee string, grantable bool) string {
	s := "GRANT " + priv + " ON " + kind + " " + obj + " TO " + grantee
	if grantable {
		s += " WITH GRANT OPTION"
	}
	return s
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
