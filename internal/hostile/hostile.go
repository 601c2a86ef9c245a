// Package hostile is the harness of the hostile-owner suite (issue 12,
// DESIGN.md §6), shared by listener/hostile_test.go (the SQL front door and
// tatd) and replicate/hostile_test.go (the engine called as the pg_tat CLI
// does).
//
// A table owner who is not a superuser, mallory, puts code of hers where a
// migration of her table evaluates it. Her code tries to shed the role it
// runs as (RESET ROLE, set_config('role', ...), SET SESSION AUTHORIZATION
// DEFAULT) and, whenever that leaves it a superuser, makes her a superuser,
// writes a file into the data directory and deletes another role's (bob's)
// table. DB builds that world in a fresh database and asserts that she
// gained nothing; Arm arms her code only in the phase a test is about (an
// advisory lock taken when the engine enters that phase; for "switchlock"
// only while the switch holds the table locked against writes), so a
// failure names the phase that leaks. Every run of her code records a row
// in her table hits (the phase it was armed for, current_user,
// session_user, is_superuser).
package hostile

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

const (
	rows   = 2000
	secret = 10 // rows of bob_secret
	class  = 4242
)

// codes are the advisory lock keys (class, code) that arm her code; the code
// tells it which phase it is armed for.
var codes = map[string]int{
	"prepare": 1, "capture": 2, "copy": 3, "index": 4, "analyze": 5, "catchup": 6,
	"verify": 7, "switch": 8, "validate": 9, "any": 10, "switchlock": 11,
}

// setupSQL sets up the attacker's world, run as a superuser. Placeholders:
// {M} mallory, {B} bob, {DIR} data directory, {PREFIX} file name prefix of
// this test, {TOID} the oid of t, {CREATE} the grant of CREATE on public.
const setupSQL = `
create role {M} nosuperuser nocreaterole nocreatedb noreplication login;
create role {B} nologin;
{CREATE}
create table public.t (id int primary key, v int);
insert into public.t select g, (g * 7) % 1000 from generate_series(1, {ROWS}) g;
alter table public.t owner to {M};
-- ctl gets the same writes as t (in the same transactions) and is never
-- migrated: the expected content is the ALTER's transformation of ctl.
create table public.ctl (id int primary key, v int);
insert into public.ctl select * from public.t;
alter table public.ctl owner to {M};
create table public.bob_secret (id int primary key, s text);
insert into public.bob_secret select g, md5(g::text) from generate_series(1, {SECRET}) g;
alter table public.bob_secret owner to {B};
create table public.hits (at text, cu text, su text, issuper text, locked boolean, ts timestamptz default clock_timestamp());
alter table public.hits owner to {M};
grant all on public.hits to public;
analyze public.t;
`

// fnSQL is her code (created as a superuser, then handed to her: it is
// hers, security invoker, as any function she would write).
const fnSQL = `
create function public.mallory_fn(x int) returns int
language plpgsql volatile security invoker as $fn$
declare
    code   int;
    armed  text;
    locked boolean := false;
begin
    begin
        select l.objid::int into code from pg_catalog.pg_locks l
         where l.locktype = 'advisory' and l.classid = 4242 and l.objsubid = 2 and l.granted
           and l.database = (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database())
         limit 1;
    exception when others then null;
    end;
    -- locked: some session (hers or not) holds t against writes, as the
    -- switch does while it applies the last delta
    begin
        locked := exists (select from pg_catalog.pg_locks l where l.locktype = 'relation' and l.relation = {TOID}
            and l.mode in ('ExclusiveLock', 'AccessExclusiveLock') and l.granted);
    exception when others then null;
    end;
    armed := case code when 1 then 'prepare' when 2 then 'capture' when 3 then 'copy' when 4 then 'index'
                       when 5 then 'analyze' when 6 then 'catchup' when 7 then 'verify' when 8 then 'switch'
                       when 9 then 'validate' when 10 then 'any'
                       when 11 then case when locked then 'switchlock' end end;
    if armed is not null then
        begin execute 'reset role'; exception when others then null; end;
        begin perform pg_catalog.set_config('role', session_user::text, true); exception when others then null; end;
        begin execute 'set session authorization default'; exception when others then null; end;
        if pg_catalog.current_setting('is_superuser') = 'on' then
            begin execute 'alter role {MQ} superuser'; exception when others then null; end;
            begin
                execute pg_catalog.format('copy (select 1) to %L',
                    '{DIR}/{PREFIX}' || armed || '_' || pg_catalog.pg_backend_pid());
            exception when others then null;
            end;
            begin delete from public.bob_secret; exception when others then null; end;
        end if;
        -- whatever she got short of a superuser (a sidecar with CREATEROLE)
        begin execute 'grant pg_write_server_files, pg_execute_server_program to {MQ}'; exception when others then null; end;
        begin execute 'alter role {MQ} createrole'; exception when others then null; end;
    end if;
    begin
        insert into public.hits (at, cu, su, issuper, locked)
        values (coalesce(armed, 'idle'), current_user, session_user, pg_catalog.current_setting('is_superuser'), locked);
    exception when others then null;
    end;
    return x;
end
$fn$;
-- non-volatile variants (column defaults evaluated once by ALTER, generated
-- columns and index expressions): the volatile body runs all the same
create function public.mallory_stable(x int) returns int language plpgsql stable
as $$ begin return public.mallory_fn(x); end $$;
create function public.mallory_imm(x int) returns int language plpgsql immutable
as $$ begin return public.mallory_fn(x); end $$;
create function public.mallory_trg() returns trigger language plpgsql
as $$ begin perform public.mallory_fn(0); return null; end $$;
alter function public.mallory_fn(int) owner to {M};
alter function public.mallory_stable(int) owner to {M};
alter function public.mallory_imm(int) owner to {M};
alter function public.mallory_trg() owner to {M};
`

// plants are what she puts on the engine's own tables, as herself, once
// they exist: when the copy starts for a test of the copy, else when the
// catch-up starts (the copy's WITH queries fail on a table with rules).
// NewArm's plant names one of them.
var plants = map[string]string{
	"shadow": `
create trigger zz_mallory after insert or update or delete on public.t__tat_new
    for each row execute function public.mallory_trg();
alter table public.t__tat_new enable always trigger zz_mallory;`,
	// fires at the COMMIT of the transaction that wrote the shadow
	"shadow_deferred": `
create constraint trigger zz_mallory_deferred after insert or update or delete on public.t__tat_new
    deferrable initially deferred for each row execute function public.mallory_trg();
alter table public.t__tat_new enable always trigger zz_mallory_deferred;`,
	"rule": `
create rule zz_mallory_ins as on insert to public.t__tat_new do also select public.mallory_fn(new.id::int);
create rule zz_mallory_upd as on update to public.t__tat_new do also select public.mallory_fn(new.id::int);
create rule zz_mallory_del as on delete to public.t__tat_new do also select public.mallory_fn(old.id::int);`,
	"delta": `
create trigger zz_mallory after insert or update or delete on public.t__tat_delta
    for each row execute function public.mallory_trg();
alter table public.t__tat_delta enable always trigger zz_mallory;
create trigger zz_mallory_trunc after truncate on public.t__tat_delta
    for each statement execute function public.mallory_trg();
alter table public.t__tat_delta enable always trigger zz_mallory_trunc;`,
}

// Captures are the capture methods every hostile test runs under.
var Captures = []string{replicate.CaptureTrigger, replicate.CaptureLogical}

// SkipLogicalBefore14 skips the test for the logical capture before
// PostgreSQL 14.
func SkipLogicalBefore14(t testing.TB, capture string) {
	t.Helper()
	if capture == replicate.CaptureLogical && testpg.Version(t) < 140000 {
		t.Skip("logical capture needs PostgreSQL 14+")
	}
}

// EachCapture runs f once for each of Captures, in a parallel subtest named
// prefix+capture that is skipped for the logical capture before
// PostgreSQL 14.
func EachCapture(t *testing.T, prefix string, f func(t *testing.T, capture string)) {
	for _, capture := range Captures {
		t.Run(prefix+capture, func(t *testing.T) {
			t.Parallel()
			SkipLogicalBefore14(t, capture)
			f(t, capture)
		})
	}
}

// DB is one test's database, its roles and the attacker's world.
type DB struct {
	T       *testing.T
	URL     string // superuser, this database
	SU      *pgxpool.Pool
	Name    string   // of the database
	Mallory string   // the attacker's role
	Extra   []string // more roles to drop at the end

	bob      string
	dbOID    uint32
	tOID     uint32
	mURL     string // logs in as mallory
	dataDir  string
	prefix   string // of the files her code writes
	replacer *strings.Replacer
}

// New creates the database (tat not installed), mallory (with CREATE on
// public when create), bob, t, ctl, bob_secret, hits and her functions.
func New(t *testing.T, create bool) *DB {
	t.Helper()
	ctx := context.Background()
	h := &DB{T: t, URL: testpg.NewDB(t)}
	u, err := url.Parse(h.URL)
	if err != nil {
		t.Fatal(err)
	}
	h.Name = strings.TrimPrefix(u.Path, "/")
	h.Mallory, h.bob = h.Name+"_mallory", h.Name+"_bob"
	mu := *u
	mu.User = url.User(h.Mallory)
	h.mURL = mu.String()
	t.Cleanup(h.dropRoles) // after the listener stopped, before the pool closes
	h.SU = testpg.Pool(t, h.URL)
	if err := h.SU.QueryRow(ctx, `select d.oid, current_setting('data_directory') from pg_database d where d.datname = current_database()`).
		Scan(&h.dbOID, &h.dataDir); err != nil {
		t.Fatal(err)
	}
	h.prefix = fmt.Sprintf("pwned_%d_", h.dbOID)
	grant := ""
	if create {
		grant = "grant create on schema public to " + pgx.Identifier{h.Mallory}.Sanitize() + ";"
	}
	h.replacer = strings.NewReplacer("{M}", pgx.Identifier{h.Mallory}.Sanitize(), "{B}", pgx.Identifier{h.bob}.Sanitize(),
		"{CREATE}", grant, "{ROWS}", fmt.Sprint(rows), "{SECRET}", fmt.Sprint(secret))
	h.SuExec(setupSQL)
	if err := h.SU.QueryRow(ctx, "select 'public.t'::regclass::oid").Scan(&h.tOID); err != nil {
		t.Fatal(err)
	}
	h.replacer = strings.NewReplacer("{M}", pgx.Identifier{h.Mallory}.Sanitize(), "{B}", pgx.Identifier{h.bob}.Sanitize(),
		"{MQ}", strings.ReplaceAll(pgx.Identifier{h.Mallory}.Sanitize(), "'", "''"),
		"{DIR}", h.dataDir, "{PREFIX}", h.prefix, "{TOID}", fmt.Sprint(h.tOID))
	h.SuExec(fnSQL)
	return h
}

// dropRoles drops the database early (the roles own objects in it) and the
// test's roles, the run roles left behind included.
func (h *DB) dropRoles() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	u, _ := url.Parse(h.URL)
	u.Path = "/postgres"
	c, err := pgx.Connect(ctx, u.String())
	if err != nil {
		return
	}
	defer c.Close(ctx)
	_, _ = c.Exec(ctx, "select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1 and not active", h.Name)
	if _, err := c.Exec(ctx, "drop database if exists "+pgx.Identifier{h.Name}.Sanitize()+" with (force)"); err != nil {
		h.T.Logf("drop database: %v", err)
		return
	}
	roles := append([]string{h.Mallory, h.bob}, h.Extra...)
	rows, _ := c.Query(ctx, `select rolname::text from pg_roles where rolname like 'tat\_run\_' || $1::text || '\_%'`, fmt.Sprint(h.dbOID))
	runRoles, _ := pgx.CollectRows(rows, pgx.RowTo[string])
	roles = append(roles, runRoles...)
	for _, r := range roles {
		_, _ = c.Exec(ctx, "drop role if exists "+pgx.Identifier{r}.Sanitize())
	}
}

// SuExec runs sql as the superuser, {M} replaced by mallory's quoted name
// (and {B} by bob's), failing the test on error.
func (h *DB) SuExec(sql string, args ...any) {
	h.T.Helper()
	if _, err := h.SU.Exec(context.Background(), h.replacer.Replace(sql), args...); err != nil {
		h.T.Fatalf("%s: %v", sql, err)
	}
}

// Str returns the one value sql selects, as the superuser, as text ("" for
// NULL).
func (h *DB) Str(sql string, args ...any) string {
	h.T.Helper()
	var v any
	if err := h.SU.QueryRow(context.Background(), sql, args...).Scan(&v); err != nil {
		h.T.Fatalf("%s: %v", sql, err)
	}
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

// AsMallory opens a session that logged in as mallory.
func (h *DB) AsMallory() *pgx.Conn {
	h.T.Helper()
	c, err := pgx.Connect(context.Background(), h.mURL)
	if err != nil {
		h.T.Fatalf("connect as %s: %v", h.Mallory, err)
	}
	h.T.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// MalloryExec runs sql (if any) as mallory, failing the test on error.
func (h *DB) MalloryExec(sql string) {
	h.T.Helper()
	if strings.TrimSpace(sql) == "" {
		return
	}
	c := h.AsMallory()
	if _, err := c.Exec(context.Background(), h.replacer.Replace(sql)); err != nil {
		h.T.Fatalf("as %s: %s: %v", h.Mallory, sql, err)
	}
	c.Close(context.Background())
}

// Arm arms her code (the advisory lock) when the engine enters the phase
// under test and disarms it when it leaves; it also plants her objects on
// the shadow when the copy starts and tells when the job waits for the
// switch. The engine calls it synchronously (through Reporter), so the
// phase's work starts only once the arming is done.
type Arm struct {
	h       *DB
	target  string
	plant   string
	plantAt string // the phase at whose start she plants

	mu       sync.Mutex
	conn     *pgx.Conn
	held     int
	phases   []string
	planted  bool
	plantErr error
	waiting  chan struct{}
	once     sync.Once
	catchup  chan struct{} // closed when the catch-up starts
	cOnce    sync.Once
}

// NewArm arms her code for the phase target ("any": from now on, "": never,
// "switchlock": while the switch holds t locked) and has her plant plant
// ("": nothing; else "shadow", "shadow_deferred", "rule" or "delta").
func (h *DB) NewArm(target, plant string) *Arm {
	h.T.Helper()
	c, err := pgx.Connect(context.Background(), h.URL)
	if err != nil {
		h.T.Fatal(err)
	}
	h.T.Cleanup(func() { c.Close(context.Background()) })
	a := &Arm{h: h, target: target, plant: plant, plantAt: replicate.PhaseCatchup, conn: c,
		waiting: make(chan struct{}), catchup: make(chan struct{})}
	if target == replicate.PhaseCopy {
		a.plantAt = replicate.PhaseCopy
	}
	if target == "any" {
		a.mu.Lock()
		a.set(codes["any"])
		a.mu.Unlock()
	}
	return a
}

// set holds the lock of code (0: none); mu held.
func (a *Arm) set(code int) {
	if a.held == code {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if a.held != 0 {
		if _, err := a.conn.Exec(ctx, "select pg_advisory_unlock($1::int4, $2::int4)", class, a.held); err != nil {
			a.h.T.Errorf("disarm: %v", err)
		}
		a.held = 0
	}
	if code != 0 {
		if _, err := a.conn.Exec(ctx, "select pg_advisory_lock($1::int4, $2::int4)", class, code); err != nil {
			a.h.T.Errorf("arm: %v", err)
			return
		}
		a.held = code
	}
}

func (a *Arm) event(msg string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p, ok := strings.CutPrefix(msg, "phase "); ok {
		a.phases = append(a.phases, p)
		if p == replicate.PhaseCatchup {
			a.cOnce.Do(func() { close(a.catchup) })
		}
		if p == a.plantAt && a.plant != "" && !a.planted {
			a.planted = true
			a.plantErr = a.h.plantNow(a.plant)
		}
		switch {
		case a.target == "any":
		case a.target == p:
			a.set(codes[p])
		case a.target == "switchlock" && p == replicate.PhaseSwitch:
			a.set(codes["switchlock"])
		default:
			a.set(0)
		}
	}
	if strings.Contains(msg, "waiting for a manual switch") {
		a.once.Do(func() { close(a.waiting) })
	}
}

// Seen returns the phases the engine entered so far.
func (a *Arm) Seen() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.phases...)
}

// Waiting is closed when the job waits for a manual switch.
func (a *Arm) Waiting() <-chan struct{} { return a.waiting }

// PlantAt is the phase at whose start she plants.
func (a *Arm) PlantAt() string { return a.plantAt }

// Planted tells whether she tried to plant, and the error if she could not.
func (a *Arm) Planted() (bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.planted, a.plantErr
}

// plantNow runs her plant as herself; an error means she could not.
func (h *DB) plantNow(kind string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.mURL)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, plants[kind])
	return err
}

// Reporter passes everything on to inner and lets the arm see the events.
func (a *Arm) Reporter(inner replicate.Reporter) replicate.Reporter {
	return reporter{inner: inner, arm: a}
}

type reporter struct {
	inner replicate.Reporter
	arm   *Arm
}

func (r reporter) Progress(ctx context.Context, p replicate.Progress) {
	r.inner.Progress(ctx, p)
}
func (r reporter) Event(ctx context.Context, phase, msg string) {
	r.arm.event(msg)
	r.inner.Event(ctx, phase, msg)
}

// write applies one write to t and ctl in one statement, as her application would.
func write(ctx context.Context, c execer, r *rand.Rand, next *atomic.Int64) error {
	var sql string
	var args []any
	switch op := r.IntN(20); {
	case op < 12:
		sql, args = `with a as (update public.t set v = v + 1 where id = $1) update public.ctl set v = v + 1 where id = $1`, []any{r.Int64N(rows) + 1}
	case op < 17:
		id := next.Add(1)
		sql, args = `with a as (insert into public.t values ($1, $2)) insert into public.ctl values ($1, $2)`, []any{id, id % 1000}
	default:
		sql, args = `with a as (delete from public.t where id = $1) delete from public.ctl where id = $1`, []any{r.Int64N(rows) + 1}
	}
	_, err := c.Exec(ctx, sql, args...)
	return err
}

type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// writer writes as mallory during the job until the catch-up starts (so
// that the catch-up has a backlog to apply and can still converge) or stop
// is called; stop returns the number of writes.
func (h *DB) writer(next *atomic.Int64, until <-chan struct{}) (stop func() int) {
	c := h.AsMallory()
	var stopping atomic.Bool
	var n atomic.Int64
	done := make(chan error, 1)
	go func() {
		r := rand.New(rand.NewPCG(7, 11))
		for !stopping.Load() {
			select {
			case <-until:
				done <- nil
				return
			default:
			}
			if err := write(context.Background(), c, r, next); err != nil {
				done <- err
				return
			}
			n.Add(1)
			time.Sleep(2 * time.Millisecond)
		}
		done <- nil
	}()
	var once sync.Once
	stop = func() int {
		once.Do(func() {
			stopping.Store(true)
			if err := <-done; err != nil {
				h.T.Errorf("writer: %v", err)
			}
		})
		return int(n.Load())
	}
	h.T.Cleanup(func() { stop() }) // before its connection closes
	return stop
}

// writes commits n writes as mallory.
func (h *DB) writes(n int, next *atomic.Int64) {
	h.T.Helper()
	c := h.AsMallory()
	r := rand.New(rand.NewPCG(3, 5))
	for i := 0; i < n; i++ {
		if err := write(context.Background(), c, r, next); err != nil {
			h.T.Fatalf("write: %v", err)
		}
	}
}

// ForeignHits counts runs of her code armed for phase outside her own sessions.
func (h *DB) ForeignHits(phase string) int {
	h.T.Helper()
	var n int
	if err := h.SU.QueryRow(context.Background(), `select count(*) from public.hits where at = $1 and su <> $2`, phase, h.Mallory).Scan(&n); err != nil {
		h.T.Fatal(err)
	}
	return n
}

func (h *DB) waitHits(phase string, timeout time.Duration) bool {
	h.T.Helper()
	deadline := time.Now().Add(timeout)
	for h.ForeignHits(phase) == 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// Load is her application's writes around one run armed in a phase: in
// catchup she writes during the job and while it waits for the switch; in
// switchlock she writes in a transaction the switch's lock waits for, so
// the last delta applied under the lock is not empty.
type Load struct {
	h          *DB
	phase      string
	next       atomic.Int64 // the ids of her inserts
	stopWriter func() int
}

// StartLoad starts her writes for a run armed in phase (with arm): in
// catchup she writes from now until the catch-up starts; in verify too:
// verify evaluates her code only over the ranges her writes touched (the
// others are checked against the copy's checksums). Call it before the run
// starts.
func (h *DB) StartLoad(phase string, arm *Arm) *Load {
	l := &Load{h: h, phase: phase}
	l.next.Store(1_000_000)
	if phase == "catchup" || phase == "verify" {
		l.stopWriter = h.writer(&l.next, arm.catchup)
	}
	return l
}

// Switch is called once the run waits for the switch (waits) or ended. It
// stops her writes during the job; if the run waits, it lets it switch:
// request lets the switch go, ended returns a non-nil error (reported)
// once the run ended. In catchup she writes 40 more times and the switch
// waits until the catch-up ran her code on them; in switchlock she writes
// in a transaction still open when the switch is let go (writeUnderSwitch).
func (l *Load) Switch(waits bool, request func(), ended func() error) {
	h := l.h
	h.T.Helper()
	if l.stopWriter != nil {
		h.T.Logf("writes during the job: %d", l.stopWriter())
	}
	if !waits {
		return
	}
	switch l.phase {
	case "catchup":
		h.writes(40, &l.next)
		if !h.waitHits("catchup", time.Minute) {
			h.T.Errorf("the catch-up never ran her code on mallory's writes (hits: %s)", h.HitSummary())
		}
		request()
	case "switchlock":
		h.writeUnderSwitch(&l.next, request, ended)
	default:
		request()
	}
}

// writeUnderSwitch makes the last delta, applied under the switch's lock,
// non-empty: mallory writes in a transaction still open when the switch is
// let go (request) and commits it once the switch's lock request waits for
// it (or the run ended: ended returns an error).
func (h *DB) writeUnderSwitch(next *atomic.Int64, request func(), ended func() error) {
	h.T.Helper()
	ctx := context.Background()
	c := h.AsMallory()
	tx, err := c.Begin(ctx)
	if err != nil {
		h.T.Fatal(err)
	}
	r := rand.New(rand.NewPCG(13, 17))
	for i := 0; i < 30; i++ {
		if err := write(ctx, tx, r, next); err != nil {
			h.T.Fatalf("write: %v", err)
		}
	}
	var pid int32
	if err := tx.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
		h.T.Fatal(err)
	}
	request()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var waiting int
		// the switch's lock request on t (only the switch locks t against
		// writes; a catch-up that waits for her transaction to end would
		// apply her writes before the lock)
		if err := h.SU.QueryRow(ctx, `select count(*) from pg_locks l where not l.granted and l.locktype = 'relation'
			and l.relation = $1 and $2::int = any(pg_blocking_pids(l.pid))`, h.tOID, pid).Scan(&waiting); err != nil {
			h.T.Fatal(err)
		}
		if waiting > 0 {
			break
		}
		if err := ended(); err != nil {
			h.T.Error(err)
			break
		}
		if time.Now().After(deadline) {
			h.T.Errorf("the switch never requested its lock on t while mallory's transaction was open")
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := tx.Commit(ctx); err != nil {
		h.T.Fatalf("commit mallory's last writes: %v", err)
	}
}

// GainedNothing asserts that mallory has exactly what she had: no attribute,
// no membership, no file written, bob's table intact, her code never a
// superuser's and never anyone's but hers (or the run's role's).
func (h *DB) GainedNothing() {
	h.T.Helper()
	ctx := context.Background()
	var super, createrole, replication, bypass, createdb bool
	if err := h.SU.QueryRow(ctx, `select rolsuper, rolcreaterole, rolreplication, rolbypassrls, rolcreatedb from pg_roles where rolname = $1`,
		h.Mallory).Scan(&super, &createrole, &replication, &bypass, &createdb); err != nil {
		h.T.Fatal(err)
	}
	if super {
		h.T.Errorf("SECURITY: %s became a superuser", h.Mallory)
	}
	if createrole || replication || bypass || createdb {
		h.T.Errorf("SECURITY: %s gained attributes: createrole=%v replication=%v bypassrls=%v createdb=%v",
			h.Mallory, createrole, replication, bypass, createdb)
	}
	if m := h.Str(`select string_agg(r.rolname, ', ') from pg_auth_members a join pg_roles r on r.oid = a.roleid
		where a.member = (select oid from pg_roles where rolname = $1)`, h.Mallory); m != "" {
		h.T.Errorf("SECURITY: %s became a member of %s", h.Mallory, m)
	}
	if f := h.Str(`select string_agg(f, ', ' order by f) from pg_ls_dir(current_setting('data_directory')) f where f like $1 || '%'`,
		h.prefix); f != "" {
		h.T.Errorf("SECURITY: her code wrote server files: %s", f)
	}
	if n := h.Str("select count(*) from public.bob_secret"); n != fmt.Sprint(secret) {
		h.T.Errorf("SECURITY: bob_secret has %s rows, not %d", n, secret)
	}
	// is_superuser describes the session's user: inside a security-restricted
	// operation (the last delta, run by the sidecar's session as REFRESH of her
	// view) it may say on while her code runs as her and cannot SET ROLE back.
	// What counts is the role her code ran as (current_user, after every
	// escape it tried).
	if s := h.Str(`select string_agg(distinct format('%s as %s (session %s)', at, cu, su), '; ') from public.hits h
		where exists (select 1 from pg_roles r where r.rolname = h.cu and r.rolsuper)`); s != "" {
		h.T.Errorf("SECURITY: her code ran as a superuser: %s", s)
	}
	if s := h.Str(`select string_agg(distinct format('%s as %s (session %s)', at, cu, su), '; ') from public.hits
		where cu <> $1 and cu not like 'tat\_run\_%'`, h.Mallory); s != "" {
		h.T.Errorf("SECURITY: her code ran with another role's rights: %s", s)
	}
}

// RunRoleGone asserts the run's login role was dropped.
func (h *DB) RunRoleGone() {
	h.T.Helper()
	if r := h.Str(`select string_agg(rolname, ', ') from pg_roles where rolname like 'tat\_run\_' || $1::text || '\_%'`,
		fmt.Sprint(h.dbOID)); r != "" {
		h.T.Errorf("run roles left behind: %s", r)
	}
}

// NoLeftovers asserts the engine left none of its tables behind.
func (h *DB) NoLeftovers() {
	h.T.Helper()
	if s := h.Str(`select string_agg(relname, ', ') from pg_class where relname like 't\_\_tat\_%'`); s != "" {
		h.T.Errorf("left behind: %s", s)
	}
}

// IDV are t's content and ctl's as text columns, for an ALTER that keeps
// the columns and their values.
const (
	GotIDV  = `select id::text, v::text from public.t`
	WantIDV = `select id::text, v::text from public.ctl`
)

// Migrated asserts the ALTER was applied: t's content (got, a query over t)
// is the ALTER's transformation of ctl (want, a query over ctl), column col
// is of type typ and mallory still owns t.
func (h *DB) Migrated(got, want, col, typ string) {
	h.T.Helper()
	h.sameContent(got, want)
	h.ColumnType(col, typ)
	h.ownedByMallory()
}

// sameContent compares got (over t) with want (over ctl), row by row as text.
func (h *DB) sameContent(got, want string) {
	h.T.Helper()
	diff := h.Str(fmt.Sprintf(`select count(*) from ((%[1]s except all %[2]s) union all (%[2]s except all %[1]s)) d`, got, want))
	if diff != "0" {
		h.T.Errorf("content of t differs from the ALTER applied in SQL to ctl in %s rows (t: %s rows, expected %s)", diff,
			h.Str("select count(*) from ("+got+") g"), h.Str("select count(*) from ("+want+") w"))
	}
}

// ColumnType asserts that column col of t is of type typ.
func (h *DB) ColumnType(col, typ string) {
	h.T.Helper()
	if got := h.Str(`select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'public.t'::regclass and attname = $1`, col); got != typ {
		h.T.Errorf("column %s is %q, want %q", col, got, typ)
	}
}

func (h *DB) ownedByMallory() {
	h.T.Helper()
	if o := h.Str(`select pg_get_userbyid(relowner)::text from pg_class where oid = 'public.t'::regclass`); o != h.Mallory {
		h.T.Errorf("t is owned by %s, not %s", o, h.Mallory)
	}
}

// HitSummary sums up the runs of her code, for the logs.
func (h *DB) HitSummary() string {
	return h.Str(`select coalesce(string_agg(format('%s/%s/%s/super=%s/locked=%s: %s', at, cu, su, issuper, locked, n), '; '), 'none')
		from (select at, cu, su, issuper, locked, count(*) n from public.hits group by 1, 2, 3, 4, 5 order by 1, 2, 3) s`)
}
