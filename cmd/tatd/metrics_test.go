package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/listener"
)

// /metrics shows jobs by state and the running job's progress with {job,
// table} labels, and passes promtool check metrics when promtool is installed.
func TestMetricsEndpoint(t *testing.T) {
	t.Parallel()
	url, c := crashDB(t, []string{"big"}, 200000)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	l, err := listener.New(listener.Config{DatabaseURL: url, PollInterval: 500 * time.Millisecond, RunnerID: "metrics-test", Log: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	srv := httptest.NewServer(metricsHandler(l))
	t.Cleanup(srv.Close)

	id := queueSlow(t, c, "big")
	waitJob(t, c, id, 60*time.Second, "copying", func(j job) bool { return j.phase == "copy" && j.copied > 0 })
	time.Sleep(1500 * time.Millisecond) // a rate sample
	body := get(t, srv.URL+"/metrics")
	for _, want := range []string{
		`tat_up 1`,
		`tat_jobs{state="running"} 1`,
		`tat_jobs{state="done"} 0`,
		`tat_runner_jobs 1`,
		`tat_job_rows_copied{job="1",table="public.big"} `,
		`tat_job_rows_per_second{job="1",table="public.big"} `,
		`tat_job_delta_backlog{job="1",table="public.big"} `,
		`tat_job_lock_attempts{job="1",table="public.big"} 0`,
		`tat_job_paused{job="1",table="public.big"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("no %q in /metrics", want)
		}
	}
	if h := get(t, srv.URL+"/healthz"); h != "ok\n" {
		t.Errorf("/healthz: %q", h)
	}
	if t.Failed() {
		t.Log(body)
	}
	if p, err := exec.LookPath("promtool"); err != nil {
		t.Log("promtool not on PATH: skipping promtool check metrics")
	} else {
		cmd := exec.Command(p, "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Fatalf("promtool check metrics: %v\n%s", err, out.String())
		}
	}
	mustExec(t, c, "select tat.cancel($1)", id)
	waitJob(t, c, id, 30*time.Second, "finished", finished)
	if body := get(t, srv.URL+"/metrics"); !strings.Contains(body, `tat_runner_jobs_finished_total{state="cancelled"} 1`) {
		t.Errorf("no finished counter in\n%s", body)
	}
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}
