package replicate

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Trigger capture records the key of every changed row in T__tat_delta, a
// logged table (a crash loses nothing), from an AFTER ROW trigger and an
// AFTER TRUNCATE trigger. Only keys are stored: delta apply re-reads the
// current row from the original, so updates, key changes, deletes racing a
// copy batch and resurrected rows all converge to the original's state.
//
// An UPDATE that changes the key records both the old and the new key. A
// TRUNCATE records a marker ('T') that makes the apply empty the shadow.

const triggerName = "replicate__tat_delta"
const truncTriggerName = "replicate__tat_truncate"

func captureFunc(p *plan) string { return ident(p.Schema, shadowName(p.Table, "__tat_capture")) }

// triggerCapture is capture => 'trigger'.
type triggerCapture struct{ m *migration }

func (c triggerCapture) start(ctx context.Context) (string, error) {
	return "", c.m.installTrigger(ctx)
}
func (c triggerCapture) copied(context.Context) error       { return nil }
func (c triggerCapture) sync(context.Context, pgx.Tx) error { return nil }
func (c triggerCapture) stop(context.Context) error         { return nil } // the trigger goes with the table or cleanup
func (c triggerCapture) lagBytes() int64                    { return 0 }

// presync: the triggers' keys are in the delta as their transactions commit.
func (c triggerCapture) presync(context.Context, pgx.Tx) error { return nil }

// createDelta creates T__tat_delta: (seq, op, k1..kn). Both capture methods
// feed it; the applier reads it.
func (m *migration) createDelta(ctx context.Context) error {
	p := m.plan
	cols := make([]string, len(p.Key))
	for i := range p.Key {
		cols[i] = fmt.Sprintf("k%d %s", i+1, p.KeyTypes[i])
	}
	err := m.createOwned(ctx, m.pool, []string{"CREATE TABLE " + m.deltaIdent() +
		" (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, op \"char\" NOT NULL, rel oid, " + strings.Join(cols, ", ") + ")"},
		[]string{"TABLE " + m.deltaIdent()})
	if err != nil {
		return fmt.Errorf("create delta: %w", err)
	}
	return nil
}

// installTrigger creates the capture function and triggers. The triggers
// need a SHARE ROW EXCLUSIVE lock on the original, taken under the short
// lock_timeout with retries, so writers never queue long behind it.
func (m *migration) installTrigger(ctx context.Context) error {
	p := m.plan
	delta := m.deltaIdent()
	var newVals, oldVals []string
	for _, k := range p.Key {
		newVals = append(newVals, "NEW."+qi(k))
		oldVals = append(oldVals, "OLD."+qi(k))
	}
	kcols := keyCols(len(p.Key))
	create := []string{
		// SECURITY DEFINER: the application's roles need no privilege on the delta.
		fmt.Sprintf(`CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    -- 'T': the whole table; 'P': one partition (rel says which)
    INSERT INTO %s (op, rel) VALUES (CASE WHEN TG_RELID = %d THEN 'T' ELSE 'P' END, TG_RELID);
    RETURN NULL;
  END IF;
  -- rel: the table of an inheritance tree that holds the row
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO %s (op, rel, %s) VALUES ('U', TG_RELID, %s);
  END IF;
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND ROW(%s) IS DISTINCT FROM ROW(%s)) THEN
    INSERT INTO %s (op, rel, %s) VALUES ('D', TG_RELID, %s);
  END IF;
  RETURN NULL;
END $f$`, captureFunc(p), delta, m.t.OID, delta, kcols, strings.Join(newVals, ", "),
			strings.Join(oldVals, ", "), strings.Join(newVals, ", "), delta, kcols, strings.Join(oldVals, ", ")),
	}
	// The function belongs to the owner: SECURITY DEFINER then runs it
	// with her rights (her domain checks on the key columns included).
	if err := m.createOwned(ctx, m.pool, create, []string{"FUNCTION " + captureFunc(p) + "()"}); err != nil {
		return fmt.Errorf("create capture function: %w", err)
	}
	// ENABLE ALWAYS: changes applied by a logical replication subscriber
	// (session_replication_role = replica) must be captured too.
	return m.withLockRetries(ctx, m.pool, func(ctx context.Context, tx pgx.Tx) error {
		stmts := []string{
			fmt.Sprintf("CREATE TRIGGER %s AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()", qi(triggerName), m.t.ident(), captureFunc(p)),
			fmt.Sprintf("CREATE TRIGGER %s AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()", qi(truncTriggerName), m.t.ident(), captureFunc(p)),
			fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", m.t.ident(), qi(triggerName)),
			fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", m.t.ident(), qi(truncTriggerName)),
		}
		// A TRUNCATE of one partition fires only that partition's triggers.
		// An inheritance child's rows fire only its own row triggers.
		for _, pt := range p.Partitions {
			if pt.PartKey != "" || pt.Foreign {
				continue
			}
			part := ident(pt.Schema, pt.Name)
			if pt.Inherit {
				stmts = append(stmts,
					fmt.Sprintf("CREATE TRIGGER %s AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()", qi(triggerName), part, captureFunc(p)),
					fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", part, qi(triggerName)))
			}
			stmts = append(stmts,
				fmt.Sprintf("CREATE TRIGGER %s AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()", qi(truncTriggerName), part, captureFunc(p)),
				fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", part, qi(truncTriggerName)))
		}
		for _, s := range stmts {
			if _, err := m.exec(ctx, tx, s); err != nil {
				return err
			}
		}
		return nil
	}, nil)
}

func keyCols(n int) string {
	s := make([]string, n)
	for i := range s {
		s[i] = fmt.Sprintf("k%d", i+1)
	}
	return strings.Join(s, ", ")
}

// isLockTimeout tells a lock_timeout (55P03) from other errors.
func isLockTimeout(err error) bool {
	var pe *pgconn.PgError
	return errors.Is(err, errSwitchPostponed) || errors.As(err, &pe) && pe.Code == "55P03"
}

// withLockRetries runs fn in a transaction with a short lock_timeout. On a
// lock timeout it rolls back, waits time_between_locks (jittered) and tries
// again with a longer timeout (up to 4x the first), so that sessions queued
// behind our lock request never wait long, and retries do not synchronise
// with a periodic blocker.
func (m *migration) withLockRetries(ctx context.Context, db *pgxpool.Pool, fn func(context.Context, pgx.Tx) error, between func(context.Context) error) error {
	timeout := m.lockTimeout()
	for attempt := 1; ; attempt++ {
		if err := m.hold(ctx); err != nil {
			return err
		}
		err := m.lockedTx(ctx, db, timeout, fn)
		if err == nil {
			return nil
		}
		if !isLockTimeout(err) {
			return err
		}
		m.lockAttempts.Add(1)
		if errors.Is(err, errSwitchPostponed) {
			m.event(ctx, m.currentPhase(), fmt.Sprintf("lock attempt %d: %v", attempt, err))
		} else {
			m.event(ctx, m.currentPhase(), fmt.Sprintf("lock attempt %d timed out after %s; retrying", attempt, timeout))
		}
		m.report(ctx)
		if m.opts.MaxLockAttempts > 0 && attempt >= m.opts.MaxLockAttempts {
			return fmt.Errorf("could not lock %s in %d attempts: %w", m.tableRef(), attempt, err)
		}
		wait := m.timeBetweenLocks()
		if wait > 0 {
			wait = wait/2 + time.Duration(rand.Int64N(int64(wait)))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		if between != nil {
			if err := between(ctx); err != nil {
				return err
			}
		}
		if next := timeout * 3 / 2; next <= m.lockTimeout()*4 {
			timeout = next
		}
	}
}

func (m *migration) lockedTx(ctx context.Context, db *pgxpool.Pool, timeout time.Duration, fn func(context.Context, pgx.Tx) error) error {
	tx, err := db.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	ms := timeout.Milliseconds()
	if ms < 1 {
		ms = 1
	}
	if _, err := tx.Exec(ctx, fmt.Sprintf("SET LOCAL lock_timeout = %d", ms)); err != nil {
		return err
	}
	if err := fn(ctx, tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

func (m *migration) currentPhase() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.phase
}

// dropShadow removes the shadow, delta and state tables and the capture
// triggers of this run. The triggers go under the same short-lock retries.
func (m *migration) dropShadow(ctx context.Context) error {
	if m.t == nil || m.t.OID == 0 {
		return nil
	}
	return cleanup(ctx, m.admin, m.t.Schema, m.t.Name, m)
}

// Cleanup drops every leftover of an earlier run on table (shadow, delta,
// state, capture triggers and function), leaving the table itself untouched.
func Cleanup(ctx context.Context, caller *pgxpool.Pool, tableName string) error {
	pool, err := pinnedPool(ctx, caller)
	if err != nil {
		return err
	}
	defer pool.Close()
	var schema, name string
	err = caller.QueryRow(ctx, `select n.nspname, c.relname from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
		where c.oid = pg_catalog.to_regclass($1::text)`, tableName).Scan(&schema, &name)
	if err != nil {
		return fmt.Errorf("cleanup: table %s: %w", tableName, err)
	}
	m := &migration{pool: pool, admin: pool, opts: DefaultOptions(), rep: NopReporter{}}
	m.cmd = &Command{Schema: schema, Table: name}
	if err := cleanup(ctx, pool, schema, name, m); err != nil {
		return err
	}
	// The login role of a run that died (see sandbox.go).
	var db, rel uint32
	if err := pool.QueryRow(ctx, `select d.oid, to_regclass($1)::oid from pg_database d where d.datname = current_database()`,
		ident(schema, name)).Scan(&db, &rel); err != nil {
		return fmt.Errorf("cleanup: table %s: %w", tableName, err)
	}
	if err := dropRunRole(ctx, pool, runRoleName(db, rel)); err != nil {
		return fmt.Errorf("cleanup: drop role %s: %w", runRoleName(db, rel), err)
	}
	return nil
}

func cleanup(ctx context.Context, pool *pgxpool.Pool, schema, name string, m *migration) error {
	tbl := ident(schema, name)
	// A kept old table (keep.go) is tat.finish's or tat.revert's: its
	// reverse capture triggers bear the capture's names.
	if err := refuseCleanupKept(ctx, pool, schema, name); err != nil {
		return err
	}
	if err := cleanupKeep(ctx, m, pool, schema, name); err != nil {
		return fmt.Errorf("cleanup %s: keep_old: %w", tbl, err)
	}
	// Capture triggers on the table and, for a partitioned table, on its partitions.
	trigs, err := m.q(ctx, pool, `select quote_ident(n.nspname) || '.' || quote_ident(c.relname), quote_ident(t.tgname)
		from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
		where (t.tgrelid = to_regclass($1) or t.tgrelid in (with recursive tree(oid) as (
		  select inhrelid from pg_inherits where inhparent = to_regclass($1)
		  union all select h.inhrelid from tree join pg_inherits h on h.inhparent = tree.oid) select oid from tree))
		  and t.tgname in ($2, $3)`,
		tbl, triggerName, truncTriggerName)
	if err != nil {
		return fmt.Errorf("cleanup %s: %w", tbl, err)
	}
	if len(trigs) > 0 {
		err := m.withLockRetries(ctx, pool, func(ctx context.Context, tx pgx.Tx) error {
			for _, tg := range trigs {
				if _, err := m.exec(ctx, tx, "DROP TRIGGER IF EXISTS "+tg[1]+" ON "+tg[0]); err != nil {
					return err
				}
			}
			return nil
		}, nil)
		if err != nil {
			return fmt.Errorf("cleanup %s: drop capture trigger: %w", tbl, err)
		}
	}
	if err := cleanupLogical(ctx, m, pool, schema, name); err != nil {
		return fmt.Errorf("cleanup %s: %w", tbl, err)
	}
	if err := dropDefaultGuard(ctx, m, pool, schema, name); err != nil {
		return fmt.Errorf("cleanup %s: default partition: %w", tbl, err)
	}
	p := &plan{Schema: schema, Table: name}
	// Names are truncated to 63 bytes, so another table's leftovers may
	// answer to them: only objects of the table's owner (or of the engine's
	// role: the state table) are a run of this table's.
	var foreign string
	err = pool.QueryRow(ctx, `select coalesce(string_agg(o.what || ' (owned by ' || pg_get_userbyid(o.owner) || ')', ', '), '')
		from (select c.oid::regclass::text as what, c.relowner as owner from pg_class c where c.oid in (to_regclass($2), to_regclass($3), to_regclass($4), to_regclass($6))
		      union all select p.oid::regprocedure::text, p.proowner from pg_proc p where p.oid in (to_regprocedure($5), to_regprocedure($7))) o
		join pg_class t on t.oid = to_regclass($1)
		where o.owner <> t.relowner and o.owner <> (select oid from pg_roles where rolname = current_user)`,
		tbl, ident(schema, shadowName(name, "__tat_new")), ident(schema, shadowName(name, "__tat_delta")),
		ident(schema, shadowName(name, "__tat_state")), captureFunc(p)+"()",
		ident(schema, shadowName(name, "__tat_exec")), ident(schema, shadowName(name, "__tat_exec"))+"(text, text, text)").Scan(&foreign)
	if err != nil {
		return fmt.Errorf("cleanup %s: %w", tbl, err)
	}
	if foreign != "" {
		return fmt.Errorf("%w: cleanup %s: %s belong to another role than the table's owner: not a run of this table's, left alone", errDenied, tbl, foreign)
	}
	if err := dropForeignShadows(ctx, m, pool, schema, name); err != nil {
		return fmt.Errorf("cleanup %s: foreign tables: %w", tbl, err)
	}
	for _, s := range []string{
		// CASCADE: the shadows of inheritance children depend on it.
		"DROP TABLE IF EXISTS " + ident(schema, shadowName(name, "__tat_new")) + " CASCADE",
		"DROP TABLE IF EXISTS " + ident(schema, shadowName(name, "__tat_delta")),
		"DROP TABLE IF EXISTS " + ident(schema, shadowName(name, "__tat_state")),
		"DROP FUNCTION IF EXISTS " + captureFunc(p) + "()",
		"DROP MATERIALIZED VIEW IF EXISTS " + ident(schema, shadowName(name, "__tat_exec")),
		"DROP FUNCTION IF EXISTS " + ident(schema, shadowName(name, "__tat_exec")) + "(text, text, text)",
	} {
		if _, err := m.exec(ctx, pool, s); err != nil {
			return fmt.Errorf("cleanup %s: %w", tbl, err)
		}
	}
	return nil
}

// HasEarlierRun reports whether a run on table (a regclass text) left its
// state behind, i.e. it had not switched. A driver whose earlier attempt
// died in the switch phase uses it to tell a committed switch (nothing
// left: the job is done) from one that rolled back (continue it).
func HasEarlierRun(ctx context.Context, pool *pgxpool.Pool, tableName string) (bool, error) {
	var left bool
	// Qualified throughout: this runs in the caller's session, whose
	// search_path may reach functions a table owner planted.
	err := pool.QueryRow(ctx, `select exists(select 1 from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
		join pg_catalog.pg_class t on t.relnamespace = n.oid and t.oid = pg_catalog.to_regclass($1::text)
		where c.relname in (pg_catalog.left(t.relname::text, 63 - pg_catalog.length('__tat_state')) || '__tat_state',
		                    -- a kept old table (keep.go): its window goes on
		                    pg_catalog.left(t.relname::text, 63 - pg_catalog.length('__tat_rstate')) || '__tat_rstate'))`, tableName).Scan(&left)
	if err != nil {
		return false, fmt.Errorf("look for an earlier run on %s: %w", tableName, err)
	}
	return left, nil
}
