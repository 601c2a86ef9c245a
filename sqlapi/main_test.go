package sqlapi

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgtat/pg_tat/internal/testpg"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

// setup gives a fresh database with schema tat installed and a connection to it.
func setup(t *testing.T) (string, *pgx.Conn) {
	t.Helper()
	url := testpg.NewDB(t)
	testpg.Install(t, url)
	return url, connect(t, url)
}

func connect(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func mustExec(t *testing.T, c *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := c.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// wantPgError checks err is a PostgreSQL error with code whose message contains substr.
func wantPgError(t *testing.T, err error, code, substr string) {
	t.Helper()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("want SQLSTATE %s (%q), got %v", code, substr, err)
	}
	if pe.Code != code || !strings.Contains(pe.Message, substr) {
		t.Fatalf("want SQLSTATE %s with %q, got %s: %s", code, substr, pe.Code, pe.Message)
	}
}
