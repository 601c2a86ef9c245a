package bench

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// The engine's sessions run with log_min_duration_statement = 0 and
// application_name = engineApp, so the server log tells how long each of
// its statements took on the server, including the catalog queries the
// engine does not trace. serverLog reads what the server logged for one run.

const engineApp = "pg_tat_bench_engine"

func serverLogPath() string {
	if cluster == nil {
		return ""
	}
	return filepath.Join(cluster.Dir, "server.log")
}

func serverLogSize() int64 {
	fi, err := os.Stat(serverLogPath())
	if err != nil {
		return 0
	}
	return fi.Size()
}

var logLine = regexp.MustCompile(`^\S+ \S+ \S+ \[(\d+)\] (\S*) LOG:  duration: ([0-9.]+) ms  (?:statement|(?:parse|bind|execute) [^:]*): (.*)$`)

type logStmt struct {
	pid int
	ms  float64
	sql string
}

// engineStatements returns the engine's logged statements from offset on.
func engineStatements(offset int64) []logStmt {
	f, err := os.Open(serverLogPath())
	if err != nil {
		return nil
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		return nil
	}
	var out []logStmt
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	cont := false
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "\t") {
			if cont && len(out) > 0 && len(out[len(out)-1].sql) < 200 {
				out[len(out)-1].sql += " " + strings.TrimSpace(l)
			}
			continue
		}
		m := logLine.FindStringSubmatch(l)
		cont = m != nil && m[2] == engineApp
		if !cont {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		ms, _ := strconv.ParseFloat(m[3], 64)
		out = append(out, logStmt{pid: pid, ms: ms, sql: m[4]})
	}
	return out
}

// serverLockBreakdown sums, per statement, the server time of what the
// cut-over session ran from its last LOCK TABLE on; the second value is the
// total.
func serverLockBreakdown(stmts []logStmt) ([]stmtTime, float64) {
	lock := -1
	for i, s := range stmts {
		if strings.HasPrefix(s.sql, "LOCK TABLE") {
			lock = i
		}
	}
	if lock < 0 {
		return nil, 0
	}
	pid := stmts[lock].pid
	sum := map[string]float64{}
	var order []string
	total := 0.0
	for _, s := range stmts[lock+1:] {
		if s.pid != pid {
			continue
		}
		if s.sql == "commit" || s.sql == "COMMIT" {
			break
		}
		sql := strings.Join(strings.Fields(s.sql), " ")
		if len(sql) > 90 {
			sql = sql[:90] + "…"
		}
		if _, ok := sum[sql]; !ok {
			order = append(order, sql)
		}
		sum[sql] += s.ms
		total += s.ms
	}
	out := make([]stmtTime, 0, len(order))
	for _, s := range order {
		out = append(out, stmtTime{SQL: s, MS: sum[s]})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].MS > out[j].MS })
	return out, total
}
