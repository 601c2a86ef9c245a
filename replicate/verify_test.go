package replicate_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// A shadow row corrupted on purpose is found by verify, recopied, and the
// result equals the original; without verify the corruption would land.
func TestVerifyFindsCorruption(t *testing.T) {
	t.Parallel()
	// A USING expression: the copy checksums its batches and verify trusts
	// them where nothing changed. A plain type change: the copy takes no
	// checksum and verify hashes the original whole.
	for _, c := range []struct{ name, cmd, control, how string }{
		{"using", "alter table orders alter column n type bigint using n * 2", "(select id, v, n * 2 as n from control) c", "hashed again"},
		{"plain", "alter table orders alter column n type bigint", "control", "hashed whole, side by side"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.seed("orders", "control", 20000)
			e.exec("analyze orders")
			w := e.startWriter(2, "orders", "control", 22000)
			o := opts(c.cmd)
			o.Verify = true
			var once sync.Once
			o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
				var err error
				if point == "verify" {
					once.Do(func() {
						_, err = tx.Exec(ctx, "update orders__tat_new set v = 'corrupt' where id in (select id from orders__tat_new order by id limit 3)")
					})
				}
				return err
			}
			rep := &eventLog{}
			o.StopBeforeSwitch = true
			err := runWith(e, o, rep)
			w.Stop(t)
			if err != nil {
				t.Fatal(err)
			}
			joined := rep.String()
			if !strings.Contains(joined, "differs") || !strings.Contains(joined, "verified equal") || !strings.Contains(joined, c.how) {
				t.Fatalf("verify did not find and fix the corruption (%s):\n%s", c.how, joined)
			}
			sums := e.str("select count(*) from orders__tat_state where src_sum is not null")
			if (c.name == "plain") != (sums == "0") {
				t.Fatalf("%s ranges with a copy checksum", sums)
			}
			o.StopBeforeSwitch, o.Continue, o.TestHook = false, true, nil
			if err := e.run(o); err != nil {
				t.Fatal(err)
			}
			e.assertSame("orders", c.control, "id, v, n")
			if e.str("select count(*) from orders where v = 'corrupt'") != "0" {
				t.Fatal("corruption landed")
			}
		})
	}
}

// A column type without a hash function (json) makes verify fall back to
// hashing the rows' text; it still proves equality.
func TestVerifyWithUnhashableColumn(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec(`create table j (id int primary key, doc json); insert into j select g, json_build_object('g', g) from generate_series(1, 3000) g`)
	o := opts("alter table j alter column id type bigint")
	o.Verify = true
	var verified bool
	rep := reporterFunc(func(_, msg string) {
		if strings.Contains(msg, "verified equal") {
			verified = true
		}
	})
	if err := runWith(e, o, rep); err != nil {
		t.Fatal(err)
	}
	if !verified {
		t.Fatal("verify did not report")
	}
}

// In an inheritance tree every table is verified on its own rows through
// its own columns: a child's shadow corrupted in a column of its own (which
// the root does not see) and another child's shadow missing rows are both
// found, recopied into that child's shadow only, and every table ends up
// equal to its control, under a writer on the child with its own column.
func TestVerifyInheritanceTree(t *testing.T) {
	t.Parallel()
	// Under logical capture the keys streamed after verify's snapshot are
	// re-read per table too (the delta's rel says which).
	forEachCapture(t, func(t *testing.T, capture string) {
		e := newEnv(t)
		e.exec(`create table ih (id int primary key, v text, n int);
			create table ih_a (extra int default 3, primary key (id)) inherits (ih);
			create table ih_b (primary key (id)) inherits (ih);
			insert into ih select g, md5(g::text), g from generate_series(1, 3000) g;
			insert into ih_a select g, md5(g::text), g, g % 100 from generate_series(1, 5000) g;
			insert into ih_b select g, md5(g::text), g from generate_series(2001, 6000) g;
			create table c_ih as select * from only ih;
			create table c_ih_a (id int primary key, v text, n int, extra int default 3);
			insert into c_ih_a select * from only ih_a;
			create table c_ih_b as select * from only ih_b`)
		w := e.startWriter(2, "ih_a", "c_ih_a", 5500)
		o := captureOpts(capture, "alter table ih alter column n type bigint using n * 2")
		o.Verify = true
		var once sync.Once
		o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
			var err error
			if point == "verify" {
				once.Do(func() {
					_, err = tx.Exec(ctx, `update ih_a__tat_new set extra = -1 where id in (select id from only ih_a__tat_new order by id limit 3);
						delete from ih_b__tat_new where id in (select id from ih_b__tat_new order by id limit 2)`)
				})
			}
			return err
		}
		var events []string
		var mu sync.Mutex
		rep := reporterFunc(func(phase, msg string) { mu.Lock(); events = append(events, phase+": "+msg); mu.Unlock() })
		o.StopBeforeSwitch = true
		err := runWith(e, o, rep)
		w.Stop(t)
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		joined := strings.Join(events, "\n")
		mu.Unlock()
		wants := []string{`"ih_a" differs`, `"ih_b" differs`, "verified equal"}
		if capture == replicate.CaptureLogical {
			wants = append(wants, "streamed after verify's snapshot")
		}
		for _, want := range wants {
			if !strings.Contains(joined, want) {
				t.Fatalf("verify did not report %q:\n%s", want, joined)
			}
		}
		if strings.Contains(joined, `"ih" differs`) {
			t.Fatalf("the root's shadow was not corrupted, yet verify recopied it:\n%s", joined)
		}
		o.StopBeforeSwitch, o.Continue, o.TestHook = false, true, nil
		if err := e.run(o); err != nil {
			t.Fatal(err)
		}
		e.assertSame("(select id, v, n from only ih) x", "(select id, v, n * 2 as n from c_ih) y", "*")
		e.assertSame("(select id, v, n, extra from only ih_a) x", "(select id, v, n * 2 as n, extra from c_ih_a) y", "*")
		e.assertSame("(select id, v, n from only ih_b) x", "(select id, v, n * 2 as n from c_ih_b) y", "*")
		if e.str("select count(*) from ih_a where extra = -1") != "0" {
			t.Fatal("corruption landed")
		}
		e.assertNoLeftovers("ih")
		e.assertNoLeftovers("ih_a")
	})
}

// Verify trusts the checksums the copy took of ranges no captured change
// has touched, hashes the others again from the original, and never
// trusts a stored checksum over the shadow: a range whose stored checksum
// is wrong (as after a copy bug) is found, recopied and, marked, hashed
// from the original in the next round.
func TestVerifyUsesCopyChecksums(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("vc", "c_vc", 8000)
	e.exec("analyze vc")
	o := opts("alter table vc alter column n type bigint using n * 2")
	var events []string
	var mu sync.Mutex
	rep := reporterFunc(func(phase, msg string) { mu.Lock(); events = append(events, phase+": "+msg); mu.Unlock() })
	verified := func() string {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		for i := len(events) - 1; i >= 0; i-- {
			if strings.Contains(events[i], "verified equal") {
				return events[i]
			}
		}
		t.Fatalf("verify did not report:\n%s", strings.Join(events, "\n"))
		return ""
	}
	// Nothing changed since the copy: no range is read from the original.
	o.StopBeforeSwitch = true
	if err := runWith(e, o, rep); err != nil {
		t.Fatal(err)
	}
	ranges := e.str("select count(*) from vc__tat_state")
	if ranges == "1" {
		t.Fatal("one copy range: the test needs several")
	}
	if v := verified(); !strings.Contains(v, "in "+ranges+" ranges (0 hashed again") {
		t.Fatalf("verify read the original although nothing changed: %s", v)
	}
	// Changes to one range (captured): that range alone is hashed again.
	e.exec("update vc set v = 'changed' where id <= 5; update c_vc set v = 'changed' where id <= 5")
	// A wrong stored checksum of the last range (a copy that inserted what
	// it did not hash): the totals differ, the range is found and recopied.
	e.exec("update vc__tat_state set src_sum = src_sum + 1 where range_id = (select max(range_id) from vc__tat_state)")
	events = nil
	o.Continue = true
	if err := runWith(e, o, rep); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	joined := strings.Join(events, "\n")
	mu.Unlock()
	if !strings.Contains(joined, "differs") {
		t.Fatalf("a wrong stored checksum went unnoticed:\n%s", joined)
	}
	if strings.Contains(joined, "range 0 differs") {
		t.Fatalf("the changed range differs: its mark was lost:\n%s", joined)
	}
	if v := verified(); !strings.Contains(v, "(2 hashed again") {
		t.Fatalf("want the changed and the recopied range hashed again: %s", v)
	}
	o.StopBeforeSwitch = false
	if err := e.run(o); err != nil {
		t.Fatal(err)
	}
	e.assertSame("vc", "(select id, v, n * 2 as n from c_vc) c", "id, v, n")
}

// Under logical capture the stream lags the table: at verify's snapshot,
// changes already committed are not in the delta yet. Verify waits for the
// stream to pass a marker emitted after its snapshot and re-reads, in the
// snapshot, the keys the stream brought since: under writers that never
// stop, no range looks different (a false difference would be recopied
// round after round and fail the job), a real corruption still is found,
// and the result equals the control.
func TestVerifyLogicalUnderWriter(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	e := newEnv(t)
	e.seed("orders", "control", 20000)
	e.exec("analyze orders")
	w := e.startWriter(3, "orders", "control", 22000)
	o := logicalOpts("alter table orders alter column n type bigint")
	o.Verify = true
	var rounds int
	o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
		if point != "verify" {
			return nil
		}
		rounds++
		if rounds == 2 {
			// The second run's first round: a real difference.
			_, err := tx.Exec(ctx, "update orders__tat_new set v = 'corrupt' where id in (select id from orders__tat_new order by id limit 2)")
			return err
		}
		return nil
	}
	rep := &eventLog{}
	joined := rep.String
	// First run: writers all along, no corruption.
	o.StopBeforeSwitch = true
	if err := runWith(e, o, rep); err != nil {
		w.Stop(t)
		t.Fatal(err)
	}
	first := joined()
	if !strings.Contains(first, "verified equal") {
		w.Stop(t)
		t.Fatalf("verify did not run under logical capture:\n%s", first)
	}
	if strings.Contains(first, "differs") {
		w.Stop(t)
		t.Fatalf("changes not streamed at verify's snapshot looked like differences:\n%s", first)
	}
	if !strings.Contains(first, "streamed after verify's snapshot") {
		w.Stop(t)
		t.Fatalf("no change streamed after the snapshot under three writers (the test proves nothing):\n%s", first)
	}
	// Second run: the corruption is found and recopied.
	rep.reset()
	o.Continue = true
	if err := runWith(e, o, rep); err != nil {
		w.Stop(t)
		t.Fatal(err)
	}
	w.Stop(t)
	if second := joined(); !strings.Contains(second, "differs") || !strings.Contains(second, "verified equal") {
		t.Fatalf("verify did not find the corruption under logical capture:\n%s", second)
	}
	o.StopBeforeSwitch, o.TestHook = false, nil
	if err := runWith(e, o, rep); err != nil {
		t.Fatal(err)
	}
	e.assertSame("orders", "control", "id, v, n")
	e.assertNoLeftovers("orders")
}

// A lock queued on the original behind verify's transaction S (a DDL, a
// VACUUM FULL, a LOCK TABLE waiting for S) would queue verify's second
// session too (hashBoth), which S waits for where PostgreSQL sees no
// deadlock: the second session gives up after its lock wait, the original
// is hashed in S (which holds its lock already), the queued lock is granted
// once S ends, and the job completes.
func TestVerifyLockQueuedBehindSnapshot(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.seed("orders", "control", 30000)
	e.exec("analyze orders") // split into ranges: verify hashes whole only then
	o := opts("alter table orders alter column n type bigint")
	o.Verify, o.CopyDataJobs = true, 2
	queued := make(chan error, 1)
	lock := &onceAt{point: "verify"}
	var s pgx.Tx // verify's transaction S, where the hook point is
	o.TestHook = func(ctx context.Context, point string, tx pgx.Tx) error {
		s = tx
		return lock.hook(ctx, point, tx)
	}
	lock.fn = func(ctx context.Context) error {
		if _, err := s.Exec(ctx, "select 1 from orders limit 1"); err != nil { // S holds ACCESS SHARE
			return err
		}
		go func() {
			queued <- pgx.BeginFunc(context.Background(), e.pool, func(tx pgx.Tx) error {
				_, err := tx.Exec(context.Background(), "lock table orders in access exclusive mode")
				return err
			})
		}()
		for i := 0; i < 200; i++ {
			var waiting bool
			if err := e.pool.QueryRow(ctx, `select exists (select from pg_locks where relation = 'orders'::regclass
				and mode = 'AccessExclusiveLock' and not granted)`).Scan(&waiting); err != nil {
				return err
			}
			if waiting {
				return nil
			}
			time.Sleep(10 * time.Millisecond)
		}
		return errors.New("the ACCESS EXCLUSIVE lock never queued behind S")
	}
	rep := &eventLog{}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := replicate.Run(ctx, e.pool, o, rep, nil)
	if err != nil {
		t.Fatalf("%v\n%s", err, rep)
	}
	lock.check(t)
	if err := <-queued; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(rep.String(), "hashed whole, one after the other") {
		t.Fatalf("verify did not fall back to hashing the original in S:\n%s", rep)
	}
	e.assertSame("orders", "control", "id, v, n")
}
