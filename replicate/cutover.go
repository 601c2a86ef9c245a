package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// cutover swaps the shadow in, in one transaction:
//
//	read dependents (before any lock, prelock.go); SET LOCAL lock_timeout;
//	LOCK original IN ACCESS EXCLUSIVE MODE; apply the last delta; prove the
//	table and its dependents unchanged (else read them again); drop views, functions, inbound
//	FKs, materialized views (replacements built before the lock); DROP original; RENAME shadow; rename indexes and sequences;
//	re-create dependents; drop delta, state and capture function; COMMIT.
//
// The lock is requested only when no other session has held a lock on the
// table for longer than lock_timeout (that request would time out anyway,
// after stalling every writer queued behind it). On lock timeout the
// transaction rolls back, the job waits time_between_locks (jittered),
// catches up, and tries again.
func (m *migration) cutover(ctx context.Context) error {
	var deps *dependents
	// Materialized views over the table are rebuilt over the shadow now,
	// outside the lock: a refresh under it would hold it for the refresh.
	if err := m.buildMatViews(ctx); err != nil {
		return err
	}
	// One more round right before the lock: what is applied under the lock
	// is then only what arrives in these milliseconds.
	if _, err := m.applyDelta(ctx, m.pool, int64(m.batchSize())*10); err != nil {
		return err
	}
	if err := m.setupRestricted(ctx); err != nil {
		return err
	}
	if err := m.hook(ctx, nil, hookBeforeLock); err != nil {
		return err
	}
	err := m.withLockRetries(ctx, m.admin, func(ctx context.Context, tx pgx.Tx) error {
		if err := m.waitForBlockers(ctx); err != nil {
			return err
		}
		// What the switch must know about the original is read now, right
		// before the lock, and only proven unchanged under it.
		pre := m.readBeforeLock(ctx, tx)
		if err := m.settleBeforeLock(ctx, tx); err != nil {
			return err
		}
		if err := m.hook(ctx, nil, hookDependentsRead); err != nil {
			return err
		}
		if pt := m.plan.Parent; pt != nil {
			// Dropping a partition and attaching another lock the parent
			// (ONLY: not its other partitions); parent first, as queries do.
			if _, err := m.exec(ctx, tx, "LOCK TABLE ONLY "+pt.ident()+" IN ACCESS EXCLUSIVE MODE"); err != nil {
				return err
			}
			if pt.DefaultName != "" {
				if _, err := m.exec(ctx, tx, "LOCK TABLE "+ident(pt.DefaultSchema, pt.DefaultName)+" IN ACCESS EXCLUSIVE MODE"); err != nil {
					return err
				}
			}
		}
		if _, err := m.exec(ctx, tx, "LOCK TABLE "+m.t.ident()+" IN ACCESS EXCLUSIVE MODE"); err != nil {
			return err
		}
		started := time.Now()
		d, err := m.swap(ctx, tx, pre)
		if err != nil {
			return err
		}
		deps = d
		m.event(ctx, PhaseSwitch, fmt.Sprintf("table swapped; lock held %s", time.Since(started).Round(time.Millisecond)))
		for _, n := range d.notes {
			m.event(ctx, PhaseSwitch, n)
		}
		return nil
	}, func(ctx context.Context) error {
		// Everything captured so far, outside the lock: the next attempt
		// finds only what arrives meanwhile.
		n, err := m.applyDelta(ctx, m.pool, 0)
		if err != nil || n < m.switchBudget() {
			return err
		}
		// A large backlog leaves the delta full of dead rows and its
		// statistics stale: the next attempt would scan them under its lock.
		_, err = m.exec(ctx, m.pool, "VACUUM (ANALYZE) "+m.deltaIdent())
		return err
	})
	if err != nil {
		return err
	}
	m.validations = deps.validate
	return nil
}

// hookBeforeLock is the TestHook point right before the switch's first
// lock attempt (tx is nil): a test commits a bulk change there.
const hookBeforeLock = "before-lock"

// hookDependentsRead is the TestHook point between the read of the
// dependents (and the last catch-up) and the lock request (tx is nil): a
// test changes a dependent or the table there.
const hookDependentsRead = "dependents-read"

// settleBeforeLock applies the delta in rounds right before the lock
// request, each round applying what arrived during the one before, until a
// round is short. The apply is faster than the writes, so the rounds
// shrink (geometrically under a steady writer) and the lock is left with
// what arrives in the last short round and the lock's round trip: about
// settleTarget of writes, not the hundreds of milliseconds that pass
// between the catch-up and the lock (matviews, dependents, the blockers'
// check). Logical capture drains the stream to a marker before each round
// (presync), or the rounds would only apply what the walsender happened to
// have decoded. A writer faster than the apply never settles: after
// settleRounds the switch goes ahead anyway, its budget (deltaWithinBudget)
// bounding what it may apply under the lock.
func (m *migration) settleBeforeLock(ctx context.Context, tx pgx.Tx) error {
	small := max(settleMinRows, m.applyRate.Load()*settleTarget.Microseconds()/1e6)
	limit := int64(m.batchSize()) * 10
	deadline := time.Now().Add(settleMaxTime)
	for round := 0; round < settleRounds && time.Now().Before(deadline); {
		if err := m.capture.presync(ctx, tx); err != nil {
			return err
		}
		n, err := m.applyDelta(ctx, m.pool, limit)
		if err != nil {
			return err
		}
		if n <= small {
			return nil
		}
		if n < limit {
			// A full slice is a backlog (a bulk change just committed),
			// not a round: it is caught up here, outside the lock.
			round++
		}
	}
	return nil
}

const (
	settleTarget  = 10 * time.Millisecond // of apply, at the measured rate
	settleMinRows = 100
	settleRounds  = 6
	settleMaxTime = time.Minute
)

// errSwitchPostponed: more changes arrived since the last catch-up than the
// switch may apply under its lock; it lets go, catches up and tries again,
// like after a lock timeout.
var errSwitchPostponed = errors.New("switch postponed")

// deltaWithinBudget bounds the lock window whatever writers do (a bulk
// transaction committed while the job waited for the lock): under the lock
// the switch applies at most what the catch-up applies in about
// lock_timeout, at the rate it measured (never less than minSwitchBudget
// changes). It returns the delta's bounds for the apply (nil: empty, or a
// revert, whose apply reads its own).
//
// The count comes from the bounds (two descents of the seq index): seq
// values are dense but for rolled-back writes, so the span is the count or
// more, and only a span over the budget is counted, through the index. A
// count(*) scanned the delta's heap, full of the rows earlier applies
// trimmed (29-61 ms under the lock with a flat-out writer).
func (m *migration) deltaWithinBudget(ctx context.Context, tx pgx.Tx) (first, upto *int64, err error) {
	budget := m.switchBudget()
	postpone := fmt.Errorf("%w: more than %d changes arrived since the last catch-up (the most the lock's budget allows); catching up outside the lock first",
		errSwitchPostponed, budget)
	if m.rev != nil {
		var n int64
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM (SELECT 1 FROM "+m.rev.deltaIdent()+" LIMIT $1) d", budget+1).Scan(&n); err != nil {
			return nil, nil, fmt.Errorf("measure the last delta: %w", err)
		}
		if n > budget {
			return nil, nil, postpone
		}
		return nil, nil, nil
	}
	if first, upto, err = m.deltaBounds(ctx, tx, 0); err != nil || upto == nil {
		return nil, nil, err
	}
	if *upto-*first+1 <= budget {
		return first, upto, nil
	}
	var n int64
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM (SELECT 1 FROM "+m.deltaIdent()+" WHERE seq >= $1 ORDER BY seq LIMIT $2) d",
		*first, budget+1).Scan(&n); err != nil {
		return nil, nil, fmt.Errorf("measure the last delta: %w", err)
	}
	if n > budget {
		return nil, nil, postpone
	}
	return first, upto, nil
}

// minSwitchBudget is the switch's budget before any rate was measured.
const minSwitchBudget = 2000

func (m *migration) switchBudget() int64 {
	rate := m.applyRate.Load() // changes per second
	return max(minSwitchBudget, rate*m.lockTimeout().Milliseconds()/1000)
}

// waitForBlockers waits (up to about ten lock attempts' worth of time) while
// another session has held a lock on the table for longer than lock_timeout.
func (m *migration) waitForBlockers(ctx context.Context) error {
	for i := 0; i < 10; i++ {
		var pids []int32
		err := m.pool.QueryRow(ctx, `select coalesce(array_agg(distinct l.pid), '{}') from pg_locks l
			join pg_stat_activity a on a.pid = l.pid
			where l.locktype = 'relation' and l.relation = any($1::oid[]) and l.granted and l.pid <> pg_backend_pid()
			  and a.xact_start < now() - $2::interval`, m.lockedOIDs(), fmt.Sprintf("%d ms", m.lockTimeout().Milliseconds())).Scan(&pids)
		if err != nil {
			return fmt.Errorf("look for blockers: %w", err)
		}
		if len(pids) == 0 {
			return nil
		}
		m.event(ctx, PhaseSwitch, fmt.Sprintf("sessions %v hold long locks on the table; waiting before the lock request", pids))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(max(m.timeBetweenLocks(), 100*time.Millisecond)):
		}
	}
	return nil
}

// lockedOIDs: the tables the switch locks (and the materialized views it
// replaces).
func (m *migration) lockedOIDs() []uint32 {
	oids := []uint32{m.t.OID}
	if m.plan != nil && m.plan.Parent != nil {
		oids = append(oids, m.plan.Parent.OID)
	}
	// The switch drops the materialized views over the table: a long
	// query on one of them would make the attempt time out as well.
	for _, v := range m.matViews {
		oids = append(oids, v.OID)
	}
	return oids
}

// ErrConcurrentDDL: the original's shape changed while the job ran.
var ErrConcurrentDDL = errors.New("concurrent DDL")

// swap runs under the switch's lock: the last delta, the proof that the
// original and its dependents are as read (pre, read before the lock; nil:
// read now), then the statements, pipelined.
func (m *migration) swap(ctx context.Context, tx pgx.Tx, pre *switchReads) (*dependents, error) {
	p := m.plan
	if err := m.capture.sync(ctx, tx); err != nil {
		return nil, fmt.Errorf("capture sync: %w", err)
	}
	// The owner's code of the last delta runs restricted (restricted.go).
	ftx := m.restrictedTx(tx)
	first, upto, err := m.deltaWithinBudget(ctx, ftx)
	if err != nil {
		return nil, err
	}
	// Under the lock the slice is small (the budget) and the table may be
	// huge: index lookups whatever the delta's statistics say (they were
	// taken when it was large; a seq scan of the original here held the
	// lock for the scan).
	if _, err := tx.Exec(ctx, indexPlans); err != nil {
		return nil, err
	}
	applyStart := time.Now()
	var n int64
	switch {
	case m.rev != nil:
		n, err = m.applyDeltaSlice(ctx, ftx, 0, false)
	case upto != nil:
		n, err = m.applyDeltaRange(ctx, ftx, *first, *upto, false)
	}
	if err != nil {
		return nil, fmt.Errorf("final delta: %w", err)
	}
	last := fmt.Sprintf("last delta under the lock: %d changes applied in %s", n, time.Since(applyStart).Round(time.Millisecond))
	if _, err := tx.Exec(ctx, planDefaults); err != nil {
		return nil, err
	}
	if _, err := tx.Exec(ctx, catalogPath); err != nil {
		return nil, err
	}
	fp, depFP, err := m.switchFingerprints(ctx, tx, pre != nil)
	if err != nil {
		return nil, err
	}
	if fp != p.Fingerprint {
		return nil, fmt.Errorf("%w: the definition of %s changed during the migration (concurrent DDL); nothing was switched", ErrConcurrentDDL, m.tableRef())
	}
	reads := pre
	if pre != nil && depFP != pre.fp {
		m.event(ctx, PhaseSwitch, "the dependents changed since they were read before the lock; reading them again under it")
		reads = nil
	}
	if reads == nil {
		if reads, err = m.readSwitch(ctx, tx); err != nil {
			return nil, err
		}
	}
	d, partIdx := reads.d, reads.partIdx
	d.notes = append(d.notes, last)
	// Re-create with the session's search_path and, as pg_dump does, without
	// checking function bodies (they resolve names when called).
	if _, err := tx.Exec(ctx, "reset search_path; set local check_function_bodies = off"); err != nil {
		return nil, err
	}
	run := func(what string, stmts []string) error {
		b := &pgx.Batch{}
		for _, s := range stmts {
			if m.opts.ShowQueries != nil {
				m.opts.ShowQueries(s)
			}
			b.Queue(s)
		}
		br := tx.SendBatch(ctx, b)
		for _, s := range stmts {
			if _, err := br.Exec(); err != nil {
				br.Close()
				return fmt.Errorf("%s: %s: %w", what, s, err)
			}
		}
		return br.Close()
	}
	if err := m.switchCommand(ctx, tx, m.opts.CommandBeforeSwitch, "command before switch"); err != nil {
		return nil, err
	}
	if err := run("detach dependents", d.before); err != nil {
		return nil, err
	}
	// After the last delta: the shadow's writes so far stay unpublished,
	// the new table's are published (publication.go).
	if err := run("publications", m.unhideStatements()); err != nil {
		return nil, err
	}
	if err := m.unhide(ctx, tx); err != nil {
		return nil, err
	}
	tbl := ident(p.Schema, p.Table)
	drop := tbl
	var stmts []string
	for _, pt := range p.Partitions {
		switch {
		case pt.Inherit && pt.Foreign:
			stmts = append(stmts, "DROP FOREIGN TABLE "+ident(pt.Schema, pt.Name))
		case pt.Inherit:
			// Children of an inheritance tree go with it, in one statement.
			drop += ", " + ident(pt.Schema, pt.Name)
		}
	}
	if m.keep != nil {
		// keep_old: the original is renamed, not dropped (keep.go).
		ks, err := m.keepOldStatements(ctx, tx)
		if err != nil {
			return nil, err
		}
		stmts = append(stmts, ks...)
	} else {
		stmts = append(stmts, "DROP TABLE "+drop)
	}
	stmts = append(stmts, "ALTER TABLE "+m.shadowIdent()+" RENAME TO "+qi(p.Table))
	for _, pt := range p.Partitions {
		kind := "TABLE "
		if pt.Foreign {
			kind = "FOREIGN TABLE "
		}
		stmts = append(stmts, "ALTER "+kind+ident(pt.Schema, partShadow(pt))+" RENAME TO "+qi(pt.Name))
	}
	for _, si := range p.Indexes {
		if si.Final != si.Name {
			schema := si.Schema
			if schema == "" {
				schema = p.Schema
			}
			stmts = append(stmts, "ALTER INDEX "+ident(schema, si.Name)+" RENAME TO "+qi(si.Final))
		}
	}
	if err := run("swap", stmts); err != nil {
		return nil, err
	}
	if err := run("attach to parent", m.attachBack(tbl)); err != nil {
		return nil, err
	}
	if err := run("attach foreign tables", p.attachForeign()); err != nil {
		return nil, err
	}
	if err := m.renamePartitionIndexes(ctx, tx, tbl, partIdx, run); err != nil {
		return nil, err
	}
	if err := run("rename identity sequences", d.identity); err != nil {
		return nil, err
	}
	if err := run("re-create dependents", d.after); err != nil {
		return nil, err
	}
	if err := m.switchCommand(ctx, tx, m.opts.CommandAfterSwitch, "command after switch"); err != nil {
		return nil, err
	}
	if err := m.hook(ctx, tx, PhaseSwitch); err != nil {
		return nil, err
	}
	if err := run("drop capture", []string{
		"DROP TABLE " + m.deltaIdent(),
		"DROP TABLE " + m.stateIdent(),
		"DROP FUNCTION IF EXISTS " + captureFunc(p) + "()", // trigger capture only
		"DROP MATERIALIZED VIEW IF EXISTS " + m.execName(),
		"DROP FUNCTION IF EXISTS " + m.execName() + "(text, text, text)",
	}); err != nil {
		return nil, err
	}
	if m.keep != nil {
		if err := m.keepStart(ctx, tx); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// fkCheck is a foreign key the switch re-created NOT VALID. Table is SQL
// (quoted, qualified).
type fkCheck struct{ Table, Name string }

// qFKBuiltin: validating the key runs only PostgreSQL's own functions: the
// columns on both sides are of built-in types (or domains over them) and
// its operators are pg_catalog's. VALIDATE CONSTRAINT runs its check as the
// current role; with a user's type (an implicit cast of hers, an operator)
// it would run her function with the engine's rights.
const qFKBuiltin = `select coalesce(bool_and(t.typnamespace = 'pg_catalog'::regnamespace
		or (t.typtype = 'd' and b.typnamespace = 'pg_catalog'::regnamespace)), false)
	  and not exists (select 1 from pg_constraint c2, unnest(c2.conpfeqop || c2.conppeqop || c2.conffeqop) o(op)
		join pg_operator op on op.oid = o.op join pg_proc p on p.oid = op.oprcode
		where c2.oid = c.oid and p.pronamespace <> 'pg_catalog'::regnamespace),
	pg_has_role($3::name, r.relowner, 'MEMBER')
	from pg_constraint c join pg_class r on r.oid = c.conrelid,
	  unnest(c.conkey || c.confkey, array_fill(c.conrelid, array[cardinality(c.conkey)]) || array_fill(c.confrelid, array[cardinality(c.confkey)])) k(att, rel)
	join pg_attribute a on a.attrelid = k.rel and a.attnum = k.att
	join pg_type t on t.oid = a.atttypid left join pg_type b on b.oid = t.typbasetype
	where c.conrelid = $1::regclass and c.conname = $2
	group by c.oid, r.relowner`

// validate validates the foreign keys re-created NOT VALID at the switch.
// It takes SHARE UPDATE EXCLUSIVE, which does not block reads or writes.
// A key whose check would run functions of a user's runs in the owner's
// sandbox when the owner's role owns its table, and is left NOT VALID
// (saying so) otherwise.
func (m *migration) validate(ctx context.Context) error {
	owner := m.t.Owner
	if m.sb != nil {
		owner = m.sb.owner
	}
	for _, fk := range m.validations {
		s := "ALTER TABLE " + fk.Table + " VALIDATE CONSTRAINT " + qi(fk.Name)
		var builtin, hers bool
		if err := m.admin.QueryRow(ctx, qFKBuiltin, fk.Table, fk.Name, owner).Scan(&builtin, &hers); err != nil {
			return fmt.Errorf("inspect foreign key %s on %s: %w", fk.Name, fk.Table, err)
		}
		db := m.admin
		switch {
		case builtin:
		case hers:
			db = m.pool
		default:
			m.event(ctx, PhaseValidate, fmt.Sprintf("foreign key %s on %s left NOT VALID: checking it would run functions of a user-defined type or operator "+
				"with the sidecar's rights; its owner can run %s", fk.Name, fk.Table, s))
			continue
		}
		err := m.withLockRetries(ctx, db, func(ctx context.Context, tx pgx.Tx) error {
			_, err := m.exec(ctx, tx, s)
			return err
		}, nil)
		if err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// qPartitionIndexes lists, for every partition of $1, its indexes attached
// to an index of its parent, parents first: (schema, partition, parent
// index, index, parent index's oid, index's oid).
const qPartitionIndexes = `
select n.nspname, pc.relname, pi.relname, ci.relname, pi.oid::text, ci.oid::text
from pg_partition_tree($1::regclass) pt
join pg_index x on x.indrelid = pt.relid
join pg_class ci on ci.oid = x.indexrelid
join pg_namespace n on n.oid = ci.relnamespace
join pg_class pc on pc.oid = x.indrelid
join pg_inherits h on h.inhrelid = ci.oid
join pg_class pi on pi.oid = h.inhparent
where pt.level > 0
order by pt.level, ci.oid`

// partitionIndexNames remembers the names of the original partitions'
// indexes (PostgreSQL names them itself when a parent index is created).
func (m *migration) partitionIndexNames(ctx context.Context, tx execer, tbl string) (map[string]string, error) {
	if len(m.plan.Partitions) == 0 {
		return nil, nil
	}
	rows, err := m.q(ctx, tx, qPartitionIndexes, tbl)
	if err != nil {
		return nil, fmt.Errorf("read the names of the partitions' indexes: %w", err)
	}
	names := map[string]string{}
	for _, r := range rows {
		names[r[1]+"\x00"+r[2]] = r[3]
	}
	return names, nil
}

// renamePartitionIndexes gives the new partitions' indexes the original
// names: one read, then every rename in one round trip. An index is known by
// its partition and the name of the index it is attached to, which is the
// parent's new name when the parent index is itself renamed (rows come
// parents first, so it is known by then).
func (m *migration) renamePartitionIndexes(ctx context.Context, tx pgx.Tx, tbl string, names map[string]string,
	run func(string, []string) error) error {
	if len(m.plan.Partitions) == 0 {
		return nil
	}
	rows, err := m.q(ctx, tx, qPartitionIndexes, tbl)
	if err != nil {
		return fmt.Errorf("read the new partitions' indexes: %w", err)
	}
	final := map[string]string{} // index oid -> its name after the renames
	var stmts []string
	for _, r := range rows {
		parent := r[2]
		if f, ok := final[r[4]]; ok {
			parent = f
		}
		want, ok := names[r[1]+"\x00"+parent]
		if !ok {
			// An index the ALTER added: PostgreSQL named it after the
			// shadow partition; in place it would bear the partition's name.
			if pre := shadowName(r[1], "__tat_new"); strings.HasPrefix(r[3], pre+"_") {
				want, ok = truncName(r[1]+strings.TrimPrefix(r[3], pre), 63), true
			}
		}
		if !ok || want == r[3] {
			continue
		}
		final[r[5]] = want
		stmts = append(stmts, "ALTER INDEX "+ident(r[0], r[3])+" RENAME TO "+qi(want))
	}
	return run("rename partition indexes", stmts)
}
