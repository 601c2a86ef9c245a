package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/replicate"
)

const alterCmd = "ALTER TABLE t ALTER COLUMN aid TYPE bigint"

// Knobs (environment):
//
//	TAT_BENCH_SIZES=1M,2M,4M  row counts of the rewrite comparison (BENCH_SIZES is
//	                          the older name; BENCH_BIG=1 appends 16M)
//	BENCH_BIG_ROWS=8M         sizes from this many rows on run only the blocking
//	                          ALTER and pg_tat with its defaults (the growth curve),
//	BENCH_BIG_REPS=1          with this many repetitions
//	BENCH_REPS=3              repetitions of each rewrite scenario below BENCH_BIG_ROWS
//	BENCH_WRITER_ROWS=2M      table size of the concurrent-writer scenarios
//	BENCH_WRITER_RATE=500     target TPS of the fixed-rate writer scenario
//	BENCH_WINDOW=8s           writer measurement window before and after the migration
//	BENCH_BULK_ROWS=250K      rows the bulk transaction at the switch changes
//	                          (4/5 updated, 1/5 deleted; at most half the table)
//	BENCH_VERIFY_SIZES=2M,4M  row counts of BenchmarkVerify (verify off vs on)
func sizes() []int64 {
	spec := os.Getenv("TAT_BENCH_SIZES")
	if spec == "" {
		spec = os.Getenv("BENCH_SIZES")
	}
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

// bigRows is the size from which a rewrite runs only the blocking ALTER and
// the defaults: at 16M rows every scenario costs a minute or more on this
// machine, and the growth curve needs only those two.
func bigRows() int64 {
	if n := parseRows(os.Getenv("BENCH_BIG_ROWS")); n > 0 {
		return n
	}
	return 8_000_000
}

func bigReps() int { return max(1, envInt("BENCH_BIG_REPS", 1)) }

func reps() int { return max(1, envInt("BENCH_REPS", 3)) }

// repsFor is the number of repetitions of the rewrite scenarios of size n.
func repsFor(n int64) int {
	if n >= bigRows() {
		return bigReps()
	}
	return reps()
}

// defaultJobs is copy_data_jobs of replicate.DefaultOptions(), the run a
// user gets without options.
func defaultJobs() int { return replicate.DefaultOptions().CopyDataJobs }

// defaultsDesc names the options of the defaults scenario that bear on its
// cost, as replicate.DefaultOptions() sets them in this build.
func defaultsDesc() string {
	o := replicate.DefaultOptions()
	return fmt.Sprintf("capture=%s, copy_data_jobs=%d, create_index_jobs=%d, verify=%v", o.Capture, o.CopyDataJobs, o.CreateIndexJobs, o.Verify)
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

// BenchmarkRewrite: pg_tat with its defaults, the blocking ALTER, a
// bare-copy floor, pg_repack's rebuild and the online rewrite (trigger and
// logical capture, copy_data_jobs 1 and 2), each on a fresh byte-identical
// copy of the table, per size. From bigRows() on: the defaults and the
// blocking ALTER only.
func BenchmarkRewrite(b *testing.B) {
	type sc struct {
		method string
		jobs   int
	}
	// The defaults come first: they are what a user gets, the report's
	// first row.
	all := []sc{{"defaults", defaultJobs()}, {"blocking", 0}, {"floor", 0}, {"pg_repack", 0},
		{"trigger", 1}, {"trigger", 2}, {"logical", 1}, {"logical", 2}}
	warmUp(b, slices.Max(sizes()))
	for _, n := range sizes() {
		list := all
		if n >= bigRows() {
			list = all[:2]
		}
		nreps := repsFor(n)
		for rep := 1; rep <= nreps; rep++ {
			for _, s := range list {
				name := fmtRows(n) + "/" + s.method
				if s.jobs > 0 && s.method != "defaults" {
					name += fmt.Sprintf("/j%d", s.jobs)
				}
				if nreps > 1 {
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

// BenchmarkWriter: the same rewrite under a concurrent pgbench-style writer,
// and pg_repack's rebuild under the same writer (its lock windows show as the
// writer's longest stall).
func BenchmarkWriter(b *testing.B) {
	n := writerRows()
	rate := envInt("BENCH_WRITER_RATE", 500)
	type sc struct {
		method string
		jobs   int
		rate   int
	}
	for _, s := range []sc{{"blocking", 0, 0}, {"trigger", 1, 0}, {"trigger", 2, 0}, {"logical", 1, 0}, {"pg_repack", 0, 0},
		{"blocking", 0, rate}, {"trigger", 1, rate}, {"logical", 1, rate}, {"pg_repack", 0, rate}} {
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

func writerRows() int64 {
	if n := parseRows(os.Getenv("BENCH_WRITER_ROWS")); n > 0 {
		return n
	}
	return 2_000_000
}

// BenchmarkBulkSwitch: pg_tat with its defaults under the fixed-rate writer,
// and a bulk transaction (by default 200k rows updated, 50k deleted, as in
// the original pg_tat's regression test) committed right before the
// switch's first lock attempt (TestHook point "dependents-read", after the last catch-up round). The switch
// must not apply that backlog under its lock.
func BenchmarkBulkSwitch(b *testing.B) {
	n := writerRows()
	rate := envInt("BENCH_WRITER_RATE", 500)
	bulk := parseRows(os.Getenv("BENCH_BULK_ROWS"))
	if bulk <= 0 {
		bulk = 250_000
	}
	bulk = min(bulk, n/2)
	del := bulk / 5
	name := fmt.Sprintf("%s/%dtps/bulk-%s/defaults", fmtRows(n), rate, fmtRows(bulk))
	r := &result{Scenario: "writer/" + name, Kind: "writer", Rows: n, Method: "defaults", CopyJobs: defaultJobs(),
		Writer: &writerStats{Clients: 2, TargetTPS: rate},
		// Updated rows from the start of the key range, deleted ones from
		// its end: the writer's inserts (keys above n) are not deleted.
		Bulk: &bulkStats{UpdateRows: bulk - del, DeleteFrom: n - del, DeleteTo: n}}
	runRewrite(b, r, r.Writer)
}

// repack is where pg_repack is, or why it cannot run (then its scenarios
// are skipped with that note); looked up once.
var repack struct {
	once         sync.Once
	bin, version string
	unavailable  string
}

func repackBin(ctx context.Context) (string, string) {
	repack.once.Do(func() {
		bin, err := exec.LookPath("pg_repack")
		if err != nil {
			// Debian installs it next to the server binaries, off PATH.
			if dir, derr := testpg.BinDir(); derr == nil {
				if _, serr := os.Stat(filepath.Join(dir, "pg_repack")); serr == nil {
					bin, err = filepath.Join(dir, "pg_repack"), nil
				}
			}
		}
		if err != nil {
			repack.unavailable = "pg_repack is not installed (Debian: apt-get install postgresql-15-repack, the package matching the server's major version); its scenarios are skipped"
			return
		}
		var avail bool
		if c, err := pgx.Connect(ctx, serverURL); err == nil {
			_ = c.QueryRow(ctx, "select exists(select 1 from pg_available_extensions where name = 'pg_repack')").Scan(&avail)
			c.Close(ctx)
		}
		if !avail {
			repack.unavailable = bin + " exists but the server has no pg_repack extension (package for another major version?); its scenarios are skipped"
			return
		}
		out, _ := exec.CommandContext(ctx, bin, "--version").CombinedOutput()
		repack.bin, repack.version = bin, strings.TrimSpace(string(out))
	})
	return repack.bin, repack.unavailable
}

// runRepack rebuilds t with pg_repack's defaults (no clustering index: a
// VACUUM FULL-like copy, then its log replay and swap). pg_repack cannot
// change a column type: this is the rebuild an online tool does, without
// the type change.
func runRepack(ctx context.Context, url string) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, repack.bin, "--no-superuser-check", "--table", "t",
		"--host", cfg.Host, "--port", strconv.Itoa(int(cfg.Port)), "--username", cfg.User, "--dbname", cfg.Database)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pg_repack: %v: %s", err, out)
	}
	return nil
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
	if r.capture() == "logical" && logicalNA != "" {
		r.Status, r.Note = "n/a", logicalNA
		b.Skip(r.Note)
	}
	if r.Method == "pg_repack" {
		if _, why := repackBin(ctx); why != "" {
			r.Status, r.Note = "skipped", why
			b.Skip(why)
		}
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
	if r.Method == "pg_repack" {
		// Part of installing pg_repack, not of the rebuild: not timed.
		if _, err := admin.Exec(ctx, "CREATE EXTENSION pg_repack"); err != nil {
			r.Status, r.Note = "error", err.Error()
			b.Fatal(err)
		}
	}

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
			if r.capture() == "logical" {
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
		if bs := r.Bulk; bs != nil {
			for _, e := range r.Events {
				if strings.Contains(e.Msg, "switch postponed") {
					bs.Postponed++
				}
			}
		}
		if bs := r.Bulk; bs != nil && !bs.committed.IsZero() {
			// The bulk transaction's own row locks stall the writer
			// whatever the tool (any bulk UPDATE does that); what the
			// switch adds shows in the transactions due after its commit.
			bs.MaxAfterMS = pct(latenciesFrom(samples, bs.committed, end), 1)
			bs.GapAfterMS = ms(maxGapFrom(samples, bs.committed, end))
			bs.StallAfterMS = max(bs.MaxAfterMS, bs.GapAfterMS)
		}
	}

	if err == nil && r.Bulk != nil && r.Bulk.err != nil {
		err = fmt.Errorf("bulk transaction at the switch: %w", r.Bulk.err)
	}
	if err == nil && r.Bulk != nil && r.Bulk.committed.IsZero() {
		err = errors.New("the bulk transaction never ran: no switch reached TestHook point dependents-read")
	}
	if err != nil {
		if r.capture() == "logical" && strings.Contains(err.Error(), "not available") {
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
	if r.Bulk != nil {
		wantCount -= r.Bulk.Deleted
		wantSum -= r.Bulk.deletedSum
	}
	wantType := "bigint"
	if r.Method == "pg_repack" {
		wantType = "integer" // a rebuild, no type change
	}
	if r.Method != "floor" && (typ != wantType || count != wantCount || sum != wantSum) {
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
	case "pg_repack":
		return runRepack(ctx, url)
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
	if r.Method != "defaults" {
		opts.Capture = r.Method
		opts.CopyDataJobs = r.CopyJobs
	}
	opts.ShowQueries = tr.show
	if bs := r.Bulk; bs != nil {
		var once sync.Once
		opts.TestHook = func(ctx context.Context, point string, _ pgx.Tx) error {
			if point == "dependents-read" {
				once.Do(func() { bs.err = bs.run(ctx, url) })
			}
			return nil
		}
	}
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
	if r.Method == "blocking" || r.Method == "floor" || r.Method == "pg_repack" {
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

// capture is the capture method the scenario's engine run uses.
func (r *result) capture() string {
	if r.Method == "defaults" {
		return replicate.DefaultOptions().Capture
	}
	return r.Method
}

// bulkStats: the bulk transaction committed at the switch (BenchmarkBulkSwitch).
type bulkStats struct {
	UpdateRows int64   `json:"update_rows"` // UPDATE ... WHERE aid <= UpdateRows
	DeleteFrom int64   `json:"delete_from"` // DELETE ... WHERE aid > DeleteFrom AND aid <= DeleteTo
	DeleteTo   int64   `json:"delete_to"`   // the table's initial rows: the writer's inserts are kept
	Updated    int64   `json:"updated"`
	Deleted    int64   `json:"deleted"`
	Seconds    float64 `json:"seconds"` // the bulk transaction, BEGIN to COMMIT
	// Postponed: lock attempts the switch let go because the delta was
	// over its budget (the engine's "switch postponed" events).
	Postponed int `json:"switch_postponed"`
	// The writer after the bulk commit: worst latency of a transaction
	// due then, longest gap between completions, their max.
	MaxAfterMS   float64 `json:"max_ms_after_commit"`
	GapAfterMS   float64 `json:"max_gap_ms_after_commit"`
	StallAfterMS float64 `json:"longest_stall_ms_after_commit"`

	committed  time.Time
	deletedSum int64 // sum(abalance) of the deleted rows, for the result check
	err        error
}

// run commits the bulk change in one transaction of its own connection. The
// deleted rows' balances are read in the same statement, so that the result
// check stays exact whatever the writer did to them before.
func (bs *bulkStats) run(ctx context.Context, url string) error {
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	t0 := time.Now()
	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "UPDATE t SET bid = bid + 1 WHERE aid <= $1", bs.UpdateRows)
		if err != nil {
			return err
		}
		bs.Updated = tag.RowsAffected()
		return tx.QueryRow(ctx, `WITH d AS (DELETE FROM t WHERE aid > $1 AND aid <= $2 RETURNING abalance)
			SELECT count(*), coalesce(sum(abalance), 0)::bigint FROM d`, bs.DeleteFrom, bs.DeleteTo).Scan(&bs.Deleted, &bs.deletedSum)
	})
	bs.committed = time.Now()
	bs.Seconds = bs.committed.Sub(t0).Seconds()
	logf("bulk transaction at the switch: %d rows updated, %d deleted, %.1fs", bs.Updated, bs.Deleted, bs.Seconds)
	return err
}
