package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/pgtat/pg_tat/internal/testpg"
)

func TestMain(m *testing.M) { os.Exit(testpg.Main(m)) }

func TestVersionAndHelp(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"--version"}, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "tatd ") {
		t.Fatalf("--version: %d %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"--help"}, &out, &errOut); code != 0 || !strings.Contains(out.String()+errOut.String(), "TAT_DATABASE_URL") {
		t.Fatalf("--help: %d %q", code, out.String()+errOut.String())
	}
}

func TestConfigErrors(t *testing.T) {
	t.Setenv("TAT_DATABASE_URL", "")
	var out, errOut bytes.Buffer
	if code := run(nil, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "DATABASE_URL") {
		t.Fatalf("missing URL: %d %q", code, errOut.String())
	}
	t.Setenv("TAT_DATABASE_URL", "postgres://localhost/x")
	t.Setenv("TAT_LOG_FORMAT", "xml")
	errOut.Reset()
	if code := run(nil, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "TAT_LOG_FORMAT") {
		t.Fatalf("bad format: %d %q", code, errOut.String())
	}
}

func TestInstallFlag(t *testing.T) {
	url := testpg.NewDB(t)
	t.Setenv("TAT_DATABASE_URL", url)
	for i := 0; i < 2; i++ {
		var out, errOut bytes.Buffer
		if code := run([]string{"--install"}, &out, &errOut); code != 0 {
			t.Fatalf("--install #%d: %d %s", i+1, code, errOut.String())
		}
	}
	c, err := pgx.Connect(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	var n int
	if err := c.QueryRow(context.Background(), "select count(*) from tat.status").Scan(&n); err != nil {
		t.Fatal(err)
	}
}
