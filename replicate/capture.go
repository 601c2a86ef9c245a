package replicate

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// capture is a way of recording concurrent changes. Both implementations
// feed the same delta table (T__tat_delta: seq, op, key columns), and one
// applier (catchup.go) turns it into shadow rows by re-reading the
// original by key, so the two methods differ only in how keys arrive:
//
//	trigger: AFTER ROW / AFTER TRUNCATE triggers insert keys (capture_trigger.go)
//	logical: a pgoutput stream from a replication slot; a goroutine
//	         decodes changes and inserts their keys (capture_logical.go)
type capture interface {
	// start begins capturing, before the copy. It returns the snapshot
	// every copy batch must read ("" when any fresh snapshot will do).
	start(ctx context.Context) (snapshot string, err error)
	// copied is called once the copy is complete: the exported snapshot
	// is no longer needed.
	copied(ctx context.Context) error
	// sync runs inside the cut-over transaction, after the lock is held:
	// on return every change committed before the lock is in the delta.
	sync(ctx context.Context, tx pgx.Tx) error
	// presync runs in the cut-over transaction right before its lock
	// request: it brings the delta up to now, so that sync (under the
	// lock) has only what arrives in between left to wait for.
	presync(ctx context.Context, tx pgx.Tx) error
	// stop releases what capture holds (slot, publication, goroutines).
	// It is called at the end of every run, successful or not.
	stop(ctx context.Context) error
	// lagBytes is how much WAL the capture has not consumed yet.
	lagBytes() int64
}

// newCapture picks the implementation for Options.Capture.
func (m *migration) newCapture() capture {
	if m.opts.Capture == CaptureLogical {
		return newLogicalCapture(m)
	}
	return triggerCapture{m: m}
}
