// Package listener is the sidecar's loop: it waits for work on a LISTEN
// channel (plus a poll on start and every PollInterval, so a job queued while
// no sidecar listened is not lost), claims jobs and runs the engine on them.
//
//	tat.alter ──NOTIFY──> Listener.session ──tryClaim──> runJob ──> Run (replicate.Run)
//	                      (LISTEN conn)       │ advisory lock on a    │ sqlapi.Reporter
//	                      poll every N s ─────┘ dedicated conn held    │ sqlapi.Control
//	                                            for the whole run      └─> done / failed / cancelled /
//	                                                                       paused / queued (shutdown)
//
// Invariants:
//   - A job runs on at most one runner: a runner holds the session advisory
//     lock (sqlapi.AdvisoryLockClass, job id) on a connection of its own for
//     the whole run, and checks the row is still to be run only after taking
//     it. A runner that dies releases the lock with its connection, so another
//     one takes the job over (state running, nobody holding the lock).
//   - A runner writes a job's final state before it releases the lock.
//   - tat.pause and tat.set do not interrupt a run: the engine polls them
//     through sqlapi.Control at its safe points and holds there while paused
//     (the job keeps its runner and lock). tat.cancel interrupts the run.
//   - On shutdown (SIGTERM) the runner stops claiming, asks its jobs to hold
//     at a safe point (bounded by ShutdownGrace), interrupts them and puts
//     them back to queued (not failed), so they resume on the next start.
//   - Losing the database (restart) is retried with exponential backoff.
package listener

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/replicate"
	"github.com/pgtat/pg_tat/sqlapi"
)

// RunFunc runs one migration; replicate.Run is the real one.
type RunFunc func(ctx context.Context, pool *pgxpool.Pool, opts replicate.Options, rep replicate.Reporter, ctl replicate.Control) error

// CleanupFunc drops the leftovers of an earlier run on a table; replicate.Cleanup is the real one.
type CleanupFunc func(ctx context.Context, pool *pgxpool.Pool, table string) error

// Config configures a Listener. Zero values take the defaults.
type Config struct {
	DatabaseURL  string        // required
	Channel      string        // default "tat"
	MaxJobs      int           // concurrent jobs, default 4
	PollInterval time.Duration // default 5s
	RunnerID     string        // written to tat.migrations.runner; default host:pid
	Log          logrus.FieldLogger

	Run     RunFunc     // default replicate.Run
	Cleanup CleanupFunc // default replicate.Cleanup

	MinBackoff time.Duration // first reconnect delay, default 250ms
	MaxBackoff time.Duration // default 30s

	// ShutdownGrace bounds how long a graceful stop waits for running jobs
	// to reach a safe point (the engine holds) before it interrupts them;
	// default 10s. Either way the jobs go back to queued (or paused).
	ShutdownGrace time.Duration

	finalTimeout time.Duration // bounds the writes that end a job; default finalTimeout (tests shorten it)
}

// Causes of a job's context cancellation.
var (
	errCancelled = errors.New("cancelled by tat.cancel")
	errShutdown  = errors.New("runner shutting down")
)

// running is a job claimed by this listener.
type running struct {
	cancel context.CancelCauseFunc
	table  string
	ctl    *sqlapi.Control  // nil while being claimed
	rep    *sqlapi.Reporter // nil while being claimed
}

// Listener runs jobs from tat.migrations.
type Listener struct {
	cfg  Config
	log  logrus.FieldLogger
	pool *pgxpool.Pool

	jobsCtx    context.Context
	cancelJobs context.CancelCauseFunc

	metrics *Metrics

	mu       sync.Mutex
	jobs     map[int64]*running // running (or being claimed) here
	cleanups map[int64]bool
	wake     context.CancelFunc // interrupts the current wait for notifications
	stopping bool
	wg       sync.WaitGroup
}

// New checks cfg and fills in defaults.
func New(cfg Config) (*Listener, error) {
	if cfg.DatabaseURL == "" {
		return nil, errors.New("listener: database URL is required")
	}
	if cfg.Channel == "" {
		cfg.Channel = "tat"
	}
	if cfg.MaxJobs <= 0 {
		cfg.MaxJobs = 4
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 5 * time.Second
	}
	if cfg.RunnerID == "" {
		host, _ := os.Hostname()
		cfg.RunnerID = fmt.Sprintf("%s:%d", host, os.Getpid())
	}
	if cfg.Log == nil {
		cfg.Log = logrus.StandardLogger()
	}
	if cfg.Run == nil {
		cfg.Run = replicate.Run
	}
	if cfg.Cleanup == nil {
		cfg.Cleanup = replicate.Cleanup
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 250 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.ShutdownGrace <= 0 {
		cfg.ShutdownGrace = 10 * time.Second
	}
	if cfg.finalTimeout <= 0 {
		cfg.finalTimeout = finalTimeout
	}
	l := &Listener{
		cfg:      cfg,
		log:      cfg.Log.WithField("runner", cfg.RunnerID),
		jobs:     map[int64]*running{},
		cleanups: map[int64]bool{},
	}
	l.metrics = newMetrics(l)
	return l, nil
}

// RunnerID is the name this listener writes into tat.migrations.runner.
func (l *Listener) RunnerID() string { return l.cfg.RunnerID }

// Run listens and runs jobs until ctx is cancelled, then stops gracefully:
// running jobs are cancelled, put back to queued and waited for. It returns
// nil after a graceful stop.
func (l *Listener) Run(ctx context.Context) error {
	pcfg, err := pgxpool.ParseConfig(l.cfg.DatabaseURL)
	if err != nil {
		return fmt.Errorf("listener: database URL: %w", err)
	}
	if pcfg.ConnConfig.RuntimeParams["application_name"] == "" {
		// lets the max_active_sessions throttle leave tatd's own sessions out
		pcfg.ConnConfig.RuntimeParams["application_name"] = "tatd"
	}
	// tatd's own queries never call what a table owner may plant in a
	// schema of the default search_path (public): a function there that
	// matches without the cast pg_catalog's needs would run with tatd's
	// rights. (The engine gives the owner's code its usual search_path.)
	pcfg.ConnConfig.RuntimeParams["search_path"] = "pg_catalog, pg_temp"
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("listener: open pool: %w", err)
	}
	l.mu.Lock()
	l.pool = pool
	l.mu.Unlock()
	defer pool.Close()
	l.jobsCtx, l.cancelJobs = context.WithCancelCause(context.WithoutCancel(ctx))
	defer l.stop()

	backoff := l.cfg.MinBackoff
	for ctx.Err() == nil {
		connected, err := l.session(ctx)
		if ctx.Err() != nil {
			break
		}
		if connected {
			backoff = l.cfg.MinBackoff
		}
		l.log.WithError(err).WithField("retry_in", backoff.String()).Warn("database connection lost")
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, l.cfg.MaxBackoff)
	}
	return nil
}

// stop asks every running job to hold at its next safe point, waits for
// that (at most ShutdownGrace), then interrupts them: they go back to queued
// (paused when a pause was requested) and the next runner continues them.
func (l *Listener) stop() {
	l.mu.Lock()
	l.stopping = true
	n := len(l.jobs)
	for _, j := range l.jobs {
		if j.ctl != nil {
			j.ctl.Drain()
		}
	}
	l.mu.Unlock()
	if n > 0 {
		l.log.WithField("jobs", n).Info("stopping: holding running jobs at a safe point")
		deadline := time.Now().Add(l.cfg.ShutdownGrace)
		for time.Now().Before(deadline) && !l.allHeld() {
			time.Sleep(100 * time.Millisecond)
		}
	}
	l.cancelJobs(errShutdown)
	l.wg.Wait()
	l.log.Info("stopped")
}

// allHeld reports whether every running job holds at a safe point.
func (l *Listener) allHeld() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, j := range l.jobs {
		if j.rep == nil || !j.rep.Held() {
			return false
		}
	}
	return true
}

// session LISTENs on one connection until it fails or ctx ends.
func (l *Listener) session(ctx context.Context) (connected bool, err error) {
	conn, err := pgx.Connect(ctx, l.cfg.DatabaseURL)
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "listen "+pgx.Identifier{l.cfg.Channel}.Sanitize()); err != nil {
		return false, fmt.Errorf("listen %s: %w", l.cfg.Channel, err)
	}
	l.log.WithField("channel", l.cfg.Channel).Info("listening")
	l.poll(ctx)
	lastPoll := time.Now()
	for {
		wait := max(l.cfg.PollInterval-time.Since(lastPoll), 0)
		wctx, cancel := context.WithTimeout(ctx, wait)
		l.mu.Lock()
		l.wake = cancel
		l.mu.Unlock()
		n, err := conn.WaitForNotification(wctx)
		woken := wctx.Err() != nil
		cancel()
		if ctx.Err() != nil {
			return true, ctx.Err()
		}
		switch {
		case err == nil:
			l.handle(ctx, n.Payload)
		case woken && !conn.IsClosed():
			// poll interval elapsed, or a job finished and freed a slot
		default:
			return true, fmt.Errorf("wait for notification: %w", err)
		}
		if woken || time.Since(lastPoll) >= l.cfg.PollInterval {
			l.poll(ctx)
			lastPoll = time.Now()
		}
	}
}

// wakeUp interrupts the wait for notifications so the loop polls now.
func (l *Listener) wakeUp() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.wake != nil {
		l.wake()
	}
}

// handle reacts to one notification payload: "<id>", "<action>:<id>".
func (l *Listener) handle(ctx context.Context, payload string) {
	action, arg, found := strings.Cut(payload, ":")
	if !found {
		action, arg = "", payload
	}
	id, err := strconv.ParseInt(strings.TrimSpace(arg), 10, 64)
	if err != nil {
		l.log.WithField("payload", payload).Warn("ignoring notification")
		return
	}
	switch action {
	case "", "resume":
		l.tryClaim(ctx, id)
	case "cancel":
		l.signal(id, errCancelled)
	case "pause", "switch", "set":
		// the engine polls pause_requested, switch_requested and the options
		// through sqlapi.Control (replicate.Steerer) at its safe points
	case "cleanup":
		l.startCleanup(ctx, id)
	default:
		l.log.WithField("payload", payload).Warn("ignoring notification")
	}
}

// signal cancels a job running here.
func (l *Listener) signal(id int64, cause error) {
	l.mu.Lock()
	j := l.jobs[id]
	l.mu.Unlock()
	if j != nil {
		l.log.WithField("job", id).Info(cause.Error())
		j.cancel(cause)
	}
}

// poll claims pending jobs, checks control flags of jobs running here (in
// case a notification was missed) and starts queued cleanups.
func (l *Listener) poll(ctx context.Context) {
	ids, err := sqlapi.Pending(ctx, l.pool, 1000)
	if err != nil {
		l.log.WithError(err).Warn("poll")
		return
	}
	for _, id := range ids {
		if ctx.Err() != nil || !l.hasCapacity() {
			break
		}
		l.tryClaim(ctx, id)
	}
	if ctx.Err() != nil {
		return
	}
	l.mu.Lock()
	running := make([]int64, 0, len(l.jobs))
	for id := range l.jobs {
		running = append(running, id)
	}
	l.mu.Unlock()
	if len(running) > 0 {
		flags, err := sqlapi.ControlFlags(ctx, l.pool, running)
		if err != nil {
			l.log.WithError(err).Warn("poll")
		}
		for id, f := range flags {
			if f.Cancel {
				l.signal(id, errCancelled)
			}
		}
	}
	cleanups, err := sqlapi.PendingCleanups(ctx, l.pool)
	if err != nil {
		l.log.WithError(err).Warn("poll")
		return
	}
	for _, id := range cleanups {
		if ctx.Err() != nil {
			return
		}
		l.startCleanup(ctx, id)
	}
}

func (l *Listener) hasCapacity() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return !l.stopping && len(l.jobs) < l.cfg.MaxJobs
}
