package bench

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
)

// serverSettings are the cluster's settings on top of testpg's defaults
// (wal_level=logical, fsync=off, full_page_writes=off). Both the blocking
// ALTER and the online run use the same server.
var serverSettings = map[string]string{
	"shared_buffers":       "1GB",
	"max_wal_size":         "8GB",
	"min_wal_size":         "1GB",
	"checkpoint_timeout":   "30min",
	"maintenance_work_mem": "256MB",
	"work_mem":             "16MB",
	// New WAL segments are not zero-filled: early scenarios would otherwise
	// pay for creating segments that later ones recycle.
	"wal_init_zero": "off",
	// The engine's sessions log every statement with its duration (see
	// serverlog_test.go); the prefix carries the pid and application name.
	"log_line_prefix": "'%m [%p] %a '",
}

var (
	cluster   *testpg.Cluster
	serverURL string
	started   = time.Now()

	resMu   sync.Mutex
	results []*result
)

func addResult(r *result) {
	resMu.Lock()
	defer resMu.Unlock()
	results = append(results, r)
}

// benchmarking reports whether -test.bench was given: only then is a
// cluster started (go test ./... compiles this package and runs nothing).
func benchmarking() bool {
	f := flag.Lookup("test.bench")
	return f != nil && f.Value.String() != ""
}

func TestMain(m *testing.M) {
	flag.Parse()
	if !benchmarking() {
		os.Exit(m.Run())
	}
	if u := os.Getenv("TAT_BENCH_DATABASE_URL"); u != "" {
		serverURL = u
	} else {
		c, err := testpg.Start(serverSettings)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: start cluster:", err)
			os.Exit(1)
		}
		cluster = c
		serverURL = c.URL
	}
	code := m.Run()
	if err := writeReport(); err != nil {
		fmt.Fprintln(os.Stderr, "bench: report:", err)
		if code == 0 {
			code = 1
		}
	}
	if cluster != nil {
		cluster.Stop()
	}
	os.Exit(code)
}

// outDir is where the report goes (BENCH_OUT, default results/ next to this file).
func outDir() string {
	if d := os.Getenv("BENCH_OUT"); d != "" {
		return d
	}
	return "results"
}

// dbURL is serverURL with another database.
func dbURL(name string) string {
	i := strings.LastIndex(serverURL, "/")
	j := strings.Index(serverURL[i:], "?")
	if j < 0 {
		return serverURL[:i+1] + name
	}
	return serverURL[:i+1] + name + serverURL[i+j:]
}

func adminExec(ctx context.Context, sqls ...string) error {
	c, err := pgx.Connect(ctx, serverURL)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	for _, s := range sqls {
		if _, err := c.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

var templates = map[int64]string{}

// template returns a database holding table t with n pgbench_accounts-like
// rows, vacuumed, frozen and analyzed; every scenario gets a file copy of it.
func template(ctx context.Context, n int64) (string, error) {
	if name, ok := templates[n]; ok {
		return name, nil
	}
	name := fmt.Sprintf("bench_tmpl_%d", n)
	if err := adminExec(ctx, "DROP DATABASE IF EXISTS "+name, "CREATE DATABASE "+name); err != nil {
		return "", err
	}
	c, err := pgx.Connect(ctx, dbURL(name))
	if err != nil {
		return "", err
	}
	defer c.Close(ctx)
	for _, s := range []string{
		"SET maintenance_work_mem = '512MB'",
		`CREATE TABLE t (aid int NOT NULL, bid int, abalance int, filler char(84))`,
		fmt.Sprintf(`INSERT INTO t SELECT g, (g - 1) / 100000 + 1, 0, '' FROM generate_series(1, %d) g`, n),
		`ALTER TABLE t ADD PRIMARY KEY (aid)`,
		`VACUUM (FREEZE, ANALYZE) t`,
	} {
		if _, err := c.Exec(ctx, s); err != nil {
			return "", fmt.Errorf("template %d: %s: %w", n, s, err)
		}
	}
	templates[n] = name
	return name, nil
}

var dbSeq int

// freshDB copies the template for n rows into a new database and returns its
// name. The copy is a file copy after a checkpoint: every scenario of a size
// starts from byte-identical files.
func freshDB(ctx context.Context, n int64) (string, error) {
	tmpl, err := template(ctx, n)
	if err != nil {
		return "", err
	}
	dbSeq++
	name := fmt.Sprintf("bench_%d", dbSeq)
	if err := adminExec(ctx, "CREATE DATABASE "+name+" TEMPLATE "+tmpl+" STRATEGY FILE_COPY", "CHECKPOINT"); err != nil {
		return "", err
	}
	// fsync is off, so the checkpoint left its writes in the page cache:
	// flush them now, or the kernel's writeback (and that of the previous
	// scenario) would run during the next measurement.
	syscall.Sync()
	return name, nil
}

func dropDB(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_ = adminExec(ctx,
		"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '"+name+"' AND NOT active",
		"DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
}

func mkdirOut() error { return os.MkdirAll(filepath.Clean(outDir()), 0o755) }
