package sqlapi

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/pgtat/pg_tat/replicate"
)

// jobOptions is the options jsonb of tat.migrations, as resolved by
// tat._resolve_options (every key present).
type jobOptions struct {
	Capture                       string  `json:"capture"`
	CopyDataJobs                  *int    `json:"copy_data_jobs"`
	CreateIndexJobs               *int    `json:"create_index_jobs"`
	BatchSize                     *int    `json:"batch_size"`
	MinDeltaRows                  *int64  `json:"min_delta_rows"`
	WorkMem                       *string `json:"work_mem"`
	MaintenanceWorkMem            *string `json:"maintenance_work_mem"`
	MaxParallelMaintenanceWorkers *int    `json:"max_parallel_maintenance_workers"`
	Switch                        string  `json:"switch"`
	SkipFKValidation              bool    `json:"skip_fk_validation"`
	Verify                        *bool   `json:"verify"` // nil (a job queued before verify was on by default): the default
	VacuumFreeze                  bool    `json:"vacuum_freeze"`
	PartialMode                   bool    `json:"partial_mode"`
	CopyDataFilter                *string `json:"copy_data_filter"`
	CommandBeforeSwitch           *string `json:"command_before_switch"`
	CommandAfterSwitch            *string `json:"command_after_switch"`
}

// ContinuesEarlierRun reports whether a claimed job continues what an earlier
// attempt built: only when that attempt got as far as the copy (the row's
// phase, written at each phase change, is copy or later). An attempt that
// died in prepare or capture may have left a saved plan without planned copy
// ranges or without its capture trigger: continuing it would copy nothing
// and swap in an empty table, so the runner drops those leftovers and starts
// over instead (StartsOver).
func ContinuesEarlierRun(j Job) bool {
	if j.Attempts <= 1 {
		return false
	}
	switch j.Phase {
	case "", replicate.PhasePrepare, replicate.PhaseCapture:
		return false
	}
	return true
}

// StartsOver reports whether a claimed job was attempted before but cannot
// continue that attempt (see ContinuesEarlierRun): the runner drops the
// earlier attempt's leftovers before it runs the job.
func StartsOver(j Job) bool { return j.Attempts > 1 && !ContinuesEarlierRun(j) }

// Options converts a job row into engine options: defaults of
// replicate.DefaultOptions overridden by the row, RunAs = requested_by (the
// engine re-checks that role may ALTER the table), ManualSwitch from
// switch = 'manual', and Continue when an earlier attempt of the same job was
// interrupted after it started copying (ContinuesEarlierRun), so the engine
// reuses what that attempt built.
func Options(j Job) (replicate.Options, error) {
	o := replicate.DefaultOptions()
	o.Command = j.Command
	o.RunAs = j.RequestedBy
	var jo jobOptions
	if len(j.Options) > 0 {
		if err := json.Unmarshal(j.Options, &jo); err != nil {
			return o, fmt.Errorf("options of migration %d: %w", j.ID, err)
		}
	}
	if jo.Capture != "" {
		o.Capture = jo.Capture
	}
	if jo.CopyDataJobs != nil {
		o.CopyDataJobs = *jo.CopyDataJobs
	}
	if jo.CreateIndexJobs != nil {
		o.CreateIndexJobs = *jo.CreateIndexJobs
	}
	if jo.BatchSize != nil {
		o.BatchSize = *jo.BatchSize
	}
	if jo.MinDeltaRows != nil {
		o.MinDeltaRows = *jo.MinDeltaRows
	}
	if jo.WorkMem != nil {
		o.WorkMem = *jo.WorkMem
	}
	if jo.MaintenanceWorkMem != nil {
		o.MaintenanceWorkMem = *jo.MaintenanceWorkMem
	}
	if jo.MaxParallelMaintenanceWorkers != nil {
		o.MaxParallelMaintenanceWorkers = *jo.MaxParallelMaintenanceWorkers
	}
	if j.LockTimeout > 0 {
		o.LockTimeout = j.LockTimeout
	}
	if j.CatchupTimeout > 0 {
		o.CatchupTimeout = j.CatchupTimeout
	}
	if j.TimeBetweenLocks >= 0 {
		o.TimeBetweenLocks = j.TimeBetweenLocks
	}
	switch jo.Switch {
	case "", "auto":
	case "manual":
		o.ManualSwitch = true
	default:
		return o, fmt.Errorf("options of migration %d: switch must be auto or manual, not %q", j.ID, jo.Switch)
	}
	o.SkipFKValidation = jo.SkipFKValidation
	o.KeepOld = j.KeepOld
	if jo.Verify != nil {
		o.Verify = *jo.Verify
	}
	o.VacuumFreeze, o.PartialMode = jo.VacuumFreeze, jo.PartialMode
	for dst, src := range map[*string]*string{&o.CopyDataFilter: jo.CopyDataFilter,
		&o.CommandBeforeSwitch: jo.CommandBeforeSwitch, &o.CommandAfterSwitch: jo.CommandAfterSwitch} {
		if src != nil {
			*dst = *src
		}
	}
	o.Continue = ContinuesEarlierRun(j)
	if stmts, err := replicate.SplitStatements(j.Command); err == nil && len(stmts) > 1 {
		// Several ALTER TABLE statements of one table (tat.alter checked
		// that): applied together, as the CLI's repeated -c.
		cmd, err := replicate.CombineCommands(stmts)
		if err != nil {
			return o, fmt.Errorf("migration %d: %w", j.ID, err)
		}
		j.Command, o.Command = cmd, cmd
	}
	if err := checkCommandTable(j); err != nil {
		return o, err
	}
	if schema, _, ok := splitQualifiedName(j.TableName); ok {
		o.Schema = schema // the command's table as tat.alter resolved it
	}
	if err := o.Validate(); err != nil {
		return o, fmt.Errorf("options of migration %d: %w", j.ID, err)
	}
	return o, nil
}

// checkCommandTable refuses a job whose command, as the PostgreSQL parser
// reads it, names another table than the one tat.alter resolved and checked
// the requester's ownership of (table_name): tat.alter reads the name with a
// simpler scanner, and the engine must not alter what was not checked. A
// command the parser refuses is left to the engine's own refusal. (An
// unqualified name is compared by its table name only: the schema it
// resolves to depends on the search_path.)
func checkCommandTable(j Job) error {
	schema, table, ok := splitQualifiedName(j.TableName)
	if !ok {
		return nil
	}
	c, err := replicate.ParseCommand(j.Command)
	if err != nil {
		return nil
	}
	if c.Table != table || (c.Schema != "" && c.Schema != schema) {
		named := c.Table
		if c.Schema != "" {
			named = c.Schema + "." + c.Table
		}
		return fmt.Errorf("migration %d: the command alters table %q, but it was queued for %s (whose ownership tat.alter checked)",
			j.ID, named, j.TableName)
	}
	return nil
}

// splitQualifiedName splits schema.table as format('%I.%I') writes it.
func splitQualifiedName(s string) (schema, table string, ok bool) {
	var parts []string
	for i := 0; i <= len(s); {
		var b strings.Builder
		if i < len(s) && s[i] == '"' {
			i++
			for {
				if i >= len(s) {
					return "", "", false
				}
				if s[i] == '"' {
					if i+1 < len(s) && s[i+1] == '"' {
						b.WriteByte('"')
						i += 2
						continue
					}
					i++
					break
				}
				b.WriteByte(s[i])
				i++
			}
		} else {
			for i < len(s) && s[i] != '.' {
				b.WriteByte(s[i])
				i++
			}
		}
		parts = append(parts, b.String())
		if i == len(s) {
			break
		}
		if s[i] != '.' {
			return "", "", false
		}
		i++
	}
	if len(parts) != 2 || parts[0] == "" || parts[1] == "" {
		return "", "", false
	}
	return parts[0], parts[1], true
}
