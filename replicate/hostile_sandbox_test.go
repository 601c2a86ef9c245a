package replicate_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/pgtat/pg_tat/replicate"
)

// Escapes found by review of the sandbox itself, each against the engine
// run by a superuser (the pg_tat CLI) on a table of a role that is not one.

// hostileOwner makes role <db>_m (nosuperuser, CREATE on public) and her
// table t with 2000 rows; it returns the role's name.
func hostileOwner(e *env) string {
	e.t.Helper()
	role := e.str("select current_database()") + "_m"
	e.exec(`create role "` + role + `" nosuperuser`)
	e.t.Cleanup(func() {
		_, _ = e.pool.Exec(context.Background(), `drop owned by "`+role+`" cascade`)
		_, _ = e.pool.Exec(context.Background(), `drop role "`+role+`"`)
	})
	e.exec(`grant create on schema public to "` + role + `";
		create table public.t (id int primary key, v int);
		insert into public.t select g, g from generate_series(1, 2000) g;
		alter table public.t owner to "` + role + `"`)
	return role
}

func (e *env) isSuper(role string) bool {
	return e.str("select rolsuper::text from pg_roles where rolname = $1", role) == "true"
}

// Her code inside the REFRESH of the last delta renames her materialized
// view and puts a view of hers under its name, whose query would run with
// the engine's rights when the engine reads the result: the switch must
// notice and fail, the original intact.
func TestHostileSandboxViewSwappedDuringRefresh(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	role := hostileOwner(e)
	e.exec(`create function public.evil() returns text[] language plpgsql as $$
		begin
		  begin execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  return array['0'];
		end $$;
		create function public.mfn(v int) returns bigint language plpgsql as $$
		begin
		  if coalesce(current_setting('tat.sql', true), '') <> '' then
		    begin
		      execute 'alter materialized view public.t__tat_exec rename to t__tat_gone';
		      execute 'create view public.t__tat_exec as select public.evil() as r';
		    exception when others then null;
		    end;
		  end if;
		  return v;
		end $$;
		alter function public.evil() owner to "` + role + `";
		alter function public.mfn(int) owner to "` + role + `"`)
	o := opts("alter table t alter column v type bigint using public.mfn(v)")
	var once sync.Once
	o.TestHook = func(ctx context.Context, point string, _ pgx.Tx) error {
		var err error
		if point == "dependents-read" {
			// A change for the last delta, which runs her USING under the lock.
			once.Do(func() { _, err = e.pool.Exec(ctx, "update t set v = v + 1 where id <= 5") })
		}
		return err
	}
	err := e.run(o)
	if e.isSuper(role) {
		t.Fatal("SECURITY: she became a superuser through the view read after the refresh")
	}
	if err == nil || !strings.Contains(err.Error(), "nothing was switched") || !strings.Contains(err.Error(), "t__tat_exec") {
		t.Fatalf("the switch did not notice the view swapped during the refresh: %v", err)
	}
	if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 't'::regclass and attname = 'v'"); got != "integer" {
		t.Fatalf("the original changed: v is %s", got)
	}
}

// A function of hers in public that matches an engine query's call without
// the cast pg_catalog's needs (quote_ident(name) for quote_ident(text)) is
// never what the engine's sessions call: their search_path is pinned.
func TestHostileSandboxPublicFunctionShadowing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	role := hostileOwner(e)
	e.exec(`create function public.quote_ident(name) returns text language plpgsql as $$
		begin
		  begin execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  return pg_catalog.quote_ident($1::text);
		end $$;
		create function public.left(name, int) returns text language plpgsql as $$
		begin
		  begin execute format('alter role %I superuser', '` + role + `'); exception when others then null; end;
		  return pg_catalog.left($1::text, $2);
		end $$;
		alter function public.quote_ident(name) owner to "` + role + `";
		alter function public.left(name, int) owner to "` + role + `"`)
	// A failing run cleans up after itself, and Cleanup and HasEarlierRun
	// are what tatd and the CLI call: every one of them must stay clear.
	o := opts("alter table t alter column v type bigint using v / 0")
	if err := e.run(o); err == nil {
		t.Fatal("a USING that divides by zero succeeded")
	}
	if err := replicate.Cleanup(context.Background(), e.pool, "public.t"); err != nil {
		t.Fatal(err)
	}
	if _, err := replicate.HasEarlierRun(context.Background(), e.pool, "public.t"); err != nil {
		t.Fatal(err)
	}
	if e.isSuper(role) {
		t.Fatal("SECURITY: the engine called her public.quote_ident / public.left")
	}
}
