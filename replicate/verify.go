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
func (m *migration) verify(ctx context.Context) error {
	p := m.plan
	types, err := m.q(ctx, m.pool, `select attname, format_type(atttypid, atttypmod) from pg_attribute
		where attrelid = $1::regclass and attnum > 0 and not attisdropped`, m.shadowIdent())
	if err != nil {
		return err
	}
	typeOf := map[string]string{}
	for _, t := range types {
		typeOf[qi(t[0])] = t[1]
	}
	src := make([]string, len(p.InsertCols))
	dst := make([]string, len(p.InsertCols))
	for i, c := range p.InsertCols {
		src[i] = fmt.Sprintf("(%s)::%s", p.SelectExprs[i], typeOf[c])
		dst[i] = "s." + c
	}
	// A 64-bit hash of each row, summed (as numeric: no overflow). Hashing
	// the record itself (PostgreSQL 14+) avoids printing every row as text,
	// which cost several times the copy; 13 falls back to md5 of the text.
	agg := "SELECT count(*), coalesce(sum(hash_record_extended(ROW(%s), 0)::numeric), 0)::text FROM %s %s%s"
	var ver int
	if err := m.pool.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&ver); err != nil {
		return err
	}
	probe := fmt.Sprintf("SELECT hash_record_extended(ROW(%s), 0) FROM %s s LIMIT 1", strings.Join(dst, ", "), m.shadowIdent())
	if _, err := m.pool.Exec(ctx, probe); ver < 140000 || err != nil {
		// Before 14, or a column type without a hash function.
		agg = "SELECT count(*), coalesce(sum(('x' || substr(md5(ROW(%s)::text), 1, 15))::bit(60)::bigint), 0)::text FROM %s %s%s"
	}
	srcKeys := make([]string, len(p.Key))
	dstKeys := make([]string, len(p.Key))
	for i := range p.Key {
		srcKeys[i] = "t." + qi(p.Key[i])
		dstKeys[i] = "s." + qi(p.ShadowKey[i])
	}
	rows, err := m.pool.Query(ctx, "SELECT range_id, lo, hi FROM "+m.stateIdent()+" ORDER BY range_id")
	if err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	ranges, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (copyRange, error) {
		var c copyRange
		return c, r.Scan(&c.id, &c.lo, &c.hi)
	})
	if err != nil {
		return fmt.Errorf("read ranges: %w", err)
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
				sc, sargs := rangeCond(srcKeys, p.KeyTypes, r.lo, r.hi)
				sc = m.filterWhere(sc)
				dc, dargs := rangeCond(dstKeys, p.KeyTypes, r.lo, r.hi)
				var sn, dn int64
				var sh, dh string
				if err := tx.QueryRow(ctx, fmt.Sprintf(agg, strings.Join(src, ", "), m.t.ident(), "t", sc), sargs...).Scan(&sn, &sh); err != nil {
					return fmt.Errorf("hash range %d of the original: %w", r.id, err)
				}
				if err := tx.QueryRow(ctx, fmt.Sprintf(agg, strings.Join(dst, ", "), m.shadowIdent(), "s", dc), dargs...).Scan(&dn, &dh); err != nil {
					return fmt.Errorf("hash range %d of the shadow: %w", r.id, err)
				}
				if sn == dn && sh == dh {
					continue
				}
				bad = append(bad, r.id)
				m.event(ctx, PhaseVerify, fmt.Sprintf("range %d differs (%d rows vs %d in the shadow): recopying it", r.id, sn, dn))
				if _, err := m.exec(ctx, tx, "DELETE FROM "+m.shadowIdent()+" s"+dc, dargs...); err != nil {
					return fmt.Errorf("recopy range %d: %w", r.id, err)
				}
				ins := fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t%s",
					m.shadowIdent(), strings.Join(p.InsertCols, ", "), strings.Join(p.SelectExprs, ", "), m.t.ident(), sc)
				if _, err := m.exec(ctx, tx, ins, sargs...); err != nil {
					return fmt.Errorf("recopy range %d: %w", r.id, err)
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

// hook lets tests act at named points of a run (see Options.TestHook).
func (m *migration) hook(ctx context.Context, tx pgx.Tx, point string) error {
	if m.opts.TestHook == nil {
		return nil
	}
	return m.opts.TestHook(ctx, point, tx)
}
