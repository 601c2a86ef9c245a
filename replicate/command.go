package replicate

import (
	"errors"
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// ErrBadCommand marks a command the engine refuses before touching anything.
var ErrBadCommand = errors.New("invalid command")

// Command is one parsed ALTER TABLE. It is produced by the real PostgreSQL
// parser (pg_query), never by pattern matching on SQL text.
type Command struct {
	Text   string
	Schema string // as written; empty means "resolve with search_path"
	Table  string

	// Move is set for pg_tat's own "alter table T move column A before B".
	Move *MoveColumn

	// qualified: Schema came from Options.Schema, not from the text.
	qualified bool

	tree    *pg_query.ParseResult
	alter   *pg_query.AlterTableStmt // nil for rename / move
	rename  *pg_query.RenameStmt
	renames map[string]string // column renames: old name -> new name
	using   map[string]*pg_query.Node
}

// MoveColumn is pg_tat's column reordering: Column is placed just before Before.
type MoveColumn struct {
	Column, Before string
}

// ParseCommand parses and checks one command. It accepts exactly one
// ALTER TABLE statement (several subcommands allowed), an ALTER TABLE ...
// RENAME COLUMN, or pg_tat's own MOVE COLUMN form.
func ParseCommand(text string) (*Command, error) {
	if strings.TrimSpace(text) == "" {
		return nil, fmt.Errorf("%w: empty command", ErrBadCommand)
	}
	if mv, err := parseMove(text); err != nil || mv != nil {
		return mv, err
	}
	tree, err := pg_query.Parse(text)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCommand, err)
	}
	if len(tree.Stmts) != 1 {
		return nil, fmt.Errorf("%w: expected exactly one ALTER TABLE statement, got %d statements", ErrBadCommand, len(tree.Stmts))
	}
	c := &Command{Text: text, tree: tree, renames: map[string]string{}, using: map[string]*pg_query.Node{}}
	switch n := tree.Stmts[0].Stmt.Node.(type) {
	case *pg_query.Node_AlterTableStmt:
		a := n.AlterTableStmt
		if a.Objtype != pg_query.ObjectType_OBJECT_TABLE {
			return nil, fmt.Errorf("%w: only ALTER TABLE is supported, not ALTER %s", ErrBadCommand, objName(a.Objtype))
		}
		if a.MissingOk {
			return nil, fmt.Errorf("%w: ALTER TABLE IF EXISTS is not supported: the table must exist", ErrBadCommand)
		}
		c.alter = a
		c.Schema, c.Table = a.Relation.Schemaname, a.Relation.Relname
		for _, cn := range a.Cmds {
			cmd := cn.GetAlterTableCmd()
			if cmd == nil {
				return nil, fmt.Errorf("%w: unexpected node in ALTER TABLE", ErrBadCommand)
			}
			if err := checkSubcommand(cmd); err != nil {
				return nil, err
			}
			if cmd.Subtype == pg_query.AlterTableType_AT_AlterColumnType {
				if def := cmd.Def.GetColumnDef(); def != nil && def.RawDefault != nil {
					c.using[cmd.Name] = def.RawDefault
				}
			}
		}
	case *pg_query.Node_RenameStmt:
		r := n.RenameStmt
		if r.RenameType == pg_query.ObjectType_OBJECT_TABLE {
			return nil, fmt.Errorf("%w: ALTER TABLE ... RENAME TO needs no rewrite; run it directly", ErrBadCommand)
		}
		if r.RelationType != pg_query.ObjectType_OBJECT_TABLE || r.Relation == nil {
			return nil, fmt.Errorf("%w: only ALTER TABLE is supported", ErrBadCommand)
		}
		switch r.RenameType {
		case pg_query.ObjectType_OBJECT_COLUMN:
			c.renames[r.Subname] = r.Newname
		case pg_query.ObjectType_OBJECT_TABCONSTRAINT:
		default:
			return nil, fmt.Errorf("%w: ALTER TABLE ... RENAME TO needs no rewrite; run it directly", ErrBadCommand)
		}
		c.rename = r
		c.Schema, c.Table = r.Relation.Schemaname, r.Relation.Relname
	default:
		return nil, fmt.Errorf("%w: not an ALTER TABLE statement", ErrBadCommand)
	}
	return c, nil
}

// SplitStatements splits text into its statements, with the real parser.
func SplitStatements(text string) ([]string, error) {
	return pg_query.SplitWithParser(text, true)
}

// CombineCommands makes one command of several ALTER TABLE statements of
// the same table (the original pg_tat's repeated -c): their subcommands,
// in order, in one ALTER TABLE, which PostgreSQL applies in one rewrite as
// it applies the statements one after the other.
func CombineCommands(texts []string) (string, error) {
	if len(texts) == 1 {
		return texts[0], nil
	}
	var first *Command
	for i, text := range texts {
		c, err := ParseCommand(text)
		if err != nil {
			return "", fmt.Errorf("command %d: %w", i+1, err)
		}
		if c.alter == nil {
			return "", fmt.Errorf("%w: command %d: only ALTER TABLE subcommands can be combined with others, not %q", ErrBadCommand, i+1, text)
		}
		if first == nil {
			first = c
			continue
		}
		if c.Schema != first.Schema || c.Table != first.Table || c.alter.Relation.Inh != first.alter.Relation.Inh {
			return "", fmt.Errorf("%w: every command must alter the same table the same way: command %d alters %s, command 1 %s",
				ErrBadCommand, i+1, c.alter.Relation.Relname, first.alter.Relation.Relname)
		}
		first.alter.Cmds = append(first.alter.Cmds, c.alter.Cmds...)
	}
	out, err := pg_query.Deparse(first.tree)
	if err != nil {
		return "", fmt.Errorf("%w: combine commands: %v", ErrBadCommand, err)
	}
	if _, err := ParseCommand(out); err != nil {
		return "", fmt.Errorf("%w: the commands cannot be combined faithfully (%q): %v", ErrBadCommand, out, err)
	}
	return out, nil
}

func objName(t pg_query.ObjectType) string {
	return strings.TrimPrefix(t.String(), "OBJECT_")
}

// checkSubcommand refuses subcommands that cannot be applied to a shadow copy.
func checkSubcommand(cmd *pg_query.AlterTableCmd) error {
	switch cmd.Subtype {
	case pg_query.AlterTableType_AT_AttachPartition, pg_query.AlterTableType_AT_DetachPartition,
		pg_query.AlterTableType_AT_DetachPartitionFinalize, pg_query.AlterTableType_AT_AddInherit,
		pg_query.AlterTableType_AT_DropInherit, pg_query.AlterTableType_AT_AddOf,
		pg_query.AlterTableType_AT_DropOf, pg_query.AlterTableType_AT_GenericOptions:
		return fmt.Errorf("%w: %s is not supported online; run it directly", ErrBadCommand,
			strings.TrimPrefix(cmd.Subtype.String(), "AT_"))
	}
	return nil
}

// NeedsRewrite reports whether the command must go through a shadow copy.
// Subcommands that only change the catalog (add a column without a volatile
// default, drop a column, rename, set a default, statistics, storage, ...)
// run directly on the table under a short lock_timeout instead.
func (c *Command) NeedsRewrite() bool {
	if c.Move != nil {
		return true
	}
	if c.alter == nil {
		return false
	}
	for _, cn := range c.alter.Cmds {
		cmd := cn.GetAlterTableCmd()
		switch cmd.Subtype {
		case pg_query.AlterTableType_AT_AddColumn:
			if !catalogOnlyColumn(cmd.Def.GetColumnDef()) {
				return true
			}
		case pg_query.AlterTableType_AT_ColumnDefault, pg_query.AlterTableType_AT_DropNotNull,
			pg_query.AlterTableType_AT_SetStatistics, pg_query.AlterTableType_AT_SetOptions,
			pg_query.AlterTableType_AT_ResetOptions, pg_query.AlterTableType_AT_SetStorage,
			pg_query.AlterTableType_AT_SetCompression, pg_query.AlterTableType_AT_DropColumn,
			pg_query.AlterTableType_AT_DropConstraint, pg_query.AlterTableType_AT_ValidateConstraint,
			pg_query.AlterTableType_AT_ChangeOwner, pg_query.AlterTableType_AT_ClusterOn,
			pg_query.AlterTableType_AT_DropCluster, pg_query.AlterTableType_AT_EnableTrig,
			pg_query.AlterTableType_AT_EnableAlwaysTrig, pg_query.AlterTableType_AT_EnableReplicaTrig,
			pg_query.AlterTableType_AT_DisableTrig, pg_query.AlterTableType_AT_EnableTrigAll,
			pg_query.AlterTableType_AT_DisableTrigAll, pg_query.AlterTableType_AT_EnableTrigUser,
			pg_query.AlterTableType_AT_DisableTrigUser, pg_query.AlterTableType_AT_EnableRule,
			pg_query.AlterTableType_AT_EnableAlwaysRule, pg_query.AlterTableType_AT_EnableReplicaRule,
			pg_query.AlterTableType_AT_DisableRule, pg_query.AlterTableType_AT_ReplicaIdentity,
			pg_query.AlterTableType_AT_EnableRowSecurity, pg_query.AlterTableType_AT_DisableRowSecurity,
			pg_query.AlterTableType_AT_ForceRowSecurity, pg_query.AlterTableType_AT_NoForceRowSecurity,
			pg_query.AlterTableType_AT_SetRelOptions, pg_query.AlterTableType_AT_ResetRelOptions,
			pg_query.AlterTableType_AT_DropIdentity, pg_query.AlterTableType_AT_SetIdentity:
		case pg_query.AlterTableType_AT_AddConstraint:
			// A NOT VALID foreign key or check scans nothing.
			con := cmd.Def.GetConstraint()
			if con == nil || !con.SkipValidation {
				return true
			}
		default:
			return true
		}
	}
	return false
}

// catalogOnlyColumn: a new column with no default, or a constant one, and no
// constraint that would need a scan, is a catalog change since PostgreSQL 11.
func catalogOnlyColumn(def *pg_query.ColumnDef) bool {
	if def == nil {
		return false
	}
	for _, cn := range def.Constraints {
		con := cn.GetConstraint()
		switch {
		case con == nil:
			return false
		case con.Contype == pg_query.ConstrType_CONSTR_NULL:
		case con.Contype == pg_query.ConstrType_CONSTR_DEFAULT:
			if !isConstant(con.RawExpr) {
				return false
			}
		default:
			return false
		}
	}
	return true
}

func isConstant(n *pg_query.Node) bool {
	if n == nil {
		return true
	}
	switch v := n.Node.(type) {
	case *pg_query.Node_AConst:
		return true
	case *pg_query.Node_TypeCast:
		return isConstant(v.TypeCast.Arg)
	}
	return false
}

// ShadowSQL is the command rewritten to act on the shadow table. idx maps
// names of the original's indexes and index-backed constraints to the
// shadow's, because index names are unique per schema.
func (c *Command) ShadowSQL(schema, shadow string, idx map[string]string) (string, error) {
	if c.Move != nil {
		return "", nil
	}
	rel := &pg_query.RangeVar{Schemaname: schema, Relname: shadow, Inh: true, Relpersistence: "p"}
	mapName := func(s string) string {
		if m, ok := idx[s]; ok {
			return m
		}
		return s
	}
	if c.rename != nil {
		c.rename.Relation = rel
		if c.rename.RenameType == pg_query.ObjectType_OBJECT_TABCONSTRAINT {
			c.rename.Subname = mapName(c.rename.Subname)
		}
	} else {
		c.alter.Relation = rel
		for _, cn := range c.alter.Cmds {
			cmd := cn.GetAlterTableCmd()
			switch cmd.Subtype {
			case pg_query.AlterTableType_AT_DropConstraint, pg_query.AlterTableType_AT_AlterConstraint,
				pg_query.AlterTableType_AT_ValidateConstraint, pg_query.AlterTableType_AT_ClusterOn:
				cmd.Name = mapName(cmd.Name)
			case pg_query.AlterTableType_AT_ReplicaIdentity:
				if ri := cmd.Def.GetReplicaIdentityStmt(); ri != nil && ri.Name != "" {
					ri.Name = mapName(ri.Name)
				}
			case pg_query.AlterTableType_AT_AddConstraint, pg_query.AlterTableType_AT_AddIndexConstraint:
				if con := cmd.Def.GetConstraint(); con != nil && con.Indexname != "" {
					con.Indexname = mapName(con.Indexname)
				}
			}
		}
	}
	out, err := pg_query.Deparse(c.tree)
	if err != nil {
		return "", fmt.Errorf("deparse command for shadow: %w", err)
	}
	// The deparser is not lossless for every exotic input: what runs must
	// parse back to one ALTER TABLE of the shadow, or nothing runs at all.
	back, err := ParseCommand(out)
	if err != nil || back.Table != shadow || back.Schema != schema || back.Move != nil {
		return "", fmt.Errorf("%w: the command cannot be rewritten faithfully for the shadow (%q)", ErrBadCommand, out)
	}
	return out, nil
}

// QualifiedSQL is the command with its table in schema (ONLY kept), for a
// command that named it without one.
func (c *Command) QualifiedSQL(schema string) (string, error) {
	var rel *pg_query.RangeVar
	switch {
	case c.rename != nil:
		rel = c.rename.Relation
	case c.alter != nil:
		rel = c.alter.Relation
	default:
		return "", fmt.Errorf("%w: %q cannot run as it is", ErrBadCommand, c.Text)
	}
	rel.Schemaname = schema
	out, err := pg_query.Deparse(c.tree)
	if err != nil {
		return "", fmt.Errorf("deparse command: %w", err)
	}
	back, err := ParseCommand(out)
	if err != nil || back.Table != c.Table || back.Schema != schema {
		return "", fmt.Errorf("%w: the command cannot be qualified faithfully (%q)", ErrBadCommand, out)
	}
	return out, nil
}

// RenamedTo gives a column's name after the command (renames applied).
func (c *Command) RenamedTo(col string) string {
	if n, ok := c.renames[col]; ok {
		return n
	}
	return col
}

// UsingExpr is the USING expression of ALTER COLUMN col TYPE, as SQL text.
func (c *Command) UsingExpr(col string) (string, bool, error) {
	n, ok := c.using[col]
	if !ok {
		return "", false, nil
	}
	sel := &pg_query.ParseResult{Version: c.tree.Version, Stmts: []*pg_query.RawStmt{{Stmt: &pg_query.Node{Node: &pg_query.Node_SelectStmt{
		SelectStmt: &pg_query.SelectStmt{TargetList: []*pg_query.Node{{Node: &pg_query.Node_ResTarget{
			ResTarget: &pg_query.ResTarget{Val: n}}}}, LimitOption: pg_query.LimitOption_LIMIT_OPTION_DEFAULT, Op: pg_query.SetOperation_SETOP_NONE}}}}}}
	out, err := pg_query.Deparse(sel)
	if err != nil {
		return "", false, fmt.Errorf("deparse USING of column %s: %w", col, err)
	}
	return strings.TrimPrefix(out, "SELECT "), true, nil
}

// parseMove recognises "alter table T move column A before B" with the
// PostgreSQL scanner; names are normalised by parsing them with the real
// parser, so quoting and case follow PostgreSQL's rules.
func parseMove(text string) (*Command, error) {
	scan, err := pg_query.Scan(text)
	if err != nil {
		return nil, nil
	}
	toks := scan.Tokens
	var sig []*pg_query.ScanToken
	for _, t := range toks {
		if t.Token == pg_query.Token_SQL_COMMENT || t.Token == pg_query.Token_C_COMMENT {
			continue
		}
		sig = append(sig, t)
	}
	for len(sig) > 0 && sig[len(sig)-1].Token == pg_query.Token_ASCII_59 {
		sig = sig[:len(sig)-1]
	}
	// ALTER TABLE name [. name] MOVE COLUMN a BEFORE b
	if len(sig) < 7 || sig[0].Token != pg_query.Token_ALTER || sig[1].Token != pg_query.Token_TABLE {
		return nil, nil
	}
	i := 2
	if sig[i].Token == pg_query.Token_ONLY {
		i++
	}
	nameStart := i
	i++
	if i < len(sig) && sig[i].Token == pg_query.Token_ASCII_46 {
		i += 2
	}
	if i+5 != len(sig) || sig[i].Token != pg_query.Token_MOVE ||
		sig[i+1].Token != pg_query.Token_COLUMN || sig[i+3].Token != pg_query.Token_BEFORE {
		return nil, nil
	}
	src := func(a, b *pg_query.ScanToken) string { return text[a.Start:b.End] }
	probe := fmt.Sprintf("SELECT %s, %s FROM %s", src(sig[i+2], sig[i+2]), src(sig[i+4], sig[i+4]), src(sig[nameStart], sig[i-1]))
	tree, err := pg_query.Parse(probe)
	if err != nil || len(tree.Stmts) != 1 {
		return nil, fmt.Errorf("%w: malformed MOVE COLUMN: %v", ErrBadCommand, err)
	}
	sel := tree.Stmts[0].Stmt.GetSelectStmt()
	if sel == nil || len(sel.TargetList) != 2 || len(sel.FromClause) != 1 {
		return nil, fmt.Errorf("%w: malformed MOVE COLUMN", ErrBadCommand)
	}
	col := func(n *pg_query.Node) (string, error) {
		ref := n.GetResTarget().GetVal().GetColumnRef()
		if ref == nil || len(ref.Fields) != 1 || ref.Fields[0].GetString_() == nil {
			return "", fmt.Errorf("%w: MOVE COLUMN needs plain column names", ErrBadCommand)
		}
		return ref.Fields[0].GetString_().Sval, nil
	}
	a, err := col(sel.TargetList[0])
	if err != nil {
		return nil, err
	}
	b, err := col(sel.TargetList[1])
	if err != nil {
		return nil, err
	}
	rv := sel.FromClause[0].GetRangeVar()
	if rv == nil {
		return nil, fmt.Errorf("%w: malformed MOVE COLUMN table", ErrBadCommand)
	}
	return &Command{Text: text, Schema: rv.Schemaname, Table: rv.Relname, Move: &MoveColumn{Column: a, Before: b},
		renames: map[string]string{}, using: map[string]*pg_query.Node{}}, nil
}
