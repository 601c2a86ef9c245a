// Package sqlapi is the Go side of the SQL contract in install.sql.
//
//	tat.alter(...) ──> tat.migrations row ──> listener ──> sqlapi.Claim
//	                                                       sqlapi.Options ──> replicate.Run
//	                                  tat.migrations <── sqlapi.Reporter <──┘ (progress, phase)
//	                                  tat.events     <──┘                     (timeline)
//	                 tat.switch ──> switch_requested ──> sqlapi.Control ──> engine
//
// It turns job rows into replicate.Options, implements replicate.Reporter over
// tat.migrations / tat.events, replicate.Control and replicate.Steerer over
// the job row (switch_requested, pause_requested, options changed by tat.set,
// throttling limits: see control.go and README.md), and
// moves jobs between states (running, done, failed, cancelled, paused, back to
// queued). It also re-validates a job's command with the PostgreSQL parser
// (ValidateCommand) before anything runs it.
//
// Invariants:
//   - SQL lives in constants here; values are always bound as parameters.
//   - A state change that ends a run is made only by the runner that holds
//     the job (the row's runner column), so a sidecar that lost its claim
//     cannot overwrite the state written by the one that took it over.
//   - Every state change records a row in tat.events.
package sqlapi
