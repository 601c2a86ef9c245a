package listener

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/sirupsen/logrus"

	"github.com/pgtat/pg_tat/replicate"
	"github.com/pgtat/pg_tat/sqlapi"
)

// finalTimeout bounds the writes that end a job (its context is cancelled by then).
const finalTimeout = 30 * time.Second

// tryClaim takes job id if this runner has room, nobody else holds it and it
// is still to be run; then it runs it in its own goroutine.
func (l *Listener) tryClaim(ctx context.Context, id int64) {
	l.mu.Lock()
	if l.stopping || l.jobs[id] != nil || len(l.jobs) >= l.cfg.MaxJobs {
		l.mu.Unlock()
		return
	}
	jobCtx, cancel := context.WithCancelCause(l.jobsCtx)
	rj := &running{cancel: cancel}
	l.jobs[id] = rj
	l.mu.Unlock()

	release := func() {
		cancel(nil)
		l.mu.Lock()
		delete(l.jobs, id)
		l.mu.Unlock()
	}
	log := l.log.WithField("job", id)
	conn, err := pgx.Connect(ctx, l.cfg.DatabaseURL)
	if err != nil {
		if ctx.Err() == nil {
			log.WithError(err).Warn("claim: connect")
		}
		release()
		return
	}
	closeConn := func() { _ = conn.Close(context.WithoutCancel(ctx)) }
	locked, err := sqlapi.TryLock(ctx, conn, id)
	if err != nil || !locked {
		if err != nil && ctx.Err() == nil {
			log.WithError(err).Warn("claim")
		}
		closeConn()
		release()
		return
	}
	job, ok, err := sqlapi.Claim(ctx, conn, id, l.cfg.RunnerID)
	if err != nil || !ok {
		if err != nil && ctx.Err() == nil {
			log.WithError(err).Warn("claim")
		}
		closeConn()
		release()
		return
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer func() {
			closeConn() // releases the advisory lock, after the final state is written
			release()
			l.wakeUp()
		}()
		l.runJob(jobCtx, job, rj)
	}()
}

// runJob runs one claimed job and writes its final state.
func (l *Listener) runJob(ctx context.Context, job sqlapi.Job, rj *running) {
	log := l.log.WithFields(logrus.Fields{"job": job.ID, "table": job.TableName})
	rep := sqlapi.NewReporter(l.pool, job.ID, log)
	ctl := sqlapi.NewControl(l.pool, job.ID)
	l.mu.Lock()
	rj.table, rj.rep, rj.ctl = job.TableName, rep, ctl
	if l.stopping {
		ctl.Drain()
	}
	l.mu.Unlock()
	runner := l.cfg.RunnerID
	var final string
	defer func() { l.metrics.finished(final) }()

	switch {
	case job.CancelRequested:
		l.finishCancelled(ctx, log, job)
		return
	case job.PauseRequested:
		l.record(ctx, log, "paused", func(ctx context.Context) error { return sqlapi.MarkPaused(ctx, l.pool, job.ID, runner) })
		return
	}
	// The "started by" event was recorded with the claim (sqlapi.Claim).
	log.WithField("attempt", job.Attempts).Info(fmt.Sprintf("started by %s (attempt %d)", runner, job.Attempts))

	var err error
	if job.Attempts > 1 && (job.Phase == replicate.PhaseValidate || job.Phase == replicate.PhaseSwitch) {
		// The earlier attempt died at or after the switch. If the switch
		// committed, its state is gone and running the command again would
		// alter the new table a second time: the job is done.
		left, lerr := replicate.HasEarlierRun(ctx, l.pool, job.TableName)
		if lerr == nil && !left {
			rep.Event(ctx, job.Phase, "the earlier attempt had switched the table before it stopped; "+
				"foreign keys it re-created NOT VALID may still need VALIDATE CONSTRAINT")
			final = sqlapi.StateDone
			l.record(ctx, log, "done", func(ctx context.Context) error { return sqlapi.MarkDone(ctx, l.pool, job.ID, runner) })
			return
		}
	}
	if sqlapi.StartsOver(job) {
		// the earlier attempt died before its copy was planned: what it left
		// cannot be continued (see sqlapi.ContinuesEarlierRun)
		phase := job.Phase
		if phase == "" {
			phase = "prepare"
		}
		rep.Event(ctx, job.Phase, fmt.Sprintf("the earlier attempt stopped in phase %s, before the copy: dropping its leftovers and starting over", phase))
		err = l.cfg.Cleanup(ctx, l.pool, job.TableName)
	}
	if err != nil {
		err = fmt.Errorf("drop the leftovers of the earlier attempt: %w", err)
	} else if err = sqlapi.ValidateCommand(job.Command); err == nil {
		opts, oerr := sqlapi.Options(job)
		if err = oerr; err == nil {
			err = l.cfg.Run(ctx, l.pool, opts, rep, ctl.WithOptions(opts, log))
		}
	}
	// the final writes get their own deadline, from now: the job's context
	// may be cancelled, and the run may have lasted longer than finalTimeout
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.cfg.finalTimeout)
	defer cancel()
	rep.Flush(fctx)

	cause := context.Cause(ctx)
	switch {
	case err == nil && rep.Reverted():
		final = sqlapi.StateReverted
		l.record(ctx, log, "reverted", func(ctx context.Context) error { return sqlapi.MarkReverted(ctx, l.pool, job.ID, runner) })
	case err == nil:
		final = sqlapi.StateDone
		l.record(ctx, log, "done", func(ctx context.Context) error { return sqlapi.MarkDone(ctx, l.pool, job.ID, runner) })
	case errors.Is(cause, errCancelled):
		final = sqlapi.StateCancelled
		l.finishCancelled(ctx, log, job)
	case errors.Is(cause, errShutdown):
		final = sqlapi.StateQueued
		l.record(ctx, log, "interrupted; queued again", func(ctx context.Context) error { return sqlapi.Requeue(ctx, l.pool, job.ID, runner) })
	default:
		final = sqlapi.StateFailed
		phase := rep.Phase()
		if phase == "" {
			phase = "prepare"
		}
		log.WithError(err).WithField("phase", phase).Error("failed")
		l.record(ctx, log, "", func(ctx context.Context) error { return sqlapi.MarkFailed(ctx, l.pool, job.ID, runner, phase, err) })
	}
}

// finishCancelled drops the leftovers of a cancelled job and marks it cancelled.
func (l *Listener) finishCancelled(ctx context.Context, log logrus.FieldLogger, job sqlapi.Job) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.cfg.finalTimeout)
	defer cancel()
	if err := l.cfg.Cleanup(cctx, l.pool, job.TableName); err != nil {
		log.WithError(err).Warn("cleanup after cancel")
		_ = sqlapi.AddEvent(cctx, l.pool, job.ID, "", "cleanup after cancel: "+err.Error())
	}
	l.record(ctx, log, "cancelled", func(ctx context.Context) error { return sqlapi.MarkCancelled(ctx, l.pool, job.ID, l.cfg.RunnerID) })
}

// record writes the end of a job (write), retried for up to Config.finalTimeout
// from now: the runner releases the job's lock right after, and a job left
// running without a lock is run again by the next runner. ctx may be
// cancelled already (only its values are used).
func (l *Listener) record(ctx context.Context, log logrus.FieldLogger, msg string, write func(context.Context) error) {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.cfg.finalTimeout)
	defer cancel()
	for {
		err := write(fctx)
		if err == nil {
			if msg != "" {
				log.Info(msg)
			}
			return
		}
		if errors.Is(err, sqlapi.ErrNotHeld) {
			log.WithError(err).Warn("cannot record the end of the job")
			return
		}
		log.WithError(err).Warn("cannot record the end of the job; retrying")
		select {
		case <-fctx.Done():
			log.WithError(err).Error("cannot record the end of the job; giving up (the next runner runs it again)")
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// startCleanup runs a tat.cleanup request in the background: a queued one,
// or a running one whose runner died. As for jobs, the runner holds the
// request's advisory lock (sqlapi.CleanupLockClass) on a connection of its
// own while it runs it; a dead runner's connection released it.
func (l *Listener) startCleanup(ctx context.Context, id int64) {
	l.mu.Lock()
	if l.stopping || l.cleanups[id] {
		l.mu.Unlock()
		return
	}
	l.cleanups[id] = true
	l.mu.Unlock()
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer func() {
			l.mu.Lock()
			delete(l.cleanups, id)
			l.mu.Unlock()
		}()
		log := l.log.WithField("request", id)
		conn, err := pgx.Connect(ctx, l.cfg.DatabaseURL)
		if err != nil {
			if ctx.Err() == nil {
				log.WithError(err).Warn("cleanup: connect")
			}
			return
		}
		defer func() { _ = conn.Close(context.WithoutCancel(ctx)) }() // releases the lock
		locked, err := sqlapi.TryLockCleanup(ctx, conn, id)
		if err != nil || !locked {
			if err != nil && ctx.Err() == nil {
				log.WithError(err).Warn("cleanup")
			}
			return
		}
		table, previous, ok, err := sqlapi.ClaimCleanup(ctx, conn, id, l.cfg.RunnerID)
		if err != nil || !ok {
			if err != nil {
				log.WithError(err).Warn("cleanup")
			}
			return
		}
		log = log.WithField("table", table)
		if previous != "" {
			log.WithField("previous_runner", previous).Info("taking over a cleanup request whose runner died")
		}
		cerr := l.cfg.Cleanup(l.jobsCtx, l.pool, table)
		if cerr != nil && l.jobsCtx.Err() != nil {
			// interrupted by shutdown: left running, the next runner takes it over
			log.WithError(cerr).Info("cleanup interrupted by shutdown")
			return
		}
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.cfg.finalTimeout)
		defer cancel()
		if err := sqlapi.FinishCleanup(fctx, conn, id, l.cfg.RunnerID, cerr); err != nil {
			log.WithError(err).Warn("cleanup")
		}
		if cerr != nil {
			log.WithError(cerr).Warn("cleanup failed")
		} else {
			log.Info("cleanup done")
		}
	}()
}
