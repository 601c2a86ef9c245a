package replicate

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Delta apply is set-based: one transaction takes a bounded slice of the
// delta (by seq), deletes those keys from the shadow, re-inserts them from
// the original's current rows (through the command's expressions) and
// deletes the slice. It runs REPEATABLE READ so all three statements see the
// same snapshot: a delta row committed in between is neither half-applied
// nor deleted unapplied; the next round takes it.

// ErrCatchupTimeout: the delta backlog never dropped below min_delta_rows
// within Options.CatchupTimeout; the writes outpace the catch-up.
var ErrCatchupTimeout = errors.New("writes outpace the catch-up")

// catchupMaxGrowth bounds how far the apply slice grows (as a multiple of
// its start, batch_size*10), and catchupMaxSlice in rows: one round is one
// transaction holding one snapshot, which must stay short.
const (
	catchupMaxGrowth = 16
	catchupMaxSlice  = 1 << 20
)

// catchup applies the delta until the backlog is below min_delta_rows. When
// the backlog grows although every round applied a full slice, the slice
// doubles (up to catchupMaxGrowth times its start); when the backlog still
// stays above min_delta_rows for CatchupTimeout (time held by a pause or a
// throttle not counted), the job gives up with ErrCatchupTimeout and the
// runner drops the shadow: the original is untouched.
func (m *migration) catchup(ctx context.Context) error {
	start := time.Now()
	var held time.Duration
	growth := int64(1)
	prevBacklog := int64(-1)
	// Logical capture: a WAL position the stream must reach before the
	// delta counts as complete; re-taken each time it is reached, so the
	// stream is never more behind than the time between two marks.
	mark, err := m.streamMark(ctx)
	if err != nil {
		return err
	}
	for {
		h := time.Now()
		if err := m.hold(ctx); err != nil {
			return err
		}
		held += time.Since(h)
		// A failed stream never reaches the mark: fail now, not after
		// CatchupTimeout.
		if err := m.streamErr(); err != nil {
			return err
		}
		base := int64(m.batchSize()) * 10
		limit := sliceLimit(base, growth)
		n, err := m.applyDelta(ctx, m.pool, limit)
		if err != nil {
			return err
		}
		backlog, err := m.backlog(ctx, m.pool)
		if err != nil {
			return err
		}
		// Logical capture: the delta is only complete once the stream has
		// consumed the WAL written before the mark was taken, else an empty
		// delta means only that the stream lags, and the switch would wait
		// for it (and apply what it brings) under its lock.
		reached := m.streamReached(mark)
		if reached {
			if mark, err = m.streamMark(ctx); err != nil {
				return err
			}
		}
		streamBehind := m.capture != nil && !reached
		if !streamBehind && (backlog < m.opts.MinDeltaRows || (n == 0 && backlog == 0)) {
			return nil
		}
		// A full slice applied and still more behind than before: the
		// writers are faster than the rounds. Take bigger slices.
		if n >= limit && prevBacklog >= 0 && backlog >= prevBacklog && growth < catchupMaxGrowth && limit < catchupMaxSlice {
			growth *= 2
			m.event(ctx, PhaseCatchup, fmt.Sprintf("the delta backlog grows (%d rows, %d a round ago): applying up to %d changes per round",
				backlog, prevBacklog, sliceLimit(base, growth)))
		}
		prevBacklog = backlog
		if n == 0 {
			select { // nothing to apply yet: let the stream catch up
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
		if m.opts.CatchupTimeout > 0 && time.Since(start)-held > m.opts.CatchupTimeout {
			return fmt.Errorf("%w: the delta backlog is still %d rows (min_delta_rows %d) after %s of catch-up, applying up to %d changes per round; "+
				"the original is unchanged: retry when the write load is lower, or raise min_delta_rows or the catch-up timeout",
				ErrCatchupTimeout, backlog, m.opts.MinDeltaRows, m.opts.CatchupTimeout, sliceLimit(base, growth))
		}
	}
}

// streamMark is, under logical capture while streaming, the WAL insert
// position now (every transaction committed so far ends before it); 0
// otherwise.
//
// lagBytes alone cannot tell: the positions a logical walsender reports are
// those of the records it has decoded, not the server's end of WAL, so a
// stream far behind looks caught up.
func (m *migration) streamMark(ctx context.Context) (pglogrepl.LSN, error) {
	lc, ok := m.capture.(*logicalCapture)
	if !ok || !lc.streaming.Load() {
		return 0, nil
	}
	var lsn pglogrepl.LSN
	var text string
	if err := m.admin.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&text); err != nil {
		return 0, fmt.Errorf("WAL position: %w", err)
	}
	lsn, err := pglogrepl.ParseLSN(text)
	if err != nil {
		return 0, fmt.Errorf("WAL position %q: %w", text, err)
	}
	return lsn, nil
}

// streamReached: the logical stream has put into the delta every change
// committed before mark (the consumer confirms a position only once the
// keys before it are committed in the delta).
func (m *migration) streamReached(mark pglogrepl.LSN) bool {
	lc, ok := m.capture.(*logicalCapture)
	if !ok || mark == 0 {
		return true
	}
	return pglogrepl.LSN(lc.acked.Load()) >= mark
}

// sliceLimit is the apply slice of a catch-up round: base times growth,
// capped at catchupMaxSlice (but never below base).
func sliceLimit(base, growth int64) int64 {
	if l := base * growth; l <= catchupMaxSlice {
		return l
	}
	return max(base, catchupMaxSlice)
}

func (m *migration) backlog(ctx context.Context, db execer) (int64, error) {
	var n int64
	rows, err := db.Query(ctx, "SELECT count(*) FROM "+m.deltaIdent())
	if err != nil {
		return 0, fmt.Errorf("delta backlog: %w", err)
	}
	n, err = pgx.CollectExactlyOneRow(rows, pgx.RowTo[int64])
	if err != nil {
		return 0, fmt.Errorf("delta backlog: %w", err)
	}
	m.deltaBacklog.Store(n)
	return n, nil
}

type txStarter interface {
	BeginTx(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error)
}

// settleCopy applies the whole delta once, after the copy and before the
// index builds. Trigger capture copies each batch under its own snapshot, so
// a unique value that moved between rows during the copy (a swap, or a
// value freed by one row and taken by another) can be in the shadow twice;
// a UNIQUE or EXCLUDE index built on it would fail although the original
// never held a duplicate. The delta and the original read under one
// snapshot make the shadow an exact image of the original at that snapshot.
// Logical capture copies under the slot's snapshot: its copy is already an
// exact image of the original at that snapshot, so it is skipped. (Its
// delta fills during the copy, from a stream that lags the table: applying
// it now against the current rows would mix times — a value moved to a row
// whose change is applied from the row whose change is not streamed yet —
// and put the very duplicates this pass exists to remove into the shadow.)
//
// Without such an index it is skipped: the key itself cannot be duplicated
// (each key value is copied by the one batch covering it), and the catch-up,
// which runs after the index builds, applies the delta through them far
// cheaper than this pass over an unindexed shadow.
func (m *migration) settleCopy(ctx context.Context) error {
	if !m.plan.hasUniqueBesidesKey() || m.opts.Capture == CaptureLogical {
		return nil
	}
	n, err := m.applyDelta(ctx, m.pool, 0)
	if err != nil {
		return err
	}
	if n > 0 {
		m.event(ctx, m.currentPhase(), fmt.Sprintf("applied the %d changes made during the copy before building indexes", n))
	}
	return nil
}

// conflictRetries bounds how often a whole-delta apply that collides with a
// unique or exclusion constraint is retried under logical capture, waiting
// conflictWait each time for the stream to deliver the other side.
const (
	conflictRetries = 20
	conflictWait    = 100 * time.Millisecond
)

// isConstraintConflict: unique_violation or exclusion_violation.
func isConstraintConflict(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "23505" || pe.Code == "23P01")
}

// applyDelta applies up to limit delta rows (all of them when limit <= 0,
// which the switch uses under its lock) and returns how many it applied.
//
// A slice of the delta is not a consistent cut: it re-reads the current rows
// of its keys while the shadow rows of keys further on in the delta are
// still stale, and with logical capture even the whole delta lags the
// original. When a unique value moved between rows (a swap under a deferred
// constraint, or a value freed by one row and taken by another), a re-read
// row collides with such a stale row. The conflict closure (closure.go)
// displaces and re-reads the stale rows in the same snapshot, so on the
// shadow's UNIQUE indexes on columns this does not happen.
//
// What the closure does not cover (exclusion constraints, expression or
// NULLS NOT DISTINCT unique indexes) falls back to applying the whole delta
// at once: with trigger capture the delta and the original are read under
// one snapshot, so the result is an exact image of the original and cannot
// collide (a collision then is real, e.g. a constraint the ALTER adds that
// new rows violate, and fails the job). With logical capture the stream may
// not have delivered the other side of the move yet: the whole-delta apply
// is retried a few times while it catches up.
func (m *migration) applyDelta(ctx context.Context, db txStarter, limit int64) (int64, error) {
	n, err := m.applyDeltaOnce(ctx, db, limit)
	if err == nil || !isConstraintConflict(err) {
		return n, err
	}
	if limit > 0 {
		m.event(ctx, m.currentPhase(), "a slice of the delta collided with a unique or exclusion constraint of the shadow "+
			"(a value moved between rows): applying the whole delta at once")
	}
	for i := 0; ; i++ {
		n, err = m.applyDeltaOnce(ctx, db, 0)
		if err == nil || !isConstraintConflict(err) || m.opts.Capture != CaptureLogical || i >= conflictRetries {
			return n, err
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(conflictWait):
		}
	}
}

func (m *migration) applyDeltaOnce(ctx context.Context, db txStarter, limit int64) (int64, error) {
	started := time.Now()
	tx, err := db.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	n, err := m.applyDeltaTx(ctx, tx, limit)
	if err != nil {
		return 0, err
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, err
	}
	if el := time.Since(started); n >= 100 && el > 0 {
		// The switch's budget (deltaWithinBudget) follows the rate the
		// apply reaches on this table, with these writers.
		m.applyRate.Store(int64(float64(n) / el.Seconds()))
	}
	return n, nil
}

func (m *migration) applyDeltaTx(ctx context.Context, tx pgx.Tx, limit int64) (int64, error) {
	return m.applyDeltaSlice(ctx, tx, limit, true)
}

// applyDeltaSlice is applyDeltaTx; mark says whether to mark the ranges
// the applied keys fall in for verify (markTouched). The switch's last
// delta does not: verify is over by then, and the statement would only
// lengthen the lock (a switch that rolls back leaves those delta rows to
// a later apply, which marks them).
func (m *migration) applyDeltaSlice(ctx context.Context, tx pgx.Tx, limit int64, mark bool) (int64, error) {
	if m.rev != nil {
		return m.applyReverseTx(ctx, tx, limit) // a revert (keep.go)
	}
	first, upto, err := m.deltaBounds(ctx, tx, limit)
	if err != nil || upto == nil {
		return 0, err
	}
	return m.applyDeltaRange(ctx, tx, *first, *upto, mark)
}

// deltaBounds is the first and the last seq of the delta's first limit
// rows (all of them when limit <= 0) in tx's snapshot; nil when empty.
func (m *migration) deltaBounds(ctx context.Context, tx pgx.Tx, limit int64) (first, upto *int64, err error) {
	delta := m.deltaIdent()
	if limit > 0 {
		err = tx.QueryRow(ctx, "SELECT min(seq), max(seq) FROM (SELECT seq FROM "+delta+" ORDER BY seq LIMIT $1) s", limit).Scan(&first, &upto)
	} else {
		err = tx.QueryRow(ctx, "SELECT min(seq), max(seq) FROM "+delta).Scan(&first, &upto)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read delta: %w", err)
	}
	return first, upto, nil
}

// applyDeltaRange applies the delta rows first <= seq <= upto. Every
// statement is bounded below by first too: below it the delta's index
// holds only the rows earlier applies trimmed, dead until vacuum comes,
// tens of thousands after a busy catch-up, which a range from 0 walked
// through (under the switch's lock: 80-110 ms per statement under a
// flat-out writer). No row below first is visible in tx's snapshot.
func (m *migration) applyDeltaRange(ctx context.Context, tx pgx.Tx, first, upto int64, mark bool) (int64, error) {
	p := m.plan
	delta := m.deltaIdent()
	indexed := upto-first < indexPlanSlice
	if indexed {
		// The delta's statistics are those of when it was analyzed, often
		// when it was large: a small slice planned as a hash join scans
		// the whole original and shadow. Seq values are dense, so the span
		// bounds the slice's size.
		if _, err := rawTx(tx).Exec(ctx, indexPlans); err != nil {
			return 0, err
		}
	}
	n := len(p.Key)
	on := make([]string, n)
	src := make([]string, n)
	kc := make([]string, n)
	for i := range on {
		on[i] = fmt.Sprintf("s.%s = d.k%d", qi(p.ShadowKey[i]), i+1)
		src[i] = "t." + qi(p.Key[i])
		kc[i] = fmt.Sprintf("k%d", i+1)
	}
	del := fmt.Sprintf("DELETE FROM %s s USING %s d WHERE d.seq > $1 AND d.seq < $2 AND d.op NOT IN ('T', 'P') AND %s",
		m.shadowIdent(), delta, strings.Join(on, " AND "))
	ins := fmt.Sprintf(`INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t
WHERE (%s) IN (SELECT %s FROM %s WHERE seq > $1 AND seq < $2 AND op NOT IN ('T', 'P'))%s`,
		m.shadowIdent(), strings.Join(p.InsertCols, ", "), strings.Join(p.SelectExprs, ", "), m.srcRel(),
		strings.Join(src, ", "), strings.Join(kc, ", "), delta, m.filterAnd())
	// apply replays the keys with from < seq < to.
	apply := func(from, to int64) error {
		if _, err := m.exec(ctx, tx, del, from, to); err != nil {
			return fmt.Errorf("apply delta (delete): %w", err)
		}
		// Between the delete and the insert: make room for the re-read
		// rows in the shadow's unique indexes (see closure.go).
		if err := m.closeOver(ctx, tx, from, to); err != nil {
			return err
		}
		if _, err := m.exec(ctx, tx, ins, from, to); err != nil {
			return fmt.Errorf("apply delta (insert): %w", err)
		}
		return nil
	}
	if p.inherits() {
		apply = func(from, to int64) error { return m.applyTree(ctx, tx, from, to, on, src, kc) }
	}
	// TRUNCATE markers split the slice: the keys before a marker are applied,
	// then the shadow (or the shadow of the truncated partition) is emptied,
	// and the keys after it are re-read. Keys before a whole-table TRUNCATE
	// need no replay: those rows are gone from the original too.
	markers, err := m.q(ctx, tx, "SELECT seq::text, op::text, coalesce(rel, 0)::text FROM "+delta+
		" WHERE op IN ('T', 'P') AND seq >= $1 AND seq <= $2 ORDER BY seq", first, upto)
	if err != nil {
		return 0, err
	}
	from := first - 1
	for _, mk := range markers {
		seq, _ := strconv.ParseInt(mk[0], 10, 64)
		target := m.shadowIdent()
		if p.inherits() {
			// Each table of an inheritance tree fires its own TRUNCATE
			// trigger; the others' rows stay: replay ONLY that table.
			if err := apply(from, seq); err != nil {
				return 0, err
			}
			target = ""
			for _, tt := range m.treeTables() {
				if fmt.Sprint(tt.OID) == mk[2] {
					target = "ONLY " + tt.Dst
				}
			}
			if target == "" {
				return 0, fmt.Errorf("a table (oid %s) unknown when the job started was truncated", mk[2])
			}
		} else if mk[1] == "P" {
			if err := apply(from, seq); err != nil {
				return 0, err
			}
			target = ""
			for _, pt := range p.Partitions {
				if fmt.Sprint(pt.OID) == mk[2] {
					target = ident(pt.Schema, partShadow(pt))
				}
			}
			if target == "" {
				return 0, fmt.Errorf("a partition (oid %s) unknown when the job started was truncated", mk[2])
			}
		}
		empty := "TRUNCATE " + target
		if p.PubHidden {
			// Logical decoding does not skip a marked table's TRUNCATE
			// (publication.go): subscribers would get it.
			empty = "DELETE FROM " + target
		}
		if _, err := m.exec(ctx, tx, empty); err != nil {
			return 0, fmt.Errorf("replay truncate: %w", err)
		}
		m.event(ctx, m.currentPhase(), "a TRUNCATE of the original was replayed on "+target)
		from = seq
	}
	if err := apply(from, upto+1); err != nil {
		return 0, err
	}
	if indexed {
		// Verify goes on in this transaction with whole-table scans.
		if _, err := rawTx(tx).Exec(ctx, planDefaults); err != nil {
			return 0, err
		}
	}
	if mark {
		if err := m.markTouched(ctx, tx, first, upto, len(markers) > 0); err != nil {
			return 0, err
		}
	}
	tag, err := m.exec(ctx, tx, "DELETE FROM "+delta+" WHERE seq >= $1 AND seq <= $2", first, upto)
	if err != nil {
		return 0, fmt.Errorf("apply delta (trim): %w", err)
	}
	return tag.RowsAffected(), nil
}

// indexPlans makes the planner look keys up through indexes (it still
// scans a table that has no usable one): for a slice of the delta small
// against the table.
const indexPlans = "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"

// planDefaults undoes indexPlans for the statements after the apply.
const planDefaults = "RESET enable_seqscan; RESET enable_hashjoin; RESET enable_mergejoin"

// indexPlanSlice: a slice spanning fewer delta rows is applied with
// indexPlans. Above it a hash join may win on a small table; below it the
// lookups cost at most about a second on this kind of machine, whatever the
// table's size.
const indexPlanSlice = 20000

// rawTx is the transaction a restricted one (ownerTx) wraps: planner
// settings made in a restricted statement end with it.
func rawTx(tx pgx.Tx) pgx.Tx {
	if o, ok := tx.(*ownerTx); ok {
		return o.Tx
	}
	return tx
}

// applyTree is the delta apply of an inheritance tree: each table's keys
// (rel says which table held the row) are replayed from that table only.
func (m *migration) applyTree(ctx context.Context, tx pgx.Tx, from, to int64, on, src, kc []string) error {
	delta := m.deltaIdent()
	for _, tt := range m.treeTables() {
		del := fmt.Sprintf("DELETE FROM ONLY %s s USING %s d WHERE d.seq > $1 AND d.seq < $2 AND d.op NOT IN ('T', 'P') AND d.rel = $3 AND %s",
			tt.Dst, delta, strings.Join(on, " AND "))
		if _, err := m.exec(ctx, tx, del, from, to, tt.OID); err != nil {
			return fmt.Errorf("apply delta to %s (delete): %w", tt.Dst, err)
		}
		ins := fmt.Sprintf(`INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t
WHERE (%s) IN (SELECT %s FROM %s WHERE seq > $1 AND seq < $2 AND op NOT IN ('T', 'P') AND rel = $3)%s`,
			tt.Dst, strings.Join(tt.InsertCols, ", "), strings.Join(tt.SelectExprs, ", "), tt.Src,
			strings.Join(src, ", "), strings.Join(kc, ", "), delta, m.filterAnd())
		if _, err := m.exec(ctx, tx, ins, from, to, tt.OID); err != nil {
			return fmt.Errorf("apply delta to %s (insert): %w", tt.Dst, err)
		}
	}
	return nil
}

// markTouched marks (dirty) every range of the state table that holds the
// key of a delta row up to seq upto (all of them after a TRUNCATE), in the
// transaction that applies and trims those rows: a range never marked has
// had no change since the capture began, so verify may trust the checksum
// the copy took of it (verify.go). Only with verify: without, the copy
// keeps no checksum to protect (prepareSums).
func (m *migration) markTouched(ctx context.Context, tx pgx.Tx, first, upto int64, truncated bool) error {
	if !m.verifying() {
		return nil
	}
	p := m.plan
	rows, err := tx.Query(ctx, "SELECT range_id, lo, hi, rel FROM "+m.stateIdent()+" WHERE NOT dirty ORDER BY range_id")
	if err != nil {
		return fmt.Errorf("read clean ranges: %w", err)
	}
	clean, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (copyRange, error) {
		var c copyRange
		return c, r.Scan(&c.id, &c.lo, &c.hi, &c.rel)
	})
	if err != nil {
		return fmt.Errorf("read clean ranges: %w", err)
	}
	if len(clean) == 0 {
		return nil
	}
	if truncated {
		if _, err := m.exec(ctx, tx, "UPDATE "+m.stateIdent()+" SET dirty = true WHERE NOT dirty"); err != nil {
			return fmt.Errorf("mark ranges after a TRUNCATE: %w", err)
		}
		return nil
	}
	keys := make([]string, len(p.Key))
	for i := range keys {
		keys[i] = fmt.Sprintf("d.k%d", i+1)
	}
	// One pass over the slice: each delta row to the (one) clean range its
	// key falls in, NULL when its range is marked already.
	args := []any{first, upto}
	var whens strings.Builder
	for _, r := range clean {
		var conds []string
		if p.inherits() {
			args = append(args, m.treeTables()[r.rel].OID)
			conds = append(conds, fmt.Sprintf("d.rel = $%d::oid", len(args)))
		}
		if c := rangePred(keys, p.KeyTypes, r.lo, r.hi, &args); c != "" {
			conds = append(conds, c)
		}
		if len(conds) == 0 {
			conds = append(conds, "true")
		}
		args = append(args, r.id)
		fmt.Fprintf(&whens, " WHEN %s THEN $%d::int", strings.Join(conds, " AND "), len(args))
	}
	q := fmt.Sprintf(`UPDATE %s SET dirty = true WHERE range_id IN (
  SELECT CASE%s END FROM %s d WHERE d.seq >= $1 AND d.seq <= $2 AND d.op NOT IN ('T', 'P'))`, m.stateIdent(), whens.String(), m.deltaIdent())
	if _, err := m.exec(ctx, tx, q, args...); err != nil {
		return fmt.Errorf("mark the ranges the delta touched: %w", err)
	}
	return nil
}
