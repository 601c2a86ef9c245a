package replicate

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// The switch's dependents are read before its lock, and only proven
// unchanged under it.
//
// Reading them (readDependents, swapMatViews, partitionIndexNames) takes a
// few dozen catalog queries, and more for a tree whose members have objects
// of their own: tens to hundreds of milliseconds during which every reader
// and writer of the table would wait. So each lock attempt reads them right
// before its LOCK, in a transaction of its own, after taking
// qDependentsFingerprint; under the lock the same fingerprint is taken again
// (in the round trip of the table's own fingerprint). Equal, the read stands
// for one under the lock; different (DDL in between, rare), the switch reads
// them again under the lock, as it always did.
//
// The fingerprint is taken before the read: a change committed between the
// two shows in the fingerprint under the lock, never in neither.

// qDependentsFingerprint digests every catalog row the read of the
// dependents can depend on, by the rows' xmin (a new version of a row, for
// any change but the in-place statistics updates of VACUUM and ANALYZE,
// which the read does not look at) and, where rows come and go, by their
// identity:
//
//   - objs: the tables of the tree ($1) and their shadows ($2), and
//     everything depending on them, transitively (pg_depend, and a view's
//     rule to the view): what DROP ... CASCADE would drop. That is every
//     view, materialized view, function over the row type, trigger, rule,
//     policy, constraint, inbound foreign key, index, sequence, default,
//     statistics object and publication membership the read turns into
//     statements;
//   - the pg_depend rows from and to them (a dependent added or removed),
//     and the catalog rows of what they reference (the names that
//     pg_get_viewdef, pg_get_triggerdef, pg_get_constraintdef, ... print:
//     tables, columns, functions, types, operators, collations,
//     publications);
//   - the rows describing them: pg_class with its ACL, owner, options and
//     flags; every pg_attribute row of a relation among them (names,
//     column ACLs, identity); pg_index (replica identity, CLUSTER ON);
//     pg_inherits (partitions, attached partition indexes); comments;
//   - every schema (names; USAGE, which decides whether a grantor can be
//     acted as), tablespace (names), role (names, superuser, inherit) and
//     role membership (pg_has_role), and the session's role.
const qDependentsFingerprint = `
with recursive objs(classid, objid) as (
    select 'pg_class'::regclass::oid, r.oid
    from unnest($1::oid[] || array(select to_regclass(s)::oid from unnest($2::text[]) s where to_regclass(s) is not null)) r(oid)
  union
    select x.classid, x.objid from objs o cross join lateral (
      select d.classid, d.objid from pg_depend d where d.refclassid = o.classid and d.refobjid = o.objid
      union all
      select 'pg_class'::regclass::oid, rw.ev_class from pg_rewrite rw where o.classid = 'pg_rewrite'::regclass and rw.oid = o.objid
    ) x
),
deps as (
  select d.* from pg_depend d join objs o on d.classid = o.classid and d.objid = o.objid
  union
  select d.* from pg_depend d join objs o on d.refclassid = o.classid and d.refobjid = o.objid
),
refs(classid, objid) as (
  select classid, objid from objs
  union
  select refclassid, refobjid from deps
),
rels as (select objid as oid from refs where classid = 'pg_class'::regclass),
rows(k) as (
  select 'd ' || concat_ws(' ', classid, objid, objsubid, refclassid, refobjid, refobjsubid, deptype) from deps
  union all select 'c ' || c.oid || ' ' || c.xmin from pg_class c where c.oid in (select oid from rels)
  union all select 'a ' || a.attrelid || ' ' || a.attnum || ' ' || a.xmin from pg_attribute a where a.attrelid in (select oid from rels)
  union all select 'i ' || i.indexrelid || ' ' || i.xmin from pg_index i where i.indexrelid in (select oid from rels)
  union all select 'h ' || h.inhrelid || ' ' || h.inhparent || ' ' || h.xmin from pg_inherits h
    where h.inhrelid in (select oid from rels) or h.inhparent in (select oid from rels)
  union all select 'p ' || x.oid || ' ' || x.xmin from pg_proc x where x.oid in (select objid from refs where classid = 'pg_proc'::regclass)
  union all select 't ' || x.oid || ' ' || x.xmin from pg_type x where x.oid in (select objid from refs where classid = 'pg_type'::regclass)
  union all select 'o ' || x.oid || ' ' || x.xmin from pg_operator x where x.oid in (select objid from refs where classid = 'pg_operator'::regclass)
  union all select 'l ' || x.oid || ' ' || x.xmin from pg_collation x where x.oid in (select objid from refs where classid = 'pg_collation'::regclass)
  union all select 'k ' || x.oid || ' ' || x.xmin from pg_constraint x where x.oid in (select objid from refs where classid = 'pg_constraint'::regclass)
  union all select 'r ' || x.oid || ' ' || x.xmin from pg_rewrite x where x.oid in (select objid from refs where classid = 'pg_rewrite'::regclass)
  union all select 'g ' || x.oid || ' ' || x.xmin from pg_trigger x where x.oid in (select objid from refs where classid = 'pg_trigger'::regclass)
  union all select 'y ' || x.oid || ' ' || x.xmin from pg_policy x where x.oid in (select objid from refs where classid = 'pg_policy'::regclass)
  union all select 'f ' || x.oid || ' ' || x.xmin from pg_attrdef x where x.oid in (select objid from refs where classid = 'pg_attrdef'::regclass)
  union all select 's ' || x.oid || ' ' || x.xmin from pg_statistic_ext x where x.oid in (select objid from refs where classid = 'pg_statistic_ext'::regclass)
  union all select 'u ' || x.oid || ' ' || x.xmin from pg_publication_rel x where x.oid in (select objid from refs where classid = 'pg_publication_rel'::regclass)
  union all select 'b ' || x.oid || ' ' || x.xmin from pg_publication x where x.oid in (select objid from refs where classid = 'pg_publication'::regclass)
  union all select 'e ' || x.classoid || ' ' || x.objoid || ' ' || x.objsubid || ' ' || x.xmin from pg_description x
    where (x.classoid, x.objoid) in (select classid, objid from refs)
  union all select 'n ' || x.oid || ' ' || x.xmin from pg_namespace x
  union all select 'T ' || x.oid || ' ' || x.xmin from pg_tablespace x
  union all select 'R ' || concat_ws(' ', x.oid, x.rolname, x.rolsuper, x.rolinherit) from pg_roles x
  union all select 'M ' || x::text from pg_auth_members x
  union all select 'S ' || current_setting('role')
)
select md5(string_agg(k, E'\n' order by k)) from rows`

// noJIT: the fingerprint's estimated cost (many catalogs, a recursive
// closure) can pass jit_above_cost, and compiling it takes far longer (tens
// to hundreds of milliseconds) than running it, under the lock.
const noJIT = "SET LOCAL jit = off"

// dependentsFingerprint runs qDependentsFingerprint for the tree.
func (m *migration) dependentsFingerprint(ctx context.Context, q querier) (string, error) {
	var fp string
	if err := q.QueryRow(ctx, qDependentsFingerprint, m.treeOIDs(), m.shadowIdents()).Scan(&fp); err != nil {
		return "", fmt.Errorf("fingerprint the dependents: %w", err)
	}
	return fp, nil
}

// switchReads is what the switch reads about the original before changing
// it: its dependents (with the materialized views' steps) and the names of
// its partitions' indexes. fp is the dependents' fingerprint taken before the
// read (empty when read under the lock).
type switchReads struct {
	fp      string
	d       *dependents
	partIdx map[string]string
}

// readSwitch reads the dependents, the materialized views' steps and the
// partitions' index names through tx (search_path = pg_catalog).
func (m *migration) readSwitch(ctx context.Context, tx pgx.Tx) (*switchReads, error) {
	d, err := m.readDependents(ctx, tx)
	if err != nil {
		return nil, fmt.Errorf("read dependents: %w", err)
	}
	if err := m.swapMatViews(ctx, tx, d); err != nil {
		return nil, fmt.Errorf("materialized views: %w", err)
	}
	partIdx, err := m.partitionIndexNames(ctx, tx, ident(m.plan.Schema, m.plan.Table))
	if err != nil {
		return nil, err
	}
	return &switchReads{d: d, partIdx: partIdx}, nil
}

// readBeforeLock reads for the switch in a transaction of its own, right
// before the lock requests, fingerprint first. It returns nil when the read
// fails (an object dropped while it was read, a materialized view changed):
// the switch then reads under its lock, where a failure is the job's.
func (m *migration) readBeforeLock(ctx context.Context, lockTx pgx.Tx) *switchReads {
	// The fingerprint runs again under the lock in the switch's backend:
	// run there once now, so that it finds its catalog caches warm (a cold
	// backend took over 100 ms for it). It reads catalogs only: no lock on
	// the tables that concurrent DDL would wait for.
	_ = pgx.BeginFunc(ctx, lockTx, func(tx pgx.Tx) error { // a savepoint: a failure aborts nothing
		if _, err := tx.Exec(ctx, noJIT); err != nil {
			return err
		}
		_, err := m.dependentsFingerprint(ctx, tx)
		return err
	})
	var r *switchReads
	// The read itself in a transaction of its own: the locks its functions
	// take (pg_get_viewdef and the like) are released at once.
	err := pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, catalogPath+"; "+noJIT); err != nil {
			return err
		}
		fp, err := m.dependentsFingerprint(ctx, tx)
		if err != nil {
			return err
		}
		if r, err = m.readSwitch(ctx, tx); err != nil {
			return err
		}
		r.fp = fp
		return nil
	})
	if err != nil {
		if ctx.Err() == nil {
			m.event(ctx, PhaseSwitch, fmt.Sprintf("dependents not read before the lock (%v); reading them under it", err))
		}
		return nil
	}
	return r
}

// switchFingerprints takes, under the lock and in one round trip, the
// table's fingerprint and, when the dependents were read before the lock,
// theirs.
func (m *migration) switchFingerprints(ctx context.Context, tx pgx.Tx, withDeps bool) (tree, deps string, err error) {
	p := m.plan
	if !withDeps {
		tree, err = treeFingerprint(ctx, tx, p.TableID, p.Partitions)
		if err != nil {
			return "", "", fmt.Errorf("fingerprint: %w", err)
		}
		return tree, "", nil
	}
	b := &pgx.Batch{}
	b.Queue(noJIT)
	b.Queue(qTreeFingerprint, append([]uint32{p.TableID}, oidsOf(p.Partitions)...)).QueryRow(func(row pgx.Row) error {
		return row.Scan(&tree)
	})
	b.Queue(qDependentsFingerprint, m.treeOIDs(), m.shadowIdents()).QueryRow(func(row pgx.Row) error {
		return row.Scan(&deps)
	})
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return "", "", fmt.Errorf("fingerprints: %w", err)
	}
	return tree, deps, nil
}
