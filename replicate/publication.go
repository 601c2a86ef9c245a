package replicate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Publications that publish every table (FOR ALL TABLES, or TABLES IN
// SCHEMA covering the table's schema, 15+) also publish what a run creates
// there: the shadow, the delta and the state table. Left alone, that breaks
// their subscribers (CDC tools, logical replicas) and the job:
//
//   - PostgreSQL refuses UPDATE and DELETE on a published table without a
//     replica identity (CheckCmdReplicaIdentity); the catch-up deletes from
//     the shadow, which has no key index during the copy.
//   - A subscriber receives rows for T__tat_new and T__tat_delta, tables it
//     does not have: its apply worker stops ("logical replication target
//     relation ... does not exist"). And the shadow's rows would duplicate
//     what it already got from the original.
//
// PostgreSQL keeps the transient heap of its own table rewrites out of
// logical decoding by pg_class.relrewrite: reorderbuffer.c skips the row
// changes of a relation whose relrewrite is set unless the output plugin
// asked for them (pgoutput never does). A run marks its shadow tree, delta
// and state table the same way (relrewrite = the original's OID), as the
// engine's role right after creating them: an UPDATE of pg_class rows, which
// takes no lock on the tables and needs a superuser (pg_repack, too, edits
// catalogs directly). The switch, in its transaction, resets the mark of the
// shadow tree before the rename; decoding reads pg_class as of each change
// (historic catalog snapshot), so the shadow's changes up to then stay
// hidden and the new table's are published under T's name from then on.
// TRUNCATE is not filtered by relrewrite, so a marked run empties a shadow
// with DELETE (catchup.go).
//
// The shadow's tables get REPLICA IDENTITY FULL while such a publication
// exists (with or without the mark: the mark does not lift PostgreSQL's
// check), and the switch gives them back the original's identity.
//
// Without superuser the tables are not marked; the run warns that the
// publications' subscribers will stop, and still succeeds.

// planPublications records in the plan which publications publish every
// table of the run's schemas, and whether the engine's role can keep the
// run's tables out of them.
func (m *migration) planPublications(ctx context.Context, tx pgx.Tx, p *plan) error {
	var pubs string
	q := `select coalesce(string_agg(pubname::text, ', ' order by pubname), '') from pg_publication where puballtables`
	args := []any{}
	if m.t.Version >= 150000 {
		schemas := []string{p.Schema}
		for _, pt := range p.Partitions {
			schemas = append(schemas, pt.Schema)
		}
		q = `select coalesce(string_agg(p.pubname::text, ', ' order by p.pubname), '') from pg_publication p
			where p.puballtables or exists (select 1 from pg_publication_namespace pn join pg_namespace n on n.oid = pn.pnnspid
				where pn.pnpubid = p.oid and n.nspname = any($1::text[]))`
		args = append(args, schemas)
	}
	if err := tx.QueryRow(ctx, q, args...).Scan(&pubs); err != nil {
		return fmt.Errorf("read publications: %w", err)
	}
	if pubs == "" {
		return nil
	}
	p.Publications = pubs
	var super bool
	if err := m.admin.QueryRow(ctx, `select current_setting('is_superuser') = 'on'`).Scan(&super); err != nil {
		return fmt.Errorf("read publications: %w", err)
	}
	p.PubHidden = super
	if super {
		m.event(ctx, PhasePrepare, fmt.Sprintf("publication(s) %s publish all tables (FOR ALL TABLES or TABLES IN SCHEMA): "+
			"the job's shadow, delta and state tables are kept out of them as PostgreSQL keeps a table rewrite's transient table out (pg_class.relrewrite); "+
			"their subscribers keep receiving %s's changes, and after the switch the new table's under the same name", pubs, m.tableRef()))
		return nil
	}
	m.event(ctx, PhasePrepare, fmt.Sprintf("warning: publication(s) %s publish all tables (FOR ALL TABLES or TABLES IN SCHEMA), so they also publish "+
		"the job's shadow table %s and its delta while the job runs: their subscribers have no such tables and their apply will stop with an error "+
		"(\"logical replication target relation ... does not exist\"). Keeping them out of the publications needs a superuser: "+
		"run the job with a superuser's credentials, or create those tables on the subscribers", pubs, p.Shadow))
	return nil
}

// shadowTables lists the shadow tree's local tables (the root first), with
// whether each holds rows itself (not a partitioned table).
func (m *migration) shadowTables() (names []string, leaf []bool) {
	p := m.plan
	names = append(names, m.shadowIdent())
	leaf = append(leaf, m.t.Kind != "p")
	for _, pt := range localPartitions(p.Partitions) {
		names = append(names, ident(pt.Schema, partShadow(pt)))
		leaf = append(leaf, pt.Inherit || pt.PartKey == "")
	}
	return names, leaf
}

// markHidden sets relrewrite on tables (quoted, qualified names) so that
// logical decoding skips their changes (see above). m.admin, a superuser:
// a row update of pg_class, no lock on the tables.
func (m *migration) markHidden(ctx context.Context, tables []string) error {
	if !m.plan.PubHidden {
		return nil
	}
	if _, err := m.exec(ctx, m.admin, `UPDATE pg_catalog.pg_class SET relrewrite = $1::oid
		WHERE oid = ANY(ARRAY(SELECT pg_catalog.to_regclass(t) FROM pg_catalog.unnest($2::text[]) t)) AND relkind IN ('r', 'p')`,
		m.plan.TableID, tables); err != nil {
		return fmt.Errorf("keep %s out of publications: %w", strings.Join(tables, ", "), err)
	}
	return nil
}

// hideShadow, right after prepare: marks the shadow tree and the state
// table, and gives the shadow's tables a replica identity for the
// catch-up's UPDATE and DELETE (the key index is built only after the copy).
func (m *migration) hideShadow(ctx context.Context) error {
	p := m.plan
	if p.Publications == "" {
		return nil
	}
	names, leaf := m.shadowTables()
	if err := m.markHidden(ctx, append(append([]string(nil), names...), m.stateIdent())); err != nil {
		return err
	}
	// The owner's tables: ALTER ... REPLICA IDENTITY evaluates nothing of hers.
	return pgx.BeginFunc(ctx, m.pool, func(tx pgx.Tx) error {
		for i, n := range names {
			if !leaf[i] {
				continue
			}
			if _, err := m.exec(ctx, tx, "ALTER TABLE "+n+" REPLICA IDENTITY FULL"); err != nil {
				return fmt.Errorf("replica identity of %s while publications publish it: %w", n, err)
			}
		}
		return nil
	})
}

// unhideStatements, in the switch transaction after the last delta and
// before the rename: the shadow's tables get the original's replica
// identity back (its partitions DEFAULT: relDependents then sets the
// others' own) and lose the mark, so that the new table is published.
func (m *migration) unhideStatements() []string {
	p := m.plan
	if p.Publications == "" {
		return nil
	}
	names, leaf := m.shadowTables()
	var out []string
	for i, n := range names {
		if !leaf[i] {
			continue
		}
		ri := "DEFAULT"
		if i == 0 {
			switch p.ReplIdent {
			case "f":
				continue
			case "i":
				if p.ReplIndex != "" {
					continue // buildIndexes set USING INDEX back
				}
				ri = "NOTHING" // the ALTER dropped the index: no identity, as in place
			case "n":
				ri = "NOTHING"
			}
		}
		out = append(out, "ALTER TABLE "+n+" REPLICA IDENTITY "+ri)
	}
	return out
}

// unhide resets the mark of the shadow tree (tx: the switch's).
func (m *migration) unhide(ctx context.Context, tx pgx.Tx) error {
	if !m.plan.PubHidden {
		return nil
	}
	names, _ := m.shadowTables()
	if _, err := m.exec(ctx, tx, `UPDATE pg_catalog.pg_class SET relrewrite = 0
		WHERE oid = ANY(ARRAY(SELECT pg_catalog.to_regclass(t) FROM pg_catalog.unnest($1::text[]) t))`, names); err != nil {
		return fmt.Errorf("publish the new table: %w", err)
	}
	return nil
}
