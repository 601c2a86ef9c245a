// Package testpg starts a throwaway PostgreSQL cluster for tests and hands
// each test a fresh database, so tests run in parallel against a real server.
//
// When TAT_TEST_DATABASE_URL is set, that server is used instead and each test
// still gets its own database (the role must be allowed to CREATE DATABASE).
package testpg

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	pgtat "github.com/pgtat/pg_tat"
)

// Cluster is a running PostgreSQL server owned by the test binary.
type Cluster struct {
	Dir  string
	Port int
	URL  string // superuser URL to database postgres
	bin  string
	asPG bool
}

var (
	shared  *Cluster
	baseURL string
	dbSeq   atomic.Int64
)

// Main starts the shared cluster (unless TAT_TEST_DATABASE_URL is set), runs
// the tests and stops it. Use it from TestMain: os.Exit(testpg.Main(m)).
func Main(m *testing.M) int {
	if u := os.Getenv("TAT_TEST_DATABASE_URL"); u != "" {
		baseURL = u
		return m.Run()
	}
	c, err := Start(map[string]string{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "testpg:", err)
		return 1
	}
	shared = c
	baseURL = c.URL
	code := m.Run()
	c.Stop()
	return code
}

// BinDir finds the server binaries: $PG_BIN, else the newest Debian install.
func BinDir() (string, error) {
	if d := os.Getenv("PG_BIN"); d != "" {
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[j])))
		return vi > vj
	})
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	return "", fmt.Errorf("no PostgreSQL server binaries found (install Debian's postgresql package or set PG_BIN)")
}

// ClientBinDir lists the directories searched for client programs (pg_dump,
// psql), best first: $PG_CLIENT_BIN, the server's BinDir, then every Debian
// install, newest first. The prebuilt server binaries that `make test-matrix`
// uses ship no client programs.
func ClientBinDir() []string {
	var dirs []string
	if d := os.Getenv("PG_CLIENT_BIN"); d != "" {
		dirs = append(dirs, d)
	}
	if d, err := BinDir(); err == nil {
		dirs = append(dirs, d)
	}
	deb, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(deb, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(deb[i])))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(deb[j])))
		return vi > vj
	})
	return append(dirs, deb...)
}

// PgDump returns the path of a pg_dump able to dump the server at url (its
// major version at least the server's; pg_dump refuses newer servers), or
// skips the test when there is none.
func PgDump(t testing.TB, url string) string {
	t.Helper()
	p, seen := LookPgDump(t, url)
	if p == "" {
		t.Skipf("testpg: no pg_dump of major >= %d to dump this server (found %v); set PG_CLIENT_BIN to its bin directory",
			ServerVersionNum(t, url)/10000, seen)
	}
	return p
}

// LookPgDump is PgDump without the skip: "" (and the pg_dumps it saw) when
// there is none.
func LookPgDump(t testing.TB, url string) (string, []string) {
	t.Helper()
	server := ServerVersionNum(t, url) / 10000
	var seen []string
	for _, d := range ClientBinDir() {
		p := filepath.Join(d, "pg_dump")
		out, err := exec.Command(p, "--version").Output()
		if err != nil {
			continue
		}
		// "pg_dump (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)"
		f := strings.Fields(string(out))
		if len(f) < 3 {
			continue
		}
		major, _ := strconv.Atoi(strings.SplitN(f[2], ".", 2)[0])
		if major >= server {
			return p, nil
		}
		seen = append(seen, fmt.Sprintf("%s (%d)", p, major))
	}
	return "", seen
}

var (
	versionOnce sync.Once
	versionNum  int
	versionErr  error
)

// Version returns server_version_num of the shared server (the cluster
// started by Main, or TAT_TEST_DATABASE_URL), e.g. 170010.
func Version(t testing.TB) int {
	t.Helper()
	versionOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, baseURL)
		if err != nil {
			versionErr = err
			return
		}
		defer c.Close(ctx)
		versionErr = c.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&versionNum)
	})
	if versionErr != nil {
		t.Fatalf("testpg: server_version_num: %v", versionErr)
	}
	return versionNum
}

// ServerVersionNum returns current_setting('server_version_num') of the
// server at url, e.g. 170010.
func ServerVersionNum(t testing.TB, url string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("testpg: connect: %v", err)
	}
	defer c.Close(ctx)
	var num int
	if err := c.QueryRow(ctx, "select current_setting('server_version_num')::int").Scan(&num); err != nil {
		t.Fatalf("testpg: server_version_num: %v", err)
	}
	return num
}

// Start initialises and starts a new cluster. settings override the defaults
// (wal_level=logical, fsync=off, ...). As root, the server runs as the
// postgres OS user because initdb and postgres refuse to run as root.
func Start(settings map[string]string) (*Cluster, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "tat-pg-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{Dir: dir, bin: bin, asPG: os.Geteuid() == 0}
	if c.asPG {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root needs the postgres OS user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := c.run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"); err != nil {
		return nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	c.Port = port
	conf := map[string]string{
		"listen_addresses":        "'127.0.0.1'",
		"port":                    strconv.Itoa(port),
		"unix_socket_directories": "'" + dir + "'",
		"wal_level":               "logical",
		"fsync":                   "off",
		"full_page_writes":        "off",
		"max_connections":         "300",
		"max_replication_slots":   "30",
		"max_wal_senders":         "30",
		"shared_buffers":          "128MB",
		"log_min_messages":        "warning",
		"logging_collector":       "off",
	}
	for k, v := range settings {
		conf[k] = v
	}
	var b strings.Builder
	for k, v := range conf {
		fmt.Fprintf(&b, "%s = %s\n", k, v)
	}
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	_, err = f.WriteString(b.String())
	f.Close()
	if err != nil {
		return nil, err
	}
	if out, err := c.run("pg_ctl", "-D", data, "-l", filepath.Join(dir, "server.log"), "-w", "-t", "60", "start"); err != nil {
		return nil, fmt.Errorf("pg_ctl start: %v: %s", err, out)
	}
	c.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	return c, nil
}

// Stop stops the server immediately and removes its files.
func (c *Cluster) Stop() {
	_, _ = c.run("pg_ctl", "-D", filepath.Join(c.Dir, "data"), "-m", "immediate", "-w", "stop")
	_ = os.RemoveAll(c.Dir)
}

// Restart stops the server with the given mode (immediate simulates a crash) and starts it again.
func (c *Cluster) Restart(mode string) error {
	data := filepath.Join(c.Dir, "data")
	if out, err := c.run("pg_ctl", "-D", data, "-m", mode, "-w", "stop"); err != nil {
		return fmt.Errorf("pg_ctl stop: %v: %s", err, out)
	}
	if out, err := c.run("pg_ctl", "-D", data, "-l", filepath.Join(c.Dir, "server.log"), "-w", "-t", "60", "start"); err != nil {
		return fmt.Errorf("pg_ctl start: %v: %s", err, out)
	}
	return nil
}

func (c *Cluster) run(prog string, args ...string) ([]byte, error) {
	path := filepath.Join(c.bin, prog)
	var cmd *exec.Cmd
	if c.asPG {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", path}, args...)...)
	} else {
		cmd = exec.Command(path, args...)
	}
	cmd.Dir = c.Dir
	return cmd.CombinedOutput()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Shared is the cluster started by Main, or nil when an external server is used.
func Shared() *Cluster { return shared }

// NewDB creates a fresh database for the test and returns its URL; the
// database is dropped when the test ends.
func NewDB(t testing.TB) string {
	t.Helper()
	return NewDBOn(t, baseURL)
}

// NewDBOn is NewDB on a given server.
func NewDBOn(t testing.TB, server string) string {
	t.Helper()
	if server == "" {
		t.Fatal("testpg: no server; call testpg.Main from TestMain")
	}
	name := fmt.Sprintf("tat_test_%d_%d", os.Getpid(), dbSeq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, server)
	if err != nil {
		t.Fatalf("testpg: connect: %v", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatalf("testpg: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, server)
		if err != nil {
			return
		}
		defer c.Close(ctx)
		_, _ = c.Exec(ctx, "select pg_drop_replication_slot(slot_name) from pg_replication_slots where database = $1 and not active", name)
		_, _ = c.Exec(ctx, "drop database if exists "+pgx.Identifier{name}.Sanitize()+" with (force)")
	})
	u, err := url.Parse(server)
	if err != nil {
		t.Fatalf("testpg: parse url: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// Pool opens a pool on url, closed when the test ends.
func Pool(t testing.TB, url string) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatalf("testpg: pool: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// Install runs install.sql in the database at url.
func Install(t testing.TB, url string) {
	t.Helper()
	ctx := context.Background()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("testpg: connect: %v", err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, pgtat.InstallSQL); err != nil {
		t.Fatalf("testpg: install.sql: %v", err)
	}
}

// Exec runs statements on url, failing the test on error.
func Exec(t testing.TB, url string, sql string, args ...any) {
	t.Helper()
	ctx := context.Background()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("testpg: connect: %v", err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("testpg: %s: %v", sql, err)
	}
}

// ChownToPostgres gives dir to the postgres OS user when the tests run as
// root (the server runs as that user: a tablespace directory must be its).
func ChownToPostgres(t testing.TB, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
}
