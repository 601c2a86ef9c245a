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

import (
	"context"
	"errors"
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
	"github.com/sirupsen/logrus"

	pgtat "github.com/pgtat/pg_tat"
	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

const (
	hostileRows   = 2000
	hostileSecret = 10 // rows of bob_secret
	hostileClass  = 4242
)

// hostileCodes are the advisory lock keys (hostileClass, code) that arm her
// code; the code tells it which phase it is armed for.
var hostileCodes = map[string]int{
	"prepare": 1, "capture": 2, "copy": 3, "index": 4, "analyze": 5, "catchup": 6,
	"verify": 7, "switch": 8, "validate": 9, "any": 10, "switchlock": 11,
}

// hostileSQL sets up the attacker's world, run as a superuser. Placeholders:
// {M} mallory, {B} bob, {DIR} data directory, {PREFIX} file name prefix of
// this test, {TOID} the oid of t, {CREATE} the grant of CREATE on public.
const hostileSQL = `
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

// hostileFnSQL is her code (created as a superuser, then handed to her: it
// is hers, security invoker, as any function she would write).
const hostileFnSQL = `
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

// hostilePlants are what she puts on the engine's own tables, as herself,
// once they exist: when the copy starts for a test of the copy, else when
// the catch-up starts (the copy's WITH queries fail on a table with rules).
var hostilePlants = map[string]string{
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

// hostileDB is one test's database, its roles and the attacker's world.
type hostileDB struct {
	t        *testing.T
	url      string // superuser, this database
	su       *pgxpool.Pool
	name     string
	dbOID    uint32
	tOID     uint32
	mallory  string
	bob      string
	mURL     string // logs in as mallory
	dataDir  string
	prefix   string   // of the files her code writes
	extra    []string // more roles to drop at the end
	replacer *strings.Replacer
}

// newHostileDB creates the database (tat not installed), mallory (with CREATE
// on public when create), bob, t, ctl, bob_secret, hits and her functions.
func newHostileDB(t *testing.T, create bool) *hostileDB {
	t.Helper()
	ctx := context.Background()
	h := &hostileDB{t: t, url: testpg.NewDB(t)}
	u, err := url.Parse(h.url)
	if err != nil {
		t.Fatal(err)
	}
	h.name = strings.TrimPrefix(u.Path, "/")
	h.mallory, h.bob = h.name+"_mallory", h.name+"_bob"
	mu := *u
	mu.User = url.User(h.mallory)
	h.mURL = mu.String()
	t.Cleanup(h.dropRoles) // after the listener stopped, before the pool closes
	h.su = testpg.Pool(t, h.url)
	if err := h.su.QueryRow(ctx, `select d.oid, current_setting('data_directory') from pg_database d where d.datname = current_database()`).
		Scan(&h.dbOID, &h.dataDir); err != nil {
		t.Fatal(err)
	}
	h.prefix = fmt.Sprintf("pwned_%d_", h.dbOID)
	grant := ""
	if create {
		grant = "grant create on schema public to " + pgx.Identifier{h.mallory}.Sanitize() + ";"
	}
	h.replacer = strings.NewReplacer("{M}", pgx.Identifier{h.mallory}.Sanitize(), "{B}", pgx.Identifier{h.bob}.Sanitize(),
		"{CREATE}", grant, "{ROWS}", fmt.Sprint(hostileRows), "{SECRET}", fmt.Sprint(hostileSecret))
	h.suExec(hostileSQL)
	if err := h.su.QueryRow(ctx, "select 'public.t'::regclass::oid").Scan(&h.tOID); err != nil {
		t.Fatal(err)
	}
	h.replacer = strings.NewReplacer("{M}", pgx.Identifier{h.mallory}.Sanitize(), "{B}", pgx.Identifier{h.bob}.Sanitize(),
		"{MQ}", strings.ReplaceAll(pgx.Identifier{h.mallory}.Sanitize(), "'", "''"),
		"{DIR}", h.dataDir, "{PREFIX}", h.prefix, "{TOID}", fmt.Sprint(h.tOID))
	h.suExec(hostileFnSQL)
	return h
}

// dropRoles drops the database early (the roles own objects in it) and the
// test's roles, the run roles left behind included.
func (h *hostileDB) dropRoles() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	u, _ := url.Parse(h.url)
	u.Path = "/postgres"
	c, err := pgx.Connect(ctx, u.String())
	if err != nil {
		return
	}
	defer c.Close(ctx)
	_, _ = c.Exec(ctx, "select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1 and not active", h.name)
	if _, err := c.Exec(ctx, "drop database if exists "+pgx.Identifier{h.name}.Sanitize()+" with (force)"); err != nil {
		h.t.Logf("drop database: %v", err)
		return
	}
	roles := append([]string{h.mallory, h.bob}, h.extra...)
	rows, _ := c.Query(ctx, `select rolname::text from pg_roles where rolname like 'tat\_run\_' || $1::text || '\_%'`, fmt.Sprint(h.dbOID))
	runRoles, _ := pgx.CollectRows(rows, pgx.RowTo[string])
	roles = append(roles, runRoles...)
	for _, r := range roles {
		_, _ = c.Exec(ctx, "drop role if exists "+pgx.Identifier{r}.Sanitize())
	}
}

func (h *hostileDB) suExec(sql string, args ...any) {
	h.t.Helper()
	if _, err := h.su.Exec(context.Background(), h.replacer.Replace(sql), args...); err != nil {
		h.t.Fatalf("%s: %v", sql, err)
	}
}

func (h *hostileDB) str(sql string, args ...any) string {
	h.t.Helper()
	var v any
	if err := h.su.QueryRow(context.Background(), sql, args...).Scan(&v); err != nil {
		h.t.Fatalf("%s: %v", sql, err)
	}
	if v == nil {
		return ""
	}
	return fmt.Sprint(v)
}

// asMallory opens a session that logged in as mallory.
func (h *hostileDB) asMallory() *pgx.Conn {
	h.t.Helper()
	c, err := pgx.Connect(context.Background(), h.mURL)
	if err != nil {
		h.t.Fatalf("connect as %s: %v", h.mallory, err)
	}
	h.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func (h *hostileDB) malloryExec(sql string) {
	h.t.Helper()
	if strings.TrimSpace(sql) == "" {
		return
	}
	c := h.asMallory()
	if _, err := c.Exec(context.Background(), h.replacer.Replace(sql)); err != nil {
		h.t.Fatalf("as %s: %s: %v", h.mallory, sql, err)
	}
	c.Close(context.Background())
}

// queue calls tat.alter as mallory; args are more named arguments (", x => y").
func (h *hostileDB) queue(c *pgx.Conn, command, capture, args string) (int64, error) {
	var id int64
	err := c.QueryRow(context.Background(), `select tat.alter($1, capture => $2, switch => 'manual', lock_timeout => '30s',
		batch_size => 500, min_delta_rows => 10`+args+`)`, command, capture).Scan(&id)
	return id, err
}

// hostileArm arms her code (the advisory lock) when the engine enters the
// phase under test and disarms it when it leaves; it also plants her objects
// on the shadow when the copy starts and tells when the job waits for the
// switch. The engine calls it synchronously (through hostileReporter), so the
// phase's work starts only once the arming is done.
type hostileArm struct {
	h       *hostileDB
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

func (h *hostileDB) newArm(target, plant string) *hostileArm {
	h.t.Helper()
	c, err := pgx.Connect(context.Background(), h.url)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.Close(context.Background()) })
	a := &hostileArm{h: h, target: target, plant: plant, plantAt: replicate.PhaseCatchup, conn: c,
		waiting: make(chan struct{}), catchup: make(chan struct{})}
	if target == replicate.PhaseCopy {
		a.plantAt = replicate.PhaseCopy
	}
	if target == "any" {
		a.mu.Lock()
		a.set(hostileCodes["any"])
		a.mu.Unlock()
	}
	return a
}

// set holds the lock of code (0: none); mu held.
func (a *hostileArm) set(code int) {
	if a.held == code {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if a.held != 0 {
		if _, err := a.conn.Exec(ctx, "select pg_advisory_unlock($1::int4, $2::int4)", hostileClass, a.held); err != nil {
			a.h.t.Errorf("disarm: %v", err)
		}
		a.held = 0
	}
	if code != 0 {
		if _, err := a.conn.Exec(ctx, "select pg_advisory_lock($1::int4, $2::int4)", hostileClass, code); err != nil {
			a.h.t.Errorf("arm: %v", err)
			return
		}
		a.held = code
	}
}

func (a *hostileArm) event(msg string) {
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
			a.set(hostileCodes[p])
		case a.target == "switchlock" && p == replicate.PhaseSwitch:
			a.set(hostileCodes["switchlock"])
		default:
			a.set(0)
		}
	}
	if strings.Contains(msg, "waiting for a manual switch") {
		a.once.Do(func() { close(a.waiting) })
	}
}

func (a *hostileArm) seen() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.phases...)
}

// plantNow runs her plant as herself; an error means she could not.
func (h *hostileDB) plantNow(kind string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, h.mURL)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, hostilePlants[kind])
	return err
}

// hostileReporter passes everything on and lets the arm see the events.
type hostileReporter struct {
	inner replicate.Reporter
	arm   *hostileArm
}

func (r hostileReporter) Progress(ctx context.Context, p replicate.Progress) {
	r.inner.Progress(ctx, p)
}
func (r hostileReporter) Event(ctx context.Context, phase, msg string) {
	r.arm.event(msg)
	r.inner.Event(ctx, phase, msg)
}

// listen runs tatd's listener on dbURL with the real engine (the arm sees
// its events) until the test ends; stop stops it.
func (h *hostileDB) listen(dbURL string, arm *hostileArm) (stop func()) {
	h.t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	l, err := New(Config{DatabaseURL: dbURL, PollInterval: 200 * time.Millisecond, RunnerID: "hostile", Log: log,
		Run: func(ctx context.Context, pool *pgxpool.Pool, o replicate.Options, rep replicate.Reporter, ctl replicate.Control) error {
			return replicate.Run(ctx, pool, o, hostileReporter{inner: rep, arm: arm}, ctl)
		}})
	if err != nil {
		h.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					h.t.Errorf("listener: %v", err)
				}
			case <-time.After(30 * time.Second):
				h.t.Error("listener did not stop")
			}
		})
	}
	h.t.Cleanup(stop)
	return stop
}

type hostileJob struct{ state, phase, err string }

func (j hostileJob) terminal() bool {
	return j.state == "done" || j.state == "failed" || j.state == "cancelled"
}

func (h *hostileDB) job(id int64) hostileJob {
	h.t.Helper()
	var j hostileJob
	if err := h.su.QueryRow(context.Background(), `select state, coalesce(phase, ''), coalesce(error, '')
		from tat.migrations where id = $1`, id).Scan(&j.state, &j.phase, &j.err); err != nil {
		h.t.Fatalf("job %d: %v", id, err)
	}
	return j
}

// waitSwitchOrEnd waits until the job waits for tat.switch (true) or ended.
func (h *hostileDB) waitSwitchOrEnd(id int64, arm *hostileArm) bool {
	h.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		select {
		case <-arm.waiting:
			return true
		default:
		}
		if j := h.job(id); j.terminal() {
			return false
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("job %d neither waits for the switch nor ended: %+v; phases %v", id, h.job(id), arm.seen())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *hostileDB) waitEnd(id int64) hostileJob {
	h.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		j := h.job(id)
		if j.terminal() {
			return j
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("job %d did not end: %+v", id, j)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *hostileDB) switchJob(id int64) {
	h.t.Helper()
	if _, err := h.su.Exec(context.Background(), "select tat.switch($1)", id); err != nil {
		h.t.Fatalf("tat.switch: %v", err)
	}
}

// write applies one write to t and ctl in one statement, as her application would.
func hostileWrite(ctx context.Context, c execer, r *rand.Rand, next *atomic.Int64) error {
	var sql string
	var args []any
	switch op := r.IntN(20); {
	case op < 12:
		sql, args = `with a as (update public.t set v = v + 1 where id = $1) update public.ctl set v = v + 1 where id = $1`, []any{r.Int64N(hostileRows) + 1}
	case op < 17:
		id := next.Add(1)
		sql, args = `with a as (insert into public.t values ($1, $2)) insert into public.ctl values ($1, $2)`, []any{id, id % 1000}
	default:
		sql, args = `with a as (delete from public.t where id = $1) delete from public.ctl where id = $1`, []any{r.Int64N(hostileRows) + 1}
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
func (h *hostileDB) writer(next *atomic.Int64, until <-chan struct{}) (stop func() int) {
	c := h.asMallory()
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
			if err := hostileWrite(context.Background(), c, r, next); err != nil {
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
				h.t.Errorf("writer: %v", err)
			}
		})
		return int(n.Load())
	}
	h.t.Cleanup(func() { stop() }) // before its connection closes
	return stop
}

// writes commits n writes as mallory.
func (h *hostileDB) writes(n int, next *atomic.Int64) {
	h.t.Helper()
	c := h.asMallory()
	r := rand.New(rand.NewPCG(3, 5))
	for i := 0; i < n; i++ {
		if err := hostileWrite(context.Background(), c, r, next); err != nil {
			h.t.Fatalf("write: %v", err)
		}
	}
}

// foreignHits counts runs of her code armed for phase outside her own sessions.
func (h *hostileDB) foreignHits(phase string) int {
	h.t.Helper()
	var n int
	if err := h.su.QueryRow(context.Background(), `select count(*) from public.hits where at = $1 and su <> $2`, phase, h.mallory).Scan(&n); err != nil {
		h.t.Fatal(err)
	}
	return n
}

func (h *hostileDB) waitHits(phase string, timeout time.Duration) bool {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for h.foreignHits(phase) == 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// writeUnderSwitch makes the last delta, applied under the switch's lock,
// non-empty: mallory writes in a transaction still open when the switch is
// requested and commits it once the switch's lock request waits for it.
func (h *hostileDB) writeUnderSwitch(id int64, next *atomic.Int64) {
	h.t.Helper()
	ctx := context.Background()
	c := h.asMallory()
	tx, err := c.Begin(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(13, 17))
	for i := 0; i < 30; i++ {
		if err := hostileWrite(ctx, tx, r, next); err != nil {
			h.t.Fatalf("write: %v", err)
		}
	}
	var pid int32
	if err := tx.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
		h.t.Fatal(err)
	}
	h.switchJob(id)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var waiting int
		// the switch's lock request on t (only the switch locks t against
		// writes; a catch-up that waits for her transaction to end would
		// apply her writes before the lock)
		if err := h.su.QueryRow(ctx, `select count(*) from pg_locks l where not l.granted and l.locktype = 'relation'
			and l.relation = $1 and $2::int = any(pg_blocking_pids(l.pid))`, h.tOID, pid).Scan(&waiting); err != nil {
			h.t.Fatal(err)
		}
		if waiting > 0 {
			break
		}
		if j := h.job(id); j.terminal() {
			h.t.Errorf("job ended before its switch waited for mallory's transaction: %+v", j)
			break
		}
		if time.Now().After(deadline) {
			h.t.Errorf("the switch never requested its lock on t while mallory's transaction was open")
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := tx.Commit(ctx); err != nil {
		h.t.Fatalf("commit mallory's last writes: %v", err)
	}
}

// gainedNothing asserts that mallory has exactly what she had: no attribute,
// no membership, no file written, bob's table intact, her code never a
// superuser's and never anyone's but hers (or the run's role's).
func (h *hostileDB) gainedNothing() {
	h.t.Helper()
	ctx := context.Background()
	var super, createrole, replication, bypass, createdb bool
	if err := h.su.QueryRow(ctx, `select rolsuper, rolcreaterole, rolreplication, rolbypassrls, rolcreatedb from pg_roles where rolname = $1`,
		h.mallory).Scan(&super, &createrole, &replication, &bypass, &createdb); err != nil {
		h.t.Fatal(err)
	}
	if super {
		h.t.Errorf("SECURITY: %s became a superuser", h.mallory)
	}
	if createrole || replication || bypass || createdb {
		h.t.Errorf("SECURITY: %s gained attributes: createrole=%v replication=%v bypassrls=%v createdb=%v",
			h.mallory, createrole, replication, bypass, createdb)
	}
	if m := h.str(`select string_agg(r.rolname, ', ') from pg_auth_members a join pg_roles r on r.oid = a.roleid
		where a.member = (select oid from pg_roles where rolname = $1)`, h.mallory); m != "" {
		h.t.Errorf("SECURITY: %s became a member of %s", h.mallory, m)
	}
	if f := h.str(`select string_agg(f, ', ' order by f) from pg_ls_dir(current_setting('data_directory')) f where f like $1 || '%'`,
		h.prefix); f != "" {
		h.t.Errorf("SECURITY: her code wrote server files: %s", f)
	}
	if n := h.str("select count(*) from public.bob_secret"); n != fmt.Sprint(hostileSecret) {
		h.t.Errorf("SECURITY: bob_secret has %s rows, not %d", n, hostileSecret)
	}
	// is_superuser describes the session's user: inside a security-restricted
	// operation (the last delta, run by the sidecar's session as REFRESH of her
	// view) it may say on while her code runs as her and cannot SET ROLE back.
	// What counts is the role her code ran as (current_user, after every
	// escape it tried).
	if s := h.str(`select string_agg(distinct format('%s as %s (session %s)', at, cu, su), '; ') from public.hits h
		where exists (select 1 from pg_roles r where r.rolname = h.cu and r.rolsuper)`); s != "" {
		h.t.Errorf("SECURITY: her code ran as a superuser: %s", s)
	}
	if s := h.str(`select string_agg(distinct format('%s as %s (session %s)', at, cu, su), '; ') from public.hits
		where cu <> $1 and cu not like 'tat\_run\_%'`, h.mallory); s != "" {
		h.t.Errorf("SECURITY: her code ran with another role's rights: %s", s)
	}
}

// runRoleGone asserts the run's login role was dropped.
func (h *hostileDB) runRoleGone() {
	h.t.Helper()
	if r := h.str(`select string_agg(rolname, ', ') from pg_roles where rolname like 'tat\_run\_' || $1::text || '\_%'`,
		fmt.Sprint(h.dbOID)); r != "" {
		h.t.Errorf("run roles left behind: %s", r)
	}
}

func (h *hostileDB) noLeftovers() {
	h.t.Helper()
	if s := h.str(`select string_agg(relname, ', ') from pg_class where relname like 't\_\_tat\_%'`); s != "" {
		h.t.Errorf("left behind: %s", s)
	}
}

// sameContent compares got (over t) with want (over ctl), row by row as text.
func (h *hostileDB) sameContent(got, want string) {
	h.t.Helper()
	diff := h.str(fmt.Sprintf(`select count(*) from ((%[1]s except all %[2]s) union all (%[2]s except all %[1]s)) d`, got, want))
	if diff != "0" {
		h.t.Errorf("content of t differs from the ALTER applied in SQL to ctl in %s rows (t: %s rows, expected %s)", diff,
			h.str("select count(*) from ("+got+") g"), h.str("select count(*) from ("+want+") w"))
	}
}

func (h *hostileDB) columnType(col, typ string) {
	h.t.Helper()
	if got := h.str(`select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'public.t'::regclass and attname = $1`, col); got != typ {
		h.t.Errorf("column %s is %q, want %q", col, got, typ)
	}
}

func (h *hostileDB) ownedByMallory() {
	h.t.Helper()
	if o := h.str(`select pg_get_userbyid(relowner)::text from pg_class where oid = 'public.t'::regclass`); o != h.mallory {
		h.t.Errorf("t is owned by %s, not %s", o, h.mallory)
	}
}

func (h *hostileDB) hitSummary() string {
	return h.str(`select coalesce(string_agg(format('%s/%s/%s/super=%s/locked=%s: %s', at, cu, su, issuper, locked, n), '; '), 'none')
		from (select at, cu, su, issuper, locked, count(*) n from public.hits group by 1, 2, 3, 4, 5 order by 1, 2, 3) s`)
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
	plant   string // what she plants on the engine's tables (hostilePlants)
	// mayRefuse: the engine may refuse the job (a clear error) instead of
	// running it, e.g. when it finds her objects on its own tables.
	mayRefuse bool
}

const (
	gotIDV  = `select id::text, v::text from public.t`
	wantIDV = `select id::text, v::text from public.ctl`
)

var (
	vUsing = hostileVector{name: "using",
		command: "alter table public.t alter column v type bigint using public.mallory_fn(v)",
		got:     gotIDV, want: wantIDV, col: "v", typ: "bigint"}
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
		got:     gotIDV, want: wantIDV, col: "v", typ: "integer"}
	vGenerated = hostileVector{name: "generated",
		command: "alter table public.t add column g bigint generated always as (public.mallory_imm(v)) stored",
		got:     `select id::text, v::text, g::text from public.t`, want: `select id::text, v::text, v::text from public.ctl`,
		col: "g", typ: "bigint"}
	vFilter = hostileVector{name: "filter",
		command: "alter table public.t alter column v type bigint",
		args:    `, copy_data_filter => 'public.mallory_fn(id) % 10 <> 0'`,
		got:     gotIDV, want: wantIDV + ` where id % 10 <> 0`, col: "v", typ: "bigint"}
	vShadowTrigger = hostileVector{name: "shadow_trigger",
		command: "alter table public.t alter column v type bigint", plant: "shadow", mayRefuse: true,
		got: gotIDV, want: wantIDV, col: "v", typ: "bigint"}
	vShadowRule = hostileVector{name: "shadow_rule",
		command: "alter table public.t alter column v type bigint", plant: "rule", mayRefuse: true,
		got: gotIDV, want: wantIDV, col: "v", typ: "bigint"}
	vShadowDeferred = hostileVector{name: "shadow_deferred",
		command: "alter table public.t alter column v type bigint", plant: "shadow_deferred", mayRefuse: true,
		got: gotIDV, want: wantIDV, col: "v", typ: "bigint"}
	vDeltaTrigger = hostileVector{name: "delta_trigger",
		command: "alter table public.t alter column v type bigint", plant: "delta", mayRefuse: true,
		got: gotIDV, want: wantIDV, col: "v", typ: "bigint"}
	vVerify = hostileVector{name: "verify",
		command: "alter table public.t alter column v type bigint using public.mallory_fn(v)", args: ", verify => true",
		got: gotIDV, want: wantIDV, col: "v", typ: "bigint"}
	// Her code already on the table: any migration of it runs it.
	vExistingCheck = hostileVector{name: "existing_check",
		setup:   "alter table public.t add constraint c_existing check (public.mallory_fn(v) is not null)",
		command: "alter table public.t alter column id type bigint",
		got:     gotIDV, want: wantIDV, col: "id", typ: "bigint"}
	vExpressionIndex = hostileVector{name: "expression_index",
		setup:   "create index t_mallory on public.t ((public.mallory_imm(v)))",
		command: "alter table public.t alter column id type bigint",
		got:     gotIDV, want: wantIDV, col: "id", typ: "bigint"}
	vDomain = hostileVector{name: "domain",
		setup:   "create domain public.mdom as int check (public.mallory_fn(value) is not null)",
		command: "alter table public.t alter column v type public.mdom",
		got:     gotIDV, want: wantIDV, col: "v", typ: "mdom"}
	// A catalog-only command runs in place, without a shadow.
	vDirectValidate = hostileVector{name: "direct_validate",
		setup:   "alter table public.t add constraint c_nv check (public.mallory_fn(v) is not null) not valid",
		command: "alter table public.t validate constraint c_nv",
		got:     gotIDV, want: wantIDV, col: "v", typ: "integer"}
)

var hostileCaptures = []string{replicate.CaptureTrigger, replicate.CaptureLogical}

func skipLogicalBefore14(t *testing.T, capture string) {
	t.Helper()
	if capture == replicate.CaptureLogical && testpg.Version(t) < 140000 {
		t.Skip("logical capture needs PostgreSQL 14+")
	}
}

// hostileRun runs v with her code armed in phase, under both captures:
// mallory queues the job (switch => 'manual'), tatd runs it; in catchup her
// application writes during the job and while it waits for the switch; in
// switchlock it writes in a transaction the switch's lock waits for, so the
// last delta applied under the lock is not empty.
func hostileRun(t *testing.T, v hostileVector, phase string) {
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			skipLogicalBefore14(t, capture)
			h := newHostileDB(t, true)
			testpg.Install(t, h.url)
			h.malloryExec(v.setup)
			arm := h.newArm(phase, v.plant)
			var next atomic.Int64
			next.Store(1_000_000)
			m := h.asMallory()
			id, err := h.queue(m, v.command, capture, v.args)
			if err != nil {
				t.Fatalf("tat.alter as %s: %v", h.mallory, err)
			}
			var stopWriter func() int
			if phase == "catchup" {
				stopWriter = h.writer(&next, arm.catchup)
			}
			stop := h.listen(h.url, arm)
			waits := h.waitSwitchOrEnd(id, arm)
			if stopWriter != nil {
				t.Logf("writes during the job: %d", stopWriter())
			}
			if waits {
				switch phase {
				case "catchup":
					h.writes(40, &next)
					if !h.waitHits("catchup", time.Minute) {
						t.Errorf("the catch-up never ran her code on mallory's writes (hits: %s)", h.hitSummary())
					}
					h.switchJob(id)
				case "switchlock":
					h.writeUnderSwitch(id, &next)
				default:
					h.switchJob(id)
				}
			}
			j := h.waitEnd(id)
			stop()
			t.Logf("job %s (%s); phases %v; hits: %s", j.state, j.err, arm.seen(), h.hitSummary())
			h.gainedNothing()
			arm.mu.Lock()
			planted, plantErr := arm.planted, arm.plantErr
			arm.mu.Unlock()
			switch {
			case v.plant != "" && !planted:
				t.Errorf("phase %s never started: nothing planted", arm.plantAt)
			case plantErr != nil && wantSQLState(plantErr, "42501") == nil:
				// She may not touch the engine's tables: nothing of hers runs there.
				t.Logf("she may not plant %s: %v", v.plant, plantErr)
			case plantErr != nil:
				t.Errorf("planting %s failed, not for lack of privilege: %v", v.plant, plantErr)
			}
			refused := j.state == "failed" && v.mayRefuse && j.err != ""
			switch {
			case j.state == "done":
				h.sameContent(v.got, v.want)
				h.columnType(v.col, v.typ)
				h.ownedByMallory()
			case refused:
				t.Logf("refused: %s", j.err)
			default:
				t.Errorf("job %s in phase %s: %s", j.state, j.phase, j.err)
			}
			if !refused && plantErr == nil && h.foreignHits(phase) == 0 {
				t.Errorf("her code never ran in phase %s outside her sessions: the test proves nothing (hits: %s)", phase, h.hitSummary())
			}
			h.runRoleGone()
			h.noLeftovers()
		})
	}
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
		for _, capture := range hostileCaptures {
			t.Run(tc.option+"/"+capture, func(t *testing.T) {
				t.Parallel()
				skipLogicalBefore14(t, capture)
				h := newHostileDB(t, true)
				testpg.Install(t, h.url)
				arm := h.newArm("any", "")
				m := h.asMallory()
				id, err := h.queue(m, "alter table public.t alter column v type bigint", capture,
					fmt.Sprintf(", %s => %s", tc.option, quoteLit(tc.value)))
				if err != nil {
					if e := wantSQLState(err, "42501"); e != nil {
						t.Fatalf("tat.alter(%s => ...) by %s: %v", tc.option, h.mallory, e)
					}
					t.Logf("refused: %v", err)
					if n := h.str("select count(*) from tat.migrations"); n != "0" {
						t.Errorf("%s jobs queued", n)
					}
					h.gainedNothing()
					return
				}
				t.Errorf("SECURITY: tat.alter(%s => ...) by %s (not a superuser) was accepted, want SQLSTATE 42501; running it", tc.option, h.mallory)
				stop := h.listen(h.url, arm)
				if h.waitSwitchOrEnd(id, arm) {
					time.Sleep(3 * sqlapiThrottleInterval) // the throttle query runs while the job waits
					h.switchJob(id)
				}
				j := h.waitEnd(id)
				stop()
				t.Logf("job %s (%s); hits: %s", j.state, j.err, h.hitSummary())
				h.gainedNothing()
			})
		}
	}
}

const sqlapiThrottleInterval = time.Second

func quoteLit(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// tat.set(id, 'throttle_query', ...) by the owner of a running job is
// refused the same way (42501).
func TestHostileThrottleQuerySetByOwnerRefused(t *testing.T) {
	t.Parallel()
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			skipLogicalBefore14(t, capture)
			h := newHostileDB(t, true)
			testpg.Install(t, h.url)
			arm := h.newArm("any", "")
			m := h.asMallory()
			id, err := h.queue(m, "alter table public.t alter column v type bigint", capture, "")
			if err != nil {
				t.Fatalf("tat.alter: %v", err)
			}
			stop := h.listen(h.url, arm)
			waits := h.waitSwitchOrEnd(id, arm)
			_, err = m.Exec(context.Background(), "select tat.set($1, 'throttle_query', 'select public.mallory_fn(1) is null')", id)
			if err != nil {
				if e := wantSQLState(err, "42501"); e != nil {
					t.Errorf("tat.set(throttle_query) by %s: %v", h.mallory, e)
				}
			} else {
				t.Errorf("SECURITY: tat.set(%d, 'throttle_query', ...) by %s (not a superuser) was accepted, want SQLSTATE 42501", id, h.mallory)
				time.Sleep(3 * sqlapiThrottleInterval)
			}
			if waits {
				h.switchJob(id)
			}
			j := h.waitEnd(id)
			stop()
			t.Logf("job %s (%s); hits: %s", j.state, j.err, h.hitSummary())
			if j.state != "done" {
				t.Errorf("job %s: %s", j.state, j.err)
			}
			h.gainedNothing()
			h.runRoleGone()
		})
	}
}

// A superuser may use the three options; they run: the throttle query holds
// the job until a row appears, the commands write their rows.
func TestHostileOptionsBySuperuserAccepted(t *testing.T) {
	t.Parallel()
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			skipLogicalBefore14(t, capture)
			h := newHostileDB(t, true)
			testpg.Install(t, h.url)
			h.suExec(`create table public.sulog (what text); create table public.release (ok boolean)`)
			arm := h.newArm("", "")
			stop := h.listen(h.url, arm)
			ctx := context.Background()
			var id int64
			err := h.su.QueryRow(ctx, `select tat.alter('alter table public.t alter column v type bigint', capture => $1,
				batch_size => 200, throttle_query => 'select not exists (select from public.release)',
				command_before_switch => 'insert into public.sulog values (''before'')',
				command_after_switch => 'insert into public.sulog values (''after'')')`, capture).Scan(&id)
			if err != nil {
				t.Fatalf("tat.alter by a superuser: %v", err)
			}
			deadline := time.Now().Add(time.Minute)
			for {
				if h.str("select coalesce(throttle_reason, '') from tat.migrations where id = $1", id) == "throttle_query returned true" {
					break
				}
				if j := h.job(id); j.terminal() || time.Now().After(deadline) {
					t.Fatalf("the throttle query never held the job: %+v", j)
				}
				time.Sleep(20 * time.Millisecond)
			}
			h.suExec("insert into public.release values (true)")
			j := h.waitEnd(id)
			stop()
			if j.state != "done" {
				t.Fatalf("job %s: %s", j.state, j.err)
			}
			if got := h.str("select string_agg(what, ',' order by what) from public.sulog"); got != "after,before" {
				t.Errorf("sulog = %q, want after,before", got)
			}
			h.sameContent(gotIDV, wantIDV)
			h.columnType("v", "bigint")
			h.ownedByMallory()
			h.runRoleGone()
		})
	}
}

// On PostgreSQL 15+ public grants no CREATE to ordinary roles: an owner who
// may run the ALTER in place may run it through tat.alter.
func TestHostileOwnerWithoutCreateMigrates(t *testing.T) {
	t.Parallel()
	if testpg.Version(t) < 150000 {
		t.Skip("PostgreSQL 15+ (public without CREATE for ordinary roles)")
	}
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			h := newHostileDB(t, false)
			testpg.Install(t, h.url)
			if h.str("select has_schema_privilege($1, 'public', 'CREATE')", h.mallory) != "false" {
				t.Fatalf("%s may create in public", h.mallory)
			}
			arm := h.newArm("any", "")
			m := h.asMallory()
			id, err := h.queue(m, "alter table public.t alter column v type bigint using public.mallory_fn(v)", capture, "")
			if err != nil {
				t.Fatalf("tat.alter: %v", err)
			}
			stop := h.listen(h.url, arm)
			if h.waitSwitchOrEnd(id, arm) {
				h.switchJob(id)
			}
			j := h.waitEnd(id)
			stop()
			t.Logf("job %s (%s); hits: %s", j.state, j.err, h.hitSummary())
			if j.state != "done" {
				t.Errorf("job %s in phase %s: %s", j.state, j.phase, j.err)
			} else {
				h.sameContent(gotIDV, wantIDV)
				h.columnType("v", "bigint")
				h.ownedByMallory()
				if h.foreignHits("any") == 0 {
					t.Errorf("her code never ran: the test proves nothing")
				}
			}
			h.gainedNothing()
			h.runRoleGone()
			h.noLeftovers()
		})
	}
}

// tatd need not be a superuser: with CREATEROLE, REPLICATION, CREATE on the
// database and ADMIN on the owner's role it migrates her table under both
// captures, and her code gains none of those rights.
func TestHostileNonSuperuserSidecar(t *testing.T) {
	t.Parallel()
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			skipLogicalBefore14(t, capture)
			h := newHostileDB(t, true)
			tatd := h.name + "_tatd"
			h.extra = append(h.extra, tatd)
			q := pgx.Identifier{tatd}.Sanitize()
			h.suExec("create role " + q + " login createrole replication nosuperuser")
			h.suExec("grant create on database " + pgx.Identifier{h.name}.Sanitize() + " to " + q)
			h.suExec("grant {M} to " + q + " with admin option")
			u, _ := url.Parse(h.url)
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
			arm := h.newArm("any", "")
			m := h.asMallory()
			id, err := h.queue(m, "alter table public.t alter column v type bigint using public.mallory_fn(v)", capture, "")
			if err != nil {
				t.Fatalf("tat.alter: %v", err)
			}
			stop := h.listen(tatdURL, arm)
			if h.waitSwitchOrEnd(id, arm) {
				h.switchJob(id)
			}
			j := h.waitEnd(id)
			stop()
			t.Logf("job %s (%s); phases %v; hits: %s", j.state, j.err, arm.seen(), h.hitSummary())
			if j.state != "done" {
				t.Errorf("job %s in phase %s: %s", j.state, j.phase, j.err)
			} else {
				h.sameContent(gotIDV, wantIDV)
				h.columnType("v", "bigint")
				h.ownedByMallory()
				if h.foreignHits("any") == 0 {
					t.Errorf("her code never ran: the test proves nothing")
				}
			}
			h.gainedNothing()
			h.runRoleGone()
			h.noLeftovers()
		})
	}
}
