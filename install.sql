-- pg_tat: online ALTER TABLE driven from SQL.
--
-- install.sql creates or upgrades schema tat. It is idempotent: running it a
-- second time changes nothing, and a later version upgrades an earlier one in
-- place (create ... if not exists, add column if not exists, create or
-- replace). Run it as the role tatd connects as (that role owns schema tat and
-- runs the migrations); `tatd --install` does the same.
--
-- ============================================================================
-- PRIVILEGES
-- ============================================================================
-- To queue migrations a role needs nothing but
--     grant usage on schema tat to app;            -- (granted to PUBLIC below)
--     grant execute on function tat.alter(...) to app;  -- (granted to PUBLIC)
-- and, like ALTER TABLE itself, it must own the table (be a member of the
-- owning role; superusers pass). The check is made for the caller's current
-- role, also after SET ROLE: tat.alter is SECURITY INVOKER and a BEFORE INSERT
-- trigger that is *not* SECURITY DEFINER stamps current_user into
-- tat.migrations.requested_by, a column the caller cannot write.
--
-- How that works without granting the table to everyone:
--   * PUBLIC has column-level INSERT on tat.migrations(command, options) only;
--     every other column is set by the BEFORE INSERT trigger, which validates
--     the command and the options, so a direct INSERT is checked exactly like
--     a call of tat.alter.
--   * PUBLIC has SELECT on tat.migrations and tat.events under row level
--     security: a role sees the jobs it (or a role it is a member of)
--     requested and the jobs on tables it owns (tat._may_control; a job
--     whose table is gone, by its requester only). Seeing a job is what
--     allows controlling it (cancel, pause, resume, switch, set, wait).
--   * PUBLIC has SELECT on the views tat.status, tat.progress, tat.errors and
--     tat.phase_timings, which show each role the same jobs. A view reads
--     its tables with its owner's rights (bypassing their row level
--     security), so each filters on current_user itself (views with
--     security_invoker need PostgreSQL 15), and each is a security_barrier
--     (a caller's cheap leaky function is not run on the rows it hides).
--   * Control functions are SECURITY INVOKER too; they insert a row into
--     tat.requests (an audit log of who asked for what). Its BEFORE INSERT
--     trigger (invoker rights) stamps requested_by = current_user and checks
--     the caller may see the job; its AFTER INSERT trigger is SECURITY DEFINER
--     (owned by the installer, search_path pinned) and applies the request to
--     tat.migrations, records an event and notifies tatd.
--   * Things a caller cannot read (is another job active on this table? what
--     is the notify channel?) are answered by small SECURITY DEFINER helpers
--     with `set search_path = pg_catalog, pg_temp`, which take no SQL text and
--     are not granted to PUBLIC unless harmless (tat._check_logical_capture).
--     Every function has its search_path pinned, except tat.alter and the
--     BEFORE INSERT trigger of tat.migrations, where the table name must
--     resolve with the caller's search_path: the trigger does only that, with
--     schema-qualified calls, and leaves the checks to tat._migrations_check.
--   * Options that make tatd run the caller's SQL text in its own sessions
--     (throttle_query, command_before_switch, command_after_switch) need a
--     superuser (42501): there, the SET ROLE that would hold the SQL to the
--     caller's rights can be undone by the SQL itself (RESET ROLE). tat.set
--     refuses throttle_query the same way, and on jobs queued by another
--     role than a superuser; tatd re-checks before it runs the query.
--   * Everything else is revoked from PUBLIC. A monitoring role that must see
--     every job (in all the views and in tat.events) is given
--         grant usage on schema tat to monitor;
--         grant select on tat.status to monitor;
--     an explicit SELECT grant on tat.status (not PUBLIC's) is the
--     monitoring grant (tat._sees_all); superusers see every job as well.
--
-- NOTIFY CHANNEL
-- tatd listens on TAT_CHANNEL (default 'tat'). The triggers notify on the
-- channel stored in tat.settings, key 'channel' (default 'tat'). To use
-- another channel:
--     insert into tat.settings values ('channel', 'mychannel')
--       on conflict (key) do update set value = excluded.value;
-- and start tatd with TAT_CHANNEL=mychannel. Payloads: '<id>' (new or resumed
-- job), 'cancel:<id>', 'pause:<id>', 'resume:<id>', 'switch:<id>',
-- 'cleanup:<request id>'.
--
-- REFUSALS (SQLSTATE)
--   22023 invalid_parameter_value      empty/NULL command, bad option value
--   42601 syntax_error                 more than one statement, unterminated
--                                      quote/comment, unparsable table name
--   0A000 feature_not_supported        not an ALTER TABLE (e.g. DROP TABLE),
--                                      temporary tables, system schemas
--   42P01 undefined_table              the table does not exist
--   42809 wrong_object_type            not a plain or partitioned table
--   42501 insufficient_privilege       the caller does not own the table;
--                                      throttle_query / command_before_switch /
--                                      command_after_switch set by a role that
--                                      is not a superuser
--   55006 object_in_use                a migration on the table is active
--   55000 object_not_in_prerequisite_state  control call in the wrong state
--   P0002 no_data_found                unknown (or invisible) job id
--   57014 query_canceled               tat.wait timed out
--   P0001 raise_exception              tat.wait: the job failed / was cancelled
-- ============================================================================

create schema if not exists tat;
comment on schema tat is 'pg_tat: online ALTER TABLE (see tat.alter, tat.status)';
revoke all on schema tat from public;
grant usage on schema tat to public;

-- ---------------------------------------------------------------------------
-- settings
-- ---------------------------------------------------------------------------
create table if not exists tat.settings (
    key   text primary key,
    value text not null
);
insert into tat.settings (key, value) values ('channel', 'tat') on conflict (key) do nothing;
revoke all on tat.settings from public;

-- ---------------------------------------------------------------------------
-- migrations
-- ---------------------------------------------------------------------------
create table if not exists tat.migrations (
    id bigint generated always as identity primary key
);
alter table tat.migrations add column if not exists command          text;
alter table tat.migrations add column if not exists table_name       text;
alter table tat.migrations add column if not exists table_oid        oid;
alter table tat.migrations add column if not exists options          jsonb not null default '{}';
alter table tat.migrations add column if not exists capture          text;
alter table tat.migrations add column if not exists state            text not null default 'queued';
alter table tat.migrations add column if not exists phase            text;
alter table tat.migrations add column if not exists requested_by     name;
alter table tat.migrations add column if not exists switch_requested boolean not null default false;
alter table tat.migrations add column if not exists cancel_requested boolean not null default false;
alter table tat.migrations add column if not exists pause_requested  boolean not null default false;
alter table tat.migrations add column if not exists rows_copied      bigint not null default 0;
alter table tat.migrations add column if not exists rows_total       bigint;
alter table tat.migrations add column if not exists delta_backlog    bigint;
alter table tat.migrations add column if not exists lock_attempts    int not null default 0;
alter table tat.migrations add column if not exists runner           text;
alter table tat.migrations add column if not exists attempts         int not null default 0;
alter table tat.migrations add column if not exists created_at       timestamptz not null default now();
alter table tat.migrations add column if not exists started_at       timestamptz;
alter table tat.migrations add column if not exists updated_at       timestamptz;
alter table tat.migrations add column if not exists finished_at      timestamptz;
alter table tat.migrations add column if not exists error            text;
alter table tat.migrations add column if not exists error_phase      text;
-- live progress written by the runner (sqlapi.Reporter)
alter table tat.migrations add column if not exists throttle_reason  text;
alter table tat.migrations add column if not exists capture_lag_bytes bigint;
alter table tat.migrations add column if not exists capture_lag      interval;  -- capture_lag_bytes as time (sqlapi lagTracker)
alter table tat.migrations add column if not exists rows_per_second  numeric;
alter table tat.migrations add column if not exists rate_rows        bigint;
alter table tat.migrations add column if not exists rate_at          timestamptz;
alter table tat.migrations add column if not exists phase_started_at timestamptz;
-- keep_old (see tat.revert): the kept old table, written by the runner
alter table tat.migrations add column if not exists kept_table       text;
alter table tat.migrations add column if not exists keep_until       timestamptz;
alter table tat.migrations add column if not exists revert_backlog   bigint;
alter table tat.migrations add column if not exists revert_blocked   text;
alter table tat.migrations add column if not exists revert_requested boolean not null default false;
alter table tat.migrations add column if not exists finish_requested boolean not null default false;

do $$
begin
    -- (re-created by versions before keep_old, which lacked kept and reverted)
    if exists (select from pg_constraint where conrelid = 'tat.migrations'::regclass and conname = 'migrations_state_check'
               and pg_get_constraintdef(oid) not like '%reverted%') then
        alter table tat.migrations drop constraint migrations_state_check;
    end if;
    if not exists (select from pg_constraint
                   where conrelid = 'tat.migrations'::regclass and conname = 'migrations_state_check') then
        alter table tat.migrations add constraint migrations_state_check
            check (state in ('queued', 'running', 'paused', 'waiting_switch', 'kept', 'done', 'failed', 'cancelled', 'reverted'));
    end if;
    if not exists (select from pg_constraint
                   where conrelid = 'tat.migrations'::regclass and conname = 'migrations_command_check') then
        alter table tat.migrations add constraint migrations_command_check check (command is not null);
    end if;
end
$$;

-- At most one active migration per table (backs the 55006 check of the trigger
-- against concurrent callers). A job whose old table is kept (state kept)
-- is active: its reverse capture is on the table.
do $$
begin
    if exists (select from pg_index where indexrelid = to_regclass('tat.migrations_one_active_per_table')
               and pg_get_expr(indpred, indrelid) not like '%kept%') then
        drop index tat.migrations_one_active_per_table;
        drop index if exists tat.migrations_pending;
    end if;
end
$$;
create unique index if not exists migrations_one_active_per_table
    on tat.migrations (table_oid)
    where state in ('queued', 'running', 'paused', 'waiting_switch', 'kept');
create index if not exists migrations_pending on tat.migrations (id)
    where state in ('queued', 'running', 'waiting_switch', 'kept');

comment on table tat.migrations is 'pg_tat jobs: one row per tat.alter call';

-- ---------------------------------------------------------------------------
-- events: the timeline of each job
-- ---------------------------------------------------------------------------
create table if not exists tat.events (
    id bigint generated always as identity primary key
);
alter table tat.events add column if not exists job     bigint;
alter table tat.events add column if not exists at      timestamptz not null default clock_timestamp();
alter table tat.events add column if not exists phase   text;
alter table tat.events add column if not exists message text;
create index if not exists events_job on tat.events (job, id);
comment on table tat.events is 'pg_tat timeline: phase changes, lock retries, control requests, errors';

-- ---------------------------------------------------------------------------
-- requests: control calls (cancel, pause, resume, switch, cleanup)
-- ---------------------------------------------------------------------------
create table if not exists tat.requests (
    id bigint generated always as identity primary key
);
alter table tat.requests add column if not exists action       text;
alter table tat.requests add column if not exists job          bigint;
alter table tat.requests add column if not exists table_oid    oid;
alter table tat.requests add column if not exists table_name   text;
alter table tat.requests add column if not exists requested_by name;
alter table tat.requests add column if not exists at           timestamptz not null default now();
alter table tat.requests add column if not exists state        text not null default 'done';
alter table tat.requests add column if not exists runner       text;
alter table tat.requests add column if not exists finished_at  timestamptz;
alter table tat.requests add column if not exists error        text;
alter table tat.requests add column if not exists option       text;  -- tat.set
alter table tat.requests add column if not exists value        text;  -- tat.set
do $$
begin
    if not exists (select from pg_constraint
                   where conrelid = 'tat.requests'::regclass and conname = 'requests_action_check'
                     and pg_get_constraintdef(oid) like '%''finish''%') then
        alter table tat.requests drop constraint if exists requests_action_check;
        alter table tat.requests add constraint requests_action_check
            check (action in ('cancel', 'pause', 'resume', 'switch', 'cleanup', 'set', 'revert', 'finish'));
    end if;
    if not exists (select from pg_constraint
                   where conrelid = 'tat.requests'::regclass and conname = 'requests_state_check') then
        alter table tat.requests add constraint requests_state_check
            check (state in ('queued', 'running', 'done', 'failed'));
    end if;
end
$$;
create index if not exists requests_queued on tat.requests (id) where state in ('queued', 'running');
comment on table tat.requests is 'pg_tat control requests (audit log); cleanup requests are run by tatd';

-- ---------------------------------------------------------------------------
-- helpers
-- ---------------------------------------------------------------------------

-- The channel the triggers notify on.
-- Creates (or replaces) a row trigger on INSERT. CREATE OR REPLACE TRIGGER is
-- PostgreSQL 14+: on 13 the trigger is dropped and created.
create or replace function tat._insert_trigger(tbl regclass, name text, timing text, fn regproc) returns void
language plpgsql volatile set search_path = pg_catalog, pg_temp
as $$
begin
    if current_setting('server_version_num')::int < 140000 then
        execute format('drop trigger if exists %I on %s', name, tbl);
        execute format('create trigger %I %s insert on %s for each row execute function %s()', name, timing, tbl, fn);
    else
        execute format('create or replace trigger %I %s insert on %s for each row execute function %s()', name, timing, tbl, fn);
    end if;
end
$$;

create or replace function tat._channel() returns text
language sql stable security definer set search_path = pg_catalog, pg_temp
as $$ select coalesce((select value from tat.settings where key = 'channel'), 'tat') $$;

create or replace function tat._notify(payload text) returns void
language sql volatile security definer set search_path = pg_catalog, pg_temp
as $$ select pg_notify(tat._channel(), payload) $$;

-- May role `who` see/control a job requested by `requester` on table `tbl`,
-- named `tbl_name` (schema-qualified, quoted) when it was queued? Superusers,
-- members of the requesting role, and members of the owner of the table,
-- as long as the table still exists under that name (an OID is reused once
-- the table is dropped: a job whose table is gone is seen by its requester
-- only). Used by the row level security policy of tat.migrations and the
-- status views (who = current_user, the caller's current role: a view or a
-- policy evaluates its functions as the querying role) and by the definer
-- triggers (who = the stamped requester). Reads only world-readable catalogs.
create or replace function tat._may_control(who name, requester name, tbl oid, tbl_name text) returns boolean
language sql stable security invoker set search_path = pg_catalog, pg_temp
as $$
    select exists (select from pg_roles w where w.rolname = who and w.rolsuper)
        or exists (select from pg_roles r, pg_roles w
                   where r.rolname = requester and w.rolname = who
                     and pg_has_role(w.oid, r.oid, 'MEMBER'))
        or exists (select from pg_class c join pg_namespace n on n.oid = c.relnamespace, pg_roles w
                   where c.oid = tbl and format('%I.%I', n.nspname, c.relname) = tbl_name
                     and w.rolname = who and pg_has_role(w.oid, c.relowner, 'MEMBER'))
$$;

-- Does the caller's current role see every job in the status views? Yes for
-- the roles given the monitoring grant, `grant select on tat.status to
-- monitor` (an explicit grant, not PUBLIC's), their members and the owner of
-- schema tat; superusers are let through by tat._may_control. Invoker
-- rights: current_user is the querying role, also inside a view.
create or replace function tat._sees_all() returns boolean
language sql stable security invoker set search_path = pg_catalog, pg_temp
as $$
    select exists (select from pg_class c join pg_namespace n on n.oid = c.relnamespace, aclexplode(c.relacl) a
                   where n.nspname = 'tat' and c.relname = 'status' and a.grantee <> 0 and a.privilege_type = 'SELECT'
                     and pg_has_role(current_user, a.grantee, 'MEMBER'))
$$;

-- The active migration on a table, if any, whoever requested it: runs as
-- the owner of schema tat, for the definer triggers only (not granted to
-- PUBLIC: it would tell anyone the jobs on any table).
create or replace function tat._active_job(tbl oid, out id bigint, out state text)
language sql stable security definer set search_path = pg_catalog, pg_temp
as $$
    select m.id, m.state from tat.migrations m
    where m.table_oid = tbl and m.state in ('queued', 'running', 'paused', 'waiting_switch', 'kept')
    order by m.id limit 1
$$;

-- Refuses logical capture (55000) when the server cannot give it: it is
-- older than PostgreSQL 14, wal_level is not logical, no replication slot is free, or the role that runs the
-- migrations (the owner of schema tat, i.e. tatd's role) may not replicate.
-- Definer rights: callers need not read pg_replication_slots / pg_roles.
create or replace function tat._check_logical_capture() returns void
language plpgsql stable security definer set search_path = pg_catalog, pg_temp
as $$
declare
    used  int;
    slots int := current_setting('max_replication_slots')::int;
    owner record;
begin
    if current_setting('server_version_num')::int < 140000 then
        raise exception using errcode = '55000',
            message = format('capture => ''logical'' needs PostgreSQL 14 or later (server is %s)', current_setting('server_version')),
            hint = 'Use capture => ''trigger''.';
    end if;
    if current_setting('wal_level') <> 'logical' then
        raise exception using errcode = '55000',
            message = format('capture => ''logical'' needs wal_level = logical (it is %s)', current_setting('wal_level')),
            hint = 'Set wal_level = logical and restart the server, or use capture => ''trigger''.';
    end if;
    select count(*) into used from pg_replication_slots;
    if used >= slots then
        raise exception using errcode = '55000',
            message = format('capture => ''logical'' needs a free replication slot (%s of max_replication_slots = %s in use)', used, slots),
            hint = 'Drop an unused slot (pg_drop_replication_slot), raise max_replication_slots, or use capture => ''trigger''.';
    end if;
    select r.rolname, r.rolsuper, r.rolreplication into owner
      from pg_namespace n join pg_roles r on r.oid = n.nspowner where n.nspname = 'tat';
    if not (owner.rolsuper or owner.rolreplication) then
        raise exception using errcode = '55000',
            message = format('capture => ''logical'' needs the REPLICATION attribute for role %s (the owner of schema tat, which tatd runs as)', owner.rolname),
            hint = format('ALTER ROLE %I REPLICATION, or use capture => ''trigger''.', owner.rolname);
    end if;
end
$$;

-- The statements of cmd, split at its top-level ';' (each trimmed, without
-- the ';'; blanks and comments alone are no statement). Understands
-- 'strings' (with '' and E'\'' escapes), "identifiers", $tag$ dollar quotes $tag$,
-- -- line comments and nested /* block comments */.
create or replace function tat._statements(cmd text) returns text[]
language plpgsql immutable set search_path = pg_catalog, pg_temp
as $$
declare
    out   text[] := '{}';
    start int := 1;
    body  boolean := false;
    n     int := length(cmd);
    i     int := 1;
    c     text;
    nxt   text;
    esc   boolean;
    depth int;
    tag   text;
    p     int;
begin
    while i <= n loop
        c := substr(cmd, i, 1);
        nxt := substr(cmd, i + 1, 1);
        if c !~ '^\s$' and c <> ';' and not (c = '-' and nxt = '-') and not (c = '/' and nxt = '*') then
            body := true;
        end if;
        if c = '''' then
            esc := i > 1 and lower(substr(cmd, i - 1, 1)) = 'e'
                   and (i = 2 or substr(cmd, i - 2, 1) !~ '^[[:alnum:]_$]$');
            i := i + 1;
            loop
                if i > n then
                    raise exception using errcode = '42601', message = 'unterminated quoted string in command';
                end if;
                c := substr(cmd, i, 1);
                if esc and c = '\' then
                    i := i + 2;
                elsif c = '''' and substr(cmd, i + 1, 1) = '''' then
                    i := i + 2;
                elsif c = '''' then
                    exit;
                else
                    i := i + 1;
                end if;
            end loop;
            i := i + 1;
        elsif c = '"' then
            i := i + 1;
            loop
                if i > n then
                    raise exception using errcode = '42601', message = 'unterminated quoted identifier in command';
                end if;
                c := substr(cmd, i, 1);
                if c = '"' and substr(cmd, i + 1, 1) = '"' then
                    i := i + 2;
                elsif c = '"' then
                    exit;
                else
                    i := i + 1;
                end if;
            end loop;
            i := i + 1;
        elsif c = '-' and nxt = '-' then
            p := strpos(substr(cmd, i), E'\n');
            i := case when p = 0 then n + 1 else i + p end;
        elsif c = '/' and nxt = '*' then
            depth := 1;
            i := i + 2;
            while depth > 0 loop
                if i > n then
                    raise exception using errcode = '42601', message = 'unterminated /* comment in command';
                end if;
                if substr(cmd, i, 2) = '/*' then
                    depth := depth + 1;
                    i := i + 2;
                elsif substr(cmd, i, 2) = '*/' then
                    depth := depth - 1;
                    i := i + 2;
                else
                    i := i + 1;
                end if;
            end loop;
        elsif c = '$' and (i = 1 or substr(cmd, i - 1, 1) !~ '^[[:alnum:]_$]$')
              and substr(cmd, i) ~ '^\$([[:alpha:]_][[:alnum:]_]*)?\$' then
            tag := substring(substr(cmd, i) from '^\$(?:[[:alpha:]_][[:alnum:]_]*)?\$');
            p := strpos(substr(cmd, i + length(tag)), tag);
            if p = 0 then
                raise exception using errcode = '42601', message = 'unterminated dollar-quoted string in command';
            end if;
            i := i + length(tag) + p - 1 + length(tag);
        else
            if c = ';' then
                if body then
                    out := out || btrim(substr(cmd, start, i - start), E' \t\r\n\f');
                end if;
                start := i + 1;
                body := false;
            end if;
            i := i + 1;
        end if;
    end loop;
    if body then
        out := out || btrim(substr(cmd, start), E' \t\r\n\f');
    end if;
    return out;
end
$$;

-- cmd without its trailing ';' (and what follows it: blanks and comments);
-- raises 42601 when another statement follows.
create or replace function tat._single_statement(cmd text) returns text
language plpgsql immutable set search_path = pg_catalog, pg_temp
as $$
declare
    s text[] := tat._statements(cmd);
begin
    if cardinality(s) > 1 then
        raise exception using errcode = '42601', message = 'tat.alter takes exactly one statement',
            detail = format('More text follows the first ";": %L.', left(s[2], 40));
    end if;
    return coalesce(s[1], '');
end
$$;

-- The name of the table an ALTER TABLE command works on, quoted and as
-- written (qualified or not), for the caller to resolve: NULL for an empty
-- command. Raises 42601 when more than one statement is given or the name
-- cannot be parsed, 0A000 when the command is not an ALTER TABLE.
-- (Earlier versions resolved the name here, without a pinned search_path:
-- the caller's search_path could then replace the functions it calls.)
drop function if exists tat._command_table(text);
create or replace function tat._command_table_name(cmd text) returns text
language plpgsql immutable set search_path = pg_catalog, pg_temp
as $$
declare
    stmts text[];
    k     int;
    s     text;
    p     int;
    m     text[];
    parts text[];
begin
    if cmd is null or btrim(cmd, E' \t\r\n\f;') = '' then
        return null;
    end if;
    -- Several statements are accepted when they all alter the same table
    -- (as several -c of the pg_tat CLI): tatd applies them together.
    stmts := tat._statements(cmd);
    for k in 2 .. coalesce(cardinality(stmts), 0) loop
        begin
            s := tat._command_table_name(stmts[k]);
        exception when others then
            s := null;
        end;
        if s is null or s is distinct from tat._command_table_name(stmts[1]) then
            raise exception using errcode = '42601',
                message = 'tat.alter takes exactly one statement (or several ALTER TABLE statements of one table)',
                detail = format('Statement %s is %L.', k, left(stmts[k], 60));
        end if;
    end loop;
    s := coalesce(stmts[1], '');
    -- skip leading blanks and comments
    loop
        s := ltrim(s, E' \t\r\n\f');
        if left(s, 2) = '--' then
            p := strpos(s, E'\n');
            s := case when p = 0 then '' else substr(s, p + 1) end;
        elsif left(s, 2) = '/*' then
            p := strpos(s, '*/');
            s := case when p = 0 then '' else substr(s, p + 2) end;
        else
            exit;
        end if;
    end loop;
    m := regexp_match(s, '^alter\s+table\s+(.*)$', 'i');
    if m is null then
        raise exception using errcode = '0A000',
            message = 'tat.alter only runs ALTER TABLE commands',
            detail = format('The command starts with %L.', left(s, 40)),
            hint = 'Pass one statement of the form ALTER TABLE name ...';
    end if;
    s := m[1];
    s := regexp_replace(s, '^if\s+exists\s+', '', 'i');
    s := regexp_replace(s, '^only\s+', '', 'i');
    if s ~* '^all\s+in\s+tablespace' then
        raise exception using errcode = '0A000', message = 'tat.alter does not run ALTER TABLE ALL IN TABLESPACE';
    end if;
    begin
        parts := parse_ident(s, false);
    exception when others then
        raise exception using errcode = '42601',
            message = format('cannot read the table name in %L', left(s, 60)),
            detail = sqlerrm;
    end;
    return (select string_agg(quote_ident(x), '.' order by o) from unnest(parts) with ordinality as u(x, o));
end
$$;

-- Default and validated options. Raises 22023 on unknown keys or bad values;
-- returns every option, canonicalised.
create or replace function tat._resolve_options(opts jsonb) returns jsonb
language plpgsql stable set search_path = pg_catalog, pg_temp
as $$
declare
    defaults jsonb := jsonb_build_object(
        'capture', 'trigger', 'copy_data_jobs', 2, 'create_index_jobs', 2, 'batch_size', 10000,
        'lock_timeout', '00:00:00.2', 'time_between_locks', '00:00:02', 'min_delta_rows', 1000,
        'work_mem', null, 'maintenance_work_mem', null, 'max_parallel_maintenance_workers', null,
        'switch', 'auto', 'skip_fk_validation', false,
        'max_replica_lag', null, 'max_active_sessions', null, 'throttle_query', null,
        'verify', true, 'vacuum_freeze', false, 'copy_data_filter', null,
        'command_before_switch', null, 'command_after_switch', null, 'catchup_timeout', '01:00:00',
        'partial_mode', false, 'keep_old', null);
    o        jsonb;
    unknown  text;
    v_capture text; v_cdj int; v_cij int; v_batch int; v_lt interval; v_tbl interval;
    v_mdr bigint; v_wm text; v_mwm text; v_mpmw int; v_switch text; v_skip boolean;
    v_mrl interval; v_mas int; v_tq text;
    v_verify boolean; v_freeze boolean; v_filter text; v_before text; v_after text; v_cto interval;
    v_partial boolean;
    v_keep interval;
begin
    if opts is null or jsonb_typeof(opts) <> 'object' then
        opts := '{}';
    end if;
    select string_agg(k, ', ' order by k) into unknown
    from jsonb_object_keys(opts) k where not defaults ? k;
    if unknown is not null then
        raise exception using errcode = '22023', message = format('unknown option(s): %s', unknown);
    end if;
    o := defaults || opts;
    begin
        v_capture := o->>'capture';
        v_cdj := (o->>'copy_data_jobs')::int;
        v_cij := (o->>'create_index_jobs')::int;
        v_batch := (o->>'batch_size')::int;
        v_lt := (o->>'lock_timeout')::interval;
        v_tbl := (o->>'time_between_locks')::interval;
        v_mdr := (o->>'min_delta_rows')::bigint;
        v_wm := o->>'work_mem';
        v_mwm := o->>'maintenance_work_mem';
        v_mpmw := (o->>'max_parallel_maintenance_workers')::int;
        v_switch := o->>'switch';
        v_skip := (o->>'skip_fk_validation')::boolean;
        v_mrl := (o->>'max_replica_lag')::interval;
        v_mas := (o->>'max_active_sessions')::int;
        v_tq := nullif(btrim(o->>'throttle_query'), '');
        v_verify := (o->>'verify')::boolean;
        v_freeze := (o->>'vacuum_freeze')::boolean;
        v_filter := nullif(btrim(o->>'copy_data_filter'), '');
        v_before := nullif(btrim(o->>'command_before_switch'), '');
        v_after := nullif(btrim(o->>'command_after_switch'), '');
        v_cto := (o->>'catchup_timeout')::interval;
        v_partial := (o->>'partial_mode')::boolean;
        v_keep := (o->>'keep_old')::interval;
    exception when others then
        raise exception using errcode = '22023', message = format('invalid option value: %s', sqlerrm);
    end;
    if v_capture is null or v_capture not in ('trigger', 'logical') then
        raise exception using errcode = '22023',
            message = format('capture must be ''trigger'' or ''logical'', not %s', coalesce(quote_literal(v_capture), 'NULL'));
    end if;
    if v_switch is null or v_switch not in ('auto', 'manual') then
        raise exception using errcode = '22023',
            message = format('switch must be ''auto'' or ''manual'', not %s', coalesce(quote_literal(v_switch), 'NULL'));
    end if;
    if v_cdj is null or v_cdj < 1 then
        raise exception using errcode = '22023', message = format('copy_data_jobs must be at least 1, not %s', coalesce(v_cdj::text, 'NULL'));
    end if;
    if v_cij is null or v_cij < 1 then
        raise exception using errcode = '22023', message = format('create_index_jobs must be at least 1, not %s', coalesce(v_cij::text, 'NULL'));
    end if;
    if v_batch is null or v_batch < 1 then
        raise exception using errcode = '22023', message = format('batch_size must be at least 1, not %s', coalesce(v_batch::text, 'NULL'));
    end if;
    if v_lt is null or v_lt <= interval '0' then
        raise exception using errcode = '22023', message = format('lock_timeout must be positive, not %s', coalesce(v_lt::text, 'NULL'));
    end if;
    if v_tbl is null or v_tbl < interval '0' then
        raise exception using errcode = '22023', message = format('time_between_locks must not be negative, not %s', coalesce(v_tbl::text, 'NULL'));
    end if;
    if v_mdr is null or v_mdr < 0 then
        raise exception using errcode = '22023', message = format('min_delta_rows must not be negative, not %s', coalesce(v_mdr::text, 'NULL'));
    end if;
    if v_wm is not null and v_wm !~* '^\s*\d+\s*(B|kB|MB|GB|TB)?\s*$' then
        raise exception using errcode = '22023', message = format('work_mem must be a memory size such as ''64MB'', not %L', v_wm);
    end if;
    if v_mwm is not null and v_mwm !~* '^\s*\d+\s*(B|kB|MB|GB|TB)?\s*$' then
        raise exception using errcode = '22023', message = format('maintenance_work_mem must be a memory size such as ''1GB'', not %L', v_mwm);
    end if;
    if v_mpmw is not null and (v_mpmw < 0 or v_mpmw > 1024) then
        raise exception using errcode = '22023', message = format('max_parallel_maintenance_workers must be between 0 and 1024, not %s', v_mpmw);
    end if;
    if v_skip is null then
        raise exception using errcode = '22023', message = 'skip_fk_validation must not be NULL';
    end if;
    if v_cto is null or v_cto <= interval '0' then
        raise exception using errcode = '22023', message = format('catchup_timeout must be positive, not %s', coalesce(v_cto::text, 'NULL'));
    end if;
    if v_verify is null or v_freeze is null or v_partial is null then
        raise exception using errcode = '22023', message = 'verify, vacuum_freeze and partial_mode must not be NULL';
    end if;
    -- copy_data_filter is checked by tatd with the PostgreSQL parser (one
    -- boolean expression); the switch commands run with the caller's rights.
    if v_keep is not null and v_keep <= interval '0' then
        raise exception using errcode = '22023', message = format('keep_old must be positive (or NULL: the old table is dropped at the switch), not %s', v_keep);
    end if;
    if v_mrl is not null and v_mrl <= interval '0' then
        raise exception using errcode = '22023', message = format('max_replica_lag must be positive (or NULL for no limit), not %s', v_mrl);
    end if;
    if v_mas is not null and v_mas < 1 then
        raise exception using errcode = '22023', message = format('max_active_sessions must be at least 1 (or NULL for no limit), not %s', v_mas);
    end if;
    if v_tq is not null then
        begin
            v_tq := tat._single_statement(v_tq);
        exception when others then
            raise exception using errcode = '22023', message = format('throttle_query: %s', sqlerrm);
        end;
        if v_tq !~* '^\s*(select|with|values|table)\M' then
            raise exception using errcode = '22023',
                message = 'throttle_query must be one query returning a boolean, such as ''select count(*) > 100 from pg_stat_activity''';
        end if;
    end if;
    return jsonb_build_object(
        'capture', v_capture, 'copy_data_jobs', v_cdj, 'create_index_jobs', v_cij, 'batch_size', v_batch,
        'lock_timeout', v_lt::text, 'time_between_locks', v_tbl::text, 'min_delta_rows', v_mdr,
        'work_mem', v_wm, 'maintenance_work_mem', v_mwm, 'max_parallel_maintenance_workers', v_mpmw,
        'switch', v_switch, 'skip_fk_validation', v_skip,
        'max_replica_lag', v_mrl::text, 'max_active_sessions', v_mas, 'throttle_query', v_tq,
        'verify', v_verify, 'vacuum_freeze', v_freeze, 'copy_data_filter', v_filter,
        'command_before_switch', v_before, 'command_after_switch', v_after, 'catchup_timeout', v_cto::text,
        'partial_mode', v_partial, 'keep_old', v_keep::text);
end
$$;

-- ---------------------------------------------------------------------------
-- triggers on tat.migrations
-- ---------------------------------------------------------------------------

-- The options that make tatd run SQL text of the caller inside its own
-- sessions: a role that is not a superuser may not set them (42501).
create or replace function tat._refuse_caller_sql(options jsonb) returns void
language plpgsql stable security invoker set search_path = pg_catalog, pg_temp
as $$
declare
    given text;
begin
    if exists (select from pg_roles where rolname = current_user and rolsuper) then
        return;
    end if;
    select string_agg(k, ', ' order by k) into given
      from unnest(array['throttle_query', 'command_before_switch', 'command_after_switch']) k
     where nullif(btrim(options->>k), '') is not null;
    if given is not null then
        raise exception using errcode = '42501',
            message = format('only a superuser may set %s: tatd would run this SQL inside its own sessions, '
                             'where the SET ROLE that holds it to your rights can be undone (RESET ROLE); '
                             'ask a superuser to queue the job, or run the pg_tat command-line tool with your own credentials',
                             given),
            detail = format('Role %s is not a superuser. throttle_query runs in tatd''s session; command_before_switch and '
                            'command_after_switch run in the switch transaction of tatd''s role.', current_user),
            hint = 'Without these options: run the statements yourself before and after the job (switch => ''manual'' and tat.switch '
                   'let you choose the moment), and throttle with max_replica_lag or max_active_sessions.';
    end if;
end
$$;

-- BEFORE INSERT, invoker rights: current_user is the caller's current role.
-- The table name of the command resolves with the caller's search_path, as
-- the ALTER TABLE itself would: that one call is all that runs with it, and
-- every name in it is schema-qualified (the caller's search_path could put
-- her own functions or operators before pg_catalog's). Everything else is
-- checked by tat._migrations_check, whose search_path is pinned.
create or replace function tat._migrations_before_insert() returns trigger
language plpgsql security invoker
as $$
begin
    new.table_oid := pg_catalog.to_regclass(tat._command_table_name(new.command));
    return tat._migrations_check(new);
end
$$;

-- Validates the command and options of a new job (its table_oid resolved
-- by the trigger above) and sets every column the caller cannot write.
-- Invoker rights: current_user is the caller's current role.
create or replace function tat._migrations_check(j tat.migrations) returns tat.migrations
language plpgsql volatile security invoker set search_path = pg_catalog, pg_temp
as $$
declare
    cls    record;
    active record;
begin
    if j.command is null or btrim(j.command, E' \t\r\n\f;') = '' then
        raise exception using errcode = '22023', message = 'command must not be empty';
    end if;
    j.command := array_to_string(tat._statements(j.command), E';\n');
    select c.oid, c.relkind, c.relpersistence, c.relowner, n.nspname, c.relname
      into cls
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = j.table_oid;
    if cls.oid is null then
        raise exception using errcode = '42P01',
            message = format('relation "%s" does not exist', tat._command_table_name(j.command));
    end if;
    if cls.relkind not in ('r', 'p') then
        raise exception using errcode = '42809',
            message = format('"%s" is not a table', cls.relname),
            detail = 'tat.alter migrates plain and partitioned tables only.';
    end if;
    if cls.relpersistence = 't' then
        raise exception using errcode = '0A000', message = 'tat.alter cannot migrate temporary tables';
    end if;
    if cls.nspname in ('pg_catalog', 'information_schema', 'tat') or cls.nspname like 'pg\_toast%' then
        raise exception using errcode = '0A000',
            message = format('tat.alter does not migrate tables in schema %s', cls.nspname);
    end if;
    if not pg_has_role(current_user, cls.relowner, 'MEMBER') then
        raise exception using errcode = '42501',
            message = format('must be owner of table %s', cls.relname),
            detail = format('Role %s is not a member of the owner of %I.%I.', current_user, cls.nspname, cls.relname);
    end if;
    j.options := tat._resolve_options(j.options);
    perform tat._refuse_caller_sql(j.options);
    if j.options->>'capture' = 'logical' then
        perform tat._check_logical_capture();
    end if;
    -- the caller owns the table, so row level security shows her every job
    -- on it (a job it hides, e.g. queued before a rename of the table, still
    -- trips the unique index migrations_one_active_per_table)
    select m.id, m.state into active
      from tat.migrations m
     where m.table_oid = cls.oid and m.state in ('queued', 'running', 'paused', 'waiting_switch', 'kept')
     order by m.id limit 1;
    if active.id is not null then
        raise exception using errcode = '55006',
            message = format('table %I.%I already has an active migration (id %s, %s)',
                             cls.nspname, cls.relname, active.id, active.state),
            hint = format('Wait for it (select tat.wait(%s)) or cancel it (select tat.cancel(%s)).', active.id, active.id);
    end if;

    j.table_oid := cls.oid;
    j.table_name := format('%I.%I', cls.nspname, cls.relname);
    j.capture := j.options->>'capture';
    j.requested_by := current_user;
    j.state := 'queued';
    j.phase := null;
    j.switch_requested := false;
    j.cancel_requested := false;
    j.pause_requested := false;
    j.rows_copied := 0;
    j.rows_total := null;
    j.delta_backlog := null;
    j.lock_attempts := 0;
    j.runner := null;
    j.attempts := 0;
    j.created_at := now();
    j.started_at := null;
    j.updated_at := now();
    j.finished_at := null;
    j.error := null;
    j.error_phase := null;
    j.throttle_reason := null;
    j.capture_lag_bytes := null;
    j.capture_lag := null;
    j.rows_per_second := null;
    j.rate_rows := null;
    j.rate_at := null;
    j.phase_started_at := null;
    -- remembered until the end of this transaction (reverted with a rolled
    -- back subtransaction): tat.wait refuses to wait for these jobs, which
    -- tatd cannot see before COMMIT
    perform set_config('tat.uncommitted_jobs',
                       concat_ws(',', nullif(current_setting('tat.uncommitted_jobs', true), ''), j.id::text), true);
    return j;
end
$$;

-- AFTER INSERT, definer rights: records the event and wakes tatd (the notify
-- is delivered at COMMIT).
create or replace function tat._migrations_after_insert() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
begin
    insert into tat.events (job, phase, message)
    values (new.id, null, format('queued by %s: %s', new.requested_by, new.command));
    perform tat._notify(new.id::text);
    return null;
end
$$;

select tat._insert_trigger('tat.migrations', 'migrations_before_insert', 'before', 'tat._migrations_before_insert');
select tat._insert_trigger('tat.migrations', 'migrations_after_insert', 'after', 'tat._migrations_after_insert');

-- ---------------------------------------------------------------------------
-- triggers on tat.requests
-- ---------------------------------------------------------------------------

-- BEFORE INSERT, invoker rights: stamps the caller, checks it may control the
-- job (it must see it through row level security) or owns the table (cleanup).
create or replace function tat._requests_before_insert() returns trigger
language plpgsql security invoker set search_path = pg_catalog, pg_temp
as $$
declare
    cls record;
begin
    -- PUBLIC may not write requested_by (column privileges): only the owner
    -- of schema tat can give it, which _requests_after_insert does for the
    -- cleanup that follows a cancel (in its own definer rights, current_user
    -- would be the owner, not the caller)
    new.requested_by := coalesce(new.requested_by, current_user);
    new.at := now();
    new.runner := null;
    new.finished_at := null;
    new.error := null;
    if new.action is null or new.action not in ('cancel', 'pause', 'resume', 'switch', 'cleanup', 'set', 'revert', 'finish') then
        raise exception using errcode = '22023', message = format('unknown action %L', new.action);
    end if;
    if new.action = 'set' then
        if new.option is null or new.option not in ('batch_size', 'copy_data_jobs', 'lock_timeout', 'time_between_locks',
                                                     'max_replica_lag', 'max_active_sessions', 'throttle_query') then
            raise exception using errcode = '22023',
                message = format('tat.set cannot change option %s', coalesce(quote_literal(new.option), 'NULL')),
                hint = 'Settable: batch_size, copy_data_jobs, lock_timeout, time_between_locks, max_replica_lag, max_active_sessions, throttle_query.';
        end if;
        -- removing a throttle query (NULL) is allowed to whoever controls the job
        perform tat._refuse_caller_sql(jsonb_build_object(new.option, new.value));
    else
        new.option := null;
        new.value := null;
    end if;
    if new.action = 'cleanup' then
        new.job := null;
        select c.oid, c.relowner, c.relkind, n.nspname, c.relname into cls
          from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = new.table_oid;
        if cls.oid is null then
            raise exception using errcode = '42P01', message = format('relation with OID %s does not exist', new.table_oid);
        end if;
        if not pg_has_role(current_user, cls.relowner, 'MEMBER') then
            raise exception using errcode = '42501', message = format('must be owner of table %s', cls.relname);
        end if;
        new.table_name := format('%I.%I', cls.nspname, cls.relname);
        new.state := 'queued';
        return new;
    end if;
    -- job actions: the caller must see the job (row level security decides)
    select m.table_oid, m.table_name into new.table_oid, new.table_name
      from tat.migrations m where m.id = new.job;
    if not found then
        raise exception using errcode = 'P0002',
            message = format('migration %s does not exist', coalesce(new.job::text, 'NULL')),
            hint = 'A role sees the migrations it requested and those on tables it owns.';
    end if;
    new.state := 'done';
    return new;
end
$$;

-- Does a live tatd hold job id (its session advisory lock, see
-- sqlapi.AdvisoryLockClass)?
create or replace function tat._runner_alive(id bigint) returns boolean
language sql stable security definer set search_path = pg_catalog, pg_temp
as $$
    select exists (select from pg_locks l
                   where l.locktype = 'advisory' and l.granted and l.database = (select oid from pg_database where datname = current_database())
                     and l.classid = 7627124::oid and l.objid = ((_runner_alive.id % 4294967296))::oid and l.objsubid = 2)
$$;

-- AFTER INSERT, definer rights: applies the request.
create or replace function tat._requests_after_insert() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp
as $$
declare
    m      tat.migrations;
    active record;
    cid    bigint;
    opts   jsonb;
    msg    text;
begin
    if new.action = 'cleanup' then
        select * into active from tat._active_job(new.table_oid);
        if active.id is not null then
            raise exception using errcode = '55006',
                message = format('table %s has an active migration (id %s, %s); cancel it instead',
                                 new.table_name, active.id, active.state);
        end if;
        perform tat._notify('cleanup:' || new.id);
        return null;
    end if;

    select * into m from tat.migrations where id = new.job for update;
    if not tat._may_control(new.requested_by, m.requested_by, m.table_oid, m.table_name) then
        raise exception using errcode = '42501', message = format('permission denied for migration %s', new.job);
    end if;

    msg := format('%s requested by %s', new.action, new.requested_by);
    case new.action
    when 'cancel' then
        if m.state in ('done', 'cancelled', 'reverted') then
            raise exception using errcode = '55000', message = format('migration %s is already %s', m.id, m.state);
        elsif m.state = 'kept' then
            raise exception using errcode = '55000', message = format('migration %s has switched and keeps the old table', m.id),
                hint = 'End it with tat.finish (drop the old table) or tat.revert (switch back to it).';
        elsif m.state in ('running', 'waiting_switch')
              or (m.state = 'paused' and m.runner is not null and tat._runner_alive(m.id)) then
            -- its runner (or the one that takes it over) stops it and drops the shadow objects
            update tat.migrations set cancel_requested = true, updated_at = now() where id = m.id;
        else
            -- queued, paused, failed: nobody runs it; drop leftovers through a cleanup request
            update tat.migrations
               set state = 'cancelled', cancel_requested = true, finished_at = now(), updated_at = now()
             where id = m.id;
            if m.state <> 'queued' then
                insert into tat.requests (action, table_oid, table_name, requested_by, state)
                values ('cleanup', m.table_oid, m.table_name, new.requested_by, 'queued')
                returning id into cid;
                perform tat._notify('cleanup:' || cid);
            end if;
        end if;
    when 'pause' then
        if m.state = 'queued' then
            update tat.migrations set state = 'paused', updated_at = now() where id = m.id;
        elsif m.state in ('running', 'waiting_switch') then
            -- the runner holds at its next safe point and reports state paused;
            -- it keeps the job (and its advisory lock)
            update tat.migrations set pause_requested = true, updated_at = now() where id = m.id;
        elsif m.state <> 'paused' then
            raise exception using errcode = '55000', message = format('migration %s is %s and cannot be paused', m.id, m.state);
        end if;
    when 'resume' then
        if m.state = 'paused' and m.runner is not null then
            -- held by its runner (or its runner died while it was paused: the
            -- state running lets another tatd take it over)
            update tat.migrations set state = 'running', pause_requested = false, updated_at = now() where id = m.id;
        elsif m.state in ('paused', 'failed') then
            select * into active from tat._active_job(m.table_oid);
            if active.id is not null and active.id <> m.id then
                raise exception using errcode = '55006',
                    message = format('table %s has another active migration (id %s)', m.table_name, active.id);
            end if;
            update tat.migrations
               set state = 'queued', pause_requested = false, error = null, error_phase = null,
                   finished_at = null, updated_at = now()
             where id = m.id;
        elsif m.state in ('running', 'waiting_switch') and m.pause_requested then
            update tat.migrations set pause_requested = false, updated_at = now() where id = m.id;
        elsif m.state not in ('queued', 'running', 'waiting_switch') then
            raise exception using errcode = '55000', message = format('migration %s is %s and cannot be resumed', m.id, m.state);
        end if;
    when 'switch' then
        if m.state not in ('queued', 'running', 'paused', 'waiting_switch') then
            raise exception using errcode = '55000', message = format('migration %s is %s; nothing to switch', m.id, m.state);
        end if;
        update tat.migrations set switch_requested = true, updated_at = now() where id = m.id;
    when 'revert' then
        -- keep_old: the runner switches back to the kept old table
        if m.state <> 'kept' and not (m.state in ('queued', 'running', 'paused', 'waiting_switch') and m.options->>'keep_old' is not null) then
            raise exception using errcode = '55000', message = format('migration %s is %s and keeps no old table to revert to', m.id, m.state),
                hint = 'Only a migration started with keep_old can be reverted, until tat.finish or the end of its keep_old window.';
        end if;
        if m.revert_blocked is not null then
            raise exception using errcode = '55000', message = format('migration %s cannot be reverted: %s', m.id, m.revert_blocked),
                detail = 'A value written to the new table since the switch cannot be converted back to the old table; the new table is unaffected.',
                hint = 'tat.finish drops the old table.';
        end if;
        update tat.migrations set revert_requested = true, updated_at = now() where id = m.id;
    when 'finish' then
        if m.state <> 'kept' then
            raise exception using errcode = '55000', message = format('migration %s is %s and keeps no old table', m.id, m.state);
        end if;
        update tat.migrations set finish_requested = true, updated_at = now() where id = m.id;
    when 'set' then
        if m.state not in ('queued', 'running', 'paused', 'waiting_switch') then
            raise exception using errcode = '55000', message = format('migration %s is %s; its options can no longer change', m.id, m.state);
        end if;
        if new.option = 'throttle_query' and nullif(btrim(new.value), '') is not null
           and not exists (select from pg_roles where rolname = m.requested_by and rolsuper) then
            -- tatd runs it as the job's requester (see tat._refuse_caller_sql)
            raise exception using errcode = '42501',
                message = format('throttle_query can only be set on jobs queued by a superuser: migration %s was queued by %s, '
                                 'and tatd would run the query as that role inside its own session, where SET ROLE can be undone',
                                 m.id, m.requested_by),
                hint = 'Throttle with max_replica_lag or max_active_sessions instead.';
        end if;
        opts := tat._resolve_options(m.options || jsonb_build_object(new.option, new.value));
        update tat.migrations set options = opts, updated_at = now() where id = m.id;
        msg := format('%s set to %s by %s%s', new.option, coalesce(opts->>new.option, 'NULL (no limit)'), new.requested_by,
                      case when new.option = 'copy_data_jobs' and m.state <> 'queued'
                           then ' (takes effect when the job is resumed or taken over)' else '' end);
    end case;

    insert into tat.events (job, phase, message) values (m.id, m.phase, msg);
    if new.action = 'resume' then
        perform tat._notify(m.id::text);
    else
        perform tat._notify(new.action || ':' || m.id);
    end if;
    return null;
end
$$;

select tat._insert_trigger('tat.requests', 'requests_before_insert', 'before', 'tat._requests_before_insert');
select tat._insert_trigger('tat.requests', 'requests_after_insert', 'after', 'tat._requests_after_insert');

-- ---------------------------------------------------------------------------
-- row level security: a role sees its own jobs and jobs on tables it owns
-- ---------------------------------------------------------------------------
-- The policies apply to roles that read the tables themselves. They do not
-- apply through the views below (a view reads its tables with the rights of
-- its owner, who bypasses them): each view filters on its own.
alter table tat.migrations enable row level security;
alter table tat.events enable row level security;
do $$
begin
    -- earlier versions: tat._may_control(current_user, requested_by, table_oid)
    if not exists (select from pg_policy where polrelid = 'tat.migrations'::regclass and polname = 'migrations_visible'
                   and pg_get_expr(polqual, polrelid) like '%table_name%') then
        drop policy if exists migrations_visible on tat.migrations;
        create policy migrations_visible on tat.migrations for select
            using (tat._may_control(current_user, requested_by, table_oid, table_name));
    end if;
    if not exists (select from pg_policy where polrelid = 'tat.migrations'::regclass and polname = 'migrations_insert') then
        -- validation lives in the BEFORE INSERT trigger
        create policy migrations_insert on tat.migrations for insert with check (true);
    end if;
    -- the timeline of the jobs the role sees (tat.migrations' policy applies
    -- to the subquery too), or of every job with the monitoring grant
    if not exists (select from pg_policy where polrelid = 'tat.events'::regclass and polname = 'events_visible') then
        create policy events_visible on tat.events for select
            using ((select tat._sees_all())
                   or exists (select from tat.migrations m
                              where m.id = job and tat._may_control(current_user, m.requested_by, m.table_oid, m.table_name)));
    end if;
end
$$;
drop function if exists tat._may_control(name, name, oid);

-- ---------------------------------------------------------------------------
-- API
-- ---------------------------------------------------------------------------

-- Queues one ALTER TABLE; returns the job id. The job becomes visible to
-- tatd when the caller's transaction commits.
-- (Earlier versions had no throttling arguments; their signature is dropped
-- so that calls do not become ambiguous.)
drop function if exists tat.alter(text, text, int, int, int, interval, interval, bigint, text, text, int, text, boolean);
drop function if exists tat.alter(text, text, int, int, int, interval, interval, bigint, text, text, int, text, boolean,
                                  interval, int, text);
drop function if exists tat.alter(text, text, int, int, int, interval, interval, bigint, text, text, int, text, boolean,
                                  interval, int, text, boolean, text, text, text, boolean);
drop function if exists tat.alter(text, text, int, int, int, interval, interval, bigint, text, text, int, text, boolean,
                                  interval, int, text, boolean, text, text, text, boolean, interval);
drop function if exists tat.alter(text, text, int, int, int, interval, interval, bigint, text, text, int, text, boolean,
                                  interval, int, text, boolean, text, text, text, boolean, interval, boolean);
create or replace function tat.alter(
    command text,
    capture text default 'trigger',
    copy_data_jobs int default 2,
    create_index_jobs int default 2,
    batch_size int default 10000,
    lock_timeout interval default '200ms',
    time_between_locks interval default '2s',
    min_delta_rows bigint default 1000,
    work_mem text default null,
    maintenance_work_mem text default null,
    max_parallel_maintenance_workers int default null,
    switch text default 'auto',
    skip_fk_validation boolean default false,
    max_replica_lag interval default null,
    max_active_sessions int default null,
    throttle_query text default null,
    verify boolean default true,
    copy_data_filter text default null,
    command_before_switch text default null,
    command_after_switch text default null,
    vacuum_freeze boolean default false,
    catchup_timeout interval default '1 hour',
    partial_mode boolean default false,
    keep_old interval default null
) returns bigint
language plpgsql volatile security invoker  -- caller's search_path resolves the table
as $$
declare
    v_id bigint;
begin
    insert into tat.migrations (command, options)
    values (alter.command, jsonb_build_object(
        'capture', alter.capture,
        'copy_data_jobs', alter.copy_data_jobs,
        'create_index_jobs', alter.create_index_jobs,
        'batch_size', alter.batch_size,
        'lock_timeout', alter.lock_timeout::text,
        'time_between_locks', alter.time_between_locks::text,
        'min_delta_rows', alter.min_delta_rows,
        'work_mem', alter.work_mem,
        'maintenance_work_mem', alter.maintenance_work_mem,
        'max_parallel_maintenance_workers', alter.max_parallel_maintenance_workers,
        'switch', alter.switch,
        'skip_fk_validation', alter.skip_fk_validation,
        'max_replica_lag', alter.max_replica_lag::text,
        'max_active_sessions', alter.max_active_sessions,
        'throttle_query', alter.throttle_query,
        'verify', alter.verify,
        'copy_data_filter', alter.copy_data_filter,
        'command_before_switch', alter.command_before_switch,
        'command_after_switch', alter.command_after_switch,
        'vacuum_freeze', alter.vacuum_freeze,
        'catchup_timeout', alter.catchup_timeout::text,
        'partial_mode', alter.partial_mode,
        'keep_old', alter.keep_old::text))
    returning id into v_id;
    return v_id;
exception when unique_violation then
    -- a concurrent tat.alter on the same table won the race
    raise exception using errcode = '55006',
        message = 'the table already has an active migration',
        detail = sqlerrm;
end
$$;

create or replace function tat.cancel(id bigint) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job) values ('cancel', cancel.id) $$;

create or replace function tat.pause(id bigint) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job) values ('pause', pause.id) $$;

create or replace function tat.resume(id bigint) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job) values ('resume', resume.id) $$;

create or replace function tat.switch(id bigint) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job) values ('switch', switch.id) $$;

-- keep_old (tat.alter(..., keep_old => interval '1 hour')): after the switch
-- the job is in state kept; the old table is kept as T__tat_old and every
-- write to the new table is applied to it (by tatd, never in the writer's
-- transaction) through the inverse of the ALTER. tat.status shows
-- kept_table, revert_backlog (writes not yet applied to it), kept_until
-- (when it is dropped) and revert_blocked (a written row that cannot go
-- back, and why; the revert is then impossible).
--   tat.revert(id): one short cut-over back to the old table (the same
--     lock_timeout and retries and dependents as the switch); state reverted.
--     Refused (55000) when the job keeps no old table or revert_blocked is set.
--   tat.finish(id): drops the old table and the reverse capture now (the end
--     of the keep_old window does the same); state done.
create or replace function tat.revert(id bigint) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job) values ('revert', revert.id) $$;

create or replace function tat.finish(id bigint) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job) values ('finish', finish.id) $$;

-- Changes an option of a queued or running job; the runner applies it within
-- a second at its next safe point. Options and values:
--   batch_size int >= 1, lock_timeout interval > 0, time_between_locks
--   interval >= 0 (live); copy_data_jobs int >= 1 (the copy workers are
--   started once: the new value applies when the job is resumed or taken
--   over); max_replica_lag interval, max_active_sessions int, throttle_query
--   text (a query returning boolean, run as the requester of the job in a
--   read-only transaction; set only by a superuser, on a job a superuser
--   queued: 42501) -- NULL removes the limit (anyone who controls the job).
create or replace function tat.set(id bigint, option text, value text) returns void
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, job, option, value) values ('set', set.id, set.option, set.value) $$;

-- Queues the removal of the leftovers of a failed run on tbl (shadow table,
-- delta table, capture trigger); tatd runs it. Returns the request id.
create or replace function tat.cleanup(tbl regclass) returns bigint
language sql volatile security invoker set search_path = pg_catalog, pg_temp
as $$ insert into tat.requests (action, table_oid) values ('cleanup', tbl) returning id $$;

-- Blocks until the job ends; returns its final state ('done'). Raises when
-- the job failed or was cancelled (with its error), and 57014 on timeout.
-- Call it after the transaction that queued the job has committed: called in
-- that same transaction it raises 25001 at once (tatd cannot see the job
-- before COMMIT, so it would wait forever).
create or replace function tat.wait(id bigint, timeout interval default null) returns text
language plpgsql volatile security invoker set search_path = pg_catalog, pg_temp
as $$
declare
    deadline timestamptz := case when timeout is null then null else clock_timestamp() + timeout end;
    m        record;
begin
    if wait.id::text = any(string_to_array(current_setting('tat.uncommitted_jobs', true), ',')) then
        raise exception using errcode = '25001',
            message = format('migration %s was queued by this transaction and cannot be waited for in it', wait.id),
            detail = 'tatd sees the job only after COMMIT; waiting here would never end.',
            hint = 'Commit first, then call tat.wait in a new transaction (in migration tools: a separate migration, or a step without a transaction).';
    end if;
    loop
        -- each statement of a READ COMMITTED plpgsql function takes a new snapshot
        select s.state, s.error, s.error_phase into m from tat.migrations s where s.id = wait.id;
        if not found then
            raise exception using errcode = 'P0002', message = format('migration %s does not exist', wait.id);
        end if;
        if m.state in ('done', 'kept', 'reverted') then
            -- kept: switched, the old table kept (keep_old)
            return m.state;
        elsif m.state = 'failed' then
            raise exception using errcode = 'P0001',
                message = format('migration %s failed in phase %s: %s', wait.id, coalesce(m.error_phase, '?'), m.error);
        elsif m.state = 'cancelled' then
            raise exception using errcode = 'P0001', message = format('migration %s was cancelled', wait.id);
        end if;
        if deadline is not null and clock_timestamp() >= deadline then
            raise exception using errcode = '57014',
                message = format('timeout waiting for migration %s (state %s)', wait.id, m.state);
        end if;
        perform pg_sleep(0.2);
    end loop;
end
$$;

-- ---------------------------------------------------------------------------
-- views
-- ---------------------------------------------------------------------------
-- Every role may read them (PUBLIC) and sees in each exactly the jobs it may
-- control: those it (or a role it is a member of) requested and those on
-- tables it owns (tat._may_control); superusers and the roles given the
-- monitoring grant (tat._sees_all) see every job. A view reads its tables
-- with its owner's rights, bypassing their row level security, but calls
-- functions with the querying role's, so the filter is in each view, on
-- current_user (security_invoker views would need PostgreSQL 15). They are
-- security barriers: a condition of the caller (say, a cheap function that
-- raises its argument) is not evaluated before the view's own filter.

-- Time spent in each phase, from the timeline (a job resumed after a crash
-- or a pause has a row per attempt of a phase).
create or replace view tat.phase_timings with (security_barrier) as
select b.job,
       b.phase,
       b.at as started_at,
       b.ended_at,
       coalesce(b.ended_at, clock_timestamp()) - b.at as duration
  from (select e.job, e.id, e.phase, e.message, e.at,
               coalesce(lead(e.at) over (partition by e.job order by e.id),
                        (select m.finished_at from tat.migrations m where m.id = e.job)) as ended_at
          from tat.events e
         where e.message like 'phase %'
            or e.message in ('done', 'cancelled', 'paused')
            or e.message like 'failed: %'
            or e.message like 'interrupted %') b
 where b.message like 'phase %'
   and ((select tat._sees_all())
        or exists (select from tat.migrations m
                   where m.id = b.job and tat._may_control(current_user, m.requested_by, m.table_oid, m.table_name)));
comment on view tat.phase_timings is 'pg_tat: start, end and duration of each phase of each job';

create or replace view tat.status with (security_barrier) as
select m.id,
       m.table_name,
       m.command,
       m.state,
       m.phase,
       (case when m.state = 'done' then 100
             when coalesce(m.rows_total, 0) > 0 then least(100, round(100.0 * m.rows_copied / m.rows_total, 1))
             else 0 end)::numeric as progress,
       m.rows_copied,
       m.rows_total,
       r.rows_per_second,
       (case when m.state in ('running', 'waiting_switch') and r.rows_per_second > 0 and m.rows_total > m.rows_copied
             then make_interval(secs => round((m.rows_total - m.rows_copied) / r.rows_per_second)::double precision)
        end) as eta,
       m.delta_backlog,
       m.capture,
       m.lock_attempts,
       m.started_at,
       m.updated_at,
       m.finished_at,
       m.error,
       m.error_phase,
       m.requested_by,
       m.runner,
       m.switch_requested,
       m.options,
       m.created_at,
       (case when m.state in ('running', 'paused', 'waiting_switch')
             then coalesce(m.throttle_reason,
                           case when m.pause_requested and m.state <> 'paused' then 'pause requested' end)
        end) as throttle_reason,
       m.capture_lag_bytes,
       (select jsonb_object_agg(t.phase, round(t.seconds, 1))
          from (select p.phase, sum(extract(epoch from p.duration))::numeric as seconds
                  from tat.phase_timings p where p.job = m.id group by p.phase) t) as phase_timings,
       (case when m.state in ('running', 'paused', 'waiting_switch')
             then date_trunc('second', now() - m.phase_started_at) end) as phase_elapsed,
       m.pause_requested,
       m.attempts,
       (case when m.state in ('running', 'paused', 'waiting_switch') then date_trunc('milliseconds', m.capture_lag) end) as capture_lag,
       m.kept_table,
       m.revert_backlog,
       m.keep_until as kept_until,
       m.revert_blocked
  from tat.migrations m
  cross join lateral (
      select case
             -- live: a smoothed rate of the last samples written by the runner
             when m.state in ('running', 'paused', 'waiting_switch') then round(m.rows_per_second, 1)
             -- finished: the average over the run
             when m.started_at is not null and m.rows_copied > 0
                  and extract(epoch from coalesce(m.finished_at, m.updated_at, now()) - m.started_at) > 0
             then round(m.rows_copied / extract(epoch from coalesce(m.finished_at, m.updated_at, now()) - m.started_at)::numeric, 1)  -- extract() is double precision before 14
             end::numeric as rows_per_second
  ) r
 where (select tat._sees_all()) or tat._may_control(current_user, m.requested_by, m.table_oid, m.table_name);
comment on view tat.status is 'pg_tat: one row per migration with live progress';

-- A compact view for psql's \watch 1: active jobs and those finished in the last hour.
create or replace view tat.progress with (security_barrier) as
select s.id,
       s.table_name as "table",
       s.state,
       s.phase,
       s.progress as "%",
       format('%s/%s', s.rows_copied, coalesce(s.rows_total::text, '?')) as rows,
       s.rows_per_second::bigint as "rows/s",
       s.eta,
       s.delta_backlog as backlog,
       pg_size_pretty(s.capture_lag_bytes) as lag,
       s.lock_attempts as locks,
       left(coalesce(s.error, s.throttle_reason, ''), 48) as note
  from tat.status s
 where s.state in ('queued', 'running', 'paused', 'waiting_switch', 'kept')
    or s.finished_at > now() - interval '1 hour'
 order by s.id;
comment on view tat.progress is 'pg_tat: compact live progress (select * from tat.progress \watch 1)';

create or replace view tat.errors with (security_barrier) as
select m.id,
       m.id as job,
       m.table_name,
       m.command,
       m.error_phase as phase,
       m.error,
       m.finished_at as at,
       m.requested_by
  from tat.migrations m
 where (m.state = 'failed' or (m.error is not null and m.state = 'cancelled'))
   and ((select tat._sees_all()) or tat._may_control(current_user, m.requested_by, m.table_oid, m.table_name));
comment on view tat.errors is 'pg_tat: failed jobs with their error and the phase it happened in';

-- ---------------------------------------------------------------------------
-- privileges (see the block at the top)
-- ---------------------------------------------------------------------------
revoke all on all tables in schema tat from public;
revoke all on all sequences in schema tat from public;
revoke all on all functions in schema tat from public;

grant select on tat.migrations to public;                 -- filtered by row level security
grant select on tat.events to public;                     -- filtered by row level security
grant select on tat.status, tat.progress, tat.errors, tat.phase_timings to public;  -- filtered by the views
grant insert (command, options) on tat.migrations to public;
grant insert (action, job, table_oid) on tat.requests to public;
grant select (id) on tat.requests to public;              -- for tat.cleanup's RETURNING id

grant execute on function tat.alter(text, text, int, int, int, interval, interval, bigint, text, text, int, text, boolean,
                                    interval, int, text, boolean, text, text, text, boolean, interval, boolean, interval) to public;
grant insert (option, value) on tat.requests to public;
grant execute on function tat.cancel(bigint), tat.pause(bigint), tat.resume(bigint), tat.switch(bigint),
                          tat.set(bigint, text, text), tat.revert(bigint), tat.finish(bigint),
                          tat.cleanup(regclass), tat.wait(bigint, interval) to public;
-- helpers the invoker-rights code calls
-- (and the views, the policies, which call functions as the querying role)
grant execute on function tat._may_control(name, name, oid, text), tat._sees_all(),
                          tat._statements(text), tat._single_statement(text), tat._command_table_name(text),
                          tat._migrations_check(tat.migrations), tat._refuse_caller_sql(jsonb),
                          tat._resolve_options(jsonb), tat._check_logical_capture() to public;
