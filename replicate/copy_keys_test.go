package replicate_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgtat/pg_tat/replicate"
)

// keyTable describes a table whose key is computed from an integer id, so
// a writer can address rows of any key type: keyOf renders the key's
// values for the id given as SQL (e.g. "md5(%s::text)::uuid").
type keyTable struct {
	keyCols string // "k" or "a, b"
	keyDef  string // column definitions of the key
	keyOf   string // the key's values, as SQL of an int expression written %s (no other %)
	hashOn  string // when set, the table is partitioned by hash on this column, in 3 partitions
}

func (k keyTable) vals(id string) string { return strings.ReplaceAll(k.keyOf, "%s", id) }

// create makes table and control with rows rows: key, id, v, n.
func (k keyTable) create(e *env, table, control string, rows int) {
	for _, tb := range []string{table, control} {
		part := ""
		if k.hashOn != "" {
			part = " partition by hash (" + k.hashOn + ")"
		}
		e.exec(fmt.Sprintf(`create table %s (%s, id int not null, v text, n int, primary key (%s))%s`, tb, k.keyDef, k.keyCols, part))
		for i := 0; k.hashOn != "" && i < 3; i++ {
			e.exec(fmt.Sprintf(`create table %s_p%d partition of %[1]s for values with (modulus 3, remainder %[2]d)`, tb, i))
		}
		e.exec(fmt.Sprintf(`insert into %s select %s, g, md5(g::text), g from generate_series(1, %d) g`, tb, k.vals("g"), rows))
	}
}

// startWriter hammers table and, in the same transaction, control with
// inserts, updates, deletes and key updates, until stopped.
func (k keyTable) startWriter(e *env, n int, table, control string, maxID int) *writer {
	w := &writer{stop: make(chan struct{}), table: table}
	id, moved := "$1::int", "$1::int + 1000000"
	stmts := []string{
		fmt.Sprintf("insert into %%[1]s (%s, id, v, n) values (%s, %s, md5(%[3]s::text), %[3]s) on conflict (%[1]s) do update set n = excluded.n + 1",
			k.keyCols, k.vals(id), id),
		fmt.Sprintf("update %%[1]s set n = n + 1, v = v || 'x' where (%s) = (%s)", k.keyCols, k.vals(id)),
		fmt.Sprintf("delete from %%[1]s where (%s) = (%s)", k.keyCols, k.vals(id)),
		fmt.Sprintf("update %%[1]s set (%[1]s) = row(%[2]s), id = %[3]s where (%[1]s) = (%[4]s) and not exists (select 1 from %%[1]s where (%[1]s) = (%[2]s))",
			k.keyCols, k.vals(moved), moved, k.vals(id)),
	}
	for i := 0; i < n; i++ {
		w.done.Add(1)
		go func(seed uint64) {
			defer w.done.Done()
			r := rand.New(rand.NewPCG(seed, 7))
			ctx := context.Background()
			for {
				select {
				case <-w.stop:
					return
				default:
				}
				s := stmts[r.IntN(len(stmts))]
				arg := r.IntN(maxID) + 1
				tx, err := e.pool.Begin(ctx)
				if err != nil {
					w.err.Store(err)
					return
				}
				ok := true
				for _, tb := range []string{table, control} {
					if _, err := tx.Exec(ctx, fmt.Sprintf(s, tb), arg); err != nil {
						ok = false
						break
					}
				}
				if ok {
					if err := tx.Commit(ctx); err == nil {
						w.ops.Add(1)
					}
				} else {
					_ = tx.Rollback(ctx)
				}
				time.Sleep(time.Duration(r.IntN(300)) * time.Microsecond)
			}
		}(uint64(i + 1))
	}
	return w
}

// checksum is what a user would compare: row count and a hash of all rows
// in key order.
func (k keyTable) checksum(e *env, table string) string {
	return e.str(fmt.Sprintf("select count(*) || ' ' || md5(string_agg(t::text, ',' order by %s)) from %s t", k.keyCols, table))
}

var splitEvent = regexp.MustCompile(`key split into (\d+) ranges`)

// runSplit migrates table with copy_data_jobs = jobs under a concurrent
// writer and checks the copy was split, and the result equals control.
func runSplit(t *testing.T, k keyTable, rows, jobs int, capture ...string) {
	e := newEnv(t)
	k.create(e, "t", "control", rows)
	w := k.startWriter(e, 2, "t", "control", rows+rows/10)
	o := opts("alter table t alter column n type bigint")
	o.CopyDataJobs = jobs
	o.BatchSize = 2000
	if capture != nil {
		o.Capture = capture[0]
	}
	o.StopBeforeSwitch = true
	var mu sync.Mutex
	var events []string
	rep := reporterFunc(func(_, msg string) { mu.Lock(); events = append(events, msg); mu.Unlock() })
	if err := runWith(e, o, rep); err != nil {
		w.Stop(t)
		t.Fatal(err)
	}
	// Before the switch the state table shows the ranges and what each
	// copied: several, and every one did its share.
	ranges := e.str("select count(*) from t__tat_state")
	empty := e.str("select count(*) from t__tat_state where rows = 0")
	mu.Lock()
	split := ""
	for _, ev := range events {
		if m := splitEvent.FindStringSubmatch(ev); m != nil {
			split = m[1]
		}
	}
	mu.Unlock()
	o.StopBeforeSwitch, o.Continue = false, true
	err := runWith(e, o, rep)
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(ranges)
	if n < 2 || split != ranges {
		t.Fatalf("copy used %s ranges (event said %q): want several", ranges, split)
	}
	// Under logical capture the checkpoints are not written (a batch runs
	// in the slot's snapshot, older than the state's rows; a logical run
	// starts over rather than resume), so there is no per-range count.
	if empty != "0" && capture == nil {
		t.Errorf("%s of %s ranges copied no row: split points outside the key's range", empty, ranges)
	}
	t.Logf("%s ranges", ranges)
	if got, want := k.checksum(e, "t"), k.checksum(e, "control"); got != want {
		t.Fatalf("t is %s, control %s", got, want)
	}
	e.assertSame("t", "control", "*")
	if got := e.str("select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 't'::regclass and attname = 'n'"); got != "bigint" {
		t.Fatalf("n is %s", got)
	}
	e.assertNoLeftovers("t")
}

var (
	uuidKey = keyTable{keyCols: "k", keyDef: "k uuid", keyOf: "md5((%s)::text)::uuid"}
	// A collation other than the database's (C.UTF-8), on keys the two
	// order differently ('B' < 'a' in C, not in ICU): split points sorted
	// or compared in another collation than the copy's would make ranges
	// overlap or leave gaps, and the copy would fail or differ.
	textKey = keyTable{keyCols: "k", keyDef: `k text collate "und-x-icu"`,
		keyOf: "translate(md5((%s)::text), 'bd', 'BD') || ' ' || (%s)::text"}
	// The first column has many values: its histogram splits.
	compositeKey = keyTable{keyCols: "a, b", keyDef: "a int, b text", keyOf: "(%s) / 37, md5((%s)::text)"}
	// The first column has few values: all are common values, no histogram.
	fewKey = keyTable{keyCols: "a, b", keyDef: "a int, b text", keyOf: "mod(%s, 5), md5((%s)::text)"}
)

func TestCopySplitsUUIDKey(t *testing.T) { t.Parallel(); runSplit(t, uuidKey, 200000, 2) }

// Under logical capture every range's batches read the slot's snapshot.
func TestCopySplitsUUIDKeyLogical(t *testing.T) {
	t.Parallel()
	needsLogical(t)
	runSplit(t, uuidKey, 50000, 2, replicate.CaptureLogical)
}

func TestCopySplitsTextKey(t *testing.T) {
	t.Parallel()
	if e := newEnv(t); e.str(`select count(*) from pg_collation where collname = 'und-x-icu'`) == "0" {
		t.Skip("no ICU collation und-x-icu")
	}
	runSplit(t, textKey, 100000, 4)
}

func TestCopySplitsCompositeKey(t *testing.T) {
	t.Parallel()
	runSplit(t, compositeKey, 100000, 2)
}

// A partitioned table's statistics are its inherited ones.
func TestCopySplitsPartitionedCompositeKey(t *testing.T) {
	t.Parallel()
	k := compositeKey
	k.hashOn = "a"
	runSplit(t, k, 60000, 2)
}

func TestCopySplitsCompositeKeyOnCommonValues(t *testing.T) {
	t.Parallel()
	runSplit(t, fewKey, 30000, 2)
}

// An interrupted copy of a text key split into ranges continues from the
// ranges' checkpoints.
func TestCopyResumesTextKeyRanges(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	k := textKey
	k.keyDef = "k text"
	k.create(e, "t", "control", 30000)
	w := k.startWriter(e, 2, "t", "control", 33000)
	o := opts("alter table t alter column n type bigint")
	o.BatchSize = 200
	o.CopyDataJobs = 2
	ctx, cancel := context.WithCancel(context.Background())
	var batches atomic.Int64
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") && batches.Add(1) == 60 {
			cancel()
		}
	}
	err := replicate.Run(ctx, e.pool, o, replicate.NopReporter{}, nil)
	if !errors.Is(err, context.Canceled) {
		w.Stop(t)
		t.Fatalf("want interruption, got %v", err)
	}
	ranges := e.str("select count(*) from t__tat_state")
	started := e.str("select count(*) from t__tat_state where rows > 0")
	if n, _ := strconv.Atoi(ranges); n < 2 {
		w.Stop(t)
		t.Fatalf("copy used %s ranges: want several", ranges)
	}
	if started == "0" {
		w.Stop(t)
		t.Fatal("no checkpoint recorded")
	}
	batches.Store(0)
	o.Continue = true
	o.ShowQueries = func(sql string) {
		if strings.HasPrefix(sql, "WITH src AS") {
			batches.Add(1)
		}
	}
	err = e.run(o)
	w.Stop(t)
	if err != nil {
		t.Fatal(err)
	}
	// A fresh run takes at least 150 batches (30000 rows by 200).
	if n := batches.Load(); n > 30000/200-40 {
		t.Fatalf("continued run copied %d batches: it started over", n)
	}
	if got, want := k.checksum(e, "t"), k.checksum(e, "control"); got != want {
		t.Fatalf("t is %s, control %s", got, want)
	}
	e.assertNoLeftovers("t")
}
