package replicate

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Capture methods.
const (
	CaptureTrigger = "trigger"
	CaptureLogical = "logical"
)

// Options are the knobs of one migration. They mirror the original pg_tat
// flags and the named arguments of tat.alter.
type Options struct {
	Command string // one ALTER TABLE (or pg_tat's "alter table T move column A before B")

	// RunAs is the role whose right to ALTER the table is checked (the
	// caller of tat.alter). Empty means the connection's current_user.
	RunAs string
	// Schema is the schema of the table when Command names it without one
	// (tat.alter resolved the name with the caller's search_path, which
	// the engine's sessions do not share). Empty: the connection's
	// search_path decides.
	Schema string

	Capture                       string // trigger | logical
	CopyDataJobs                  int
	CreateIndexJobs               int
	BatchSize                     int
	LockTimeout                   time.Duration // first cut-over lock attempt; grows per attempt
	TimeBetweenLocks              time.Duration
	MinDeltaRows                  int64
	WorkMem                       string // e.g. "64MB"; empty keeps the server's
	MaintenanceWorkMem            string
	MaxParallelMaintenanceWorkers int  // -1 keeps the server's
	ManualSwitch                  bool // stop in waiting_switch until Control says switch
	StopBeforeSwitch              bool // return after the catch-up, leaving the capture running (--no-switch-table)
	SkipFKValidation              bool
	MaxLockAttempts               int           // 0 = unlimited
	CatchupTimeout                time.Duration // give up when the backlog never drops below MinDeltaRows

	// Continue reuses the shadow objects of an earlier, interrupted run of
	// the same command (copy resumes from the checkpoint, finished indexes
	// are kept). --continue-create-indexes and --continue-switch-table map here.
	Continue bool

	// CopyDataFilter is a boolean SQL expression over the original's columns:
	// only matching rows are copied, and the delta apply re-reads rows with
	// the same filter, so the new table holds exactly the rows matching at
	// the switch (the original's --copy-data-filter).
	CopyDataFilter string
	// CommandBeforeSwitch / CommandAfterSwitch run inside the cut-over
	// transaction (after the lock and the last delta / after the swap), as
	// RunAs when set.
	CommandBeforeSwitch, CommandAfterSwitch string
	// DryRun checks everything and prints the plan and the statements of
	// prepare (run in a transaction that is rolled back); nothing changes.
	DryRun bool
	// VacuumFreeze runs VACUUM (FREEZE, ANALYZE) on the loaded shadow instead
	// of ANALYZE, so the new table causes no anti-wraparound vacuum later.
	VacuumFreeze bool

	// PartialMode migrates a partitioned partition with its partitions and
	// attaches it back to its parent (the original's --partial-mode). A
	// leaf partition or an inheritance child is migrated alone either way.
	PartialMode bool

	// Verify proves the shadow equal to the transformed original before the
	// switch (phase verify), recopying ranges that differ. On by default: the
	// copy checksums what it reads, so verify rereads the original only
	// where changes were captured since (verify.go).
	Verify bool

	// KeepOld > 0 keeps the original after the switch, as T__tat_old, in
	// sync with the new table for that long, so that a revert can switch
	// back to it (keep.go). 0: the original is dropped at the switch.
	KeepOld time.Duration

	// TestHook, when set, is called at named points of a run (tests use it to
	// corrupt a shadow row or to crash at a precise moment).
	TestHook func(ctx context.Context, point string, tx pgx.Tx) error

	// ShowQueries, when set, receives every SQL statement the engine runs.
	ShowQueries func(sql string)
}

// DefaultOptions are the defaults of the CLI and of tat.alter.
func DefaultOptions() Options {
	return Options{
		Capture:                       CaptureTrigger,
		CopyDataJobs:                  2,
		CreateIndexJobs:               2,
		BatchSize:                     10000,
		LockTimeout:                   200 * time.Millisecond,
		TimeBetweenLocks:              2 * time.Second,
		MinDeltaRows:                  1000,
		MaxParallelMaintenanceWorkers: -1,
		CatchupTimeout:                time.Hour,
		Verify:                        true,
	}
}

// Validate rejects option values the engine cannot honour.
func (o Options) Validate() error {
	switch {
	case o.Capture != CaptureTrigger && o.Capture != CaptureLogical:
		return fmt.Errorf("capture must be %q or %q, not %q", CaptureTrigger, CaptureLogical, o.Capture)
	case o.CopyDataJobs < 1:
		return fmt.Errorf("copy_data_jobs must be at least 1")
	case o.CreateIndexJobs < 1:
		return fmt.Errorf("create_index_jobs must be at least 1")
	case o.BatchSize < 1:
		return fmt.Errorf("batch_size must be at least 1")
	case o.LockTimeout <= 0:
		return fmt.Errorf("lock_timeout must be positive")
	case o.TimeBetweenLocks < 0:
		return fmt.Errorf("time_between_locks must not be negative")
	case o.MinDeltaRows < 0:
		return fmt.Errorf("min_delta_rows must not be negative")
	}
	return nil
}

// Phases, in order. They are the values of tat.status.phase.
const (
	PhasePrepare  = "prepare"
	PhaseCapture  = "capture"
	PhaseCopy     = "copy"
	PhaseIndex    = "index"
	PhaseAnalyze  = "analyze"
	PhaseCatchup  = "catchup"
	PhaseVerify   = "verify"
	PhaseSwitch   = "switch"
	PhaseValidate = "validate"
)

// Progress is a snapshot of a running migration.
type Progress struct {
	Phase        string
	Table        string // schema-qualified, quoted
	RowsCopied   int64
	RowsTotal    int64 // estimate
	DeltaBacklog int64
	LockAttempts int
	Waiting      bool   // waiting for a manual switch
	Paused       bool   // held by Steering.Paused
	Throttle     string // why the engine is holding back, if it is
	LagBytes     int64  // WAL not yet consumed by logical capture
}

// Reporter receives what the engine does. The sidecar writes it to
// tat.migrations / tat.events; the CLI prints it. Calls come from several
// goroutines.
type Reporter interface {
	// Progress is called on phase changes and at least every few seconds.
	Progress(ctx context.Context, p Progress)
	// Event records one thing a DBA cares about (phase change, lock retry, ...).
	Event(ctx context.Context, phase, message string)
}

// Control lets the driver steer a running migration. The engine polls it
// between batches and while waiting for a manual switch.
type Control interface {
	// SwitchRequested reports whether a manual switch was asked for.
	SwitchRequested(ctx context.Context) (bool, error)
}

// NopReporter discards everything.
type NopReporter struct{}

func (NopReporter) Progress(context.Context, Progress)    {}
func (NopReporter) Event(context.Context, string, string) {}

// Steering is what the driver may change while a migration runs.
type Steering struct {
	Paused         bool          // hold at the next safe point until false
	ThrottleReason string        // non-empty: hold (the reason is reported), then ask again
	BatchSize      int           // 0 = unchanged
	LockTimeout    time.Duration // 0 = unchanged
	BetweenLocks   time.Duration // 0 = unchanged
}

// Steerer is an optional extension of Control. The engine polls it (at most
// twice a second) between copy batches, between catch-up rounds, while
// waiting for a switch and before each lock attempt.
type Steerer interface {
	Steer(ctx context.Context) (Steering, error)
}
