package replicate_test

// The hostile-owner suite for the engine called directly, as the pg_tat CLI
// does (a DBA's superuser pool, no tat schema); listener/hostile_test.go has
// the SQL front door and tatd (and the same harness: keep the two in step).
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
func (h *hostileDB) runEngine(o replicate.Options, arm *hostileArm) *hostileEngine {
	g := &hostileEngine{gate: make(chan struct{}), finished: make(chan struct{})}
	o.ManualSwitch = true
	go func() {
		defer close(g.finished)
		g.err = replicate.Run(context.Background(), h.su, o, hostileReporter{inner: replicate.NopReporter{}, arm: arm}, g)
	}()
	h.t.Cleanup(func() {
		g.open()
		select {
		case <-g.finished:
		case <-time.After(2 * time.Minute):
			h.t.Error("the engine did not end")
		}
	})
	return g
}

// waitSwitchOrEnd waits until the run waits for the switch (true) or ended.
func (h *hostileDB) waitSwitchOrEnd(g *hostileEngine, arm *hostileArm) bool {
	h.t.Helper()
	select {
	case <-arm.waiting:
		return true
	case <-g.finished:
		return false
	case <-time.After(3 * time.Minute):
		h.t.Fatalf("the run neither waits for the switch nor ended; phases %v", arm.seen())
		return false
	}
}

func (h *hostileDB) waitEnd(g *hostileEngine) error {
	h.t.Helper()
	select {
	case <-g.finished:
		return g.err
	case <-time.After(3 * time.Minute):
		h.t.Fatal("the run did not end")
		return nil
	}
}

// writeUnderSwitch makes the last delta, applied under the switch's lock,
// non-empty: mallory writes in a transaction still open when the switch is
// let go and commits it once the switch's lock request waits for it.
func (h *hostileDB) writeUnderSwitch(g *hostileEngine, next *atomic.Int64) {
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
	g.open()
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
		if g.ended() {
			h.t.Errorf("the run ended before its switch waited for mallory's transaction: %v", g.err)
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

var hostileCaptures = []string{replicate.CaptureTrigger, replicate.CaptureLogical}

func skipLogicalBefore14(t *testing.T, capture string) {
	t.Helper()
	if capture == replicate.CaptureLogical && testpg.Version(t) < 140000 {
		t.Skip("logical capture needs PostgreSQL 14+")
	}
}

// hostileEngineVector: her code and the DBA's ALTER.
type hostileEngineVector struct {
	setup     string // run as mallory before the job
	command   string
	got, want string // t after the job; the ALTER applied in SQL to ctl
	col, typ  string
}

var (
	hxUsing = hostileEngineVector{
		command: "alter table public.t alter column v type bigint using public.mallory_fn(v)",
		got:     `select id::text, v::text from public.t`, want: `select id::text, v::text from public.ctl`, col: "v", typ: "bigint"}
	// Her code already on the table; the DBA's ALTER does not mention it.
	hxExistingCheck = hostileEngineVector{
		setup:   "alter table public.t add constraint c_existing check (public.mallory_fn(v) is not null)",
		command: "alter table public.t alter column id type bigint",
		got:     `select id::text, v::text from public.t`, want: `select id::text, v::text from public.ctl`, col: "id", typ: "bigint"}
)

// hostileEngineRun runs v with her code armed in phase, under both captures:
// in catchup her application writes during the job and while it waits for
// the switch; in switchlock it writes in a transaction the switch's lock
// waits for, so the last delta applied under the lock is not empty.
func hostileEngineRun(t *testing.T, v hostileEngineVector, phase string) {
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			skipLogicalBefore14(t, capture)
			h := newHostileDB(t, true)
			h.malloryExec(v.setup)
			arm := h.newArm(phase, "")
			var next atomic.Int64
			next.Store(1_000_000)
			var stopWriter func() int
			if phase == "catchup" {
				stopWriter = h.writer(&next, arm.catchup)
			}
			g := h.runEngine(hostileOpts(v.command, capture), arm)
			waits := h.waitSwitchOrEnd(g, arm)
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
					g.open()
				case "switchlock":
					h.writeUnderSwitch(g, &next)
				default:
					g.open()
				}
			}
			err := h.waitEnd(g)
			t.Logf("run: %v; phases %v; hits: %s", err, arm.seen(), h.hitSummary())
			h.gainedNothing()
			if err != nil {
				t.Errorf("run failed: %v", err)
			} else {
				h.sameContent(v.got, v.want)
				h.columnType(v.col, v.typ)
				h.ownedByMallory()
				if h.foreignHits(phase) == 0 {
					t.Errorf("her code never ran in phase %s outside her sessions: the test proves nothing (hits: %s)", phase, h.hitSummary())
				}
			}
			h.runRoleGone()
			h.noLeftovers()
		})
	}
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
		for _, capture := range hostileCaptures {
			t.Run(option+"/"+capture, func(t *testing.T) {
				t.Parallel()
				skipLogicalBefore14(t, capture)
				h := newHostileDB(t, true)
				arm := h.newArm("any", "")
				o := hostileOpts("alter table public.t alter column v type bigint", capture)
				o.RunAs = h.mallory
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
				t.Logf("run: %v; hits: %s", err, h.hitSummary())
				if err == nil {
					t.Errorf("SECURITY: %s with RunAs = %s (not a superuser) was run, want it refused", option, h.mallory)
				} else {
					h.columnType("v", "integer")
					if n := h.foreignHits("any"); n != 0 {
						t.Errorf("refused, but her code ran %d times", n)
					}
				}
				h.gainedNothing()
				h.runRoleGone()
				h.noLeftovers()
			})
		}
	}
}

// The DBA's own commands (no RunAs: the CLI) run, inside the switch.
func TestHostileEngineSwitchCommandsByDBAAccepted(t *testing.T) {
	t.Parallel()
	for _, capture := range hostileCaptures {
		t.Run(capture, func(t *testing.T) {
			t.Parallel()
			skipLogicalBefore14(t, capture)
			h := newHostileDB(t, true)
			h.suExec("create table public.sulog (what text)")
			arm := h.newArm("", "")
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
			if got := h.str("select string_agg(what, ',' order by what) from public.sulog"); got != "after,before" {
				t.Errorf("sulog = %q, want after,before", got)
			}
			h.sameContent(`select id::text, v::text from public.t`, `select id::text, v::text from public.ctl`)
			h.columnType("v", "bigint")
			h.ownedByMallory()
			h.runRoleGone()
		})
	}
}
