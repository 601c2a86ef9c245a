package testpg

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// Querier is what Schema reads through: a *pgx.Conn, a *pgxpool.Pool or a
// pgx.Tx (so a test can snapshot an in-place ALTER inside a transaction it
// then rolls back).
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Schema returns a normalised snapshot of every user object of the database
// q is connected to, read from the catalog alone (no pg_dump, whose client
// must be at least as new as the server).
//
// The snapshot is one line per property, sorted, each line self-contained
// ("table public.orders column n: type integer not null"), free of OIDs and
// of physical state (relfilenode, attnum, statistics, last_value), so two
// snapshots differ exactly where a property differs. Schemas pg_catalog,
// information_schema, pg_toast*, pg_temp* and tat (pg_tat's own) and
// extension members are left out.
//
// Catalog differences between PostgreSQL 13 and 18 are folded so that one
// schema gives the same kind of output everywhere: a default statistics
// target is left out whether it reads -1 (before 17) or NULL (17+);
// compression (14+), publication row filters, column lists and schemas
// (15+), NOT NULL constraints (contype 'n', 18+) and NOT ENFORCED (18+)
// appear only where the server has them.
func Schema(t testing.TB, q Querier) string {
	t.Helper()
	lines, err := SchemaLines(context.Background(), q)
	if err != nil {
		t.Fatalf("testpg: schema snapshot: %v", err)
	}
	return strings.Join(lines, "\n") + "\n"
}

// userNS is the condition on namespace n for user objects.
const userNS = `n.nspname not in ('pg_catalog', 'information_schema', 'tat')
  and n.nspname not like 'pg\_toast%' and n.nspname not like 'pg\_temp\_%'`

// notExt is the condition that object oid (of catalog cls) is no extension's member.
const notExt = `not exists (select 1 from pg_depend e where e.classid = %s::regclass and e.objid = %s and e.deptype = 'e')`

// sortedArr renders a text array (reloptions, acl items) sorted, so that
// the order the items were set in does not matter; NULL stays NULL.
func sortedArr(expr string) string {
	return `(select string_agg(x::text, ', ' order by x::text) from unnest(` + expr + `) x)`
}

// SchemaLines is Schema without the testing.TB.
func SchemaLines(ctx context.Context, q Querier) ([]string, error) {
	var ver int
	rows, err := q.Query(ctx, "select current_setting('server_version_num')::int")
	if err != nil {
		return nil, err
	}
	if _, err := pgx.ForEachRow(rows, []any{&ver}, func() error { return nil }); err != nil {
		return nil, err
	}
	var out []string
	for _, sql := range schemaQueries(ver) {
		rows, err := q.Query(ctx, sql)
		if err != nil {
			return nil, err
		}
		var line *string
		_, err = pgx.ForEachRow(rows, []any{&line}, func() error {
			if line != nil {
				// Definitions span lines; a snapshot line must not.
				out = append(out, strings.ReplaceAll(*line, "\n", `\n`))
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	sort.Strings(out)
	return out, nil
}

func schemaQueries(ver int) []string {
	cls := func(alias string) string { return fmt.Sprintf(notExt, "'pg_class'", alias+".oid") }
	compression := "''"
	if ver >= 140000 {
		compression = "a.attcompression::text"
	}
	virtual := ""
	if ver >= 180000 {
		virtual = " when 'v' then ' virtual'"
	}
	enforced := "''"
	if ver >= 180000 {
		enforced = "case when not con.conenforced then ' not enforced' else '' end"
	}
	// relations: one line per property.
	relations := `
with r as (
  select c.oid, format('%s %I.%I', case c.relkind when 'r' then 'table' when 'p' then 'partitioned table'
      when 'v' then 'view' when 'm' then 'materialized view' when 'S' then 'sequence'
      when 'f' then 'foreign table' when 'c' then 'composite type' end, n.nspname, c.relname) as name
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
  where c.relkind in ('r', 'p', 'v', 'm', 'S', 'f', 'c') and ` + userNS + ` and ` + cls("c") + `)
select format('%s %s: %s', r.name, x.k, x.v)
from r join pg_class c on c.oid = r.oid
left join pg_am am on am.oid = c.relam
left join pg_tablespace ts on ts.oid = c.reltablespace
left join pg_class toast on toast.oid = c.reltoastrelid
left join pg_tablespace tts on tts.oid = toast.reltablespace
cross join lateral (values
  ('owner', case when c.relkind <> 'c' then pg_get_userbyid(c.relowner)::text end),
  ('persistence', case c.relpersistence when 'p' then 'permanent' when 'u' then 'unlogged' when 't' then 'temporary' end),
  ('access method', am.amname::text),
  ('tablespace', case when c.relkind in ('r', 'p', 'm') then coalesce(ts.spcname::text, 'default') end),
  ('toast tablespace', case when toast.oid is not null then coalesce(tts.spcname::text, 'default') end),
  ('options', ` + sortedArr("c.reloptions") + `),
  ('toast options', ` + sortedArr("toast.reloptions") + `),
  -- NULL (never granted) and the explicit default read the same.
  ('acl', case when c.relkind <> 'c' then coalesce(` + sortedArr(`coalesce(c.relacl, acldefault((case c.relkind when 'S' then 's' else 'r' end)::"char", c.relowner))`) + `, '(none)') end),
  ('row level security', case when c.relkind in ('r', 'p') then c.relrowsecurity::text end),
  ('force row level security', case when c.relkind in ('r', 'p') then c.relforcerowsecurity::text end),
  ('replica identity', case when c.relkind in ('r', 'p', 'm') then case c.relreplident when 'd' then 'default' when 'n' then 'nothing'
     when 'f' then 'full' when 'i' then 'using index ' || coalesce((select quote_ident(ic.relname) from pg_index i
       join pg_class ic on ic.oid = i.indexrelid where i.indrelid = c.oid and i.indisreplident), '?') end end),
  ('clustered on', (select string_agg(quote_ident(ic.relname), ', ') from pg_index i join pg_class ic on ic.oid = i.indexrelid
     where i.indrelid = c.oid and i.indisclustered)),
  ('partition key', case when c.relkind = 'p' then pg_get_partkeydef(c.oid) end),
  ('partition of', case when c.relispartition then (select h.inhparent::regclass::text from pg_inherits h where h.inhrelid = c.oid)
     || ' ' || pg_get_expr(c.relpartbound, c.oid) end),
  ('inherits', case when not c.relispartition then (select string_agg(h.inhparent::regclass::text, ', ' order by h.inhseqno)
     from pg_inherits h where h.inhrelid = c.oid) end),
  ('definition', case when c.relkind in ('v', 'm') then pg_get_viewdef(c.oid) end),
  ('populated', case when c.relkind = 'm' then c.relispopulated::text end),
  ('foreign server', (select s.srvname::text || coalesce(' options ' || ` + sortedArr("ft.ftoptions") + `, '')
     from pg_foreign_table ft join pg_foreign_server s on s.oid = ft.ftserver where ft.ftrelid = c.oid)),
  ('sequence', (select format('type %s increment %s min %s max %s start %s cache %s cycle %s', format_type(s.seqtypid, null),
     s.seqincrement, s.seqmin, s.seqmax, s.seqstart, s.seqcache, s.seqcycle) from pg_sequence s where s.seqrelid = c.oid)),
  ('owned by', (select format('%s.%I %s', d.refobjid::regclass, a.attname, case d.deptype when 'a' then 'auto' else 'identity' end)
     from pg_depend d join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
     where c.relkind = 'S' and d.classid = 'pg_class'::regclass and d.objid = c.oid and d.refclassid = 'pg_class'::regclass
       and d.deptype in ('a', 'i'))),
  ('comment', quote_literal(obj_description(c.oid, 'pg_class')))
) x(k, v)
where x.v is not null`

	// The order of the columns, by name, since attnums are physical
	// (dropped columns leave gaps that a rewrite closes).
	columnOrder := `
select format('%s %I.%I columns: %s', case c.relkind when 'r' then 'table' when 'p' then 'partitioned table'
      when 'v' then 'view' when 'm' then 'materialized view' when 'f' then 'foreign table' when 'c' then 'composite type' end,
    n.nspname, c.relname, string_agg(quote_ident(a.attname), ', ' order by a.attnum))
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
where c.relkind in ('r', 'p', 'v', 'm', 'f', 'c') and ` + userNS + ` and ` + cls("c") + `
group by c.relkind, n.nspname, c.relname`

	columns := `
select format('%s %I.%I column %I: %s', case c.relkind when 'r' then 'table' when 'p' then 'partitioned table'
      when 'v' then 'view' when 'm' then 'materialized view' when 'f' then 'foreign table' when 'c' then 'composite type' end,
    n.nspname, c.relname, a.attname, concat_ws(' ',
  'type ' || format_type(a.atttypid, a.atttypmod),
  case when a.attcollation <> 0 and a.attcollation <> ty.typcollation then 'collate ' || a.attcollation::regcollation::text end,
  case when a.attnotnull then 'not null' end,
  case when a.attgenerated = '' then 'default ' || pg_get_expr(d.adbin, d.adrelid) end,
  case when a.attgenerated <> '' then 'generated always as ' || pg_get_expr(d.adbin, d.adrelid) ||
    case a.attgenerated when 's' then ' stored'` + virtual + ` end end,
  case a.attidentity when 'a' then 'identity always' when 'd' then 'identity by default' end,
  case when a.attstorage <> ty.typstorage then 'storage ' || a.attstorage::text end,
  case when ` + compression + ` <> '' then 'compression ' || ` + compression + ` end,
  -- -1 before 17 and NULL since 17 both mean the default target.
  'statistics ' || nullif(a.attstattarget::int, -1),
  'options ' || ` + sortedArr("a.attoptions") + `,
  'fdw options ' || ` + sortedArr("a.attfdwoptions") + `,
  'acl ' || ` + sortedArr("a.attacl") + `,
  case when a.attinhcount > 0 then format('inherited %s local %s', a.attinhcount, a.attislocal) end,
  'comment ' || quote_literal(col_description(c.oid, a.attnum))))
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
join pg_type ty on ty.oid = a.atttypid
left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
where c.relkind in ('r', 'p', 'v', 'm', 'f', 'c') and ` + userNS + ` and ` + cls("c")

	indexes := `
select format('index %I.%I on %s: %s', n.nspname, ic.relname, i.indrelid::regclass, concat_ws(' ',
  pg_get_indexdef(i.indexrelid),
  'tablespace ' || coalesce(ts.spcname::text, 'default'),
  case when not i.indisvalid then 'invalid' end,
  case when not i.indisready then 'not ready' end,
  case when i.indisclustered then 'clustered' end,
  case when i.indisreplident then 'replica identity' end,
  'attached to ' || (select h.inhparent::regclass::text from pg_inherits h where h.inhrelid = i.indexrelid),
  'comment ' || quote_literal(obj_description(i.indexrelid, 'pg_class'))))
from pg_index i join pg_class ic on ic.oid = i.indexrelid join pg_namespace n on n.oid = ic.relnamespace
left join pg_tablespace ts on ts.oid = ic.reltablespace
where ` + userNS + ` and ` + cls("ic")

	constraints := `
select format('constraint %I on %s: %s', con.conname,
  case when con.contypid <> 0 then 'domain ' || format('%I.%I', n.nspname, ty.typname) else con.conrelid::regclass::text end,
  concat_ws(' ', pg_get_constraintdef(con.oid) || ` + enforced + `,
  case when con.condeferrable then 'deferrable' end,
  case when con.condeferred then 'initially deferred' end,
  case when not con.convalidated then 'not validated' end,
  -- meaningless for a PRIMARY KEY or UNIQUE, and true when a partition's
  -- was attached rather than created through its parent (as pg_dump restores)
  case when con.connoinherit and con.contype not in ('p', 'u') then 'no inherit' end,
  case when con.coninhcount > 0 then format('inherited %s local %s', con.coninhcount, con.conislocal) end,
  'comment ' || quote_literal(obj_description(con.oid, 'pg_constraint'))))
from pg_constraint con
left join pg_class c on c.oid = con.conrelid
left join pg_type ty on ty.oid = con.contypid
join pg_namespace n on n.oid = coalesce(c.relnamespace, ty.typnamespace)
where ` + userNS

	// Internal triggers (foreign keys') are the constraints'; cloned
	// partition triggers are listed on every partition.
	triggers := `
select format('trigger %I on %s: %s enabled %s%s', t.tgname, t.tgrelid::regclass, pg_get_triggerdef(t.oid),
  t.tgenabled, coalesce(' comment ' || quote_literal(obj_description(t.oid, 'pg_trigger')), ''))
from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
where (not t.tgisinternal or (t.tgparentid <> 0 and t.tgconstraint = 0)) and ` + userNS

	rules := `
select format('rule %I on %s: %s enabled %s%s', r.rulename, r.ev_class::regclass, pg_get_ruledef(r.oid),
  r.ev_enabled, coalesce(' comment ' || quote_literal(obj_description(r.oid, 'pg_rewrite')), ''))
from pg_rewrite r join pg_class c on c.oid = r.ev_class join pg_namespace n on n.oid = c.relnamespace
where r.rulename <> '_RETURN' and ` + userNS

	policies := `
select format('policy %I on %s: %s for %s to %s using %s with check %s%s', p.polname, p.polrelid::regclass,
  case when p.polpermissive then 'permissive' else 'restrictive' end,
  case p.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update' when 'd' then 'delete' else 'all' end,
  (select string_agg(case when ro = 0 then 'public' else quote_ident(pg_get_userbyid(ro)) end, ', ' order by 1)
     from unnest(p.polroles) ro),
  coalesce(pg_get_expr(p.polqual, p.polrelid), '-'), coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '-'),
  coalesce(' comment ' || quote_literal(obj_description(p.oid, 'pg_policy')), ''))
from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
where ` + userNS

	functions := `
select format('%s %s %s: %s', case p.prokind when 'p' then 'procedure' else 'function' end, p.oid::regprocedure, x.k, x.v)
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
cross join lateral (values
  ('definition', pg_get_functiondef(p.oid)),
  ('owner', pg_get_userbyid(p.proowner)::text),
  ('acl', coalesce(` + sortedArr(`coalesce(p.proacl, acldefault('f'::"char", p.proowner))`) + `, '(none)')),
  ('comment', quote_literal(obj_description(p.oid, 'pg_proc')))) x(k, v)
where p.prokind in ('f', 'p', 'w') and x.v is not null and ` + userNS + ` and ` + fmt.Sprintf(notExt, "'pg_proc'", "p.oid")

	// Types of their own: domains, enums, ranges, standalone composites
	// (their attributes are listed with the relations).
	types := `
select format('%s %s: %s', case t.typtype when 'd' then 'domain' when 'e' then 'enum' when 'r' then 'range'
    when 'c' then 'composite type' when 'm' then 'multirange' else 'type' end, format('%I.%I', n.nspname, t.typname), concat_ws(' ',
  'owner ' || pg_get_userbyid(t.typowner),
  case when t.typtype = 'd' then 'base ' || format_type(t.typbasetype, t.typtypmod) end,
  case when t.typtype = 'd' and t.typcollation <> 0 and t.typcollation <> bt.typcollation then 'collate ' || t.typcollation::regcollation::text end,
  case when t.typnotnull then 'not null' end,
  'default ' || t.typdefault,
  'labels ' || (select string_agg(quote_literal(e.enumlabel), ', ' order by e.enumsortorder) from pg_enum e where e.enumtypid = t.oid),
  'subtype ' || (select format_type(rg.rngsubtype, null) from pg_range rg where rg.rngtypid = t.oid),
  'acl ' || ` + sortedArr("t.typacl") + `,
  'comment ' || quote_literal(obj_description(t.oid, 'pg_type'))))
from pg_type t join pg_namespace n on n.oid = t.typnamespace
left join pg_type bt on bt.oid = t.typbasetype
left join pg_class c on c.oid = t.typrelid
where t.typtype in ('d', 'e', 'r', 'c', 'm') and (t.typrelid = 0 or c.relkind = 'c') and ` + userNS + ` and ` + fmt.Sprintf(notExt, "'pg_type'", "t.oid")

	statistics := `
select format('statistics %I.%I on %s: %s', n.nspname, s.stxname, s.stxrelid::regclass, concat_ws(' ',
  pg_get_statisticsobjdef(s.oid),
  'owner ' || pg_get_userbyid(s.stxowner),
  'target ' || nullif(s.stxstattarget::int, -1),
  'comment ' || quote_literal(obj_description(s.oid, 'pg_statistic_ext'))))
from pg_statistic_ext s join pg_namespace n on n.oid = s.stxnamespace
where ` + userNS

	publications := `
select format('publication %I: owner %s all tables %s insert %s update %s delete %s truncate %s via root %s',
  p.pubname, pg_get_userbyid(p.pubowner), p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.pubviaroot)
from pg_publication p`
	pubFilter, pubCols := "null::text", "null::text"
	if ver >= 150000 {
		pubFilter = "pg_get_expr(pr.prqual, pr.prrelid)"
		pubCols = `(select string_agg(quote_ident(a.attname), ', ' order by a.attname) from pg_attribute a
      where a.attrelid = pr.prrelid and a.attnum = any(pr.prattrs))`
	}
	publicationTables := `
select format('publication %I table %s%s%s', p.pubname, pr.prrelid::regclass,
  coalesce(' where ' || ` + pubFilter + `, ''), coalesce(' columns (' || ` + pubCols + ` || ')', ''))
from pg_publication_rel pr join pg_publication p on p.oid = pr.prpubid`
	qs := []string{relations, columnOrder, columns, indexes, constraints, triggers, rules, policies, functions,
		types, statistics, publications, publicationTables,
		`select format('extension %I version %s schema %I', e.extname, e.extversion, n.nspname)
		 from pg_extension e join pg_namespace n on n.oid = e.extnamespace`,
	}
	if ver >= 150000 {
		qs = append(qs, `select format('publication %I schema %I', p.pubname, n.nspname)
			from pg_publication_namespace pn join pg_publication p on p.oid = pn.pnpubid join pg_namespace n on n.oid = pn.pnnspid`)
	}
	return qs
}
