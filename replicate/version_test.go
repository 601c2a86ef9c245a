package replicate_test

import (
	"context"
	"strings"
	"testing"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// constraints lists the constraints of tables (names separated by blanks) as the catalog has them: name,
// kind, definition, flags. Since PostgreSQL 18 NOT NULL is a pg_constraint
// row (contype 'n') too, with its own name. connoinherit means nothing for
// a partition's PRIMARY KEY or UNIQUE (the engine attaches leaves built on
// their own, as a pg_dump restore does, which leaves it true): not compared.
func (e *env) constraints(tables string) string {
	e.t.Helper()
	return e.str(qConstraints, tables)
}

const qConstraints = `select coalesce(string_agg(x, E'\n' order by x), '') from (
		select format('%s: %s %s %s %s/%s/%s/%s', conrelid::regclass, conname, contype, pg_get_constraintdef(oid),
		condeferrable, condeferred, convalidated, case when contype in ('p', 'u') then '-' else connoinherit::text end)
		from pg_constraint where conrelid::regclass::text = any(string_to_array($1, ' '))) c(x)`

// inPlace runs cmd in place in a transaction that is rolled back and returns
// the constraints it would leave: what the online run must leave too.
func (e *env) inPlace(cmd, tables string) string {
	e.t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck
	if _, err := tx.Exec(ctx, cmd); err != nil {
		e.t.Fatalf("%s: %v", cmd, err)
	}
	var s string
	if err := tx.QueryRow(ctx, qConstraints, tables).Scan(&s); err != nil {
		e.t.Fatal(err)
	}
	return s
}

// The swap keeps every constraint's name and definition, NOT NULL included,
// without pg_dump (which the matrix lacks for servers newer than Debian's).
func TestSwapKeepsConstraintNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table p (id int primary key);
		insert into p select generate_series(1, 100);
		create table c (id int primary key, a int not null, b int not null, n int check (n >= 0),
			p int constraint c_p_fk references p, u int, constraint c_u_key unique (u));
		insert into c select g, g, g, g, 1 + g % 100, g from generate_series(1, 500) g`)
	if testpg.Version(t) >= 180000 {
		// A NOT NULL constraint with a name of its own, a NOT VALID one, and
		// NOT ENFORCED check and foreign key constraints.
		e.exec(`alter table c alter column b drop not null;
			alter table c add constraint c_b_named not null b;
			alter table c add column d int;
			alter table c add constraint c_d_nn not null d not valid;
			alter table c add constraint c_a_unenforced check (a < 0) not enforced;
			alter table c add constraint c_u_fk foreign key (u) references p not enforced`)
	}
	// SET NOT NULL and ADD COLUMN ... NOT NULL name new constraints (18+)
	// after the table, as in place.
	const cmd = "alter table c alter column n type bigint, alter column u set not null, add column e int not null default 1"
	want := e.inPlace(cmd, "c")
	if err := e.run(opts(cmd)); err != nil {
		t.Fatal(err)
	}
	after := e.constraints("c")
	if want != after {
		t.Fatalf("constraints differ from the in-place ALTER:\nwant:\n%s\ngot:\n%s", want, after)
	}
	if !strings.Contains(after, "c_p_fk") {
		t.Fatalf("no foreign key:\n%s", after)
	}
	e.assertNoLeftovers("c")
}

// The same for a partitioned table: the partitions' constraints (NOT NULL
// ones included, 18+) keep their names.
func TestSwapKeepsPartitionConstraintNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table pt (id int not null, k int not null, v int check (v >= 0), primary key (id, k)) partition by list (k);
		create table pt_1 partition of pt for values in (1);
		create table pt_2 partition of pt for values in (2);
		insert into pt select g, 1 + g % 2, g from generate_series(1, 500) g`)
	const tables = "pt pt_1 pt_2"
	const cmd = "alter table pt alter column v type bigint, alter column v set not null"
	want := e.inPlace(cmd, tables)
	if err := e.run(opts(cmd)); err != nil {
		t.Fatal(err)
	}
	if got := e.constraints(tables); want != got {
		t.Fatalf("constraints differ from the in-place ALTER:\nwant:\n%s\ngot:\n%s", want, got)
	}
}
