package replicate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Keeping the old table after the switch (Options.KeepOld, tat.alter's
// keep_old, pg_tat --keep-old-table) and reverting to it.
//
// The switch renames the original to T__tat_old instead of dropping it
// (its indexes and identity sequences renamed out of the way; the objects
// the switch re-creates on the new table — triggers, rules, policies,
// extended statistics, outbound foreign keys, publication membership —
// taken off it, so that they neither fire on nor block anything while it is
// kept, and do not collide when a revert re-creates them). In the same
// transaction the trigger capture is installed in reverse: the new table's
// changes are recorded by key in T__tat_rdelta, and the engine applies them
// to T__tat_old through the inverse of the ALTER (a cast back to the old
// type; a column the ALTER dropped keeps its values, a column it added is
// ignored). The reverse apply runs in the engine's sessions (the owner's
// sandbox), never in the writer's transaction: a value that cannot go back
// (bigint > 2^31 into an int) only makes the revert impossible, and the
// reason is kept in T__tat_rstate and reported.
//
// A revert is a migration in the other direction whose shadow is
// T__tat_old: the same cut-over (lock_timeout and retries, last delta under
// the lock, dependents dropped and re-created, fingerprint checks), with the
// reverse apply as its delta apply. Finishing (tat.finish or the end of the
// window) drops T__tat_old and the reverse capture.
//
// State lives in the database: the keep plan is the comment of
// T__tat_rstate (owned by the engine's role, like the forward plan: the
// revert acts on it with the engine's rights), the backlog is the logged
// T__tat_rdelta. A run that finds T__tat_rstate for its table continues the
// kept window.

// PhaseKept is the phase of a job whose old table is kept; PhaseRevert the
// one of its revert.
const (
	PhaseKept   = "kept"
	PhaseRevert = "revert"
)

// ErrRevertImpossible: a value written after the switch cannot be converted
// back to the old table's definition, or the old table is gone.
var ErrRevertImpossible = errors.New("revert impossible")

// KeepControl is an optional extension of Control: the driver's requests
// during the kept window.
type KeepControl interface {
	// KeepRequest reports whether a revert (tat.revert) or the end of the
	// window (tat.finish) was asked for.
	KeepRequest(ctx context.Context) (revert, finish bool, err error)
}

// KeepStatus is what the kept window looks like.
type KeepStatus struct {
	Table   string    // the table, quoted and qualified
	Old     string    // the kept old table, quoted and qualified
	Backlog int64     // changes of the new table not yet applied to the old one
	Until   time.Time // when the old table is dropped
	Blocked string    // why a revert is impossible ("" while it is possible)
	// Outcome: "" while kept, "reverted" or "finished" at the end.
	Outcome string
}

// KeepReporter is an optional extension of Reporter.
type KeepReporter interface {
	Kept(ctx context.Context, s KeepStatus)
}

// Outcomes of a kept window.
const (
	OutcomeReverted = "reverted"
	OutcomeFinished = "finished"
)

// keepPlan is the reverse migration, saved as the comment of T__tat_rstate.
type keepPlan struct {
	Schema string    `json:"schema"`
	Table  string    `json:"table"`
	Old    string    `json:"old"`
	Delta  string    `json:"delta"`
	State  string    `json:"state"`
	Func   string    `json:"func"`
	Until  time.Time `json:"until"`

	Key         []string `json:"key"` // on the new table
	KeyTypes    []string `json:"key_types"`
	OldKey      []string `json:"old_key"`
	OldKeyTypes []string `json:"old_key_types"`
	// The reverse apply: INSERT INTO old (Cols) SELECT Exprs FROM new n.
	Cols  []string `json:"cols"`
	Exprs []string `json:"exprs"`
	// Kept: columns of the old table the ALTER dropped; a row updated after
	// the switch keeps their values.
	Kept    []string          `json:"kept"`
	Indexes []shadowIndex     `json:"indexes"` // the old table's indexes: renamed name -> original
	FKs     []namedDef        `json:"fks"`     // its outbound foreign keys, off while kept
	Renames map[string]string `json:"renames"` // new column name -> old
}

func (k *keepPlan) oldIdent() string   { return ident(k.Schema, k.Old) }
func (k *keepPlan) deltaIdent() string { return ident(k.Schema, k.Delta) }
func (k *keepPlan) stateIdent() string { return ident(k.Schema, k.State) }
func (k *keepPlan) funcIdent() string  { return ident(k.Schema, k.Func) }
func (k *keepPlan) tableIdent() string { return ident(k.Schema, k.Table) }

func keepNames(table string) (old, delta, state, fn string) {
	return shadowName(table, "__tat_old"), shadowName(table, "__tat_rdelta"), shadowName(table, "__tat_rstate"), shadowName(table, "__tat_rcapture")
}

// refuseKeep refuses keep_old, at the start of a run, where there is no
// way back: trees, and USING expressions (no inverse is known).
func (m *migration) refuseKeep() error {
	if m.opts.KeepOld <= 0 || !m.cmd.NeedsRewrite() {
		return nil
	}
	if len(m.t.Partitions) > 0 || m.t.Parent != nil || m.t.Kind == "p" {
		return fmt.Errorf("%w: keep_old is not supported for partitioned tables, inheritance trees or partitions (%s): "+
			"run the migration without keep_old", ErrBadCommand, m.tableRef())
	}
	for _, c := range m.t.Columns {
		if _, ok, err := m.cmd.UsingExpr(c.Name); err != nil {
			return err
		} else if ok {
			return fmt.Errorf("%w: keep_old cannot keep %s in sync: column %s is changed with a USING expression, "+
				"which has no known inverse to bring the new table's writes back to the old table; run the migration without keep_old",
				ErrBadCommand, m.tableRef(), qi(c.Name))
		}
	}
	if m.sb != nil && m.sb.mode == modeLogin && !m.sb.adminState {
		return fmt.Errorf("%w: keep_old needs CREATE on schema %s for the sidecar's role %s (its state drives the revert, run with the sidecar's rights)",
			ErrBadCommand, qi(m.t.Schema), m.sb.me)
	}
	return nil
}

// planKeep builds the reverse plan once the shadow exists (after prepare),
// and proves that every inverse expression applies (a type with no cast
// back is refused now, not after the copy).
func (m *migration) planKeep(ctx context.Context) error {
	p := m.plan
	old, delta, state, fn := keepNames(p.Table)
	k := &keepPlan{Schema: p.Schema, Table: p.Table, Old: old, Delta: delta, State: state, Func: fn,
		OldKey: p.Key, OldKeyTypes: p.KeyTypes, Key: p.ShadowKey, Renames: map[string]string{}}
	for o, n := range p.Renames {
		k.Renames[n] = o
	}
	rows, err := m.q(ctx, m.admin, `select attname, format_type(atttypid, atttypmod) from pg_attribute
		where attrelid = $1::regclass and attnum > 0 and not attisdropped`, m.shadowIdent())
	if err != nil {
		return fmt.Errorf("read the shadow's columns: %w", err)
	}
	newCols := map[string]string{}
	for _, r := range rows {
		newCols[r[0]] = r[1]
	}
	for _, key := range k.Key {
		k.KeyTypes = append(k.KeyTypes, newCols[key])
	}
	for _, c := range m.t.Columns {
		if c.Generated != "" {
			continue // computed by the old table itself
		}
		n := p.renamedTo(c.Name)
		if _, ok := newCols[n]; !ok {
			k.Kept = append(k.Kept, qi(c.Name))
			continue
		}
		k.Cols = append(k.Cols, qi(c.Name))
		k.Exprs = append(k.Exprs, "CAST(n."+qi(n)+" AS "+c.Type+")")
	}
	probe := fmt.Sprintf("SELECT %s FROM %s n WHERE false", strings.Join(k.Exprs, ", "), m.shadowIdent())
	if _, err := m.exec(ctx, m.pool, probe); err != nil {
		return fmt.Errorf("%w: keep_old: the new table's values cannot be converted back to the old table's types (%v); run the migration without keep_old",
			ErrBadCommand, err)
	}
	for _, key := range k.OldKey {
		found := false
		for _, c := range k.Cols {
			found = found || c == qi(key)
		}
		if !found {
			return fmt.Errorf("%w: keep_old: key column %s has no counterpart in the new table", ErrBadCommand, qi(key))
		}
	}
	m.keep = k
	return nil
}

// prepareKeep creates, before the switch's lock, the reverse delta and
// capture function (the owner's: the trigger runs them with her rights) and
// the state table (the engine's: its comment, the keep plan, drives the
// revert). Nothing writes to them before the switch installs the triggers.
func (m *migration) prepareKeep(ctx context.Context) error {
	k := m.keep
	if k == nil {
		return nil
	}
	if err := m.dropKeepObjects(ctx, false); err != nil {
		return err
	}
	cols := make([]string, len(k.Key))
	newVals := make([]string, len(k.Key))
	oldVals := make([]string, len(k.Key))
	for i := range k.Key {
		cols[i] = fmt.Sprintf("k%d %s", i+1, k.KeyTypes[i])
		newVals[i] = "NEW." + qi(k.Key[i])
		oldVals[i] = "OLD." + qi(k.Key[i])
	}
	kc := keyCols(len(k.Key))
	stmts := []string{
		"CREATE TABLE " + k.deltaIdent() + " (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, op \"char\" NOT NULL, rel oid, " + strings.Join(cols, ", ") + ")",
		// The trigger capture's function, in reverse (capture_trigger.go).
		fmt.Sprintf(`CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO %s (op, rel) VALUES ('T', TG_RELID);
    RETURN NULL;
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO %s (op, rel, %s) VALUES ('U', TG_RELID, %s);
  END IF;
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND ROW(%s) IS DISTINCT FROM ROW(%s)) THEN
    INSERT INTO %s (op, rel, %s) VALUES ('D', TG_RELID, %s);
  END IF;
  RETURN NULL;
END $f$`, k.funcIdent(), k.deltaIdent(), k.deltaIdent(), kc, strings.Join(newVals, ", "),
			strings.Join(oldVals, ", "), strings.Join(newVals, ", "), k.deltaIdent(), kc, strings.Join(oldVals, ", ")),
	}
	if err := m.createOwned(ctx, m.pool, stmts, []string{"TABLE " + k.deltaIdent(), "FUNCTION " + k.funcIdent() + "()"}); err != nil {
		return fmt.Errorf("create the reverse capture: %w", err)
	}
	return m.saveKeep(ctx)
}

// saveKeep creates T__tat_rstate with the plan as its comment: by the
// engine's role when it may create there (the plan is then beyond the
// owner's reach), else (the owner's code runs with the engine's rights
// anyway, refuseKeep) by the owner.
func (m *migration) saveKeep(ctx context.Context) error {
	k := m.keep
	js, err := json.Marshal(k)
	if err != nil {
		return err
	}
	stmts := []string{
		"CREATE TABLE " + k.stateIdent() + " (blocked_key text, reason text, at timestamptz NOT NULL DEFAULT now())",
		"COMMENT ON TABLE " + k.stateIdent() + " IS " + quoteLiteral(string(js)),
	}
	if m.sb == nil || m.sb.adminState || m.sb.mode == modeSelf {
		err = pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
			for _, s := range stmts {
				if _, err := m.exec(ctx, tx, s); err != nil {
					return err
				}
			}
			if m.sb != nil && m.sb.mode != modeSelf {
				_, err := m.exec(ctx, tx, "GRANT SELECT ON "+k.stateIdent()+" TO "+qi(m.sb.owner))
				return err
			}
			return nil
		})
	} else {
		err = m.createOwned(ctx, m.pool, stmts, []string{"TABLE " + k.stateIdent()})
	}
	if err != nil {
		return fmt.Errorf("create %s: %w", k.stateIdent(), err)
	}
	return nil
}

// loadKeep reads the keep plan of the table, nil when none is kept.
func (m *migration) loadKeep(ctx context.Context) (*keepPlan, error) {
	_, _, state, _ := keepNames(m.t.Name)
	var js *string
	var owner string
	err := m.admin.QueryRow(ctx, `select obj_description(c.oid, 'pg_class'), pg_get_userbyid(c.relowner)::text from pg_class c where c.oid = to_regclass($1)`,
		ident(m.t.Schema, state)).Scan(&js, &owner)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the keep plan: %w", err)
	}
	if js == nil {
		return nil, fmt.Errorf("%w: %s has no keep plan", ErrRevertImpossible, ident(m.t.Schema, state))
	}
	if m.sb != nil && m.sb.mode == modeLogin && owner != m.sb.me {
		// The revert acts on the plan with the engine's rights.
		return nil, fmt.Errorf("%w: %s belongs to %s, not to the sidecar's role: its keep plan is not trusted", errDenied, ident(m.t.Schema, state), owner)
	}
	k := &keepPlan{}
	if err := json.Unmarshal([]byte(*js), k); err != nil {
		return nil, fmt.Errorf("decode the keep plan: %w", err)
	}
	return k, nil
}

// keepOldStatements replace the switch's DROP TABLE of the original (under
// its lock): the original becomes T__tat_old, stripped of what the switch
// re-creates on the new table, with its indexes and identity sequences
// renamed out of the way.
func (m *migration) keepOldStatements(ctx context.Context, tx pgx.Tx) ([]string, error) {
	k := m.keep
	tbl := ident(m.plan.Schema, m.plan.Table)
	rows, err := m.q(ctx, tx, `
		select 'DROP TRIGGER ' || quote_ident(tgname) || ' ON ' || $2 from pg_catalog.pg_trigger where tgrelid = $1 and not tgisinternal
		union all select 'DROP RULE ' || quote_ident(rulename) || ' ON ' || $2 from pg_catalog.pg_rewrite where ev_class = $1 and rulename <> '_RETURN'
		union all select 'DROP POLICY ' || quote_ident(polname) || ' ON ' || $2 from pg_catalog.pg_policy where polrelid = $1
		union all select 'DROP STATISTICS ' || quote_ident(stxnamespace::regnamespace::text) || '.' || quote_ident(stxname) from pg_catalog.pg_statistic_ext where stxrelid = $1
		union all select 'ALTER PUBLICATION ' || quote_ident(p.pubname) || ' DROP TABLE ' || $2 from pg_catalog.pg_publication_rel pr
		  join pg_catalog.pg_publication p on p.oid = pr.prpubid where pr.prrelid = $1
		union all select 'ALTER TABLE ' || $2 || ' DROP CONSTRAINT ' || quote_ident(conname) from pg_catalog.pg_constraint where conrelid = $1 and contype = 'f'
		union all select 'ALTER SEQUENCE ' || pg_catalog.pg_get_serial_sequence($2, attname) || ' RENAME TO '
		  || quote_ident(pg_catalog.left(s.relname, 63 - 9) || '__tat_old')
		  from pg_catalog.pg_attribute a join pg_catalog.pg_class s on s.oid = pg_catalog.pg_get_serial_sequence($2, a.attname)::regclass
		  where a.attrelid = $1 and a.attidentity <> '' and not a.attisdropped`, m.plan.TableID, tbl)
	if err != nil {
		return nil, fmt.Errorf("keep the old table: %w", err)
	}
	var out []string
	for _, r := range rows {
		out = append(out, r[0])
	}
	out = append(out, "ALTER TABLE "+tbl+" RENAME TO "+qi(k.Old))
	for _, si := range k.Indexes {
		out = append(out, "ALTER INDEX "+ident(k.Schema, si.Final)+" RENAME TO "+qi(si.Name))
	}
	return out, nil
}

// keepStart is the end of the switch transaction of a run that keeps the
// old table: the reverse capture triggers on the new table, from the same
// commit on.
func (m *migration) keepStart(ctx context.Context, tx pgx.Tx) error {
	k := m.keep
	tbl := k.tableIdent()
	for _, s := range []string{
		fmt.Sprintf("CREATE TRIGGER %s AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()", qi(triggerName), tbl, k.funcIdent()),
		fmt.Sprintf("CREATE TRIGGER %s AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()", qi(truncTriggerName), tbl, k.funcIdent()),
		// ENABLE ALWAYS: changes a logical replication subscriber applies too.
		fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", tbl, qi(triggerName)),
		fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", tbl, qi(truncTriggerName)),
	} {
		if _, err := m.exec(ctx, tx, s); err != nil {
			return fmt.Errorf("start the reverse capture: %s: %w", s, err)
		}
	}
	return nil
}

// keepIndexes reads, before the lock, the original's indexes and outbound
// foreign keys into the keep plan (the switch's fingerprint check proves
// them unchanged under the lock), and saves it.
func (m *migration) keepIndexes(ctx context.Context) error {
	k := m.keep
	rows, err := m.q(ctx, m.admin, `select c.relname from pg_index i join pg_class c on c.oid = i.indexrelid where i.indrelid = $1 order by c.relname`, m.plan.TableID)
	if err != nil {
		return fmt.Errorf("read the indexes to keep: %w", err)
	}
	k.Indexes = nil
	for _, r := range rows {
		k.Indexes = append(k.Indexes, shadowIndex{Schema: k.Schema, Table: k.Old, Name: shadowName(r[0], "__tat_old"), Final: r[0], OrigName: r[0]})
	}
	fks, err := m.q(ctx, m.admin, `select conname, pg_get_constraintdef(oid) from pg_constraint where conrelid = $1 and contype = 'f' order by conname`, m.plan.TableID)
	if err != nil {
		return fmt.Errorf("read the foreign keys to keep: %w", err)
	}
	k.FKs = nil
	for _, f := range fks {
		k.FKs = append(k.FKs, namedDef{Name: f[0], Def: f[1]})
	}
	k.Until = time.Now().Add(m.opts.KeepOld)
	return nil
}

// dropKeepObjects drops the reverse capture and state; with old, the kept
// table too (tat.finish). The triggers go under the short lock_timeout
// with retries (they lock the live table).
func (m *migration) dropKeepObjects(ctx context.Context, old bool) error {
	schema, table := m.t.Schema, m.t.Name
	oldN, delta, state, fn := keepNames(table)
	tbl := ident(schema, table)
	var trig bool
	err := m.admin.QueryRow(ctx, `select exists(select 1 from pg_trigger t join pg_proc p on p.oid = t.tgfoid
		where t.tgrelid = to_regclass($1) and t.tgname in ($2, $3) and p.oid = to_regprocedure($4))`,
		tbl, triggerName, truncTriggerName, ident(schema, fn)+"()").Scan(&trig)
	if err != nil {
		return fmt.Errorf("look for the reverse capture: %w", err)
	}
	if trig {
		err := m.withLockRetries(ctx, m.admin, func(ctx context.Context, tx pgx.Tx) error {
			for _, s := range []string{"DROP TRIGGER IF EXISTS " + qi(triggerName) + " ON " + tbl, "DROP TRIGGER IF EXISTS " + qi(truncTriggerName) + " ON " + tbl} {
				if _, err := m.exec(ctx, tx, s); err != nil {
					return err
				}
			}
			return nil
		}, nil)
		if err != nil {
			return fmt.Errorf("drop the reverse capture triggers: %w", err)
		}
	}
	stmts := []string{
		"DROP FUNCTION IF EXISTS " + ident(schema, fn) + "()",
		"DROP TABLE IF EXISTS " + ident(schema, delta),
	}
	if old {
		stmts = append(stmts, "DROP TABLE IF EXISTS "+ident(schema, oldN))
	}
	stmts = append(stmts, "DROP TABLE IF EXISTS "+ident(schema, state))
	for _, s := range stmts {
		if _, err := m.exec(ctx, m.admin, s); err != nil {
			return fmt.Errorf("drop the kept objects: %s: %w", s, err)
		}
	}
	return nil
}

// keptOld reports whether the old version of schema.name is kept.
func keptOld(ctx context.Context, db querier, schema, name string) (bool, error) {
	old, _, _, _ := keepNames(name)
	var kept bool
	if err := db.QueryRow(ctx, "select to_regclass($1) is not null", ident(schema, old)).Scan(&kept); err != nil {
		return false, fmt.Errorf("look for a kept old table: %w", err)
	}
	return kept, nil
}

// refuseCleanupKept: cleanup would drop the reverse capture's triggers
// (they bear the capture's names) and lose the writes a revert needs.
func refuseCleanupKept(ctx context.Context, db querier, schema, name string) error {
	kept, err := keptOld(ctx, db, schema, name)
	if err != nil {
		return err
	}
	if kept {
		old, _, _, _ := keepNames(name)
		return fmt.Errorf("%w: the old version of %s is kept as %s (keep_old): end it with tat.finish or tat.revert, not cleanup",
			ErrBadCommand, ident(schema, name), ident(schema, old))
	}
	return nil
}

// cleanupKeep drops what a failed run left of its keep_old preparation
// (never a kept old table: that is tat.finish's).
func cleanupKeep(ctx context.Context, m *migration, pool *pgxpool.Pool, schema, name string) error {
	saved, savedAdmin := m.t, m.admin
	m.t, m.admin = &table{Schema: schema, Name: name}, pool
	defer func() { m.t, m.admin = saved, savedAdmin }()
	return m.dropKeepObjects(ctx, false)
}

// keptPlan is the keep plan of the table when its old version is kept
// (the switch committed), nil otherwise.
func (m *migration) keptPlan(ctx context.Context) (*keepPlan, error) {
	if m.t == nil || m.t.OID == 0 {
		return nil, nil
	}
	kept, err := keptOld(ctx, m.admin, m.t.Schema, m.t.Name)
	if err != nil || !kept {
		return nil, err
	}
	k, err := m.loadKeep(ctx)
	if err != nil {
		return nil, err
	}
	if k == nil {
		return nil, fmt.Errorf("%w: %s exists without its keep state: drop it or rename it", ErrBadCommand, ident(m.t.Schema, shadowName(m.t.Name, "__tat_old")))
	}
	if m.opts.KeepOld <= 0 {
		return nil, fmt.Errorf("%w: the old version of %s is kept by an earlier migration (keep_old): tat.finish or tat.revert it first",
			ErrBadCommand, m.tableRef())
	}
	return k, nil
}

// keepLoop is the kept window: apply the new table's changes to the old
// one until a revert, tat.finish or the end of the window.
func (m *migration) keepLoop(ctx context.Context, k *keepPlan) error {
	m.keep = k
	m.setPhase(ctx, PhaseKept)
	kc, _ := m.ctl.(KeepControl)
	var blocked string
	if err := m.admin.QueryRow(ctx, "select coalesce((select format('row %s: %s', blocked_key, reason) from "+k.stateIdent()+" limit 1), '')").Scan(&blocked); err != nil {
		return fmt.Errorf("kept: read state: %w", err)
	}
	m.event(ctx, PhaseKept, fmt.Sprintf("the old table is kept as %s until %s; writes to %s are applied to it",
		k.oldIdent(), k.Until.Format(time.RFC3339), k.tableIdent()))
	lastReport := time.Time{}
	saidRefused := false
	for {
		var revert, finish bool
		if kc != nil {
			var err error
			if revert, finish, err = kc.KeepRequest(ctx); err != nil {
				return err
			}
		}
		if finish || time.Now().After(k.Until) {
			return m.finishKeep(ctx, finish)
		}
		if revert {
			if blocked == "" {
				return m.revert(ctx)
			}
			if !saidRefused {
				m.event(ctx, PhaseKept, "revert refused: "+blocked)
				saidRefused = true
			}
		}
		n := int64(0)
		if blocked == "" {
			var err error
			n, blocked, err = m.applyKeep(ctx, int64(m.batchSize())*10)
			if err != nil {
				return fmt.Errorf("kept: %w", err)
			}
			if blocked != "" {
				m.event(ctx, PhaseKept, "revert is no longer possible: "+blocked)
			}
		}
		if time.Since(lastReport) > time.Second || n > 0 {
			m.reportKeep(ctx, blocked, "")
			lastReport = time.Now()
		}
		if n == 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
}

func (m *migration) reportKeep(ctx context.Context, blocked, outcome string) {
	k := m.keep
	kr, ok := m.rep.(KeepReporter)
	if !ok {
		return
	}
	s := KeepStatus{Table: k.tableIdent(), Old: k.oldIdent(), Until: k.Until, Blocked: blocked, Outcome: outcome}
	if outcome == "" {
		_ = m.admin.QueryRow(ctx, "select count(*) from "+k.deltaIdent()).Scan(&s.Backlog)
	}
	kr.Kept(ctx, s)
}

// finishKeep ends the window: the old table and the reverse capture go.
func (m *migration) finishKeep(ctx context.Context, asked bool) error {
	why := "the keep_old window ended"
	if asked {
		why = "finish requested"
	}
	m.event(ctx, PhaseKept, why+": dropping "+m.keep.oldIdent()+" and the reverse capture")
	if err := m.dropKeepObjects(ctx, true); err != nil {
		return err
	}
	m.reportKeep(ctx, "", OutcomeFinished)
	return nil
}

// applyKeep applies up to limit changes of the new table to the old one.
// A change that cannot go back (a cast that fails, a constraint of the old
// table) blocks the revert: it is found by applying the slice change by
// change, recorded in the state table and returned as blocked.
func (m *migration) applyKeep(ctx context.Context, limit int64) (n int64, blocked string, err error) {
	rm := m.reverseMigration(m.keep)
	n, err = rm.applyDelta(ctx, m.pool, limit)
	if err == nil {
		return n, "", nil
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || ctx.Err() != nil {
		return 0, "", err
	}
	// Change by change, in order, up to the one that fails.
	k := m.keep
	for {
		var seq int64
		var key string
		e := m.pool.QueryRow(ctx, "SELECT seq, row("+keyCols(len(k.Key))+")::text FROM "+k.deltaIdent()+" ORDER BY seq LIMIT 1").Scan(&seq, &key)
		if errors.Is(e, pgx.ErrNoRows) {
			return n, "", nil
		}
		if e != nil {
			return n, "", fmt.Errorf("read the reverse delta: %w", e)
		}
		one, e := rm.applyDelta(ctx, m.pool, 1)
		if e == nil {
			n += one
			continue
		}
		if !errors.As(e, &pe) || ctx.Err() != nil {
			return n, "", e
		}
		reason := pe.Message
		if pe.Detail != "" {
			reason += " (" + pe.Detail + ")"
		}
		if _, e := m.exec(ctx, m.admin, "INSERT INTO "+k.stateIdent()+" (blocked_key, reason) VALUES ($1, $2)", key, reason); e != nil {
			return n, "", fmt.Errorf("record the change that cannot go back: %w", e)
		}
		return n, fmt.Sprintf("row %s: %s", key, reason), nil
	}
}

// reverseMigration is the migration from the new table back to the old
// one: its shadow is T__tat_old, its delta T__tat_rdelta.
func (m *migration) reverseMigration(k *keepPlan) *migration {
	rm := &migration{pool: m.pool, admin: m.admin, caller: m.caller, opts: m.opts, rep: m.rep, ctl: m.ctl, cmd: m.cmd, t: m.t, rev: k}
	rm.opts.CommandBeforeSwitch, rm.opts.CommandAfterSwitch, rm.opts.CopyDataFilter = "", "", ""
	rm.opts.ManualSwitch, rm.opts.KeepOld = false, 0
	rm.opts.Capture = CaptureTrigger
	if m.sb != nil {
		sb := *m.sb
		sb.exec = false // the forward switch dropped T__tat_exec
		rm.sb = &sb
	}
	rm.plan = &plan{Shadow: k.Old, Delta: k.Delta, State: k.State, Schema: k.Schema, Table: k.Table, Capture: CaptureTrigger,
		Key: k.Key, KeyTypes: k.KeyTypes, ShadowKey: k.OldKey, Indexes: k.Indexes, FKs: k.FKs, IndexMap: map[string]string{},
		Renames: k.Renames}
	if m.t != nil {
		rm.plan.TableID = m.t.OID
	}
	rm.capture = triggerCapture{m: rm}
	rm.phase = PhaseRevert
	return rm
}

// applyReverseTx is the delta apply of a reverse migration: the changed
// keys are re-read from the new table and written to the old one through
// the inverse expressions. Without kept columns, rows are deleted and
// re-inserted (as the forward apply: a unique value that moved between rows
// never collides); with them, rows gone are deleted and the others upserted
// so that the kept columns keep their values.
func (m *migration) applyReverseTx(ctx context.Context, tx pgx.Tx, limit int64) (int64, error) {
	k := m.rev
	delta := k.deltaIdent()
	var upto *int64
	var err error
	if limit > 0 {
		err = tx.QueryRow(ctx, "SELECT max(seq) FROM (SELECT seq FROM "+delta+" ORDER BY seq LIMIT $1) s", limit).Scan(&upto)
	} else {
		err = tx.QueryRow(ctx, "SELECT max(seq) FROM "+delta).Scan(&upto)
	}
	if err != nil {
		return 0, fmt.Errorf("read reverse delta: %w", err)
	}
	if upto == nil {
		return 0, nil
	}
	nk := len(k.Key)
	onOld := make([]string, nk) // old row o against delta d
	onNew := make([]string, nk) // new row n against delta d
	newKey := make([]string, nk)
	oldKey := make([]string, nk)
	for i := range onOld {
		onOld[i] = fmt.Sprintf("o.%s = CAST(d.k%d AS %s)", qi(k.OldKey[i]), i+1, k.OldKeyTypes[i])
		onNew[i] = fmt.Sprintf("n.%s = d.k%d", qi(k.Key[i]), i+1)
		newKey[i] = "n." + qi(k.Key[i])
		oldKey[i] = qi(k.OldKey[i])
	}
	keys := "SELECT " + keyCols(nk) + " FROM " + delta + " WHERE seq > $1 AND seq < $2 AND op <> 'T'"
	ins := fmt.Sprintf("INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s n WHERE (%s) IN (%s)",
		k.oldIdent(), strings.Join(k.Cols, ", "), strings.Join(k.Exprs, ", "), k.tableIdent(), strings.Join(newKey, ", "), keys)
	var stmts []string
	if len(k.Kept) == 0 {
		stmts = []string{
			fmt.Sprintf("DELETE FROM %s o USING %s d WHERE d.seq > $1 AND d.seq < $2 AND d.op <> 'T' AND %s", k.oldIdent(), delta, strings.Join(onOld, " AND ")),
			ins,
		}
	} else {
		var set []string
		for _, c := range k.Cols {
			isKey := false
			for _, kk := range oldKey {
				isKey = isKey || kk == c
			}
			if !isKey {
				set = append(set, c+" = EXCLUDED."+c)
			}
		}
		conflict := " ON CONFLICT (" + strings.Join(oldKey, ", ") + ") DO NOTHING"
		if len(set) > 0 {
			conflict = " ON CONFLICT (" + strings.Join(oldKey, ", ") + ") DO UPDATE SET " + strings.Join(set, ", ")
		}
		stmts = []string{
			fmt.Sprintf("DELETE FROM %s o USING %s d WHERE d.seq > $1 AND d.seq < $2 AND d.op <> 'T' AND %s AND NOT EXISTS (SELECT 1 FROM %s n WHERE %s)",
				k.oldIdent(), delta, strings.Join(onOld, " AND "), k.tableIdent(), strings.Join(onNew, " AND ")),
			ins + conflict,
		}
	}
	apply := func(from, to int64) error {
		for _, s := range stmts {
			if _, err := m.exec(ctx, tx, s, from, to); err != nil {
				return fmt.Errorf("apply the new table's changes to %s: %w", k.oldIdent(), err)
			}
		}
		return nil
	}
	marks, err := m.q(ctx, tx, "SELECT seq::text FROM "+delta+" WHERE op = 'T' AND seq <= $1 ORDER BY seq", *upto)
	if err != nil {
		return 0, err
	}
	from := int64(0)
	for _, mk := range marks {
		var seq int64
		if _, err := fmt.Sscan(mk[0], &seq); err != nil {
			return 0, err
		}
		// Keys before a TRUNCATE need no replay: their rows are gone.
		if _, err := m.exec(ctx, tx, "DELETE FROM "+k.oldIdent()); err != nil {
			return 0, fmt.Errorf("replay truncate on %s: %w", k.oldIdent(), err)
		}
		from = seq
	}
	if err := apply(from, *upto+1); err != nil {
		return 0, err
	}
	tag, err := m.exec(ctx, tx, "DELETE FROM "+delta+" WHERE seq <= $1", *upto)
	if err != nil {
		return 0, fmt.Errorf("apply reverse delta (trim): %w", err)
	}
	return tag.RowsAffected(), nil
}

// revert switches back to the old table: the reverse migration's catch-up
// and cut-over (cutover.go), then the validation of the foreign keys it
// re-created NOT VALID.
func (m *migration) revert(ctx context.Context) error {
	k := m.keep
	m.setPhase(ctx, PhaseRevert)
	m.event(ctx, PhaseRevert, "revert requested: switching back to "+k.oldIdent())
	rm := m.reverseMigration(k)
	if err := pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, catalogPath); err != nil {
			return err
		}
		t, err := loadTable(ctx, tx, k.Schema, k.Table, false, false)
		if err != nil {
			return err
		}
		rm.t = t
		rm.plan.TableID = t.OID
		rm.plan.Fingerprint, err = treeFingerprint(ctx, tx, t.OID, nil)
		return err
	}); err != nil {
		return fmt.Errorf("revert: read %s: %w", k.tableIdent(), err)
	}
	// Catch up outside the lock first, so the last delta under it is small.
	for {
		n, err := rm.applyDelta(ctx, m.pool, int64(m.batchSize())*10)
		if err != nil {
			return fmt.Errorf("%w: revert: %v", ErrRevertImpossible, err)
		}
		if n < m.opts.MinDeltaRows || n == 0 {
			break
		}
	}
	if err := rm.cutover(ctx); err != nil {
		return fmt.Errorf("revert: %w", err)
	}
	if _, err := m.exec(ctx, m.admin, "DROP FUNCTION IF EXISTS "+k.funcIdent()+"()"); err != nil {
		return fmt.Errorf("revert: drop the reverse capture function: %w", err)
	}
	if err := rm.validate(ctx); err != nil {
		return fmt.Errorf("revert: validate: %w", err)
	}
	m.event(ctx, PhaseRevert, "reverted: "+k.tableIdent()+" is the old table again, with every write made since the switch")
	m.reportKeep(ctx, "", OutcomeReverted)
	return nil
}
