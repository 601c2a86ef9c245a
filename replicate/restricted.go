package replicate

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// The last delta under the switch's lock.
//
// The switch holds ACCESS EXCLUSIVE on the original in a transaction of the
// engine's role, and only that transaction can read the original then; yet
// the last delta evaluates the owner's code (USING, defaults, CHECKs,
// triggers on the shadow). A session of the owner's sandbox cannot help
// (the lock keeps it out), and SET ROLE or a SECURITY DEFINER function can
// be escaped from (at-commit code: deferred triggers, WITH HOLD cursors).
// PostgreSQL's own sandbox for running a table owner's code inside someone
// else's transaction is the security-restricted operation of REFRESH
// MATERIALIZED VIEW (as of CREATE INDEX and ANALYZE): the view's query runs
// as the view's owner, and SET ROLE, PREPARE, LISTEN, temporary tables,
// WITH HOLD cursors and deferred triggers are refused; settings changed in
// it are rolled back when it ends.
//
// So every statement of the last delta runs as the query of the owner's
// materialized view T__tat_exec: its query calls the owner's function
// T__tat_exec(sql, mode, path), which executes the statement given in the
// setting tat.sql (with the sandbox's search_path) and returns its rows (as
// text arrays) or its row count; the engine then reads the view. Both
// belong to the owner, who may change them at will: whatever runs there
// runs as her, restricted.

// restrictedObjects are the statements creating T__tat_exec (function and
// materialized view) for the owner.
func (m *migration) restrictedObjects() (stmts, owned []string) {
	name := m.execName()
	fn := name + "(text, text, text)"
	stmts = []string{
		`CREATE OR REPLACE FUNCTION ` + name + `(sql text, mode text, path text) RETURNS SETOF text[] LANGUAGE plpgsql AS $f$
DECLARE
  n bigint;
  r record;
BEGIN
  PERFORM pg_catalog.set_config('search_path', path, true);
  -- deferred constraint checks cannot be queued in a restricted operation
  SET CONSTRAINTS ALL IMMEDIATE;
  IF mode = 'exec' THEN
    EXECUTE sql;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN NEXT ARRAY[n::text];
  ELSE
    FOR r IN EXECUTE sql LOOP
      RETURN NEXT ARRAY(SELECT j.value FROM pg_catalog.json_each_text(pg_catalog.row_to_json(r)) j);
    END LOOP;
  END IF;
END $f$`,
		`CREATE MATERIALIZED VIEW IF NOT EXISTS ` + name + ` AS SELECT r FROM ` + name +
			`(pg_catalog.current_setting('tat.sql'), pg_catalog.current_setting('tat.mode'), pg_catalog.current_setting('tat.path')) AS r WITH NO DATA`,
	}
	return stmts, []string{"FUNCTION " + fn, "MATERIALIZED VIEW " + name}
}

func (m *migration) execName() string {
	return ident(m.plan.Schema, shadowName(m.plan.Table, "__tat_exec"))
}

// restrictedTx returns the transaction through which the switch applies the
// last delta: tx itself when the owner's code may run in it (the engine's
// role is the owner, or the owner is a superuser), else a transaction whose
// statements run in the owner's restricted materialized view.
func (m *migration) restrictedTx(tx pgx.Tx) pgx.Tx {
	if !m.restricted() {
		return tx
	}
	return &ownerTx{Tx: tx, m: m}
}

func (m *migration) restricted() bool { return m.sb != nil && m.sb.mode == modeLogin }

// setupRestricted creates T__tat_exec before the switch's first lock
// attempt, and reads the sandbox's search_path for the statements'
// unqualified names (a USING expression runs as written).
func (m *migration) setupRestricted(ctx context.Context) error {
	if !m.restricted() || m.sb.exec {
		return nil
	}
	if _, err := m.ownerPath(ctx); err != nil {
		return err
	}
	m.sb.exec = true
	stmts, owned := m.restrictedObjects()
	if err := m.createOwned(ctx, m.pool, stmts, owned); err != nil {
		return fmt.Errorf("create %s: %w", m.execName(), err)
	}
	return nil
}

// ownerPath is the search_path of the owner's sandbox sessions (the
// caller's usual one), read once.
func (m *migration) ownerPath(ctx context.Context) (string, error) {
	if m.sb.path == "" {
		if err := m.pool.QueryRow(ctx, "SELECT current_setting('search_path')").Scan(&m.sb.path); err != nil {
			return "", err
		}
	}
	return m.sb.path, nil
}

// checkNoTemp fails the switch when the owner's code left temporary
// objects in the switch's session (types and relations in pg_temp are
// found before pg_catalog's by the switch's own statements).
func checkNoTemp(ctx context.Context, tx pgx.Tx) error {
	var n int
	err := tx.QueryRow(ctx, `select (select count(*) from pg_catalog.pg_class where relnamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_type where typnamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_proc where pronamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_operator where oprnamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_collation where collnamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_ts_config where cfgnamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_ts_dict where dictnamespace = pg_catalog.pg_my_temp_schema())
		+ (select count(*) from pg_catalog.pg_conversion where connamespace = pg_catalog.pg_my_temp_schema())`).Scan(&n)
	if err != nil {
		return err
	}
	if n > 0 {
		return errors.New("the owner's code created temporary objects in the switch's session; nothing was switched")
	}
	return nil
}

// ownerTx runs Exec, Query and QueryRow through the owner's restricted
// materialized view; everything else goes to the wrapped transaction.
type ownerTx struct {
	pgx.Tx
	m *migration
}

func (o *ownerTx) run(ctx context.Context, mode, sql string, args []any) ([][]*string, error) {
	text, err := inlineArgs(sql, args)
	if err != nil {
		return nil, err
	}
	view := o.m.execName()
	if _, err := o.Tx.Exec(ctx, "SELECT pg_catalog.set_config('tat.sql', $1, true), pg_catalog.set_config('tat.mode', $2, true), pg_catalog.set_config('tat.path', $3, true)",
		text, mode, o.m.sb.path); err != nil {
		return nil, err
	}
	before, err := o.viewOID(ctx, view)
	if err != nil {
		return nil, err
	}
	if _, err := o.Tx.Exec(ctx, "REFRESH MATERIALIZED VIEW "+view); err != nil {
		return nil, err
	}
	// Her code ran inside the REFRESH, in this transaction: it may have
	// renamed the view and put a view of hers (whose query would run as
	// us) under its name. The name must still be the view REFRESH locked
	// (no other session can change that now).
	if after, err := o.viewOID(ctx, view); err != nil {
		return nil, err
	} else if after != before {
		return nil, fmt.Errorf("%s was replaced during its refresh; nothing was switched", view)
	}
	rows, err := o.Tx.Query(ctx, "SELECT r FROM "+view)
	if err != nil {
		return nil, err
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[[]*string])
	if err != nil {
		return nil, err
	}
	return out, checkNoTemp(ctx, o.Tx)
}

// viewOID is the materialized view that name resolves to (an error for
// anything else: reading a view or a table of hers could run her code).
func (o *ownerTx) viewOID(ctx context.Context, name string) (uint32, error) {
	var oid uint32
	err := o.Tx.QueryRow(ctx, `select c.oid from pg_catalog.pg_class c
		where c.oid = pg_catalog.to_regclass($1::text) and c.relkind = 'm'`, name).Scan(&oid)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("%s is not the materialized view the switch created; nothing was switched", name)
	}
	return oid, err
}

func (o *ownerTx) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	out, err := o.run(ctx, "exec", sql, args)
	if err != nil {
		return pgconn.CommandTag{}, err
	}
	n := "0"
	if len(out) == 1 && len(out[0]) == 1 && out[0][0] != nil {
		n = *out[0][0]
	}
	return pgconn.NewCommandTag("EXEC " + n), nil
}

func (o *ownerTx) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	out, err := o.run(ctx, "rows", sql, args)
	if err != nil {
		return nil, err
	}
	return &textRows{rows: out, i: -1}, nil
}

func (o *ownerTx) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	rows, err := o.Query(ctx, sql, args...)
	if err != nil {
		return errRow{err}
	}
	return rowOf{rows}
}

type errRow struct{ err error }

func (e errRow) Scan(...any) error { return e.err }

type rowOf struct{ pgx.Rows }

func (r rowOf) Scan(dst ...any) error {
	defer r.Close()
	if !r.Next() {
		return pgx.ErrNoRows
	}
	return r.Rows.Scan(dst...)
}

// textRows are the rows of a statement run through the view: every value
// is text (or NULL), converted on Scan to what the engine's callers read.
type textRows struct {
	rows [][]*string
	i    int
	err  error
}

func (r *textRows) Close()     {}
func (r *textRows) Err() error { return r.err }
func (r *textRows) CommandTag() pgconn.CommandTag {
	return pgconn.NewCommandTag("SELECT " + strconv.Itoa(len(r.rows)))
}
func (r *textRows) FieldDescriptions() []pgconn.FieldDescription { return nil }
func (r *textRows) RawValues() [][]byte                          { return nil }
func (r *textRows) Conn() *pgx.Conn                              { return nil }
func (r *textRows) TypeMap() *pgtype.Map                         { return nil }
func (r *textRows) Next() bool {
	r.i++
	return r.i < len(r.rows)
}

func (r *textRows) Values() ([]any, error) {
	out := make([]any, len(r.rows[r.i]))
	for i, v := range r.rows[r.i] {
		if v != nil {
			out[i] = *v
		}
	}
	return out, nil
}

func (r *textRows) Scan(dst ...any) error {
	row := r.rows[r.i]
	if len(dst) != len(row) {
		return fmt.Errorf("scan: %d values into %d destinations", len(row), len(dst))
	}
	for i, v := range row {
		if err := scanText(v, dst[i]); err != nil {
			return fmt.Errorf("scan column %d: %w", i+1, err)
		}
	}
	return nil
}

func scanText(v *string, dst any) error {
	switch d := dst.(type) {
	case *string:
		if v == nil {
			return errors.New("NULL into a string")
		}
		*d = *v
	case **string:
		*d = v
	case *int64:
		if v == nil {
			return errors.New("NULL into an integer")
		}
		n, err := strconv.ParseInt(*v, 10, 64)
		*d = n
		return err
	case **int64:
		if v == nil {
			*d = nil
			return nil
		}
		n, err := strconv.ParseInt(*v, 10, 64)
		*d = &n
		return err
	default:
		return fmt.Errorf("unsupported destination %T", dst)
	}
	return nil
}

// inlineArgs writes the statement's parameters ($1, $2, ...) into its text
// as literals: the statement travels as a setting, not as a bound query.
// Quoted identifiers, string constants and dollar-quoted strings are
// skipped, so a "$1" in a name or a value is never touched.
func inlineArgs(sql string, args []any) (string, error) {
	if len(args) == 0 {
		return sql, nil
	}
	lits := make([]string, len(args))
	for i, a := range args {
		l, err := sqlLiteral(a)
		if err != nil {
			return "", fmt.Errorf("parameter $%d: %w", i+1, err)
		}
		lits[i] = l
	}
	var b strings.Builder
	for i := 0; i < len(sql); {
		c := sql[i]
		switch {
		case c == '"' || c == '\'':
			j := i + 1
			escapes := c == '\'' && i > 0 && (sql[i-1] == 'E' || sql[i-1] == 'e')
			for j < len(sql) {
				if escapes && sql[j] == '\\' {
					j += 2
					continue
				}
				if sql[j] == c {
					if j+1 < len(sql) && sql[j+1] == c {
						j += 2
						continue
					}
					break
				}
				j++
			}
			j = min(j+1, len(sql))
			b.WriteString(sql[i:j])
			i = j
		case c == '$' && i > 0 && isIdentChar(sql[i-1]):
			// Part of a name (a$1 is a valid identifier).
			b.WriteByte(c)
			i++
		case c == '$' && i+1 < len(sql) && sql[i+1] >= '0' && sql[i+1] <= '9':
			j := i + 1
			for j < len(sql) && sql[j] >= '0' && sql[j] <= '9' {
				j++
			}
			n, _ := strconv.Atoi(sql[i+1 : j])
			if n < 1 || n > len(lits) {
				return "", fmt.Errorf("no value for parameter $%d", n)
			}
			b.WriteString("(" + lits[n-1] + ")")
			i = j
		case c == '$':
			// A dollar-quoted string: $tag$ ... $tag$.
			j := i + 1
			for j < len(sql) && isIdentChar(sql[j]) && sql[j] != '$' {
				j++
			}
			if j < len(sql) && sql[j] == '$' {
				tag := sql[i : j+1]
				end := strings.Index(sql[j+1:], tag)
				if end < 0 {
					return "", errors.New("unterminated dollar-quoted string")
				}
				stop := j + 1 + end + len(tag)
				b.WriteString(sql[i:stop])
				i = stop
				continue
			}
			b.WriteByte(c)
			i++
		default:
			b.WriteByte(c)
			i++
		}
	}
	return b.String(), nil
}

// sqlLiteral is a as a SQL constant, independent of standard_conforming_strings.
func sqlLiteral(a any) (string, error) {
	str := func(s string) string {
		return "E'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), "'", "''") + "'"
	}
	switch v := a.(type) {
	case nil:
		return "NULL", nil
	case int:
		return strconv.Itoa(v), nil
	case int32:
		return strconv.FormatInt(int64(v), 10), nil
	case int64:
		return strconv.FormatInt(v, 10), nil
	case uint32:
		return strconv.FormatUint(uint64(v), 10), nil
	case string:
		return str(v), nil
	case []string:
		parts := make([]string, len(v))
		for i, s := range v {
			parts[i] = str(s)
		}
		return "ARRAY[" + strings.Join(parts, ", ") + "]::text[]", nil
	}
	return "", fmt.Errorf("unsupported type %T", a)
}

func isIdentChar(c byte) bool {
	return c == '_' || c == '$' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c >= 0x80
}
