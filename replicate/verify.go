package replicate

import (
	"context"
	"fmt"
	"math/big"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// verify proves, before the switch, that the shadow equals the original
// passed through the command's transformation. One REPEATABLE READ
// transaction applies the delta visible in its snapshot and then compares
// the row count and a sum of row hashes of both tables: in that snapshot
// every change to the original is either in the applied delta or not
// visible at all, so the two sides must be equal, while writers keep
// writing (nothing is locked beyond ACCESS SHARE).
//
// The shadow side is read whole, in one (parallel) scan per table: nothing
// about the shadow is taken on trust. The original's side is not read
// again where it cannot have changed: the copy computed each range's
// checksum over exactly the rows it inserted (src_sum in the state table),
// and every change to the original since the capture began has its keys
// in the delta, whose apply marks the ranges they fall in (dirty). A range
// never marked holds the rows the copy read, so its stored checksum is the
// original's side in this snapshot; only marked ranges (and ranges copied
// without a checksum) are hashed again from the original. The argument in
// full is in README.md.
//
// When the totals of a table differ, each range is compared on its own,
// and a range that differs is recopied in the same snapshot (and marked,
// so the next round hashes its original side again) and checked again in
// the next round; after three rounds with differences the job fails, the
// original untouched.
//
// An inheritance tree is verified table by table: each table's range (the
// state table's rel) compares that table's own rows (FROM ONLY) with its
// own shadow's, through its own column list, because a child's columns of
// its own are invisible through the root and a recopy through the root
// would put a child's rows into the root's shadow.
func (m *migration) verify(ctx context.Context) error {
	p := m.plan
	targets, err := m.hashTargets(ctx)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	srcKeys := make([]string, len(p.Key))
	dstKeys := make([]string, len(p.Key))
	for i := range p.Key {
		srcKeys[i] = "t." + qi(p.Key[i])
		dstKeys[i] = "s." + qi(p.ShadowKey[i])
	}
	for round := 1; round <= 3; round++ {
		if err := m.hold(ctx); err != nil {
			return err
		}
		var bad, total, rehashed, wholeTables, apart int
		err := pgx.BeginTxFunc(ctx, m.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead}, func(tx pgx.Tx) error {
			// Each scan is one simple expression over every row: JIT
			// compiling it (in the leader and each worker) cost more than
			// it saved (0.86-1.09 s against 0.74-0.83 s at 4M rows).
			if _, err := tx.Exec(ctx, "SET LOCAL jit = off"); err != nil {
				return err
			}
			// Logical capture: what the stream had not brought when the
			// snapshot was taken (logical.go's streamedLate).
			late, err := m.streamedLate(ctx, tx)
			if err != nil {
				return err
			}
			// The apply marks the ranges its keys fall in: read the
			// ranges after it.
			if _, err := m.applyDeltaTx(ctx, tx, 0); err != nil {
				return err
			}
			if err := m.applyLate(ctx, tx, late); err != nil {
				return err
			}
			ranges, err := m.verifyRanges(ctx, tx, len(targets))
			if err != nil {
				return err
			}
			total = len(ranges)
			share := "" // S's snapshot, exported for hashBoth
			for rel, vt := range targets {
				if err := m.hook(ctx, tx, "verify"); err != nil {
					return err
				}
				var rs []*verifyRange
				for _, r := range ranges {
					if r.rel == rel {
						rs = append(rs, r)
					}
				}
				// The original's side: stored where it cannot have
				// changed, hashed again where it may have.
				srcN, srcSum := int64(0), new(big.Int)
				// No stored checksum to trust (a plain copy takes none):
				// the original whole, in one scan like the shadow's; the
				// ranges are hashed one by one only if the totals differ.
				whole := len(rs) > 1
				for _, r := range rs {
					whole = whole && (!r.trusted(vt.kind) || late != nil)
				}
				hashRange := func(r *verifyRange) error {
					sc, sargs := rangeCond(srcKeys, p.KeyTypes, r.lo, r.hi)
					sc = m.filterWhere(sc)
					if err := tx.QueryRow(ctx, vt.aggSQL(vt.srcRow, vt.src, "t", sc), sargs...).Scan(&r.n, &r.sum); err != nil {
						return fmt.Errorf("hash range %d of the original %s: %w", r.id, vt.src, err)
					}
					rehashed++
					return nil
				}
				var dn int64
				var dh string
				dstSQL := vt.aggSQL(vt.dstRow, vt.dstRead, "s", "") // the shadow whole, in one scan
				if whole {
					wholeTables++
					if share == "" {
						if share, err = exportSnapshot(ctx, tx); err != nil {
							return err
						}
					}
					var sum string
					srcSQL := vt.aggSQL(vt.srcRow, vt.src, "t", m.filterWhere(""))
					var together bool
					if srcN, sum, dn, dh, together, err = m.hashBoth(ctx, tx, share, srcSQL, dstSQL); err != nil {
						return fmt.Errorf("hash %s and its shadow: %w", vt.src, err)
					}
					if _, ok := srcSum.SetString(sum, 10); !ok {
						return fmt.Errorf("checksum of %s: %q is not an integer", vt.src, sum)
					}
					if !together {
						apart++
					}
				} else {
					for _, r := range rs {
						if !r.trusted(vt.kind) {
							if err := hashRange(r); err != nil {
								return err
							}
						}
						v, ok := new(big.Int).SetString(r.sum, 10)
						if !ok {
							return fmt.Errorf("checksum of range %d: %q is not an integer", r.id, r.sum)
						}
						srcN += r.n
						srcSum.Add(srcSum, v)
					}
					if err := tx.QueryRow(ctx, dstSQL).Scan(&dn, &dh); err != nil {
						return fmt.Errorf("hash the shadow %s: %w", vt.dst, err)
					}
				}
				if dn == srcN && dh == srcSum.String() {
					continue
				}
				// Which ranges differ: each compared on its own.
				for _, r := range rs {
					if whole {
						if err := hashRange(r); err != nil {
							return err
						}
					}
					if len(rs) > 1 {
						dc, dargs := rangeCond(dstKeys, p.KeyTypes, r.lo, r.hi)
						if err := tx.QueryRow(ctx, vt.aggSQL(vt.dstRow, vt.dstRead, "s", dc), dargs...).Scan(&dn, &dh); err != nil {
							return fmt.Errorf("hash range %d of the shadow %s: %w", r.id, vt.dst, err)
						}
						if sum, ok := new(big.Int).SetString(r.sum, 10); ok && dn == r.n && dh == sum.String() {
							continue
						}
					}
					bad++
					if err := m.recopy(ctx, tx, vt, r, srcKeys, dstKeys, dn); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("verify: %w", err)
		}
		if bad == 0 {
			how := fmt.Sprintf("%d hashed again from the original, the others checked against the copy's checksums", rehashed)
			if wholeTables == len(targets) {
				how = "the original and the shadow hashed whole, side by side"
				if apart > 0 {
					how = "the original and the shadow hashed whole, one after the other"
				}
			}
			m.event(ctx, PhaseVerify, fmt.Sprintf("shadow verified equal to the original in %d ranges (%s)", total, how))
			return nil
		}
	}
	return fmt.Errorf("verify: the shadow still differs from the original after 3 rounds")
}

// exportSnapshot exports S's snapshot for hashBoth's second session.
func exportSnapshot(ctx context.Context, tx pgx.Tx) (string, error) {
	var snap string
	if err := tx.QueryRow(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
		return "", fmt.Errorf("export verify's snapshot: %w", err)
	}
	return snap, nil
}

// halfWorkers gives a scan half the parallel workers one scan would get
// (its leader counted): two scans at once then use about the processes
// one parallel scan did. It returns the setting it replaced.
const halfWorkers = `SELECT current_setting('max_parallel_workers_per_gather'), set_config('max_parallel_workers_per_gather',
  (greatest(current_setting('max_parallel_workers_per_gather')::int - 1, 0) / 2)::text, true)`

// hashBoth hashes the original (src) and its shadow (dst) whole, at the
// same time: the shadow in S, which holds S's own writes to it (the delta
// applied, the late keys re-read, the recopies), the original from a
// second session that imports S's snapshot (snap): S never writes the
// original, so both sessions see the same rows of it. Verify is two
// scans; a parallel scan gains little on a small machine (2 cores, 2M
// rows: 0.49 s against 0.71 s serial), so the two scans at once, with
// half the workers each, beat two parallel scans one after the other
// (1.03 s against 1.27 s here).
//
// The second session is read-write like S: the ALTER's expressions run
// there as in S (a function of the owner's that writes, as a USING
// expression may, would fail there and nowhere else).
//
// The second session waits for no lock longer than hashLockWait: a DDL
// queued on the original behind S would queue it too, and S waits for it
// where PostgreSQL's deadlock detector cannot see. On any failure of the
// second session the original is hashed in S, after the shadow.
func (m *migration) hashBoth(ctx context.Context, tx pgx.Tx, snap, src, dst string) (sn int64, ss string, dn int64, ds string, together bool, err error) {
	type side struct {
		n   int64
		sum string
		err error
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	other := make(chan side, 1)
	go func() {
		var r side
		r.err = pgx.BeginTxFunc(sctx, m.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead}, func(otx pgx.Tx) error {
			if _, err := otx.Exec(sctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(snap)); err != nil {
				return err
			}
			if _, err := otx.Exec(sctx, "SELECT set_config('jit', 'off', true), set_config('lock_timeout', $1, true)",
				fmt.Sprint(hashLockWait.Milliseconds())); err != nil {
				return err
			}
			var old, now string
			if err := otx.QueryRow(sctx, halfWorkers).Scan(&old, &now); err != nil {
				return err
			}
			return otx.QueryRow(sctx, src).Scan(&r.n, &r.sum)
		})
		other <- r
	}()
	var old, now string
	if err := tx.QueryRow(ctx, halfWorkers).Scan(&old, &now); err != nil {
		return 0, "", 0, "", false, err
	}
	if err := tx.QueryRow(ctx, dst).Scan(&dn, &ds); err != nil {
		return 0, "", 0, "", false, fmt.Errorf("the shadow: %w", err)
	}
	if _, err := tx.Exec(ctx, "SELECT set_config('max_parallel_workers_per_gather', $1, true)", old); err != nil {
		return 0, "", 0, "", false, err
	}
	if r := <-other; r.err == nil {
		return r.n, r.sum, dn, ds, true, nil
	}
	if err := tx.QueryRow(ctx, src).Scan(&sn, &ss); err != nil {
		return 0, "", 0, "", false, fmt.Errorf("the original: %w", err)
	}
	return sn, ss, dn, ds, false, nil
}

// hashLockWait: the most hashBoth's second session waits for a lock.
const hashLockWait = time.Second

// recopy replaces a range of the shadow with the original's rows in the
// verify snapshot and marks it, so that the next round hashes its
// original side again rather than trusting the copy's checksum.
func (m *migration) recopy(ctx context.Context, tx pgx.Tx, vt verifyTarget, r *verifyRange, srcKeys, dstKeys []string, dn int64) error {
	p := m.plan
	where := ""
	if p.inherits() {
		where = " of " + strings.TrimPrefix(vt.src, "ONLY ")
	}
	m.event(ctx, PhaseVerify, fmt.Sprintf("range %d%s differs (%d rows vs %d in the shadow): recopying it", r.id, where, r.n, dn))
	sc, sargs := rangeCond(srcKeys, p.KeyTypes, r.lo, r.hi)
	sc = m.filterWhere(sc)
	dc, dargs := rangeCond(dstKeys, p.KeyTypes, r.lo, r.hi)
	if _, err := m.exec(ctx, tx, "DELETE FROM "+vt.dstRead+" s"+dc, dargs...); err != nil {
		return fmt.Errorf("recopy range %d into %s: %w", r.id, vt.dst, err)
	}
	ins := fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t%s",
		vt.dst, strings.Join(vt.insertCols, ", "), strings.Join(vt.selectExprs, ", "), vt.src, sc)
	if _, err := m.exec(ctx, tx, ins, sargs...); err != nil {
		return fmt.Errorf("recopy range %d into %s: %w", r.id, vt.dst, err)
	}
	if _, err := m.exec(ctx, tx, "UPDATE "+m.stateIdent()+" SET dirty = true WHERE range_id = $1", r.id); err != nil {
		return fmt.Errorf("mark range %d recopied: %w", r.id, err)
	}
	return nil
}

// verifying: verify runs (and the copy checksums, the apply marks) when
// asked for.
func (m *migration) verifying() bool { return m.opts.Verify }

// lateKeys are the delta rows committed after verify's snapshot S that
// hold the keys of changes committed before it: the stream brought them
// late. Keys holds each key column's values as text, rels the table of an
// inheritance tree that held each row (0 otherwise); nil: trigger capture.
type lateKeys struct {
	keys [][]string
	rels []uint32
}

// streamedLate, under logical capture, is the first statement of verify's
// transaction S: the delta's last seq in S. The stream lags the table:
// a change committed before S may not be in the delta S sees, and the
// original's side in S would differ from the shadow where it will not
// once the change arrives. So: emit a marker after S and wait for the
// stream to pass it (every change committed before S is then in the
// delta, committed), and read, from another session, the delta rows S
// cannot see. applyLate re-reads their keys in S, which makes the shadow
// the original as of S for every key changed before it; a key changed
// after S is re-read in S too, which is what S compares. Those delta rows
// stay for the catch-up, which applies them again (a re-read by key is
// idempotent).
func (m *migration) streamedLate(ctx context.Context, tx pgx.Tx) (*lateKeys, error) {
	lc, ok := m.capture.(*logicalCapture)
	if !ok {
		return nil, nil
	}
	var maxS int64
	if err := tx.QueryRow(ctx, "SELECT coalesce(max(seq), 0) FROM "+m.deltaIdent()).Scan(&maxS); err != nil {
		return nil, fmt.Errorf("read the delta in the snapshot: %w", err)
	}
	if err := lc.marker(ctx, m.admin); err != nil {
		return nil, fmt.Errorf("logical capture: stream up to the snapshot: %w", err)
	}
	n := len(m.plan.Key)
	cols := make([]string, n)
	for i := range cols {
		cols[i] = fmt.Sprintf("k%d::text", i+1)
	}
	rows, err := m.q(ctx, m.pool, "SELECT op::text, coalesce(rel, 0)::text, "+strings.Join(cols, ", ")+" FROM "+m.deltaIdent()+" WHERE seq > $1 ORDER BY seq", maxS)
	if err != nil {
		return nil, fmt.Errorf("read the delta streamed after the snapshot: %w", err)
	}
	late := &lateKeys{keys: make([][]string, n)}
	for _, r := range rows {
		if r[0] == "T" || r[0] == "P" {
			// Replayed by the catch-up; in S its effect shows as ranges
			// that differ, which verify recopies from S.
			continue
		}
		rel, err := strconv.ParseUint(r[1], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("delta rel %q: %w", r[1], err)
		}
		late.rels = append(late.rels, uint32(rel))
		for i := range n {
			late.keys[i] = append(late.keys[i], r[i+2])
		}
	}
	return late, nil
}

// applyLate re-reads the late keys in S: the delta apply's statements over
// the keys as arrays; in an inheritance tree, each table's keys from that
// table only (FROM ONLY, into its own shadow), as applyTree does.
func (m *migration) applyLate(ctx context.Context, tx pgx.Tx, late *lateKeys) error {
	if late == nil || len(late.keys) == 0 || len(late.keys[0]) == 0 {
		return nil
	}
	p := m.plan
	if !p.inherits() {
		t := treeTable{Src: m.srcRel(), Dst: m.shadowIdent(), InsertCols: p.InsertCols, SelectExprs: p.SelectExprs}
		if err := m.applyLateTo(ctx, tx, t, m.shadowIdent(), late.keys); err != nil {
			return err
		}
	} else {
		for _, tt := range m.treeTables() {
			keys := make([][]string, len(late.keys))
			for j, rel := range late.rels {
				if rel == tt.OID {
					for i := range keys {
						keys[i] = append(keys[i], late.keys[i][j])
					}
				}
			}
			if len(keys[0]) == 0 {
				continue
			}
			if err := m.applyLateTo(ctx, tx, tt, "ONLY "+tt.Dst, keys); err != nil {
				return err
			}
		}
	}
	m.event(ctx, PhaseVerify, fmt.Sprintf("%d changes streamed after verify's snapshot was taken: their keys were re-read in it", len(late.keys[0])))
	return nil
}

// applyLateTo re-reads keys (each key column's values as text) from t's
// original into its shadow (del: the shadow as the DELETE names it).
func (m *migration) applyLateTo(ctx context.Context, tx pgx.Tx, t treeTable, del string, keys [][]string) error {
	p := m.plan
	n := len(p.Key)
	arrays := make([]string, n)
	cast := make([]string, n)
	on := make([]string, n)
	src := make([]string, n)
	alias := make([]string, n)
	args := make([]any, n)
	for i := range n {
		arrays[i] = fmt.Sprintf("$%d::text[]", i+1)
		cast[i] = fmt.Sprintf("u.k%d::%s AS k%d", i+1, p.KeyTypes[i], i+1)
		on[i] = fmt.Sprintf("s.%s = d.k%d", qi(p.ShadowKey[i]), i+1)
		src[i] = "t." + qi(p.Key[i])
		alias[i] = fmt.Sprintf("k%d", i+1)
		args[i] = keys[i]
	}
	d := fmt.Sprintf("(SELECT DISTINCT %s FROM unnest(%s) AS u(%s))", strings.Join(cast, ", "), strings.Join(arrays, ", "), strings.Join(alias, ", "))
	delSQL := fmt.Sprintf("DELETE FROM %s s USING %s d WHERE %s", del, d, strings.Join(on, " AND "))
	ins := fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s t WHERE (%s) IN (SELECT %s FROM %s d)%s",
		t.Dst, strings.Join(t.InsertCols, ", "), strings.Join(t.SelectExprs, ", "), t.Src,
		strings.Join(src, ", "), strings.Join(alias, ", "), d, m.filterAnd())
	if _, err := m.exec(ctx, tx, delSQL, args...); err != nil {
		return fmt.Errorf("re-read the keys streamed late into %s (delete): %w", t.Dst, err)
	}
	if _, err := m.exec(ctx, tx, ins, args...); err != nil {
		return fmt.Errorf("re-read the keys streamed late into %s (insert): %w", t.Dst, err)
	}
	return nil
}

// verifyRange is a copy range as verify sees it: its stored source
// checksum, or (once hashed again) the original's side in the snapshot.
type verifyRange struct {
	copyRange
	done, dirty bool
	n           int64   // rows of the original's side
	sum         string  // sum of their hashes, as an integer's text
	stored      *string // the copy's checksum (nil: unknown)
	kind        *string // how the copy hashed (nil: it did not)
}

// trusted: the copy's checksum of the range stands for the original's side
// now: the range was copied whole with a checksum hashed as verify hashes,
// and no captured change (nor a recopy) has touched it since.
func (r *verifyRange) trusted(kind string) bool {
	return r.done && !r.dirty && r.stored != nil && r.kind != nil && *r.kind == kind
}

func (m *migration) verifyRanges(ctx context.Context, tx pgx.Tx, tables int) ([]*verifyRange, error) {
	rows, err := tx.Query(ctx, "SELECT range_id, lo, hi, rel, done, dirty, rows, src_sum::text, src_hash FROM "+m.stateIdent()+" ORDER BY range_id")
	if err != nil {
		return nil, fmt.Errorf("read ranges: %w", err)
	}
	ranges, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*verifyRange, error) {
		r := &verifyRange{}
		err := row.Scan(&r.id, &r.lo, &r.hi, &r.rel, &r.done, &r.dirty, &r.n, &r.stored, &r.kind)
		if r.stored != nil {
			r.sum = *r.stored
		}
		return r, err
	})
	if err != nil {
		return nil, fmt.Errorf("read ranges: %w", err)
	}
	for _, r := range ranges {
		if r.rel < 0 || r.rel >= tables {
			return nil, fmt.Errorf("range %d names table %d of a tree of %d", r.id, r.rel, tables)
		}
	}
	return ranges, nil
}

// verifyTarget is what one range compares: an original and its shadow,
// the shadow's columns and the expressions that fill them, and how a side
// of a range is hashed.
type verifyTarget struct {
	src         string // original, as read (ONLY for a table of an inheritance tree)
	dst         string // shadow, as written
	dstRead     string // shadow, as read and deleted from (ONLY in a tree)
	insertCols  []string
	selectExprs []string
	srcRow      []string // the original's row passed through the command, cast to the shadow's types
	dstRow      []string // the shadow's row
	copyCols    []string // the copy's CTE columns holding the expressions' values (_c1...)
	copyRow     []string // those, cast to the shadow's types: srcRow as the copy has it
	colHash     []string // per column: the function hashing it with a seed (fmt: value, seed); "" for the row's record hash
	kind        string   // which hash ("chain" or "md5"), stored with the copy's checksums
}

// hashOf is the 64-bit hash of one row (its values, in the shadow's column
// order). "chain": each column hashed by its type's own extended hash
// function, seeded with the hash of the columns before it, so a value in
// another column or row hashes differently; no composite is built per row,
// which costs several times more than the hashing itself. A NULL hashes as
// a hash of the seed alone. A type not in chainHash is hashed as a
// one-column record (14+). "md5": md5 of the row's text (before 14 with
// such a type, or a column type without a hash function).
func (vt *verifyTarget) hashOf(row []string) string {
	switch vt.kind {
	case "md5":
		return "('x' || pg_catalog.substr(pg_catalog.md5(ROW(" + strings.Join(row, ", ") + ")::text), 1, 15))::bit(60)::bigint"
	}
	h := "0::bigint"
	for j, v := range row {
		f := vt.colHash[j]
		if f == "" {
			f = "pg_catalog.hash_record_extended(ROW(%s), %s)"
		}
		h = fmt.Sprintf("coalesce(%s, pg_catalog.hashint8extended(%s, %d))", fmt.Sprintf(f, v, h), h, j+1)
	}
	return h
}

// aggSQL counts and hash-sums the rows of table (as alias) under cond.
func (vt *verifyTarget) aggSQL(row []string, table, alias, cond string) string {
	return "SELECT count(*), " + vt.sumOf(row) + " FROM " + table + " " + alias + cond
}

// chainHash: the extended hash function of common built-in types (by
// regtype), as a call with the value and the seed. Other types are hashed
// as a one-column record (any type with a hash opclass).
var chainHash = map[string]string{
	"smallint": "pg_catalog.hashint2extended(%s, %s)", "integer": "pg_catalog.hashint4extended(%s, %s)",
	"bigint": "pg_catalog.hashint8extended(%s, %s)", "oid": "pg_catalog.hashoidextended(%s, %s)",
	"text": "pg_catalog.hashtextextended(%s, %s)", "character varying": "pg_catalog.hashtextextended((%s)::text, %s)",
	"character": "pg_catalog.hashbpcharextended(%s, %s)", "numeric": "pg_catalog.hash_numeric_extended(%s, %s)",
	"boolean": "pg_catalog.hashint4extended((%s)::integer, %s)", "uuid": "pg_catalog.uuid_hash_extended(%s, %s)",
	"double precision": "pg_catalog.hashfloat8extended(%s, %s)", "real": "pg_catalog.hashfloat4extended(%s, %s)",
	"timestamp without time zone": "pg_catalog.timestamp_hash_extended(%s, %s)",
	"jsonb":                       "pg_catalog.jsonb_hash_extended(%s, %s)",
}

// sumOf is the sum of the hashes of row, as an integer's text (0 when no row).
func (vt *verifyTarget) sumOf(row []string) string { return vt.sumOver(row, "") }

// sumOver is sumOf as a window aggregate over window ("": a plain aggregate).
func (vt *verifyTarget) sumOver(row []string, window string) string {
	return "coalesce(sum(" + vt.hashOf(row) + ")" + window + ", 0)::text"
}

// kindArg is the kind as a statement parameter: NULL without checksums.
func (vt *verifyTarget) kindArg() any {
	if vt == nil {
		return nil
	}
	return vt.kind
}

// sumTarget is what the copy checksums rows of table rel with; nil when
// verify is off (then the copy takes no checksum).
//
// Only a table whose copy evaluates a USING expression gets them: that
// expression may be volatile (or just costly), so the copy materialises
// each batch and hashes the values it inserts, and verify trusts them for
// ranges no change has touched. A plain copy (columns as they are, cast by
// the INSERT) gets none: verify hashes the original whole in its snapshot,
// one parallel sequential scan, cheaper than checksumming every batch of
// the copy (a materialised batch cost 80 % of the copy, a second read of it
// 10-20 %; the whole scan 5-8 %). Under logical capture verify hashes the
// original whole in any case (streamedLate), so the copy takes none.
func (m *migration) sumTarget(rel int) *verifyTarget {
	if m.sums == nil || rel < 0 || rel >= len(m.sums) || plainExprs(m.sums[rel].selectExprs) || m.opts.Capture == CaptureLogical {
		return nil
	}
	return &m.sums[rel]
}

// plainExprs: every copy expression is a column of the original (no
// USING), so reading the original again gives the values the copy wrote.
func plainExprs(exprs []string) bool {
	for _, e := range exprs {
		if !strings.HasPrefix(e, "t.") {
			return false
		}
	}
	return true
}

// prepareSums, before the copy: with verify, the hashes the copy's batches
// checksum their rows with. Without, every stored checksum is forgotten: the
// delta's apply marks ranges only for verify (markTouched), so a checksum
// kept through a run without verify could be stale when a continued run
// verifies.
func (m *migration) prepareSums(ctx context.Context) error {
	if !m.verifying() {
		m.sums = nil
		if _, err := m.exec(ctx, m.pool, "UPDATE "+m.stateIdent()+" SET src_sum = NULL WHERE src_sum IS NOT NULL"); err != nil {
			return fmt.Errorf("forget the copy's checksums: %w", err)
		}
		return nil
	}
	targets, err := m.hashTargets(ctx)
	if err != nil {
		return fmt.Errorf("checksums: %w", err)
	}
	m.sums = targets
	return nil
}

// hashTargets lists what the ranges' rel index: the table itself (a
// plain or partitioned table, rel 0), or every table of an inheritance
// tree in treeTables order; with how each is hashed, decided once per run
// (the copy's checksums and verify must hash alike).
func (m *migration) hashTargets(ctx context.Context) ([]verifyTarget, error) {
	if m.sums != nil {
		return m.sums, nil
	}
	var ver int
	if err := m.pool.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&ver); err != nil {
		return nil, fmt.Errorf("server version: %w", err)
	}
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
		types, err := m.q(ctx, m.pool, `select attname, format_type(atttypid, atttypmod), atttypid::regtype::text from pg_attribute
			where attrelid = $1::regclass and attnum > 0 and not attisdropped`, vt.dst)
		if err != nil {
			return nil, fmt.Errorf("column types of %s: %w", vt.dst, err)
		}
		typeOf, baseOf := map[string]string{}, map[string]string{}
		for _, t := range types {
			typeOf[qi(t[0])], baseOf[qi(t[0])] = t[1], t[2]
		}
		n := len(vt.insertCols)
		vt.srcRow, vt.dstRow, vt.copyCols, vt.copyRow = make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		nulls := make([]string, n)
		vt.colHash = make([]string, n)
		for j, c := range vt.insertCols {
			vt.colHash[j] = chainHash[baseOf[c]]
			vt.srcRow[j] = fmt.Sprintf("(%s)::%s", vt.selectExprs[j], typeOf[c])
			vt.dstRow[j] = "s." + c
			vt.copyCols[j] = fmt.Sprintf("_c%d", j+1)
			vt.copyRow[j] = fmt.Sprintf("(_c%d)::%s", j+1, typeOf[c])
			nulls[j] = "NULL::" + typeOf[c]
		}
		// A 64-bit hash of each row (hashOf), summed (as numeric: no
		// overflow). Hashing the values themselves avoids printing every
		// row as text, which cost several times the copy; md5 of the text
		// stays the fallback. Per table: a child may have a column of its
		// own without a hash function. The probe hashes a row of NULLs of
		// the shadow's types: functions are resolved when the statement is
		// planned and a record's hash functions looked up per column
		// whatever the values, so an empty shadow (before the copy) answers
		// as a full one would.
		vt.kind = "chain"
		for _, f := range vt.colHash {
			if f == "" && ver < 140000 {
				vt.kind = "md5" // before 14, no hash_record_extended for the other types
			}
		}
		if vt.kind == "chain" {
			if _, err := m.pool.Exec(ctx, "SELECT "+vt.hashOf(nulls)); err != nil {
				vt.kind = "md5" // a column type without a hash function
			}
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
