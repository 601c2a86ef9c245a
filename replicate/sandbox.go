package replicate

import (
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The sandbox: where the table owner's code runs.
//
// Whatever the table's owner (or the requester) can influence — the ALTER's
// expressions and every function they call, defaults, CHECKs, generated
// columns, domain checks, the copy filter, triggers she puts on the shadow
// or on the delta — is evaluated only in m.pool's sessions, never in
// m.admin's. Who m.pool's sessions are depends on the engine's own role:
//
//   - it is the owner: the engine's own sessions (her code, her rights).
//   - the owner is a superuser: SET ROLE owner (her code is a superuser's).
//   - otherwise: sessions that log in as a role of the run's own,
//     tat_run_<database oid>_<table oid> (LOGIN, a random password only this
//     process knows, member of the owner, no attribute), then SET ROLE owner.
//
// SET ROLE in one of the engine's own sessions would not do: the code it
// runs can undo it (RESET ROLE, set_config('role', ...), SET SESSION
// AUTHORIZATION when the engine is a superuser), and code PostgreSQL runs
// at commit (deferred triggers, WITH HOLD cursors) runs outside any
// SECURITY DEFINER context. In a session that logged in as the run's role
// every way back leads to that role, whose rights are the owner's.
type sandbox struct {
	mode  sandboxMode
	owner string
	role  string // the run's login role (modeLogin)
	me    string // the engine's role (m.admin's current_user)
	path  string // the sandbox's search_path (ownerPath)
	exec  bool   // T__tat_exec exists (restricted.go)
	// handOver: the owner may not create in the table's schema (PostgreSQL
	// 15+ grants no CREATE on public), so the engine's role, a superuser,
	// creates the objects she must own and hands them over at once.
	handOver bool
	// adminState: the state table (checkpoints, and the plan the switch
	// acts on as the engine's role) belongs to the engine's role, the owner
	// only writes its rows; a plan she could rewrite would steer the switch.
	adminState bool
}

type sandboxMode int

const (
	modeSelf    sandboxMode = iota // the engine's role is the owner
	modeSetRole                    // the owner is a superuser
	modeLogin                      // sessions of the run's own login role
)

// runRoleName is the login role of the run on table rel of database db.
func runRoleName(db, rel uint32) string { return fmt.Sprintf("tat_run_%d_%d", db, rel) }

// openSandbox sets m.sb and m.pool (see sandbox). The returned function
// closes the pool and drops the run's role.
func (m *migration) openSandbox(ctx context.Context) (func(), error) {
	sb := &sandbox{}
	var sessionUser string
	var ownerSuper, meSuper, meCreateRole, ownerCreate, meCreate bool
	var db uint32
	err := m.admin.QueryRow(ctx, `select o.rolname::text, o.rolsuper, current_user::text, session_user::text,
			coalesce(r.rolsuper, false), coalesce(r.rolcreaterole, false),
			has_schema_privilege(c.relowner, c.relnamespace, 'CREATE'), has_schema_privilege(c.relnamespace, 'CREATE'), d.oid
		from pg_class c join pg_roles o on o.oid = c.relowner
		join pg_database d on d.datname = current_database()
		left join pg_roles r on r.rolname = current_user
		where c.oid = to_regclass($1)`, m.tableRef()).
		Scan(&sb.owner, &ownerSuper, &sb.me, &sessionUser, &meSuper, &meCreateRole, &ownerCreate, &meCreate, &db)
	if err != nil {
		return nil, fmt.Errorf("%w: find the owner of %s: %v", ErrBadCommand, m.tableRef(), err)
	}
	switch {
	case sb.owner == sb.me && sb.owner == sessionUser:
		sb.mode = modeSelf
	case ownerSuper:
		sb.mode = modeSetRole
	default:
		sb.mode = modeLogin
		sb.role = runRoleName(db, m.t.OID)
	}
	if sb.mode != modeSelf {
		sb.adminState = meCreate
		if !ownerCreate {
			if !meSuper {
				return nil, fmt.Errorf("%w: %s, the owner of %s, may not create in schema %s, and %s is not a superuser, so the shadow table cannot be created for it: "+
					"grant CREATE on the schema to %[2]s, or run tatd as a superuser", errDenied, sb.owner, m.tableRef(), m.t.Schema, sb.me)
			}
			sb.handOver = true
		}
	}
	if sb.mode == modeLogin {
		if err := sandboxVersion(m.t.Version); err != nil {
			return nil, err
		}
	}
	if sb.mode == modeLogin && !meSuper && !meCreateRole {
		return nil, fmt.Errorf("%w: %s must be a superuser or have CREATEROLE to run the code of %s (the owner of %s) in sessions of its own",
			errDenied, sb.me, sb.owner, m.tableRef())
	}
	// Like the caller's sessions (not the engine's pinned ones): the
	// owner's code resolves its names as it would in place.
	src := m.caller
	if src == nil {
		src = m.admin
	}
	cfg := src.Config().Copy()
	if cfg.ConnConfig.RuntimeParams["search_path"] == enginePath {
		delete(cfg.ConnConfig.RuntimeParams, "search_path") // a caller's own sessions pinned like the engine's (tatd)
	}
	// row_security = off: a query that row-level security would filter
	// fails instead (as in pg_dump), so the copy can never silently miss
	// rows that policies hide from the owner (FORCE ROW LEVEL SECURITY).
	set := "SET row_security = off"
	if sb.mode != modeSelf {
		set += "; SET ROLE " + qi(sb.owner)
	}
	var password string
	if sb.mode == modeLogin {
		if password, err = m.createRunRole(ctx, sb, meSuper); err != nil {
			return nil, err
		}
		cfg.ConnConfig.User = sb.role
		cfg.ConnConfig.Password = password
		// The admin's own after-connect steps are its business, not the
		// owner's sessions'.
		cfg.AfterConnect = nil
	}
	prev := cfg.AfterConnect
	cfg.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
		if prev != nil {
			if err := prev(ctx, c); err != nil {
				return err
			}
		}
		_, err := c.Exec(ctx, set)
		return err
	}
	// Her code may change the session's settings for good (RESET ROLE, a
	// session-level set_config, SET search_path): every session is put
	// back before it serves the engine again, or dropped. Without this a
	// session she reset to the login role would fail the engine's next
	// statement (no right on her tables) — an outage she could cause, not
	// an escalation (that role has no rights of its own).
	cfg.AfterRelease = func(c *pgx.Conn) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.Exec(ctx, "RESET ALL; "+set)
		return err == nil
	}
	drop := func() {
		if sb.mode == modeLogin {
			if err := dropRunRole(context.WithoutCancel(ctx), m.admin, sb.role); err != nil {
				m.event(ctx, m.currentPhase(), fmt.Sprintf("drop role %s: %v", sb.role, err))
			}
		}
	}
	p, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		drop()
		return nil, err
	}
	if _, err := p.Exec(ctx, "select 1"); err != nil {
		p.Close()
		drop()
		if sb.mode == modeLogin {
			return nil, fmt.Errorf("%w: cannot log in as %s, the role that runs the code of %s (the owner of %s): %v; "+
				"pg_hba.conf must let it log in with a password (scram-sha-256, md5 or password) from this host, as it lets the engine's role",
				errDenied, sb.role, sb.owner, m.tableRef(), err)
		}
		return nil, fmt.Errorf("%w: cannot act as the owner %s of %s (the engine's role must be a member of it): %v", ErrBadCommand, sb.owner, m.tableRef(), err)
	}
	m.sb, m.pool = sb, p
	return func() { m.pool = m.admin; p.Close(); drop() }, nil
}

// sandboxFixed: the first minor release of each major that fixed the known
// escapes from PostgreSQL's own sandboxes (security-restricted operations:
// CVE-2020-25695, CVE-2022-1552, CVE-2023-2454; SET ROLE reset:
// CVE-2024-10978), which the last delta under the switch's lock relies on.
var sandboxFixed = map[int]int{13: 130018, 14: 140015, 15: 150010, 16: 160006, 17: 170002}

func sandboxVersion(v int) error {
	if min, ok := sandboxFixed[v/10000]; ok && v < min {
		return fmt.Errorf("%w: PostgreSQL %d.%d has known escapes from the sandbox that runs the table owner's code; "+
			"update the server to %d.%d or later, or run the migration as the table's owner", errDenied, v/10000, v%10000, min/10000, min%10000)
	}
	return nil
}

// errDenied is a refusal for lack of privilege (SQLSTATE 42501 for callers
// that map errors to SQL states).
var errDenied = fmt.Errorf("%w: permission denied", ErrBadCommand)

// createRunRole (re)creates the run's login role with a fresh password and
// returns it. Only a SCRAM verifier reaches the server (and its logs).
func (m *migration) createRunRole(ctx context.Context, sb *sandbox, meSuper bool) (string, error) {
	if err := dropRunRole(ctx, m.admin, sb.role); err != nil {
		return "", fmt.Errorf("drop the leftover role %s: %w", sb.role, err)
	}
	raw := make([]byte, 24)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	password := hex.EncodeToString(raw)
	verifier, err := scramVerifier(password)
	if err != nil {
		return "", err
	}
	return password, pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
		if !meSuper && m.t.Version >= 160000 {
			// The engine must be able to drop what the role's sessions leave.
			if _, err := tx.Exec(ctx, "SET LOCAL createrole_self_grant = 'set, inherit'"); err != nil {
				return err
			}
		}
		grantMe := ""
		if !meSuper && m.t.Version < 160000 {
			grantMe = "GRANT " + qi(sb.role) + " TO " + qi(sb.me)
		}
		for _, s := range []string{
			"CREATE ROLE " + qi(sb.role) + " LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD " + quoteLiteral(verifier),
			"COMMENT ON ROLE " + qi(sb.role) + " IS " + quoteLiteral("pg_tat: runs the code of "+sb.owner+" while "+m.tableRef()+" is migrated; dropped at the end"),
			"GRANT " + qi(sb.owner) + " TO " + qi(sb.role),
			grantMe,
		} {
			if s == "" {
				continue
			}
			if _, err := tx.Exec(ctx, s); err != nil {
				if e := new(pgconn.PgError); errors.As(err, &e) && e.Code == "42501" {
					return fmt.Errorf("%w: create the role that runs the code of %s: %v (on PostgreSQL 16+ the engine's role needs GRANT %[2]s TO it WITH ADMIN OPTION)", errDenied, sb.owner, err)
				}
				return fmt.Errorf("create the role that runs the code of %s: %w", sb.owner, err)
			}
		}
		return nil
	})
}

// dropRunRole drops a run's login role and whatever its sessions created
// as that role (owner code that reset its role), if it exists.
func dropRunRole(ctx context.Context, db *pgxpool.Pool, role string) error {
	var exists bool
	if err := db.QueryRow(ctx, "select exists (select 1 from pg_roles where rolname = $1)", role).Scan(&exists); err != nil || !exists {
		return err
	}
	// Sessions still logged in as the role (a crashed run's) end first.
	_, _ = db.Exec(ctx, "select pg_terminate_backend(pid) from pg_stat_activity where usename = $1 and pid <> pg_backend_pid()", role)
	_, err := db.Exec(ctx, "DROP OWNED BY "+qi(role)+"; DROP ROLE "+qi(role))
	return err
}

// scramVerifier is PostgreSQL's SCRAM-SHA-256 verifier of password (RFC
// 5802, 4096 iterations), what CREATE ROLE ... PASSWORD stores.
func scramVerifier(password string) (string, error) {
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	return scramVerifierSalt(password, salt)
}

func scramVerifierSalt(password string, salt []byte) (string, error) {
	const iter = 4096
	salted, err := pbkdf2.Key(sha256.New, password, salt, iter, sha256.Size)
	if err != nil {
		return "", err
	}
	mac := func(key []byte, msg string) []byte {
		h := hmac.New(sha256.New, key)
		h.Write([]byte(msg))
		return h.Sum(nil)
	}
	stored := sha256.Sum256(mac(salted, "Client Key"))
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", iter, b64(salt), b64(stored[:]), b64(mac(salted, "Server Key"))), nil
}

// createOwned runs the CREATE statements of objects the table's owner must
// own (shadow tables, delta, capture function) in db, a session of hers, or,
// when she may not create in the schema (handOver), as the engine's role in
// a transaction of its own that hands each object in owned ("TABLE x",
// "FUNCTION f()") over to her before anything runs in it. She gets what the
// in-place ALTER would give her and no right on the schema.
func (m *migration) createOwned(ctx context.Context, db execer, stmts, owned []string) error {
	if m.sb == nil || !m.sb.handOver {
		for _, s := range stmts {
			if _, err := m.exec(ctx, db, s); err != nil {
				return err
			}
		}
		return nil
	}
	return pgx.BeginFunc(ctx, m.admin, func(tx pgx.Tx) error {
		for _, s := range stmts {
			if _, err := m.exec(ctx, tx, s); err != nil {
				return err
			}
		}
		for _, o := range owned {
			if _, err := m.exec(ctx, tx, "ALTER "+o+" OWNER TO "+qi(m.sb.owner)); err != nil {
				return fmt.Errorf("hand %s over to %s: %w", o, m.sb.owner, err)
			}
		}
		return nil
	})
}

// pinnedPath is set for maintenance operations (index builds, ANALYZE),
// whose definitions were read schema-qualified: an index expression or a
// default calling an unqualified function cannot be hijacked by an object
// planted earlier in the search_path.
const pinnedPath = "SET LOCAL search_path = pg_catalog, pg_temp"
