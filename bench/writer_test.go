package bench

import (
	"context"
	"math"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sample is one writer transaction: when it was due (or started), when it
// completed, whether it succeeded.
type sample struct {
	start, end time.Time
	ok         bool
}

// writer runs pgbench-style single-row transactions on table t: 90 % UPDATE
// of a random existing row, 10 % INSERT of a new row. Each client has its own
// connection. With rate > 0 the clients together aim at rate transactions a
// second on a fixed schedule, and latency is measured from the scheduled
// start (no coordinated omission: a stall counts in full for every
// transaction that should have run meanwhile); with rate 0 they run flat out.
type writer struct {
	url     string
	clients int
	rate    int
	rows    int64

	nextID  atomic.Int64
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	samples []sample
	errs    atomic.Int64
	lastErr atomic.Value
	inserts atomic.Int64 // committed inserts
	balance atomic.Int64 // sum of committed balance changes
}

func startWriter(ctx context.Context, url string, clients, rate int, rows int64) (*writer, error) {
	w := &writer{url: url, clients: clients, rate: rate, rows: rows, stop: make(chan struct{})}
	w.nextID.Store(rows + 1)
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		c, err := pgx.Connect(ctx, url)
		if err != nil {
			for _, c := range conns[:i] {
				c.Close(ctx)
			}
			return nil, err
		}
		conns[i] = c
	}
	for i, c := range conns {
		w.wg.Add(1)
		go w.client(c, i)
	}
	return w, nil
}

func (w *writer) client(c *pgx.Conn, id int) {
	defer w.wg.Done()
	ctx := context.Background()
	defer c.Close(ctx)
	rng := rand.New(rand.NewPCG(uint64(id)+1, 42))
	local := make([]sample, 0, 1<<16)
	var interval time.Duration
	next := time.Now()
	if w.rate > 0 {
		interval = time.Duration(float64(time.Second) * float64(w.clients) / float64(w.rate))
		next = next.Add(time.Duration(id) * interval / time.Duration(w.clients))
	}
	for {
		select {
		case <-w.stop:
			w.mu.Lock()
			w.samples = append(w.samples, local...)
			w.mu.Unlock()
			return
		default:
		}
		start := time.Now()
		if w.rate > 0 {
			if d := time.Until(next); d > 0 {
				time.Sleep(d)
			}
			start = next
			next = next.Add(interval)
		}
		var err error
		if rng.IntN(10) == 0 {
			aid := w.nextID.Add(1)
			_, err = c.Exec(ctx, "INSERT INTO t (aid, bid, abalance, filler) VALUES ($1, $2, 0, '')", aid, 1+aid/100000)
			if err == nil {
				w.inserts.Add(1)
			}
		} else {
			delta := rng.Int64N(10001) - 5000
			var tag pgconn.CommandTag
			tag, err = c.Exec(ctx, "UPDATE t SET abalance = abalance + $1 WHERE aid = $2", delta, 1+rng.Int64N(w.rows))
			if err == nil && tag.RowsAffected() == 1 {
				w.balance.Add(delta)
			}
		}
		end := time.Now()
		if err != nil {
			w.errs.Add(1)
			w.lastErr.Store(err.Error())
			if c.IsClosed() {
				nc, cerr := pgx.Connect(ctx, w.url)
				if cerr != nil {
					time.Sleep(100 * time.Millisecond)
					continue
				}
				c = nc
			}
		}
		local = append(local, sample{start: start, end: end, ok: err == nil})
	}
}

func (w *writer) finish() []sample {
	close(w.stop)
	w.wg.Wait()
	sort.Slice(w.samples, func(i, j int) bool { return w.samples[i].end.Before(w.samples[j].end) })
	return w.samples
}

// writerStats is what a DBA wants to know about the application's writes.
type writerStats struct {
	Clients   int     `json:"clients"`
	TargetTPS int     `json:"target_tps"` // 0 = flat out
	TPSBefore float64 `json:"tps_before"`
	TPSDuring float64 `json:"tps_during"`
	TPSAfter  float64 `json:"tps_after"`
	DuringPct float64 `json:"tps_during_pct_of_before"`
	P50MS     float64 `json:"p50_ms_during"`
	P99MS     float64 `json:"p99_ms_during"`
	MaxMS     float64 `json:"max_ms_during"`
	MaxGapMS  float64 `json:"max_gap_ms_during"`
	StallMS   float64 `json:"longest_stall_ms"`
	P99Before float64 `json:"p99_ms_before"`
	SwitchMS  float64 `json:"max_ms_in_switch"` // worst latency of a transaction overlapping the switch phase
	Errors    int64   `json:"errors"`
	LastError string  `json:"last_error,omitempty"`
	WALBefore float64 `json:"wal_bytes_per_write_before"`
	WALDuring float64 `json:"wal_bytes_per_write_during"` // all WAL during the migration / writes
	CPUBefore float64 `json:"host_cpu_busy_pct_before"`
	CPUDuring float64 `json:"host_cpu_busy_pct_during"`
	Writes    int     `json:"writes_during"`
	// WALExtra is the WAL per write that the capture adds: (WAL of the run
	// under the writer - WAL of the same run without writer) / writes - WAL
	// per write before. Filled by the report from the rewrite scenarios.
	WALExtra float64     `json:"capture_wal_bytes_per_write,omitempty"`
	Phases   []phaseStat `json:"phases,omitempty"`
}

// phaseStat is the writer's experience during one phase of the migration.
type phaseStat struct {
	Phase   string  `json:"phase"`
	Seconds float64 `json:"seconds"`
	TPS     float64 `json:"tps"`
	P99MS   float64 `json:"p99_ms"`
	MaxMS   float64 `json:"max_ms"`
	GapMS   float64 `json:"max_gap_ms"`
}

// window counts completed transactions in [a, b).
func window(s []sample, a, b time.Time) []sample {
	i := sort.Search(len(s), func(i int) bool { return !s[i].end.Before(a) })
	j := sort.Search(len(s), func(i int) bool { return !s[i].end.Before(b) })
	return s[i:j]
}

func tps(s []sample, a, b time.Time) float64 {
	n := 0
	for _, x := range window(s, a, b) {
		if x.ok {
			n++
		}
	}
	return float64(n) / b.Sub(a).Seconds()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// latencies returns the sorted latencies of transactions that completed
// in [a, b) plus those that started before b and completed after it.
func latencies(s []sample, a, b time.Time) []time.Duration {
	var out []time.Duration
	for _, x := range s {
		if x.end.Before(a) || !x.start.Before(b) {
			continue
		}
		out = append(out, x.end.Sub(x.start))
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func pct(l []time.Duration, p float64) float64 {
	if len(l) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(l)))) - 1
	return ms(l[max(0, min(i, len(l)-1))])
}

// maxGap is the longest time without any completed transaction that
// overlaps [a, b).
func maxGap(s []sample, a, b time.Time) time.Duration {
	var best time.Duration
	for i := 1; i < len(s); i++ {
		p, q := s[i-1].end, s[i].end
		if q.Before(a) || !p.Before(b) {
			continue
		}
		if d := q.Sub(p); d > best {
			best = d
		}
	}
	return best
}

// latenciesFrom returns the sorted latencies of transactions due in [a, b),
// whenever they completed: those waiting at a for something before it are
// left out.
func latenciesFrom(s []sample, a, b time.Time) []time.Duration {
	var out []time.Duration
	for _, x := range s {
		if !x.start.Before(a) && x.start.Before(b) {
			out = append(out, x.end.Sub(x.start))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// maxGapFrom is the longest time without a completed transaction within
// [a, b): a gap that began before a counts from a only.
func maxGapFrom(s []sample, a, b time.Time) time.Duration {
	var best time.Duration
	for i := 1; i < len(s); i++ {
		p, q := s[i-1].end, s[i].end
		if q.Before(a) || !p.Before(b) {
			continue
		}
		if p.Before(a) {
			p = a
		}
		if q.After(b) {
			q = b
		}
		best = max(best, q.Sub(p))
	}
	return best
}
