package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/replicate"
)

const alterCmd = "ALTER TABLE t ALTER COLUMN aid TYPE bigint"

// Knobs (environment):
//
//	BENCH_SIZES=1M,2M,4M   row counts of the rewrite comparison (BENCH_BIG=1 adds 16M)
//	BENCH_REPS=3           repetitions of each rewrite scenario (medians are reported)
//	BENCH_WRITER_ROWS=2M   table size of the concurrent-writer scenarios
//	BENCH_WRITER_RATE=500  target TPS of the fixed-rate writer scenario
//	BENCH_WINDOW=8s        writer measurement window before and after the migration
//	BENCH_VERIFY_SIZES=2M,4M  row counts of BenchmarkVerify (verify off vs on)
func sizes() []int64 {
	spec := os.Getenv("BENCH_SIZES")
	if spec == "" {
		spec = "1M,2M,4M"
		if os.Getenv("BENCH_BIG") == "1" {
			spec += ",16M"
		}
	}
	var out []int64
	for _, s := range strings.Split(spec, ",") {
		if n := parseRows(s); n > 0 {
			out = append(out, n)
		}
	}
	return out
}

func parseRows(s string) int64 {
	s = strings.TrimSpace(strings.ToUpper(s))
	mul := int64(1)
	switch {
	case strings.HasSuffix(s, "M"):
		mul, s = 1_000_000, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "K"):
		mul, s = 1_000, strings.TrimSuffix(s, "K")
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0
	}
	return int64(f * float64(mul))
}

func fmtRows(n int64) string {
	switch {
	case n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n%1_000 == 0:
		return fmt.Sprintf("%dK", n/1_000)
	}
	return fmt.Sprint(n)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func envDur(name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
}

// logicalNA is set once replicate.Run refuses logical capture as not available.
var logicalNA string

// BenchmarkRewrite: the blocking ALTER, a bare-copy floor and the online
// rewrite (trigger and logical capture, copy_data_jobs 1 and 2), each on a
// fresh byte-identical copy of the table, per size.
func BenchmarkRewrite(b *testing.B) {
	reps := max(1, envInt("BENCH_REPS", 3))
	warmUp(b, slices.Max(sizes()))
	for _, n := range sizes() {
		for rep := 1; rep <= reps; rep++ {
			type sc struct {
				method string
				jobs   int
			}
			for _, s := range []sc{{"blocking", 0}, {"floor", 0}, {"trigger", 1}, {"trigger", 2}, {"logical", 1}, {"logical", 2}} {
				name := fmtRows(n) + "/" + s.method
				if s.jobs > 0 {
					name += fmt.Sprintf("/j%d", s.jobs)
				}
				if reps > 1 {
					name += fmt.Sprintf("/rep%d", rep)
				}
				b.Run(name, func(b *testing.B) {
					r := &result{Scenario: "rewrite/" + name, Kind: "rewrite", Rows: n, Method: s.method, CopyJobs: s.jobs, Rep: rep}
					runRewrite(b, r, nil)
				})
			}
		}
	}
}

// warmUp runs one unrecorded blocking ALTER on the largest table, so that
// the first measured scenario does not pay for cold caches and new WAL files.
func warmUp(b *testing.B, n int64) {
	ctx := context.Background()
	t0 := time.Now()
	db, err := freshDB(ctx, n)
	if err != nil {
		b.Fatal(err)
	}
	defer dropDB(db)
	if err := execOn(ctx, db, alterCmd); err != nil {
		b.Fatal(err)
	}
	logf("warm-up (%s rows, not recorded) %.1fs", fmtRows(n), time.Since(t0).Seconds())
}

// BenchmarkWriter: the same rewrite under a concurrent pgbench-style writer.
func BenchmarkWriter(b *testing.B) {
	n := parseRows(os.Getenv("BENCH_WRITER_ROWS"))
	if n <= 0 {
		n = 2_000_000
	}
	rate := envInt("BENCH_WRITER_RATE", 500)
	type sc struct {
		method string
		jobs   int
		rate   int
	}
	for _, s := range []sc{{"blocking", 0, 0}, {"trigger", 1, 0}, {"trigger", 2, 0}, {"logical", 1, 0}, {"blocking", 0, rate}, {"trigger", 1, rate}, {"logical", 1, rate}} {
		mode := "flat-out"
		if s.rate > 0 {
			mode = fmt.Sprintf("%dtps", s.rate)
		}
		name := fmtRows(n) + "/" + mode + "/" + s.method
		if s.jobs > 0 {
			name += fmt.Sprintf("/j%d", s.jobs)
		}
		b.Run(name, func(b *testing.B) {
			r := &result{Scenario: "writer/" + name, Kind: "writer", Rows: n, Method: s.method, CopyJobs: s.jobs,
				Writer: &writerStats{Clients: 2, TargetTPS: s.rate}}
			runRewrite(b, r, r.Writer)
		})
	}
}

// BenchmarkRepack compares pg_repack with VACUUM FULL (both plain rewrites)
// when pg_repack and its extension are installed; otherwise it records why not.
func BenchmarkRepack(b *testing.B) {
	n := int64(2_000_000)
	r := &result{Scenario: "repack/2M", Kind: "repack", Rows: n, Method: "pg_repack", Status: "skipped"}
	defer addResult(r)
	bin, err := exec.LookPath("pg_repack")
	if err != nil {
		r.Note = "pg_repack is not on PATH (Debian package postgresql-15-repack is not installed); comparison skipped"
		b.Skip(r.Note)
	}
	ctx := context.Background()
	var avail bool
	c, err := pgx.Connect(ctx, serverURL)
	if err == nil {
		_ = c.QueryRow(ctx, "select exists(select 1 from pg_available_extensions where name = 'pg_repack')").Scan(&avail)
		c.Close(ctx)
	}
	if !avail {
		r.Note = "pg_repack is on PATH but the server has no pg_repack extension; comparison skipped"
		b.Skip(r.Note)
	}
	// VACUUM FULL (blocking plain rewrite) vs pg_repack on identical copies.
	base := &result{Scenario: "repack/2M/vacuum-full", Kind: "repack", Rows: n, Method: "vacuum full"}
	base.Seconds, err = timeOn(ctx, n, func(ctx context.Context, db string) error {
		return execOn(ctx, db, "VACUUM FULL t")
	})
	if err != nil {
		base.Status, base.Note = "error", err.Error()
	} else {
		base.Status = "ok"
	}
	addResult(base)
	r.Seconds, err = timeOn(ctx, n, func(ctx context.Context, db string) error {
		if err := execOn(ctx, db, "CREATE EXTENSION IF NOT EXISTS pg_repack"); err != nil {
			return err
		}
		out, err := exec.CommandContext(ctx, bin, "--no-superuser-check", "-d", dbURL(db), "--table", "t").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	if err != nil {
		r.Status, r.Note = "error", err.Error()
		return
	}
	r.Status = "ok"
	if base.Seconds > 0 {
		r.Ratio = r.Seconds / base.Seconds
		r.Note = "ratio is against VACUUM FULL"
	}
}

func execOn(ctx context.Context, db, sql string) error {
	c, err := pgx.Connect(ctx, dbURL(db))
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, sql)
	return err
}

func timeOn(ctx context.Context, n int64, f func(context.Context, string) error) (float64, error) {
	db, err := freshDB(ctx, n)
	if err != nil {
		return 0, err
	}
	defer dropDB(db)
	t0 := time.Now()
	err = f(ctx, db)
	return time.Since(t0).Seconds(), err
}

func lsn(ctx context.Context, c *pgx.Conn) int64 {
	var v int64
	_ = c.QueryRow(ctx, "select pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").Scan(&v)
	return v
}

// runRewrite runs one scenario on a fresh copy of the table; with ws it
// runs a writer before, during and after.
func runRewrite(b *testing.B, r *result, ws *writerStats) {
	defer addResult(r)
	ctx := context.Background()
	if r.Method == "logical" && logicalNA != "" {
		r.Status, r.Note = "n/a", logicalNA
		b.Skip(r.Note)
	}
	db, err := freshDB(ctx, r.Rows)
	if err != nil {
		r.Status, r.Note = "error", err.Error()
		b.Fatal(err)
	}
	defer dropDB(db)
	url := dbURL(db)
	admin, err := pgx.Connect(ctx, url)
	if err != nil {
		b.Fatal(err)
	}
	defer admin.Close(ctx)
	_ = admin.QueryRow(ctx, "select pg_total_relation_size('t')").Scan(&r.OrigBytes)

	var w *writer
	var wBefore0, wBefore1 time.Time
	var lsnB0, lsnB1 int64
	var cpuB0, cpuB1 cpuTimes
	win := envDur("BENCH_WINDOW", 8*time.Second)
	if ws != nil {
		w, err = startWriter(ctx, url, ws.Clients, ws.TargetTPS, r.Rows)
		if err != nil {
			b.Fatal(err)
		}
		time.Sleep(time.Second) // warm-up, not measured
		wBefore0, lsnB0, cpuB0 = time.Now(), lsn(ctx, admin), readCPU()
		time.Sleep(win)
		wBefore1, lsnB1, cpuB1 = time.Now(), lsn(ctx, admin), readCPU()
	}

	rec := &recorder{}
	var sizeErr error
	rec.onPhase = func(phase string) {
		var shadow, delta int64
		q := "select coalesce(pg_total_relation_size(to_regclass('t__tat_new')), 0), coalesce(pg_total_relation_size(to_regclass('t__tat_delta')), 0)"
		switch phase {
		case replicate.PhaseIndex:
			sizeErr = admin.QueryRow(ctx, q).Scan(&shadow, &delta)
			r.ShadowCopied = shadow
		case replicate.PhaseSwitch:
			sizeErr = admin.QueryRow(ctx, q).Scan(&shadow, &delta)
			r.ShadowPeak, r.DeltaPeak = shadow, delta
			if r.Method == "logical" {
				// The server's view of the stream's lag, to compare with
				// the engine's Progress.LagBytes.
				_ = admin.QueryRow(ctx, `select coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)), 0)::bigint,
					coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), r.sent_lsn)), 0)::bigint
					from pg_replication_slots s left join pg_stat_replication r on r.pid = s.active_pid
					where s.database = current_database()`).Scan(&r.SlotLagAtSwitch, &r.SentLagAtSwitch)
			}
		}
	}
	lsn0 := lsn(ctx, admin)
	smp := startSampler()
	r.start = time.Now()
	tr := &tracer{}
	logOffset := serverLogSize()
	err = migrate(ctx, url, r, rec, tr)
	end := time.Now()
	smp.finish(r)
	r.Seconds = end.Sub(r.start).Seconds()
	lsn1 := lsn(ctx, admin)
	r.WALBytes = lsn1 - lsn0
	rec.digest(r, end)
	r.LockBreakdown = tr.lockBreakdown(r.Events)
	if st := engineStatements(logOffset); len(st) > 0 {
		r.ServerLock, r.ServerLockMS = serverLockBreakdown(st)
	}
	_ = sizeErr

	if ws != nil {
		time.Sleep(win)
		after := time.Now()
		samples := w.finish()
		r.samples, r.t0, r.migStart, r.migEnd, r.t1 = samples, wBefore0, r.start, end, after
		ws.TPSBefore = tps(samples, wBefore0, wBefore1)
		ws.TPSDuring = tps(samples, r.start, end)
		ws.TPSAfter = tps(samples, end, after)
		if ws.TPSBefore > 0 {
			ws.DuringPct = 100 * ws.TPSDuring / ws.TPSBefore
		}
		l := latencies(samples, r.start, end)
		ws.P50MS, ws.P99MS, ws.MaxMS = pct(l, 0.5), pct(l, 0.99), pct(l, 1)
		ws.P99Before = pct(latencies(samples, wBefore0, wBefore1), 0.99)
		ws.MaxGapMS = ms(maxGap(samples, r.start, end))
		ws.StallMS = max(ws.MaxMS, ws.MaxGapMS)
		if sw, se := phaseSpan(r.Events, replicate.PhaseSwitch, end); !sw.IsZero() {
			ws.SwitchMS = pct(latencies(samples, sw, se), 1)
		}
		ws.Errors = w.errs.Load()
		if e, ok := w.lastErr.Load().(string); ok {
			ws.LastError = e
		}
		nb := len(window(samples, wBefore0, wBefore1))
		nd := len(window(samples, r.start, end))
		if nb > 0 {
			ws.WALBefore = float64(lsnB1-lsnB0) / float64(nb)
		}
		if nd > 0 {
			ws.WALDuring = float64(r.WALBytes) / float64(nd)
		}
		ws.CPUBefore = busyPct(cpuB0, cpuB1)
		ws.CPUDuring = r.HostCPUBusyPct
		ws.Writes = nd
		for _, sp := range phaseSpans(r, end) {
			l := latencies(samples, sp.a, sp.b)
			ws.Phases = append(ws.Phases, phaseStat{Phase: sp.name, Seconds: sp.b.Sub(sp.a).Seconds(),
				TPS: tps(samples, sp.a, sp.b), P99MS: pct(l, 0.99), MaxMS: pct(l, 1), GapMS: ms(maxGap(samples, sp.a, sp.b))})
		}
	}

	if err != nil {
		if r.Method == "logical" && strings.Contains(err.Error(), "not available") {
			logicalNA = "replicate.Run: " + err.Error()
			r.Status, r.Note = "n/a", logicalNA
			b.Skip(r.Note)
		}
		r.Status, r.Note = "error", err.Error()
		b.Fatalf("%s: %v", r.Scenario, err)
	}
	// The result must be right, or the timing means nothing.
	var typ string
	var count, sum int64
	if err := admin.QueryRow(ctx, "select format_type(atttypid, atttypmod) from pg_attribute where attrelid = 't'::regclass and attname = 'aid'").Scan(&typ); err != nil {
		b.Fatal(err)
	}
	if err := admin.QueryRow(ctx, "select count(*), coalesce(sum(abalance), 0) from t").Scan(&count, &sum); err != nil {
		b.Fatal(err)
	}
	wantCount, wantSum := r.Rows, int64(0)
	if w != nil {
		wantCount += w.inserts.Load()
		wantSum = w.balance.Load()
	}
	if r.Method != "floor" && (typ != "bigint" || count != wantCount || sum != wantSum) {
		r.Status = "error"
		r.Note = fmt.Sprintf("wrong result: aid %s, %d rows (want %d), sum(abalance) %d (want %d)", typ, count, wantCount, sum, wantSum)
		b.Fatal(r.Note)
	}
	r.Status = "ok"
	b.ReportMetric(r.Seconds, "s")
	b.ReportMetric(float64(r.WALBytes)/(1<<20), "WAL-MB")
	if ws != nil {
		b.ReportMetric(ws.StallMS, "stall-ms")
		b.ReportMetric(ws.DuringPct, "tps-during-%")
	}
	logf("%-40s %7.2fs  WAL %6.0f MB  lock %.0f ms  heap %.1f MB", r.Scenario, r.Seconds, float64(r.WALBytes)/(1<<20), r.LockWindowMS, r.PeakHeapMB)
}

// migrate runs the scenario's method on database url.
func migrate(ctx context.Context, url string, r *result, rec *recorder, tr *tracer) error {
	switch r.Method {
	case "blocking":
		return execOn(ctx, dbName(url), alterCmd)
	case "floor":
		// The least any copy-based rewrite does: one INSERT ... SELECT into
		// a new heap, the primary key built afterwards, ANALYZE.
		c, err := pgx.Connect(ctx, url)
		if err != nil {
			return err
		}
		defer c.Close(ctx)
		for _, s := range []string{
			"CREATE TABLE t2 (aid bigint NOT NULL, bid int, abalance int, filler char(84))",
			"INSERT INTO t2 SELECT aid, bid, abalance, filler FROM t",
			"ALTER TABLE t2 ADD PRIMARY KEY (aid)",
			"ANALYZE t2",
		} {
			if _, err := c.Exec(ctx, s); err != nil {
				return err
			}
		}
		return nil
	}
	opts := replicate.DefaultOptions()
	opts.Command = alterCmd
	opts.Capture = r.Method
	opts.CopyDataJobs = r.CopyJobs
	opts.ShowQueries = tr.show
	if r.Verify != nil {
		opts.Verify = *r.Verify
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return err
	}
	cfg.MaxConns = int32(opts.CopyDataJobs + opts.CreateIndexJobs + 3) // as cmd/pg_tat
	cfg.ConnConfig.RuntimeParams["application_name"] = engineApp
	cfg.ConnConfig.RuntimeParams["log_min_duration_statement"] = "0"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	err = replicate.Run(ctx, pool, opts, rec, nil)
	if err != nil && errors.Is(err, context.Canceled) {
		return err
	}
	return err
}

func dbName(url string) string {
	i := strings.LastIndex(url, "/")
	s := url[i+1:]
	if j := strings.Index(s, "?"); j >= 0 {
		s = s[:j]
	}
	return s
}

type span struct {
	name string
	a, b time.Time
}

// phaseSpans lists the phases of a run with their times; a blocking ALTER
// is one phase, "blocking".
func phaseSpans(r *result, end time.Time) []span {
	if r.Method == "blocking" || r.Method == "floor" {
		return []span{{r.Method, r.start, end}}
	}
	var out []span
	for _, e := range r.Events {
		if p, ok := strings.CutPrefix(e.Msg, "phase "); ok {
			if len(out) > 0 {
				out[len(out)-1].b = e.At
			}
			out = append(out, span{p, e.At, end})
		}
	}
	return out
}

// phaseSpan is when phase ran, from its "phase" event to the next one (or end).
func phaseSpan(ev []event, phase string, end time.Time) (time.Time, time.Time) {
	var a time.Time
	for _, e := range ev {
		if !strings.HasPrefix(e.Msg, "phase ") {
			continue
		}
		p := strings.TrimPrefix(e.Msg, "phase ")
		if p == phase {
			a = e.At
		} else if !a.IsZero() {
			return a, e.At
		}
	}
	if a.IsZero() {
		return a, a
	}
	return a, end
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
