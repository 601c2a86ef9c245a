package replicate

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Logical capture (capture => 'logical') reads the original's changes from
// WAL instead of from a trigger: no trigger on the hot table, and no extra
// WAL per write.
//
//	start   publication "T__tat_pub" FOR TABLE T; a replication connection;
//	        CREATE_REPLICATION_SLOT tat_<db oid>_<table oid> TEMPORARY LOGICAL
//	        pgoutput EXPORT_SNAPSHOT. A connection of its own imports that
//	        snapshot in a transaction held open until the copy is done and
//	        exports it again; every copy batch imports that (copy.go), so the
//	        copy sees exactly what precedes the slot's consistent point and
//	        the stream exactly what follows it. Then START_REPLICATION from
//	        the consistent point (pgoutput proto 1, messages on): one
//	        goroutine decodes the stream and inserts the keys of changed
//	        rows into T__tat_delta, like the trigger does, while the copy
//	        runs (the walsender reads the copy's WAL as it is written).
//	copied  end the transaction holding the snapshot.
//	presync (switch, right before the lock request) the same wait as sync,
//	        outside the lock, then the delta is applied.
//	sync    (cut-over, lock held) pg_logical_emit_message(false, 'pg_tat',
//	        <token>) and wait until the goroutine has decoded up to it and
//	        committed the delta rows before it: every change committed
//	        before the lock is then in the delta. Before PostgreSQL 17 the
//	        consumer flushes WAL right away (flushWAL), as the walsender
//	        only reads flushed WAL.
//	stop    stop the goroutine, close the connections, drop the publication,
//	        make sure the slot is gone.
//
// What goes into the delta: op 'U' with the new key for INSERT and UPDATE,
// op 'D' with the old key for DELETE and for the old key of an UPDATE that
// changed the key, op 'T' (keys NULL) for a TRUNCATE of the original and op
// 'P' (rel = the partition) for a TRUNCATE of some of its partitions; the
// applier (catchup.go) then empties the shadow (or that partition's shadow)
// and replays later keys, so a TRUNCATE is handled, not refused. Only keys:
// the applier re-reads the current row from the original, so values never
// come from the stream, and unchanged TOAST columns (sent as 'u' by
// pgoutput) are never written as NULL — they are simply not looked at.
//
// Partitioned tables: the publication FOR TABLE T publishes T's leaf
// partitions, and their changes arrive as the partitions' own (their OID,
// their column layout); the decoder maps the key columns by name per
// relation. An UPDATE that moves a row to another partition arrives as a
// DELETE and an INSERT. Copy (the exported snapshot) and cut-over go
// through T as for any table.
//
// The delta is made UNLOGGED under logical capture: it is not decoded (no
// feedback loop, no extra WAL per captured change) and is not published by
// FOR ALL TABLES / TABLES IN SCHEMA publications. It need not survive a
// server crash: such a crash also ends the temporary slot, and the run then
// starts over.
//
// Slot life cycle: the slot is TEMPORARY. It vanishes with the replication
// connection, so neither a crash of tatd nor a lost connection can orphan a
// slot that retains WAL forever. The price: a run interrupted after start
// cannot resume its stream; a continued run of a logical-capture plan starts
// over (resume() in runner.go drops the leftovers and prepares again).
//
// LSN confirmation: the flush position sent in standby status updates is
// the end of the last transaction whose keys are committed in the delta (or,
// when idle with nothing buffered, the server's reported WAL end), so WAL is
// released while the migration progresses and nothing unapplied is ever
// confirmed.
//
// Publications FOR ALL TABLES (or TABLES IN SCHEMA) elsewhere on the server
// would also publish the shadow table T__tat_new: prepare keeps it out of
// them, or warns when it cannot (publication.go), for both capture methods.
// The delta is unlogged and so never published. The run's own publication
// lists T only, so the mark changes nothing for its stream.
//
// Preflight (logicalPreflight, called from check() before anything is
// created) refuses, wrapped in ErrBadCommand: server older than 14 (no
// pgoutput messages option for the cut-over marker), wal_level <> logical,
// no free replication slot or WAL sender, a role without REPLICATION, an
// unlogged original or partition (not decoded), a replica identity that
// does not carry the key (NOTHING, DEFAULT without primary key, USING INDEX
// / DEFAULT on other columns than the key: deletes would arrive without the
// key, and the publication would make the application's UPDATE/DELETE
// fail) — checked on every leaf partition of a partitioned table, since
// each has its own — and a generated key column (pgoutput does not send
// generated columns).

const (
	logicalMsgPrefix   = "pg_tat"
	logicalFlushPrefix = "pg_tat_flush"         // flushWAL's message, ignored
	logicalFlushRows   = 5000                   // flush the key buffer at this size
	logicalWake        = 100 * time.Millisecond // flush and status at least this often
	logicalStatusEvery = 2 * time.Second        // standby status when nothing changed
	logicalSyncTimeout = 30 * time.Second       // cut-over wait for the marker
	logicalSlotGone    = 10 * time.Second       // stop: wait for the temporary slot to go
)

// logicalSlotName is the slot of the run on table oid in database db:
// lowercase [a-z0-9_], well under 63 bytes, unique on the cluster.
func logicalSlotName(db, oid uint32) string { return fmt.Sprintf("tat_%d_%d", db, oid) }

func logicalPubName(table string) string { return shadowName(table, "__tat_pub") }

// capturePub is the run's own publication under logical capture ("" under
// trigger capture): the switch neither carries it over nor counts it as a
// dependent of the original.
func (m *migration) capturePub() string {
	if lc, ok := m.capture.(*logicalCapture); ok {
		return lc.pub
	}
	return ""
}

// logicalCapture is capture => 'logical'.
type logicalCapture struct {
	m        *migration
	slot     string
	pub      string
	version  int
	repl     *pgconn.PgConn // replication connection (walsender)
	data     *pgx.Conn      // the goroutine's own connection for delta inserts
	holder   *pgx.Conn      // holds the copy's snapshot until copied()
	startLSN pglogrepl.LSN
	insert   string // INSERT INTO delta ... FROM unnest(...)

	cancel context.CancelFunc
	done   chan struct{} // closed when the goroutine has ended

	mu      sync.Mutex
	markers map[string]bool // cut-over markers decoded (and flushed before)
	notify  chan struct{}   // closed and replaced when a marker is decoded or the stream ends
	ended   bool
	err     error // why the stream ended

	pendingMarkers atomic.Int64  // markers emitted, not yet decoded: force a WAL flush
	flushNow       atomic.Bool   // a marker was just emitted: flush WAL without waiting
	markerSeq      atomic.Int64  // for unique marker tokens
	acked          atomic.Uint64 // confirmed flush LSN
	walEnd         atomic.Uint64 // server WAL end seen in the stream
	streaming      atomic.Bool
	stopped        atomic.Bool

	lagMu sync.Mutex
	lagAt time.Time
	lag   int64
}

func newLogicalCapture(m *migration) capture { return &logicalCapture{m: m} }

// logicalPreflight refuses logical capture, before anything is created, when
// the server, the engine's role or the table cannot support it.
func (m *migration) logicalPreflight(ctx context.Context, db execer) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: capture 'logical': %s", ErrBadCommand, fmt.Sprintf(format, a...))
	}
	var (
		version, freeSlots, freeSenders int
		walLevel, role                  string
		canReplicate, canPublish        bool
	)
	rows, err := db.Query(ctx, `select current_setting('server_version_num')::int, current_setting('wal_level'),
		session_user::text, coalesce((select rolsuper or rolreplication from pg_roles where rolname = session_user), false),
		current_setting('max_replication_slots')::int - (select count(*) from pg_replication_slots)::int,
		current_setting('max_wal_senders')::int - (select count(*) from pg_stat_activity where backend_type = 'walsender')::int,
		has_database_privilege(current_database(), 'CREATE')`)
	if err == nil {
		_, err = pgx.ForEachRow(rows, []any{&version, &walLevel, &role, &canReplicate, &freeSlots, &freeSenders, &canPublish}, func() error { return nil })
	}
	if err != nil {
		return fmt.Errorf("%w: capture 'logical': preflight: %v", ErrBadCommand, err)
	}
	switch {
	case version < 140000:
		return bad("needs PostgreSQL 14 or later (server is %d); use capture 'trigger'", version)
	case walLevel != "logical":
		return bad("wal_level is %q, it must be 'logical' (ALTER SYSTEM SET wal_level = logical, then restart); or use capture 'trigger'", walLevel)
	case !canReplicate:
		return bad("role %s has neither REPLICATION nor SUPERUSER (ALTER ROLE %s REPLICATION); or use capture 'trigger'", role, qi(role))
	case !canPublish:
		return bad("role %s may not create a publication in this database (GRANT CREATE ON DATABASE)", role)
	case freeSlots < 1:
		return bad("no free replication slot (max_replication_slots is used up); drop an unused slot or raise max_replication_slots")
	case freeSenders < 1:
		return bad("no free WAL sender (max_wal_senders is used up); raise max_wal_senders")
	}
	if m.t.Persistence != "p" {
		return bad("table %s is not WAL-logged (unlogged or temporary): its changes cannot be decoded; use capture 'trigger'", m.tableRef())
	}
	var generated []string
	rows, err = db.Query(ctx, `select coalesce(array_agg(a.attname::text), '{}') from pg_attribute a
		where a.attrelid = $1 and a.attname = any($2::text[]) and a.attgenerated <> ''`, m.t.OID, m.t.Key)
	if err == nil {
		_, err = pgx.ForEachRow(rows, []any{&generated}, func() error { return nil })
	}
	if err != nil {
		return fmt.Errorf("%w: capture 'logical': preflight: %v", ErrBadCommand, err)
	}
	if len(generated) > 0 {
		return bad("key column(s) %s of %s are generated, and pgoutput does not send generated columns; use capture 'trigger'", strings.Join(generated, ", "), m.tableRef())
	}
	// Rows live in the leaves: the table itself, or every leaf partition
	// of a partitioned table. Each leaf has its own persistence (an
	// unlogged leaf is not decoded) and its own replica identity, which
	// decides what its UPDATE and DELETE write to WAL as the old key (the
	// partitioned table's own identity is never used).
	leaves := []uint32{m.t.OID}
	if m.t.inherits() {
		// Every table of an inheritance tree holds rows of its own.
		leaves = append(leaves, oidsOf(localPartitions(m.t.Partitions))...)
	}
	if m.t.Kind == "p" {
		leaves = leaves[:0]
		for _, pt := range m.t.Partitions {
			if pt.PartKey == "" && !pt.Foreign {
				leaves = append(leaves, pt.OID)
			}
		}
	}
	var schema, rel, persistence, replIdent string
	var identCols []string
	rows, err = db.Query(ctx, `select n.nspname::text, c.relname::text, c.relpersistence::text, c.relreplident::text,
		coalesce((select array_agg(a.attname::text) from pg_index i
		          join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
		          where i.indrelid = c.oid and ((c.relreplident = 'd' and i.indisprimary) or (c.relreplident = 'i' and i.indisreplident))), '{}')
		from pg_class c join pg_namespace n on n.oid = c.relnamespace
		where c.oid = any($1::oid[]) order by n.nspname, c.relname`, leaves)
	if err != nil {
		return fmt.Errorf("%w: capture 'logical': preflight: %v", ErrBadCommand, err)
	}
	var refusal error
	_, err = pgx.ForEachRow(rows, []any{&schema, &rel, &persistence, &replIdent, &identCols}, func() error {
		if refusal != nil {
			return nil
		}
		what := "table " + ident(schema, rel)
		if m.t.inherits() && rel != m.t.Name {
			what = "inheritance child " + ident(schema, rel) + " of " + m.tableRef()
		}
		if m.t.Kind == "p" {
			what = "partition " + ident(schema, rel) + " of " + m.tableRef()
		}
		if persistence != "p" {
			refusal = bad("%s is not WAL-logged (unlogged or temporary): its changes cannot be decoded; use capture 'trigger'", what)
			return nil
		}
		if replIdent == "f" {
			return nil
		}
		have := map[string]bool{}
		for _, c := range identCols {
			have[c] = true
		}
		var missing []string
		for _, k := range m.t.Key {
			if !have[k] {
				missing = append(missing, k)
			}
		}
		if replIdent == "n" || len(identCols) == 0 || len(missing) > 0 {
			refusal = bad("the replica identity of %s does not carry its key (%s): deletes would reach the stream without it, "+
				"and publishing the table would make UPDATE/DELETE fail; set REPLICA IDENTITY to the key (or FULL), or use capture 'trigger'",
				what, strings.Join(m.t.Key, ", "))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w: capture 'logical': preflight: %v", ErrBadCommand, err)
	}
	return refusal
}

func (c *logicalCapture) start(ctx context.Context) (string, error) {
	m := c.m
	var dbOID uint32
	if err := m.pool.QueryRow(ctx, `select oid, current_setting('server_version_num')::int from pg_database where datname = current_database()`).Scan(&dbOID, &c.version); err != nil {
		return "", fmt.Errorf("logical capture: %w", err)
	}
	c.slot = logicalSlotName(dbOID, m.t.OID)
	c.pub = logicalPubName(m.t.Name)
	c.acked.Store(0)

	// The delta is written by the stream consumer only: unlogged, it adds
	// no WAL, is not decoded again and is not published anywhere.
	if _, err := m.exec(ctx, m.pool, "ALTER TABLE "+m.deltaIdent()+" SET UNLOGGED"); err != nil {
		return "", fmt.Errorf("logical capture: %w", err)
	}
	// The publication belongs to the engine's own role (m.admin), like the
	// cut-over transaction that takes the table out of it and the cleanup
	// that drops it; the data work runs as the table's owner (m.pool).
	if err := dropLeftoverPublication(ctx, m, m.admin, c.pub, m.t.OID); err != nil {
		return "", err
	}
	// The publication must exist before the slot: pgoutput looks it up as
	// of the decoded change. A partitioned table is published as its leaf
	// partitions (publish_via_partition_root off, the default): see decoder.
	if _, err := m.exec(ctx, m.admin, "CREATE PUBLICATION "+qi(c.pub)+" FOR TABLE "+m.t.ident()); err != nil {
		return "", fmt.Errorf("logical capture: create publication: %w", err)
	}

	cfg := m.admin.Config().ConnConfig.Config.Copy()
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = "pg_tat " + c.slot
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.DeadlineContextWatcherHandler{Conn: pc.Conn()}
	}
	repl, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return "", fmt.Errorf("logical capture: replication connection: %w", err)
	}
	c.repl = repl

	// Slot creation waits until every transaction that has written (on the
	// whole cluster) has ended. Say so when it takes a while.
	waitDone := make(chan struct{})
	go func() {
		select {
		case <-waitDone:
			return
		case <-time.After(2 * time.Second):
		}
		var pids []int32
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_ = m.pool.QueryRow(qctx, `select coalesce(array_agg(pid order by pid), '{}') from pg_stat_activity
			where backend_xid is not null and backend_type = 'client backend' and pid <> pg_backend_pid()`).Scan(&pids)
		m.event(ctx, PhaseCapture, fmt.Sprintf("creating replication slot %s: waiting for open write transactions to end (sessions %v)", c.slot, pids))
	}()
	started := time.Now()
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, c.slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{
		Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	// "initial slot snapshot too large" (40001): more transactions were in
	// flight across the cluster than a snapshot can list; a moment later
	// there are fewer.
	for try := 1; try <= 5 && isSerializationFailure(err) && ctx.Err() == nil; try++ {
		m.event(ctx, PhaseCapture, fmt.Sprintf("creating replication slot %s: %v; retrying", c.slot, err))
		time.Sleep(time.Duration(try) * 200 * time.Millisecond)
		res, err = pglogrepl.CreateReplicationSlot(ctx, repl, c.slot, "pgoutput", pglogrepl.CreateReplicationSlotOptions{
			Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	}
	close(waitDone)
	if err != nil {
		return "", fmt.Errorf("logical capture: create replication slot %s: %w", c.slot, err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return "", fmt.Errorf("logical capture: slot consistent point %q: %w", res.ConsistentPoint, err)
	}
	c.startLSN = lsn
	c.acked.Store(uint64(lsn))
	m.event(ctx, PhaseCapture, fmt.Sprintf("replication slot %s created at %s in %s; the copy reads its snapshot",
		c.slot, lsn, time.Since(started).Round(time.Millisecond)))
	snap, err := c.holdSnapshot(ctx, res.SnapshotName)
	if err != nil {
		return "", err
	}
	if err := c.startStream(ctx); err != nil {
		return "", err
	}
	return snap, nil
}

// holdSnapshot imports the slot's exported snapshot into a transaction of
// its own connection, kept open until the copy is done, and exports it
// again from there. The slot's export is valid only while its replication
// connection runs no other command; held elsewhere, it lets the stream
// start now, before the copy: the walsender then decodes the copy's WAL
// (which it must read through, though nothing of it is published) while
// the copy runs, instead of after it while the catch-up waits.
func (c *logicalCapture) holdSnapshot(ctx context.Context, exported string) (string, error) {
	cfg := c.m.admin.Config().ConnConfig.Copy()
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	// Idle in its transaction for the whole copy, by design.
	cfg.RuntimeParams["idle_in_transaction_session_timeout"] = "0"
	cfg.RuntimeParams["application_name"] = "pg_tat " + c.slot + " snapshot"
	holder, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return "", fmt.Errorf("logical capture: connection holding the copy's snapshot: %w", err)
	}
	c.holder = holder
	var snap string
	if _, err := holder.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"); err != nil {
		return "", fmt.Errorf("logical capture: hold the copy's snapshot: %w", err)
	}
	if _, err := holder.Exec(ctx, "SET TRANSACTION SNAPSHOT "+quoteLiteral(exported)); err != nil {
		return "", fmt.Errorf("logical capture: import the slot's snapshot: %w", err)
	}
	if err := holder.QueryRow(ctx, "SELECT pg_export_snapshot()").Scan(&snap); err != nil {
		return "", fmt.Errorf("logical capture: export the copy's snapshot: %w", err)
	}
	return snap, nil
}

// copied ends the transaction holding the copy's snapshot.
func (c *logicalCapture) copied(ctx context.Context) error {
	if c.repl == nil {
		return errors.New("logical capture was not started")
	}
	c.releaseSnapshot(ctx)
	return nil
}

// releaseSnapshot closes the connection holding the copy's snapshot (its
// transaction ends with it), if still open.
func (c *logicalCapture) releaseSnapshot(ctx context.Context) {
	if c.holder == nil {
		return
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_ = c.holder.Close(cctx)
	c.holder = nil
}

// startStream starts the consumer: START_REPLICATION from the slot's
// consistent point, decoded into the delta by a goroutine.
func (c *logicalCapture) startStream(ctx context.Context) error {
	m := c.m
	p := m.plan
	cols, sel, params := []string{"op", "rel"}, []string{`u.op::"char"`, "u.rel::oid"}, []string{"$1::text[]", "$2::text[]"}
	names := []string{"op", "rel"}
	for i := range p.Key {
		cols = append(cols, fmt.Sprintf("k%d", i+1))
		sel = append(sel, fmt.Sprintf("u.k%d::%s", i+1, p.KeyTypes[i]))
		params = append(params, fmt.Sprintf("$%d::text[]", i+3))
		names = append(names, fmt.Sprintf("k%d", i+1))
	}
	c.insert = fmt.Sprintf("INSERT INTO %s (%s) SELECT %s FROM unnest(%s) WITH ORDINALITY AS u(%s, ord) ORDER BY u.ord",
		m.deltaIdent(), strings.Join(cols, ", "), strings.Join(sel, ", "), strings.Join(params, ", "), strings.Join(names, ", "))

	// The consumer's own connection (never one of the pool's: during the
	// cut-over, writers queued behind the lock may hold them all), set up
	// like the pool's sessions (SET ROLE to the table's owner).
	dataCfg := m.pool.Config().ConnConfig.Copy()
	if dataCfg.RuntimeParams == nil {
		dataCfg.RuntimeParams = map[string]string{}
	}
	// flushWAL's commit must flush locally (not asynchronously, not
	// waiting for a synchronous standby); the delta it writes is unlogged.
	dataCfg.RuntimeParams["synchronous_commit"] = "local"
	data, err := pgx.ConnectConfig(ctx, dataCfg)
	if err != nil {
		return fmt.Errorf("logical capture: connection for the delta: %w", err)
	}
	c.data = data
	if ac := m.pool.Config().AfterConnect; ac != nil {
		if err := ac(ctx, data); err != nil {
			return fmt.Errorf("logical capture: connection for the delta: %w", err)
		}
	}
	err = pglogrepl.StartReplication(ctx, c.repl, c.slot, c.startLSN, pglogrepl.StartReplicationOptions{
		Mode:       pglogrepl.LogicalReplication,
		PluginArgs: []string{"proto_version '1'", "publication_names " + quoteLiteral(qi(c.pub)), "messages 'true'"},
	})
	if err != nil {
		return fmt.Errorf("logical capture: start replication: %w", err)
	}
	c.notify = make(chan struct{})
	c.markers = map[string]bool{}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c.cancel = cancel
	c.done = make(chan struct{})
	c.streaming.Store(true)
	go c.stream(sctx)
	m.event(ctx, m.currentPhase(), fmt.Sprintf("streaming changes from slot %s", c.slot))
	return nil
}

// stream runs the consumer until ctx ends or the stream fails.
func (c *logicalCapture) stream(ctx context.Context) {
	defer close(c.done)
	err := c.consume(ctx)
	c.mu.Lock()
	c.ended, c.err = true, err
	close(c.notify)
	c.mu.Unlock()
	if err != nil && ctx.Err() == nil {
		c.m.event(context.WithoutCancel(ctx), c.m.currentPhase(), "logical capture stream failed: "+err.Error())
	}
}

// keyBatch holds decoded keys not yet in the delta, in stream order.
type keyBatch struct {
	ops  []string
	rels []*string   // the truncated partition of a 'P' marker, else NULL
	keys [][]*string // per key column
	xids []uint32    // the transactions that made the changes (waitVisible)
}

// from notes the transaction of the changes added last.
func (b *keyBatch) from(xid uint32) {
	if n := len(b.xids); len(b.ops) > 0 && (n == 0 || b.xids[n-1] != xid) {
		b.xids = append(b.xids, xid)
	}
}

func (b *keyBatch) add(op string, key []string) {
	b.ops = append(b.ops, op)
	b.rels = append(b.rels, nil)
	for i := range b.keys {
		if key == nil {
			b.keys[i] = append(b.keys[i], nil)
		} else {
			v := key[i]
			b.keys[i] = append(b.keys[i], &v)
		}
	}
}

// addPartition adds a 'P' marker: the partition rel was truncated.
func (b *keyBatch) addPartition(rel uint32) {
	b.add("P", nil)
	v := fmt.Sprint(rel)
	b.rels[len(b.rels)-1] = &v
}

// addIn adds a key with the table of an inheritance tree that held the row.
func (b *keyBatch) addIn(op string, key []string, rel uint32) {
	b.add(op, key)
	v := fmt.Sprint(rel)
	b.rels[len(b.rels)-1] = &v
}

func (b *keyBatch) reset() {
	b.ops = b.ops[:0]
	b.rels = b.rels[:0]
	b.xids = b.xids[:0]
	for i := range b.keys {
		b.keys[i] = b.keys[i][:0]
	}
}

// decoder turns pgoutput messages of the original into delta keys.
//
// The publication is FOR TABLE T and nothing else, so every relation in the
// stream is T or, for a partitioned T, one of its leaf partitions: pgoutput
// sends a partition's changes as the partition's own (publish_via_partition_root
// is left off), with the partition's OID and column layout. Key columns are
// looked up by name in each relation's description (partitions have T's
// column names, not necessarily its column order). Leaving the changes per
// partition is what keeps a TRUNCATE of one partition in the stream: with
// publish_via_partition_root, pgoutput drops a partition's TRUNCATE
// altogether and sends only one of the root.
type decoder struct {
	oid    uint32
	leaves map[uint32]bool // leaf partitions when the job started (partitioned T)
	inner  map[uint32]bool // intermediate partitioned tables of T
	// inherit: T is the root of an inheritance tree, every table of which
	// is published (FOR TABLE T takes its descendants); each key carries
	// the table that held the row, each TRUNCATE one marker per table.
	inherit bool
	key     []string // key column names on the original
	keyIdx  map[uint32][]int
	batch   keyBatch
	inTxn   bool
	xid     uint32        // the transaction being decoded
	commit  pglogrepl.LSN // end of the last decoded transaction
	marker  string        // a cut-over marker decoded in the last message
	prefix  string        // tokens of this run start with it
}

// newDecoder decodes the stream of the original t with key key; parts is
// t's partition tree (empty when t is not partitioned).
func newDecoder(oid uint32, key []string, parts []partition) *decoder {
	d := &decoder{oid: oid, key: key, keyIdx: map[uint32][]int{}, leaves: map[uint32]bool{}, inner: map[uint32]bool{}}
	d.inherit = len(parts) > 0 && parts[0].Inherit
	for _, pt := range parts {
		if pt.PartKey == "" {
			d.leaves[pt.OID] = true
		} else {
			d.inner[pt.OID] = true
		}
	}
	d.batch.keys = make([][]*string, len(key))
	return d
}

func (d *decoder) handle(walData []byte) error {
	msg, err := pglogrepl.Parse(walData)
	if err != nil {
		return fmt.Errorf("decode pgoutput: %w", err)
	}
	switch msg := msg.(type) {
	case *pglogrepl.BeginMessage:
		d.inTxn, d.xid = true, msg.Xid
	case *pglogrepl.CommitMessage:
		d.inTxn = false
		d.commit = msg.TransactionEndLSN
		d.batch.from(d.xid)
	case *pglogrepl.RelationMessage:
		// Relation messages repeat mid-stream (after an invalidation): key
		// by OID, never by name.
		idx := make([]int, len(d.key))
		for i, k := range d.key {
			idx[i] = -1
			for j, col := range msg.Columns {
				if col.Name == k {
					idx[i] = j
				}
			}
			if idx[i] < 0 {
				return fmt.Errorf("key column %q of %s.%s is not in the stream: was the table altered during the migration?", k, msg.Namespace, msg.RelationName)
			}
		}
		d.keyIdx[msg.RelationID] = idx
	case *pglogrepl.InsertMessage:
		k, err := d.tupleKey(msg.RelationID, msg.Tuple, nil)
		if err != nil {
			return fmt.Errorf("insert: %w", err)
		}
		d.add(msg.RelationID, "U", k)
	case *pglogrepl.UpdateMessage:
		// The old key tuple ('K', or 'O' with REPLICA IDENTITY FULL) comes
		// only when the identity columns changed; without it the key is
		// the new tuple's. Unchanged TOASTed key values ('u') are taken
		// from the old tuple. An UPDATE that moves a row to another
		// partition is not an UPDATE in the stream: it arrives as a DELETE
		// from the old partition and an INSERT into the new one.
		k, err := d.tupleKey(msg.RelationID, msg.NewTuple, msg.OldTuple)
		if err != nil {
			return fmt.Errorf("update: %w", err)
		}
		d.add(msg.RelationID, "U", k)
		if msg.OldTuple != nil {
			old, err := d.tupleKey(msg.RelationID, msg.OldTuple, nil)
			if err != nil {
				return fmt.Errorf("update (old key): %w", err)
			}
			if !equalKeys(old, k) {
				d.add(msg.RelationID, "D", old)
			}
		}
	case *pglogrepl.DeleteMessage:
		old, err := d.tupleKey(msg.RelationID, msg.OldTuple, nil)
		if err != nil {
			return fmt.Errorf("delete: %w", err)
		}
		d.add(msg.RelationID, "D", old)
	case *pglogrepl.TruncateMessage:
		d.truncate(msg.RelationIDs)
	case *pglogrepl.LogicalDecodingMessage:
		if msg.Prefix == logicalMsgPrefix && strings.HasPrefix(string(msg.Content), d.prefix) {
			d.marker = string(msg.Content)
		}
	}
	return nil
}

// truncate turns the relations of a TRUNCATE into the markers trigger
// capture writes: 'T' when the whole original was emptied, else one 'P'
// per truncated leaf partition, which the apply replays on that
// partition's shadow only.
//
// pgoutput never lists a partitioned table (it has no rows of its own): a
// TRUNCATE of a partitioned T arrives as the list of all its leaves, and
// one of an intermediate partitioned table as the list of its leaves. A
// list covering every leaf is the whole table. A partition the job does
// not know (attached during the run) gets a 'P' too: the apply refuses it,
// as it does under trigger capture.
func (d *decoder) truncate(ids []uint32) {
	if d.inherit {
		// Each table of an inheritance tree was emptied of its own rows
		// only: a marker per table, replayed on that table's shadow.
		for _, id := range ids {
			op := "P"
			if id == d.oid {
				op = "T"
			}
			d.batch.addIn(op, nil, id)
		}
		return
	}
	listed := map[uint32]bool{}
	for _, id := range ids {
		listed[id] = true
	}
	whole := listed[d.oid]
	if !whole && len(d.leaves) > 0 {
		whole = true
		for leaf := range d.leaves {
			whole = whole && listed[leaf]
		}
	}
	if whole {
		d.batch.add("T", nil)
		return
	}
	for _, id := range ids {
		if !d.inner[id] {
			d.batch.addPartition(id)
		}
	}
}

// add adds a changed row's key, with its table for an inheritance tree.
func (d *decoder) add(rel uint32, op string, key []string) {
	if d.inherit {
		d.batch.addIn(op, key, rel)
		return
	}
	d.batch.add(op, key)
}

// tupleKey reads the key columns of t, a tuple of relation rel (text
// format), falling back to alt for unchanged TOASTed values.
func (d *decoder) tupleKey(rel uint32, t, alt *pglogrepl.TupleData) ([]string, error) {
	keyIdx := d.keyIdx[rel]
	if keyIdx == nil {
		return nil, fmt.Errorf("change of relation %d before its description", rel)
	}
	if t == nil {
		return nil, errors.New("no key in the change (replica identity changed during the migration?)")
	}
	k := make([]string, len(keyIdx))
	for i, j := range keyIdx {
		if j >= len(t.Columns) {
			return nil, fmt.Errorf("key column %q missing from the tuple", d.key[i])
		}
		col := t.Columns[j]
		if col.DataType == pglogrepl.TupleDataTypeToast && alt != nil && j < len(alt.Columns) {
			col = alt.Columns[j]
		}
		switch col.DataType {
		case pglogrepl.TupleDataTypeText:
			k[i] = string(col.Data)
		case pglogrepl.TupleDataTypeNull:
			return nil, fmt.Errorf("key column %q arrived NULL (is it in the replica identity?)", d.key[i])
		default:
			return nil, fmt.Errorf("key column %q arrived as %q, not as text", d.key[i], col.DataType)
		}
	}
	return k, nil
}

func equalKeys(a, b []string) bool {
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// consume is the stream loop. Reads use a read deadline on the socket, one
// per wake-up (not a context per message); at each wake-up it flushes the
// buffered keys, forces a WAL flush when a cut-over marker is pending, and
// sends a standby status update.
func (c *logicalCapture) consume(ctx context.Context) error {
	m := c.m
	d := newDecoder(m.t.OID, m.plan.Key, m.plan.Partitions)
	d.commit, d.prefix = c.startLSN, c.slot+"/"
	acked, sent := c.startLSN, pglogrepl.LSN(0)
	lastStatus := time.Time{}
	netConn := c.repl.Conn()
	defer netConn.SetReadDeadline(time.Time{}) //nolint:errcheck

	flush := func() error {
		if len(d.batch.ops) > 0 {
			if d.inTxn { // a flush in the middle of a large transaction
				d.batch.from(d.xid)
			}
			if err := c.waitVisible(ctx, d.batch.xids); err != nil {
				return err
			}
			args := []any{d.batch.ops, d.batch.rels}
			for _, k := range d.batch.keys {
				args = append(args, k)
			}
			if _, err := m.exec(ctx, c.data, c.insert, args...); err != nil {
				return fmt.Errorf("insert keys into the delta: %w", err)
			}
			d.batch.reset()
		}
		// Everything up to the end of the last decoded transaction is now
		// committed in the delta.
		if d.commit > acked {
			acked = d.commit
			c.acked.Store(uint64(acked))
		}
		return nil
	}
	status := func() error {
		lastStatus = time.Now()
		return pglogrepl.SendStandbyStatusUpdate(ctx, c.repl, pglogrepl.StandbyStatusUpdate{WALWritePosition: acked})
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := netConn.SetReadDeadline(time.Now().Add(logicalWake)); err != nil {
			return err
		}
		reply := false
		// flushNow is checked after the deadline is set: marker() sets it
		// before it moves the deadline to now, so a request made while the
		// consumer was busy elsewhere is seen here rather than overwritten
		// by the deadline above (which would delay the flush by a wake-up).
		for !c.flushNow.Load() {
			msg, err := c.repl.ReceiveMessage(context.Background())
			if err != nil {
				if pgconn.Timeout(err) {
					break
				}
				return fmt.Errorf("receive: %w", err)
			}
			switch msg := msg.(type) {
			case *pgproto3.CopyData:
				if len(msg.Data) == 0 {
					continue
				}
				switch msg.Data[0] {
				case pglogrepl.PrimaryKeepaliveMessageByteID:
					ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
					if err != nil {
						return err
					}
					if uint64(ka.ServerWALEnd) > c.walEnd.Load() {
						c.walEnd.Store(uint64(ka.ServerWALEnd))
					}
					// Idle, nothing buffered: all WAL the server has sent is
					// consumed (transactions arrive whole, at commit).
					if !d.inTxn && len(d.batch.ops) == 0 && ka.ServerWALEnd > d.commit {
						d.commit = ka.ServerWALEnd
					}
					reply = reply || ka.ReplyRequested
				case pglogrepl.XLogDataByteID:
					x, err := pglogrepl.ParseXLogData(msg.Data[1:])
					if err != nil {
						return err
					}
					if uint64(x.ServerWALEnd) > c.walEnd.Load() {
						c.walEnd.Store(uint64(x.ServerWALEnd))
					}
					if err := d.handle(x.WALData); err != nil {
						return err
					}
					if d.marker != "" {
						if err := flush(); err != nil {
							return err
						}
						c.markerSeen(d.marker)
						d.marker = ""
						reply = true
					} else if len(d.batch.ops) >= logicalFlushRows {
						if err := flush(); err != nil {
							return err
						}
					}
				}
			case *pgproto3.ErrorResponse:
				return pgconn.ErrorResponseToPgError(msg)
			case *pgproto3.CopyDone:
				return errors.New("the server ended the replication stream")
			}
			if reply {
				break
			}
		}
		if err := flush(); err != nil {
			return err
		}
		if c.flushNow.Swap(false) || c.pendingMarkers.Load() > 0 {
			if err := c.flushWAL(ctx); err != nil {
				return err
			}
		}
		if reply || acked != sent || time.Since(lastStatus) >= logicalStatusEvery {
			if err := status(); err != nil {
				return fmt.Errorf("standby status: %w", err)
			}
			sent = acked
		}
	}
}

// visibleWait is how long waitVisible waits before it says so in an event.
const visibleWait = 5 * time.Second

// waitVisible waits until every transaction in xids is visible to a new
// snapshot, before their keys go into the delta. The delta holds keys
// only: the apply re-reads each key's row from the original, in a snapshot
// that sees the delta row. A transaction is decoded once its commit record
// is flushed, but it becomes visible to other sessions only when it leaves
// the proc array, a moment later (much later when it waits for a
// synchronous standby, which happens in between): a key put in the delta
// in that moment would be re-read without its change and trimmed, and the
// change lost. Once a snapshot sees a transaction, every later one does,
// so a snapshot taken after this wait, as the apply's is (it sees the
// delta rows inserted after it), sees the changes.
func (c *logicalCapture) waitVisible(ctx context.Context, xids []uint32) error {
	start, pause, told := time.Now(), time.Millisecond, false
	for {
		var snap string
		if err := c.data.QueryRow(ctx, "SELECT pg_current_snapshot()::text").Scan(&snap); err != nil {
			return fmt.Errorf("snapshot for the decoded transactions: %w", err)
		}
		pending, err := notVisible(snap, xids)
		if err != nil {
			return err
		}
		if pending == 0 {
			return nil
		}
		if !told && time.Since(start) > visibleWait {
			told = true
			c.m.event(ctx, c.m.currentPhase(), fmt.Sprintf("logical capture: waiting for %d decoded transaction(s) to become visible "+
				"(committed in the WAL but not ended yet: a synchronous standby that does not answer?)", pending))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 50*time.Millisecond)
	}
}

// notVisible counts the transactions of xids (32-bit, as pgoutput sends
// them) that snap (pg_current_snapshot's text, xmin:xmax:xip,...) sees
// as in progress. A 32-bit xid is taken in the epoch that puts it nearest
// to xmax.
func notVisible(snap string, xids []uint32) (int, error) {
	parts := strings.SplitN(snap, ":", 3)
	if len(parts) != 3 {
		return 0, fmt.Errorf("snapshot %q: not xmin:xmax:xip", snap)
	}
	xmax, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("snapshot %q: %w", snap, err)
	}
	inProgress := map[uint64]bool{}
	if parts[2] != "" {
		for _, x := range strings.Split(parts[2], ",") {
			v, err := strconv.ParseUint(x, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("snapshot %q: %w", snap, err)
			}
			inProgress[v] = true
		}
	}
	n := 0
	for _, x := range xids {
		full := int64(xmax&^0xffffffff | uint64(x))
		switch d := full - int64(xmax); {
		case d > 1<<31:
			full -= 1 << 32
		case d < -(1 << 31):
			full += 1 << 32
		}
		if full >= int64(xmax) || inProgress[uint64(full)] {
			n++
		}
	}
	return n, nil
}

// flushWAL makes the server flush its WAL up to now, so that a
// non-transactional marker written before is decoded right away (the
// walsender only reads flushed WAL, and a non-transactional message is not
// flushed by itself before PostgreSQL 17). The flush is the commit of a
// transaction that wrote WAL and has an xid: a transactional logical message
// (prefix pg_tat_flush: the decoder ignores it). A transaction that only
// takes an xid (pg_current_xact_id()) is not enough: it wrote nothing before
// its commit record, so PostgreSQL commits it asynchronously and the WAL
// writer flushes it up to wal_writer_delay (200 ms) later. The connection
// runs with synchronous_commit = local (see copied): flushed locally,
// never waiting for a synchronous standby. One round trip, autocommit; the
// commit also wakes the walsender.
func (c *logicalCapture) flushWAL(ctx context.Context) error {
	if _, err := c.data.Exec(ctx, "SELECT pg_logical_emit_message(true, $1, '')", logicalFlushPrefix); err != nil {
		return fmt.Errorf("flush WAL for the cut-over marker: %w", err)
	}
	return nil
}

func (c *logicalCapture) markerSeen(token string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.markers != nil {
		c.markers[token] = true
	}
	if c.version < 170000 {
		c.pendingMarkers.Add(-1)
	}
	close(c.notify)
	c.notify = make(chan struct{})
}

// streamErr is why the logical stream ended before stop() (nil while it
// runs, and under trigger capture). The catch-up waits for the stream to
// reach a WAL position, which a failed stream never does: it fails the job
// with this instead of waiting for the catch-up timeout.
func (m *migration) streamErr() error {
	lc, ok := m.capture.(*logicalCapture)
	if !ok || lc.stopped.Load() || lc.done == nil {
		return nil
	}
	lc.mu.Lock()
	defer lc.mu.Unlock()
	if !lc.ended {
		return nil
	}
	return fmt.Errorf("logical capture: the replication stream has ended: %w", lc.err)
}

// sync writes a marker into WAL and waits until the consumer has decoded
// it and committed every key before it. It runs in the cut-over
// transaction, after the lock: every transaction that changed the original
// has committed before the marker, so its keys are in the delta on return
// (committed by the consumer's connection; the cut-over transaction is READ
// COMMITTED, so its next statement sees them). The original stays in the
// publication: the switch's DROP TABLE takes it out, and the read of the
// dependents skips the membership (capturePub), so the new table is not
// published. Changing the publication here would change the dependents'
// fingerprint and make the switch read them all again under the lock.
func (c *logicalCapture) sync(ctx context.Context, tx pgx.Tx) error {
	m := c.m
	started := time.Now()
	// Under the lock the wait is bounded like the last delta: a large
	// transaction committed right before the lock request (a bulk change)
	// takes the walsender as long to decode as it is large, and writers
	// would wait for it. Past lock_timeout (at least 100 ms) the switch
	// lets go; the next attempt's settle rounds decode it outside the lock.
	limit := max(m.lockTimeout(), 100*time.Millisecond)
	if err := c.markerWithin(ctx, tx, limit); errors.Is(err, errMarkerLate) {
		return fmt.Errorf("%w: the replication stream was still %d bytes behind the lock after %s; catching up outside the lock first",
			errSwitchPostponed, c.lagBytes(), limit)
	} else if err != nil {
		return err
	}
	m.event(ctx, PhaseSwitch, fmt.Sprintf("stream consumed up to the cut-over marker in %s", time.Since(started).Round(time.Millisecond)))
	return nil
}

// presync waits, before the switch's lock, for the stream to reach a marker
// written now: what the stream still has to decode under the lock (sync) is
// then only what was written between this and the lock, not whatever the
// walsender had not decoded yet (the index build's and the catch-up's WAL
// it must read through, the changes of writers since the catch-up).
func (c *logicalCapture) presync(ctx context.Context, tx pgx.Tx) error {
	started := time.Now()
	if err := c.marker(ctx, tx); err != nil {
		return fmt.Errorf("logical capture: stream up to the lock: %w", err)
	}
	if d := time.Since(started); d > 100*time.Millisecond {
		c.m.event(ctx, PhaseSwitch, fmt.Sprintf("stream consumed up to right before the lock in %s", d.Round(time.Millisecond)))
	}
	return nil
}

// stop ends the consumer, closes both connections (the temporary slot goes
// with the replication connection), drops the publication and makes sure
// the slot is gone. Stream errors are not returned: sync reports them when
// they matter, and a run that did not switch starts over anyway.
func (c *logicalCapture) stop(ctx context.Context) error {
	m := c.m
	c.stopped.Store(true)
	if c.cancel != nil {
		c.cancel()
		<-c.done
	}
	c.releaseSnapshot(ctx)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if c.data != nil {
		_ = c.data.Close(cctx)
		c.data = nil
	}
	if c.repl != nil {
		_ = c.repl.Close(cctx)
		c.repl = nil
	}
	c.streaming.Store(false)
	var errs []error
	if c.pub != "" {
		if _, err := m.exec(ctx, m.admin, "DROP PUBLICATION IF EXISTS "+qi(c.pub)); err != nil {
			errs = append(errs, fmt.Errorf("drop publication %s: %w", c.pub, err))
		}
	}
	if c.slot != "" {
		if err := waitSlotGone(ctx, m, m.admin, c.slot, logicalSlotGone); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// waitSlotGone waits for a temporary slot to be released by its ending
// walsender, and drops it if it stays behind inactive.
func waitSlotGone(ctx context.Context, m *migration, pool *pgxpool.Pool, slot string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		var active *bool
		err := pool.QueryRow(ctx, "select active from pg_replication_slots where slot_name = $1", slot).Scan(&active)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("look for slot %s: %w", slot, err)
		}
		if active != nil && !*active {
			if _, err := m.exec(ctx, pool, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", slot); err != nil {
				return fmt.Errorf("drop slot %s: %w", slot, err)
			}
			continue
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replication slot %s is still in use after %s", slot, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// lagBytes is the WAL the slot has not confirmed yet: from the stream's own
// positions while streaming, from pg_replication_slots before (at most one
// query per second).
func (c *logicalCapture) lagBytes() int64 {
	if c.slot == "" || c.stopped.Load() {
		return 0
	}
	c.lagMu.Lock()
	defer c.lagMu.Unlock()
	every := time.Second
	if c.streaming.Load() {
		every = 200 * time.Millisecond // the catch-up waits on it before the switch
	}
	if time.Since(c.lagAt) < every {
		return c.lag
	}
	c.lagAt = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	// Against the server's WAL end: the positions in the stream itself only
	// say how far the walsender has decoded, not how far it still has to go.
	var lag *int64
	var err error
	if c.streaming.Load() {
		err = c.m.admin.QueryRow(ctx, `select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint`,
			pglogrepl.LSN(c.acked.Load()).String()).Scan(&lag)
	} else {
		err = c.m.admin.QueryRow(ctx, `select pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
			from pg_replication_slots where slot_name = $1`, c.slot).Scan(&lag)
	}
	if err == nil && lag != nil {
		c.lag = max(*lag, 0)
	}
	return c.lag
}

// dropLeftoverPublication drops the job publication name when it is a
// leftover of an earlier run on table oid (it publishes that table or
// nothing); a publication of that name for anything else is an error.
func dropLeftoverPublication(ctx context.Context, m *migration, pool *pgxpool.Pool, name string, oid uint32) error {
	var exists, ours bool
	err := pool.QueryRow(ctx, `select true, not p.puballtables and not exists (
			select 1 from pg_publication_rel r where r.prpubid = p.oid and r.prrelid <> $2)
		from pg_publication p where p.pubname = $1`, name, oid).Scan(&exists, &ours)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look for publication %s: %w", name, err)
	}
	if !ours {
		return fmt.Errorf("publication %s exists and publishes other tables; it is not pg_tat's: rename it", name)
	}
	if _, err := m.exec(ctx, pool, "DROP PUBLICATION IF EXISTS "+qi(name)); err != nil {
		return fmt.Errorf("drop leftover publication %s: %w", name, err)
	}
	return nil
}

// cleanupLogical drops what a crashed logical-capture run on schema.name
// may have left: its publication and, when no walsender uses it any more,
// its slot. Called by cleanup().
func cleanupLogical(ctx context.Context, m *migration, pool *pgxpool.Pool, schema, name string) error {
	var oid, db uint32
	err := pool.QueryRow(ctx, `select c.oid, d.oid from pg_class c, pg_database d
		where c.oid = to_regclass($1) and d.datname = current_database()`, ident(schema, name)).Scan(&oid, &db)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := dropLeftoverPublication(ctx, m, pool, logicalPubName(name), oid); err != nil {
		return err
	}
	if _, err := m.exec(ctx, pool, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
		logicalSlotName(db, oid)); err != nil {
		return fmt.Errorf("drop leftover slot: %w", err)
	}
	return nil
}

// marker writes a marker into WAL through db (the cut-over transaction) and
// waits, up to logicalSyncTimeout, until the consumer has decoded it and
// committed every key before it.
func (c *logicalCapture) marker(ctx context.Context, db execer) error {
	return c.markerWithin(ctx, db, logicalSyncTimeout)
}

// errMarkerLate: the stream did not reach the marker within the wait given.
var errMarkerLate = errors.New("the replication stream did not reach the marker in time")

// markerWithin is marker, waiting up to limit: errMarkerLate past limit
// (under logicalSyncTimeout), the stream's error past logicalSyncTimeout.
func (c *logicalCapture) markerWithin(ctx context.Context, db execer, limit time.Duration) error {
	m := c.m
	if c.done == nil {
		return errors.New("logical capture is not streaming")
	}
	token := fmt.Sprintf("%s/%d/%d", c.slot, time.Now().UnixNano(), c.markerSeq.Add(1))
	emit := "SELECT pg_logical_emit_message(false, $1, $2)"
	if c.version >= 170000 {
		emit = "SELECT pg_logical_emit_message(false, $1, $2, true)"
	}
	if _, err := m.exec(ctx, db, emit, logicalMsgPrefix, token); err != nil {
		return fmt.Errorf("emit cut-over marker: %w", err)
	}
	if c.version < 170000 {
		c.pendingMarkers.Add(1)
		// Wake the consumer now (its read deadline expires at once) so it
		// forces the WAL flush without waiting for its next wake-up.
		c.flushNow.Store(true)
		_ = c.repl.Conn().SetReadDeadline(time.Now())
	}
	timer := time.NewTimer(limit)
	defer timer.Stop()
	for {
		c.mu.Lock()
		seen, ended, serr, ch := c.markers[token], c.ended, c.err, c.notify
		if seen {
			delete(c.markers, token)
		}
		c.mu.Unlock()
		if seen {
			return nil
		}
		if ended {
			return fmt.Errorf("the replication stream has ended: %w", serr)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
			if limit < logicalSyncTimeout {
				return errMarkerLate
			}
			return fmt.Errorf("the replication stream did not reach the cut-over marker within %s (%d bytes behind)", logicalSyncTimeout, c.lagBytes())
		}
	}
}

// isSerializationFailure: SQLSTATE 40001.
func isSerializationFailure(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "40001"
}
