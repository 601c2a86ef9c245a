package listener

// The hostile-owner suite (issue 12, DESIGN.md §6): a table owner who is not
// a superuser queues migrations of her own table through tat.alter and puts
// code of hers everywhere the job evaluates it (the ALTER's USING, defaults,
// CHECKs, generated columns, domain checks, index expressions, the copy
// filter, triggers and rules she plants on the shadow and the delta, the
// throttle query, the before/after-switch commands). Her code tries to shed
// the role it runs as (RESET ROLE, set_config('role', ...), SET SESSION
// AUTHORIZATION DEFAULT) and, whenever that leaves it a superuser, makes her
// a superuser, writes a file into the data directory and deletes another
// role's table. Each test asserts she gained nothing and that the job either
// finished with the right content or was refused clearly.
//
// Her code is armed only in the phase a test is about (an advisory lock the
// test takes when the engine enters that phase; for "switchlock" only while
// the switch holds the table locked against writes), so a failure names the
// phase that leaks. Every run of her code records a row in
// her table hits (the phase it was armed for, current_user, session_user,
// is_superuser), and each test asserts that her code did run, outside her own
// sessions, in the phase under test.
//
// The harness (her world, her code, the arming, the assertions) is
// internal/hostile, shared with replicate/hostile_test.go (the engine called
// as the pg_tat CLI does); this file adds tatd's front door.

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/sirupsen/logrus"

	pgtat "github.com/pgtat/pg_tat"
	"github.com/pgtat/pg_tat/internal/hostile"
	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

// hostileDB is one test's hostile world (hostile.DB) with tatd in front:
// mallory queues jobs through tat.alter, tatd's listener runs them.
type hostileDB struct{ *hostile.DB }

// newHostileDB creates the database (tat not installed), mallory (with CREATE
// on public when create), bob, t, ctl, bob_secret, hits and her functions.
func newHostileDB(t *testing.T, create bool) *hostileDB {
	t.Helper()
	return &hostileDB{hostile.New(t, create)}
}

// queue calls tat.alter as mallory; args are more named arguments (", x => y").
func (h *hostileDB) queue(c *pgx.Conn, command, capture, args string) (int64, error) {
	var id int64
	err := c.QueryRow(context.Background(), `select tat.alter($1, capture => $2, switch => 'manual', lock_timeout => '30s',
		batch_size => 500, min_delta_rows => 10`+args+`)`, command, capture).Scan(&id)
	return id, err
}

// listen runs tatd's listener on dbURL with the real engine (the arm sees
// its events) until the test ends; stop stops it.
func (h *hostileDB) listen(dbURL string, arm *hostile.Arm) (stop func()) {
	h.T.Helper()
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	return start(h.T, Config{DatabaseURL: dbURL, PollInterval: 200 * time.Millisecond, RunnerID: "hostile", Log: log,
		Run: func(ctx context.Context, pool *pgxpool.Pool, o replicate.Options, rep replicate.Reporter, ctl replicate.Control) error {
			return replicate.Run(ctx, pool, o, arm.Reporter(rep), ctl)
		}})
}

type hostileJob struct{ state, phase, err string }

func (j hostileJob) terminal() bool {
	return j.state == "done" || j.state == "failed" || j.state == "cancelled"
}

func (h *hostileDB) job(id int64) hostileJob {
	h.T.Helper()
	var j hostileJob
	if err := h.SU.QueryRow(context.Background(), `select state, coalesce(phase, ''), coalesce(error, '')
		from tat.migrations where id = $1`, id).Scan(&j.state, &j.phase, &j.err); err != nil {
		h.T.Fatalf("job %d: %v", id, err)
	}
	return j
}

// waitSwitchOrEnd waits until the job waits for tat.switch (true) or ended.
func (h *hostileDB) waitSwitchOrEnd(id int64, arm *hostile.Arm) bool {
	h.T.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		select {
		case <-arm.Waiting():
			return true
		default:
		}
		if j := h.job(id); j.terminal() {
			return false
		}
		if time.Now().After(deadline) {
			h.T.Fatalf("job %d neither waits for the switch nor ended: %+v; phases %v", id, h.job(id), arm.Seen())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *hostileDB) waitEnd(id int64) hostileJob {
	h.T.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		j := h.job(id)
		if j.terminal() {
			return j
		}
		if time.Now().After(deadline) {
			h.T.Fatalf("job %d did not end: %+v", id, j)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *hostileDB) switchJob(id int64) {
	h.T.Helper()
	if _, err := h.SU.Exec(context.Background(), "select tat.switch($1)", id); err != nil {
		h.T.Fatalf("tat.switch: %v", err)
	}
}

// switchLoad lets job id switch (tat.switch) once it waits for the switch
// (waits), as load's phase wants it (hostile.Load.Switch).
func (h *hostileDB) switchLoad(load *hostile.Load, waits bool, id int64) {
	h.T.Helper()
	load.Switch(waits, func() { h.switchJob(id) }, func() error {
		if j := h.job(id); j.terminal() {
			return fmt.Errorf("job ended before its switch waited for mallory's transaction: %+v", j)
		}
		return nil
	})
}

// migrateUsing queues, as mallory, an ALTER whose USING runs her code, armed
// in every phase, and has tatd on dbURL run it through the manual switch.
func (h *hostileDB) migrateUsing(capture, dbURL string) (hostileJob, *hostile.Arm) {
	h.T.Helper()
	arm := h.NewArm("any", "")
	m := h.AsMallory()
	id, err := h.queue(m, "alter table public.t alter column v type bigint using public.mallory_fn(v)", capture, "")
	if err != nil {
		h.T.Fatalf("tat.alter: %v", err)
	}
	stop := h.listen(dbURL, arm)
	if h.waitSwitchOrEnd(id, arm) {
		h.switchJob(id)
	}
	j := h.waitEnd(id)
	stop()
	return j, arm
}

// migratedSafely asserts that migrateUsing's job j migrated t and that her
// code ran outside her sessions, gained nothing and left nothing behind.
func (h *hostileDB) migratedSafely(j hostileJob) {
	h.T.Helper()
	if j.state != "done" {
		h.T.Errorf("job %s in phase %s: %s", j.state, j.phase, j.err)
	} else {
		h.Migrated(hostile.GotIDV, hostile.WantIDV, "v", "bigint")
		if h.ForeignHits("any") == 0 {
			h.T.Errorf("her code never ran: the test proves nothing")
		}
	}
	h.GainedNothing()
	h.RunRoleGone()
	h.NoLeftovers()
}

// hostileVector is one place her code hides.
type hostileVector struct {
	name    string // in file names and logs
	setup   string // run as mallory before the job
	command string
	args    string // more named arguments of tat.alter
	got     string // t's content after the job, as text columns
	want    string // the same transformation applied to ctl, in SQL
	col     string // a column the ALTER changes and its type after
	typ     string
	plant   string // what she plants on the engine's tables (hostile.DB.NewArm)
	// mayRefuse: the engine may refuse the job (a clear error) instead of
	// running it, e.g. when it finds her objects on its own tables.
	mayRefuse bool
}

var (
	vUsing = hostileVector{name: "using",
		command: "alter table public.t alter column v type bigint using public.mallory_fn(v)",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	vDefaultStable = hostileVector{name: "default_stable",
		command: "alter table public.t add column d int default public.mallory_stable(1)",
		got:     `select id::text, v::text, d::text from public.t`, want: `select id::text, v::text, '1' from public.ctl`,
		col: "d", typ: "integer"}
	vDefaultVolatile = hostileVector{name: "default_volatile",
		command: "alter table public.t add column d int default public.mallory_fn(1)",
		got:     `select id::text, v::text, d::text from public.t`, want: `select id::text, v::text, '1' from public.ctl`,
		col: "d", typ: "integer"}
	vCheck = hostileVector{name: "check",
		command: "alter table public.t add constraint c_mallory check (public.mallory_fn(v) is not null)",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "integer"}
	vGenerated = hostileVector{name: "generated",
		command: "alter table public.t add column g bigint generated always as (public.mallory_imm(v)) stored",
		got:     `select id::text, v::text, g::text from public.t`, want: `select id::text, v::text, v::text from public.ctl`,
		col: "g", typ: "bigint"}
	vFilter = hostileVector{name: "filter",
		command: "alter table public.t alter column v type bigint",
		args:    `, copy_data_filter => 'public.mallory_fn(id) % 10 <> 0'`,
		got:     hostile.GotIDV, want: hostile.WantIDV + ` where id % 10 <> 0`, col: "v", typ: "bigint"}
	vShadowTrigger = hostileVector{name: "shadow_trigger",
		command: "alter table public.t alter column v type bigint", plant: "shadow", mayRefuse: true,
		got: hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	vShadowRule = hostileVector{name: "shadow_rule",
		command: "alter table public.t alter column v type bigint", plant: "rule", mayRefuse: true,
		got: hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	vShadowDeferred = hostileVector{name: "shadow_deferred",
		command: "alter table public.t alter column v type bigint", plant: "shadow_deferred", mayRefuse: true,
		got: hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	vDeltaTrigger = hostileVector{name: "delta_trigger",
		command: "alter table public.t alter column v type bigint", plant: "delta", mayRefuse: true,
		got: hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	vVerify = hostileVector{name: "verify",
		command: "alter table public.t alter column v type bigint using public.mallory_fn(v)", args: ", verify => true",
		got: hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	// Her code already on the table: any migration of it runs it.
	vExistingCheck = hostileVector{name: "existing_check",
		setup:   "alter table public.t add constraint c_existing check (public.mallory_fn(v) is not null)",
		command: "alter table public.t alter column id type bigint",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "id", typ: "bigint"}
	vExpressionIndex = hostileVector{name: "expression_index",
		setup:   "create index t_mallory on public.t ((public.mallory_imm(v)))",
		command: "alter table public.t alter column id type bigint",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "id", typ: "bigint"}
	vDomain = hostileVector{name: "domain",
		setup:   "create domain public.mdom as int check (public.mallory_fn(value) is not null)",
		command: "alter table public.t alter column v type public.mdom",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "mdom"}
	// A catalog-only command runs in place, without a shadow.
	vDirectValidate = hostileVector{name: "direct_validate",
		setup:   "alter table public.t add constraint c_nv check (public.mallory_fn(v) is not null) not valid",
		command: "alter table public.t validate constraint c_nv",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "integer"}
)

// hostileRun runs v with her code armed in phase, under both captures:
// mallory queues the job (switch => 'manual'), tatd runs it; in catchup her
// application writes during the job and while it waits for the switch; in
// switchlock it writes in a transaction the switch's lock waits for, so the
// last delta applied under the lock is not empty.
func hostileRun(t *testing.T, v hostileVector, phase string) {
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, true)
		testpg.Install(t, h.URL)
		h.MalloryExec(v.setup)
		arm := h.NewArm(phase, v.plant)
		m := h.AsMallory()
		id, err := h.queue(m, v.command, capture, v.args)
		if err != nil {
			t.Fatalf("tat.alter as %s: %v", h.Mallory, err)
		}
		load := h.StartLoad(phase, arm)
		stop := h.listen(h.URL, arm)
		h.switchLoad(load, h.waitSwitchOrEnd(id, arm), id)
		j := h.waitEnd(id)
		stop()
		t.Logf("job %s (%s); phases %v; hits: %s", j.state, j.err, arm.Seen(), h.HitSummary())
		h.GainedNothing()
		planted, plantErr := arm.Planted()
		switch {
		case v.plant != "" && !planted:
			t.Errorf("phase %s never started: nothing planted", arm.PlantAt())
		case plantErr != nil && wantSQLState(plantErr, "42501") == nil:
			// She may not touch the engine's tables: nothing of hers runs there.
			t.Logf("she may not plant %s: %v", v.plant, plantErr)
		case plantErr != nil:
			t.Errorf("planting %s failed, not for lack of privilege: %v", v.plant, plantErr)
		}
		refused := j.state == "failed" && v.mayRefuse && j.err != ""
		switch {
		case j.state == "done":
			h.Migrated(v.got, v.want, v.col, v.typ)
		case refused:
			t.Logf("refused: %s", j.err)
		default:
			t.Errorf("job %s in phase %s: %s", j.state, j.phase, j.err)
		}
		if !refused && plantErr == nil && h.ForeignHits(phase) == 0 {
			t.Errorf("her code never ran in phase %s outside her sessions: the test proves nothing (hits: %s)", phase, h.HitSummary())
		}
		h.RunRoleGone()
		h.NoLeftovers()
	})
}

func TestHostileUsingCopy(t *testing.T)       { t.Parallel(); hostileRun(t, vUsing, "copy") }
func TestHostileUsingCatchup(t *testing.T)    { t.Parallel(); hostileRun(t, vUsing, "catchup") }
func TestHostileUsingSwitchLock(t *testing.T) { t.Parallel(); hostileRun(t, vUsing, "switchlock") }

func TestHostileDefaultStablePrepare(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDefaultStable, "prepare")
}
func TestHostileDefaultVolatileCopy(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDefaultVolatile, "copy")
}
func TestHostileDefaultVolatileCatchup(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDefaultVolatile, "catchup")
}
func TestHostileDefaultVolatileSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDefaultVolatile, "switchlock")
}

func TestHostileCheckCopy(t *testing.T)       { t.Parallel(); hostileRun(t, vCheck, "copy") }
func TestHostileCheckCatchup(t *testing.T)    { t.Parallel(); hostileRun(t, vCheck, "catchup") }
func TestHostileCheckSwitchLock(t *testing.T) { t.Parallel(); hostileRun(t, vCheck, "switchlock") }

func TestHostileGeneratedCopy(t *testing.T)    { t.Parallel(); hostileRun(t, vGenerated, "copy") }
func TestHostileGeneratedCatchup(t *testing.T) { t.Parallel(); hostileRun(t, vGenerated, "catchup") }
func TestHostileGeneratedSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vGenerated, "switchlock")
}

func TestHostileFilterCopy(t *testing.T)       { t.Parallel(); hostileRun(t, vFilter, "copy") }
func TestHostileFilterCatchup(t *testing.T)    { t.Parallel(); hostileRun(t, vFilter, "catchup") }
func TestHostileFilterSwitchLock(t *testing.T) { t.Parallel(); hostileRun(t, vFilter, "switchlock") }

func TestHostileShadowTriggerCopy(t *testing.T) { t.Parallel(); hostileRun(t, vShadowTrigger, "copy") }
func TestHostileShadowTriggerCatchup(t *testing.T) {
	t.Parallel()
	hostileRun(t, vShadowTrigger, "catchup")
}
func TestHostileShadowTriggerSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vShadowTrigger, "switchlock")
}

func TestHostileShadowDeferredTriggerCatchup(t *testing.T) {
	t.Parallel()
	hostileRun(t, vShadowDeferred, "catchup")
}
func TestHostileShadowDeferredTriggerSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vShadowDeferred, "switchlock")
}

func TestHostileShadowRuleCatchup(t *testing.T) { t.Parallel(); hostileRun(t, vShadowRule, "catchup") }
func TestHostileShadowRuleSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vShadowRule, "switchlock")
}

func TestHostileDeltaTriggerCatchup(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDeltaTrigger, "catchup")
}
func TestHostileDeltaTriggerSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDeltaTrigger, "switchlock")
}

func TestHostileVerifyVerify(t *testing.T) { t.Parallel(); hostileRun(t, vVerify, "verify") }

func TestHostileExistingCheckCopy(t *testing.T) { t.Parallel(); hostileRun(t, vExistingCheck, "copy") }
func TestHostileExistingCheckSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vExistingCheck, "switchlock")
}

// PostgreSQL runs index builds and ANALYZE as the table's owner in a
// security-restricted operation: her code cannot shed that role there. These
// guard that the engine keeps it so.
func TestHostileExpressionIndexIndex(t *testing.T) {
	t.Parallel()
	hostileRun(t, vExpressionIndex, "index")
}
func TestHostileExpressionIndexAnalyze(t *testing.T) {
	t.Parallel()
	hostileRun(t, vExpressionIndex, "analyze")
}
func TestHostileExpressionIndexCatchup(t *testing.T) {
	t.Parallel()
	hostileRun(t, vExpressionIndex, "catchup")
}
func TestHostileExpressionIndexSwitchLock(t *testing.T) {
	t.Parallel()
	hostileRun(t, vExpressionIndex, "switchlock")
}

func TestHostileDomainCopy(t *testing.T)       { t.Parallel(); hostileRun(t, vDomain, "copy") }
func TestHostileDomainSwitchLock(t *testing.T) { t.Parallel(); hostileRun(t, vDomain, "switchlock") }

func TestHostileDirectValidateSwitch(t *testing.T) {
	t.Parallel()
	hostileRun(t, vDirectValidate, "switch")
}

func wantSQLState(err error, code string) error {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return fmt.Errorf("error %v has no SQLSTATE, want %s", err, code)
	}
	if pe.Code != code {
		return fmt.Errorf("SQLSTATE %s (%s), want %s", pe.Code, pe.Message, code)
	}
	return nil
}

// The options whose SQL runs in tatd's own sessions (throttle_query, the
// before/after-switch commands) are refused with 42501 when a role that is
// not a superuser asks for them. When one is accepted, the job is run to
// show what her code could do with it.
func TestHostileOptionsByOwnerRefused(t *testing.T) {
	t.Parallel()
	cases := []struct{ option, value string }{
		{"throttle_query", "select public.mallory_fn(1) is null"},
		{"command_before_switch", "select public.mallory_fn(1)"},
		{"command_after_switch", "select public.mallory_fn(1)"},
	}
	for _, tc := range cases {
		hostile.EachCapture(t, tc.option+"/", func(t *testing.T, capture string) {
			h := newHostileDB(t, true)
			testpg.Install(t, h.URL)
			arm := h.NewArm("any", "")
			m := h.AsMallory()
			id, err := h.queue(m, "alter table public.t alter column v type bigint", capture,
				fmt.Sprintf(", %s => %s", tc.option, quoteLit(tc.value)))
			if err != nil {
				if e := wantSQLState(err, "42501"); e != nil {
					t.Fatalf("tat.alter(%s => ...) by %s: %v", tc.option, h.Mallory, e)
				}
				t.Logf("refused: %v", err)
				if n := h.Str("select count(*) from tat.migrations"); n != "0" {
					t.Errorf("%s jobs queued", n)
				}
				h.GainedNothing()
				return
			}
			t.Errorf("SECURITY: tat.alter(%s => ...) by %s (not a superuser) was accepted, want SQLSTATE 42501; running it", tc.option, h.Mallory)
			stop := h.listen(h.URL, arm)
			if h.waitSwitchOrEnd(id, arm) {
				time.Sleep(3 * sqlapiThrottleInterval) // the throttle query runs while the job waits
				h.switchJob(id)
			}
			j := h.waitEnd(id)
			stop()
			t.Logf("job %s (%s); hits: %s", j.state, j.err, h.HitSummary())
			h.GainedNothing()
		})
	}
}

const sqlapiThrottleInterval = time.Second

func quoteLit(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// tat.set(id, 'throttle_query', ...) by the owner of a running job is
// refused the same way (42501).
func TestHostileThrottleQuerySetByOwnerRefused(t *testing.T) {
	t.Parallel()
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, true)
		testpg.Install(t, h.URL)
		arm := h.NewArm("any", "")
		m := h.AsMallory()
		id, err := h.queue(m, "alter table public.t alter column v type bigint", capture, "")
		if err != nil {
			t.Fatalf("tat.alter: %v", err)
		}
		stop := h.listen(h.URL, arm)
		waits := h.waitSwitchOrEnd(id, arm)
		_, err = m.Exec(context.Background(), "select tat.set($1, 'throttle_query', 'select public.mallory_fn(1) is null')", id)
		if err != nil {
			if e := wantSQLState(err, "42501"); e != nil {
				t.Errorf("tat.set(throttle_query) by %s: %v", h.Mallory, e)
			}
		} else {
			t.Errorf("SECURITY: tat.set(%d, 'throttle_query', ...) by %s (not a superuser) was accepted, want SQLSTATE 42501", id, h.Mallory)
			time.Sleep(3 * sqlapiThrottleInterval)
		}
		if waits {
			h.switchJob(id)
		}
		j := h.waitEnd(id)
		stop()
		t.Logf("job %s (%s); hits: %s", j.state, j.err, h.HitSummary())
		if j.state != "done" {
			t.Errorf("job %s: %s", j.state, j.err)
		}
		h.GainedNothing()
		h.RunRoleGone()
	})
}

// A superuser may use the three options; they run: the throttle query holds
// the job until a row appears, the commands write their rows.
func TestHostileOptionsBySuperuserAccepted(t *testing.T) {
	t.Parallel()
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, true)
		testpg.Install(t, h.URL)
		h.SuExec(`create table public.sulog (what text); create table public.release (ok boolean)`)
		arm := h.NewArm("", "")
		stop := h.listen(h.URL, arm)
		ctx := context.Background()
		var id int64
		err := h.SU.QueryRow(ctx, `select tat.alter('alter table public.t alter column v type bigint', capture => $1,
			batch_size => 200, throttle_query => 'select not exists (select from public.release)',
			command_before_switch => 'insert into public.sulog values (''before'')',
			command_after_switch => 'insert into public.sulog values (''after'')')`, capture).Scan(&id)
		if err != nil {
			t.Fatalf("tat.alter by a superuser: %v", err)
		}
		deadline := time.Now().Add(time.Minute)
		for {
			if h.Str("select coalesce(throttle_reason, '') from tat.migrations where id = $1", id) == "throttle_query returned true" {
				break
			}
			if j := h.job(id); j.terminal() || time.Now().After(deadline) {
				t.Fatalf("the throttle query never held the job: %+v", j)
			}
			time.Sleep(20 * time.Millisecond)
		}
		h.SuExec("insert into public.release values (true)")
		j := h.waitEnd(id)
		stop()
		if j.state != "done" {
			t.Fatalf("job %s: %s", j.state, j.err)
		}
		if got := h.Str("select string_agg(what, ',' order by what) from public.sulog"); got != "after,before" {
			t.Errorf("sulog = %q, want after,before", got)
		}
		h.Migrated(hostile.GotIDV, hostile.WantIDV, "v", "bigint")
		h.RunRoleGone()
	})
}

// On PostgreSQL 15+ public grants no CREATE to ordinary roles: an owner who
// may run the ALTER in place may run it through tat.alter.
func TestHostileOwnerWithoutCreateMigrates(t *testing.T) {
	t.Parallel()
	if testpg.Version(t) < 150000 {
		t.Skip("PostgreSQL 15+ (public without CREATE for ordinary roles)")
	}
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, false)
		testpg.Install(t, h.URL)
		if h.Str("select has_schema_privilege($1, 'public', 'CREATE')", h.Mallory) != "false" {
			t.Fatalf("%s may create in public", h.Mallory)
		}
		j, _ := h.migrateUsing(capture, h.URL)
		t.Logf("job %s (%s); hits: %s", j.state, j.err, h.HitSummary())
		h.migratedSafely(j)
	})
}

// tatd need not be a superuser: with CREATEROLE, REPLICATION, CREATE on the
// database and ADMIN on the owner's role it migrates her table under both
// captures, and her code gains none of those rights.
func TestHostileNonSuperuserSidecar(t *testing.T) {
	t.Parallel()
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, true)
		tatd := h.Name + "_tatd"
		h.Extra = append(h.Extra, tatd)
		q := pgx.Identifier{tatd}.Sanitize()
		h.SuExec("create role " + q + " login createrole replication nosuperuser")
		h.SuExec("grant create on database " + pgx.Identifier{h.Name}.Sanitize() + " to " + q)
		h.SuExec("grant {M} to " + q + " with admin option")
		u, _ := url.Parse(h.URL)
		u.User = url.User(tatd)
		tatdURL := u.String()
		c, err := pgx.Connect(context.Background(), tatdURL)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(context.Background(), pgtat.InstallSQL); err != nil {
			t.Fatalf("install.sql as %s (not a superuser): %v", tatd, err)
		}
		c.Close(context.Background())
		j, arm := h.migrateUsing(capture, tatdURL)
		t.Logf("job %s (%s); phases %v; hits: %s", j.state, j.err, arm.Seen(), h.HitSummary())
		h.migratedSafely(j)
	})
}
