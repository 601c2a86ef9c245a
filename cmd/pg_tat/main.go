// Command pg_tat runs one online ALTER TABLE from the command line, with the
// flags of the original pg_tat, on the same engine as the tatd sidecar.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	pgtat "github.com/pgtat/pg_tat"
	"github.com/pgtat/pg_tat/replicate"
)

const usage = `usage: pg_tat [--help] [-c COMMAND] [-h HOST] [-d DBNAME] [-U USER] [-W PASSWORD] [-p PORT] [--work-mem WORK_MEM] [--maintenance-work-mem MAINTENANCE_WORK_MEM]
              [--max-parallel-maintenance-workers MAX_PARALLEL_MAINTENANCE_WORKERS] [--copy-data-jobs COPY_DATA_JOBS] [--create-index-jobs CREATE_INDEX_JOBS] [--cleanup] [--continue-create-indexes]
              [--no-switch-table] [--continue-switch-table] [--lock-timeout LOCK_TIMEOUT] [--time-between-locks TIME_BETWEEN_LOCKS] [--min-delta-rows MIN_DELTA_ROWS] [--skip-fk-validation]
              [--show-queries] [--batch-size BATCH_SIZE] [--capture {trigger,logical}] [--verify | --no-verify] [--install]
              [--dry-run] [--copy-data-filter SQL] [--command-before-switch SQL] [--command-after-switch SQL]
              [--echo-queries] [--vacuum-freeze] [--catchup-timeout DURATION] [--keep-old-table DURATION] [--copy-progress-interval SEC] [--version]
              [--partial-mode]

PostgreSQL tool for alter table without locks.

options:
 --help                show this help message and exit
 -c COMMAND, --command COMMAND
                       alter table ... (repeat it for several ALTERs of the same table: they are
                       applied together, in one rewrite)
 -h HOST, --host HOST
 -d DBNAME, --dbname DBNAME
 -U USER, --user USER
 -W PASSWORD, --password PASSWORD
 -p PORT, --port PORT
 --work-mem WORK_MEM
 --maintenance-work-mem MAINTENANCE_WORK_MEM
 --max-parallel-maintenance-workers MAX_PARALLEL_MAINTENANCE_WORKERS
 --copy-data-jobs COPY_DATA_JOBS          (default 2)
 --create-index-jobs CREATE_INDEX_JOBS    (default 2)
 --cleanup             drop the leftovers of a failed run on the table of -c
 --continue-create-indexes
                       continue an interrupted run (copy and index builds resume)
 --no-switch-table     stop after the catch-up, before the switch
 --continue-switch-table
                       continue a run stopped by --no-switch-table and switch
 --lock-timeout LOCK_TIMEOUT              first lock attempt (default 200ms; bare numbers are seconds)
 --time-between-locks TIME_BETWEEN_LOCKS  pause between lock attempts (default 2s)
 --min-delta-rows MIN_DELTA_ROWS          switch when the backlog is below this (default 1000)
 --skip-fk-validation
 --show-queries        print every SQL statement
 --batch-size BATCH_SIZE                  rows per copy batch (default 10000; 0: each copy job copies its
                                          whole range at once, as the original's default)
 --capture CAPTURE     trigger (default) or logical
 --verify              before the switch, prove the shadow equals the transformed table (the default)
 --no-verify           skip that proof (saves verify's cost: a read of the shadow, checksums in the copy)
 --install             install or upgrade schema tat (for the tatd sidecar) and exit
 --dry-run             check everything, print the plan and every statement; change nothing
 --copy-data-filter SQL
                       copy only rows matching this expression (rows changed during the run
                       are re-read with it: the new table holds the rows matching at the switch)
 --command-before-switch SQL
                       run inside the cut-over transaction, after the lock and the last delta
                       (may be repeated: run in order)
 --command-after-switch SQL
                       run inside the cut-over transaction, after the swap (may be repeated)
 --echo-queries        same as --show-queries
 --vacuum-freeze       VACUUM (FREEZE, ANALYZE) the new table after the load
 --catchup-timeout DURATION
                       give up (original intact) when writes outpace the catch-up this long (default 1h)
 --keep-old-table DURATION
                       keep the old table (T__tat_old) in sync with the new one this long after
                       the switch, then drop it (pg_tat keeps running meanwhile; interrupted, the
                       same command run again continues the window; tat.revert needs tatd)
 --copy-progress-interval SEC
                       print a progress line this often when not on a terminal (default 5)
 --version             print the version and exit
 --partial-mode        allow altering a partitioned partition: it is migrated with its partitions
                       and attached back (a leaf partition or inheritance child needs no flag)
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

// multi is a flag that may be repeated; each value is kept, in order.
type multi []string

func (m *multi) String() string     { return strings.Join(*m, "; ") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

type cli struct {
	commands                                            multi
	host, dbname, user, password, port                  string
	workMem, maintenanceWorkMem                         string
	maxParallel, copyJobs, indexJobs, batch             int
	cleanup, continueIdx, noSwitch, contSwitch          bool
	lockTimeout, betweenLocks                           string
	minDelta                                            int64
	skipFK, showQueries, help, install, verify, partial bool
	capture                                             string
	filter                                              string
	before, after                                       multi
	dryRun, echo, freeze, version                       bool
	catchupTimeout, progressEvery, keepOld              string
	command                                             string // the -c commands combined
}

func parse(args []string, stderr io.Writer) (*cli, error) {
	c := &cli{}
	d := replicate.DefaultOptions()
	fs := flag.NewFlagSet("pg_tat", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	str := func(p *string, def string, names ...string) {
		for _, n := range names {
			fs.StringVar(p, n, def, "")
		}
	}
	fs.Var(&c.commands, "c", "")
	fs.Var(&c.commands, "command", "")
	str(&c.host, "", "h", "host")
	str(&c.dbname, "", "d", "dbname")
	str(&c.user, "", "U", "user")
	str(&c.password, "", "W", "password")
	str(&c.port, "", "p", "port")
	str(&c.workMem, "", "work-mem")
	str(&c.maintenanceWorkMem, "", "maintenance-work-mem")
	fs.IntVar(&c.maxParallel, "max-parallel-maintenance-workers", -1, "")
	fs.IntVar(&c.copyJobs, "copy-data-jobs", d.CopyDataJobs, "")
	fs.IntVar(&c.indexJobs, "create-index-jobs", d.CreateIndexJobs, "")
	fs.BoolVar(&c.cleanup, "cleanup", false, "")
	fs.BoolVar(&c.continueIdx, "continue-create-indexes", false, "")
	fs.BoolVar(&c.noSwitch, "no-switch-table", false, "")
	fs.BoolVar(&c.contSwitch, "continue-switch-table", false, "")
	str(&c.lockTimeout, d.LockTimeout.String(), "lock-timeout")
	str(&c.betweenLocks, d.TimeBetweenLocks.String(), "time-between-locks")
	fs.Int64Var(&c.minDelta, "min-delta-rows", d.MinDeltaRows, "")
	fs.BoolVar(&c.skipFK, "skip-fk-validation", false, "")
	fs.BoolVar(&c.showQueries, "show-queries", false, "")
	fs.IntVar(&c.batch, "batch-size", d.BatchSize, "")
	fs.BoolVar(&c.help, "help", false, "")
	fs.BoolVar(&c.install, "install", false, "")
	// Verify is on by default; both flags set it, the last one given wins.
	fs.BoolVar(&c.verify, "verify", true, "")
	fs.BoolFunc("no-verify", "", func(s string) error {
		v, err := strconv.ParseBool(s)
		c.verify = !v
		return err
	})
	fs.BoolVar(&c.partial, "partial-mode", false, "")
	str(&c.filter, "", "copy-data-filter")
	fs.Var(&c.before, "command-before-switch", "")
	fs.Var(&c.after, "command-after-switch", "")
	fs.BoolVar(&c.version, "version", false, "")
	str(&c.progressEvery, "5", "copy-progress-interval")
	fs.BoolVar(&c.dryRun, "dry-run", false, "")
	fs.BoolVar(&c.echo, "echo-queries", false, "")
	fs.BoolVar(&c.freeze, "vacuum-freeze", false, "")
	str(&c.catchupTimeout, d.CatchupTimeout.String(), "catchup-timeout")
	str(&c.keepOld, "", "keep-old-table")
	str(&c.capture, d.Capture, "capture")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if len(c.commands) > 0 {
		// Several -c, as the original: applied together (one ALTER TABLE).
		cmd, err := replicate.CombineCommands(c.commands)
		if err != nil {
			return nil, err
		}
		c.command = cmd
	}
	return c, nil
}

// options turns the flags into engine options.
func (c *cli) options() (replicate.Options, error) {
	o := replicate.DefaultOptions()
	o.Command = c.command
	o.Capture = c.capture
	o.CopyDataJobs, o.CreateIndexJobs, o.BatchSize = c.copyJobs, c.indexJobs, c.batch
	if c.batch == 0 {
		// The original's default: no batches, each job copies its range at once.
		o.BatchSize = wholeRange
	}
	o.MinDeltaRows = c.minDelta
	o.WorkMem, o.MaintenanceWorkMem = c.workMem, c.maintenanceWorkMem
	o.MaxParallelMaintenanceWorkers = c.maxParallel
	o.SkipFKValidation = c.skipFK
	o.Verify = c.verify
	o.PartialMode = c.partial
	o.CopyDataFilter = c.filter
	o.CommandBeforeSwitch, o.CommandAfterSwitch = joinStatements(c.before), joinStatements(c.after)
	o.DryRun = c.dryRun
	o.VacuumFreeze = c.freeze
	o.Continue = c.continueIdx || c.contSwitch
	o.StopBeforeSwitch = c.noSwitch
	var err error
	if o.LockTimeout, err = parseDuration(c.lockTimeout); err != nil {
		return o, fmt.Errorf("--lock-timeout: %w", err)
	}
	if o.TimeBetweenLocks, err = parseDuration(c.betweenLocks); err != nil {
		return o, fmt.Errorf("--time-between-locks: %w", err)
	}
	if o.CatchupTimeout, err = parseDuration(c.catchupTimeout); err != nil {
		return o, fmt.Errorf("--catchup-timeout: %w", err)
	}
	if c.keepOld != "" {
		if o.KeepOld, err = parseDuration(c.keepOld); err != nil {
			return o, fmt.Errorf("--keep-old-table: %w", err)
		}
	}
	return o, o.Validate()
}

// wholeRange is --batch-size 0: a batch larger than any table.
const wholeRange = 1 << 30

// joinStatements runs repeated --command-before-switch (or -after-switch)
// values one after the other, in one Exec.
func joinStatements(stmts []string) string {
	out := make([]string, 0, len(stmts))
	for _, s := range stmts {
		if s = strings.TrimRight(strings.TrimSpace(s), ";"); s != "" {
			out = append(out, s)
		}
	}
	return strings.Join(out, ";\n")
}

// parseDuration accepts Go and PostgreSQL spellings ("200ms", "5s", "1min");
// a bare number is seconds, as in the original tool.
func parseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		return time.Duration(f * float64(time.Second)), nil
	}
	s = strings.Replace(strings.Replace(s, "min", "m", 1), " ", "", -1)
	return time.ParseDuration(s)
}

// dsn builds a keyword/value connection string; unset parts fall back to
// the PG* environment variables and libpq defaults, as with psql.
func (c *cli) dsn() string {
	var parts []string
	add := func(k, v string) {
		if v != "" {
			v = strings.ReplaceAll(strings.ReplaceAll(v, `\`, `\\`), `'`, `\'`)
			parts = append(parts, k+"='"+v+"'")
		}
	}
	add("host", c.host)
	add("port", c.port)
	add("dbname", c.dbname)
	add("user", c.user)
	add("password", c.password)
	add("application_name", "pg_tat")
	return strings.Join(parts, " ")
}

func run(args []string, stdout, stderr io.Writer) int {
	c, err := parse(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			return 0
		}
		fmt.Fprintf(stderr, "pg_tat: %v\n%s", err, usage)
		return 2
	}
	if c.help {
		fmt.Fprint(stdout, usage)
		return 0
	}
	if c.version {
		fmt.Fprintf(stdout, "pg_tat %s\n", version)
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg, err := pgxpool.ParseConfig(c.dsn())
	if err != nil {
		fmt.Fprintf(stderr, "pg_tat: connection: %v\n", err)
		return 2
	}
	cfg.MaxConns = int32(c.copyJobs + c.indexJobs + 3)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "pg_tat: connect: %v\n", err)
		return 1
	}
	defer pool.Close()
	if c.install {
		if _, err := pool.Exec(ctx, pgtat.InstallSQL); err != nil {
			fmt.Fprintf(stderr, "pg_tat: install: %v\n", err)
			return 1
		}
		fmt.Fprintln(stdout, "schema tat installed")
		return 0
	}
	if c.command == "" {
		fmt.Fprintf(stderr, "pg_tat: -c COMMAND is required\n%s", usage)
		return 2
	}
	if c.cleanup {
		cmd, err := replicate.ParseCommand(c.command)
		if err != nil {
			fmt.Fprintf(stderr, "pg_tat: %v\n", err)
			return 2
		}
		tbl := cmd.Table
		if cmd.Schema != "" {
			tbl = cmd.Schema + "." + tbl
		}
		if err := replicate.Cleanup(ctx, pool, quoteRel(cmd.Schema, cmd.Table)); err != nil {
			fmt.Fprintf(stderr, "pg_tat: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "cleaned up leftovers of %s\n", tbl)
		return 0
	}
	o, err := c.options()
	if err != nil {
		fmt.Fprintf(stderr, "pg_tat: %v\n", err)
		return 2
	}
	if c.showQueries || c.echo || c.dryRun {
		o.ShowQueries = func(sql string) { fmt.Fprintf(stderr, "%s;\n", sql) }
	}
	prog := newProgress(stdout)
	every, err := parseDuration(c.progressEvery)
	if err != nil || every <= 0 {
		fmt.Fprintf(stderr, "pg_tat: --copy-progress-interval: %q is not a positive number of seconds\n", c.progressEvery)
		return 2
	}
	prog.every = every
	err = replicate.Run(ctx, pool, o, prog, nil)
	prog.finish()
	if err != nil {
		fmt.Fprintf(stderr, "pg_tat: %v\n", err)
		if errors.Is(err, replicate.ErrBadCommand) {
			return 2
		}
		return 1
	}
	return 0
}
