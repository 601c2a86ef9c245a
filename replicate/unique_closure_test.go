package replicate_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/replicate"
)

// Unique values rotating between rows while the job runs: writers keep
// moving the values of UNIQUE columns around three rows at a time (a gets
// b's, b gets c's, c gets a's, through a temporary value: the constraints
// are immediate), with tiny batches so that the catch-up applies slices that
// cut through the rotations, and with logical capture a delta that lags the
// original. The apply must never collide (no fallback to the whole delta:
// the conflict closure re-reads the rows whose values moved), the job must
// succeed, and the table must equal its control.
func TestIntegrityUniqueRotation(t *testing.T) {
	cases := []struct {
		name   string
		ddl    string // %s: the table; run for the table and its control
		cmd    string
		rows   int
		cols   []string // rotated together
		temp   string   // frees a's values
		same   string   // columns compared with the control
		unique []string // FROM t ... GROUP BY: groups that must have one row
	}{
		{
			// UNIQUE on one column (retyped by the ALTER), on two, and a
			// partial one.
			name: "plain",
			ddl: `create table %[1]s (id int primary key, u int not null unique, p int not null, q int not null,
				r int, v text, n int, unique (p, q));
				create unique index on %[1]s (r) where r > 0;
				insert into %[1]s select g, g, g %% 50, g / 50, case when g %% 3 = 0 then -1 else g end, md5(g::text), 0
				from generate_series(1, 2000) g`,
			cmd:  "alter table t alter column u type bigint",
			rows: 2000, cols: []string{"u", "p", "q", "r"}, temp: "u = -u, p = -1 - p, r = null",
			same:   "id, u::bigint, p, q, r, v, n",
			unique: []string{"group by u", "group by p, q", "where r > 0 group by r"},
		},
		{
			// UNIQUE on the partitioned table (with the partition key).
			name: "partitioned",
			ddl: `create table %[1]s (id int not null, region int not null, u int not null, v text, n int,
				primary key (id, region), unique (u, region)) partition by list (region);
				create table %[1]s_r0 partition of %[1]s for values in (0);
				create table %[1]s_r1 partition of %[1]s for values in (1);
				insert into %[1]s select g, g %% 2, g, md5(g::text), 0 from generate_series(1, 2000) g`,
			cmd:  "alter table t alter column n type bigint",
			rows: 2000, cols: []string{"u"}, temp: "u = -u",
			same:   "id, region, u, v, n::int",
			unique: []string{"group by u, region"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			forEachCapture(t, func(t *testing.T, capture string) {
				e := newEnv(t)
				tables := []string{"t", "control"}
				for _, tb := range tables {
					e.exec(fmt.Sprintf(tc.ddl, tb))
				}
				ctx := context.Background()
				cols := strings.Join(tc.cols, ", ")
				params := make([]string, len(tc.cols))
				for i := range params {
					params[i] = fmt.Sprintf("$%d", i+2)
				}
				set := fmt.Sprintf("update %%s set (%s) = row(%s), n = n + 1 where id = $1", cols, strings.Join(params, ", "))
				rotate := func(tx pgx.Tx, ids [3]int) error {
					vals := map[int][]any{}
					rows, err := tx.Query(ctx, fmt.Sprintf("select id, %s from t where id = any($1) order by id for update", cols), ids[:])
					if err != nil {
						return err
					}
					for rows.Next() {
						v, err := rows.Values()
						if err != nil {
							return err
						}
						vals[int(v[0].(int32))] = v[1:]
					}
					if err := rows.Err(); err != nil {
						return err
					}
					if len(vals) != 3 {
						return fmt.Errorf("rows %v: found %d", ids, len(vals))
					}
					a, b, c := ids[0], ids[1], ids[2]
					for _, tb := range tables {
						steps := []struct {
							sql  string
							args []any
						}{
							{fmt.Sprintf("update %s set %s where id = $1", tb, tc.temp), []any{a}},
							{fmt.Sprintf(set, tb), append([]any{c}, vals[a]...)},
							{fmt.Sprintf(set, tb), append([]any{b}, vals[c]...)},
							{fmt.Sprintf(set, tb), append([]any{a}, vals[b]...)},
						}
						for _, s := range steps {
							if _, err := tx.Exec(ctx, s.sql, s.args...); err != nil {
								return fmt.Errorf("%s: %w", s.sql, err)
							}
						}
					}
					return nil
				}
				// Two rotators on disjoint halves of the table (no deadlocks).
				// They stop by themselves some rotations into the catch-up:
				// unbounded, they can outpace a catch-up of 20-row slices (as
				// on a fast server), which then never ends.
				stop := make(chan struct{})
				var wg sync.WaitGroup
				var rotations atomic.Int64
				var before atomic.Int64
				const duringCatchup = 400
				var lastErr atomic.Value
				for w := 0; w < 2; w++ {
					wg.Add(1)
					go func(w int) {
						defer wg.Done()
						r := rand.New(rand.NewPCG(uint64(w+1), 11))
						half := tc.rows / 2
						for {
							select {
							case <-stop:
								return
							default:
							}
							// Three rows of one half with the same parity (the
							// same region when partitioned by id % 2).
							par := r.IntN(2)
							pick := func() int { return w*half + 1 + 2*r.IntN(half/2) + par }
							ids := [3]int{pick(), pick(), pick()}
							if ids[0] == ids[1] || ids[1] == ids[2] || ids[0] == ids[2] {
								continue
							}
							// A failure (the switch changed the table under
							// the statement cache) is retried with new rows.
							if err := pgx.BeginFunc(ctx, e.pool, func(tx pgx.Tx) error { return rotate(tx, ids) }); err != nil {
								lastErr.Store(err)
								continue
							}
							if b := before.Load(); b > 0 && rotations.Add(1)-b >= duringCatchup {
								return
							} else if b == 0 {
								rotations.Add(1)
							}
						}
					}(w)
				}
				stopRotators := func() {
					select {
					case <-stop:
					default:
						close(stop)
					}
					wg.Wait()
				}
				defer stopRotators()

				o := captureOpts(capture, tc.cmd)
				o.BatchSize = 2 // the catch-up applies slices of 20 delta rows
				o.CopyDataJobs = 1
				// A backlog of rotations for the catch-up to apply in slices.
				st := atStages(nil, func() {
					before.Store(rotations.Load())
					time.Sleep(500 * time.Millisecond)
				})
				o.ShowQueries = st.show
				ev := &events{}
				err := runWith(e, o, ev)
				stopRotators()
				during := rotations.Load() - before.Load()
				t.Logf("%d rotations, %d from the catch-up on; last writer error: %v", rotations.Load(), during, lastErr.Load())
				if err != nil {
					t.Fatalf("job failed: %v\nevents:\n%s", err, strings.Join(ev.msgs, "\n"))
				}
				st.check(t)
				if during < 10 {
					t.Fatalf("only %d rotations during the catch-up: the test proves nothing", during)
				}
				if ev.has("collided") {
					t.Errorf("a slice of the delta collided with a unique index (the closure should have re-read the moved rows)\nevents:\n%s",
						strings.Join(ev.msgs, "\n"))
				}
				e.assertSame("t", "control", tc.same)
				for _, q := range tc.unique {
					if n := e.str("select count(*) from (select 1 from t " + q + " having count(*) > 1) d"); n != "0" {
						t.Errorf("%s: %s duplicated values", q, n)
					}
				}
				e.assertNothingLeft("t")
				if capture == replicate.CaptureLogical && !ev.has("replication slot") {
					t.Errorf("logical capture did not run\nevents:\n%s", strings.Join(ev.msgs, "\n"))
				}
			})
		})
	}
}
