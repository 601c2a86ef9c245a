package goose

import (
	"context"
	"database/sql"
	"os"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/internal/testpg"
	"github.com/pgtat/pg_tat/listener"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

// startSidecar runs tatd's listener in-process until the test ends.
func startSidecar(t *testing.T, url string) {
	t.Helper()
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	l, err := listener.New(listener.Config{DatabaseURL: url, PollInterval: time.Second, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

func columnType(t *testing.T, db *sql.DB, table, column string) string {
	t.Helper()
	var typ string
	if err := db.QueryRow(`select format_type(atttypid, atttypmod) from pg_attribute
		where attrelid = $1::regclass and attname = $2`, table, column).Scan(&typ); err != nil {
		t.Fatal(err)
	}
	return typ
}

func TestGooseMigrations(t *testing.T) {
	url := testpg.NewDB(t)
	testpg.Install(t, url)
	startSidecar(t, url)
	db, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()

	// a Go migration after the SQL ones, also run through pg_tat
	goMig := goose.NewGoMigration(3, &goose.GoFunc{RunDB: AlterOnline("alter table accounts add column note text default 'x'", "10 minutes")}, nil)
	p, err := NewProvider(db, goMig)
	if err != nil {
		t.Fatal(err)
	}
	results, err := p.Up(ctx)
	if err != nil {
		t.Fatalf("goose up: %v", err)
	}
	for _, r := range results {
		t.Logf("%s %v", r.Source.Path, r.Duration)
	}
	if typ := columnType(t, db, "accounts", "balance"); typ != "bigint" {
		t.Fatalf("accounts.balance is %s after the migrations", typ)
	}
	if typ := columnType(t, db, "accounts", "note"); typ != "text" {
		t.Fatalf("accounts.note is %s", typ)
	}
	var done int
	if err := db.QueryRow("select count(*) from tat.status where state = 'done'").Scan(&done); err != nil || done != 2 {
		t.Fatalf("done jobs: %d %v", done, err)
	}
	var n int
	if err := db.QueryRow("select count(*) from accounts").Scan(&n); err != nil || n != 20000 {
		t.Fatalf("rows: %d %v", n, err)
	}
}

// Waiting inside the transaction that queued the job fails at once with
// SQLSTATE 25001 instead of hanging the deploy.
func TestWaitInsideTheSameTransactionFailsFast(t *testing.T) {
	url := testpg.NewDB(t)
	testpg.Install(t, url)
	db, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("create table t (id int primary key, v int)"); err != nil {
		t.Fatal(err)
	}
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback() //nolint:errcheck
	var id int64
	if err := tx.QueryRow("select tat.alter('alter table t alter column v type bigint')").Scan(&id); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = tx.Exec("select tat.wait($1, '10 minutes')", id)
	if err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("tat.wait in the same transaction: %v after %v", err, time.Since(start))
	}
	t.Logf("%v", err)
}
