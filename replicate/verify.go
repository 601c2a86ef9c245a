package replicate

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// verify proves, before the switch, that the shadow equals the original
// passed through the command's transformation. One REPEATABLE READ
// transaction applies the delta visible in its snapshot and then compares,
// per copy range, the row count and a sum of row hashes of both tables: in
// that snapshot every change to the original is either in the applied delta
// or not visible at all, so the two sides must be equal, while writers keep
// writing (nothing is locked beyond ACCESS SHARE). A range that differs is
// recopied in the same snapshot and checked again in the next round; after
// three rounds with differences the job fails, the original untouched.
//
// An inheritance tree is verified table by table: each table's range (the
// state table's rel) compares that table's own rows (FROM ONLY) with its
// own shadow's, through its own column list, because a child's columns of
// its own are invisible through the root and a recopy through the root
// would put a child's rows into the root's shadow.
func (m *migration) verify(ctx context.Context) error {
	p := m.plan
	var ver int
	if err := m.pool.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&ver); err != nil {
		return fmt.Errorf("verify: server version: %w", err)
	}
	targets, err := m.verifyTargets(ctx, ver)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	srcKeys := make([]string, len(p.Key))
	dstKeys := make([]string, len(p.Key))
	for i := range p.Key {
		srcKeys[i] = "t." + qi(p.Key[i])
		dstKeys[i] = "s." + qi(p.ShadowKey[i])
	}
	rows, err := m.pool.Query(ctx, "SELECT range_id, lo, hi, rel FROM "+m.stateIdent()+" ORDER BY range_id")
	if err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	ranges, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (copyRange, error) {
		var c copyRange
		return c, r.Scan(&c.id, &c.lo, &c.hi, &c.rel)
	})
	if err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	for _, r := range ranges {
		if r.rel < 0 || r.rel >= len(targets) {
			return fmt.Errorf("verify: range %d names table %d of a tree of %d", r.id, r.rel, len(targets))
		}
	}
	for round := 1; round <= 3; round++ {
		if err := m.hold(ctx); err != nil {
			return err
		}
		var bad []int
		err := pgx.BeginTxFunc(ctx, m.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead}, func(tx pgx.Tx) error {
			if _, err := m.applyDeltaTx(ctx, tx, 0); err != nil {
				return err
			}
			for _, r := range ranges {
				if err := m.hook(ctx, tx, "verify"); err != nil {
					return err
				}
				vt := targets[r.rel]
				sc, sargs := rangeCond(srcKeys, p.KeyTypes, r.lo, r.hi)
				sc = m.filterWhere(sc)
				dc, dargs := rangeCond(dstKeys, p.KeyTypes, r.lo, r.hi)
				var sn, dn int64
				var sh, dh string
				if err := tx.QueryRow(ctx, fmt.Sprintf(vt.agg, strings.Join(vt.srcRow, ", "), vt.src, "t", sc), sargs...).Scan(&sn, &sh); err != nil {
					return fmt.Errorf("hash range %d of the original %s: %w", r.id, vt.src, err)
				}
				if err := tx.QueryRow(ctx, fmt.Sprintf(vt.agg, strings.Join(vt.dstRow, ", "), vt.dstRead, "s", dc), dargs...).Scan(&dn, &dh); err != nil {
					return fmt.Errorf("hash range %d of the shadow %s: %w", r.id, vt.dst, err)
				}
				if sn == dn && sh == dh {
					continue
				}
				bad = append(bad, r.id)
				where := ""
				if p.inherits() {
					where = " of " + strings.TrimPrefix(vt.src, "ONLY ")
				}
				m.event(ctx, PhaseVerify, fmt.Sprintf("range %d%s differs (%d rows vs %d in the shadow): recopying it", r.id, where, sn, dn))
				if _, err := m.exec(ctx, tx, "DELETE FROM "+vt.dstRead+" s"+dc, dargs...); err != nil {
					return fmt.Errorf("recopy range %d into %s: %w", r.id, vt.dst, err)
				}
				ins := fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t%s",
					vt.dst, strings.Join(vt.insertCols, ", "), strings.Join(vt.selectExprs, ", "), vt.src, sc)
				if _, err := m.exec(ctx, tx, ins, sargs...); err != nil {
					return fmt.Errorf("recopy range %d into %s: %w", r.id, vt.dst, err)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("verify: %w", err)
		}
		if len(bad) == 0 {
			m.event(ctx, PhaseVerify, fmt.Sprintf("shadow verified equal to the original in %d ranges", len(ranges)))
			return nil
		}
	}
	return fmt.Errorf("verify: the shadow still differs from the original after 3 rounds")
}

// verifyTarget is what one range compares: an original and its shadow,
// the shadow's columns and the expressions that fill them, and the
// aggregate that hashes a side of a range.
type verifyTarget struct {
	src         string // original, as read (ONLY for a table of an inheritance tree)
	dst         string // shadow, as written
	dstRead     string // shadow, as read and deleted from (ONLY in a tree)
	insertCols  []string
	selectExprs []string
	srcRow      []string // the original's row passed through the command, cast to the shadow's types
	dstRow      []string // the shadow's row
	agg         string   // count and hash sum: fmt with row, table, alias, condition
}

// verifyTargets lists what the ranges' rel index: the table itself (a
// plain or partitioned table, rel 0), or every table of an inheritance
// tree in treeTables order.
func (m *migration) verifyTargets(ctx context.Context, ver int) ([]verifyTarget, error) {
	p := m.plan
	var out []verifyTarget
	if p.inherits() {
		for _, tt := range m.treeTables() {
			out = append(out, verifyTarget{src: tt.Src, dst: tt.Dst, dstRead: "ONLY " + tt.Dst,
				insertCols: tt.InsertCols, selectExprs: tt.SelectExprs})
		}
	} else {
		out = []verifyTarget{{src: m.srcRel(), dst: m.shadowIdent(), dstRead: m.shadowIdent(),
			insertCols: p.InsertCols, selectExprs: p.SelectExprs}}
	}
	for i := range out {
		vt := &out[i]
		types, err := m.q(ctx, m.pool, `select attname, format_type(atttypid, atttypmod) from pg_attribute
			where attrelid = $1::regclass and attnum > 0 and not attisdropped`, vt.dst)
		if err != nil {
			return nil, fmt.Errorf("column types of %s: %w", vt.dst, err)
		}
		typeOf := map[string]string{}
		for _, t := range types {
			typeOf[qi(t[0])] = t[1]
		}
		vt.srcRow = make([]string, len(vt.insertCols))
		vt.dstRow = make([]string, len(vt.insertCols))
		for j, c := range vt.insertCols {
			vt.srcRow[j] = fmt.Sprintf("(%s)::%s", vt.selectExprs[j], typeOf[c])
			vt.dstRow[j] = "s." + c
		}
		// A 64-bit hash of each row, summed (as numeric: no overflow).
		// Hashing the record itself (PostgreSQL 14+) avoids printing every
		// row as text, which cost several times the copy; 13 falls back to
		// md5 of the text. Per table: a child may have a column of its own
		// without a hash function.
		vt.agg = "SELECT count(*), coalesce(sum(hash_record_extended(ROW(%s), 0)::numeric), 0)::text FROM %s %s%s"
		probe := fmt.Sprintf("SELECT hash_record_extended(ROW(%s), 0) FROM %s s LIMIT 1", strings.Join(vt.dstRow, ", "), vt.dstRead)
		if _, err := m.pool.Exec(ctx, probe); ver < 140000 || err != nil {
			// Before 14, or a column type without a hash function.
			vt.agg = "SELECT count(*), coalesce(sum(('x' || substr(md5(ROW(%s)::text), 1, 15))::bit(60)::bigint), 0)::text FROM %s %s%s"
		}
	}
	return out, nil
}

// hook lets tests act at named points of a run (see Options.TestHook).
func (m *migration) hook(ctx context.Context, tx pgx.Tx, point string) error {
	if m.opts.TestHook == nil {
		return nil
	}
	return m.opts.TestHook(ctx, point, tx)
}
