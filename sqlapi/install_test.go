package sqlapi

import (
	"context"
	"testing"

	pgtat "github.com/pgtat/pg_tat"
)

// fingerprintSQL digests everything install.sql creates in schema tat:
// functions (source, config, security, acl), relations (kind, acl, options),
// columns, constraints, indexes, triggers, policies and view definitions.
const fingerprintSQL = `
select md5(string_agg(x, E'\n' order by x)) from (
  select format('proc %s(%s) %s %s %s %s %s', p.proname, pg_get_function_identity_arguments(p.oid),
                p.prosrc, p.proconfig, p.prosecdef, p.provolatile, p.proacl) as x
    from pg_proc p where p.pronamespace = 'tat'::regnamespace
  union all
  select format('rel %s %s %s %s %s %s', c.relname, c.relkind, c.relacl, c.reloptions, c.relrowsecurity,
                case when c.relkind = 'v' then pg_get_viewdef(c.oid) end)
    from pg_class c where c.relnamespace = 'tat'::regnamespace
  union all
  select format('att %s.%s %s %s %s %s %s', c.relname, a.attname, a.attnum, format_type(a.atttypid, a.atttypmod),
                a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attacl)
    from pg_attribute a join pg_class c on c.oid = a.attrelid
    left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
   where c.relnamespace = 'tat'::regnamespace and a.attnum > 0 and not a.attisdropped
  union all
  select format('con %s %s', conname, pg_get_constraintdef(oid)) from pg_constraint where connamespace = 'tat'::regnamespace
  union all
  select format('idx %s', pg_get_indexdef(indexrelid)) from pg_index i join pg_class c on c.oid = i.indrelid
   where c.relnamespace = 'tat'::regnamespace
  union all
  select format('trg %s', pg_get_triggerdef(t.oid)) from pg_trigger t join pg_class c on c.oid = t.tgrelid
   where c.relnamespace = 'tat'::regnamespace and not t.tgisinternal
  union all
  select format('pol %s %s %s %s', polname, polcmd, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid))
    from pg_policy where polrelid in (select oid from pg_class where relnamespace = 'tat'::regnamespace)
  union all
  select format('nsp %s %s', nspname, nspacl) from pg_namespace where nspname = 'tat'
  union all
  select format('set %s %s', key, value) from tat.settings
) s`

func TestInstallTwiceIsNoop(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	ctx := context.Background()
	var before, after string
	if err := c.QueryRow(ctx, fingerprintSQL).Scan(&before); err != nil {
		t.Fatal(err)
	}
	mustExec(t, c, "create table t (id int primary key)")
	var id int64
	if err := c.QueryRow(ctx, "select tat.alter('alter table t add column x int')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, pgtat.InstallSQL); err != nil {
		t.Fatalf("second install: %v", err)
	}
	if err := c.QueryRow(ctx, fingerprintSQL).Scan(&after); err != nil {
		t.Fatal(err)
	}
	if before != after {
		t.Fatalf("second install changed schema tat: %s -> %s", before, after)
	}
	var n int
	if err := c.QueryRow(ctx, "select count(*) from tat.migrations where id = $1 and state = 'queued'", id).Scan(&n); err != nil || n != 1 {
		t.Fatalf("job lost by reinstall: n=%d err=%v", n, err)
	}
}

func TestStatusColumns(t *testing.T) {
	t.Parallel()
	_, c := setup(t)
	want := map[string]string{
		"id": "bigint", "table_name": "text", "command": "text", "state": "text", "phase": "text",
		"progress": "numeric", "rows_copied": "bigint", "rows_total": "bigint", "rows_per_second": "numeric",
		"eta": "interval", "delta_backlog": "bigint", "capture": "text", "lock_attempts": "integer",
		"started_at": "timestamp with time zone", "updated_at": "timestamp with time zone",
		"finished_at": "timestamp with time zone", "error": "text",
		"capture_lag_bytes": "bigint", "capture_lag": "interval",
	}
	rows, err := c.Query(context.Background(), `select attname::text, format_type(atttypid, atttypmod)
		from pg_attribute where attrelid = 'tat.status'::regclass and attnum > 0`)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for rows.Next() {
		var n, ty string
		if err := rows.Scan(&n, &ty); err != nil {
			t.Fatal(err)
		}
		got[n] = ty
	}
	for n, ty := range want {
		if got[n] != ty {
			t.Errorf("tat.status.%s: got %q, want %q", n, got[n], ty)
		}
	}
	for _, q := range []string{"select job, at, phase, message from tat.events", "select id, table_name, error, phase from tat.errors"} {
		if _, err := c.Exec(context.Background(), q); err != nil {
			t.Errorf("%s: %v", q, err)
		}
	}
}
