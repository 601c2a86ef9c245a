package replicate

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// The copy splits the original by key ranges into the state table, then
// copy_data_jobs workers copy ranges in batches of batch_size rows. Each
// batch is its own short transaction that also moves the range's checkpoint,
// so no snapshot is held for the whole copy and a restart continues from the
// last finished batch. Rows changed meanwhile are in the delta; the copy
// does not need to be consistent with itself, only complete.

// planRanges fills the state table. A single integer key is split
// arithmetically into several ranges per worker; any other key (uuid, text,
// composite...) is split on the histogram of its first column (statRanges),
// else copied as one range in key order.
func (m *migration) planRanges(ctx context.Context) error {
	p := m.plan
	var ranges [][2]*string
	intKey := len(p.Key) == 1 && isIntType(p.KeyTypes[0]) && !p.inherits()
	if intKey {
		var lo, hi *int64
		err := m.pool.QueryRow(ctx, fmt.Sprintf("SELECT min(%s)::bigint, max(%s)::bigint FROM %s",
			qi(p.Key[0]), qi(p.Key[0]), m.srcRel()+" t")).Scan(&lo, &hi)
		if err != nil {
			return fmt.Errorf("key bounds: %w", err)
		}
		if lo != nil {
			n := int64(m.opts.CopyDataJobs) * 4
			if rows := m.t.EstRows / int64(m.opts.BatchSize); rows < n {
				n = max(rows, 1)
			}
			span := (*hi - *lo + n) / n
			prev := (*string)(nil)
			for i := int64(0); i < n; i++ {
				end := *lo + (i+1)*span - 1
				var e *string
				if i < n-1 && end < *hi {
					s := fmt.Sprint(end)
					e = &s
				}
				ranges = append(ranges, [2]*string{prev, e})
				if e == nil {
					break
				}
				prev = e
			}
		}
	}
	if !intKey && !p.inherits() {
		var err error
		if ranges, err = m.statRanges(ctx); err != nil {
			return err
		}
	}
	if ranges == nil {
		ranges = [][2]*string{{nil, nil}}
	}
	var rels []int
	if p.inherits() {
		// One keyset range per table of the tree, copied in parallel.
		ranges = nil
		for i := range m.treeTables() {
			ranges = append(ranges, [2]*string{nil, nil})
			rels = append(rels, i)
		}
	}
	// All ranges in one transaction: a continued run trusts that the state
	// table lists the whole key space.
	return pgx.BeginFunc(ctx, m.pool, func(tx pgx.Tx) error {
		for i, r := range ranges {
			var lo, hi []string
			if r[0] != nil {
				lo = []string{*r[0]}
			}
			if r[1] != nil {
				hi = []string{*r[1]}
			}
			rel := 0
			if rels != nil {
				rel = rels[i]
			}
			if _, err := m.exec(ctx, tx, "INSERT INTO "+m.stateIdent()+" (range_id, lo, hi, rel) VALUES ($1, $2, $3, $4)", i, lo, hi, rel); err != nil {
				return fmt.Errorf("store range %d: %w", i, err)
			}
		}
		return nil
	})
}

// statRanges splits a key on the statistics of its first column: the
// histogram's bounds are quantiles of the key, so every few of them make
// ranges of about equal rows whatever the key's type or skew. A first column
// with too few distinct values for a histogram splits on its most common
// values instead. The bounds are only split points: range i is
// (split[i-1], split[i]] on the first column, the first open below and the
// last open above, so the ranges cover the key space whatever the
// statistics say (stale, or missing rows written since). Nil: no usable
// statistics, one range.
func (m *migration) statRanges(ctx context.Context) ([][2]*string, error) {
	if m.t.EstRows > 0 && m.t.EstRows < 2*int64(m.opts.BatchSize) {
		return nil, nil // one batch or two: nothing to share
	}
	vals, hist, est, err := m.keyStats(ctx)
	if err != nil {
		return m.noStats(ctx, err)
	}
	if vals == nil && m.opts.CopyDataJobs > 1 {
		// Never analysed (a new or bulk-loaded table): ANALYZE of the key
		// column samples a fixed number of rows, cheap next to the copy,
		// and takes SHARE UPDATE EXCLUSIVE, which blocks no reader or
		// writer. Under a short lock_timeout all the same: a VACUUM or DDL
		// holding the table costs parallelism, never a queue behind us.
		if err := m.analyzeKey(ctx); err != nil {
			return m.noStats(ctx, err)
		}
		if vals, hist, est, err = m.keyStats(ctx); err != nil {
			return m.noStats(ctx, err)
		}
	}
	// Several ranges per worker, so that a worker done early takes over
	// work, but none much below a batch: a range costs a batch at least.
	n := m.opts.CopyDataJobs * 4
	if est = max(est, m.t.EstRows); est > 0 {
		n = int(min(int64(n), max(est/int64(m.opts.BatchSize), 1)))
	}
	splits := splitPoints(vals, n, hist)
	if len(splits) == 0 {
		return nil, nil
	}
	ranges := make([][2]*string, 0, len(splits)+1)
	var prev *string
	for i := range splits {
		ranges = append(ranges, [2]*string{prev, &splits[i]})
		prev = &splits[i]
	}
	ranges = append(ranges, [2]*string{prev, nil})
	m.event(ctx, PhaseCopy, fmt.Sprintf("key split into %d ranges on the statistics of %s", len(ranges), qi(m.plan.Key[0])))
	return ranges, nil
}

// noStats: statistics only speed the copy up, so failing to read them
// costs parallelism, not the run (unless the run is being stopped).
func (m *migration) noStats(ctx context.Context, err error) ([][2]*string, error) {
	if ctx.Err() != nil {
		return nil, err
	}
	m.event(ctx, PhaseCopy, "copying the key in one range: "+err.Error())
	return nil, nil
}

// keyStats reads the histogram bounds of the key's first column (hist), else
// its most common values, as text in the column's order: sorted again as the
// key's type in the column's collation (what the copy's comparisons use), so
// the split points are in the copy's order even if the statistics were made
// under another collation or are stale. Nil when there are none.
func (m *migration) keyStats(ctx context.Context) (vals []string, hist bool, est int64, err error) {
	p := m.plan
	coll := ""
	for _, c := range m.t.Columns {
		if c.Name == p.Key[0] && c.Collation != "" {
			coll = " COLLATE " + c.Collation
		}
	}
	// pg_stats holds a partitioned table's statistics as inherited ones.
	// The row estimate too: ANALYZE may just have made it.
	q := fmt.Sprintf(`SELECT s.hist, array_agg(v ORDER BY (v::%s)%s),
       (SELECT reltuples::bigint FROM pg_catalog.pg_class WHERE oid = $5)
FROM (SELECT histogram_bounds IS NOT NULL AS hist,
             coalesce(histogram_bounds, most_common_vals)::text::text[] AS vals
      FROM pg_catalog.pg_stats
      WHERE schemaname = $1 AND tablename = $2 AND attname = $3 AND inherited = $4) s,
     LATERAL (SELECT DISTINCT v FROM unnest(s.vals) v) u
GROUP BY s.hist`, p.KeyTypes[0], coll)
	err = m.pool.QueryRow(ctx, q, m.t.Schema, m.t.Name, p.Key[0], m.t.Kind == "p", m.t.OID).Scan(&hist, &vals, &est)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, 0, nil
	}
	if err != nil {
		return nil, false, 0, fmt.Errorf("statistics of key column %s: %w", qi(p.Key[0]), err)
	}
	return vals, hist, est, nil
}

// analyzeKey runs ANALYZE on the original's first key column only: with a
// column list ANALYZE evaluates no index expression, so no code of the
// owner's beyond the key type's own. A few short tries: an autovacuum of
// the table (likely on a freshly loaded one) holds the same lock a moment.
func (m *migration) analyzeKey(ctx context.Context) error {
	stmt := fmt.Sprintf("ANALYZE %s (%s)", m.t.ident(), qi(m.plan.Key[0]))
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		err = m.lockedTx(ctx, m.pool, m.lockTimeout()*4, func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, pinnedPath); err != nil {
				return err
			}
			_, err := m.exec(ctx, tx, stmt)
			return err
		})
		if !isLockTimeout(err) {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(m.timeBetweenLocks()):
		}
	}
	if err != nil {
		return fmt.Errorf("analyze the key of %s: %w", m.tableRef(), err)
	}
	return nil
}

// splitPoints picks at most n-1 split points, evenly spaced, from vals
// (distinct, sorted). Histogram bounds (hist) are quantiles whose first and
// last are the smallest and largest key sampled: only the inner ones split,
// so the first and last ranges are not empty. Most common values are the
// column's values themselves: each but the last may end a range.
func splitPoints(vals []string, n int, hist bool) []string {
	m := len(vals) // ranges possible: histogram m-1, common values m
	if !hist {
		m++
	}
	if n > m-1 {
		n = m - 1
	}
	if n < 2 {
		return nil
	}
	out := make([]string, 0, n-1)
	for i := 1; i < n; i++ {
		j := i * (m - 1) / n
		if !hist {
			j--
		}
		out = append(out, vals[j])
	}
	return out
}

func isIntType(t string) bool {
	return t == "integer" || t == "bigint" || t == "smallint"
}

type copyRange struct {
	id     int
	lo, hi []string // exclusive lower, inclusive upper; nil = unbounded; may be a prefix of the key (rangeCond)
	rel    int      // table of an inheritance tree (treeTables), else 0
}

func (m *migration) copyData(ctx context.Context) error {
	if err := m.prepareSums(ctx); err != nil {
		return err
	}
	rows, err := m.pool.Query(ctx, "SELECT range_id, coalesce(last, lo), hi, rel FROM "+m.stateIdent()+" WHERE NOT done ORDER BY range_id")
	if err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	todo, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (copyRange, error) {
		var c copyRange
		err := r.Scan(&c.id, &c.lo, &c.hi, &c.rel)
		return c, err
	})
	if err != nil {
		return fmt.Errorf("read ranges: %w", err)
	}
	if len(m.plan.Key) == 1 && isIntType(m.plan.KeyTypes[0]) && len(todo) > 0 && !m.plan.inherits() {
		// Bounds and density of the key, read in the copy's snapshot.
		var kmin, kmax *int64
		var est int64
		err := m.batchTx(ctx, func(tx pgx.Tx) error {
			k := qi(m.plan.Key[0])
			return tx.QueryRow(ctx, fmt.Sprintf("SELECT min(%s)::bigint, max(%s)::bigint FROM %s t", k, k, m.srcRel())).Scan(&kmin, &kmax)
		})
		if err != nil {
			return fmt.Errorf("key bounds: %w", err)
		}
		if kmin == nil { // empty table
			_, err := m.exec(ctx, m.pool, "UPDATE "+m.stateIdent()+" SET done = true")
			return err
		}
		// A never-analysed table has no estimate: assume dense keys.
		step := float64(m.opts.BatchSize)
		if est = m.t.EstRows; est > 0 {
			step = float64(m.opts.BatchSize) * (float64(*kmax) - float64(*kmin) + 1) / float64(est)
		}
		return parallel(ctx, m.opts.CopyDataJobs, todo, func(ctx context.Context, r copyRange) error {
			return m.copyIntRange(ctx, r, *kmin, *kmax, max(step, 1))
		})
	}
	return parallel(ctx, m.opts.CopyDataJobs, todo, m.copyRange)
}

// batchTx runs one copy batch in its own short transaction: with the
// slot's exported snapshot under logical capture (so copy and stream are
// exactly consistent), with work_mem when set.
func (m *migration) batchTx(ctx context.Context, fn func(pgx.Tx) error) error {
	txo := pgx.TxOptions{}
	if m.snapshot != "" {
		txo.IsoLevel = pgx.RepeatableRead
	}
	return pgx.BeginTxFunc(ctx, m.pool, txo, func(tx pgx.Tx) error {
		if m.snapshot != "" {
			if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(m.snapshot)); err != nil {
				return err
			}
		}
		if m.opts.WorkMem != "" {
			if _, err := tx.Exec(ctx, "SELECT set_config('work_mem', $1, true)", m.opts.WorkMem); err != nil {
				return err
			}
		}
		return fn(tx)
	})
}

// copyIntRange copies a range of a single integer key in arithmetic steps:
// a plain INSERT ... SELECT ... WHERE k > lo AND k <= lo + step per batch,
// with step sized from the key density so that a batch holds about
// batch_size rows. No sort, no materialisation: the cost is the copy itself.
// The last range ends with an unbounded batch (k > its end), so rows
// inserted beyond the key range seen at planning are copied too.
func (m *migration) copyIntRange(ctx context.Context, r copyRange, kmin, kmax int64, step float64) error {
	p := m.plan
	key := "t." + qi(p.Key[0])
	sums := m.sumTarget(r.rel)
	// One CTE, referenced once: PostgreSQL inlines it, so this is a plain
	// INSERT ... SELECT (written as a CTE so every copy batch reads alike
	// in --show-queries). With verify, the CTE also feeds the range's
	// source checksum (then it is materialised once and read twice: the
	// checksum is over exactly the rows inserted).
	ins := fmt.Sprintf("WITH src AS (SELECT %s FROM %s t WHERE %s > $1::bigint",
		strings.Join(p.SelectExprs, ", "), m.srcRel(), key)
	tail := fmt.Sprintf(") INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT * FROM src",
		m.shadowIdent(), strings.Join(p.InsertCols, ", "))
	if sums != nil {
		ins = fmt.Sprintf("WITH src AS (SELECT %s FROM %s t WHERE %s > $1::bigint",
			strings.Join(aliased(p.SelectExprs), ", "), m.srcRel(), key)
		tail = fmt.Sprintf("), ins AS (INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM src)\nSELECT count(*), %s FROM src",
			m.shadowIdent(), strings.Join(p.InsertCols, ", "), strings.Join(sums.copyCols, ", "), sums.sumOf(sums.copyRow))
	}
	cur := kmin - 1
	if r.lo != nil {
		v, err := strconv.ParseInt(r.lo[0], 10, 64)
		if err != nil {
			return fmt.Errorf("range %d: bad bound %q: %w", r.id, r.lo[0], err)
		}
		cur = v
	}
	end, open := kmax, r.hi == nil
	if !open {
		v, err := strconv.ParseInt(r.hi[0], 10, 64)
		if err != nil {
			return fmt.Errorf("range %d: bad bound %q: %w", r.id, r.hi[0], err)
		}
		end = v
	}
	// The width of a batch in key space starts from the average density and
	// adapts to what the batches find (gaps, sparse or skewed keys), so a
	// batch stays near batch_size rows.
	width := max(int64(step), 1)
	for batch := 1; ; batch++ {
		if err := m.hold(ctx); err != nil {
			return err
		}
		sql, args, last := ins+" AND "+key+" <= $2::bigint"+m.filterAnd()+tail, []any{cur, int64(0)}, false
		if end-cur <= width {
			if open {
				sql, args = ins+m.filterAnd()+tail, []any{cur}
			} else {
				args[1] = end
			}
			last = true
		} else {
			args[1] = cur + width
		}
		if m.opts.ShowQueries != nil {
			m.opts.ShowQueries(sql)
		}
		var count int64
		err := m.batchTx(ctx, func(tx pgx.Tx) error {
			var sum *string
			if sums != nil {
				if err := tx.QueryRow(ctx, sql, args...).Scan(&count, &sum); err != nil {
					return err
				}
			} else {
				tag, err := tx.Exec(ctx, sql, args...)
				if err != nil {
					return err
				}
				count = tag.RowsAffected()
			}
			upto := end
			if !last {
				upto = args[1].(int64)
			}
			_, err := tx.Exec(ctx, "UPDATE "+m.stateIdent()+" SET last = $2, rows = rows + $3, done = $4, "+sumsSet(5, 6)+" WHERE range_id = $1",
				r.id, []string{strconv.FormatInt(upto, 10)}, count, last, sum, sums.kindArg())
			return err
		})
		if err != nil {
			return fmt.Errorf("copy batch %d of range %d of %s: %w", batch, r.id, m.tableRef(), err)
		}
		m.rowsCopied.Add(count)
		if last {
			return nil
		}
		cur = args[1].(int64)
		width = nextWidth(width, count, int64(m.batchSize()))
	}
}

// sumsSet moves a range's stored source checksum on by a batch (parameter
// sum: the batch's sum as text; kind: how it was hashed): it stays a checksum only
// while every batch of the range added one, the same way. A batch copied
// without (verify off, $6 NULL) or hashed otherwise leaves it NULL, which
// verify takes as unknown.
func sumsSet(sum, kind int) string {
	return fmt.Sprintf("src_sum = CASE WHEN $%[2]d::text IS NOT NULL AND coalesce(src_hash, $%[2]d::text) = $%[2]d::text THEN src_sum + $%[1]d::numeric END, src_hash = $%[2]d::text", sum, kind)
}

// aliased names the copy's expressions _c1, _c2...: what the checksum reads.
func aliased(exprs []string) []string {
	out := make([]string, len(exprs))
	for i, e := range exprs {
		out[i] = fmt.Sprintf("%s AS _c%d", e, i+1)
	}
	return out
}

// copyRange copies one range batch by batch, in key order.
func (m *migration) copyRange(ctx context.Context, r copyRange) error {
	p := m.plan
	n := len(p.Key)
	keyT := make([]string, n)
	for i, k := range p.Key {
		keyT[i] = "t." + qi(k)
	}
	sel := make([]string, 0, n+len(p.SelectExprs))
	out := make([]string, 0, len(p.SelectExprs))
	for i, k := range keyT {
		sel = append(sel, fmt.Sprintf("%s AS _k%d", k, i+1))
	}
	for i, e := range p.SelectExprs {
		sel = append(sel, fmt.Sprintf("%s AS _c%d", e, i+1))
		out = append(out, fmt.Sprintf("_c%d", i+1))
	}
	lastK := make([]string, n)
	descK := make([]string, n)
	for i := range lastK {
		lastK[i] = fmt.Sprintf("_k%d::text", i+1)
		descK[i] = fmt.Sprintf("_k%d DESC", i+1)
	}
	src, dst, insCols := m.srcRel(), m.shadowIdent(), p.InsertCols
	if p.inherits() {
		tt := m.treeTables()[r.rel]
		src, dst, insCols = tt.Src, tt.Dst, tt.InsertCols
		sel, out = sel[:n], out[:0]
		for i, e := range tt.SelectExprs {
			sel = append(sel, fmt.Sprintf("%s AS _c%d", e, i+1))
			out = append(out, fmt.Sprintf("_c%d", i+1))
		}
	}
	sums := m.sumTarget(r.rel)
	build := func(lo, hi []string) (string, []any) {
		w, args := rangeCond(keyT, p.KeyTypes, lo, hi)
		w = m.filterWhere(w)
		// With verify, the batch's source checksum over the rows it
		// inserts: a window aggregate over the whole batch, computed once.
		sum := "NULL::text"
		if sums != nil {
			sum = sums.sumOver(sums.copyRow, " OVER ()")
		}
		return fmt.Sprintf(`WITH src AS (SELECT %s FROM %s t%s ORDER BY %s LIMIT $%d),
ins AS (INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM src)
SELECT count(*) OVER (), ARRAY[%s], %s FROM src ORDER BY %s LIMIT 1`,
			strings.Join(sel, ", "), src, w, strings.Join(keyT, ", "), len(args)+1,
			dst, strings.Join(insCols, ", "), strings.Join(out, ", "),
			strings.Join(lastK, ", "), sum, strings.Join(descK, ", ")), args
	}
	lo := r.lo
	for batch := 1; ; batch++ {
		if err := m.hold(ctx); err != nil {
			return err
		}
		size := m.batchSize()
		sql, args := build(lo, r.hi)
		args = append(args, size)
		if m.opts.ShowQueries != nil {
			m.opts.ShowQueries(sql)
		}
		var count int64
		var last []string
		var sum *string
		err := m.batchTx(ctx, func(tx pgx.Tx) error {
			err := tx.QueryRow(ctx, sql, args...).Scan(&count, &last, &sum)
			if errors.Is(err, pgx.ErrNoRows) {
				count = 0
				_, err = tx.Exec(ctx, "UPDATE "+m.stateIdent()+" SET done = true, "+sumsSet(2, 3)+" WHERE range_id = $1", r.id, "0", sums.kindArg())
				return err
			}
			if err != nil {
				return err
			}
			_, err = tx.Exec(ctx, "UPDATE "+m.stateIdent()+" SET last = $2, rows = rows + $3, done = $4, "+sumsSet(5, 6)+" WHERE range_id = $1",
				r.id, last, count, count < int64(size), sum, sums.kindArg())
			return err
		})
		if err != nil {
			return fmt.Errorf("copy batch %d of range %d of %s: %w", batch, r.id, m.tableRef(), err)
		}
		m.rowsCopied.Add(count)
		if count < int64(size) {
			return nil
		}
		lo = last
	}
}

// rangeCond renders " WHERE (keys) > (lo) AND (keys) <= (hi)" for a key
// range (nil bound = unbounded) with the bounds as parameters $1... A bound
// shorter than the key (a split point on the first column of a composite
// key) compares that prefix of the key: k1 > lo1 takes every key whose first
// column is above lo1, k1 <= hi1 every key whose first column is up to hi1,
// so ranges split on the first column still tile the whole key space, and a
// checkpoint (a whole key) within such a range narrows it as usual.
func rangeCond(keys, types, lo, hi []string) (string, []any) {
	var args []any
	w := rangePred(keys, types, lo, hi, &args)
	if w == "" {
		return "", nil
	}
	return " WHERE " + w, args
}

// rangePred is rangeCond's condition alone ("" for an unbounded range), its
// bounds appended to args and numbered after those already there, so that
// several ranges' conditions fit in one statement.
func rangePred(keys, types, lo, hi []string, args *[]any) string {
	var where []string
	bound := func(op string, vals []string) {
		s := make([]string, len(vals))
		for i, v := range vals {
			*args = append(*args, v)
			s[i] = fmt.Sprintf("$%d::%s", len(*args), types[i])
		}
		keyRow := "(" + strings.Join(keys[:len(vals)], ", ") + ")"
		where = append(where, keyRow+" "+op+" ("+strings.Join(s, ", ")+")")
	}
	if lo != nil {
		bound(">", lo)
	}
	if hi != nil {
		bound("<=", hi)
	}
	return strings.Join(where, " AND ")
}

// nextWidth scales a batch's key width towards target rows: up to 4x wider
// after a sparse (or empty) batch, down to 4x narrower after a dense one.
func nextWidth(width, got, target int64) int64 {
	f := 4.0
	if got > 0 {
		f = min(max(float64(target)/float64(got), 0.25), 4)
	}
	next := float64(width) * f
	if next > float64(math.MaxInt64/4) {
		return math.MaxInt64 / 4
	}
	return max(int64(next), 1)
}
