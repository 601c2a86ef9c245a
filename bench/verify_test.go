package bench

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
)

// BenchmarkVerify measures what verify costs: the default online rewrite
// (trigger capture, copy_data_jobs=1) with verify off and on, on fresh
// copies of the same table, per size (BENCH_VERIFY_SIZES, default 2M,4M)
// and repetition (BENCH_REPS). Verify's cost is its own phase plus what
// it adds to the copy (the copy computes each range's source checksum),
// as a ratio to the copy time without verify.
func BenchmarkVerify(b *testing.B) {
	reps := max(1, envInt("BENCH_REPS", 3))
	spec := os.Getenv("BENCH_VERIFY_SIZES")
	if spec == "" {
		spec = "2M,4M"
	}
	var ns []int64
	for _, s := range strings.Split(spec, ",") {
		if n := parseRows(s); n > 0 {
			ns = append(ns, n)
		}
	}
	if len(ns) == 0 {
		b.Skip("BENCH_VERIFY_SIZES names no size")
	}
	warmUp(b, slices.Max(ns))
	for _, n := range ns {
		for rep := 1; rep <= reps; rep++ {
			for _, on := range []bool{false, true} {
				name := fmtRows(n) + "/verify-off"
				if on {
					name = fmtRows(n) + "/verify-on"
				}
				if reps > 1 {
					name += fmt.Sprintf("/rep%d", rep)
				}
				b.Run(name, func(b *testing.B) {
					r := &result{Scenario: "verify/" + name, Kind: "verify", Rows: n, Method: "trigger", CopyJobs: 1, Rep: rep, Verify: &on}
					runRewrite(b, r, nil)
				})
			}
		}
	}
}

// verifyCosts summarises the verify results per size: the verify phase
// over the copy phase of the same run; the copy's overhead (copy with
// verify on over copy with it off, medians); and the whole cost, (run
// with verify − run without) / copy without, which also counts the
// checksums the copy computes and anything verify adds to other phases.
func verifyCosts() []map[string]any {
	type acc struct{ copyOff, copyOn, ver, totOff, totOn, phase []float64 }
	by := map[int64]*acc{}
	var order []int64
	for _, r := range results {
		if r.Kind != "verify" || r.Status != "ok" || r.Verify == nil {
			continue
		}
		a := by[r.Rows]
		if a == nil {
			a = &acc{}
			by[r.Rows] = a
			order = append(order, r.Rows)
		}
		if *r.Verify {
			a.copyOn = append(a.copyOn, r.Phases["copy"])
			a.ver = append(a.ver, r.Phases["verify"])
			a.totOn = append(a.totOn, r.Seconds)
			if c := r.Phases["copy"]; c > 0 {
				a.phase = append(a.phase, r.Phases["verify"]/c)
			}
		} else {
			a.copyOff = append(a.copyOff, r.Phases["copy"])
			a.totOff = append(a.totOff, r.Seconds)
		}
	}
	minOf := func(v []float64) float64 {
		if len(v) == 0 {
			return 0
		}
		return slices.Min(v)
	}
	var out []map[string]any
	for _, n := range order {
		a := by[n]
		co, com := minOf(a.copyOff), median(a.copyOff)
		if co == 0 || len(a.totOn) == 0 {
			continue
		}
		out = append(out, map[string]any{
			"kind": "verify-cost", "rows": n, "reps": len(a.totOn),
			"copy_off_s_best": co, "copy_off_s_median": com,
			"copy_on_s_best": minOf(a.copyOn), "copy_on_s_median": median(a.copyOn),
			"verify_s_best": minOf(a.ver), "verify_s_median": median(a.ver),
			"total_off_s_best": minOf(a.totOff), "total_off_s_median": median(a.totOff),
			"total_on_s_best": minOf(a.totOn), "total_on_s_median": median(a.totOn),
			"verify_phase_over_copy_best":   minOf(a.phase),
			"verify_phase_over_copy_median": median(a.phase),
			"copy_overhead_median":          median(a.copyOn)/com - 1,
			"cost_over_copy_best":           (minOf(a.totOn) - minOf(a.totOff)) / co,
			"cost_over_copy_median":         (median(a.totOn) - median(a.totOff)) / com,
		})
	}
	return out
}

// verifySection renders the verify costs as the report's table.
func verifySection(costs []map[string]any) string {
	if len(costs) == 0 {
		return ""
	}
	var md strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&md, format, a...) }
	w("## Verify: cost against the copy\n\n")
	w("The default online rewrite (trigger capture, copy_data_jobs=1) with verify off and on, on fresh copies of the same table. ")
	w("*verify/copy* = the verify phase over the copy phase of the same run; *copy overhead* = copy phase with verify on over copy phase with it off (medians) − 1 (the copy computes each range's source checksum); ")
	w("*whole cost* = (run with verify − run without) / copy phase without: everything verify costs, as a ratio to the copy. Best = minimum over the repetitions (other sessions only ever add time), median alongside.\n\n")
	w("| rows | reps | copy s off best/median | copy s on best/median | verify s best/median | run s off best/median | run s on best/median | verify/copy best/median | copy overhead median | whole cost best/median |\n")
	w("|---|---|---|---|---|---|---|---|---|---|\n")
	pct := func(v any) string { return fmt.Sprintf("%.0f %%", 100*v.(float64)) }
	for _, c := range costs {
		w("| %s | %d | %.2f / %.2f | %.2f / %.2f | %.2f / %.2f | %.2f / %.2f | %.2f / %.2f | %s / %s | %s | %s / %s |\n",
			fmtRows(c["rows"].(int64)), c["reps"], c["copy_off_s_best"], c["copy_off_s_median"], c["copy_on_s_best"], c["copy_on_s_median"],
			c["verify_s_best"], c["verify_s_median"], c["total_off_s_best"], c["total_off_s_median"], c["total_on_s_best"], c["total_on_s_median"],
			pct(c["verify_phase_over_copy_best"]), pct(c["verify_phase_over_copy_median"]), pct(c["copy_overhead_median"]),
			pct(c["cost_over_copy_best"]), pct(c["cost_over_copy_median"]))
	}
	w("\n")
	return md.String()
}
