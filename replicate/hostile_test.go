package replicate_test

// The hostile-owner suite for the engine called directly, as the pg_tat CLI
// does (a DBA's superuser pool, no tat schema); listener/hostile_test.go has
// the SQL front door and tatd, and internal/hostile the harness both share.
// A table owner who is not a superuser puts her code in the ALTER (USING) or
// on her table (a CHECK constraint), the DBA migrates the table, and her code
// tries to shed the role it runs as (RESET ROLE, set_config('role', ...),
// SET SESSION AUTHORIZATION DEFAULT) and, whenever that leaves it a
// superuser, makes her a superuser, writes a file into the data directory
// and deletes another role's table. Each test asserts she gained nothing,
// that the job finished with the right content, and that her code did run,
// outside her own sessions, in the phase under test (her code is armed only
// in that phase; for "switchlock" only while the switch holds the table
// locked against writes).

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/internal/hostile"
	"github.com/pgtat/pg_tat/replicate"
)

// hostileDB is one test's hostile world (hostile.DB) with the engine run
// on the DBA's superuser pool.
type hostileDB struct{ *hostile.DB }

// newHostileDB creates the database (tat not installed), mallory (with CREATE
// on public when create), bob, t, ctl, bob_secret, hits and her functions.
func newHostileDB(t *testing.T, create bool) *hostileDB {
	t.Helper()
	return &hostileDB{hostile.New(t, create)}
}

// hostileEngine is one run of the engine in the background; it is also the
// run's Control: the switch waits until open is called.
type hostileEngine struct {
	gate     chan struct{}
	once     sync.Once
	finished chan struct{}
	err      error
}

func (g *hostileEngine) SwitchRequested(context.Context) (bool, error) {
	select {
	case <-g.gate:
		return true, nil
	default:
		return false, nil
	}
}

func (g *hostileEngine) open() { g.once.Do(func() { close(g.gate) }) }

func (g *hostileEngine) ended() bool {
	select {
	case <-g.finished:
		return true
	default:
		return false
	}
}

// runEngine runs the engine as the pg_tat CLI does: the superuser pool of
// the test, the options, a manual switch.
func (h *hostileDB) runEngine(o replicate.Options, arm *hostile.Arm) *hostileEngine {
	g := &hostileEngine{gate: make(chan struct{}), finished: make(chan struct{})}
	o.ManualSwitch = true
	go func() {
		defer close(g.finished)
		g.err = replicate.Run(context.Background(), h.SU, o, arm.Reporter(replicate.NopReporter{}), g)
	}()
	h.T.Cleanup(func() {
		g.open()
		select {
		case <-g.finished:
		case <-time.After(2 * time.Minute):
			h.T.Error("the engine did not end")
		}
	})
	return g
}

// waitSwitchOrEnd waits until the run waits for the switch (true) or ended.
func (h *hostileDB) waitSwitchOrEnd(g *hostileEngine, arm *hostile.Arm) bool {
	h.T.Helper()
	select {
	case <-arm.Waiting():
		return true
	case <-g.finished:
		return false
	case <-time.After(3 * time.Minute):
		h.T.Fatalf("the run neither waits for the switch nor ended; phases %v", arm.Seen())
		return false
	}
}

func (h *hostileDB) waitEnd(g *hostileEngine) error {
	h.T.Helper()
	select {
	case <-g.finished:
		return g.err
	case <-time.After(3 * time.Minute):
		h.T.Fatal("the run did not end")
		return nil
	}
}

func hostileOpts(command, capture string) replicate.Options {
	o := replicate.DefaultOptions()
	o.Command = command
	o.Capture = capture
	o.BatchSize = 500
	o.MinDeltaRows = 10
	o.LockTimeout = 30 * time.Second
	o.TimeBetweenLocks = 50 * time.Millisecond
	return o
}

// hostileEngineVector: her code and the DBA's ALTER.
type hostileEngineVector struct {
	setup     string // run as mallory before the job
	command   string
	got, want string // t after the job; the ALTER applied in SQL to ctl
	col, typ  string
	check     string // if set, a query that must answer true after the job
}

var (
	hxUsing = hostileEngineVector{
		command: "alter table public.t alter column v type bigint using public.mallory_fn(v)",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "v", typ: "bigint"}
	// Her code already on the table; the DBA's ALTER does not mention it.
	hxExistingCheck = hostileEngineVector{
		setup:   "alter table public.t add constraint c_existing check (public.mallory_fn(v) is not null)",
		command: "alter table public.t alter column id type bigint",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "id", typ: "bigint"}
	// Her materialized view over her table calls her function: the job
	// rebuilds it (the replacement's REFRESH, in phase switch, before the
	// lock), which must run her code as her, never with the engine's rights.
	hxMatView = hostileEngineVector{
		setup:   "create materialized view public.t_mv as select v % 10 as k, count(*) as n, sum(public.mallory_fn(v)) as s from public.t group by 1",
		command: "alter table public.t alter column id type bigint",
		got:     hostile.GotIDV, want: hostile.WantIDV, col: "id", typ: "bigint",
		check: `select c.relispopulated and pg_get_userbyid(c.relowner) = (select pg_get_userbyid(relowner) from pg_class where oid = 'public.t'::regclass)
			and to_regclass('public.t_mv__tat_new') is null from pg_class c where c.oid = 'public.t_mv'::regclass`}
)

// hostileEngineRun runs v with her code armed in phase, under both captures:
// in catchup her application writes during the job and while it waits for
// the switch; in switchlock it writes in a transaction the switch's lock
// waits for, so the last delta applied under the lock is not empty.
func hostileEngineRun(t *testing.T, v hostileEngineVector, phase string) {
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, true)
		h.MalloryExec(v.setup)
		arm := h.NewArm(phase, "")
		load := h.StartLoad(phase, arm)
		g := h.runEngine(hostileOpts(v.command, capture), arm)
		load.Switch(h.waitSwitchOrEnd(g, arm), g.open, func() error {
			if g.ended() {
				return fmt.Errorf("the run ended before its switch waited for mallory's transaction: %v", g.err)
			}
			return nil
		})
		err := h.waitEnd(g)
		t.Logf("run: %v; phases %v; hits: %s", err, arm.Seen(), h.HitSummary())
		h.GainedNothing()
		if err != nil {
			t.Errorf("run failed: %v", err)
		} else {
			h.Migrated(v.got, v.want, v.col, v.typ)
			if v.check != "" {
				if got := h.Str(v.check); got != "true" {
					t.Errorf("after the job: %s is %q, want true", v.check, got)
				}
			}
			if h.ForeignHits(phase) == 0 {
				t.Errorf("her code never ran in phase %s outside her sessions: the test proves nothing (hits: %s)", phase, h.HitSummary())
			}
		}
		h.RunRoleGone()
		h.NoLeftovers()
	})
}

func TestHostileEngineUsingCopy(t *testing.T) { t.Parallel(); hostileEngineRun(t, hxUsing, "copy") }
func TestHostileEngineUsingCatchup(t *testing.T) {
	t.Parallel()
	hostileEngineRun(t, hxUsing, "catchup")
}
func TestHostileEngineUsingSwitchLock(t *testing.T) {
	t.Parallel()
	hostileEngineRun(t, hxUsing, "switchlock")
}
func TestHostileEngineMatViewSwitch(t *testing.T) {
	t.Parallel()
	hostileEngineRun(t, hxMatView, "switch")
}
func TestHostileEngineExistingCheckCopy(t *testing.T) {
	t.Parallel()
	hostileEngineRun(t, hxExistingCheck, "copy")
}
func TestHostileEngineExistingCheckSwitchLock(t *testing.T) {
	t.Parallel()
	hostileEngineRun(t, hxExistingCheck, "switchlock")
}

// --command-before-switch / --command-after-switch on behalf of a requester
// who is not a superuser (Options.RunAs) are refused: they would run in the
// engine's own cut-over transaction. Nothing is created, her code never runs.
func TestHostileEngineSwitchCommandsRunAsOwnerRefused(t *testing.T) {
	t.Parallel()
	for _, option := range []string{"command_before_switch", "command_after_switch"} {
		hostile.EachCapture(t, option+"/", func(t *testing.T, capture string) {
			h := newHostileDB(t, true)
			arm := h.NewArm("any", "")
			o := hostileOpts("alter table public.t alter column v type bigint", capture)
			o.RunAs = h.Mallory
			if option == "command_before_switch" {
				o.CommandBeforeSwitch = "select public.mallory_fn(1)"
			} else {
				o.CommandAfterSwitch = "select public.mallory_fn(1)"
			}
			g := h.runEngine(o, arm)
			if h.waitSwitchOrEnd(g, arm) {
				g.open()
			}
			err := h.waitEnd(g)
			t.Logf("run: %v; hits: %s", err, h.HitSummary())
			if err == nil {
				t.Errorf("SECURITY: %s with RunAs = %s (not a superuser) was run, want it refused", option, h.Mallory)
			} else {
				h.ColumnType("v", "integer")
				if n := h.ForeignHits("any"); n != 0 {
					t.Errorf("refused, but her code ran %d times", n)
				}
			}
			h.GainedNothing()
			h.RunRoleGone()
			h.NoLeftovers()
		})
	}
}

// The DBA's own commands (no RunAs: the CLI) run, inside the switch.
func TestHostileEngineSwitchCommandsByDBAAccepted(t *testing.T) {
	t.Parallel()
	hostile.EachCapture(t, "", func(t *testing.T, capture string) {
		h := newHostileDB(t, true)
		h.SuExec("create table public.sulog (what text)")
		arm := h.NewArm("", "")
		o := hostileOpts("alter table public.t alter column v type bigint", capture)
		o.CommandBeforeSwitch = "insert into public.sulog values ('before')"
		o.CommandAfterSwitch = "insert into public.sulog values ('after')"
		g := h.runEngine(o, arm)
		if h.waitSwitchOrEnd(g, arm) {
			g.open()
		}
		if err := h.waitEnd(g); err != nil {
			t.Fatalf("run: %v", err)
		}
		if got := h.Str("select string_agg(what, ',' order by what) from public.sulog"); got != "after,before" {
			t.Errorf("sulog = %q, want after,before", got)
		}
		h.Migrated(hostile.GotIDV, hostile.WantIDV, "v", "bigint")
		h.RunRoleGone()
	})
}
