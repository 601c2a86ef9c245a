package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

const reproduce = "make bench   # = go test -run '^$' -bench . -benchtime 1x -timeout 60m ./bench/"

func mb(b int64) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f", float64(b)/(1<<20))
}

func f1(v float64) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f", v)
}

func f2(v float64) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

func machine() []string {
	var out []string
	cpu := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	out = append(out, fmt.Sprintf("CPU: %s, nproc %d (GOMAXPROCS %d)", cpu, runtime.NumCPU(), runtime.GOMAXPROCS(0)))
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		l, _, _ := strings.Cut(string(b), "\n")
		out = append(out, "Memory: "+strings.Join(strings.Fields(l)[1:], " "))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		out = append(out, "Kernel: Linux "+strings.TrimSpace(string(b)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if c, err := pgx.Connect(ctx, serverURL); err == nil {
		var v string
		_ = c.QueryRow(ctx, "select version()").Scan(&v)
		out = append(out, "PostgreSQL: "+v)
		rows, err := c.Query(ctx, `select name || '=' || setting || coalesce(unit, '') from pg_settings where name in
			('shared_buffers','max_wal_size','checkpoint_timeout','maintenance_work_mem','work_mem','fsync','full_page_writes',
			 'synchronous_commit','wal_level','max_parallel_maintenance_workers','autovacuum') order by name`)
		if err == nil {
			s, _ := pgx.CollectRows(rows, pgx.RowTo[string])
			out = append(out, "Server settings: "+strings.Join(s, ", ")+" (shared_buffers in 8kB pages)")
		}
		c.Close(ctx)
	}
	out = append(out, "Go: "+runtime.Version()+" "+runtime.GOOS+"/"+runtime.GOARCH)
	out = append(out, "Date: "+time.Now().UTC().Format("2006-01-02 15:04 MST"))
	var env []string
	for _, k := range []string{"TAT_BENCH_SIZES", "BENCH_SIZES", "BENCH_BIG", "BENCH_BIG_ROWS", "BENCH_BIG_REPS", "BENCH_REPS",
		"BENCH_WRITER_ROWS", "BENCH_WRITER_RATE", "BENCH_WINDOW", "BENCH_BULK_ROWS", "BENCH_VERIFY_SIZES"} {
		if v := os.Getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	if len(env) > 0 {
		out = append(out, "Environment: "+strings.Join(env, " "))
	}
	if repack.version != "" {
		out = append(out, "pg_repack: "+repack.version+" ("+repack.bin+")")
	} else if repack.unavailable != "" {
		out = append(out, "pg_repack: "+repack.unavailable)
	}
	out = append(out, "pg_tat defaults (replicate.DefaultOptions()): "+defaultsDesc())
	out = append(out, fmt.Sprintf("Whole suite: %.0f s", time.Since(started).Seconds()))
	return out
}

// key groups rewrite results of one size and method.
type key struct {
	rows   int64
	method string
	jobs   int
}

func writeReport() error {
	resMu.Lock()
	defer resMu.Unlock()
	if len(results) == 0 {
		return nil
	}
	if err := mkdirOut(); err != nil {
		return err
	}
	// Medians over repetitions, ratios against the same size's blocking ALTER.
	secs := map[key][]float64{}
	for _, r := range results {
		if r.Kind == "rewrite" && r.Status == "ok" {
			k := key{r.Rows, r.Method, r.CopyJobs}
			secs[k] = append(secs[k], r.Seconds)
		}
	}
	med := func(k key) float64 { return median(secs[k]) }
	best := func(k key) float64 {
		if len(secs[k]) == 0 {
			return 0
		}
		return slices.Min(secs[k])
	}
	wals := map[key][]float64{}
	for _, r := range results {
		if r.Kind == "rewrite" && r.Status == "ok" {
			k := key{r.Rows, r.Method, r.CopyJobs}
			wals[k] = append(wals[k], float64(r.WALBytes))
		}
	}
	for _, r := range results {
		if r.Kind == "writer" && r.Status == "ok" && r.Method != "blocking" && r.Writer.Writes > 0 {
			if base := median(wals[key{r.Rows, r.Method, r.CopyJobs}]); base > 0 {
				r.Writer.WALExtra = (float64(r.WALBytes)-base)/float64(r.Writer.Writes) - r.Writer.WALBefore
			}
		}
	}
	for _, r := range results {
		if r.Kind != "rewrite" || r.Status != "ok" {
			continue
		}
		if bl := med(key{r.Rows, "blocking", 0}); bl > 0 && r.Method != "blocking" {
			r.Ratio = r.Seconds / bl
		}
		if fl := med(key{r.Rows, "floor", 0}); fl > 0 && r.Method != "floor" {
			r.RatioFloor = r.Seconds / fl
		}
	}
	var wbl = map[int]*result{}
	for _, r := range results {
		if r.Kind == "writer" && r.Method == "blocking" && r.Status == "ok" {
			wbl[r.Writer.TargetTPS] = r
		}
	}
	for _, r := range results {
		if r.Kind == "writer" && r.Method != "blocking" && r.Status == "ok" && r.Bulk == nil {
			if bl := wbl[r.Writer.TargetTPS]; bl != nil && bl.Seconds > 0 {
				r.Ratio = r.Seconds / bl.Seconds
			}
		}
	}

	// JSON lines.
	var jl strings.Builder
	for _, r := range results {
		b, err := json.Marshal(r)
		if err != nil {
			return err
		}
		jl.Write(b)
		jl.WriteByte('\n')
	}
	costs := verifyCosts()
	for _, c := range costs {
		b, err := json.Marshal(c)
		if err != nil {
			return err
		}
		jl.Write(b)
		jl.WriteByte('\n')
	}
	if err := os.WriteFile(filepath.Join(outDir(), "results.jsonl"), []byte(jl.String()), 0o644); err != nil {
		return err
	}

	// Charts.
	var charts []string
	mainChart := ""
	for _, r := range results {
		if r.Kind != "writer" || r.Status != "ok" || len(r.samples) == 0 {
			continue
		}
		name := "writer-" + strings.NewReplacer("writer/", "", "/", "-").Replace(r.Scenario) + ".svg"
		if mainChart == "" && r.Method == "trigger" && r.CopyJobs == 1 && r.Writer.TargetTPS == 0 {
			mainChart = name
		}
		if err := os.WriteFile(filepath.Join(outDir(), name), []byte(writerSVG(r)), 0o644); err != nil {
			return err
		}
		charts = append(charts, name)
	}
	if mainChart != "" {
		b, err := os.ReadFile(filepath.Join(outDir(), mainChart))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(outDir(), "writer.svg"), b, 0o644); err != nil {
			return err
		}
	}

	var md strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&md, format, a...) }
	w("# pg_tat benchmark report\n\n")
	w("Command measured everywhere: `%s` on a pgbench_accounts-like table `t (aid int primary key, bid int, abalance int, filler char(84))`.\n", alterCmd)
	w("Every scenario runs on a fresh byte-identical copy of the table (`CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY` of a vacuumed, frozen, analyzed template, then `CHECKPOINT`), in one run on one server, so ratios compare like with like on this noisy machine.\n\n")
	w("Reproduce: `%s`\n\n", reproduce)
	w("16M rows on the growth curve (blocking ALTER and defaults only): `TAT_BENCH_SIZES=1M,2M,4M,16M make bench`; the other knobs are listed at the top of `bench/bench_test.go`.\n\n")
	w("## Machine\n\n")
	for _, l := range machine() {
		w("- %s\n", l)
	}
	w("\n")

	// Targets.
	var sizesSeen []int64
	seenSz := map[int64]bool{}
	for _, r := range results {
		if r.Kind == "rewrite" && !seenSz[r.Rows] {
			seenSz[r.Rows] = true
			sizesSeen = append(sizesSeen, r.Rows)
		}
	}
	var bigSeen []string
	for _, n := range sizesSeen {
		if n >= bigRows() {
			bigSeen = append(bigSeen, fmtRows(n))
		}
	}
	w("## Targets vs measured\n\nOther sessions share this 2-core machine (see *other CPU s* below: busy CPU used neither by this benchmark's PostgreSQL nor by its Go process), and their load only ever adds time, so the rewrite verdicts use the best (minimum) of the %d repetitions of each scenario, with the median alongside; ratios are against the blocking ALTER of the same size in the same run (best against best, median against median).", reps())
	if len(bigSeen) > 0 {
		w(" %s: the blocking ALTER and the defaults only, %d repetition(s) each (BENCH_BIG_REPS; a 16M scenario takes a minute or more here).", strings.Join(bigSeen, ", "), bigReps())
	}
	w(" Lock windows are the engine's own \"table swapped; lock held\" figure; their verdicts use the worst run.\n\n")
	w("*defaults* = `replicate.DefaultOptions()` as this build sets them: %s.\n\n", defaultsDesc())
	w("| target | measured | verdict |\n|---|---|---|\n")
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**missed**"
	}
	// ratioRow: scenario k against the same size's blocking ALTER, target lim
	// when applies (else reported without a verdict).
	ratioRow := func(label string, k key, lim float64, applies bool) {
		n := k.rows
		bl, blm := best(key{n, "blocking", 0}), med(key{n, "blocking", 0})
		o, om := best(k), med(k)
		if bl == 0 || o == 0 {
			return
		}
		v := "– (no target at this size)"
		if applies {
			v = verdict(o/bl <= lim)
		}
		w("| %s ≤ %.1f× blocking ALTER, %s rows | best %.2f× (%.1f s vs %.1f s); median %.2f× (%d runs) | %s |\n", label, lim, fmtRows(n), o/bl, o, bl, om/blm, len(secs[k]), v)
	}
	dj := defaultJobs()
	for _, n := range sizesSeen {
		ratioRow("pg_tat defaults", key{n, "defaults", dj}, 1.2, n == 2_000_000 || n == 4_000_000)
	}
	for _, n := range sizesSeen {
		for _, capt := range []string{"trigger", "logical"} {
			o1, o2 := best(key{n, capt, 1}), best(key{n, capt, 2})
			if o1 > 0 && o2 > 0 {
				// 3%: below the run-to-run noise of this machine.
				w("| %s: copy_data_jobs=2 never slower than 1 (3%% noise allowed), %s rows | best j2/j1 = %.2f (%.1f s vs %.1f s); median %.2f | %s |\n", capt, fmtRows(n), o2/o1, o2, o1, med(key{n, capt, 2})/med(key{n, capt, 1}), verdict(o2 <= o1*1.03))
			}
		}
	}
	for _, n := range sizesSeen {
		for _, j := range []int{1, 2} {
			ratioRow(fmt.Sprintf("logical (copy_data_jobs=%d)", j), key{n, "logical", j}, 1.4, n == 2_000_000)
		}
	}
	// Lock windows of the logical capture without writer, per size and jobs.
	lockWin := map[key][]float64{}
	var lockKeys []key
	for _, r := range results {
		if r.Kind == "rewrite" && r.Status == "ok" && r.Method == "logical" && r.LockWindowMS > 0 {
			k := key{r.Rows, r.Method, r.CopyJobs}
			if lockWin[k] == nil {
				lockKeys = append(lockKeys, k)
			}
			lockWin[k] = append(lockWin[k], r.LockWindowMS)
		}
	}
	for _, k := range lockKeys {
		worst := slices.Max(lockWin[k])
		w("| logical lock window ≤ 30 ms, no writer, copy_data_jobs=%d, %s rows | worst %.0f ms; median %.0f ms (%d runs) | %s |\n", k.jobs, fmtRows(k.rows), worst, median(lockWin[k]), len(lockWin[k]), verdict(worst <= 30))
	}
	for _, r := range results {
		if r.Kind != "writer" || r.Status != "ok" || r.Method == "blocking" || r.Method == "pg_repack" || r.Bulk != nil {
			continue
		}
		ws := r.Writer
		lim := 100.0
		if ws.TargetTPS > 0 {
			lim = 50
		}
		w("| longest writer stall ≤ %.0f ms, %s | %.0f ms (max latency %.0f ms, max gap %.0f ms; lock window %.0f ms) | %s |\n",
			lim, r.Scenario, ws.StallMS, ws.MaxMS, ws.MaxGapMS, r.LockWindowMS, verdict(ws.StallMS <= lim))
	}
	for _, r := range results {
		if r.Bulk == nil {
			continue
		}
		bs := r.Bulk
		if r.Status != "ok" {
			w("| bulk change at the switch: lock window ≤ 200 ms, %s | %s: %s | **missed** |\n", r.Scenario, r.Status, short(r.Note))
			continue
		}
		w("| bulk change at the switch: lock window ≤ 200 ms, %s | lock held %.0f ms (switch postponed %d time(s), %d failed lock attempt(s) in all); %d rows updated + %d deleted in %.1f s right before the lock; writer's longest stall %.0f ms after the bulk commit (%.0f ms over the whole run, the bulk's own row locks included) | %s |\n",
			r.Scenario, r.LockWindowMS, bs.Postponed, r.LockAttempts, bs.Updated, bs.Deleted, bs.Seconds, bs.StallAfterMS, r.Writer.StallMS, verdict(r.LockWindowMS > 0 && r.LockWindowMS <= 200))
	}
	for _, n := range sizesSeen {
		k := key{n, "pg_repack", 0}
		o, om := best(k), med(k)
		bl, blm := best(key{n, "blocking", 0}), med(key{n, "blocking", 0})
		d, dm := best(key{n, "defaults", dj}), med(key{n, "defaults", dj})
		if o == 0 || bl == 0 {
			continue
		}
		cmp := ""
		if d > 0 {
			cmp = fmt.Sprintf("; pg_tat defaults (with the type change) / pg_repack = best %.2f, median %.2f", d/o, dm/om)
		}
		w("| pg_repack comparison (rebuild only, no type change), %s rows | pg_repack best %.2f× blocking ALTER (%.1f s vs %.1f s), median %.2f×%s | – (comparison) |\n", fmtRows(n), o/bl, o, bl, om/blm, cmp)
	}
	for _, r := range results {
		if r.Kind == "writer" && r.Method == "pg_repack" && r.Status == "ok" {
			w("| pg_repack under the writer, %s | longest stall %.0f ms (max latency %.0f ms, max gap %.0f ms) | – (comparison) |\n", r.Scenario, r.Writer.StallMS, r.Writer.MaxMS, r.Writer.MaxGapMS)
		}
	}
	for _, r := range results {
		if r.Status == "n/a" && r.Method == "logical" {
			w("| logical capture | n/a: %s | not measurable yet |\n", strings.ReplaceAll(r.Note, "|", "/"))
			break
		}
	}
	if repack.unavailable != "" {
		w("| pg_repack comparison | skipped: %s | – |\n", short(repack.unavailable))
	}
	w("\n")

	// Rewrite table.
	w("## 1. Rewrite without writers: online vs blocking ALTER\n\n")
	w("`× blocking` and `× floor` are against the median of the same size's blocking ALTER / floor in this run. *defaults* = pg_tat with `replicate.DefaultOptions()` (%s), the first row of each repetition. *floor* = what any copy-based rewrite must at least do: `INSERT INTO t2 SELECT * FROM t` into a new bigint table, then `ADD PRIMARY KEY`, `ANALYZE`. *pg_repack* = `pg_repack --table t` with its defaults: a full online rebuild of the same table, without the type change (pg_repack cannot change a column type); its type check expects `integer`. Phase columns are seconds from the engine's phase events. WAL = `pg_current_wal_lsn()` difference over the run. Shadow MB = `pg_total_relation_size` of `t__tat_new` after the copy / before the switch (with indexes); orig MB = the original table with its index. Heap = peak Go `HeapInuse` of the engine process (sampled every 50 ms); RSS = peak VmHWM of the process. CPU = host CPU busy (both cores) over the run.\n\n", defaultsDesc())
	w("| rows | method | copy jobs | time s | × blocking | × floor | prepare+capture | copy | index | analyze | catchup | verify | switch | lock ms | WAL MB | orig MB | shadow MB copy/peak | delta MB | heap MB | RSS MB | host CPU %% | PG CPU s | other CPU s | status |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range results {
		if r.Kind != "rewrite" || (r.Method == "pg_repack" && r.Status == "skipped") {
			continue
		}
		jobs := "–"
		if r.CopyJobs > 0 {
			jobs = fmt.Sprint(r.CopyJobs)
		}
		st := r.Status
		if r.Status != "ok" {
			st = r.Status + ": " + short(r.Note)
		}
		if r.Status != "ok" {
			w("| %s | %s | %s | | | | | | | | | | | | | | | | | | | | | %s |\n", fmtRows(r.Rows), r.Method, jobs, st)
			continue
		}
		ph := r.Phases
		w("| %s | %s | %s | %.2f | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s/%s | %s | %s | %s | %.0f | %.1f | %.1f | %s |\n",
			fmtRows(r.Rows), r.Method, jobs, r.Seconds, f2(r.Ratio), f2(r.RatioFloor),
			f2(ph["prepare"]+ph["capture"]), f2(ph["copy"]), f2(ph["index"]), f2(ph["analyze"]), f2(ph["catchup"]), f2(ph["verify"]), f2(ph["switch"]+ph["validate"]),
			f1(r.LockWindowMS), mb(r.WALBytes), mb(r.OrigBytes), mb(r.ShadowCopied), mb(r.ShadowPeak), mb(r.DeltaPeak), f1(r.PeakHeapMB), f1(r.PeakRSSMB), r.HostCPUBusyPct, r.PGCPUSeconds, r.OtherCPUSeconds, st)
	}
	w("\n")

	// Growth.
	w("### Growth: seconds per million rows (best of the repetitions)\n\n")
	if len(bigSeen) > 0 {
		w("%s: blocking ALTER and defaults only, %d repetition(s) (`TAT_BENCH_SIZES=1M,2M,4M,16M`; sizes from BENCH_BIG_ROWS=%s on).\n\n", strings.Join(bigSeen, ", "), bigReps(), fmtRows(bigRows()))
	}
	w("| rows | runs | defaults | blocking | floor | pg_repack | trigger j1 | trigger j2 | logical j1 | logical j2 |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, n := range sizesSeen {
		w("| %s | %d |", fmtRows(n), len(secs[key{n, "blocking", 0}]))
		for _, k := range []key{{n, "defaults", dj}, {n, "blocking", 0}, {n, "floor", 0}, {n, "pg_repack", 0}, {n, "trigger", 1}, {n, "trigger", 2}, {n, "logical", 1}, {n, "logical", 2}} {
			if v := best(k); v > 0 {
				w(" %.2f |", v/(float64(n)/1e6))
			} else {
				w(" – |")
			}
		}
		w("\n")
	}
	w("\n")

	// Writer table.
	w("## 2. Under a concurrent writer\n\n")
	w("Writer: 2 Go clients, each on its own connection, autocommit single-row transactions on `t`: 90%% `UPDATE t SET abalance = abalance + $1 WHERE aid = $2` (random existing row), 10%% `INSERT` of a new row. *flat-out* = as fast as they go; *N tps* = fixed schedule, latency measured from the scheduled start (a stall counts for every transaction that was due). TPS *before* = %s window before the migration (after 1 s warm-up), *during* = the whole migration, *after* = the window after it. Longest stall = max(max latency, longest gap between two completed transactions) during the migration. *switch max* = worst latency of a transaction overlapping the switch phase. WAL/write = WAL bytes per writer transaction (during: all WAL of the migration divided by the writes it overlapped). After each run the table is checked: `aid` is bigint, row count = initial + committed inserts, `sum(abalance)` = sum of committed updates.\n\n", envDur("BENCH_WINDOW", 8*time.Second))
	w("| scenario | time s | × blocking | TPS before | TPS during | TPS after | during %% | p99 before ms | p50 ms | p99 ms | max ms | max gap ms | longest stall ms | switch max ms | lock window ms | lock attempts | max backlog | WAL/write B before/during | host CPU %% before/during | other CPU s | errors | status |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range results {
		if r.Kind != "writer" {
			continue
		}
		if r.Status != "ok" || r.Writer == nil {
			w("| %s | | | | | | | | | | | | | | | | | | | | | %s: %s |\n", r.Scenario, r.Status, short(r.Note))
			continue
		}
		ws := r.Writer
		w("| %s | %.1f | %s | %.0f | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f | %.1f | %.1f | **%.1f** | %s | %s | %d | %d | %.0f / %.0f | %.0f / %.0f | %.1f | %d | ok |\n",
			r.Scenario, r.Seconds, f2(r.Ratio), ws.TPSBefore, ws.TPSDuring, ws.TPSAfter, ws.DuringPct, ws.P99Before, ws.P50MS, ws.P99MS, ws.MaxMS, ws.MaxGapMS, ws.StallMS,
			f1(ws.SwitchMS), f1(r.LockWindowMS), r.LockAttempts, r.MaxBacklog, ws.WALBefore, ws.WALDuring, ws.CPUBefore, ws.CPUDuring, r.OtherCPUSeconds, ws.Errors)
	}
	w("\n")
	w("### Writer by phase\n\nThe writer's TPS and latency within each phase of the migration (a blocking ALTER is one phase). *capture WAL/write* = extra WAL per write caused by the capture: (WAL of the run under the writer − median WAL of the same run without writer) / writes − WAL per write before.\n\n")
	w("| scenario | capture WAL/write B | phase | s | TPS | p99 ms | max ms | max gap ms |\n|---|---|---|---|---|---|---|---|\n")
	for _, r := range results {
		if r.Kind != "writer" || r.Status != "ok" {
			continue
		}
		for i, p := range r.Writer.Phases {
			name, extra := "", ""
			if i == 0 {
				name = r.Scenario
				if r.Writer.WALExtra != 0 {
					extra = fmt.Sprintf("%.0f", r.Writer.WALExtra)
				}
			}
			w("| %s | %s | %s | %.2f | %.0f | %.1f | %.1f | %.1f |\n", name, extra, p.Phase, p.Seconds, p.TPS, p.P99MS, p.MaxMS, p.GapMS)
		}
	}
	w("\n")
	if mainChart != "" {
		w("![writer TPS and latency during the online migration (trigger capture, copy_data_jobs=1, flat-out writer)](writer.svg)\n\n")
	}
	if len(charts) > 0 {
		w("All writer charts (TPS on top, latency p99/max on a log scale below, phases shaded, the swap marked): ")
		for i, c := range charts {
			if i > 0 {
				w(", ")
			}
			w("[%s](%s)", strings.TrimSuffix(strings.TrimPrefix(c, "writer-"), ".svg"), c)
		}
		w("\n\n")
	}

	// Lock window.
	w("## Cut-over lock window: what runs under the lock\n\nFor each online run: the engine's lock window (its own \"table swapped; lock held\" event, measured from LOCK granted), the logical capture's wait for its cut-over marker, and the three statements that took longest between `LOCK TABLE` and the swap (time until the engine's next traced statement; catalog queries not traced fall into the preceding statement).\n\n")
	w("*server ms* = sum of the server-side durations (server log, `log_min_duration_statement = 0` on the engine's sessions) of the cut-over transaction's statements after `LOCK TABLE`; the rest of the lock window is client round trips and waiting (the logical marker).\n\n")
	w("*lag at switch* (logical capture), when the switch phase began: engine = `Progress.LagBytes`; slot = `pg_current_wal_lsn() - confirmed_flush_lsn`; walsender = `pg_current_wal_lsn() - sent_lsn` (WAL not decoded yet). The marker wait under the lock has to decode that WAL first.\n\n")
	w("| scenario | lock window ms | server ms | logical sync ms | lag at switch MB engine / slot / walsender | longest statements under the lock (server time) |\n|---|---|---|---|---|---|\n")
	for _, r := range results {
		if r.Status != "ok" || r.LockWindowMS == 0 {
			continue
		}
		var parts []string
		bd := r.ServerLock
		if len(bd) == 0 {
			bd = r.LockBreakdown
		}
		for i, st := range bd {
			if i == 3 {
				break
			}
			parts = append(parts, fmt.Sprintf("%.1f ms `%s`", st.MS, strings.ReplaceAll(st.SQL, "|", "/")))
		}
		lag := "–"
		if r.Method == "logical" {
			lag = fmt.Sprintf("%.1f / %.1f / %.1f", float64(r.SwitchLagBytes)/(1<<20), float64(r.SlotLagAtSwitch)/(1<<20), float64(r.SentLagAtSwitch)/(1<<20))
		}
		w("| %s | %.1f | %s | %s | %s | %s |\n", r.Scenario, r.LockWindowMS, f1(r.ServerLockMS), f1(r.SyncMS), lag, strings.Join(parts, "; "))
	}
	w("\n")

	md.WriteString(verifySection(costs))

	// Bulk change at the switch.
	w("## 3. Bulk transaction at the switch\n\n")
	w("pg_tat with its defaults under the fixed-rate writer; right before the switch's first lock request, after its last catch-up round (TestHook point `dependents-read`) one transaction of its own connection runs `UPDATE t SET bid = bid + 1` on the first rows and `DELETE` of the last original rows, and commits. The switch must not apply that backlog under its lock (it postpones, catches up outside the lock, tries again). *stall after commit* = max(worst latency of a writer transaction due after the bulk commit, longest gap between completions after it): what the switch adds; *whole run* includes the writer waiting on the bulk's own row locks, which any bulk UPDATE causes. The result check subtracts the deleted rows and their balances.\n\n")
	w("| scenario | updated | deleted | bulk s | switch postponed | failed lock attempts | lock held ms | stall after commit ms (max latency / max gap) | stall whole run ms | switch max ms | time s | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range results {
		if bs := r.Bulk; bs != nil {
			if r.Status != "ok" {
				w("| %s | | | | | | | | | | | %s: %s |\n", r.Scenario, r.Status, short(r.Note))
				continue
			}
			w("| %s | %d | %d | %.1f | %d | %d | **%.0f** | %.0f (%.0f / %.0f) | %.0f | %s | %.1f | ok |\n", r.Scenario, bs.Updated, bs.Deleted, bs.Seconds, bs.Postponed, r.LockAttempts, r.LockWindowMS,
				bs.StallAfterMS, bs.MaxAfterMS, bs.GapAfterMS, r.Writer.StallMS, f1(r.Writer.SwitchMS), r.Seconds)
		}
	}
	w("\n")

	// pg_repack.
	w("## 4. pg_repack side by side\n\n")
	if repack.unavailable != "" {
		w("Skipped: %s.\n\n", repack.unavailable)
	} else {
		w("%s, `pg_repack --no-superuser-check --table t` with its defaults (`CREATE EXTENSION pg_repack` in each scenario's database, untimed). pg_repack cannot change a column type (this version has no option for it), so it does what it can on the same table in the same run: the full online rebuild (copy, log replay, index build, swap). It takes an ACCESS EXCLUSIVE lock at its start (to install its log trigger) and at the swap; under the writer those show as the longest stall. Ratios: best against best, median against median.\n\n", repack.version)
		w("| rows | runs | pg_repack s best / median | blocking ALTER s best / median | pg_repack × blocking best / median | pg_tat defaults s best / median | defaults ÷ pg_repack best / median |\n|---|---|---|---|---|---|---|\n")
		for _, n := range sizesSeen {
			k := key{n, "pg_repack", 0}
			if best(k) == 0 {
				continue
			}
			bl, d := key{n, "blocking", 0}, key{n, "defaults", dj}
			ratio := func(a, b float64) string {
				if a == 0 || b == 0 {
					return "–"
				}
				return fmt.Sprintf("%.2f", a/b)
			}
			w("| %s | %d | %.2f / %.2f | %s / %s | %s / %s | %s / %s | %s / %s |\n", fmtRows(n), len(secs[k]), best(k), med(k), f2(best(bl)), f2(med(bl)),
				ratio(best(k), best(bl)), ratio(med(k), med(bl)), f2(best(d)), f2(med(d)), ratio(best(d), best(k)), ratio(med(d), med(k)))
		}
		w("\nUnder the writer (same writer as section 2; pg_tat's rows for the same mode are there):\n\n| scenario | time s | longest stall ms | max latency ms | max gap ms | TPS during %% | pg_tat trigger j1, same mode: longest stall ms |\n|---|---|---|---|---|---|---|\n")
		for _, r := range results {
			if r.Kind != "writer" || r.Method != "pg_repack" || r.Status != "ok" {
				continue
			}
			other := "–"
			for _, o := range results {
				if o.Kind == "writer" && o.Method == "trigger" && o.CopyJobs == 1 && o.Status == "ok" && o.Writer.TargetTPS == r.Writer.TargetTPS && o.Rows == r.Rows {
					other = fmt.Sprintf("%.0f (lock window %.0f)", o.Writer.StallMS, o.LockWindowMS)
				}
			}
			w("| %s | %.1f | **%.0f** | %.0f | %.0f | %.0f | %s |\n", r.Scenario, r.Seconds, r.Writer.StallMS, r.Writer.MaxMS, r.Writer.MaxGapMS, r.Writer.DuringPct, other)
		}
		w("\n")
	}
	w("## Raw data\n\n`results.jsonl`: one JSON object per scenario (all fields above, phase durations, writer statistics).\n")

	if err := os.WriteFile(filepath.Join(outDir(), "REPORT.md"), []byte(md.String()), 0o644); err != nil {
		return err
	}
	fmt.Println(md.String())
	return nil
}

func short(s string) string {
	s = strings.ReplaceAll(strings.ReplaceAll(s, "|", "/"), "\n", " ")
	if len(s) > 140 {
		s = s[:140] + "…"
	}
	return s
}
