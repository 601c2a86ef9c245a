// Package replicate is the migration engine: given a pool, one ALTER TABLE
// and options it runs the phases (prepare, capture, copy, index, analyze,
// catchup, switch, validate). It knows nothing of jobs, LISTEN or terminals:
// the sidecar (through sqlapi) and the pg_tat CLI drive the same code.
// See README.md in this folder for the locking story.
package replicate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// migration is the state of one run.
type migration struct {
	// pool runs everything that touches the table's data and the shadow,
	// and every piece of the owner's code, in the owner's sandbox
	// (sandbox.go); admin is the caller's pool: catalog reads, the locks
	// and DDL of the switch (dependents of other owners) and cleanup,
	// never a statement that evaluates the owner's code.
	pool   *pgxpool.Pool
	admin  *pgxpool.Pool
	caller *pgxpool.Pool // the caller's own pool: its settings (search_path) are the owner's sandbox's
	opts   Options
	rep    Reporter
	ctl    Control
	cmd    *Command
	t      *table
	plan   *plan
	sb     *sandbox // who m.pool's sessions are (sandbox.go)

	validations []fkCheck // foreign keys the switch re-created NOT VALID
	swapped     bool
	filter      string // CopyDataFilter as deparsed by the parser, or ""
	capture     capture
	steer       steering
	snapshot    string         // exported snapshot every copy batch must use ("" for trigger capture)
	closure     *uniqueClosure // set once the shadow's indexes exist; nil: no unique index to close over
	matViews    []*matView     // materialized views over the tree, their replacements built (matview.go)
	keep        *keepPlan      // Options.KeepOld: the old table is kept after the switch (keep.go)
	rev         *keepPlan      // set on a reverse migration (a revert, keep.go): its delta apply is the inverse
	sums        []verifyTarget // with verify: how the copy checksums each table's rows (verify.go)

	mu           sync.Mutex
	phase        string
	rowsCopied   atomic.Int64
	deltaBacklog atomic.Int64
	lockAttempts atomic.Int64
	applyRate    atomic.Int64 // delta changes applied per second, last measured
	waiting      atomic.Bool
}

// Run runs one migration to the end (or to the first error). ctl may be nil.
// On error the original table is untouched; shadow objects are left for a
// --continue run or for Cleanup.
func Run(ctx context.Context, pool *pgxpool.Pool, opts Options, rep Reporter, ctl Control) error {
	if err := opts.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrBadCommand, err)
	}
	if rep == nil {
		rep = NopReporter{}
	}
	cmd, err := ParseCommand(opts.Command)
	if err != nil {
		return err
	}
	if cmd.Schema == "" && opts.Schema != "" {
		cmd.Schema, cmd.qualified = opts.Schema, true
	}
	if cmd.Schema == "" {
		// As the caller's session resolves it (ALTER TABLE would), once:
		// the engine's own sessions have a search_path of their own.
		err := pool.QueryRow(ctx, `select n.nspname::text from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
			where c.oid = pg_catalog.to_regclass($1::text)`, qi(cmd.Table)).Scan(&cmd.Schema)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: table %s does not exist", ErrBadCommand, qi(cmd.Table))
		} else if err != nil {
			return fmt.Errorf("resolve table %s: %w", qi(cmd.Table), err)
		}
		cmd.qualified = true
	}
	admin, err := pinnedPool(ctx, pool)
	if err != nil {
		return err
	}
	defer admin.Close()
	m := &migration{pool: admin, admin: admin, caller: pool, opts: opts, rep: rep, ctl: ctl, cmd: cmd}
	return m.run(ctx)
}

// enginePath is the search_path of the engine's own sessions: a function
// or type a table owner plants in a schema of the caller's search_path
// (public) must never be what the engine's queries call, with its rights.
const enginePath = "pg_catalog, pg_temp"

// pinnedPool is a pool like the caller's whose sessions have enginePath.
func pinnedPool(ctx context.Context, pool *pgxpool.Pool) (*pgxpool.Pool, error) {
	cfg := pool.Config().Copy()
	if cfg.ConnConfig.RuntimeParams == nil {
		cfg.ConnConfig.RuntimeParams = map[string]string{}
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = enginePath
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return p, nil
}

func (m *migration) run(ctx context.Context) error {
	m.setPhase(ctx, PhasePrepare)
	if err := m.check(ctx); err != nil {
		return err
	}
	closeOwner, err := m.openSandbox(ctx)
	if err != nil {
		return err
	}
	defer closeOwner()
	// A kept old table (keep.go): continue its window, whatever else.
	if k, err := m.keptPlan(ctx); err != nil {
		return err
	} else if k != nil {
		return m.keepLoop(ctx, k)
	}
	if err := m.refuseKeep(); err != nil {
		return err
	}
	if err := m.parseFilter(); err != nil {
		return err
	}
	if m.opts.DryRun {
		return m.dryRun(ctx)
	}
	if !m.cmd.NeedsRewrite() {
		return m.runDirect(ctx)
	}
	resumed, err := m.resume(ctx)
	if err != nil {
		return err
	}
	m.capture = m.newCapture()
	err = m.phases(ctx, resumed)
	if err != nil && ctx.Err() == nil && m.plan != nil && !m.swapped && !errors.Is(err, ErrConcurrentDDL) {
		err = m.blameDDL(ctx, err)
	}
	if serr := m.capture.stop(context.WithoutCancel(ctx)); serr != nil && err == nil {
		err = fmt.Errorf("stop capture: %w", serr)
	}
	if err != nil && ctx.Err() == nil && m.plan != nil && !m.swapped {
		// A failure (not an interruption) ends the run: nothing of it may
		// stay behind, least of all the capture trigger filling the delta.
		// An interrupted run (crash, Ctrl-C, shutdown) keeps its state for
		// a continued run.
		if cerr := m.dropShadow(context.WithoutCancel(ctx)); cerr != nil {
			m.event(ctx, m.currentPhase(), "cleanup after failure: "+cerr.Error())
		}
	}
	return err
}

func (m *migration) phases(ctx context.Context, resumed bool) error {
	if !resumed {
		if err := m.prepare(ctx); err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		if err := m.hideShadow(ctx); err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		m.setPhase(ctx, PhaseCapture)
		if err := m.createDelta(ctx); err != nil {
			return fmt.Errorf("capture: %w", err)
		}
		// Before the capture writes to it.
		if err := m.markHidden(ctx, []string{m.deltaIdent()}); err != nil {
			return fmt.Errorf("capture: %w", err)
		}
		snap, err := m.capture.start(ctx)
		if err != nil {
			return fmt.Errorf("capture: %w", err)
		}
		m.snapshot = snap
		if err := m.planRanges(ctx); err != nil {
			return fmt.Errorf("copy: %w", err)
		}
	}
	if m.opts.KeepOld > 0 {
		if err := m.planKeep(ctx); err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
	}
	stopProgress := m.progressLoop(ctx)
	defer stopProgress()

	m.setPhase(ctx, PhaseCopy)
	if err := m.copyData(ctx); err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	if err := m.capture.copied(ctx); err != nil {
		return fmt.Errorf("capture: %w", err)
	}
	if err := m.settleCopy(ctx); err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	m.setPhase(ctx, PhaseIndex)
	if err := m.buildIndexes(ctx); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	if err := m.guardDefaultPartition(ctx); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	if err := m.loadClosure(ctx); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	m.setPhase(ctx, PhaseAnalyze)
	if err := m.analyze(ctx); err != nil {
		return fmt.Errorf("analyze: %w", err)
	}
	m.setPhase(ctx, PhaseCatchup)
	if err := m.catchup(ctx); err != nil {
		return fmt.Errorf("catchup: %w", err)
	}
	if m.verifying() {
		m.setPhase(ctx, PhaseVerify)
		if err := m.verify(ctx); err != nil {
			return err
		}
	}
	if m.opts.StopBeforeSwitch {
		m.event(ctx, PhaseCatchup, "stopped before the switch as asked; continue the run to switch")
		return nil
	}
	if err := m.waitForSwitch(ctx); err != nil {
		return err
	}
	m.setPhase(ctx, PhaseSwitch)
	if m.keep != nil {
		if err := m.keepIndexes(ctx); err != nil {
			return fmt.Errorf("switch: %w", err)
		}
		if err := m.prepareKeep(ctx); err != nil {
			return fmt.Errorf("switch: %w", err)
		}
	}
	if err := m.cutover(ctx); err != nil {
		return fmt.Errorf("switch: %w", err)
	}
	m.swapped = true
	m.setPhase(ctx, PhaseValidate)
	if err := m.validate(ctx); err != nil {
		return fmt.Errorf("validate: %w", err)
	}
	m.report(ctx)
	if m.keep != nil {
		return m.keepLoop(ctx, m.keep)
	}
	return nil
}

// blameDDL reports a failure as ErrConcurrentDDL when the original's shape
// changed since prepare: a statement that failed because of concurrent DDL
// (a renamed or dropped column the delta apply reads, ...) must fail the job
// the same way the cut-over's fingerprint check does.
func (m *migration) blameDDL(ctx context.Context, err error) error {
	var fp string
	qerr := pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, catalogPath); err != nil {
			return err
		}
		var err error
		fp, err = treeFingerprint(ctx, tx, m.plan.TableID, m.plan.Partitions)
		return err
	})
	if qerr != nil || fp == m.plan.Fingerprint {
		return err
	}
	return fmt.Errorf("%w: the definition of %s changed during the migration (concurrent DDL); nothing was switched: %w",
		ErrConcurrentDDL, m.tableRef(), err)
}

// check verifies, before anything is created, that the table exists, that
// the requesting role may ALTER it (owner or member of the owning role, as
// for ALTER TABLE itself) and that it has a usable key.
func (m *migration) check(ctx context.Context) error {
	tx, err := m.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	t, err := loadTable(ctx, tx, m.cmd.Schema, m.cmd.Table, m.opts.Capture == CaptureLogical, m.opts.PartialMode)
	if err != nil {
		if errors.Is(err, ErrNoKey) && !m.cmd.NeedsRewrite() {
			// A catalog-only change needs no key; only the table itself.
			t, err = &table{Schema: m.cmd.Schema, Name: m.cmd.Table}, nil
		} else {
			return fmt.Errorf("%w: %v", ErrBadCommand, err)
		}
	}
	m.t = t
	role := m.opts.RunAs
	if role == "" {
		if err := tx.QueryRow(ctx, "select current_user::text").Scan(&role); err != nil {
			return err
		}
	}
	var ok bool
	err = tx.QueryRow(ctx, `select pg_has_role($1::text::name, c.relowner, 'MEMBER')
		from pg_class c where c.oid = to_regclass($2)`, role, m.tableRef()).Scan(&ok)
	if err != nil {
		return fmt.Errorf("%w: check privilege of %s: %v", ErrBadCommand, role, err)
	}
	if !ok {
		return fmt.Errorf("%w: role %s must own table %s (or be a member of its owner) to alter it", ErrBadCommand, role, m.tableRef())
	}
	if err := m.refuseSwitchCommands(ctx, tx); err != nil {
		return err
	}
	if m.t.OID != 0 && m.cmd.NeedsRewrite() {
		// Dependents the switch cannot carry over are refused now, not at
		// the switch (after the whole copy). A catalog-only ALTER runs in
		// place and keeps every dependent, so it needs none of this.
		if err := m.refuseDependents(ctx, tx); err != nil {
			return err
		}
	}
	if m.opts.Capture == CaptureLogical && m.cmd.NeedsRewrite() {
		if err := m.logicalPreflight(ctx, tx); err != nil {
			return err
		}
	}
	return nil
}

// refuseSwitchCommands: --command-before-switch / --command-after-switch run
// in the switch transaction of the engine's own role (atomic with the swap),
// where SET ROLE can be undone by the command itself. A requester that is
// not a superuser may not have them run for her there. (The CLI runs them
// in its user's own session: RunAs is empty.)
func (m *migration) refuseSwitchCommands(ctx context.Context, tx pgx.Tx) error {
	if m.opts.RunAs == "" || strings.TrimSpace(m.opts.CommandBeforeSwitch+m.opts.CommandAfterSwitch) == "" {
		return nil
	}
	var super bool
	if err := tx.QueryRow(ctx, "select coalesce((select rolsuper from pg_roles where rolname = $1), false)", m.opts.RunAs).Scan(&super); err != nil {
		return err
	}
	if !super {
		return fmt.Errorf("%w: command_before_switch and command_after_switch run inside the switch transaction of the sidecar's own role, "+
			"so only superusers may set them (%s is not one); run them yourself before or after the job, or run the pg_tat CLI with your own credentials",
			errDenied, m.opts.RunAs)
	}
	return nil
}

// qRowtypeUsers describes what uses the table's row type (or its array
// type) other than what the switch re-creates (functions, views) or refuses
// or rebuilds on its own (materialized views, matview.go): a column of another table or of a
// composite type, a domain or range over it, an operator, a cast. Each of
// them keeps the DROP TABLE of the switch from running, and there is no
// carrying them over: their stored values are of the old row type.
const qRowtypeUsers = `select coalesce(string_agg(distinct pg_describe_object(d.classid, d.objid, d.objsubid), ', '), '')
	from pg_class t join pg_type ty on ty.oid = t.reltype
	join pg_depend d on d.refclassid = 'pg_type'::regclass and d.refobjid in (ty.oid, ty.typarray) and d.deptype = 'n'
	where t.oid = $1 and d.classid not in ('pg_proc'::regclass, 'pg_rewrite'::regclass)
	  and not (d.classid = 'pg_class'::regclass and d.objid = t.oid)
	  and not (d.classid = 'pg_class'::regclass and exists (select 1 from pg_class v where v.oid = d.objid and v.relkind in ('v', 'm')))`

// refuseDependents refuses, before anything is created, the dependents the
// switch cannot drop and re-create.
func (m *migration) refuseDependents(ctx context.Context, tx pgx.Tx) error {
	if err := m.refuseMatViews(ctx, tx, []uint32{m.t.OID}, m.tableRef()); err != nil {
		return err
	}
	var users string
	if err := tx.QueryRow(ctx, qRowtypeUsers, m.t.OID).Scan(&users); err != nil {
		return fmt.Errorf("look for users of the row type of %s: %w", m.tableRef(), err)
	}
	if users != "" {
		return fmt.Errorf("%w: the row type of %s is used by %s; the new table would have another row type, so these must be changed or dropped first", ErrBadCommand, m.tableRef(), users)
	}
	return nil
}

func (m *migration) tableRef() string {
	if m.t != nil && m.t.Schema != "" {
		return m.t.ident()
	}
	if m.cmd.Schema != "" {
		return ident(m.cmd.Schema, m.cmd.Table)
	}
	return qi(m.cmd.Table)
}

func (m *migration) shadowIdent() string { return ident(m.plan.Schema, m.plan.Shadow) }
func (m *migration) deltaIdent() string  { return ident(m.plan.Schema, m.plan.Delta) }
func (m *migration) stateIdent() string  { return ident(m.plan.Schema, m.plan.State) }

// resume picks up an earlier run's shadow when Options.Continue is set.
func (m *migration) resume(ctx context.Context) (bool, error) {
	p, err := loadPlan(ctx, m.pool, m.t.Schema, shadowName(m.t.Name, "__tat_state"))
	if err != nil {
		return false, err
	}
	if p == nil {
		var leftover bool
		_ = m.pool.QueryRow(ctx, "select to_regclass($1) is not null", ident(m.t.Schema, shadowName(m.t.Name, "__tat_new"))).Scan(&leftover)
		if leftover {
			return false, fmt.Errorf("%w: %s exists from an earlier run; run cleanup first", ErrBadCommand, shadowName(m.t.Name, "__tat_new"))
		}
		return false, nil
	}
	if !m.opts.Continue {
		return false, fmt.Errorf("%w: an earlier run of %q left its shadow table; continue it or run cleanup first", ErrBadCommand, p.Command)
	}
	if p.Command != m.cmd.Text || p.TableID != m.t.OID {
		return false, fmt.Errorf("%w: the earlier run was for %q, not this command", ErrBadCommand, p.Command)
	}
	if trusted, err := m.planTrusted(ctx); err != nil {
		return false, err
	} else if !trusted {
		m.event(ctx, PhasePrepare, "the earlier run's plan belongs to the table's owner, and the switch acts on it with the engine's rights: starting over")
		if err := cleanup(ctx, m.admin, m.t.Schema, m.t.Name, m); err != nil {
			return false, err
		}
		return false, nil
	}
	if p.Capture == CaptureLogical || m.opts.Capture == CaptureLogical {
		// A logical-capture stream cannot be resumed: its temporary slot
		// ended with the earlier run, and the changes since are not
		// recorded anywhere (nor can a trigger-capture delta be continued
		// by a stream). Start over.
		m.event(ctx, PhasePrepare, "the earlier run cannot be continued with logical capture (its temporary slot ended with it): starting over")
		if err := cleanup(ctx, m.pool, m.t.Schema, m.t.Name, m); err != nil {
			return false, err
		}
		return false, nil
	}
	// The plan is committed before the delta, the capture triggers and the
	// copy ranges exist: an earlier run that died in between captured
	// nothing and planned no copy. Continuing it would copy nothing and swap
	// in an empty table; start over instead (nothing was copied yet).
	var ranges int64
	var hasDelta bool
	var triggers int
	err = m.pool.QueryRow(ctx, `select (select count(*) from pg_class where oid = to_regclass($1)) = 1,
		(select count(*)::int from pg_trigger where tgrelid = $2 and tgname in ($3, $4))`,
		ident(p.Schema, p.Delta), p.TableID, triggerName, truncTriggerName).Scan(&hasDelta, &triggers)
	if err == nil && hasDelta {
		err = m.pool.QueryRow(ctx, "select count(*) from "+ident(p.Schema, p.State)).Scan(&ranges)
	}
	if err != nil {
		return false, fmt.Errorf("inspect the earlier run: %w", err)
	}
	if !hasDelta || triggers < 2 || ranges == 0 {
		m.event(ctx, PhasePrepare, "the earlier run stopped before its capture and copy were set up: starting over")
		if err := cleanup(ctx, m.admin, m.t.Schema, m.t.Name, m); err != nil {
			return false, err
		}
		return false, nil
	}
	m.plan = p
	var copied int64
	_ = m.pool.QueryRow(ctx, "select coalesce(sum(rows), 0)::bigint from "+m.stateIdent()).Scan(&copied)
	m.rowsCopied.Store(copied)
	m.event(ctx, PhasePrepare, fmt.Sprintf("continuing the earlier run (%d rows already copied)", copied))
	return true, nil
}

// planTrusted: the plan of an earlier run (the state table's comment) may
// steer the switch, which runs as the engine's role, only if the owner of
// a sandbox could not have written it: the state table is the engine's own
// (sandbox.adminState), or the owner's code runs with no less than the
// engine's rights anyway.
func (m *migration) planTrusted(ctx context.Context) (bool, error) {
	if m.sb == nil || m.sb.mode != modeLogin {
		return true, nil
	}
	var owner string
	if err := m.admin.QueryRow(ctx, "select pg_get_userbyid(relowner)::text from pg_class where oid = to_regclass($1)",
		m.stateIdent()).Scan(&owner); err != nil {
		return false, fmt.Errorf("inspect the earlier run: %w", err)
	}
	return owner == m.sb.me, nil
}

// runDirect applies a catalog-only ALTER in place under a short lock_timeout.
func (m *migration) runDirect(ctx context.Context) error {
	m.event(ctx, PhasePrepare, "the command needs no table rewrite: running it directly under a short lock")
	m.setPhase(ctx, PhaseSwitch)
	sql := m.cmd.Text
	if m.cmd.qualified {
		// The table as tat.alter resolved it, not as the search_path would.
		var err error
		if sql, err = m.cmd.QualifiedSQL(m.cmd.Schema); err != nil {
			return err
		}
	}
	return m.withLockRetries(ctx, m.pool, func(ctx context.Context, tx pgx.Tx) error {
		_, err := m.exec(ctx, tx, sql)
		return err
	}, nil)
}

// waitForSwitch holds the job in waiting_switch, catching up, until the
// driver asks for the switch.
func (m *migration) waitForSwitch(ctx context.Context) error {
	if !m.opts.ManualSwitch {
		return nil
	}
	m.waiting.Store(true)
	defer m.waiting.Store(false)
	m.event(ctx, PhaseCatchup, "waiting for a manual switch")
	m.report(ctx)
	for {
		if m.ctl != nil {
			ok, err := m.ctl.SwitchRequested(ctx)
			if err != nil {
				return err
			}
			if ok {
				return nil
			}
		}
		if err := m.hold(ctx); err != nil {
			return err
		}
		if _, err := m.applyDelta(ctx, m.pool, int64(m.batchSize())*10); err != nil {
			return fmt.Errorf("catchup: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func itoa(i int) string { return fmt.Sprint(i) }

func (m *migration) setPhase(ctx context.Context, phase string) {
	m.mu.Lock()
	m.phase = phase
	m.mu.Unlock()
	m.rep.Event(ctx, phase, "phase "+phase)
	m.report(ctx)
}

func (m *migration) event(ctx context.Context, phase, msg string) { m.rep.Event(ctx, phase, msg) }

func (m *migration) report(ctx context.Context) {
	m.mu.Lock()
	phase := m.phase
	m.mu.Unlock()
	p := Progress{Phase: phase, RowsCopied: m.rowsCopied.Load(), DeltaBacklog: m.deltaBacklog.Load(),
		LockAttempts: int(m.lockAttempts.Load()), Waiting: m.waiting.Load()}
	p.Paused, p.Throttle = m.heldState()
	if m.capture != nil {
		p.LagBytes = m.capture.lagBytes()
	}
	if m.t != nil {
		p.Table = m.t.ident()
		p.RowsTotal = m.t.EstRows
		if p.RowsCopied > p.RowsTotal {
			p.RowsTotal = p.RowsCopied
		}
	}
	m.rep.Progress(ctx, p)
}

// progressLoop reports every second until stopped.
func (m *migration) progressLoop(ctx context.Context) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				m.report(ctx)
			}
		}
	}()
	return func() { cancel(); <-done }
}

// execer is what a pool, a connection and a transaction offer.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

func (m *migration) exec(ctx context.Context, db execer, sql string, args ...any) (pgconn.CommandTag, error) {
	if m.opts.ShowQueries != nil {
		m.opts.ShowQueries(sql)
	}
	return db.Exec(ctx, sql, args...)
}

// q runs a catalog query whose columns are all text.
func (m *migration) q(ctx context.Context, db execer, sql string, args ...any) ([][]string, error) {
	rows, err := db.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("catalog query: %w", err)
	}
	defer rows.Close()
	var out [][]string
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return nil, err
		}
		r := make([]string, len(vals))
		for i, v := range vals {
			if v != nil {
				r[i] = fmt.Sprint(v)
			}
		}
		out = append(out, r)
	}
	return out, rows.Err()
}
