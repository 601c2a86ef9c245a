package replicate_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/replicate"
)

// keepCtl is a driver's tat.revert / tat.finish.
type keepCtl struct{ revert, finish atomic.Bool }

func (c *keepCtl) SwitchRequested(context.Context) (bool, error) { return false, nil }
func (c *keepCtl) KeepRequest(context.Context) (bool, bool, error) {
	return c.revert.Load(), c.finish.Load(), nil
}

// keepRep records the kept window's status.
type keepRep struct {
	replicate.NopReporter
	mu   sync.Mutex
	last replicate.KeepStatus
	n    int
}

func (r *keepRep) Kept(_ context.Context, s replicate.KeepStatus) {
	r.mu.Lock()
	r.last, r.n = s, r.n+1
	r.mu.Unlock()
}

func (r *keepRep) status() (replicate.KeepStatus, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last, r.n
}

// waitKept waits until the kept window reported a status satisfying cond.
func waitKept(t *testing.T, rep *keepRep, errc chan error, what string, cond func(replicate.KeepStatus) bool) replicate.KeepStatus {
	t.Helper()
	deadline := time.Now().Add(120 * time.Second)
	for {
		if s, n := rep.status(); n > 0 && cond(s) {
			return s
		}
		select {
		case err := <-errc:
			t.Fatalf("run ended before %s: %v", what, err)
		default:
		}
		if time.Now().After(deadline) {
			s, _ := rep.status()
			t.Fatalf("%s not reached; last status %+v", what, s)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitSynced waits until the reverse delta is applied: the apply deletes
// what it applied in its own transaction.
func waitSynced(t *testing.T, e *env) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for e.str("select count(*) from orders__tat_rdelta") != "0" {
		if time.Now().After(deadline) {
			t.Fatal("the reverse delta was not applied")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func keepSchema(e *env) {
	e.seed("orders", "control", 4000)
	e.exec("create index orders_v on orders (v)")
	e.exec("create view orders_small as select id, n from orders where n < 100")
	e.exec("do $$ begin create role keep_reader; exception when duplicate_object then null; end $$")
	e.exec("grant select on orders to keep_reader")
	e.exec("comment on table orders is 'the orders'")
}

func startKeep(e *env, o replicate.Options, rep *keepRep, ctl *keepCtl) (context.CancelFunc, chan error) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- replicate.Run(ctx, e.pool, o, rep, ctl) }()
	return cancel, errc
}

func waitRun(t *testing.T, errc chan error) error {
	t.Helper()
	select {
	case err := <-errc:
		return err
	case <-time.After(180 * time.Second):
		t.Fatal("run did not end")
		return nil
	}
}

// assertReverted: the original is back, exactly as the control, with its
// types, index, view, grant and comment, and nothing of the run is left.
func assertReverted(t *testing.T, e *env) {
	t.Helper()
	e.assertSame("orders", "control", "id, v, n")
	if ty := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'n'"); ty != "integer" {
		t.Fatalf("n is %s after the revert, want integer", ty)
	}
	for _, idx := range []string{"orders_pkey", "orders_v"} {
		if e.str("select count(*) from pg_index where indrelid = 'orders'::regclass and indexrelid = to_regclass($1)", idx) != "1" {
			t.Fatalf("index %s is not on orders after the revert", idx)
		}
	}
	if got, want := e.str("select count(*) from orders_small"), e.str("select count(*) from control where n < 100"); got != want {
		t.Fatalf("view orders_small has %s rows, want %s", got, want)
	}
	if e.str("select has_table_privilege('keep_reader', 'orders', 'select')") != "true" {
		t.Fatal("grant lost by the revert")
	}
	if c := e.str("select coalesce(obj_description('orders'::regclass, 'pg_class'), '')"); c != "the orders" {
		t.Fatalf("comment %q after the revert", c)
	}
	e.assertNoLeftovers("orders")
}

// A migration under writers keeps the old table; writes go on on the new
// one; tat.revert brings the old table back with every write.
func TestKeepOldRevert(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	keepSchema(e)
	o := opts("alter table orders alter column n type bigint")
	o.KeepOld = time.Hour
	rep, ctl := &keepRep{}, &keepCtl{}
	w := e.startWriter(3, "orders", "control", 5000)
	_, errc := startKeep(e, o, rep, ctl)
	waitKept(t, rep, errc, "kept", func(s replicate.KeepStatus) bool { return s.Outcome == "" })
	if ty := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'n'"); ty != "bigint" {
		t.Fatalf("n is %s after the switch", ty)
	}
	time.Sleep(time.Second) // writes to the new table
	w.Stop(t)
	e.exec("insert into orders values (900001, 'new', 1); insert into control values (900001, 'new', 1)")
	e.exec("update orders set n = n + 7 where id % 10 = 3; update control set n = n + 7 where id % 10 = 3")
	e.exec("delete from orders where id % 10 = 4; delete from control where id % 10 = 4")
	waitSynced(t, e)
	e.assertSame("orders__tat_old", "control", "id, v, n")
	ctl.revert.Store(true)
	if err := waitRun(t, errc); err != nil {
		t.Fatal(err)
	}
	if s, _ := rep.status(); s.Outcome != replicate.OutcomeReverted {
		t.Fatalf("outcome %+v", s)
	}
	assertReverted(t, e)
}

// The engine stops abruptly in the kept window; writes go on; the next run
// resumes the sync from the persistent reverse delta and reverts exactly.
func TestKeepOldResume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	keepSchema(e)
	o := opts("alter table orders alter column n type bigint")
	o.KeepOld = time.Hour
	rep, ctl := &keepRep{}, &keepCtl{}
	cancel, errc := startKeep(e, o, rep, ctl)
	waitKept(t, rep, errc, "kept", func(s replicate.KeepStatus) bool { return s.Outcome == "" })
	w := e.startWriter(2, "orders", "control", 5000)
	time.Sleep(500 * time.Millisecond)
	cancel() // the sidecar dies: nothing is cleaned up
	if err := waitRun(t, errc); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run: %v", err)
	}
	time.Sleep(500 * time.Millisecond) // writes while nobody applies them
	w.Stop(t)
	if n := e.str("select count(*) from orders__tat_rdelta"); n == "0" {
		t.Fatal("the reverse capture recorded nothing while the engine was down")
	}
	rep2 := &keepRep{}
	o.Continue = true
	_, errc = startKeep(e, o, rep2, ctl)
	waitKept(t, rep2, errc, "resumed", func(s replicate.KeepStatus) bool { return s.Outcome == "" })
	waitSynced(t, e)
	e.assertSame("orders__tat_old", "control", "id, v, n")
	ctl.revert.Store(true)
	if err := waitRun(t, errc); err != nil {
		t.Fatal(err)
	}
	assertReverted(t, e)
}

// A value that cannot go back blocks the revert (reported with its row),
// never the writer; tat.finish still ends the window cleanly.
func TestKeepOldBlockedAndFinish(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	keepSchema(e)
	o := opts("alter table orders alter column n type bigint")
	o.KeepOld = time.Hour
	rep, ctl := &keepRep{}, &keepCtl{}
	_, errc := startKeep(e, o, rep, ctl)
	waitKept(t, rep, errc, "kept", func(s replicate.KeepStatus) bool { return s.Outcome == "" })
	e.exec("update orders set n = 5000000000 where id = 7") // the writer's transaction succeeds
	e.exec("update orders set n = 1 where id = 8")
	s := waitKept(t, rep, errc, "blocked", func(s replicate.KeepStatus) bool { return s.Blocked != "" })
	if !strings.Contains(s.Blocked, "(7)") || !strings.Contains(s.Blocked, "out of range") {
		t.Fatalf("blocked reason %q does not name row 7 and the cause", s.Blocked)
	}
	ctl.revert.Store(true)
	time.Sleep(time.Second)
	select {
	case err := <-errc:
		t.Fatalf("the run ended on a revert that is impossible: %v", err)
	default:
	}
	if e.str("select n from orders where id = 7") != "5000000000" {
		t.Fatal("the forward table lost the write")
	}
	ctl.finish.Store(true)
	if err := waitRun(t, errc); err != nil {
		t.Fatal(err)
	}
	if s, _ := rep.status(); s.Outcome != replicate.OutcomeFinished {
		t.Fatalf("outcome %+v", s)
	}
	if e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'n'") != "bigint" {
		t.Fatal("finish changed the new table")
	}
	e.assertNoLeftovers("orders")
}

// keep_old is refused up front where no inverse is known.
func TestKeepOldRefusesUsing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 10)
	o := opts("alter table orders alter column v type text using lower(v)")
	o.KeepOld = time.Hour
	err := e.run(o)
	if !errors.Is(err, replicate.ErrBadCommand) || !strings.Contains(err.Error(), "USING") {
		t.Fatalf("keep_old with USING: %v", err)
	}
	e.assertNoLeftovers("orders")
}

// The kept window runs the table owner's code too: a trigger she puts on
// the kept old table fires in every reverse apply and in the revert's last
// delta under its lock. It tries every way to become a superuser; it must
// run as her (in the sandbox, restricted under the lock), and it does run
// (her log says so), and the revert still brings her table back exactly.
func TestHostileKeepOldTrigger(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	role := hostileOwner(e)
	e.exec(`create table public.tc (id int primary key, v int); insert into public.tc select id, v from public.t`)
	o := opts("alter table t alter column v type bigint")
	o.KeepOld = time.Hour
	rep, ctl := &keepRep{}, &keepCtl{}
	_, errc := startKeep(e, o, rep, ctl)
	waitKept(t, rep, errc, "kept", func(s replicate.KeepStatus) bool { return s.Outcome == "" })
	e.exec(`set role "` + role + `";
		create table public.tlog (at text, cu text, su text);
		create function public.evil_old() returns trigger language plpgsql as $$
		begin
		  insert into public.tlog values (tg_op, current_user, session_user);
		  begin execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  begin reset role; execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  begin perform set_config('role', 'postgres', true); execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  begin set session authorization postgres; execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  if tg_op = 'DELETE' then return old; end if;
		  return new;
		end $$;
		create trigger evil before insert or update or delete on public.t__tat_old for each row execute function public.evil_old();
		reset role`)
	// Writes on the new table: the reverse apply carries them to the old
	// one, through her trigger.
	e.exec("update t set v = v + 5 where id % 7 = 0; update tc set v = v + 5 where id % 7 = 0")
	e.exec("delete from t where id % 11 = 0; delete from tc where id % 11 = 0")
	e.exec("insert into t values (5001, 1); insert into tc values (5001, 1)")
	deadline := time.Now().Add(60 * time.Second)
	for e.str("select count(*) from t__tat_rdelta") != "0" {
		if time.Now().After(deadline) {
			t.Fatal("the reverse delta was not applied")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if e.isSuper(role) {
		t.Fatal("SECURITY: she became a superuser through her trigger on the kept table (reverse apply)")
	}
	if got := e.str("select count(*) from tlog"); got == "0" {
		t.Fatal("her trigger never fired in the reverse apply: the test proves nothing")
	}
	if got := e.str("select string_agg(distinct cu, ',') from tlog"); got != role {
		t.Fatalf("her trigger ran as %s, want only %s", got, role)
	}
	e.assertSame("t__tat_old", "tc", "id, v")
	// One more change right before the revert's lock: the last delta runs
	// her trigger under the lock, restricted.
	e.exec("truncate tlog")
	e.exec("update t set v = v + 1 where id <= 3; update tc set v = v + 1 where id <= 3")
	ctl.revert.Store(true)
	if err := waitRun(t, errc); err != nil {
		t.Fatal(err)
	}
	if e.isSuper(role) {
		t.Fatal("SECURITY: she became a superuser through her trigger on the kept table (revert)")
	}
	if s, _ := rep.status(); s.Outcome != replicate.OutcomeReverted {
		t.Fatalf("outcome %+v", s)
	}
	if got := e.str("select coalesce(string_agg(distinct cu, ','), '') from tlog"); got != role {
		t.Fatalf("in the revert her trigger ran as %q, want only %s (never: the test proves nothing)", got, role)
	}
	if ty := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 't'::regclass and attname = 'v'"); ty != "integer" {
		t.Fatalf("v is %s after the revert", ty)
	}
	e.assertSame("t", "tc", "id, v")
	e.assertNoLeftovers("t")
}
