package replicate_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"
)

// TestRandomized mixes a random DML stream with a random supported ALTER
// and random engine settings, then checks equality with the control. The
// seed is printed; TAT_SEED=<seed> reproduces a run.
func TestRandomized(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TAT_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		seed = v
	}
	rounds := 3
	if testing.Short() {
		rounds = 1
	}
	// transform: the result depends on values at the switch, so the writer
	// is stopped before it (two-step run); otherwise it writes through it.
	alters := []struct {
		command, cols, ctrl string
		transform           bool
	}{
		{"alter table orders alter column id type bigint", "id, v, n", "id, v, n", false},
		{"alter table orders alter column n type numeric(20,2) using n / 4.0", "id, v, n", "id, v, round(n / 4.0, 2)", true},
		{"alter table orders add column x int default 42, alter column v type varchar", "id, v, n, x", "id, v, n, 42", false},
		{"alter table orders move column v before id", "id, v, n", "id, v, n", false},
		{"alter table orders alter column v set not null, alter column n type bigint", "id, v, n", "id, v, n", false},
		{"alter table orders set (fillfactor = 70), alter column n type int8", "id, v, n", "id, v, n", false},
		{"alter table orders set unlogged", "id, v, n", "id, v, n", false},
	}
	for round := 0; round < rounds; round++ {
		rs := seed + uint64(round)
		r := rand.New(rand.NewPCG(rs, 7))
		a := alters[r.IntN(len(alters))]
		t.Run(fmt.Sprintf("seed=%d", rs), func(t *testing.T) {
			t.Parallel()
			t.Logf("TAT_SEED=%d: %s", rs, a.command)
			e := newEnv(t)
			rows := 1000 + r.IntN(8000)
			e.seed("orders", "control", rows)
			o := opts(a.command)
			o.BatchSize = 50 + r.IntN(2000)
			o.CopyDataJobs = 1 + r.IntN(3)
			o.MinDeltaRows = int64(r.IntN(200))
			o.LockTimeout = time.Duration(20+r.IntN(300)) * time.Millisecond
			o.Verify = r.IntN(2) == 0
			w := e.startWriter(1+r.IntN(3), "orders", "control", rows+rows/5)
			time.Sleep(time.Duration(r.IntN(200)) * time.Millisecond)
			o.StopBeforeSwitch = a.transform
			err := e.run(o)
			w.Stop(t)
			if err == nil && a.transform {
				o.StopBeforeSwitch, o.Continue = false, true
				err = e.run(o)
			}
			if err != nil {
				t.Fatalf("TAT_SEED=%d: %v", rs, err)
			}
			e.assertSame(fmt.Sprintf("(select %s from orders) a", a.cols), fmt.Sprintf("(select %s from control) b", a.ctrl), "*")
			e.assertNoLeftovers("orders")
		})
	}
}
