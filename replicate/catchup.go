package replicate

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Delta apply is set-based: one transaction takes a bounded slice of the
// delta (by seq), deletes those keys from the shadow, re-inserts them from
// the original's current rows (through the command's expressions) and
// deletes the slice. It runs REPEATABLE READ so all three statements see the
// same snapshot: a delta row committed in between is neither half-applied
// nor deleted unapplied; the next round takes it.

// maxSwitchLag is how much WAL logical capture may still have to read when
// the catch-up hands over to the switch.
const maxSwitchLag = 8 << 20

// catchup applies the delta until the backlog is below min_delta_rows,
// giving up after CatchupTimeout when writers outpace it.
func (m *migration) catchup(ctx context.Context) error {
	start := time.Now()
	for {
		if err := m.hold(ctx); err != nil {
			return err
		}
		n, err := m.applyDelta(ctx, m.pool, int64(m.batchSize())*10)
		if err != nil {
			return err
		}
		backlog, err := m.backlog(ctx, m.pool)
		if err != nil {
			return err
		}
		// Logical capture: the delta is only complete once the stream is
		// close to the WAL's end, else the switch would wait for it under lock.
		streamBehind := m.capture != nil && m.capture.lagBytes() > maxSwitchLag
		if !streamBehind && (backlog < m.opts.MinDeltaRows || (n == 0 && backlog == 0)) {
			return nil
		}
		if n == 0 {
			select { // nothing to apply yet: let the stream catch up
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
		if m.opts.CatchupTimeout > 0 && time.Since(start) > m.opts.CatchupTimeout {
			return fmt.Errorf("delta backlog still %d rows after %s: writes outpace the catch-up", backlog, m.opts.CatchupTimeout)
		}
	}
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

// applyDelta applies up to limit delta rows (all of them when limit <= 0,
// which the switch uses under its lock) and returns how many it applied.
func (m *migration) applyDelta(ctx context.Context, db txStarter, limit int64) (int64, error) {
	tx, err := db.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	n, err := m.applyDeltaTx(ctx, tx, limit)
	if err != nil {
		return 0, err
	}
	return n, tx.Commit(ctx)
}

func (m *migration) applyDeltaTx(ctx context.Context, tx pgx.Tx, limit int64) (int64, error) {
	p := m.plan
	delta := m.deltaIdent()
	var upto *int64
	var err error
	if limit > 0 {
		err = tx.QueryRow(ctx, "SELECT max(seq) FROM (SELECT seq FROM "+delta+" ORDER BY seq LIMIT $1) s", limit).Scan(&upto)
	} else {
		err = tx.QueryRow(ctx, "SELECT max(seq) FROM "+delta).Scan(&upto)
	}
	if err != nil {
		return 0, fmt.Errorf("read delta: %w", err)
	}
	if upto == nil {
		return 0, nil
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
		m.shadowIdent(), strings.Join(p.InsertCols, ", "), strings.Join(p.SelectExprs, ", "), m.t.ident(),
		strings.Join(src, ", "), strings.Join(kc, ", "), delta, m.filterAnd())
	// apply replays the keys with from < seq < to.
	apply := func(from, to int64) error {
		if _, err := m.exec(ctx, tx, del, from, to); err != nil {
			return fmt.Errorf("apply delta (delete): %w", err)
		}
		if _, err := m.exec(ctx, tx, ins, from, to); err != nil {
			return fmt.Errorf("apply delta (insert): %w", err)
		}
		return nil
	}
	// TRUNCATE markers split the slice: the keys before a marker are applied,
	// then the shadow (or the shadow of the truncated partition) is emptied,
	// and the keys after it are re-read. Keys before a whole-table TRUNCATE
	// need no replay: those rows are gone from the original too.
	markers, err := m.q(ctx, tx, "SELECT seq::text, op::text, coalesce(rel, 0)::text FROM "+delta+
		" WHERE op IN ('T', 'P') AND seq <= $1 ORDER BY seq", *upto)
	if err != nil {
		return 0, err
	}
	from := int64(0)
	for _, mk := range markers {
		seq, _ := strconv.ParseInt(mk[0], 10, 64)
		target := m.shadowIdent()
		if mk[1] == "P" {
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
		if _, err := m.exec(ctx, tx, "TRUNCATE "+target); err != nil {
			return 0, fmt.Errorf("replay truncate: %w", err)
		}
		m.event(ctx, m.currentPhase(), "a TRUNCATE of the original was replayed on "+target)
		from = seq
	}
	if err := apply(from, *upto+1); err != nil {
		return 0, err
	}
	tag, err := m.exec(ctx, tx, "DELETE FROM "+delta+" WHERE seq <= $1", *upto)
	if err != nil {
		return 0, fmt.Errorf("apply delta (trim): %w", err)
	}
	return tag.RowsAffected(), nil
}
