-- Widen accounts.balance online with pg_tat instead of a plain
-- ALTER TABLE (which would lock and rewrite the table).
--
-- NO TRANSACTION: goose runs each statement on its own (autocommit), so the
-- job queued by tat.alter is committed -- and visible to tatd -- before
-- tat.wait starts waiting. Inside one transaction tat.wait would refuse
-- (SQLSTATE 25001): tatd cannot see the job before COMMIT.

-- +goose NO TRANSACTION
-- +goose Up
select tat.alter('alter table accounts alter column balance type bigint');

-- tat.wait raises (and goose stops, marking this migration not applied)
-- when the job fails, is cancelled or takes longer than the timeout.
select tat.wait(max(id), '10 minutes')
  from tat.migrations where table_name = 'public.accounts';

-- +goose Down
select tat.alter('alter table accounts alter column balance type int');
select tat.wait(max(id), '10 minutes')
  from tat.migrations where table_name = 'public.accounts';
