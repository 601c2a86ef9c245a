package replicate_test

import (
	"testing"
	"time"
)

func TestAlterTypeUnderWriters(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 20000)
	w := e.startWriter(3, "orders", "control", 25000)
	time.Sleep(200 * time.Millisecond)
	if err := e.run(opts("alter table orders alter column id type bigint")); err != nil {
		w.Stop(t)
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	w.Stop(t)
	if got := e.str(`select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 'orders'::regclass and attname = 'id'`); got != "bigint" {
		t.Fatalf("id is %s", got)
	}
	if got := e.str(`select pg_get_constraintdef(oid) from pg_constraint where conname = 'orders_pkey'`); got != "PRIMARY KEY (id)" {
		t.Fatalf("orders_pkey: %s", got)
	}
	e.assertSame("orders", "control", "id::bigint, v, n")
	e.assertNoLeftovers("orders")
}
