package listener

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/sirupsen/logrus"

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
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalTimeout)
	defer cancel()

	switch {
	case job.CancelRequested:
		l.finishCancelled(fctx, log, job)
		return
	case job.PauseRequested:
		l.logFinal(log, sqlapi.MarkPaused(fctx, l.pool, job.ID, runner), "paused")
		return
	}
	log.WithField("attempt", job.Attempts).Info("claimed")
	rep.Event(ctx, job.Phase, fmt.Sprintf("started by %s (attempt %d)", runner, job.Attempts))

	var err error
	if err = sqlapi.ValidateCommand(job.Command); err == nil {
		opts, oerr := sqlapi.Options(job)
		if err = oerr; err == nil {
			err = l.cfg.Run(ctx, l.pool, opts, rep, ctl.WithOptions(opts, log))
		}
	}
	rep.Flush(fctx)

	cause := context.Cause(ctx)
	switch {
	case err == nil:
		final = sqlapi.StateDone
		l.logFinal(log, sqlapi.MarkDone(fctx, l.pool, job.ID, runner), "done")
	case errors.Is(cause, errCancelled):
		final = sqlapi.StateCancelled
		l.finishCancelled(fctx, log, job)
	case errors.Is(cause, errShutdown):
		final = sqlapi.StateQueued
		l.logFinal(log, sqlapi.Requeue(fctx, l.pool, job.ID, runner), "interrupted; queued again")
	default:
		final = sqlapi.StateFailed
		phase := rep.Phase()
		if phase == "" {
			phase = "prepare"
		}
		log.WithError(err).WithField("phase", phase).Error("failed")
		l.logFinal(log, sqlapi.MarkFailed(fctx, l.pool, job.ID, runner, phase, err), "")
	}
}

// finishCancelled drops the leftovers of a cancelled job and marks it cancelled.
func (l *Listener) finishCancelled(ctx context.Context, log logrus.FieldLogger, job sqlapi.Job) {
	if err := l.cfg.Cleanup(ctx, l.pool, job.TableName); err != nil {
		log.WithError(err).Warn("cleanup after cancel")
		_ = sqlapi.AddEvent(ctx, l.pool, job.ID, "", "cleanup after cancel: "+err.Error())
	}
	l.logFinal(log, sqlapi.MarkCancelled(ctx, l.pool, job.ID, l.cfg.RunnerID), "cancelled")
}

func (l *Listener) logFinal(log logrus.FieldLogger, err error, msg string) {
	if err != nil {
		log.WithError(err).Warn("cannot record the end of the job")
		return
	}
	if msg != "" {
		log.Info(msg)
	}
}

// startCleanup runs a tat.cleanup request in the background.
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
		table, ok, err := sqlapi.ClaimCleanup(ctx, l.pool, id, l.cfg.RunnerID)
		if err != nil || !ok {
			if err != nil {
				log.WithError(err).Warn("cleanup")
			}
			return
		}
		log = log.WithField("table", table)
		cerr := l.cfg.Cleanup(l.jobsCtx, l.pool, table)
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalTimeout)
		defer cancel()
		if err := sqlapi.FinishCleanup(fctx, l.pool, id, l.cfg.RunnerID, cerr); err != nil {
			log.WithError(err).Warn("cleanup")
		}
		if cerr != nil {
			log.WithError(cerr).Warn("cleanup failed")
		} else {
			log.Info("cleanup done")
		}
	}()
}
